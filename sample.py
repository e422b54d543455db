"""
Sample from a trained model (nanoGPT's sample.py), optionally showing which expert routed each token.

    python sample.py --out_dir=out-uoe --start="ROMEO:" --num_samples=2 --max_new_tokens=200
    python sample.py --out_dir=out-uoe --show_routing --routing_layer=0 --routing_html=routing.html

Options are train.py's: --key=value (Python literals; strings may be bare), a boolean also as a bare --flag.
--start is the prompt text, or FILE:path to read it from a file; on a char dataset with an unknown token
(pystdlib_char) a character outside its vocabulary becomes that token, with a warning, as in its corpus.
The same --seed (0 to 2**63 - 1) gives the same text.
Only the dataset's own token ids are sampled (train.py pads GPT-2 BPE's 50257 to 50304; those extra ids
would not decode).
The model runs in float32 on --device; its routed experts take the path that expert_path='auto' picks
there (a checkpoint's own expert_path, e.g. 'grouped' on the GPU it was trained on, is not inherited).

--show_routing marks every token, prompt included, with the expert that has the highest routing score for
it in layer --routing_layer (default -1: the last): the model's own decision for the token with the context it
had when it read the token (up to block_size tokens ending at it: samples longer than block_size are routed in
sliding windows). On a terminal (NO_COLOR unset) the token's background has the expert's colour; otherwise
each token is written as [e]token, e the expert's index. --routing_html=FILE writes the same as a
self-contained HTML page.
"""
import html
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import uoe
from train import UserError, help_text, mps_device, option_table, parse_options


@dataclass
class SampleConfig:
    out_dir: str = "out"           # the run folder: ckpt.pt and run.json (whose meta gives the tokenizer)
    start: str = "\n"              # prompt, or FILE:path
    num_samples: int = 3           # samples to draw
    max_new_tokens: int = 200      # tokens per sample
    temperature: float = 0.8       # < 1 sharper, > 1 more random
    top_k: int | None = 200        # sample among the top_k most likely tokens (None: all)
    seed: int = 1337               # the same seed gives the same text (0 .. 2**63 - 1)
    device: str = "cpu"            # cpu, cuda, cuda:1, mps (Apple silicon, untested) ...
    show_routing: bool = False     # mark every token with the expert that routed it
    routing_layer: int = -1        # the layer whose routing is shown (-1: the last)
    routing_html: str = ""         # write the routed samples to this HTML file


# light backgrounds with black text, as xterm 256-colour codes; colours repeat after 16 experts
PALETTE = [217, 151, 117, 229, 183, 159, 216, 250, 210, 120, 111, 222, 177, 123, 180, 188]
# (background, foreground) pairs for 16-colour terminals
PALETTE16 = [(101, 30), (102, 30), (104, 30), (103, 30), (105, 30), (106, 30), (47, 30), (41, 97),
             (42, 30), (44, 97), (43, 30), (45, 97), (46, 30), (100, 97)]


def parse(argv):
    """The options (train.py's dialect: --key=value, a bare --flag for a boolean, --help), range-checked."""
    table = option_table([SampleConfig])
    opts, _ = parse_options(argv, table, help_text(table, __doc__, [("sample.py", SampleConfig)]), "sample.py")
    for key, ok, want in (("num_samples", opts["num_samples"] >= 1, "1 or more"),
                          ("max_new_tokens", opts["max_new_tokens"] >= 0, "0 or more"),
                          ("temperature", opts["temperature"] > 0, "a number above 0, e.g. 0.8"),
                          ("top_k", opts["top_k"] is None or opts["top_k"] >= 1, "1 or more, or None"),
                          # a non-negative int64: torch wraps a negative seed onto a large one, fails past 2**64
                          ("seed", 0 <= opts["seed"] < 2**63, "0 to 2**63 - 1")):
        if not ok:
            raise UserError(f"--{key}={opts[key]} is out of range; use {want}")
    return opts


def run_meta(out_dir, ckpt):
    """The run's dataset meta: from out_dir/run.json, else data_dir/<dataset>/meta.json."""
    from data.prepare import DataError, read_meta
    try:
        return json.loads((Path(out_dir) / "run.json").read_text())["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        tc = ckpt.get("train_config") or {}
        folder = Path(tc.get("data_dir", "data")) / str(tc.get("dataset"))
        try:
            return read_meta(folder)
        except DataError:
            raise UserError(f"no tokenizer: neither {out_dir}/run.json nor {folder}/meta.json is readable; "
                            "run from the folder you trained in, or restore run.json") from None


def dataset_vocab(ckpt, meta):
    """How many token ids the dataset has: the model's vocab_size may be larger (GPT-2 BPE's 50257 is padded
    to 50304), and the extra ids decode to nothing, so sampling stops below this."""
    return (ckpt.get("data") or {}).get("meta_vocab_size") or meta.get("vocab_size")


def tokenizer(meta):
    """(encode, decode) of the run's dataset; encode's errors are UserErrors."""
    from data.prepare import DataError, get_tokenizer
    try:
        encode, decode = get_tokenizer(meta)
    except DataError as e:
        raise UserError(str(e)) from None

    def checked_encode(text):
        try:
            return encode(text)
        except DataError as e:
            raise UserError(str(e)) from None
    return checked_encode, decode


@torch.no_grad()
def route(model, ids, layer, batch_size=32):
    """Expert with the highest score in `layer` for every token of ids, each routed as the model read it:
    as the last of the up to block_size tokens that end at it. Attention is causal, so the first block_size
    tokens share one forward; each later token is the last position of its own window (batched)."""
    T = model.config.block_size
    device = next(model.parameters()).device
    mlp = model.transformer.h[layer].mlp
    model(torch.tensor([ids[:T]], device=device))
    experts = mlp.last_routing["scores"].argmax(-1).tolist()
    windows = [ids[i + 1 - T:i + 1] for i in range(T, len(ids))]
    for b in range(0, len(windows), batch_size):
        batch = torch.tensor(windows[b:b + batch_size], device=device)
        model(batch)
        experts += mlp.last_routing["scores"].view(len(batch), T, -1)[:, -1].argmax(-1).tolist()
    return experts


def ansi(text, e, colours256):
    if colours256:
        start = f"\x1b[38;5;16;48;5;{PALETTE[e % len(PALETTE)]}m"
    else:
        bg, fg = PALETTE16[e % len(PALETTE16)]
        start = f"\x1b[{fg};{bg}m"
    return start + text.replace("\n", "↵\x1b[0m\n" + start) + "\x1b[0m"


def hex_of(code):
    """xterm 256-colour code (16..255) -> #rrggbb"""
    if code >= 232:
        return "#" + f"{8 + 10 * (code - 232):02x}" * 3
    levels = [0, 95, 135, 175, 215, 255]
    code -= 16
    return "#" + "".join(f"{levels[c]:02x}" for c in (code // 36, code // 6 % 6, code % 6))


def render(pieces, experts, mode, colours256=True):
    """pieces: token texts; experts: the expert of each token."""
    out = []
    for text, e in zip(pieces, experts, strict=True):
        if mode == "html":
            out.append(f'<span class="e{e % len(PALETTE)}" title="expert {e}">{html.escape(text)}</span>')
        else:
            out.append(f"[{e}]{text}" if mode == "plain" else ansi(text, e, colours256))
    return "".join(out)


def main(argv=None):
    try:
        sample(parse(sys.argv[1:] if argv is None else argv))
    except (UserError, uoe.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def usable_device(name):
    """The torch device --device names, checked here (mps: train.py's check, with its one-line error)."""
    if name == "mps":
        return mps_device()
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"device {name!r} is not usable here ({why}); try --device=cpu") from None
    return device


def sample(o):
    device = usable_device(o["device"])
    ckpt = uoe.load_checkpoint(os.path.join(o["out_dir"], "ckpt.pt"), map_location=device)
    model = uoe.model_from_checkpoint(ckpt)        # experts on the path 'auto' picks here, not the checkpoint's
    model = model.to(device).eval()
    meta = run_meta(o["out_dir"], ckpt)
    encode, decode = tokenizer(meta)
    start = o["start"]
    if start.startswith("FILE:"):
        try:
            start = Path(start[5:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {start[5:]} ({type(e).__name__}); "
                            "check --start=FILE:path") from None
    ids = encode(start)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give a non-empty --start")
    routing = o["show_routing"] or o["routing_html"]
    n_layer, layer = model.config.n_layer, o["routing_layer"]
    if routing and not model.transformer.h[0].mlp.routed:
        raise UserError("this model has no routing (ffn=dense); drop --show_routing/--routing_html")
    if routing and not -n_layer <= layer < n_layer:
        raise UserError(f"--routing_layer={layer} is out of range for {n_layer} layers; use 0..{n_layer - 1} or -1")
    layer %= n_layer
    mode = "ansi" if sys.stdout.isatty() and "NO_COLOR" not in os.environ else "plain"
    colours256 = "256" in os.environ.get("TERM", "") or os.environ.get("COLORTERM") in ("truecolor", "24bit")
    if o["show_routing"]:
        E = model.config.n_expert
        legend = " ".join(render([f" {e} "], [e], mode, colours256) for e in range(E)) if mode == "ansi" \
            else "[e]token = token routed to expert e"
        print(f"routing: expert with the highest score in layer {layer} of {n_layer} ({model.config.ffn}, "
              f"{E} experts): {legend}")
    torch.manual_seed(o["seed"])
    x = torch.tensor([ids], dtype=torch.long, device=device)
    pages = []
    for _ in range(o["num_samples"]):
        y = model.generate(x, o["max_new_tokens"], temperature=o["temperature"], top_k=o["top_k"],
                           vocab_limit=dataset_vocab(ckpt, meta))[0].tolist()
        if not routing:
            print(decode(y))
        else:
            pieces, experts = token_pieces(decode, y), route(model, y, layer)
            print(render(pieces, experts, mode, colours256) if o["show_routing"] else decode(y))
            pages.append(render(pieces, experts, "html"))
        print("---------------")
    if o["routing_html"]:
        write_html(o["routing_html"], f"{o['out_dir']}: routing in layer {layer}", pages, model.config.n_expert)


def token_pieces(decode, ids):
    """The text of each token, joining to exactly decode(ids): a BPE token that ends inside a
    multi-byte UTF-8 character gets '' and its bytes are shown with the token that completes it.
    Any other token is its own text, a char dataset's unknown token '\ufffd' included."""
    pieces, start = [], 0
    for i in range(len(ids)):
        text, ahead = decode(ids[start:i + 1]), ids[i + 1:i + 4]   # a character's bytes end within 3 tokens
        if text.endswith("\ufffd") and decode(ids[start:i + 4]) != text + decode(ahead):
            pieces.append("")   # the next tokens decode differently with this one's bytes: they complete it
            continue
        pieces.append(text)
        start = i + 1
    return pieces


def write_html(path, title, pages, n_expert):
    css = "".join(f".e{i}{{background:{hex_of(c)}}}" for i, c in enumerate(PALETTE))
    legend = " ".join(f'<span class="e{e % len(PALETTE)}">&nbsp;{e}&nbsp;</span>' for e in range(n_expert))
    body = "".join(f"<h2>sample {i + 1}</h2><pre>{p}</pre>" for i, p in enumerate(pages))
    title = html.escape(title)
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>body{{font-family:'
            f"sans-serif;max-width:60em;margin:2em auto}}pre{{white-space:pre-wrap;line-height:1.5}}{css}</style>"
            f"</head><body><h1>{title}</h1><p>Each token's background: the expert with the highest routing score "
            f"for it. Experts: {legend}</p>{body}</body></html>\n")
    try:
        Path(path).write_text(page, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); choose another --routing_html") from None


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:      # `python sample.py | head`: the reader has what it wanted; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when exit flushes
        sys.exit(141)            # 128 + SIGPIPE, as train.py and a program killed by SIGPIPE
