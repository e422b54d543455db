"""Tests for sample.py: deterministic for a seed, routing tags are the model's own decisions,
and every user error ends in one line with exit code 2."""

import html
import json
import os
import random
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import sample
import uoe
from conftest import ENV, REPO
from uoe import GPT, GPTConfig

ITOS = sorted(set("the quick brown fox jumps over the lazy dog.\nA bad cat sat on a mat;"))   # no '[' or '-'
META = {"name": "tiny", "tokenizer": "char", "vocab_size": len(ITOS), "dtype": "uint16", "itos": ITOS,
        "stoi": {c: i for i, c in enumerate(ITOS)}}
SIZES = dict(vocab_size=len(ITOS), block_size=32, n_layer=2, n_head=2, n_embd=32, n_expert=4, top_k=2,
             expert_hidden=32)
ENV = {**ENV, "NO_COLOR": "1"}


def write_run(out_dir, ffn="uoe", seed=0, meta=META, **overrides):
    """A run folder as train.py leaves it: ckpt.pt (a randomly initialised model) and run.json."""
    torch.manual_seed(seed)
    config = GPTConfig(ffn=ffn, **{**SIZES, "vocab_size": meta["vocab_size"], **overrides})
    out_dir.mkdir(parents=True)
    uoe.save_checkpoint(str(out_dir / "ckpt.pt"), {"model": GPT(config).state_dict(), "config": asdict(config),
                                                   "train_config": {"dataset": "tiny"}, "step": 0, "version": 1})
    (out_dir / "run.json").write_text(json.dumps({"config": asdict(config), "train": {}, "dataset": "tiny",
                                                  "meta": meta}))
    return out_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return {ffn: write_run(root / ffn, ffn) for ffn in ("uoe", "moe", "dense")}


def run_sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=ENV)


def samples(stdout):
    """The samples of sample.py's output (the routing legend line dropped)."""
    if stdout.startswith("routing:"):
        stdout = stdout.split("\n", 1)[1]
    return stdout.split("\n---------------\n")[:-1]


def parse_tags(text):
    """[(expert or None, char)] of plain routed output: '[e]c' per tagged token, bare untagged chars."""
    items, i = [], 0
    while i < len(text):
        m = re.compile(r"\[(\d+)\](.)", re.S).match(text, i)
        items.append((int(m[1]), m[2]) if m else (None, text[i]))
        i = m.end() if m else i + 1
    return items


@torch.no_grad()
def own_routing(out_dir, chars, layer, meta=META):
    """The model's top-1 expert (topk_idx[:, 0]) for each char, as the model read it: one forward per char
    of the up to block_size chars that end at it, the char's routing at the last position."""
    model = uoe.model_from_checkpoint(uoe.load_checkpoint(str(out_dir / "ckpt.pt"))).eval()
    ids, T = [meta["stoi"][c] for c in chars], model.config.block_size
    experts = []
    for i in range(len(ids)):
        model(torch.tensor([ids[max(0, i + 1 - T):i + 1]]))
        experts.append(model.transformer.h[layer].mlp.last_routing["topk_idx"][-1, 0].item())
    return experts


def check_routing(out_dir, text, layer, prompt, meta=META):
    items = parse_tags(text)
    chars = [c for _, c in items]
    assert "".join(chars).startswith(prompt)
    assert all(e is not None for e, _ in items)          # every token, the prompt's too, has its tag
    assert [e for e, _ in items] == own_routing(out_dir, chars, layer, meta)
    return items


def test_same_seed_same_text_and_routing_tags_are_the_models_own_decisions(runs, tmp_path):
    args = ["--out_dir=" + str(runs["uoe"]), "--start=the ", "--num_samples=2", "--max_new_tokens=40",
            "--seed=7", "--show_routing"]
    first = run_sample(*args, f"--routing_html={tmp_path / 'r.html'}")
    second = run_sample(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("routing: expert with the highest score in layer 1 of 2")
    texts = samples(first.stdout)
    assert len(texts) == 2 and texts[0] != texts[1]
    items = [check_routing(runs["uoe"], t, 1, "the ") for t in texts]   # 44 tokens > block_size 32
    # the HTML page shows the same tokens with the same experts
    page = (tmp_path / "r.html").read_text()
    spans = re.findall(r'<span class="e\d+" title="expert (\d+)">(.*?)</span>', page, re.S)
    assert [(int(e), html.unescape(c)) for e, c in spans] == [x for it in items for x in it]
    assert page.startswith("<!doctype html>") and "<style>" in page


def test_routing_layer_option_and_moe_routing(runs):
    p = run_sample("--out_dir=" + str(runs["moe"]), "--start=a", "--num_samples=1", "--max_new_tokens=75",
                   "--show_routing", "--routing_layer=0")
    assert p.returncode == 0, p.stderr
    (text,) = samples(p.stdout)
    check_routing(runs["moe"], text, 0, "a")


def test_different_seed_different_text_and_plain_output_without_routing(runs, capsys):
    texts = []
    for seed in (1, 2):
        sample.main(["--out_dir=" + str(runs["dense"]), "--num_samples=1", "--max_new_tokens=30", f"--seed={seed}",
                     "--temperature=1.5", "--top_k=None"])
        texts.append(samples(capsys.readouterr().out)[0])
    assert texts[0] != texts[1] and "[" not in texts[0]
    assert set(texts[0]) <= set(ITOS)


def test_never_samples_the_padding_ids_of_a_padded_vocabulary(tmp_path, capsys):
    """A model whose vocab_size is padded past the dataset's (as train.py pads GPT-2 BPE), with the
    padding ids made the most likely ones: they must never come out (they would not decode)."""
    out = write_run(tmp_path / "padded", vocab_size=len(ITOS) + 24)
    ckpt = uoe.load_checkpoint(str(out / "ckpt.pt"))
    ckpt["model"]["lm_head.weight"][len(ITOS):] *= 50                 # (tied with wte)
    ckpt["data"] = {"meta_vocab_size": len(ITOS)}
    uoe.save_checkpoint(str(out / "ckpt.pt"), ckpt)
    sample.main(["--out_dir=" + str(out), "--num_samples=2", "--max_new_tokens=60", "--top_k=None",
                 "--temperature=2.0", "--show_routing"])
    texts = samples(capsys.readouterr().out)
    assert len(texts) == 2 and all(e is not None for t in texts for e, _ in parse_tags(t))
    assert set("".join(c for t in texts for _, c in parse_tags(t))) <= set(ITOS)
    assert sample.dataset_vocab({}, META) == len(ITOS)                  # a checkpoint without data: run.json's


def test_prompt_characters_outside_the_vocabulary_become_the_unknown_token_shown_as_its_own_piece(tmp_path, capsys):
    """A dataset with an unknown token (pystdlib_char: every non-ASCII character is UNK in its corpus): a prompt's
    unknown characters are encoded as UNK, with one warning line, and --show_routing tags UNK as its own token."""
    itos = ITOS + ["\ufffd"]                                          # code point order, as prepare.py writes it
    meta = {**META, "vocab_size": len(itos), "itos": itos, "stoi": {c: i for i, c in enumerate(itos)},
            "unk": "\ufffd"}
    out = write_run(tmp_path / "unk", meta=meta)
    sample.main([f"--out_dir={out}", "--start=a caf\u00e9 \u201cat\u201d", "--num_samples=1",
                 "--max_new_tokens=40", "--show_routing"])
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: 3 characters ") and captured.err.count("\n") == 1, captured.err
    (text,) = samples(captured.out)
    items = check_routing(out, text, 1, "a caf\ufffd \ufffdat\ufffd", meta)   # one tag per character, UNK's too
    assert len(items) == len("a caf\u00e9 \u201cat\u201d") + 40


def test_start_from_file(runs, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("a bad cat")
    sample.main(["--out_dir=" + str(runs["uoe"]), f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=5"])
    assert samples(capsys.readouterr().out)[0].startswith("a bad cat")


def test_tokenizer_from_the_dataset_when_run_json_is_missing(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = uoe.load_checkpoint(str(runs["uoe"] / "ckpt.pt"))
    ckpt["train_config"] = {"dataset": "tiny", "data_dir": str(tmp_path / "data")}
    uoe.save_checkpoint(str(out / "ckpt.pt"), ckpt)
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    (tmp_path / "data" / "tiny" / "meta.json").write_text(json.dumps(META))
    sample.main(["--out_dir=" + str(out), "--start=the", "--num_samples=1", "--max_new_tokens=5"])
    assert samples(capsys.readouterr().out)[0].startswith("the")


def test_ansi_colours_one_per_expert():
    text = sample.render(["a", "b", "\n"], [0, 1, 1], "ansi", colours256=True)
    assert text.startswith("\x1b[38;5;16;48;5;%dma\x1b[0m" % sample.PALETTE[0])
    assert "48;5;%dmb" % sample.PALETTE[1] in text and "↵\x1b[0m\n" in text
    assert sample.render(["a"], [2], "ansi", colours256=False) == "\x1b[30;104ma\x1b[0m"
    assert sample.hex_of(217) == "#ffafaf" and sample.hex_of(250) == "#bcbcbc"


def corrupt(out_dir):
    out_dir.mkdir()
    (out_dir / "ckpt.pt").write_bytes(os.urandom(4096))


def incompatible_config(out_dir):
    write_run(out_dir)
    ckpt = uoe.load_checkpoint(str(out_dir / "ckpt.pt"))
    ckpt["config"]["expert_capacity"] = 1.25          # a key this version's GPTConfig does not have
    uoe.save_checkpoint(str(out_dir / "ckpt.pt"), ckpt)


def incompatible_weights(out_dir):
    write_run(out_dir)
    ckpt = uoe.load_checkpoint(str(out_dir / "ckpt.pt"))
    ckpt["model"] = {k.replace("w_gate", "w_g"): v for k, v in ckpt["model"].items()}   # renamed parameters
    uoe.save_checkpoint(str(out_dir / "ckpt.pt"), ckpt)


@pytest.mark.parametrize("make,extra,msg", [
    (lambda d: None, [], "no checkpoint at"),
    (corrupt, [], "is corrupt or truncated"),
    (incompatible_config, [], "not written by this version"),
    (incompatible_weights, [], "does not match this version"),
    (write_run, ["--bogus=1"], "unknown option --bogus; python sample.py --help lists them"),
    (write_run, ["--num_sample=2"], "unknown option --num_sample; did you mean --num_samples?"),
    (write_run, ["out"], "cannot parse 'out'; write options as --key=value"),
    (write_run, ["--num_samples=two"], "--num_samples expects int, got 'two'"),
    (write_run, ["--num_samples=2.5"], "--num_samples expects int, got 2.5"),
    (write_run, ["--temperature=0"], "out of range"),
    (write_run, ["--seed=-1"], "--seed=-1 is out of range; use 0 to 2**63 - 1"),
    (write_run, [f"--seed={2**64}"], f"--seed={2**64} is out of range"),
    (write_run, ["--max_new_tokens"], "cannot parse '--max_new_tokens'"),
    (write_run, ["--start=[x]"], "not in the dataset's vocabulary"),
    (write_run, ["--start=FILE:/nonexistent/p.txt"], "cannot read the prompt file"),
    (write_run, ["--show_routing", "--routing_layer=5"], "out of range for 2 layers"),
    (lambda d: write_run(d, "dense"), ["--show_routing"], "no routing (ffn=dense)"),
])
def test_user_errors_end_in_one_line_and_exit_2(tmp_path, capsys, make, extra, msg):
    out = tmp_path / "out"
    make(out)
    with pytest.raises(SystemExit) as e:
        sample.main(["--out_dir=" + str(out), "--max_new_tokens=2", *extra])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and msg in captured.err, captured.err
    assert captured.out == ""


def test_the_largest_seed_samples(runs, capsys):
    assert sample.parse(["--seed=0"])["seed"] == 0
    sample.main([f"--out_dir={runs['dense']}", f"--seed={2**63 - 1}", "--num_samples=1", "--max_new_tokens=3"])
    assert len(samples(capsys.readouterr().out)) == 1


def test_mps_device_is_checked_with_a_one_line_error(tmp_path, capsys, monkeypatch):
    """Apple silicon cannot run here: the check with MPS pretended, and the error where there is none."""
    out = write_run(tmp_path / "out")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--out_dir={out}", "--device=mps"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --device=mps but MPS") and err.rstrip().endswith("use --device=cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert sample.usable_device("mps") == torch.device("mps")


def test_a_grouped_checkpoint_samples_where_the_grouped_path_cannot_run(tmp_path, capsys, monkeypatch):
    """expert_path says how a model ran where it was trained: sample.py picks its own ('auto')."""
    out = write_run(tmp_path / "out", expert_path="grouped")
    monkeypatch.setattr(uoe, "GROUPED_MM", None)                  # a torch without grouped_mm
    sample.main([f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=4", "--show_routing"])
    assert len(samples(capsys.readouterr().out)) == 1


def test_help_lists_every_option_in_train_py_s_dialect(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name, default in asdict(sample.SampleConfig()).items():
        assert f"--{name}={default!r}" in text


def test_corrupt_checkpoint_from_the_command_line_no_traceback(tmp_path):
    corrupt(tmp_path / "out")
    p = run_sample(f"--out_dir={tmp_path / 'out'}")
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_routed_bpe_pieces_join_to_the_decoded_text():
    """A character split over several GPT-2 tokens is shown once, not as replacement characters."""
    from data.prepare import find_bpe_dir, gpt2_encoding
    from sample import token_pieces
    try:
        enc = gpt2_encoding(find_bpe_dir())
    except Exception:
        pytest.skip("no local GPT-2 BPE files")
    ids = enc.encode_ordinary("Hello’s “world” 日本")
    pieces = token_pieces(enc.decode, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == enc.decode(ids)
    assert "\ufffd" not in "".join(pieces)
    # a sampled model may emit any bytes: split characters, stray continuation bytes, a real U+FFFD
    byte_ids = [enc.encode_single_token(bytes([b])) for b in (0xe6, 0x97, 0xa5, 0xf0, 0x9f, 0x98, 0x80, 0xbf)]
    words = [enc.encode_ordinary(w) for w in ("a", " x", "\ufffd", "日本", "😀")]
    rng = random.Random(0)
    for _ in range(300):
        ids = [i for _ in range(rng.randint(1, 8)) for i in rng.choice([[rng.choice(byte_ids)], rng.choice(words)])]
        pieces = token_pieces(enc.decode, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == enc.decode(ids), ids


def test_each_character_token_is_its_own_piece_the_unknown_token_included():
    """pystdlib_char's UNK decodes to '\ufffd' like a split BPE character, but is a whole token."""
    from sample import token_pieces
    itos = ["a", "b", "\ufffd"]
    decode = lambda ids: "".join(itos[i] for i in ids)   # noqa: E731
    assert token_pieces(decode, [0, 2, 1]) == ["a", "\ufffd", "b"]
    assert token_pieces(decode, [2, 2, 0, 2]) == ["\ufffd", "\ufffd", "a", "\ufffd"]


def test_a_closed_output_pipe_ends_quietly_with_exit_141(runs):
    """`python sample.py | head -1`: the reader leaves after one line; no BrokenPipeError traceback."""
    # unbuffered: the first line comes at once, and every later print meets the closed pipe
    p = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={runs['uoe']}", "--num_samples=50",
                          "--max_new_tokens=20"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**ENV, "PYTHONUNBUFFERED": "1"})
    p.stdout.readline()
    p.stdout.close()
    stderr = p.stderr.read()
    assert p.wait(timeout=120) == 141 and stderr == b""
