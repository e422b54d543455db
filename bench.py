"""
Dense, MoE, AoE and UoE side by side: speed and memory of a training step; and a study of quality
at matched active FLOPs, the paper's UoE ablations and load balance, every run made by train.py.

    python bench.py speed                  # step time, tokens/s, peak memory, FLOP/s; eager and compiled
    python bench.py speed --preset gpu     # GPT-2-small-like (12 x 768, block 1024), bf16, one GPU
    python bench.py quality                # dense, moe, moe+shared, uoe: lr sweep, seeds, paired differences
    python bench.py ablate                 # UoE without VSE, output twice, other scores / norms / n_routing
    python bench.py balance                # expert load of moe and uoe without (and with) the aux loss
    python bench.py quality --help         # sizes, what the cpu defaults cost, the gpu preset

The size flags describe the UoE model; every other variant gets the expert_hidden D that
uoe.match_config picks to match its active FLOPs per token. Outputs go to --out_dir (default
bench_out/, not committed): bench_<command>.json, quality_curves.png, balance.png, and runs/, one
folder per train.py run of the study (train.log, metrics.jsonl, run.json, result.json).

How speed is measured (the machine may be shared, so every number is a median, and variants are
compared within one run): on CPU all models are built first, warmed up, then timed step by step
with the variants interleaved in every repetition, so a burst of load hits them all alike; on CUDA
one variant's models (eager, compiled) at a time, freed before the next.
- step: forward + backward + AdamW step, on random tokens.
- FLOP/s: 3 * uoe.flops_per_token * tokens / step time (the model's matmul FLOPs; a training
  step is ~3x the forward). On CUDA, MFU = FLOP/s / the GPU's peak from train.mfu_peak; on CPU,
  the fraction of the rate of a 1024x1024 float32 matmul timed in the same repetitions.
- memory: CUDA, max_memory_allocated over one step, counted as if the model were alone on the
  GPU; CPU, the peak RSS of a fresh process running two eager steps minus its RSS after
  importing torch (weights, grads, AdamW state, activations and allocator slack).
- FFN pieces (eager, layer 0 alone, forward + backward on random activations): the whole FFN;
  its expert path (uoe.dispatch with the FFN's own routing, captured from a forward); its
  always-on part (MoE's shared experts, UoE's virtual shared expert beyond scoring); scoring and
  the rest (router / routing neurons, top-k, gates, aux loss) = FFN - experts - always-on; and a
  dense SwiGLU with the FLOPs of the expert path. Each part's share of time is next to its share
  of the FFN's FLOPs.
"""
import argparse
import hashlib
import inspect
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch

import uoe
from train import UserError, mfu_peak   # the project's one UserError; the one table of GPU peaks for MFU
from uoe import FFN_VARIANTS, GPT, GPTConfig, flops_breakdown, flops_per_token, match_config, param_counts

REPO = Path(__file__).resolve().parent

# Defaults per preset and command; a flag given on the command line wins. CPU runs use one thread
# unless told otherwise: on a machine shared with other jobs, an op split over 2 threads waits for
# the second one to get a core, and every matmul then took >= 7 ms here (1 thread: 189 GFLOP/s
# on 1024^2; 2 threads on a loaded 2-core machine: 6-110 GFLOP/s).
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_expert", "top_k", "expert_hidden")
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, vocab_size=65,
                n_expert=8, top_k=2, expert_hidden=256, dtype="float32", compile="both", reps=11, warmup=3, threads=1,
                multiple_of=1),
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8, vocab_size=50304,
                n_expert=8, top_k=2, expert_hidden=1024, dtype="bfloat16", compile="both", reps=20, warmup=3,
                multiple_of=64),
}
class Parser(argparse.ArgumentParser):
    def error(self, message):           # argparse's own errors, one line, same convention
        raise UserError(f"{message}; see python {self.prog} --help")


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s} must be >= 1")
    return v


def positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"{s} must be a positive number")
    return v


def variant_list(s, allowed=FFN_VARIANTS):
    names = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown variant {bad[0] if bad else s!r} "
                                         f"(choose from {','.join(allowed)})")
    return list(dict.fromkeys(names))


def study_variant_list(s):
    return variant_list(s, tuple(STUDY_VARIANTS))


def ablation_list(s):
    return variant_list(s, tuple(ABLATIONS))


def float_list(s):
    try:
        vals = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of numbers") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{s!r} must be numbers >= 0")
    return list(dict.fromkeys(vals))


def positive_float_list(s):
    vals = float_list(s)
    if any(v == 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{s!r} must be positive numbers")
    return vals


HELP = {
    "speed": "time a training step of each variant (eager and compiled)",
    "quality": "val loss of dense, MoE, MoE + shared expert and UoE at matched active FLOPs: a learning-rate "
               "sweep on seed 0, then every seed at each variant's best lr; paired differences ± SE. "
               "CPU defaults: 24 train.py runs (4 lrs x 4 variants, then 2 more seeds each), an estimated 30 min "
               "on 2 idle cores",
    "ablate": "the paper's UoE ablations (no VSE, output twice, score pre/swiglu, norm 1/inf, n_routing halved/"
              "doubled) at UoE's best lr from quality; CPU defaults: 27 runs (the 3 full-UoE ones are quality's "
              "when it ran first), an estimated 30 min on 2 idle cores",
    "balance": "expert load of UoE and MoE without the load-balancing loss (and with it, for reference); CPU "
               "defaults: 12 runs (6 are quality's when it ran first), an estimated 15 min on 2 idle cores",
}
STUDY_EPILOG = """Every run is `python train.py --key=value ...` (the same recipe as a run you start yourself),
run in a subprocess with its own folder under OUT_DIR/runs/ and its result written there as soon as
it finishes: interrupt at any time (Ctrl-C) and rerun the same command to continue; finished runs are
skipped. Seeds are paired across variants: seed s gives every variant the same batches in the same
order, the same evaluation batches, and the same initial embeddings and first attention layer.
The cpu preset (2 x 64, E=8, K=2, UoE D=128, block 128, batch 16, 500 steps = 1.0M tokens of
pystdlib_char, a tenth of an epoch; warmup 100; 2 runs at a time on 1 thread each) trades model size
and run length for seeds and a learning-rate sweep. The gpu preset (8 x 512, block 512, batch 16,
1500 steps = 12.3M tokens, 2.4 epochs of pystdlib's 5.1M GPT-2 BPE tokens in Python 3.11; bf16,
compiled, widths multiples of 64) runs one model at a time: a few GB of GPU memory."""

SPEED_EPILOG = """The cpu preset (4 x 128, block 128, batch 16, float32, 1 thread) times all eight models (four
variants, eager and compiled) interleaved: a few minutes on 2 cores. The gpu preset (12 x 768, block
1024, batch 8, bf16 autocast, widths multiples of 64) builds one variant's two models at a time and
frees them before the next: the largest, MoE (D=1408, 379M parameters), holds 2 x 5.7 GiB of float32
weights, gradients and AdamW state, plus one step's activations (an estimate: about 20 GiB in all;
on a 24 GB card use --batch_size 4)."""

def build_parser():
    p = Parser(prog="bench.py", description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="command", metavar="{speed,quality,ablate,balance}", parser_class=Parser)
    for name in ("speed",) + STUDY_COMMANDS:
        study = name != "speed"
        s = sub.add_parser(name, help=HELP[name], description=HELP[name],
                           epilog=STUDY_EPILOG if study else SPEED_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                       help="default sizes: cpu (2 cores) or gpu (one GPU, bf16, compile)")
        if name == "speed":
            s.add_argument("--variants", type=variant_list, default=list(FFN_VARIANTS), help="comma-separated")
        elif name == "quality":
            s.add_argument("--variants", type=study_variant_list, default=["dense", "moe", "moe+shared", "uoe"],
                           help=f"comma-separated, of {','.join(STUDY_VARIANTS)} (default dense,moe,moe+shared,uoe)")
        elif name == "balance":
            s.add_argument("--variants", type=variant_list, default=["moe", "uoe"], help="default moe,uoe")
        else:
            s.add_argument("--ablations", type=ablation_list, default=list(ABLATIONS),
                           help=f"comma-separated, of {','.join(ABLATIONS)} (default all)")
        for k in MODEL_KEYS + ("batch_size",):
            if study and k == "vocab_size":
                continue          # the dataset decides
            s.add_argument(f"--{k}", type=positive_int, help="of UoE; the others' D is matched on FLOPs"
                           if k == "expert_hidden" else None)
        s.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16 = autocast (CUDA)")
        s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        s.add_argument("--out_dir", default="bench_out")
        s.add_argument("--json", help=f"output JSON (default OUT_DIR/bench_{name}.json)")
        if name == "speed":
            s.add_argument("--compile", choices=("eager", "compile", "both"))
            s.add_argument("--threads", type=positive_int,
                           help="CPU threads (torch.set_num_threads); the cpu preset uses 1")
            s.add_argument("--reps", type=positive_int, help="timed steps per variant (interleaved)")
            s.add_argument("--warmup", type=positive_int, help="untimed steps first (compiles)")
            s.add_argument("--memory", choices=("on", "off"), default="on", help="peak-memory measurement")
            s.add_argument("--peak_tflops", type=positive_float,
                           help="GPU peak (TFLOP/s) for MFU; default: train.py's table (bf16)")
            s.add_argument("--multiple_of", type=positive_int, help="round the matched widths D to a multiple of "
                           "this (gpu preset: 64, aligned bf16 GEMMs; the FLOP mismatch left is a table column)")
            s.add_argument("--seed", type=int, default=0)
            continue
        s.add_argument("--compile", choices=("eager", "compile"), help="train.py --compile (cpu: eager)")
        s.add_argument("--threads", type=positive_int, help="threads per run (OMP_NUM_THREADS; cpu preset: 1)")
        s.add_argument("--jobs", type=positive_int, help="runs at a time (cpu preset: 2, gpu: 1)")
        s.add_argument("--steps", type=positive_int, help="optimizer steps per run")
        s.add_argument("--warmup_steps", type=int, help="linear warmup steps, then cosine to lr/10")
        s.add_argument("--seeds", type=positive_int, help="number of seeds (0, 1, ...)")
        if name == "quality":
            s.add_argument("--lrs", type=positive_float_list,
                           help="learning rates of the sweep (seed 0), comma-separated")
        else:
            s.add_argument("--lr", type=positive_float, help="peak learning rate (default: the best of bench.py "
                           "quality from OUT_DIR/bench_quality.json if it used the same recipe, else the preset's)")
        if name == "balance":
            s.add_argument("--aux", type=float_list, default=[0.0, 0.01],
                           help="aux_loss_coef values (default 0,0.01: without and with the balance loss)")
        s.add_argument("--eval_interval", type=positive_int)
        s.add_argument("--eval_iters", type=positive_int)
        s.add_argument("--log_interval", type=positive_int, help="routing statistics every this many steps")
        s.add_argument("--dataset", help="data/<name> (pystdlib_char and pystdlib are prepared if missing)")
        s.add_argument("--data_dir", default=str(REPO / "data"))
        s.add_argument("--multiple_of", type=positive_int, help="round matched widths to a multiple of this")
        s.add_argument("--plot", choices=("on", "off"), default="on")
    return p


def parse_args(argv):
    """Parsed options with preset defaults filled in; raises UserError on bad input."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        raise UserError("no command; run python bench.py speed, quality, ablate or balance")
    preset = (PRESETS if args.command == "speed" else STUDY_PRESETS)[args.preset]
    for k, v in preset.items():
        if hasattr(args, k) and getattr(args, k) is None:
            setattr(args, k, v)
    if args.command != "speed" and args.warmup_steps < 0:
        raise UserError("--warmup_steps must be >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    if args.preset == "gpu" and args.device != "cuda":
        raise UserError("--preset gpu needs a CUDA GPU; use --preset cpu")
    if args.dtype == "bfloat16" and args.device != "cuda":
        raise UserError("--dtype bfloat16 (autocast) is for CUDA here; use --dtype float32 on CPU")
    if args.json is None:
        args.json = str(Path(args.out_dir) / f"bench_{args.command}.json")
    try:   # fail now, not after minutes of benchmarking
        for folder in {Path(args.out_dir), Path(args.json).parent}:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {e.filename} ({e.strerror}); choose another --out_dir / --json") from None
    return args


# -----------------------------------------------------------------------------
# arithmetic (kept separate so that the tests can check it on known numbers)

def train_flops(config, tokens):
    """Model FLOPs of training on `tokens` tokens: forward + backward ~= 3 x forward."""
    return 3 * flops_per_token(config) * tokens


def flop_rate(config, tokens, seconds):
    return train_flops(config, tokens) / seconds


def matmul_rate(n, seconds):
    """FLOP/s of an n x n by n x n matmul that took `seconds`."""
    return 2 * n ** 3 / seconds


def utilization(achieved, reference):
    """MFU (reference = GPU peak) or fraction of the measured matmul rate (CPU); None if unknown."""
    return achieved / reference if reference else None


def mean_std(xs):
    """Mean and sample standard deviation (0.0 for one value)."""
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


# -----------------------------------------------------------------------------
# models

def base_config(args, vocab_size=None):
    return GPTConfig(ffn="uoe", **{k: getattr(args, k) for k in MODEL_KEYS if k != "vocab_size"},
                     vocab_size=vocab_size or args.vocab_size)


def matched_configs(base, variants, by="flops", multiple_of=1):
    """{variant: config} with each variant's D matched to the UoE base config (UoE itself is the
    base); with multiple_of > 1, D is a multiple of it (aligned GEMMs) and some mismatch remains."""
    return {v: base if v == "uoe" else match_config(replace(base, ffn=v), base, by, multiple_of=multiple_of)
            for v in variants}


def setup_torch(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    # bench compiles several models whose modules share code objects (Block.forward, ...) in one
    # process: each model adds cache entries, so the default limit (8) would silently fall back
    # to eager for the later ones.
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit"):      # newer, older name
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)


def compile_blocks(model):
    """torch.compile each transformer block in place; embeddings, lm_head and loss stay eager.
    Why not torch.compile(model): with torch 2.13's inductor, a loss `ce + coef * zeros` whose
    `ce.detach()` is also kept (GPT.forward's last_ce; dense has no aux loss) comes back without
    a grad_fn; and for the routed variants dynamo skips GPT.forward anyway, because the graph
    break at uoe.dispatch (which runs eagerly) falls inside its loop over blocks. Compiling the
    blocks treats all four variants alike."""
    for block in model.transformer.h:
        block.compile()


def autocast(args):
    if args.dtype == "bfloat16":
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return nullcontext()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_optimizer(model, lr=1e-3, weight_decay=0.1):
    """AdamW, weight decay on matrices only (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=bool(params) and params[0].is_cuda)


def train_step(model, opt, x, y, ctx, grad_clip=1.0):
    with ctx:
        _, loss = model(x, y)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def dynamo_counts():
    """(graphs compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def graph_break_reasons():
    from torch._dynamo.utils import counters
    return sorted({k.strip().splitlines()[0] for k in counters["graph_break"]})


def state_bytes(model, opt):
    tensors = list(model.parameters()) + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


# -----------------------------------------------------------------------------
# speed

class Run:
    """One (variant, mode) of the speed benchmark: a model, its optimizer and its timings."""

    def __init__(self, variant, mode, config, args):
        torch.manual_seed(args.seed)
        self.variant, self.mode, self.config = variant, mode, config
        self.model = GPT(config).to(args.device)
        self.opt = make_optimizer(self.model)
        if mode == "compile":
            compile_blocks(self.model)
        self.times, self.graphs_per_warmup_step, self.graph_breaks = [], [], 0
        self.recompiles_timed = 0

    def step(self, x, y, args):
        return train_step(self.model, self.opt, x, y, autocast(args))


def time_call(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def capture_dispatch(mlp, x):
    """Run mlp(x) once and return the (args, kwargs) it passed to uoe.dispatch."""
    seen = {}
    real = uoe.dispatch

    def spy(*a, **kw):
        seen["call"] = (a, kw)
        return real(*a, **kw)
    uoe.dispatch = spy
    try:
        mlp(x)
    finally:
        uoe.dispatch = real
    return seen["call"]


def shared_piece(mlp, cfg, x2):
    """A function computing the always-on part of layer 0's FFN from its own weights, as the FFN
    does: MoE's shared experts, UoE's virtual shared expert beyond its scoring (a_i * x W_p^i then
    W_o: the routing activations a_i come in as an input); None when there is none."""
    if cfg.ffn == "moe" and cfg.n_shared:
        return lambda: uoe.swiglu(x2, mlp.shared_gate, mlp.shared_up, mlp.shared_down)
    if cfg.ffn == "uoe" and cfg.vse:
        E, R, C = cfg.n_expert, cfg.n_routing, cfg.n_embd
        with torch.no_grad():
            a = torch.nn.functional.silu(x2 @ mlp.routing_neurons(mlp.w_gate))
        a = a.requires_grad_()
        return lambda: (a * (x2 @ mlp.routing_neurons(mlp.w_up))) @ mlp.w_down[:, :R, :].reshape(E * R, C)
    return None


def ffn_pieces(run, args, reps):
    """Eager fwd+bwd times of layer 0's FFN and of its parts: the expert path (uoe.dispatch with
    the FFN's own routing), the always-on part (MoE's shared experts or UoE's VSE, see
    shared_piece; all of a dense FFN), scoring and the rest (router / C_i / routing neurons,
    top-k, gates, aux loss: FFN minus the other two), and a dense SwiGLU with the FLOPs of the
    expert path. Returns medians in ms, each part's share of the FFN's time and of its FLOPs."""
    cfg, dev = run.config, args.device
    mlp = run.model.transformer.h[0].mlp
    B, T, C = args.batch_size, cfg.block_size, cfg.n_embd
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(B, T, C, generator=gen)).to(dev).requires_grad_()
    x2 = x.detach().reshape(-1, C).requires_grad_()
    ctx = autocast(args)
    pieces = {"ffn": lambda: ctx_backward(ctx, lambda: mlp(x))}
    if cfg.ffn != "dense":
        with ctx:
            a, kw = capture_dispatch(mlp, x)
        a = [t.detach().requires_grad_(t.is_floating_point()) if torch.is_tensor(t) else t for t in a]
        kw = {k: t.detach().requires_grad_(t.is_floating_point()) if torch.is_tensor(t) else t for k, t in kw.items()}
        width = max(1, round(uoe.ffn_breakdown(cfg)["experts"] / (3 * C)))   # same FLOPs as the expert path
        w = [(torch.randn(C, width, generator=gen) * 0.02).to(dev).requires_grad_(),
             (torch.randn(C, width, generator=gen) * 0.02).to(dev).requires_grad_(),
             (torch.randn(width, C, generator=gen) * 0.02).to(dev).requires_grad_()]
        pieces["experts"] = lambda: ctx_backward(ctx, lambda: uoe.dispatch(*a, **kw))
        pieces["dense_equiv"] = lambda: ctx_backward(ctx, lambda: uoe.swiglu(x2, *w))
        shared = shared_piece(mlp, cfg, x2)
        if shared is not None:
            pieces["shared"] = lambda: ctx_backward(ctx, shared)
    for f in pieces.values():            # warm-up
        f()
    times = {k: [] for k in pieces}
    for _ in range(reps):
        for k, f in pieces.items():
            times[k].append(time_call(f, dev))
    mlp.zero_grad(set_to_none=True)
    out = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}
    fl = flops_breakdown(cfg)
    ffn_flops = fl["ffn_scoring"] + fl["ffn_shared"] + fl["ffn_experts"]
    if cfg.ffn == "dense":
        out.update(shared_ms=out["ffn_ms"], experts_ms=0.0, scoring_ms=0.0)
    else:
        out.setdefault("shared_ms", 0.0)
        out["scoring_ms"] = out["ffn_ms"] - out["experts_ms"] - out["shared_ms"]
        out["experts_vs_dense"] = out["experts_ms"] / out["dense_equiv_ms"]
    for part in ("scoring", "shared", "experts"):
        out[f"{part}_share"] = out[f"{part}_ms"] / out["ffn_ms"]
        out[f"{part}_flop_share"] = fl[f"ffn_{part}"] / ffn_flops
    return out


def ctx_backward(ctx, f):
    with ctx:
        y = f()
    y.float().square().mean().backward()     # any scalar: backward through everything


def memory_in_subprocess(config, args):
    """Peak RSS (MB) of a fresh process doing two eager training steps, minus its RSS after import."""
    spec = dict(config=asdict(config), batch_size=args.batch_size, threads=torch.get_num_threads(), seed=args.seed)
    try:
        r = subprocess.run([sys.executable, str(REPO / "bench.py"), "_memory", json.dumps(spec)],
                           capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        print(f"warning: memory probe timed out for {config.ffn}", file=sys.stderr)
        return None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"warning: memory probe failed for {config.ffn}: {last}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_delta_mb"]


def memory_probe(spec):
    """The `_memory` child of memory_in_subprocess: prints one JSON line. A micro model trains
    first, so that torch's one-time allocations (~90 MB: autograd, thread pools, BLAS buffers)
    are not counted; then (Linux) the RSS high-water mark is reset and the real model trains."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    cfg = GPTConfig(**spec["config"])
    micro = GPTConfig(ffn=cfg.ffn, vocab_size=cfg.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8,
                      n_expert=cfg.n_expert, top_k=cfg.top_k, expert_hidden=max(16, 2 * cfg.n_expert))
    model = GPT(micro)
    train_step(model, make_optimizer(model), torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long),
               nullcontext())
    del model
    base = rss_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")          # VmHWM := VmRSS
    except OSError:
        base = rss_mb("VmHWM")                                  # no reset: can under-report
    model = GPT(cfg)
    opt = make_optimizer(model)
    x = torch.randint(0, cfg.vocab_size, (spec["batch_size"], cfg.block_size))
    for _ in range(2):
        train_step(model, opt, x, x, nullcontext())
    print(json.dumps({"peak_rss_delta_mb": rss_mb("VmHWM") - base, "peak_rss_mb": rss_mb("VmHWM")}))


def rss_mb(field):
    """Current (VmRSS) or peak (VmHWM) resident memory of this process in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024                 # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux; best effort


def cuda_peak_memory_mb(run, x, y, args):
    """Peak bytes of one step as if the model were alone: step peak over what was allocated
    before it, plus the model's own persistent state (weights and AdamW moments)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run.step(x, y, args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before + state_bytes(run.model, run.opt)) / 2 ** 20


def speed_groups(runs_spec, device):
    """The models timed together: on CPU all of them, interleaved (a burst of load from another
    job then hits every variant alike); on CUDA one variant's models at a time, freed before the
    next (all eight GPT-2-small-sized models with AdamW state would need ~25 GiB at once)."""
    if device != "cuda":
        return [runs_spec]
    return [[rs for rs in runs_spec if rs[0] == v] for v in dict.fromkeys(rs[0] for rs in runs_spec)]


def bench_speed(args):
    setup_torch(args)
    base = base_config(args)
    configs = matched_configs(base, args.variants, "flops", args.multiple_of)
    modes = ["eager", "compile"] if args.compile == "both" else [args.compile]
    dev, tokens = args.device, args.batch_size * base.block_size
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randint(0, base.vocab_size, (args.batch_size, base.block_size), generator=gen).to(dev)
    y = torch.randint(0, base.vocab_size, (args.batch_size, base.block_size), generator=gen).to(dev)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else cpu_name()
    mm_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    paths = {v: uoe.resolve_expert_path(c, dev, mm_dtype) if hasattr(uoe, "resolve_expert_path") else "loop"
             for v, c in configs.items()}
    print(f"# bench.py speed on {device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{dev} {args.dtype}, batch {args.batch_size} x {base.block_size} tokens; expert path: "
          + ", ".join(f"{v} {p}" for v, p in paths.items() if v != "dense"), flush=True)
    # MFU against train.py's one table of GPU peaks (bf16 runs only, or --peak_tflops)
    peak, peak_label = mfu_peak(device_name, args.dtype, args.peak_tflops) if dev == "cuda" else (None, "")

    n = 1024 if dev == "cpu" else 8192
    a_mm = torch.randn(n, n, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    b_mm = torch.randn_like(a_mm)
    a_mm @ b_mm
    matmul_times, pieces, memory, timed = [], {}, {}, []
    for group in speed_groups([(v, m) for m in modes for v in args.variants], dev):
        runs = [Run(v, m, configs[v], args) for v, m in group]
        for r in runs:                                     # warm-up (and compilation), one model at a time
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                g0, b0 = dynamo_counts()
                r.step(x, y, args)
                g1, b1 = dynamo_counts()
                r.graphs_per_warmup_step.append(g1 - g0)
                r.graph_breaks += b1 - b0
            sync(dev)
            print(f"  warm-up {r.variant:5s} {r.mode:7s} {time.perf_counter() - t0:6.1f} s", flush=True)
        for _ in range(args.reps):                         # interleaved timing
            for r in runs:
                g0, _ = dynamo_counts()
                r.times.append(time_call(lambda: r.step(x, y, args), dev))
                r.recompiles_timed += dynamo_counts()[0] - g0
            matmul_times.append(time_call(lambda: a_mm @ b_mm, dev))
        eager = [r for r in runs if r.mode == "eager"] or runs   # compile only: the compiled runs' eager modules
        for r in eager:
            if r.variant not in pieces:
                print(f"  FFN pieces (eager) {r.variant} ...", flush=True)
                pieces[r.variant] = ffn_pieces(r, args, args.reps)
        if args.memory == "on":
            for r in runs:
                if dev == "cuda":
                    memory[(r.variant, r.mode)] = cuda_peak_memory_mb(r, x, y, args)
                elif r.mode == "eager":     # a compiled probe would compile again: eager only on CPU
                    print(f"  peak memory {r.variant} ...", flush=True)
                    memory[(r.variant, r.mode)] = memory_in_subprocess(r.config, args)
        for r in runs:                      # keep the timings, free the model and its optimizer state
            timed.append(dict(variant=r.variant, mode=r.mode, config=r.config, times=r.times,
                              graphs_per_warmup_step=r.graphs_per_warmup_step, graph_breaks=r.graph_breaks,
                              recompiles_timed=r.recompiles_timed))
        del runs, eager, r
        if dev == "cuda":
            torch.cuda.empty_cache()
    mm_rate = matmul_rate(n, statistics.median(matmul_times))

    rows = []
    order = {(v, m): i for i, (m, v) in enumerate((m, v) for m in modes for v in args.variants)}
    for r in sorted(timed, key=lambda r: order[(r["variant"], r["mode"])]):
        t = statistics.median(r["times"])
        total, active = param_counts(r["config"])
        achieved = flop_rate(r["config"], tokens, t)
        compiled = r["mode"] == "compile"
        rows.append(dict(
            variant=r["variant"], mode=r["mode"], expert_hidden=r["config"].expert_hidden,
            expert_path=paths[r["variant"]] if r["variant"] != "dense" else None,
            params_total=total, params_active=active, fwd_flops_per_token=flops_per_token(r["config"]),
            flop_mismatch=flops_per_token(r["config"]) / flops_per_token(base) - 1,
            step_ms=t * 1e3, step_ms_all=[s * 1e3 for s in r["times"]], tokens_per_s=tokens / t,
            peak_mem_mb=memory.get((r["variant"], r["mode"])), achieved_flops=achieved,
            mfu=utilization(achieved, peak) if dev == "cuda" else None,
            matmul_fraction=utilization(achieved, mm_rate) if dev == "cpu" else None,
            graphs_per_warmup_step=r["graphs_per_warmup_step"] if compiled else None,
            graph_breaks=r["graph_breaks"] if compiled else None,
            recompiles_during_timing=r["recompiles_timed"] if compiled else None,
            ffn=pieces.get(r["variant"]) if r["mode"] == modes[0] else None))
    result = dict(
        command="speed", device=dev, device_name=device_name, torch=torch.__version__,
        threads=torch.get_num_threads(), dtype=args.dtype, batch_size=args.batch_size,
        tokens_per_step=tokens, reps=args.reps, warmup=args.warmup, base_config=asdict(base),
        configs={v: asdict(c) for v, c in configs.items()}, expert_paths=paths, multiple_of=args.multiple_of,
        matmul={"n": n, "flops_per_s": mm_rate, "dtype": str(a_mm.dtype)}, gpu_peak_flops=peak, gpu_peak=peak_label,
        memory_method=("cuda max_memory_allocated (one step, model alone)" if dev == "cuda" else
                       "peak RSS of a fresh process (2 eager steps) minus RSS after import; eager only"),
        timing=("one variant's models at a time (CUDA: freed before the next)" if dev == "cuda" else
                "all models interleaved in every repetition"),
        graph_break_reasons=graph_break_reasons() if "compile" in modes else [],
        ratios=speed_ratios(rows), rows=rows)
    print()
    print(speed_table(result))
    write_json(args.json, result)
    return result


def speed_ratios(rows):
    """Step-time ratios the targets are stated in, per mode, from the medians of one run."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        t = {r["variant"]: r["step_ms"] for r in rows if r["mode"] == mode}
        f = {r["variant"]: r["ffn"] for r in rows if r["mode"] == mode and r["ffn"]}
        m = {}
        if "uoe" in t and "moe" in t:
            m["uoe_over_moe"] = t["uoe"] / t["moe"]
        if "uoe" in t and "aoe" in t:
            m["aoe_over_uoe"] = t["aoe"] / t["uoe"]
        for v in t:
            if "dense" in t and v != "dense":
                m[f"{v}_over_dense"] = t[v] / t["dense"]
            if v in f and "experts_vs_dense" in f[v]:
                m[f"{v}_experts_over_dense_equiv"] = f[v]["experts_vs_dense"]
        out[mode] = m
    return out


def fmt(v, spec, none="–"):
    return none if v is None else format(v, spec)


def speed_table(res):
    cpu = res["device"] == "cpu"
    util = "of matmul" if cpu else "MFU"
    b = res["base_config"]
    ref = (f"1024^2 fp32 matmul {res['matmul']['flops_per_s'] / 1e9:.0f} GFLOP/s" if cpu else
           f"MFU against {res['gpu_peak']}" if res["gpu_peak_flops"] else res.get("gpu_peak") or "no MFU")
    paths = ", ".join(f"{v} {p}" for v, p in res.get("expert_paths", {}).items() if v != "dense")
    aligned = f" (multiples of {res['multiple_of']})" if res.get("multiple_of", 1) > 1 else ""
    lines = [f"Speed: {res['device_name']}, torch {res['torch']}, {res['threads']} threads, {res['dtype']}; "
             f"UoE {b['n_layer']}x{b['n_embd']}, E={b['n_expert']}, K={b['top_k']}, D={b['expert_hidden']}, "
             f"others' D matched on active FLOPs{aligned}; "
             f"{res['tokens_per_step']} tokens/step; median of {res['reps']} steps, "
             f"{res.get('timing', 'all models interleaved in every repetition')}; {ref}; "
             f"expert path: {paths or '–'}.",
             "",
             f"| variant | mode | D | params (total / active) | fwd MFLOP/tok | FLOPs vs UoE | step ms | tokens/s | "
             f"peak mem MB | GFLOP/s | {util} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        u = r["matmul_fraction" if cpu else "mfu"]
        lines.append(f"| {r['variant']} | {r['mode']} | {r['expert_hidden']} | "
                     f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M | "
                     f"{r['fwd_flops_per_token'] / 1e6:.2f} | {fmt(r.get('flop_mismatch'), '+.2%')} | "
                     f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{fmt(r['peak_mem_mb'], '.0f')} | {r['achieved_flops'] / 1e9:.2f} | {fmt(u, '.1%')} |")
    ffn_rows = [r for r in res["rows"] if r["ffn"]]
    if ffn_rows:
        lines += ["", "FFN of layer 0 (eager, fwd+bwd, median ms; share of the FFN's time, and of its FLOPs): "
                  "experts = uoe.dispatch; VSE/shared = UoE's virtual shared expert beyond scoring, MoE's shared "
                  "experts, all of a dense FFN; scoring = router / C_i / routing neurons, top-k, gates, aux loss "
                  "(FFN minus the other two); dense equiv = a dense SwiGLU with the expert path's FLOPs.", "",
                  "| variant | FFN ms | scoring ms (time, FLOPs) | VSE/shared ms (time, FLOPs) | "
                  "experts ms (time, FLOPs) | dense equiv ms | experts / dense equiv |",
                  "|---|---:|---:|---:|---:|---:|---:|"]

        def part(f, name):
            if f"{name}_share" not in f:
                return "–"
            return f"{f[name + '_ms']:.2f} ({f[name + '_share']:.0%}, {f[name + '_flop_share']:.0%})"
        for r in ffn_rows:
            f = r["ffn"]
            lines.append(f"| {r['variant']} | {f['ffn_ms']:.2f} | {part(f, 'scoring')} | {part(f, 'shared')} | "
                         f"{part(f, 'experts')} | {fmt(f.get('dense_equiv_ms'), '.2f')} | "
                         f"{fmt(f.get('experts_vs_dense'), '.2f')} |")
    lines += ["", "Ratios of median step times (targets: uoe/moe <= 1.05, aoe/uoe >= 1.2, "
              "experts/dense equiv <= 1.3):", ""]
    for mode, m in res["ratios"].items():
        lines.append(f"- {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
    comp = [r for r in res["rows"] if r["mode"] == "compile"]
    if comp:
        lines += ["", "torch.compile: graphs compiled per warm-up step / graph breaks / recompiles while timed:", ""]
        lines += [f"- {r['variant']}: {r['graphs_per_warmup_step']} / {r['graph_breaks']} / "
                  f"{r['recompiles_during_timing']}" for r in comp]
        lines += [f"- graph break: {g}" for g in res["graph_break_reasons"]]
    return "\n".join(lines)


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "CPU"


def write_json(path, obj, quiet=False):
    """Write obj as JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    if not quiet:
        print(f"\nwrote {path}")


# -----------------------------------------------------------------------------
# the study: quality, ablate, balance. Every run is `python train.py --key=value ...` in a
# subprocess, into its own folder OUT_DIR/runs/<label>-lr<lr>-s<seed>-<hash of its options>/,
# whose result.json (written atomically when the run has finished) makes a rerun skip it.

# the variants of `quality`: name -> GPTConfig fields (expert_hidden is then matched on FLOPs)
STUDY_VARIANTS = {"dense": dict(ffn="dense"), "moe": dict(ffn="moe"), "moe+shared": dict(ffn="moe", n_shared=1),
                  "aoe": dict(ffn="aoe"), "uoe": dict(ffn="uoe")}
# the paired differences reported, first minus second, where both variants ran
COMPARISONS = (("uoe", "moe"), ("moe", "dense"), ("uoe", "moe+shared"), ("uoe", "dense"), ("uoe", "aoe"),
               ("moe+shared", "moe"))
# the paper's ablations of UoE (Table 4), as GPTConfig changes of the full UoE; n_routing is scaled
ABLATIONS = {"uoe": {}, "no_vse": dict(vse=False), "output_twice": dict(uoe_output="twice"),
             "score_pre": dict(route_score="pre"), "score_swiglu": dict(route_score="swiglu"),
             "norm_1": dict(route_norm=1), "norm_inf": dict(route_norm="inf"),
             "n_routing_half": dict(n_routing=0.5), "n_routing_double": dict(n_routing=2.0)}

# CPU: sized so that each command's defaults finish in about 30 minutes on 2 cores, two runs at a
# time on one thread each (see README "Does UoE beat MoE here?"). GPU: one run at a time.
STUDY_PRESETS = {
    "cpu": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, batch_size=16, n_expert=8, top_k=2,
                expert_hidden=128, steps=500, warmup_steps=100, eval_interval=100, eval_iters=8, log_interval=20,
                seeds=3, lrs=[1e-3, 2e-3, 4e-3, 8e-3], default_lr=4e-3, dataset="pystdlib_char", dtype="float32",
                compile="eager", jobs=2, threads=1, multiple_of=1),
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, batch_size=16, n_expert=8, top_k=2,
                expert_hidden=1024, steps=1500, warmup_steps=150, eval_interval=150, eval_iters=20, log_interval=50,
                seeds=3, lrs=[5e-4, 1e-3, 2e-3], default_lr=1e-3, dataset="pystdlib", dtype="bfloat16",
                compile="compile", jobs=1, threads=None, multiple_of=64),
}
STUDY_COMMANDS = ("quality", "ablate", "balance")


# ---- statistics (pure; tested on known numbers) -------------------------------------------------

def paired_difference(a, b):
    """Mean, sample std and standard error of the per-seed differences a[s] - b[s] over the seeds
    both have (dicts seed -> value; None = a diverged run, skipped). n = number of pairs."""
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys()) if a[s] is not None and b[s] is not None]
    if not d:
        return dict(mean=None, std=None, se=None, n=0)
    m, s = mean_std(d)
    return dict(mean=m, std=s, se=s / math.sqrt(len(d)) if len(d) > 1 else None, n=len(d))


def best_lr(vals):
    """The learning rate with the lowest final val loss ({lr: loss or None if it diverged});
    ties go to the smaller rate. None if every rate diverged."""
    ok = [(v, lr) for lr, v in vals.items() if v is not None and math.isfinite(v)]
    return min(ok)[1] if ok else None


def verdict(diff, se, a="UoE", b="MoE"):
    """Plain words for a paired difference of losses a - b (lower is better)."""
    if diff is None:
        return "no pairs"
    if se is None or se == 0:
        return f"{a} {'lower' if diff < 0 else 'higher'} by {abs(diff):.4f} (one pair: no SE)"
    t = abs(diff) / se
    who = a if diff < 0 else b
    if t > 2:
        return f"{who} leads by {abs(diff):.4f} = {t:.1f} SE (> 2 SE)"
    return f"not decisive: {who} ahead by {abs(diff):.4f} = {t:.1f} SE (< 2 SE)"


def ent_load_summary(routing, steps, tail=0.1):
    """Per layer: mean Ent_load, max and min load over the train records of the last `tail` of
    training. routing: [[step, [ent per layer], [max per layer], [min per layer]], ...]."""
    last = [r for r in routing if r[0] > steps * (1 - tail)] or routing[-1:]
    n_layer = len(last[0][1])
    return [dict(ent_load=statistics.fmean(r[1][i] for r in last), max_load=statistics.fmean(r[2][i] for r in last),
                 min_load=statistics.fmean(r[3][i] for r in last)) for i in range(n_layer)]


def fmt_pm(m, s, digits=4):
    return "–" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def fmt_duration(seconds):
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ---- configs and runs ---------------------------------------------------------------------------

def match(config, base, multiple_of=1):
    """config with D matched on active FLOPs to base (rounded to a multiple of `multiple_of` when
    uoe.match_config can)."""
    if multiple_of > 1 and "multiple_of" in inspect.signature(match_config).parameters:
        return match_config(config, base, "flops", multiple_of=multiple_of)
    return match_config(config, base, "flops")


def variant_configs(base, variants, multiple_of=1):
    """{name: GPTConfig} of the quality variants, each one's D matched to the UoE base on FLOPs."""
    out = {}
    for v in variants:
        c = replace(base, **STUDY_VARIANTS[v])
        out[v] = c if v == "uoe" and multiple_of == 1 else match(c, base, multiple_of)
    return out


def ablation_config(base, name):
    changes = dict(ABLATIONS[name])
    if "n_routing" in changes:
        changes["n_routing"] = min(base.expert_hidden - 1, max(1, round(base.n_routing * changes["n_routing"])))
    return replace(base, **changes)


def recipe(args):
    """The training options every run of a study shares (the learning rate and seed vary)."""
    return dict(dataset=args.dataset, data_dir=str(Path(args.data_dir).resolve()), max_iters=args.steps,
                warmup_iters=args.warmup_steps, batch_size=args.batch_size, eval_interval=args.eval_interval,
                eval_iters=args.eval_iters, log_interval=args.log_interval, ckpt_interval=args.steps,
                device=args.device, dtype=args.dtype, compile=args.compile == "compile", plot=False)


def run_spec(label, config, lr, seed, args):
    """One train.py run: its label, lr, seed, the full option dict and its folder."""
    options = {**{k: v for k, v in asdict(config).items()}, **recipe(args),
               "learning_rate": lr, "min_lr": lr / 10, "seed": seed}
    key = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    # the folder depends on the options only: the same run asked for by two commands is run once
    name = f"{config.ffn}-D{config.expert_hidden}-lr{lr:g}-s{seed}-{key}"
    return dict(label=label, lr=lr, seed=seed, options=options, dir=str(Path(args.out_dir).resolve() / "runs" / name))


def train_command(spec):
    opts = {**spec["options"], "out_dir": str(Path(spec["dir"]) / "train"), "overwrite": True}
    return [sys.executable, str(REPO / "train.py")] + [f"--{k}={v!r}" for k, v in opts.items()]


def read_metrics(path):
    """(eval records, train records) of a train.py metrics.jsonl."""
    evals, trains = [], []
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        (evals if r.get("kind") == "eval" else trains).append(r)
    return evals, trains


def run_result(spec, seconds):
    """The compact result of a finished run, from its metrics.jsonl."""
    evals, trains = read_metrics(Path(spec["dir"]) / "train" / "metrics.jsonl")
    routing = [[t["step"], [l["ent_load"] for l in t["routing"]], [l["max_load"] for l in t["routing"]],
                [l["min_load"] for l in t["routing"]]]
               for t in trains if t.get("routing") and all(l is not None for l in t["routing"])]
    return dict(label=spec["label"], lr=spec["lr"], seed=spec["seed"], options=spec["options"], seconds=seconds,
                diverged=False, final_val=evals[-1]["val_loss"], final_train=evals[-1]["train_loss"],
                evals=[[e["step"], e["tokens"], e["train_loss"], e["val_loss"]] for e in evals], routing=routing)


def read_result(spec):
    path = Path(spec["dir"]) / "result.json"
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return r if r.get("options") == spec["options"] else None


class Progress:
    """Counts finished runs of a command and prints each with the elapsed time and an ETA."""

    def __init__(self, total, jobs):
        self.total, self.jobs, self.done, self.ran, self.t0 = total, jobs, 0, [], time.time()

    def skip(self, n):
        self.done += n

    def finished(self, spec, result):
        self.done += 1
        self.ran.append(result["seconds"])
        left = self.total - self.done
        eta = statistics.fmean(self.ran) * left / self.jobs
        val = "diverged" if result["diverged"] else f"val {result['final_val']:.4f}"
        print(f"  [{self.done}/{self.total}] {spec['label']:16s} lr {spec['lr']:<8g} seed {spec['seed']}: {val} "
              f"({result['seconds']:.0f} s) | elapsed {fmt_duration(time.time() - self.t0)}, ETA {fmt_duration(eta)}",
              flush=True)


def launch(spec, env, log):
    """Start one train.py run (a Popen); the tests replace this with an in-process stand-in."""
    return subprocess.Popen(train_command(spec), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def run_all(specs, args, progress):
    """Run every spec that has no result yet, args.jobs at a time; return [result per spec].
    A run that ends in a non-finite loss is a result (diverged); any other failure stops all."""
    results, todo = {}, []
    for s in specs:
        r = read_result(s)
        if r is not None:
            results[s["dir"]] = r
        elif s["dir"] not in (t["dir"] for t in todo):
            todo.append(s)
    progress.skip(len(specs) - len(todo))
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    running = []                                    # (spec, Popen, log file, start time)
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                s = todo.pop(0)
                r = read_result(s)          # finished meanwhile by another command sharing OUT_DIR
                if r is not None:
                    results[s["dir"]] = r
                    progress.skip(1)
                    continue
                Path(s["dir"]).mkdir(parents=True, exist_ok=True)
                log = open(Path(s["dir"]) / "train.log", "w")
                p = launch(s, env, log)
                running.append((s, p, log, time.time()))
            time.sleep(0.2)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                s, p, log, t0 = item
                log.close()
                text = (Path(s["dir"]) / "train.log").read_text(errors="replace")
                if p.returncode == 0:
                    r = run_result(s, time.time() - t0)
                    (Path(s["dir"]) / "train" / "ckpt.pt").unlink(missing_ok=True)   # keep the disk small
                elif p.returncode == 2 and "non-finite loss" in text:
                    r = dict(label=s["label"], lr=s["lr"], seed=s["seed"], options=s["options"],
                             seconds=time.time() - t0, diverged=True, final_val=None, final_train=None,
                             evals=[], routing=[])
                else:
                    last = ([l for l in text.splitlines() if l.strip()] or ["(no output)"])[-1]
                    raise UserError(f"train.py failed for {s['label']} lr {s['lr']:g} seed {s['seed']} "
                                    f"(exit {p.returncode}): {last.removeprefix('error: ')} "
                                    f"[log: {Path(s['dir']) / 'train.log'}]")
                write_json(Path(s["dir"]) / "result.json", r, quiet=True)
                results[s["dir"]] = r
                progress.finished(s, r)
    finally:
        for s, p, log, _ in running:                # interrupted or failed: stop our own runs
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            log.close()
    return [results[s["dir"]] for s in specs]


def study_data(args):
    """Prepare the dataset once, before parallel runs could race to do it; return its meta."""
    from data.prepare import DataError, ensure_dataset, read_meta
    try:
        return read_meta(ensure_dataset(args.dataset, Path(args.data_dir)))
    except DataError as e:
        raise UserError(str(e)) from None


def study_base(args, meta):
    vocab = meta["vocab_size"]
    if args.preset == "gpu":
        vocab = -(-vocab // 64) * 64                 # GPT-2's 50257 -> 50304: aligned GEMMs
    return GPTConfig(ffn="uoe", vocab_size=vocab, **{k: getattr(args, k) for k in MODEL_KEYS if k != "vocab_size"})


def describe(config, base):
    total, active = param_counts(config)
    return dict(config=asdict(config), expert_hidden=config.expert_hidden, n_routing=config.n_routing,
                params_total=total, params_active=active, fwd_flops_per_token=flops_per_token(config),
                flop_mismatch=flops_per_token(config) / flops_per_token(base) - 1)


def seed_summary(results):
    """Per-seed finals {seed: val or None}, mean ± std over the seeds that did not diverge, curves."""
    finals = {r["seed"]: r["final_val"] for r in results}
    ok = [v for v in finals.values() if v is not None]
    m, s = mean_std(ok) if ok else (None, None)
    return dict(val_per_seed=finals, val_mean=m, val_std=s, n_seeds=len(ok),
                curves={r["seed"]: r["evals"] for r in results})


def study_header(args, base, what):
    return (f"# bench.py {what}: {args.dataset}, {args.steps} steps x {args.batch_size} x {base.block_size} tokens "
            f"({args.steps * args.batch_size * base.block_size / 1e6:.2f}M), warmup {args.warmup_steps}, "
            f"cosine to lr/10, seeds 0..{args.seeds - 1}; UoE {base.n_layer}x{base.n_embd}, E={base.n_expert}, "
            f"K={base.top_k}, D={base.expert_hidden}; {args.device} {args.dtype} {args.compile}; "
            f"{args.jobs} run(s) at a time{f', {args.threads} thread(s) each' if args.threads else ''}")


def settings(args, base):
    return dict(dataset=args.dataset, steps=args.steps, batch_size=args.batch_size, block_size=base.block_size,
                tokens=args.steps * args.batch_size * base.block_size, seeds=args.seeds, recipe=recipe(args),
                device=args.device, dtype=args.dtype, compile=args.compile, torch=torch.__version__,
                machine=cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(),
                threads=args.threads, jobs=args.jobs, base_config=asdict(base), multiple_of=args.multiple_of)


def paired_table(comparisons, title="paired difference of final val loss (first − second)"):
    lines = [f"| comparison | {title} ± SE | seeds | verdict |", "|---|---:|---:|---|"]
    for name, d in comparisons.items():
        a, b = name.split(" − ")
        lines.append(f"| {name} | {fmt_pm(d['mean'], d['se'])} | {d['n']} | {verdict(d['mean'], d['se'], a, b)} |")
    return lines


def bench_quality(args):
    meta = study_data(args)
    base = study_base(args, meta)
    configs = variant_configs(base, args.variants, args.multiple_of)
    print(study_header(args, base, "quality"), flush=True)
    sweep = {v: [run_spec(v, configs[v], lr, 0, args) for lr in args.lrs] for v in args.variants}
    progress = Progress(len(args.variants) * (len(args.lrs) + args.seeds - 1), args.jobs)
    t0 = time.time()
    order = [sweep[v][i] for i in range(len(args.lrs)) for v in args.variants]   # interleaved
    done = {s["dir"]: r for s, r in zip(order, run_all(order, args, progress))}
    rows, best = {}, {}
    for v in args.variants:
        vals = {s["lr"]: done[s["dir"]]["final_val"] for s in sweep[v]}
        best[v] = best_lr(vals)
        if best[v] is None:
            raise UserError(f"{v} diverged at every learning rate of the sweep; give lower --lrs")
        rows[v] = dict(describe(configs[v], base), sweep={str(lr): val for lr, val in vals.items()}, best_lr=best[v],
                       best_at_edge=len(args.lrs) > 1 and best[v] in (min(args.lrs), max(args.lrs)))
    specs = {v: [run_spec(v, configs[v], best[v], s, args) for s in range(args.seeds)] for v in args.variants}
    flat = [specs[v][s] for s in range(1, args.seeds) for v in args.variants]
    run_all(flat, args, progress)
    for v in args.variants:
        rows[v].update(seed_summary(run_all(specs[v], args, Progress(0, 1))))
    comparisons = {f"{a} − {b}": paired_difference(rows[a]["val_per_seed"], rows[b]["val_per_seed"])
                   for a, b in COMPARISONS if a in rows and b in rows}
    result = dict(command="quality", **settings(args, base), lrs=args.lrs, best_lr=best, variants=rows,
                  comparisons=comparisons, seconds=time.time() - t0)
    return report(result, quality_table, args, plot_quality, "quality_curves.png")


def report(result, table, args, plot=None, figure=None):
    """A study command's end: print its table, draw its figure (unless --plot off), write its JSON."""
    print()
    print(table(result))
    if plot is not None and args.plot == "on":
        result["figure"] = plot(result, Path(args.out_dir) / figure)
    write_json(args.json, result)
    return result


def quality_table(res):
    lrs = res["lrs"]
    lines = [f"Quality at matched active FLOPs per token: {res['dataset']}, {res['steps']} steps, "
             f"{res['tokens'] / 1e6:.2f}M tokens; val loss of seed 0 at each lr of the sweep, then mean ± std "
             f"over {res['seeds']} seeds at the variant's best lr", "",
             "| variant | D | total params | active params | fwd MFLOP/tok | FLOPs vs UoE | "
             + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | val loss |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(lrs) + "---:|---:|"]
    for v, r in res["variants"].items():
        sweep = " | ".join("diverged" if r["sweep"][str(lr)] is None else f"{r['sweep'][str(lr)]:.4f}" for lr in lrs)
        lines.append(f"| {v} | {r['expert_hidden']} | {r['params_total'] / 1e6:.3f}M | "
                     f"{r['params_active'] / 1e6:.3f}M | "
                     f"{r['fwd_flops_per_token'] / 1e6:.3f} | {r['flop_mismatch']:+.2%} | {sweep} | "
                     f"{r['best_lr']:g}{' (edge)' if r['best_at_edge'] else ''} | "
                     f"{fmt_pm(r['val_mean'], r['val_std'])} |")
    lines += ["", *paired_table(res["comparisons"])]
    if any(r["best_at_edge"] for r in res["variants"].values()):
        lines += ["", "(edge): the best lr is at the edge of the sweep; a wider --lrs may find a better one"]
    return "\n".join(lines)


def gap_curve(a, b):
    """Per eval step: (tokens, mean and SE of the paired val-loss difference a - b over seeds)."""
    seeds = sorted(set(a) & set(b))
    seeds = [s for s in seeds if a[s] and b[s]]
    if not seeds:
        return []
    out = []
    for i in range(min(min(len(a[s]), len(b[s])) for s in seeds)):
        d = [a[s][i][3] - b[s][i][3] for s in seeds]
        m, sd = mean_std(d)
        out.append((a[seeds[0]][i][1], m, sd / math.sqrt(len(d)) if len(d) > 1 else 0.0))
    return out


def plot_quality(res, path):
    """Left: val loss against tokens (mean over seeds) per variant; right: the paired gaps ± SE."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, (v, r) in enumerate(res["variants"].items()):
        curves = [c for c in r["curves"].values() if c]
        n = min(len(c) for c in curves)
        tok = [curves[0][j][1] / 1e6 for j in range(n)]
        val = [statistics.fmean(c[j][3] for c in curves) for j in range(n)]
        ax.plot(tok[1:], val[1:], marker="o", ms=3, color=f"C{i}",
                label=f"{v} (D={r['expert_hidden']}, lr {r['best_lr']:g}) {fmt_pm(r['val_mean'], r['val_std'], 3)}")
    ax.set(xlabel="tokens seen (M)", ylabel="val loss (mean over seeds)",
           title=f"{res['dataset']}: matched active FLOPs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for i, (a, b) in enumerate(COMPARISONS[:3]):
        if a not in res["variants"] or b not in res["variants"]:
            continue
        g = gap_curve(res["variants"][a]["curves"], res["variants"][b]["curves"])[1:]
        if not g:
            continue
        x, m, se = zip(*g)
        x = [t / 1e6 for t in x]
        ax2.plot(x, m, marker="o", ms=3, color=f"C{i}", label=f"{a} − {b}")
        ax2.fill_between(x, [p - 2 * q for p, q in zip(m, se)], [p + 2 * q for p, q in zip(m, se)],
                         color=f"C{i}", alpha=0.15)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set(xlabel="tokens seen (M)", ylabel="val loss difference (band: ± 2 SE)",
            title="paired gaps (below 0: first is better)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return save_figure(fig, path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return str(path)


def quality_lr(args, variant):
    """The variant's best lr from OUT_DIR/bench_quality.json when that study used this recipe and
    model, else None."""
    try:
        q = json.loads((Path(args.out_dir) / "bench_quality.json").read_text())
    except (OSError, ValueError):
        return None
    base = study_base(args, dict(vocab_size=q.get("base_config", {}).get("vocab_size", 0)))
    if q.get("recipe") != recipe(args) or q.get("base_config") != asdict(base):
        return None
    return q.get("best_lr", {}).get(variant)


def pick_lr(args, variant):
    if args.lr is not None:
        return args.lr, "--lr"
    lr = quality_lr(args, variant)
    if lr is not None:
        return lr, "best lr of bench.py quality"
    return (STUDY_PRESETS[args.preset]["default_lr"],
            "preset default (no matching bench_quality.json; run quality first or give --lr)")


def bench_ablate(args):
    meta = study_data(args)
    base = study_base(args, meta)
    base = variant_configs(base, ["uoe"], args.multiple_of)["uoe"]     # the exact UoE of quality
    lr, source = pick_lr(args, "uoe")
    print(study_header(args, base, "ablate") + f"; lr {lr:g} ({source})", flush=True)
    configs = {a: ablation_config(base, a) for a in args.ablations}
    specs = {a: [run_spec("uoe" if a == "uoe" else f"uoe:{a}", c, lr, s, args) for s in range(args.seeds)]
             for a, c in configs.items()}
    t0 = time.time()
    progress = Progress(len(configs) * args.seeds, args.jobs)
    flat = [specs[a][s] for s in range(args.seeds) for a in configs]
    done = {s["dir"]: r for s, r in zip(flat, run_all(flat, args, progress))}
    rows = {a: dict(describe(c, base), changes={k: getattr(c, k) for k in ABLATIONS[a]},
                    **seed_summary([done[s["dir"]] for s in specs[a]])) for a, c in configs.items()}
    if "uoe" in rows:
        for a, r in rows.items():
            r["diff_vs_uoe"] = paired_difference(r["val_per_seed"], rows["uoe"]["val_per_seed"]) if a != "uoe" else None
    result = dict(command="ablate", **settings(args, base), lr=lr, lr_source=source, ablations=rows,
                  seconds=time.time() - t0)
    print()
    print(ablate_table(result))
    write_json(args.json, result)
    return result


def ablate_table(res):
    lines = [f"UoE ablations: {res['dataset']}, {res['steps']} steps, {res['tokens'] / 1e6:.2f}M tokens, "
             f"lr {res['lr']:g}; same D as UoE; val loss mean ± std over {res['seeds']} seeds; difference to "
             "full UoE paired by seed", "",
             "| ablation | change | n_routing | fwd MFLOP/tok | FLOPs vs UoE | total params | val loss | "
             "− UoE ± SE | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for a, r in res["ablations"].items():
        d = r.get("diff_vs_uoe")
        change = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(full UoE)"
        lines.append(f"| {a} | {change} | {r['n_routing']} | {r['fwd_flops_per_token'] / 1e6:.3f} | "
                     f"{r['flop_mismatch']:+.1%} | {r['params_total'] / 1e6:.3f}M | "
                     f"{fmt_pm(r['val_mean'], r['val_std'])} | {fmt_pm(d['mean'], d['se']) if d else '–'} | "
                     f"{verdict(d['mean'], d['se'], a, 'uoe') if d else ''} |")
    return "\n".join(lines)


def bench_balance(args):
    meta = study_data(args)
    base = study_base(args, meta)
    configs = variant_configs(base, args.variants, args.multiple_of)
    lrs = {v: pick_lr(args, v) for v in args.variants}
    print(study_header(args, base, "balance") + "; lr "
          + ", ".join(f"{v} {lr:g} ({src})" for v, (lr, src) in lrs.items()),
          flush=True)
    specs = {(v, coef): [run_spec(f"{v}:aux{coef:g}", replace(configs[v], aux_loss_coef=coef), lrs[v][0], s, args)
                         for s in range(args.seeds)] for coef in args.aux for v in args.variants}
    t0 = time.time()
    progress = Progress(sum(map(len, specs.values())), args.jobs)
    flat = [x[s] for s in range(args.seeds) for x in specs.values()]
    done = {s["dir"]: r for s, r in zip(flat, run_all(flat, args, progress))}
    rows = []
    for (v, coef), ss in specs.items():
        results = [done[s["dir"]] for s in ss if not done[s["dir"]]["diverged"]]
        per_seed = [ent_load_summary(r["routing"], args.steps) for r in results if r["routing"]]
        if not per_seed:
            continue
        for layer in range(len(per_seed[0])):
            ent = [p[layer]["ent_load"] for p in per_seed]
            mx = [p[layer]["max_load"] for p in per_seed]
            mn = [p[layer]["min_load"] for p in per_seed]
            rows.append(dict(variant=v, aux_loss_coef=coef, layer=layer, lr=lrs[v][0], seeds=len(ent),
                             ent_load=mean_std(ent), max_load=mean_std(mx), min_load=mean_std(mn),
                             max_over_min=statistics.fmean(a / b if b > 0 else math.inf for a, b in zip(mx, mn)),
                             val=mean_std([r["final_val"] for r in results])))
    curves = {f"{v}:aux{coef:g}": [done[s["dir"]]["routing"] for s in ss] for (v, coef), ss in specs.items()}
    # paired by seed: Ent_load of each variant minus the first one's (uoe - moe by default), per layer
    ent = {key: {s["seed"]: ent_load_summary(done[s["dir"]]["routing"], args.steps)
                 for s in ss if done[s["dir"]]["routing"]} for key, ss in specs.items()}
    first = args.variants[0]
    ent_diffs = [dict(variant=v, versus=first, aux_loss_coef=coef, layer=layer,
                      **paired_difference({k: e[layer]["ent_load"] for k, e in ent[(v, coef)].items()},
                                          {k: e[layer]["ent_load"] for k, e in ent[(first, coef)].items()}))
                 for coef in args.aux for v in args.variants[1:] for layer in range(base.n_layer)
                 if ent.get((v, coef)) and ent.get((first, coef))]
    result = dict(command="balance", **settings(args, base), aux=args.aux, lr={v: x[0] for v, x in lrs.items()},
                  configs={v: describe(c, base) for v, c in configs.items()}, rows=rows, ent_load_diffs=ent_diffs,
                  curves=curves,
                  ent_load_max=math.log(base.n_expert), seconds=time.time() - t0)
    return report(result, balance_table, args, plot_balance, "balance.png")


def balance_table(res):
    lines = [f"Load balance: {res['dataset']}, {res['steps']} steps; routing of the training batches over the last "
             f"10% of steps, mean ± std over {res['seeds']} seeds; Ent_load is at most "
             f"ln E = {res['ent_load_max']:.3f}, "
             f"a load of 1/E = {1 / res['base_config']['n_expert']:.3f} per expert is perfect balance", "",
             "| variant | aux_loss_coef | layer | Ent_load | max load | min load | max / min | val loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['aux_loss_coef']:g} | {r['layer']} | {fmt_pm(*r['ent_load'], 3)} | "
                     f"{fmt_pm(*r['max_load'], 3)} | {fmt_pm(*r['min_load'], 3)} | {r['max_over_min']:.1f} | "
                     f"{fmt_pm(*r['val'])} |")
    if res.get("ent_load_diffs"):
        lines += ["", "| Ent_load, paired by seed | aux_loss_coef | layer | difference ± SE | seeds |",
                  "|---|---:|---:|---:|---:|"]
        for d in res["ent_load_diffs"]:
            lines.append(f"| {d['variant']} − {d['versus']} | {d['aux_loss_coef']:g} | {d['layer']} | "
                         f"{fmt_pm(d['mean'], d['se'], 3)} | {d['n']} |")
    return "\n".join(lines)


def plot_balance(res, path):
    """Ent_load against step, per layer, for each variant and aux coefficient (mean over seeds)."""
    plt = pyplot()
    n_layer = res["base_config"]["n_layer"]
    fig, axes = plt.subplots(1, n_layer, figsize=(5 * n_layer, 4), squeeze=False, sharey=True)
    for layer, ax in enumerate(axes[0]):
        for i, (name, runs) in enumerate(res["curves"].items()):
            runs = [r for r in runs if r]
            if not runs:
                continue
            n = min(len(r) for r in runs)
            steps = [runs[0][j][0] for j in range(n)]
            ent = [statistics.fmean(r[j][1][layer] for r in runs) for j in range(n)]
            variant, aux = name.split(":aux")
            ax.plot(steps, ent, color=f"C{list(res['lr']).index(variant)}", ls="-" if float(aux) == 0 else "--",
                    label=f"{variant}, aux_loss_coef {aux}")
        ax.axhline(res["ent_load_max"], color="k", lw=0.8, ls=":")
        ax.set(title=f"layer {layer}", xlabel="step", ylabel="Ent_load (training batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_memory"]:                  # internal: the memory probe's child process
        memory_probe(json.loads(argv[1]))
        return 0
    try:
        args = parse_args(argv)
        dict(speed=bench_speed, quality=bench_quality, ablate=bench_ablate, balance=bench_balance)[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; run the same command again to continue", file=sys.stderr)
        return 130
    except ValueError as e:                      # GPTConfig's validation
        if "GPTConfig" not in str(e):
            raise
        print(f"error: {e}; change the size flags", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
