"""
Dense, MoE, AoE and UoE side by side: speed and memory of a training step, and quality after
the same training budget.

    python bench.py speed                  # step time, tokens/s, peak memory, FLOP/s; eager and compiled
    python bench.py quality                # val loss (mean +- std over seeds) and loss curves
    python bench.py speed --preset gpu     # GPT-2-small-like (12 x 768, block 1024), bf16, one GPU
    python bench.py speed --compile eager --variants moe,uoe --reps 11 --n_layer 2

The size flags describe the UoE model; every other variant gets the expert_hidden D that
uoe.match_config picks to match its active FLOPs per token (and, in `quality`, a second table
matched on total parameters). Outputs go to --out_dir (default bench_out/, not committed):
bench_speed.json, bench_quality.json, quality_curves.png.

How speed is measured (the machine may be shared, so every number is a median, and variants are
compared within one run): all models are built first, warmed up, then timed step by step with
the variants interleaved in every repetition, so a burst of load hits them all alike.
- step: forward + backward + AdamW step, on random tokens.
- FLOP/s: 3 * uoe.flops_per_token * tokens / step time (the model's matmul FLOPs; a training
  step is ~3x the forward). On CUDA, MFU = FLOP/s / the GPU's dense bf16 peak; on CPU, the
  fraction of the rate of a 1024x1024 float32 matmul timed in the same repetitions.
- memory: CUDA, max_memory_allocated over one step, counted as if the model were alone on the
  GPU; CPU, the peak RSS of a fresh process running two eager steps minus its RSS after
  importing torch (weights, grads, AdamW state, activations and allocator slack).
- FFN pieces (eager, layer 0 alone, forward + backward on random activations): the whole FFN;
  its expert path (uoe.dispatch with the FFN's own routing, captured from a forward); and a
  dense SwiGLU with the FLOPs of that expert path. "routing share" = 1 - experts / FFN time:
  scoring, top-k, gates, aux loss and, for UoE, the virtual shared expert.
"""
import argparse
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
from uoe import FFN_VARIANTS, GPT, GPTConfig, flops_breakdown, flops_per_token, match_config, param_counts

REPO = Path(__file__).resolve().parent

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by GPU name, for MFU; --peak_tflops overrides.
GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
                 "A10G": 70e12, "4090": 165e12, "3090": 71e12}

# Defaults per preset and command; a flag given on the command line wins. CPU runs use one thread
# unless told otherwise: on a machine shared with other jobs, an op split over 2 threads waits for
# the second one to get a core, and every matmul then took >= 7 ms here (1 thread: 189 GFLOP/s
# on 1024^2; 2 threads on a loaded 2-core machine: 6-110 GFLOP/s).
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_expert", "top_k", "expert_hidden")
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, vocab_size=65,
                n_expert=8, top_k=2, expert_hidden=256, dtype="float32", compile="both", reps=11, warmup=3, threads=1),
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8, vocab_size=50304,
                n_expert=8, top_k=2, expert_hidden=1024, dtype="bfloat16", compile="both", reps=20, warmup=3),
}
QUALITY_PRESETS = {   # quality trains 7 configs x seeds: smaller and eager on CPU
    "cpu": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=32, n_expert=8, top_k=2,
                expert_hidden=128, dtype="float32", compile="eager", steps=500, seeds=2, lr=6e-3, threads=1,
                warmup_steps=50, eval_interval=50, eval_iters=10, dataset="shakespeare_char"),
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8, n_expert=8, top_k=2,
                expert_hidden=1024, dtype="bfloat16", compile="compile", steps=2000, seeds=3, lr=6e-4,
                warmup_steps=100, eval_interval=100, eval_iters=20, dataset="shakespeare"),
}


class UserError(Exception):
    """A mistake the user can fix; main() prints it as one `error: ...` line and exits 2."""


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


def variant_list(s):
    names = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in names if v not in FFN_VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown variant {bad[0] if bad else s!r} "
                                         f"(choose from {','.join(FFN_VARIANTS)})")
    return list(dict.fromkeys(names))


def build_parser():
    p = Parser(prog="bench.py", description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="command", metavar="{speed,quality}", parser_class=Parser)
    for name in ("speed", "quality"):
        s = sub.add_parser(name, help=f"run the {name} benchmark")
        s.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                       help="default sizes: cpu (minutes on a laptop) or gpu (GPT-2-small-like, bf16, compile)")
        s.add_argument("--variants", type=variant_list, default=list(FFN_VARIANTS), help="comma-separated")
        for k in MODEL_KEYS + ("batch_size",):
            if name == "quality" and k == "vocab_size":
                continue          # the dataset decides
            s.add_argument(f"--{k}", type=positive_int)
        s.add_argument("--compile", choices=("eager", "compile", "both"))
        s.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16 = autocast (CUDA)")
        s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        s.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads); the cpu preset uses 1")
        s.add_argument("--out_dir", default="bench_out")
        s.add_argument("--json", help=f"output JSON (default OUT_DIR/bench_{name}.json)")
        if name == "speed":
            s.add_argument("--reps", type=positive_int, help="timed steps per variant (interleaved)")
            s.add_argument("--warmup", type=positive_int, help="untimed steps first (compiles)")
            s.add_argument("--memory", choices=("on", "off"), default="on", help="peak-memory measurement")
            s.add_argument("--peak_tflops", type=positive_float, help="GPU bf16 peak for MFU")
            s.add_argument("--seed", type=int, default=0)
        else:
            s.add_argument("--steps", type=positive_int)
            s.add_argument("--seeds", type=positive_int, help="number of seeds (0, 1, ...)")
            s.add_argument("--lr", type=positive_float, help="peak learning rate (cosine to lr/10)")
            s.add_argument("--warmup_steps", type=int)
            s.add_argument("--eval_interval", type=positive_int)
            s.add_argument("--eval_iters", type=positive_int)
            s.add_argument("--dataset", help="prepared data/<name>/ (shakespeare_char is prepared if missing)")
            s.add_argument("--match", default="flops,params", help="which tables: flops, params or flops,params")
            s.add_argument("--plot", choices=("on", "off"), default="on")
    return p


def parse_args(argv):
    """Parsed options with preset defaults filled in; raises UserError on bad input."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        raise UserError("no command; run python bench.py speed or python bench.py quality")
    preset = (PRESETS if args.command == "speed" else QUALITY_PRESETS)[args.preset]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.command == "quality":
        if args.warmup_steps < 0:
            raise UserError("--warmup_steps must be >= 0")
        match = list(dict.fromkeys(m.strip() for m in args.match.split(",") if m.strip()))
        if not match or any(m not in ("flops", "params") for m in match):
            raise UserError(f"--match {args.match!r}: use flops, params or flops,params")
        args.match = match
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


def gpu_peak_flops(name, override_tflops=None):
    """Dense bf16 peak of a GPU from its name (torch.cuda.get_device_name), or None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    return next((v for k, v in GPU_PEAK_BF16.items() if k.lower() in name.lower()), None)


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


def matched_configs(base, variants, by="flops"):
    """{variant: config} with each variant's D matched to the UoE base config."""
    return {v: match_config(replace(base, ffn=v), base, by) for v in variants}


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


def ffn_pieces(run, args, reps):
    """Eager fwd+bwd times of layer 0's FFN, its expert path, and a dense SwiGLU of the expert
    path's FLOPs (see the module docstring). Returns a dict of medians in ms and ratios."""
    cfg, dev = run.config, args.device
    mlp = run.model.transformer.h[0].mlp
    B, T, C = args.batch_size, cfg.block_size, cfg.n_embd
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(B, T, C, generator=gen)).to(dev).requires_grad_()
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
        x2 = x.detach().reshape(-1, C).requires_grad_()
        pieces["experts"] = lambda: ctx_backward(ctx, lambda: uoe.dispatch(*a, **kw))
        pieces["dense_equiv"] = lambda: ctx_backward(ctx, lambda: uoe.swiglu(x2, *w))
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
    if cfg.ffn != "dense":
        out["routing_share"] = 1 - out["experts_ms"] / out["ffn_ms"]
        out["routing_flop_share"] = 1 - fl["ffn_experts"] / ffn_flops
        out["experts_vs_dense"] = out["experts_ms"] / out["dense_equiv_ms"]
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


def bench_speed(args):
    setup_torch(args)
    base = base_config(args)
    configs = matched_configs(base, args.variants, "flops")
    modes = ["eager", "compile"] if args.compile == "both" else [args.compile]
    dev, tokens = args.device, args.batch_size * base.block_size
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randint(0, base.vocab_size, (args.batch_size, base.block_size), generator=gen).to(dev)
    y = torch.randint(0, base.vocab_size, (args.batch_size, base.block_size), generator=gen).to(dev)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else cpu_name()
    print(f"# bench.py speed on {device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{dev} {args.dtype}, batch {args.batch_size} x {base.block_size} tokens", flush=True)

    runs = [Run(v, m, configs[v], args) for m in modes for v in args.variants]
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

    n = 1024 if dev == "cpu" else 8192
    a_mm = torch.randn(n, n, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    b_mm = torch.randn_like(a_mm)
    a_mm @ b_mm
    matmul_times = []
    for _ in range(args.reps):                         # interleaved timing
        for r in runs:
            g0, _ = dynamo_counts()
            r.times.append(time_call(lambda: r.step(x, y, args), dev))
            r.recompiles_timed += dynamo_counts()[0] - g0
        matmul_times.append(time_call(lambda: a_mm @ b_mm, dev))
    mm_rate = matmul_rate(n, statistics.median(matmul_times))
    # the bf16 peak is the reference only for bf16 runs; for others give --peak_tflops
    peak = gpu_peak_flops(device_name, args.peak_tflops) if dev == "cuda" and (args.dtype == "bfloat16" or args.peak_tflops) else None

    print("  FFN pieces (eager) ...", flush=True)
    pieces = {r.variant: ffn_pieces(r, args, args.reps) for r in runs if r.mode == "eager"}
    if not pieces:       # compile only: time the pieces on the compiled runs' eager modules
        pieces = {r.variant: ffn_pieces(r, args, args.reps) for r in runs}

    memory = {}
    if args.memory == "on":
        print("  peak memory ...", flush=True)
        for r in runs:
            if dev == "cuda":
                memory[(r.variant, r.mode)] = cuda_peak_memory_mb(r, x, y, args)
            elif r.mode == "eager":     # a compiled probe would compile again: eager only on CPU
                memory[(r.variant, r.mode)] = memory_in_subprocess(r.config, args)

    rows = []
    for r in runs:
        t = statistics.median(r.times)
        total, active = param_counts(r.config)
        achieved = flop_rate(r.config, tokens, t)
        rows.append(dict(
            variant=r.variant, mode=r.mode, expert_hidden=r.config.expert_hidden,
            params_total=total, params_active=active, fwd_flops_per_token=flops_per_token(r.config),
            step_ms=t * 1e3, step_ms_all=[s * 1e3 for s in r.times], tokens_per_s=tokens / t,
            peak_mem_mb=memory.get((r.variant, r.mode)), achieved_flops=achieved,
            mfu=utilization(achieved, peak) if dev == "cuda" else None,
            matmul_fraction=utilization(achieved, mm_rate) if dev == "cpu" else None,
            graphs_per_warmup_step=r.graphs_per_warmup_step if r.mode == "compile" else None,
            graph_breaks=r.graph_breaks if r.mode == "compile" else None,
            recompiles_during_timing=r.recompiles_timed if r.mode == "compile" else None,
            ffn=pieces.get(r.variant) if r.mode == modes[0] else None))
    result = dict(
        command="speed", device=dev, device_name=device_name, torch=torch.__version__,
        threads=torch.get_num_threads(), dtype=args.dtype, batch_size=args.batch_size,
        tokens_per_step=tokens, reps=args.reps, warmup=args.warmup, base_config=asdict(base),
        configs={v: asdict(c) for v, c in configs.items()},
        matmul={"n": n, "flops_per_s": mm_rate, "dtype": str(a_mm.dtype)}, gpu_peak_flops=peak,
        memory_method=("cuda max_memory_allocated (one step, model alone)" if dev == "cuda" else
                       "peak RSS of a fresh process (2 eager steps) minus RSS after import; eager only"),
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
           f"bf16 peak {res['gpu_peak_flops'] / 1e12:.0f} TFLOP/s" if res["gpu_peak_flops"] else "bf16 peak unknown")
    lines = [f"Speed: {res['device_name']}, torch {res['torch']}, {res['threads']} threads, {res['dtype']}; "
             f"UoE {b['n_layer']}x{b['n_embd']}, E={b['n_expert']}, K={b['top_k']}, D={b['expert_hidden']}, "
             f"others' D matched on active FLOPs; {res['tokens_per_step']} tokens/step; "
             f"median of {res['reps']} interleaved steps; {ref}.",
             "",
             f"| variant | mode | D | params (total / active) | fwd MFLOP/tok | step ms | tokens/s | "
             f"peak mem MB | GFLOP/s | {util} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        u = r["matmul_fraction" if cpu else "mfu"]
        lines.append(f"| {r['variant']} | {r['mode']} | {r['expert_hidden']} | "
                     f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M | "
                     f"{r['fwd_flops_per_token'] / 1e6:.2f} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{fmt(r['peak_mem_mb'], '.0f')} | {r['achieved_flops'] / 1e9:.2f} | {fmt(u, '.1%')} |")
    ffn_rows = [r for r in res["rows"] if r["ffn"]]
    if ffn_rows:
        lines += ["", "FFN of layer 0 (eager, fwd+bwd, median ms): the expert path is uoe.dispatch; "
                  "dense equiv = a dense SwiGLU with the expert path's FLOPs.", "",
                  "| variant | FFN ms | experts ms | dense equiv ms | experts / dense equiv | "
                  "routing share of time (of FLOPs) |", "|---|---:|---:|---:|---:|---:|"]
        for r in ffn_rows:
            f = r["ffn"]
            share = (f"{f['routing_share']:.0%} ({f['routing_flop_share']:.0%})" if "routing_share" in f else "–")
            lines.append(f"| {r['variant']} | {f['ffn_ms']:.2f} | {fmt(f.get('experts_ms'), '.2f')} | "
                         f"{fmt(f.get('dense_equiv_ms'), '.2f')} | {fmt(f.get('experts_vs_dense'), '.2f')} | {share} |")
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


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    print(f"\nwrote {path}")


# -----------------------------------------------------------------------------
# quality

def load_dataset(name):
    """(train tokens, val tokens, meta) of data/<name>/, preparing shakespeare_char if missing."""
    import numpy as np
    from data.prepare import DataError, ensure_dataset, read_meta
    try:
        folder = ensure_dataset(name)
        meta = read_meta(folder)
        dtype = np.dtype(meta["dtype"])
        splits = [torch.from_numpy(np.fromfile(folder / f"{s}.bin", dtype=dtype).astype(np.int64)) for s in ("train", "val")]
    except DataError as e:
        raise UserError(str(e)) from None
    except (OSError, KeyError, TypeError) as e:
        raise UserError(f"data/{name} is damaged ({type(e).__name__}: {e}); delete it and run again to re-prepare it") from None
    return splits[0], splits[1], meta


def get_batch(data, batch_size, block_size, gen):
    """batch_size random windows of data (a 1-d long tensor), positions from gen."""
    if len(data) < block_size + 1:
        raise UserError(f"the dataset has only {len(data)} tokens, fewer than block_size+1; use a smaller --block_size")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    offsets = torch.arange(block_size + 1)
    w = data[ix[:, None] + offsets]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine from lr to lr/10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return lr / 10 + 0.5 * (lr - lr / 10) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, batches, ctx):
    model.eval()
    losses = []
    for x, y in batches:
        with ctx:
            model(x, y)
        losses.append(model.last_ce.item())
    model.train()
    return statistics.fmean(losses)


def train_one(config, seed, train_data, val_batches, args):
    """Train config for args.steps steps; return dict(curve of (step, val) points, train ce, final val)."""
    torch.manual_seed(seed)
    model = GPT(config).to(args.device)
    opt = make_optimizer(model, lr=args.lr)
    if args.compile == "compile":
        compile_blocks(model)
    gen = torch.Generator().manual_seed(seed)          # same batches for every variant of a seed
    ctx = autocast(args)
    train_ce, val = [], []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup_steps)
        x, y = (t.to(args.device) for t in get_batch(train_data, args.batch_size, config.block_size, gen))
        train_step(model, opt, x, y, ctx)
        train_ce.append(model.last_ce.item())
        if not math.isfinite(train_ce[-1]):
            raise UserError(f"{config.ffn} diverged at step {step} (seed {seed}); lower --lr")
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            val.append((step + 1, evaluate(model, val_batches, ctx)))
    return dict(train_ce=train_ce, val=val, final_val=val[-1][1])


def bench_quality(args):
    setup_torch(args)
    train_data, val_data, meta = load_dataset(args.dataset)
    base = base_config(args, vocab_size=meta["vocab_size"])
    tables = {by: matched_configs(base, args.variants, by) for by in args.match}
    gen = torch.Generator().manual_seed(1234)          # one fixed validation set for all runs
    val_batches = [tuple(t.to(args.device) for t in get_batch(val_data, args.batch_size, base.block_size, gen))
                   for _ in range(args.eval_iters)]
    print(f"# bench.py quality: {args.dataset}, {args.steps} steps x {args.batch_size} x {base.block_size} "
          f"tokens, seeds 0..{args.seeds - 1}, {args.device} {args.dtype} {args.compile}", flush=True)
    cache, results = {}, {}
    t_start = time.perf_counter()
    for by, configs in tables.items():
        results[by] = {}
        for v, c in configs.items():
            key = json.dumps(asdict(c), sort_keys=True)   # the same config in both tables trains once
            if key not in cache:
                t0 = time.perf_counter()
                cache[key] = [train_one(c, s, train_data, val_batches, args) for s in range(args.seeds)]
                print(f"  {v:5s} D={c.expert_hidden:<5d} val {mean_std([r['final_val'] for r in cache[key]])[0]:.4f}"
                      f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            total, active = param_counts(c)
            finals = [r["final_val"] for r in cache[key]]
            m, s = mean_std(finals)
            results[by][v] = dict(config=asdict(c), expert_hidden=c.expert_hidden, params_total=total,
                                  params_active=active, fwd_flops_per_token=flops_per_token(c),
                                  val_loss_mean=m, val_loss_std=s, val_loss_per_seed=finals,
                                  runs=cache[key])
    result = dict(command="quality", dataset=args.dataset, steps=args.steps, seeds=args.seeds,
                  batch_size=args.batch_size, block_size=base.block_size, lr=args.lr,
                  tokens=args.steps * args.batch_size * base.block_size, device=args.device,
                  dtype=args.dtype, compile=args.compile, base_config=asdict(base), tables=results,
                  seconds=time.perf_counter() - t_start)
    print()
    print(quality_table(result))
    if args.plot == "on":
        result["figure"] = plot_curves(result, Path(args.out_dir) / "quality_curves.png")
    write_json(args.json, result)
    return result


def quality_table(res):
    titles = {"flops": "matched active FLOPs per token", "params": "matched total parameters"}
    lines = []
    for by, rows in res["tables"].items():
        lines += [f"Quality, {titles[by]}: {res['dataset']}, {res['steps']} steps, "
                  f"{res['tokens'] / 1e6:.2f}M tokens, val loss mean ± std over {res['seeds']} seeds", "",
                  "| variant | D | total params | active params | fwd MFLOP/tok | val loss |",
                  "|---|---:|---:|---:|---:|---:|"]
        for v, r in rows.items():
            lines.append(f"| {v} | {r['expert_hidden']} | {r['params_total'] / 1e6:.3f}M | "
                         f"{r['params_active'] / 1e6:.3f}M | {r['fwd_flops_per_token'] / 1e6:.2f} | "
                         f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_curves(res, path):
    """Validation loss (mean over seeds) and smoothed training CE per variant, one panel per table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    titles = {"flops": "matched active FLOPs", "params": "matched total params"}
    fig, axes = plt.subplots(1, len(res["tables"]), figsize=(6 * len(res["tables"]), 4.2), squeeze=False)
    for ax, (by, rows) in zip(axes[0], res["tables"].items()):
        for i, (v, r) in enumerate(rows.items()):
            color = f"C{i}"
            steps = [s for s, _ in r["runs"][0]["val"]]
            val = [statistics.fmean(run["val"][j][1] for run in r["runs"]) for j in range(len(steps))]
            ce = [statistics.fmean(vals) for vals in zip(*(run["train_ce"] for run in r["runs"]))]
            ax.plot(range(1, len(ce) + 1), ema(ce), color=color, alpha=0.35, lw=1)
            ax.plot(steps, val, color=color, marker="o", ms=3, label=f"{v} (D={r['expert_hidden']}) "
                    f"{r['val_loss_mean']:.3f}")
        ax.set(title=f"{res['dataset']}: {titles[by]}", xlabel="step", ylabel="loss (val: markers; train: faint)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return str(path)


def ema(xs, beta=0.9):
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_memory"]:                  # internal: the memory probe's child process
        memory_probe(json.loads(argv[1]))
        return 0
    try:
        args = parse_args(argv)
        (bench_speed if args.command == "speed" else bench_quality)(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:                      # GPTConfig's validation
        if "GPTConfig" not in str(e):
            raise
        print(f"error: {e}; change the size flags", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
