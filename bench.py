"""
Dense, MoE, AoE and UoE side by side: the speed and memory of a training step.

    python bench.py speed                  # step time, tokens/s, peak memory, FLOP/s; eager and compiled
    python bench.py speed --preset gpu     # GPT-2-small-like (12 x 768, block 1024), bf16, one GPU
    python bench.py speed --help           # sizes and options

The quality study (quality, ablate, balance) is study.py.
The size flags describe the UoE model; every other variant gets the expert_hidden D that
uoe.match_config picks to match its active FLOPs per token. The result goes to
OUT_DIR/bench_speed.json (default bench_out/, not committed).

How speed is measured (the machine may be shared, so every number is a median, and variants are
compared within one run): on CPU all models are built first, warmed up, then timed step by step
with the variants interleaved in every repetition, so a burst of load hits them all alike; on CUDA
one variant's models (eager, compiled) at a time, freed before the next.
- step: forward + backward + clip + AdamW step (train.py's optimizer and its defaults), random tokens.
- FLOP/s: 3 * uoe.flops_per_token * tokens / step time (the model's matmul FLOPs; a training
  step is ~3x the forward). On CUDA, MFU = FLOP/s / the GPU's peak from train.mfu_peak; on CPU,
  the fraction of the rate of a 1024x1024 float32 matmul timed in the same repetitions.
- memory: CUDA, max_memory_allocated over one step, counted as if the model were alone on the
  GPU; CPU, the peak RSS of a fresh process running two eager steps minus its RSS after
  importing torch (weights, grads, AdamW state, activations and allocator slack).
- FFN pieces (eager, layer 0 alone, forward + backward on random activations): the whole FFN;
  its chosen experts (the layer's chosen_experts on the choice a forward made); its always-on
  part (MoE's shared experts, UoE's virtual shared expert beyond scoring); scoring and
  the rest (router / routing neurons, top-k, gates, aux loss) = FFN - experts - always-on; and a
  dense SwiGLU with the FLOPs of the expert path. Each part's share of time is next to its share
  of the FFN's FLOPs.
"""
import argparse
import json
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
from harness import (REPO, Parser, cli, device_name, positive_float, positive_int, settle, variant_list,
                     write_json)
from train import TrainConfig, UserError, make_optimizer, mfu_peak   # train.py's recipe, UserError, GPU peaks
from uoe import FFN_VARIANTS, GPT, GPTConfig, flops_breakdown, flops_per_token, match_config, param_counts

# Defaults per preset; a flag given on the command line wins. CPU runs use one thread
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


SPEED_EPILOG = """The cpu preset (4 x 128, block 128, batch 16, float32, 1 thread) times all eight models (four
variants, eager and compiled) interleaved: a few minutes on 2 cores. The gpu preset (12 x 768, block
1024, batch 8, bf16 autocast, widths multiples of 64) builds one variant's two models at a time and
frees them before the next: the largest, MoE (D=1408, 379M parameters), holds 2 x 5.7 GiB of float32
weights, gradients and AdamW state, plus one step's activations (an estimate: about 20 GiB in all;
on a 24 GB card use --batch_size 4)."""


def build_parser():
    top = Parser(prog="bench.py", description=__doc__.split("\n\n")[0].strip())
    sub = top.add_subparsers(dest="command", metavar="{speed}", parser_class=Parser)
    p = sub.add_parser("speed", help="time a training step of each variant (eager and compiled)",
                       description=__doc__.split("\n\n")[0].strip(), epilog=SPEED_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                   help="default sizes: cpu (2 cores) or gpu (one GPU, bf16, compile)")
    p.add_argument("--variants", type=variant_list, default=list(FFN_VARIANTS), help="comma-separated")
    for k in MODEL_KEYS + ("batch_size",):
        p.add_argument(f"--{k}", type=positive_int, help="of UoE; the others' D is matched on FLOPs"
                       if k == "expert_hidden" else None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16 = autocast (CUDA)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out_dir", default="bench_out")
    p.add_argument("--json", help="output JSON (default OUT_DIR/bench_speed.json)")
    p.add_argument("--compile", choices=("eager", "compile", "both"))
    p.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads); the cpu preset uses 1")
    p.add_argument("--reps", type=positive_int, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=positive_int, help="untimed steps first (compiles)")
    p.add_argument("--memory", choices=("on", "off"), default="on", help="peak-memory measurement")
    p.add_argument("--peak_tflops", type=positive_float,
                   help="GPU peak (TFLOP/s) for MFU; default: train.py's table (bf16)")
    p.add_argument("--multiple_of", type=positive_int, help="round the matched widths D to a multiple of "
                   "this (gpu preset: 64, aligned bf16 GEMMs; the FLOP mismatch left is a table column)")
    p.add_argument("--seed", type=int, default=0)
    return top


def parse_args(argv):
    """Parsed options of `bench.py speed ...` with preset defaults filled in; raises UserError on bad input."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        raise UserError("no command; run python bench.py speed (or python study.py quality, ablate, balance)")
    return settle(args, PRESETS[args.preset], "bench_speed.json")


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
    for name in ("recompile_limit", "cache_size_limit"):      # the newer name, and the older one (torch < 2.7)
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)


def compile_blocks(model):
    """torch.compile each transformer block in place; embeddings, lm_head and loss stay eager.
    Why not torch.compile(model): with torch 2.13's inductor, a loss `ce + coef * zeros` whose
    `ce.detach()` is also kept (GPT.forward's last_ce; dense has no aux loss) comes back without
    a grad_fn; and for the routed variants dynamo skips GPT.forward anyway, because the graph
    break at uoe.dispatch_loop (which runs eagerly) falls inside its loop over blocks. Compiling the
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


RECIPE = TrainConfig()      # the optimizer, its settings and the gradient clip of a default train.py run


def optimizer(model):
    return make_optimizer(model, RECIPE, next(model.parameters()).device)


def train_step(model, opt, x, y, ctx):
    """One training step as train.py takes it: forward, backward, clip, AdamW step."""
    with ctx:
        _, loss = model(x, y)
    loss.backward()
    if RECIPE.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE.grad_clip)
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
        self.opt = optimizer(self.model)
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


def ffn_pieces(run, args, reps):
    """Eager fwd+bwd times of layer 0's FFN and of its parts: the chosen experts and the always-on part
    (the FFN class's parts(), each on inputs of its own; all of a dense FFN is always-on), scoring and the
    rest (router / C_i / routing neurons, top-k, gates, aux loss: FFN minus the other two), and a dense
    SwiGLU with the FLOPs of the expert path. Returns medians in ms, each part's share of the FFN's time and
    of its FLOPs. A config whose ffn uoe does not know is uoe's ValueError, before anything is timed."""
    cfg, dev = run.config, args.device
    fl = flops_breakdown(cfg)
    mlp = run.model.transformer.h[0].mlp
    B, T, C = args.batch_size, cfg.block_size, cfg.n_embd
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(B, T, C, generator=gen).to(dev).requires_grad_()            # (B, T, C)
    ctx = autocast(args)
    pieces = {"ffn": lambda: mlp(x)}
    if mlp.routed:
        x2 = x.detach().reshape(-1, C).requires_grad_()                          # (N, C)
        with ctx:
            pieces.update(mlp.parts(x2))                                         # "experts" (and "shared")
        width = max(1, round(uoe.ffn_breakdown(cfg)["experts"] / (3 * C)))   # same FLOPs as the expert path
        w = [(torch.randn(*shape, generator=gen) * 0.02).to(dev).requires_grad_()
             for shape in ((C, width), (C, width), (width, C))]
        pieces["dense_equiv"] = lambda: uoe.swiglu(x2, *w)
    for f in pieces.values():            # warm-up
        ctx_backward(ctx, f)
    times = {k: [] for k in pieces}
    for _ in range(reps):
        for k, f in pieces.items():
            times[k].append(time_call(lambda: ctx_backward(ctx, f), dev))
    mlp.zero_grad(set_to_none=True)
    out = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}
    ffn_flops = fl["ffn_scoring"] + fl["ffn_shared"] + fl["ffn_experts"]
    if mlp.routed:
        out.setdefault("shared_ms", 0.0)
        out["scoring_ms"] = out["ffn_ms"] - out["experts_ms"] - out["shared_ms"]
        out["experts_vs_dense"] = out["experts_ms"] / out["dense_equiv_ms"]
    else:
        out.update(shared_ms=out["ffn_ms"], experts_ms=0.0, scoring_ms=0.0)
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
    train_step(model, optimizer(model), torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long),
               nullcontext())
    del model
    base = rss_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")          # VmHWM := VmRSS
    except OSError:
        base = rss_mb("VmHWM")                                  # no reset: can under-report
    model = GPT(cfg)
    opt = optimizer(model)
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
    machine = device_name(dev)
    mm_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    paths = {v: uoe.resolve_expert_path(c, dev, mm_dtype) for v, c in configs.items()}
    print(f"# bench.py speed on {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{dev} {args.dtype}, batch {args.batch_size} x {base.block_size} tokens; expert path: "
          + ", ".join(f"{v} {p}" for v, p in paths.items() if v != "dense"), flush=True)
    # MFU against train.py's one table of GPU peaks (bf16 runs only, or --peak_tflops)
    peak, peak_label = mfu_peak(machine, args.dtype, args.peak_tflops) if dev == "cuda" else (None, "")

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
        command="speed", device=dev, device_name=machine, torch=torch.__version__,
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
                  "experts = chosen_experts; VSE/shared = UoE's virtual shared expert beyond scoring, MoE's shared "
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


# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_memory"]:                  # internal: the memory probe's child process
        memory_probe(json.loads(argv[1]))
        return 0
    return cli(lambda argv: bench_speed(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
