"""
The study: dense, MoE, MoE + shared expert, AoE and UoE at matched active FLOPs per token, every run
made by train.py. Does UoE beat MoE, and by how much, with intervals a statistician would sign?

    python study.py quality                   # the small budget: lr sweep on a held-out seed, then 5 seeds
    python study.py quality --preset train    # train.py's default model and length (4 x 128, 1000 steps)
    python study.py ablate                    # the paper's UoE ablations against the full UoE
    python study.py balance                   # expert load of moe and uoe without (and with) the aux loss
    python study.py report                    # the budgets run: markdown, JSON and a figure for RESULTS.md
    python study.py quality --help            # sizes, what each preset costs

The size flags describe the UoE
model; every other variant gets the expert_hidden D that uoe.match_config picks to match its active
FLOPs per token. Outputs go to --out_dir (default bench_out/, not committed): <command>_<preset>.json
and .png, study_report.{md,json,png}, and runs/, one folder per train.py run.

How the numbers are kept honest:
- Selection on held-out seeds: each variant's learning rate is chosen on sweep seeds (1000, 1001, ...)
  that are never reported; every reported seed (0, 1, ...) trains at the chosen rate afresh, in a run
  of its own. Ablate's and balance's runs are reported seeds too.
- Verdicts: the paired mean difference over seeds, its 95% confidence interval from Student's t with
  n - 1 degrees of freedom, and "decisive" only when that interval excludes 0.
- Run identity: a run's folder and result are keyed by all its options, its role (sweep or reported),
  torch's version and sha256 fingerprints of uoe.py + train.py and of the corpus (train.bin, val.bin).
  A run made by other code or on another corpus is rerun, never reused.
- A run in progress is claimed (an exclusive lock on runs/<run>/claim.lock, dropped by the kernel when
  its holder exits): another command sharing the out_dir waits for it instead of starting it again.
- A killed run resumes, exactly: train.py checkpoints every eval_interval steps (and on SIGINT/SIGTERM), and
  a run with a checkpoint but no result continues it (--init_from=resume restores weights, optimizer, RNGs and
  the batch order) if runs/<run>/state.json names the same identity. Its seconds are its wall time over all
  its segments.
"""
import argparse
import errno
import hashlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from harness import (REPO, Parser, cli, device_name, positive_float, positive_int, settle, variant_list,
                     write_json)
from train import TrainConfig, UserError
from uoe import GPTConfig, flops_per_token, match_config, param_counts

try:
    import fcntl

    def try_lock(f):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
except ImportError:                                    # Windows
    import msvcrt

    def try_lock(f):
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "n_expert", "top_k", "expert_hidden")
# the variants of `quality`: name -> GPTConfig fields (expert_hidden is then matched on FLOPs)
VARIANTS = {"dense": dict(ffn="dense"), "moe": dict(ffn="moe"), "moe+shared": dict(ffn="moe", n_shared=1),
            "aoe": dict(ffn="aoe"), "uoe": dict(ffn="uoe")}
# the paired differences reported, first minus second, where both variants ran; the first two are the headline
COMPARISONS = (("uoe", "moe"), ("moe", "dense"), ("uoe", "moe+shared"), ("uoe", "dense"), ("uoe", "aoe"),
               ("moe+shared", "moe"))
# the paper's ablations of UoE (Table 4), as GPTConfig changes of the full UoE; n_routing is scaled
ABLATIONS = {"uoe": {}, "no_vse": dict(vse=False), "output_twice": dict(uoe_output="twice"),
             "score_pre": dict(route_score="pre"), "score_swiglu": dict(route_score="swiglu"),
             "norm_1": dict(route_norm=1), "norm_inf": dict(route_norm="inf"),
             "n_routing_half": dict(n_routing=0.5), "n_routing_double": dict(n_routing=2.0)}
SWEEP_SEED = 1000           # sweep seeds are 1000, 1001, ...; reported seeds 0, 1, ... stay below
CODE_FILES = ("uoe.py", "train.py")                    # the model and its training: part of every run's identity

# Budgets. cpu: the small one (2 x 64, 1M tokens of pystdlib_char). train: `python train.py`'s own default model
# and length (read from its defaults), on the same corpus. gpu: 8 x 512, 12.3M GPT-2 BPE tokens, one GPU.
# CPU presets run 2 runs at a time on one thread each: on a shared machine an op split over 2 threads waits for
# the second one to get a core.
_T, _M = TrainConfig(), GPTConfig()
PRESETS = {
    "cpu": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, batch_size=16, n_expert=8, top_k=2,
                expert_hidden=128, steps=500, warmup_steps=100, eval_interval=100, eval_iters=8, log_interval=20,
                seeds=5, sweep_seeds=1, lrs=[1e-3, 2e-3, 4e-3, 8e-3], default_lr=4e-3,
                variants=["dense", "moe", "moe+shared", "aoe", "uoe"], dataset="pystdlib_char", dtype="float32",
                compile="eager", jobs=2, threads=1, multiple_of=1),
    "train": dict(**{k: getattr(_M, k) for k in MODEL_KEYS}, batch_size=_T.batch_size, steps=_T.max_iters,
                  warmup_steps=_T.warmup_iters, eval_interval=100, eval_iters=_T.eval_iters, log_interval=20,
                  seeds=5, sweep_seeds=1, lrs=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], default_lr=_T.learning_rate,
                  variants=["dense", "moe", "moe+shared", "uoe"], dataset="pystdlib_char", dtype="float32",
                  compile="eager", jobs=2, threads=1, multiple_of=1),
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, batch_size=16, n_expert=8, top_k=2,
                expert_hidden=1024, steps=1500, warmup_steps=150, eval_interval=150, eval_iters=20, log_interval=50,
                seeds=5, sweep_seeds=1, lrs=[5e-4, 1e-3, 2e-3], default_lr=1e-3,
                variants=["dense", "moe", "moe+shared", "uoe"], dataset="pystdlib", dtype="bfloat16",
                compile="compile", jobs=1, threads=None, multiple_of=64),
}


# -----------------------------------------------------------------------------
# statistics (pure; tested on known numbers)

def mean_std(xs):
    """Mean and sample standard deviation (0.0 for one value)."""
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):                      # the fraction converges fast only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny, c, d = 1e-300, 1.0, 1.0 / (1.0 - (a + b) * x / (a + 1))
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / ((1.0 + num * d) or tiny)
            c = (1.0 + num / c) or tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p (0.5 <= p < 1), by bisection on t_cdf."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a, b):
    """Mean, sample std, standard error and 95% confidence interval (t, n - 1 degrees of freedom) of the
    per-seed differences a[s] - b[s] over the seeds both have (dicts seed -> value; None = a diverged run,
    skipped). n = number of pairs; se and ci are None below 2 pairs."""
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys()) if a[s] is not None and b[s] is not None]
    if not d:
        return dict(mean=None, std=None, se=None, ci=None, n=0)
    m, s = mean_std(d)
    if len(d) < 2:
        return dict(mean=m, std=s, se=None, ci=None, n=1)
    se = s / math.sqrt(len(d))
    half = t_quantile(0.975, len(d) - 1) * se
    return dict(mean=m, std=s, se=se, ci=[m - half, m + half], n=len(d))


def verdict(d, a="uoe", b="moe"):
    """Plain words for a paired difference of losses a - b (lower is better): decisive only when the 95%
    interval excludes 0."""
    if d["mean"] is None:
        return "no pairs"
    if d["ci"] is None:
        return "one pair: no interval"
    better = a if d["mean"] < 0 else b
    if d["ci"][0] > 0 or d["ci"][1] < 0:
        return f"decisive: {better} is better (the 95% CI excludes 0)"
    return f"not decisive: the 95% CI includes 0 ({better} ahead by {abs(d['mean']):.4f})"


def best_lr(vals):
    """The learning rate with the lowest val loss ({lr: loss or None if it diverged}); ties go to the
    smaller rate. None if every rate diverged."""
    ok = [(v, lr) for lr, v in vals.items() if v is not None and math.isfinite(v)]
    return min(ok)[1] if ok else None


def ent_load_summary(routing, steps, tail=0.1):
    """Per layer: mean Ent_load, max and min load over the train records of the last `tail` of
    training. routing: [[step, [ent per layer], [max per layer], [min per layer]], ...]."""
    last = [r for r in routing if r[0] > steps * (1 - tail)] or routing[-1:]
    n_layer = len(last[0][1])
    return [dict(ent_load=statistics.fmean(r[1][i] for r in last), max_load=statistics.fmean(r[2][i] for r in last),
                 min_load=statistics.fmean(r[3][i] for r in last)) for i in range(n_layer)]


def load_ratio(max_loads, min_loads):
    """max / min load, as the ratio of their means over seeds (a mean of per-seed ratios is ruled by the seed
    whose least-loaded expert got least, and is infinite when one got none); None when the least-loaded expert
    got no tokens in any seed."""
    least = statistics.fmean(min_loads)
    return statistics.fmean(max_loads) / least if least > 0 else None


def gap_curve(a, b):
    """Per eval point: (tokens, paired mean of a - b over seeds, half-width of its 95% CI or None)."""
    seeds = [s for s in sorted(a.keys() & b.keys()) if a[s] and b[s]]
    out = []
    for i in range(min((min(len(a[s]), len(b[s])) for s in seeds), default=0)):
        d = paired_difference({s: a[s][i][3] for s in seeds}, {s: b[s][i][3] for s in seeds})
        out.append((a[seeds[0]][i][1], d["mean"], d["ci"] and d["ci"][1] - d["mean"]))
    return out


def fmt_pm(m, s, digits=4, n=None):
    """m ± s; with n = 1 (one seed: no spread to show) m ± –; with s None, m alone."""
    if m is None:
        return "–"
    if n is not None and n < 2:
        return f"{m:.{digits}f} ± –"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def fmt_ci(d, digits=4):
    return f"[{d['ci'][0]:+.{digits}f}, {d['ci'][1]:+.{digits}f}]" if d.get("ci") else "–"


def fmt_duration(seconds):
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# -----------------------------------------------------------------------------
# configs and runs. Every run is `python train.py --key=value ...` in a subprocess, into its own folder
# OUT_DIR/runs/<variant>-D<D>-lr<lr>-s<seed>[-sweep]-<hash of its identity>/, whose result.json (written
# atomically when the run has finished) makes a rerun skip it. Until then the folder holds train/ (train.py's
# out_dir: metrics.jsonl and ckpt.pt, saved every eval_interval steps), train.log (every segment's output) and
# state.json: the run's identity, the seconds of its finished segments and when the running one started. A run
# is made in one or more segments: a command killed mid-run leaves ckpt.pt behind, and the next one resumes it.

def sha256_of(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(dataset_dir):
    """What else a run's result depends on besides its options: the model and training code, the corpus
    and torch's version."""
    return dict(code_sha256=sha256_of(REPO / f for f in CODE_FILES), torch=torch.__version__,
                data_sha256=sha256_of(Path(dataset_dir) / f for f in ("train.bin", "val.bin")))


def prepare(args):
    """Prepare the dataset once (before parallel runs could race to do it), fingerprint the code and the
    corpus into args.fingerprint, and return the UoE base config."""
    from data.prepare import DataError, ensure_dataset, read_meta
    try:
        folder = ensure_dataset(args.dataset, Path(args.data_dir))
        meta = read_meta(folder)
        args.fingerprint = fingerprint(folder)
    except DataError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot read {e.filename} ({e.strerror}); prepare the dataset again: "
                        f"python data/prepare.py {args.dataset}") from None
    vocab = meta["vocab_size"]
    if args.preset == "gpu":
        vocab = -(-vocab // 64) * 64                 # GPT-2's 50257 -> 50304: aligned GEMMs
    return GPTConfig(ffn="uoe", vocab_size=vocab, **{k: getattr(args, k) for k in MODEL_KEYS})


def variant_configs(base, variants, multiple_of=1):
    """{name: GPTConfig} of the quality variants, each one's D matched to the UoE base on FLOPs."""
    out = {}
    for v in variants:
        c = replace(base, **VARIANTS[v])
        out[v] = c if v == "uoe" and multiple_of == 1 else match_config(c, base, "flops", multiple_of=multiple_of)
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
                eval_iters=args.eval_iters, log_interval=args.log_interval, device=args.device,
                dtype=args.dtype, compile=args.compile == "compile", plot=False)


def run_spec(label, config, lr, seed, args, role="reported"):
    """One train.py run: its label, lr, seed, role ('sweep' or 'reported'), options, identity and folder."""
    options = {**asdict(config), **recipe(args), "learning_rate": lr, "min_lr": lr / 10, "seed": seed}
    identity = dict(options=options, role=role, **args.fingerprint)
    key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    # the folder depends on the identity only: the same run asked for by two commands is run once
    name = f"{config.ffn}-D{config.expert_hidden}-lr{lr:g}-s{seed}{'-sweep' if role == 'sweep' else ''}-{key}"
    return dict(label=label, lr=lr, seed=seed, role=role, options=options, identity=identity,
                dir=str(Path(args.out_dir).resolve() / "runs" / name))


def train_command(spec, resume=False):
    """The train.py command line of a run: afresh (replacing whatever train/ holds), or resuming train/ckpt.pt.
    ckpt_interval is not among the options, so not in the identity: resume is exact, so where a run was
    checkpointed cannot change its result. Every option is given again on resume: train.py checks that the
    model options agree with the checkpoint's, and the training options it gets are the same ones."""
    opts = {**spec["options"], "out_dir": str(Path(spec["dir"]) / "train"),
            "ckpt_interval": spec["options"]["eval_interval"],     # a few MB at each eval: negligible
            **({"init_from": "resume"} if resume else {"overwrite": True})}
    return [sys.executable, str(REPO / "train.py")] + [f"--{k}={v!r}" for k, v in opts.items()]


def read_state(spec):
    """runs/<run>/state.json if it is of spec's identity, else None."""
    try:
        st = json.loads((Path(spec["dir"]) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return st if isinstance(st, dict) and st.get("identity") == spec["identity"] else None


def resume_step(spec):
    """The step at which to resume spec's run from its train/ckpt.pt, or None to start it afresh (no
    checkpoint, or one set aside here). A checkpoint is resumed only when state.json, written before the
    segment that made it, names the same identity, and only when it loads (weights_only, memory-mapped: the
    file is not read through). Any other checkpoint is moved to ckpt.pt.bad, with a line saying why, rather
    than stopping the command: a run is deterministic, so starting it afresh costs time but changes no
    number, and train.py writes checkpoints atomically, so only a disk fault or a hand edit makes a bad one;
    an unattended study of hours should not stop for that, and the file is kept for a look, not replaced."""
    ckpt = Path(spec["dir"]) / "train" / "ckpt.pt"
    if not ckpt.exists():
        return None
    why = None
    if read_state(spec) is None:
        why = "no state.json of this run's identity says which run wrote it"
    else:
        try:
            step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"]
            if not isinstance(step, int) or not 0 <= step <= spec["options"]["max_iters"]:
                raise ValueError(f"step {step!r}")
            return step
        except Exception as e:                          # any failure to read it: torch raises many kinds
            why = f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    bad = ckpt.with_name("ckpt.pt.bad")
    os.replace(ckpt, bad)
    print(f"  starting {Path(spec['dir']).name} afresh: its checkpoint was moved to {bad}: {why}", flush=True)
    return None


def start_segment(spec, step):
    """Record in state.json that a segment of spec's run starts now (afresh when step is None, else resuming
    at step); return (seconds of its earlier segments, the start time). A segment whose end no command saw
    (the command was killed outright, so state.json still says when it started) counts until its last
    checkpoint: the work after that is lost and done again, in this segment."""
    now, seconds, segments = time.time(), 0.0, 0
    st = read_state(spec) if step is not None else None
    if st is not None:
        seconds, segments = st.get("seconds", 0.0), st.get("segments", 0)
        if st.get("started") is not None:
            try:
                seconds += max(0.0, (Path(spec["dir"]) / "train" / "ckpt.pt").stat().st_mtime - st["started"])
            except OSError:
                pass
    write_json(Path(spec["dir"]) / "state.json", dict(identity=spec["identity"], seconds=seconds,
                                                      segments=segments + 1, started=now), quiet=True)
    return seconds, now


def end_segment(spec, seconds, t0):
    """Record that the running segment of spec's run (started at t0 after `seconds` of earlier segments) has
    ended; return the run's seconds so far."""
    total = seconds + time.time() - t0
    path = Path(spec["dir"]) / "state.json"
    st = read_state(spec) or dict(identity=spec["identity"], segments=1)
    write_json(path, {**st, "seconds": total, "started": None}, quiet=True)
    return total


def run_result(spec, seconds, diverged=False):
    """The compact result of a finished run, from its metrics.jsonl (a diverged run: no numbers). seconds: the
    wall time of its train.py processes, summed over its segments (see start_segment)."""
    evals, trains = [], []
    if not diverged:
        for line in (Path(spec["dir"]) / "train" / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            (evals if r["kind"] == "eval" else trains).append(r)
    routing = [[t["step"], [l["ent_load"] for l in t["routing"]], [l["max_load"] for l in t["routing"]],
                [l["min_load"] for l in t["routing"]]]
               for t in trains if t.get("routing") and all(l is not None for l in t["routing"])]
    return dict(label=spec["label"], lr=spec["lr"], seed=spec["seed"], identity=spec["identity"], seconds=seconds,
                diverged=diverged, final_val=evals[-1]["val_loss"] if evals else None,
                evals=[[e["step"], e["tokens"], e["train_loss"], e["val_loss"]] for e in evals], routing=routing)


def read_result(spec):
    try:
        r = json.loads((Path(spec["dir"]) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return r if r.get("identity") == spec["identity"] else None


def claim(run_dir):
    """Claim a run: an open file holding an exclusive lock on run_dir/claim.lock, or None when another
    process holds it. The kernel drops the lock when every holder has exited, so a claim never outlives a
    killed command. A file system that cannot lock files (ENOLCK: some network file systems) is a UserError:
    read as "held", every run would be waited for forever."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    f = open(Path(run_dir) / "claim.lock", "a")
    try:
        try_lock(f)
    except OSError as e:
        f.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):      # another process holds the lock
            return None
        raise UserError(f"cannot lock {f.name} ({e.strerror or e}): the file system of the out_dir cannot lock "
                        "files; use a --out_dir on a local disk") from None
    return f


class Progress:
    """Counts finished runs of a command and prints each with the elapsed time and an ETA."""

    def __init__(self, total, jobs):
        self.total, self.jobs, self.done, self.ran, self.t0 = total, jobs, 0, [], time.time()

    def skip(self, n):
        self.done += n

    def finished(self, spec, result):
        self.done += 1
        self.ran.append(result["seconds"])
        eta = statistics.fmean(self.ran) * (self.total - self.done) / self.jobs
        val = "diverged" if result["diverged"] else f"val {result['final_val']:.4f}"
        print(f"  [{self.done}/{self.total}] {spec['label']:16s} lr {spec['lr']:<8g} seed {spec['seed']}: {val} "
              f"({result['seconds']:.0f} s) | elapsed {fmt_duration(time.time() - self.t0)}, ETA {fmt_duration(eta)}",
              flush=True)


def launch(spec, env, log, claim_file, resume=False):
    """Start one train.py run (a Popen), afresh or resuming its checkpoint. The child inherits the claim, so it
    stays claimed while the run lives even if this command is killed. The tests replace this with an in-process
    stand-in."""
    if sha256_of(REPO / f for f in CODE_FILES) != spec["identity"]["code_sha256"]:
        # a run must be made by the code its identity names: uoe.py or train.py was edited meanwhile
        raise UserError(f"{' or '.join(CODE_FILES)} changed while this command ran; the finished runs are kept "
                        "under the old code's identity: run the command again to train the rest with the new code")
    fds = (claim_file.fileno(),) if os.name == "posix" else ()
    return subprocess.Popen(train_command(spec, resume), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                            pass_fds=fds)


def run_all(specs, args, progress):
    """Run every spec that has no result yet, args.jobs at a time; return [result per spec]. A run that
    another command has claimed is waited for; one with a checkpoint of its identity resumes from it. A run
    that ends in a non-finite loss is a result (diverged); any other failure stops all."""
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
    # running: (spec, Popen, log, claim, segment start time, seconds of the run's earlier segments, log offset)
    running, waiting, told, interrupted = [], [], set(), False
    try:
        while todo or running or waiting:
            todo[:0], waiting = waiting, []          # claimed elsewhere last time: look again, first
            while todo and len(running) < args.jobs:
                s = todo.pop(0)
                c = claim(s["dir"])
                if c is None:                        # another command is running it: wait for its result
                    waiting.append(s)
                    if s["dir"] not in told:
                        told.add(s["dir"])
                        print(f"  waiting for {Path(s['dir']).name}: another command is running it", flush=True)
                    continue
                r = read_result(s)                   # finished meanwhile by another command
                if r is not None:
                    c.close()
                    results[s["dir"]] = r
                    progress.skip(1)
                    continue
                try:
                    step = resume_step(s)
                    if step is not None:
                        print(f"  resuming {Path(s['dir']).name} at step {step}", flush=True)
                    log = open(Path(s["dir"]) / "train.log", "w" if step is None else "a")
                except BaseException:
                    c.close()
                    raise
                try:
                    log_start = log.tell()           # a resumed segment's output follows the earlier ones'
                    seconds, t0 = start_segment(s, step)
                    p = launch(s, env, log, c, resume=step is not None)
                except BaseException:                # not started: release what it would have held
                    log.close()
                    c.close()
                    raise
                running.append((s, p, log, c, t0, seconds, log_start))
            finished = [r for r in running if r[1].poll() is not None]
            if not finished:
                time.sleep(0.2)
            for item in finished:
                running.remove(item)
                s, p, log, c, t0, seconds, log_start = item
                log.close()
                try:
                    seconds = end_segment(s, seconds, t0)
                    results[s["dir"]] = finish_run(s, p.returncode, seconds, log_start)
                finally:
                    c.close()                        # the result is written (or the run failed): release the claim
                progress.finished(s, results[s["dir"]])
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        stop_runs(running, interrupted)
    return [results[s["dir"]] for s in specs]


STOP_GRACE = 30    # seconds a run that got the Ctrl-C too has to finish its step and save, before it is signalled
SIGNAL_SEEN = 2    # seconds a run that got the signal too has to say so in its log (train.py prints it at once)


def segment_log(spec, log_start):
    """The text of train.log that the running (or last) segment of spec's run wrote: from log_start on."""
    with open(Path(spec["dir"]) / "train.log", "rb") as f:
        f.seek(log_start)
        return f.read().decode(errors="replace")


def got_signal(spec, log_start):
    """Whether the running segment of spec's run has said that it got SIGINT/SIGTERM (train.py's line
    "SIGINT: stopping after this step to save a checkpoint ...")."""
    try:
        return re.search(r"SIG[A-Z]+: stopping after this step", segment_log(spec, log_start)) is not None
    except OSError:
        return False


def stop_runs(running, interrupted):
    """Interrupted or failed: stop our own runs, each saving a checkpoint to resume (train.py saves on
    SIGINT/SIGTERM after its current step), and record their segments' time. Ctrl-C in a terminal (or a kill
    of the whole process group) reaches the runs too, and a second signal would make train.py quit at once
    without saving: so after an interrupt a run that says it got the signal gets STOP_GRACE seconds to exit on
    its own, and one that does not (the signal was for this command alone: kill PID) is passed it now. A run
    that finished meanwhile (exit 0) gets its result, rather than being resumed by the next command."""
    alive = [item for item in running if item[1].poll() is None]
    if interrupted and alive:
        time.sleep(SIGNAL_SEEN)
        for s, p, *_, log_start in alive:
            if p.poll() is None and not got_signal(s, log_start):
                p.terminate()
        print(f"  waiting up to {STOP_GRACE} s for {len(alive)} run(s) to save a checkpoint", file=sys.stderr,
              flush=True)
        deadline = time.time() + STOP_GRACE
        for item in alive:
            try:
                item[1].wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
    for s, p, log, c, t0, seconds, log_start in running:
        try:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            seconds = end_segment(s, seconds, t0)
            if p.returncode == 0:
                finish_run(s, 0, seconds, log_start)
        except (OSError, ValueError):
            pass            # state.json not updated: the next resume counts this segment up to its last checkpoint
        finally:
            log.close()
            c.close()


class Stopped(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM (most often: a Ctrl-C or kill that reached the runs but not this
    command): the command stops as if interrupted, and the next one resumes the run."""


STOP_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM)   # train.py's; killed


def stopped_line(spec, returncode, text):
    """The line for a run that a signal stopped (train.py exits 128 + signal after saving a checkpoint; a process
    killed by one before its handler was set exits -signal), else None."""
    if returncode not in STOP_CODES:
        return None
    m = re.search(r"stopped by SIG[A-Z]+ at step (\d+)", text)
    where = f"saved at step {m[1]}" if m and (Path(spec["dir"]) / "train" / "ckpt.pt").exists() else \
        f"stopped by a signal (exit {returncode}) before it saved a checkpoint"
    return f"{Path(spec['dir']).name} {where}; rerun the command to continue"


def finish_run(spec, returncode, seconds, log_start=0):
    """A run's result.json from its exit code and the log of its last segment (train.log from log_start); a
    run stopped by a signal raises Stopped, any other failure but divergence a UserError. Its checkpoint is
    deleted once the result is written."""
    text = segment_log(spec, log_start)
    diverged = returncode == 2 and "non-finite loss" in text
    stopped = stopped_line(spec, returncode, text)
    if stopped:
        raise Stopped(stopped)
    if returncode != 0 and not diverged:
        last = ([line for line in text.splitlines() if line.strip()] or ["(no output)"])[-1]
        raise UserError(f"train.py failed for {spec['label']} lr {spec['lr']:g} seed {spec['seed']} "
                        f"(exit {returncode}): {last.removeprefix('error: ')} "
                        f"[log: {Path(spec['dir']) / 'train.log'}]")
    r = run_result(spec, seconds, diverged)
    write_json(Path(spec["dir"]) / "result.json", r, quiet=True)
    (Path(spec["dir"]) / "train" / "ckpt.pt").unlink(missing_ok=True)   # keep the disk small
    return r


def describe(config, base):
    total, active = param_counts(config)
    return dict(config=asdict(config), expert_hidden=config.expert_hidden, n_routing=config.n_routing,
                params_total=total, params_active=active, fwd_flops_per_token=flops_per_token(config),
                flop_mismatch=flops_per_token(config) / flops_per_token(base) - 1)


def seed_summary(specs, done):
    """Of the runs of specs ({run dir: result} in done): per-seed finals {seed: val or None}, mean ± std over
    the seeds that did not diverge, curves, and the run folders."""
    finals = {s["seed"]: done[s["dir"]]["final_val"] for s in specs}
    ok = [v for v in finals.values() if v is not None]
    m, sd = mean_std(ok) if ok else (None, None)
    return dict(val_per_seed=finals, val_mean=m, val_std=sd, n_seeds=len(ok),
                curves={s["seed"]: done[s["dir"]]["evals"] for s in specs}, runs=[Path(s["dir"]).name for s in specs])


def settings(args, base):
    """What a command's JSON says about how it ran."""
    return dict(preset=args.preset, dataset=args.dataset, steps=args.steps, batch_size=args.batch_size,
                block_size=base.block_size, tokens=args.steps * args.batch_size * base.block_size,
                seeds=args.seeds, recipe=recipe(args), fingerprint=args.fingerprint, device=args.device,
                dtype=args.dtype, compile=args.compile, machine=device_name(args.device), threads=args.threads,
                jobs=args.jobs, base_config=asdict(base), multiple_of=args.multiple_of)


def budget(st):
    """The budget and the set-up, in words, from settings()."""
    b = st["base_config"]
    return (f"UoE {b['n_layer']} x {b['n_embd']}, E={b['n_expert']}, K={b['top_k']}, D={b['expert_hidden']}, "
            f"block {b['block_size']}, batch {st['batch_size']}; {st['steps']} steps = {st['tokens'] / 1e6:.2f}M "
            f"tokens of {st['dataset']}, warmup {st['recipe']['warmup_iters']}, cosine to lr/10; reported seeds "
            f"0..{st['seeds'] - 1}; {st['device']} {st['dtype']} {st['compile']}; {st['jobs']} run(s) at a time on "
            f"{st['threads'] or 'all'} thread(s) each, {st['machine']}")


def run_specs(specs, args, progress=None):
    """run_all over a dict of spec lists, seeds interleaved across its keys; returns {run dir: result}."""
    flat = [x[i] for i in range(max(map(len, specs.values()))) for x in specs.values() if i < len(x)]
    return {s["dir"]: r for s, r in zip(flat, run_all(flat, args, progress or Progress(len(flat), args.jobs)))}


# -----------------------------------------------------------------------------
# the commands

def quality(args):
    base = prepare(args)
    configs = variant_configs(base, args.variants, args.multiple_of)
    print(f"# study.py quality --preset {args.preset}: {budget(settings(args, base))}; lr sweep on held-out "
          f"seed(s) {sweep_seeds(args)}", flush=True)
    t0 = time.time()
    sweep = {v: [run_spec(v, configs[v], lr, s, args, "sweep") for lr in args.lrs for s in sweep_seeds(args)]
             for v in args.variants}
    progress = Progress(len(args.variants) * (len(args.lrs) * args.sweep_seeds + args.seeds), args.jobs)
    done = run_specs(sweep, args, progress)
    rows, best = {}, {}
    for v in args.variants:
        per_lr = {lr: [done[s["dir"]]["final_val"] for s in sweep[v] if s["lr"] == lr] for lr in args.lrs}
        vals = {lr: None if None in x else statistics.fmean(x) for lr, x in per_lr.items()}
        best[v] = best_lr(vals)
        if best[v] is None:
            raise UserError(f"{v} diverged at every learning rate of the sweep; give lower --lrs")
        rows[v] = dict(describe(configs[v], base), sweep={str(lr): x for lr, x in vals.items()}, best_lr=best[v],
                       best_at_edge=len(args.lrs) > 1 and best[v] in (min(args.lrs), max(args.lrs)),
                       sweep_runs=[Path(s["dir"]).name for s in sweep[v]])
    specs = {v: [run_spec(v, configs[v], best[v], s, args) for s in range(args.seeds)] for v in args.variants}
    done = run_specs(specs, args, progress)
    for v in args.variants:
        rows[v].update(seed_summary(specs[v], done))
    comparisons = {f"{a} − {b}": paired_difference(rows[a]["val_per_seed"], rows[b]["val_per_seed"])
                   for a, b in COMPARISONS if a in rows and b in rows}
    runs = sum(len(x) for x in [*sweep.values(), *specs.values()])
    # run_seconds: the mean over the reported runs (done holds those alone); the report says so
    result = dict(command="quality", **settings(args, base), lrs=args.lrs, sweep_seeds=sweep_seeds(args),
                  best_lr=best, variants=rows, comparisons=comparisons, runs=runs, seconds=time.time() - t0,
                  run_seconds=statistics.fmean(r["seconds"] for r in done.values()))
    return report(result, quality_table, args, lambda res, path: plot_budgets([res], path))


def sweep_seeds(args):
    return list(range(SWEEP_SEED, SWEEP_SEED + args.sweep_seeds))


def pick_lr(args, variant, base):
    """(lr, where it came from): --lr, else the variant's best lr from this preset's quality JSON when that
    study used the same recipe, model, code and corpus, else the preset's default."""
    if args.lr is not None:
        return args.lr, "--lr"
    try:
        q = json.loads((Path(args.out_dir) / f"quality_{args.preset}.json").read_text())
    except (OSError, ValueError):
        q = {}
    if (q.get("recipe"), q.get("base_config"), q.get("fingerprint")) == (recipe(args), asdict(base),
                                                                          args.fingerprint):
        lr = q.get("best_lr", {}).get(variant)
        if lr is not None:
            return lr, f"best lr of study.py quality (held-out seeds {q['sweep_seeds']})"
    return (PRESETS[args.preset]["default_lr"],
            f"preset default (no matching quality_{args.preset}.json; run quality first or give --lr)")


def ablate(args):
    base = prepare(args)
    base = variant_configs(base, ["uoe"], args.multiple_of)["uoe"]     # the exact UoE of quality
    lr, source = pick_lr(args, "uoe", base)
    print(f"# study.py ablate --preset {args.preset}: {budget(settings(args, base))}; lr {lr:g} ({source})",
          flush=True)
    t0 = time.time()
    configs = {a: ablation_config(base, a) for a in args.ablations}
    specs = {a: [run_spec("uoe" if a == "uoe" else f"uoe:{a}", c, lr, s, args) for s in range(args.seeds)]
             for a, c in configs.items()}
    done = run_specs(specs, args)
    rows = {a: dict(describe(c, base), changes={k: getattr(c, k) for k in ABLATIONS[a]},
                    **seed_summary(specs[a], done))
            for a, c in configs.items()}
    for a, r in rows.items():
        r["diff_vs_uoe"] = (paired_difference(r["val_per_seed"], rows["uoe"]["val_per_seed"])
                            if "uoe" in rows and a != "uoe" else None)
    result = dict(command="ablate", **settings(args, base), lr=lr, lr_source=source, ablations=rows,
                  seconds=time.time() - t0)
    return report(result, ablate_table, args)


def balance(args):
    base = prepare(args)
    configs = variant_configs(base, args.variants, args.multiple_of)
    lrs = {v: pick_lr(args, v, base) for v in args.variants}
    print(f"# study.py balance --preset {args.preset}: {budget(settings(args, base))}; lr "
          + ", ".join(f"{v} {lr:g} ({src})" for v, (lr, src) in lrs.items()), flush=True)
    t0 = time.time()
    specs = {(v, coef): [run_spec(f"{v}:aux{coef:g}", replace(configs[v], aux_loss_coef=coef), lrs[v][0], s, args)
                         for s in range(args.seeds)] for coef in args.aux for v in args.variants}
    done = run_specs(specs, args)
    # per seed and layer: Ent_load, max and min load over the last 10% of training
    ent = {key: {s["seed"]: ent_load_summary(done[s["dir"]]["routing"], args.steps)
                 for s in ss if done[s["dir"]]["routing"]} for key, ss in specs.items()}
    rows = []
    for (v, coef), per_seed in ent.items():
        finals = [done[s["dir"]]["final_val"] for s in specs[(v, coef)] if done[s["dir"]]["final_val"] is not None]
        for layer in range(base.n_layer if per_seed else 0):
            stat = {k: [p[layer][k] for p in per_seed.values()] for k in ("ent_load", "max_load", "min_load")}
            rows.append(dict(variant=v, aux_loss_coef=coef, layer=layer, lr=lrs[v][0], seeds=len(per_seed),
                             **{k: mean_std(x) for k, x in stat.items()},
                             val=mean_std(finals) if finals else (None, None), val_seeds=len(finals),
                             max_over_min=load_ratio(stat["max_load"], stat["min_load"])))
    first = args.variants[0]                         # paired by seed: each variant minus the first (uoe - moe)
    ent_diffs = [dict(variant=v, versus=first, aux_loss_coef=coef, layer=layer,
                      **paired_difference({k: e[layer]["ent_load"] for k, e in ent[(v, coef)].items()},
                                          {k: e[layer]["ent_load"] for k, e in ent[(first, coef)].items()}))
                 for coef in args.aux for v in args.variants[1:] for layer in range(base.n_layer)
                 if ent[(v, coef)] and ent[(first, coef)]]
    curves = {f"{v}:aux{coef:g}": [done[s["dir"]]["routing"] for s in ss] for (v, coef), ss in specs.items()}
    result = dict(command="balance", **settings(args, base), aux=args.aux, lr={v: x[0] for v, x in lrs.items()},
                  configs={v: describe(c, base) for v, c in configs.items()}, rows=rows, ent_load_diffs=ent_diffs,
                  curves=curves, ent_load_max=math.log(base.n_expert), seconds=time.time() - t0)
    return report(result, balance_table, args, plot_balance)


def report(result, table, args, plot=None):
    """A command's end: print its table, draw its figure (unless --plot off), write its JSON."""
    print()
    print(table(result))
    if plot is not None and args.plot == "on":
        result["figure"] = plot(result, Path(args.json).with_suffix(".png"))
    write_json(args.json, result)
    return result


def read_study_json(path, preset):
    """A command's JSON (a dict), or None when there is none; one that cannot be read is a UserError."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        command = path.name.split("_")[0]
        raise UserError(f"cannot read {path} ({e}); delete it and run python study.py {command} --preset {preset} "
                        f"--out_dir {path.parent} again to rewrite it (its finished runs are reused)") from None
    return obj


def fingerprint_words(fp):
    return (f"code {fp['code_sha256'][:8]} (sha256 of {' + '.join(CODE_FILES)}), corpus {fp['data_sha256'][:8]} "
            f"(sha256 of train.bin + val.bin), torch {fp['torch']}")


def code_warnings(docs, now):
    """One line per kind of mismatch of code fingerprints among docs ({name: a command's JSON}): between them, and
    against the code now (`now`, its sha256)."""
    codes = {name: d["fingerprint"]["code_sha256"] for name, d in docs.items()}
    lines = []
    if len(set(codes.values())) > 1:
        lines.append("**Warning**: these results were made with different code (" +
                     ", ".join(f"{name}: {c[:8]}" for name, c in codes.items()) + "): a difference between them "
                     "may be the code's")
    stale = [name for name, c in codes.items() if c != now]
    if stale:
        lines.append(f"**Warning**: {', '.join(stale)} {'was' if len(stale) == 1 else 'were'} made with other code "
                     f"than {' + '.join(CODE_FILES)} now ({now[:8]}); rerun the command(s) to bring them up to date")
    return lines


def study_report(args):
    """The budgets asked for, in one document: headline sentences, tables and one figure, for RESULTS.md. A
    budget whose quality JSON is missing gets a line saying so; one that cannot be read stops the report."""
    found, missing = {}, []
    for p in args.presets:
        q = read_study_json(Path(args.out_dir) / f"quality_{p}.json", p)
        if q is None:
            missing.append(p)
        else:
            found[p] = q
    if not found:
        raise UserError(f"no quality_<preset>.json in {args.out_dir}; run python study.py quality --preset "
                        f"{args.presets[0]} first")
    ablations = {p: a for p in found if (a := read_study_json(Path(args.out_dir) / f"ablate_{p}.json", p))}
    names = [f"`{p}`" for p in found]
    lines = [f"# Does UoE beat MoE? The study at budget{'s' if len(names) > 1 else ''} "
             f"{', '.join(names[:-1]) + ' and ' if len(names) > 1 else ''}{names[-1]}", ""]
    lines += [f"- budget `{p}`: no quality_{p}.json in {args.out_dir} (not run, or its command has not finished)"
              for p in missing]
    now = sha256_of(REPO / f for f in CODE_FILES)
    docs = {**{f"quality_{p}.json": q for p, q in found.items()},
            **{f"ablate_{p}.json": a for p, a in ablations.items()}}
    lines += [f"- {w}" for w in code_warnings(docs, now)]
    if lines[-1]:
        lines.append("")
    headline = {}
    for p, q in found.items():
        headline[p] = {k: q["comparisons"][k] for k in ("uoe − moe", "moe − dense") if k in q["comparisons"]}
        reported = sum(len(r["val_per_seed"]) for r in q["variants"].values())
        lines += [f"## Budget `{p}`: {budget(q)}; lr chosen on held-out seed(s) {q['sweep_seeds']}; {q['runs']} runs "
                  f"({q['runs'] - reported} sweep, {reported} reported), {fmt_duration(q['run_seconds'])} per "
                  "reported run (mean)", "", f"Made with {fingerprint_words(q['fingerprint'])}.", ""]
        lines += [f"- {sentence(k, d, q)}" for k, d in headline[p].items()]
        named = {v for k in headline[p] for v in k.split(" − ")}
        others = [v for v, r in q["variants"].items() if r["best_at_edge"] and v not in named]
        if others:
            lines.append(f"- Caveat: {edge_words(q, others)}.")
        lines += ["", quality_table(q), ""]
        if p in ablations:
            lines += [ablate_table(ablations[p]), ""]
    out = Path(args.out_dir) / "study_report"
    figure = plot_budgets(list(found.values()), out.with_suffix(".png")) if args.plot == "on" else None
    if figure:
        lines += [f"![validation loss against tokens at each budget]({Path(figure).name})", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    write_json(out.with_suffix(".json"), dict(headline=headline, budgets=found, missing=missing,
                                              code_sha256_now=now, figure=figure))
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')}")


def seed_counts(r):
    """(seeds that did not diverge, runs) of a variant's summary (seed_summary's val_per_seed)."""
    vals = list(r["val_per_seed"].values())
    return sum(v is not None for v in vals), len(vals)


def fmt_seeds(r):
    n, runs = seed_counts(r)
    return f"{n}" if n == runs else f"{n} ({runs - n} of {runs} diverged)"


def edge_words(q, variants):
    """The variants' chosen lrs at the edge of q's sweep, in words."""
    lrs = {lr: "highest" if lr == max(q["lrs"]) else "lowest" for lr in q["lrs"]}
    return ("the best lr is at the edge of the sweep for " + ", ".join(
        f"{v} ({q['variants'][v]['best_lr']:g}, its {lrs[q['variants'][v]['best_lr']]})" for v in variants)
        + "; a wider --lrs may find a better one")


def sentence(name, d, q=None):
    """One sentence: a paired difference with its interval and its verdict; with q (the quality result it is
    from), what may qualify it: its variants' diverged runs, a chosen lr at the edge of the sweep."""
    a, b = name.split(" − ")
    if d["ci"] is None:
        out = f"**{name}** = {fmt_pm(d['mean'], None)} over {d['n']} seed(s): no interval."
    else:
        out = f"**{name}** = {d['mean']:+.4f} (95% CI {fmt_ci(d)}, {d['n']} paired seeds): {verdict(d, a, b)}."
    if q is None:
        return out
    rows = {v: q["variants"][v] for v in (a, b) if v in q["variants"]}
    diverged = [f"{runs - n} of {runs} {v} runs diverged (left out of the pairs)"
                for v, r in rows.items() for n, runs in [seed_counts(r)] if n < runs]
    if diverged:
        out += f" Diverged: {'; '.join(diverged)}."
    edge = [v for v, r in rows.items() if r["best_at_edge"]]
    if edge:
        out += f" Caveat: {edge_words(q, edge)}."
    return out


# -----------------------------------------------------------------------------
# tables and figures

DIVERGED_POLICY = ("a run that diverged (non-finite loss) is left out of the mean and of the paired differences, "
                   "and counted (seeds: \"n (k of N diverged)\")")


def paired_table(comparisons):
    lines = ["| comparison | paired difference of final val loss ± SE | 95% CI (t, n − 1) | pairs (n) | verdict |",
             "|---|---:|---:|---:|---|"]
    for name, d in comparisons.items():
        a, b = name.split(" − ")
        lines.append(f"| {name} | {fmt_pm(d['mean'], d['se'])} | {fmt_ci(d)} | {d['n']} | {verdict(d, a, b)} |")
    return lines


def quality_table(res):
    lrs = res["lrs"]
    lines = [f"Quality at matched active FLOPs per token: {res['dataset']}, {res['steps']} steps, "
             f"{res['tokens'] / 1e6:.2f}M tokens; the sweep: val loss at each lr on held-out seed(s) "
             f"{res['sweep_seeds']} (mean), never reported; then reported seeds 0..{res['seeds'] - 1}, each trained "
             f"afresh at the variant's best lr: val loss mean ± std over its n seeds; {DIVERGED_POLICY}", "",
             "| variant | D | total params | active params | fwd MFLOP/tok | FLOPs vs UoE | "
             + " | ".join(f"sweep lr {lr:g}" for lr in lrs) + " | best lr | val loss | seeds |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(lrs) + "---:|---:|---:|"]
    for v, r in res["variants"].items():
        sweep = " | ".join("diverged" if r["sweep"][str(lr)] is None else f"{r['sweep'][str(lr)]:.4f}" for lr in lrs)
        lines.append(f"| {v} | {r['expert_hidden']} | {r['params_total'] / 1e6:.3f}M | "
                     f"{r['params_active'] / 1e6:.3f}M | {r['fwd_flops_per_token'] / 1e6:.3f} | "
                     f"{r['flop_mismatch']:+.2%} | {sweep} | {r['best_lr']:g}{' (edge)' if r['best_at_edge'] else ''}"
                     f" | {fmt_pm(r['val_mean'], r['val_std'], n=seed_counts(r)[0])} | {fmt_seeds(r)} |")
    lines += ["", *paired_table(res["comparisons"])]
    if any(r["best_at_edge"] for r in res["variants"].values()):
        lines += ["", "(edge): the best lr is at the edge of the sweep; a wider --lrs may find a better one"]
    return "\n".join(lines)


def ablate_table(res):
    lines = [f"UoE ablations: {res['dataset']}, {res['steps']} steps, {res['tokens'] / 1e6:.2f}M tokens, "
             f"lr {res['lr']:g} ({res['lr_source']}); same D as UoE; val loss mean ± std over the n seeds of seeds "
             f"0..{res['seeds'] - 1}; difference to the full UoE paired by seed; {DIVERGED_POLICY}", "",
             "| ablation | change | n_routing | fwd MFLOP/tok | FLOPs vs UoE | total params | val loss | seeds | "
             "− UoE ± SE | 95% CI | pairs (n) | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a, r in res["ablations"].items():
        d = r["diff_vs_uoe"] or dict(mean=None, se=None, n="")
        change = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(full UoE)"
        lines.append(f"| {a} | {change} | {r['n_routing']} | {r['fwd_flops_per_token'] / 1e6:.3f} | "
                     f"{r['flop_mismatch']:+.1%} | {r['params_total'] / 1e6:.3f}M | "
                     f"{fmt_pm(r['val_mean'], r['val_std'], n=seed_counts(r)[0])} | {fmt_seeds(r)} | "
                     f"{fmt_pm(d['mean'], d['se'])} | {fmt_ci(d)} | {d['n']} | "
                     f"{verdict(d, a, 'uoe') if r['diff_vs_uoe'] else ''} |")
    return "\n".join(lines)


def balance_table(res):
    lines = [f"Load balance: {res['dataset']}, {res['steps']} steps; routing of the training batches over the last "
             f"10% of steps, mean ± std over the seeds (n) of seeds 0..{res['seeds'] - 1} that did not diverge; "
             f"Ent_load is at most "
             f"ln E = {res['ent_load_max']:.3f}, a load of 1/E = {1 / res['base_config']['n_expert']:.3f} per "
             "expert is perfect balance; max / min is the mean max load over the mean min load (\"no tokens\": the "
             "least-loaded expert got none)", "",
             "| variant | aux_loss_coef | layer | Ent_load | max load | min load | max / min | val loss | n |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        n = r["seeds"]
        ratio = "no tokens" if r["max_over_min"] is None else f"{r['max_over_min']:.1f}"
        lines.append(f"| {r['variant']} | {r['aux_loss_coef']:g} | {r['layer']} | {fmt_pm(*r['ent_load'], 3, n)} | "
                     f"{fmt_pm(*r['max_load'], 3, n)} | {fmt_pm(*r['min_load'], 3, n)} | {ratio} | "
                     f"{fmt_pm(*r['val'], n=r.get('val_seeds', n))} | {n} |")
    if res["ent_load_diffs"]:
        lines += ["", "| Ent_load, paired by seed | aux_loss_coef | layer | difference ± SE | 95% CI | seeds |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {d['variant']} − {d['versus']} | {d['aux_loss_coef']:g} | {d['layer']} | "
                  f"{fmt_pm(d['mean'], d['se'], 3)} | {fmt_ci(d, 3)} | {d['n']} |" for d in res["ent_load_diffs"]]
    return "\n".join(lines)


def new_figure(w, h):
    """plot.py's figure (no pyplot: no global state to close); imported here, when a figure is drawn."""
    import plot
    return plot.new_figure(w, h)


def save_figure(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
    return str(path)


# a variant's colour is fixed by its place in VARIANTS, so that it is the same in every figure and budget; the
# differences are drawn in black and grey, which no variant has: (line, band), the bands shaded and hatched
VARIANT_COLOURS = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
DIFF_STYLES = {COMPARISONS[0]: (dict(color="k", ls="-"), dict(color="k", alpha=0.12, lw=0)),
               COMPARISONS[1]: (dict(color="0.5", ls="--"), dict(facecolor="none", edgecolor="0.6", hatch="///", lw=0))}


def plot_budgets(results, path):
    """One row per budget (a quality result): val loss against tokens per variant (mean over the reported
    seeds); UoE − MoE and MoE − dense over training, paired by seed, with their 95% t intervals as bands."""
    fig = new_figure(12, 4.4 * len(results))
    axes = fig.subplots(len(results), 2, squeeze=False)
    for (ax, ax2), res in zip(axes, results):
        for v, r in res["variants"].items():
            curves = [c for c in r["curves"].values() if c]
            n = min(map(len, curves), default=0)
            tok = [curves[0][j][1] / 1e6 for j in range(1, n)]
            val = [statistics.fmean(c[j][3] for c in curves) for j in range(1, n)]
            k = seed_counts(r)[0]
            final = "–" if r["val_mean"] is None else f"{r['val_mean']:.3f}" + (
                f" (std {r['val_std']:.3f}, n={k})" if k > 1 else f" (n={k})")
            ax.plot(tok, val, marker="o", ms=3, color=VARIANT_COLOURS[v],
                    label=f"{v} (D={r['expert_hidden']}, lr {r['best_lr']:g}): {final}")
        ax.set(xlabel="tokens seen (M)", ylabel="validation loss (nats/token)",
               title=f"{res['preset']}: {res['base_config']['n_layer']} x {res['base_config']['n_embd']}, "
                     f"{res['dataset']}, matched active FLOPs; mean over seeds")
        for a, b in COMPARISONS[:2]:
            if a not in res["variants"] or b not in res["variants"]:
                continue
            g = gap_curve(res["variants"][a]["curves"], res["variants"][b]["curves"])[1:]
            g = [x for x in g if x[2] is not None]                    # an interval needs 2 seeds
            if g:
                x, m, half = zip(*g)
                x = [t / 1e6 for t in x]
                line, band = DIFF_STYLES[(a, b)]
                ax2.plot(x, m, marker="o", ms=3, label=f"{a} − {b}", **line)
                ax2.fill_between(x, [p - h for p, h in zip(m, half)], [p + h for p, h in zip(m, half)], **band)
        ax2.axhline(0, color="k", lw=0.6, ls=":")
        ax2.set(xlabel="tokens seen (M)", ylabel="validation loss difference (nats/token)",
                title="paired differences, band: 95% CI (below 0: the first is better)")
        for axis in (ax, ax2):
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8)
    return save_figure(fig, path)


def plot_balance(res, path):
    """Ent_load against step, per layer, for each variant and aux coefficient (mean over seeds)."""
    n_layer = res["base_config"]["n_layer"]
    fig = new_figure(5 * n_layer, 4)
    axes = fig.subplots(1, n_layer, squeeze=False, sharey=True)
    for layer, ax in enumerate(axes[0]):
        for name, runs in res["curves"].items():
            runs = [r for r in runs if r]
            if not runs:
                continue
            n = min(len(r) for r in runs)
            ent = [statistics.fmean(r[j][1][layer] for r in runs) for j in range(n)]
            variant, aux = name.split(":aux")
            ax.plot([runs[0][j][0] for j in range(n)], ent, color=VARIANT_COLOURS.get(variant),
                    ls="-" if float(aux) == 0 else "--", label=f"{variant}, aux_loss_coef {aux}")
        ax.axhline(res["ent_load_max"], color="k", lw=0.8, ls=":")
        ax.set(title=f"layer {layer}", xlabel="step", ylabel="Ent_load (training batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# command line

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
    if 0 in vals:
        raise argparse.ArgumentTypeError(f"{s!r} must be positive numbers")
    return vals


def preset_list(s):
    return variant_list(s, tuple(PRESETS))


# Run times, measured: the CPU time of one UoE and one MoE run on one thread, at 100 and at 200 steps (each 100
# steps with its eval), extrapolated as T(100) + (steps/100 - 1) (T(200) - T(100)); on a core with nothing else
# to do that is its wall time (the wall time here, on 2 cores shared at a load of 3-7, was 1.6-3.8 times it).
HELP = {
    "quality": "val loss of dense, MoE, MoE + shared expert, (AoE) and UoE at matched active FLOPs: a learning-"
               "rate sweep on held-out seed 1000, then every reported seed afresh at each variant's best lr; "
               "paired differences with 95% t intervals. Preset cpu: 45 runs (5 variants x (4 lrs + 5 seeds)) of "
               "40 (MoE) to 50 s (UoE) each on one core: about 17 min, 2 at a time on 2 idle cores. Preset train: "
               "40 runs (4 x (5 + 5)) of 11.5 (UoE) to 14 min (MoE) each: about 4.5 h on 2 idle cores. On a "
               "shared machine, 2-3 times that",
    "ablate": "the paper's UoE ablations (no VSE, output twice, score pre/swiglu, norm 1/inf, n_routing halved/"
              "doubled) against the full UoE, paired by seed, at UoE's best lr from quality; cpu: 45 runs of about "
              "50 s (the 5 full-UoE ones are quality's when it ran first)",
    "balance": "expert load of UoE and MoE without the load-balancing loss (and with it, for reference); cpu: "
               "20 runs of about 50 s (10 are quality's when it ran first)",
    "report": "the budgets of --presets (default cpu,train) in one document, each with the code, corpus and torch it "
              "was made with: OUT_DIR/study_report.md (headline sentences, tables), .json and .png "
              "(val loss against tokens, UoE − MoE and MoE − dense over training with 95% bands)",
}
EPILOG = """Every run is `python train.py --key=value ...` (the same recipe as a run you start yourself), run in
a subprocess with its own folder under OUT_DIR/runs/ and its result written there as soon as it
finishes: interrupt at any time (Ctrl-C, or SIGTERM) and rerun the same command to continue;
finished runs are skipped, a run cut short resumes from its last checkpoint (saved every
eval_interval steps, and on the interrupt), and --seeds N with a larger N adds seeds. Seeds are
paired across variants: seed s gives every variant the same batches in the same order, the same
evaluation batches, and the same initial embeddings and first attention layer.
Presets: cpu (2 x 64, E=8, K=2, UoE D=128, block 128, batch 16, 500 steps = 1.0M tokens of
pystdlib_char); train (python train.py's defaults: 4 x 128, E=8, K=2, D=256, block 256, batch 16,
1000 steps = 4.1M tokens of pystdlib_char); both run 2 runs at a time on 1 thread each. gpu (8 x 512,
block 512, batch 16, 1500 steps = 12.3M GPT-2 BPE tokens of pystdlib; bf16, compiled, widths multiples
of 64) runs one model at a time."""


def build_parser():
    p = Parser(prog="study.py", description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="command", metavar="{quality,ablate,balance,report}", parser_class=Parser)
    for name in ("quality", "ablate", "balance", "report"):
        s = sub.add_parser(name, help=HELP[name].replace("%", "%%"), description=textwrap.fill(HELP[name], 100),
                           epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--out_dir", default="bench_out")
        s.add_argument("--plot", choices=("on", "off"), default="on")
        if name == "report":
            s.add_argument("--presets", type=preset_list, default=["cpu", "train"], help="the budgets, in order")
            continue
        s.add_argument("--preset", choices=tuple(PRESETS), default="cpu", help="the budget (see below)")
        if name == "quality":
            s.add_argument("--variants", type=lambda x: variant_list(x, tuple(VARIANTS)),
                           help=f"comma-separated, of {','.join(VARIANTS)} (cpu: all; train, gpu: all but aoe)")
            s.add_argument("--lrs", type=positive_float_list, help="learning rates of the sweep, comma-separated")
            s.add_argument("--sweep_seeds", type=positive_int, help="held-out seeds of the sweep (1000, ...)")
        elif name == "ablate":
            s.add_argument("--ablations", type=lambda x: variant_list(x, tuple(ABLATIONS)), default=list(ABLATIONS),
                           help=f"comma-separated, of {','.join(ABLATIONS)} (default all)")
        else:
            s.add_argument("--variants", type=variant_list, default=["moe", "uoe"], help="default moe,uoe")
            s.add_argument("--aux", type=float_list, default=[0.0, 0.01],
                           help="aux_loss_coef values (default 0,0.01: without and with the balance loss)")
        if name != "quality":
            s.add_argument("--lr", type=positive_float, help="peak learning rate (default: the best of study.py "
                           "quality from OUT_DIR/quality_<preset>.json if it used the same recipe, else the preset's)")
        for k in MODEL_KEYS + ("batch_size",):
            s.add_argument(f"--{k}", type=positive_int,
                           help="of UoE; the others' D is matched on FLOPs" if k == "expert_hidden" else None)
        s.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16 = autocast (CUDA)")
        s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        s.add_argument("--json", help=f"output JSON (default OUT_DIR/{name}_<preset>.json)")
        s.add_argument("--compile", choices=("eager", "compile"), help="train.py --compile (cpu presets: eager)")
        s.add_argument("--threads", type=positive_int, help="threads per run (OMP_NUM_THREADS; cpu presets: 1)")
        s.add_argument("--jobs", type=positive_int, help="runs at a time (cpu presets: 2, gpu: 1)")
        s.add_argument("--steps", type=positive_int, help="optimizer steps per run")
        s.add_argument("--warmup_steps", type=int, help="linear warmup steps, then cosine to lr/10")
        s.add_argument("--seeds", type=positive_int, help=f"reported seeds 0 .. N-1 (below {SWEEP_SEED})")
        s.add_argument("--eval_interval", type=positive_int)
        s.add_argument("--eval_iters", type=positive_int)
        s.add_argument("--log_interval", type=positive_int, help="routing statistics every this many steps")
        s.add_argument("--dataset", help="data/<name> (pystdlib_char and pystdlib are prepared if missing)")
        s.add_argument("--data_dir", default=str(REPO / "data"))
        s.add_argument("--multiple_of", type=positive_int, help="round matched widths to a multiple of this")
    return p


def parse_args(argv):
    """Parsed options with preset defaults filled in; raises UserError on bad input."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        raise UserError("no command; run python study.py quality, ablate, balance or report")
    if args.command == "report":
        return args
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UserError("--warmup_steps must be >= 0")
    if args.seeds is not None and args.seeds > SWEEP_SEED:
        raise UserError(f"--seeds must be <= {SWEEP_SEED}: seeds from {SWEEP_SEED} on are the sweep's")
    return settle(args, PRESETS[args.preset], f"{args.command}_{args.preset}.json")


INTERRUPTED = "interrupted: finished runs are kept; run the same command again to continue"


def main(argv=None):
    """The command line: 0 done, 2 a UserError (one line); stopped (one line): 130 on Ctrl-C or a run stopped by a
    signal, 143 on SIGTERM to this command (harness.cli). Either way our runs save a checkpoint and the same command
    continues."""
    code = {}

    def run(argv):
        args = parse_args(argv)
        try:
            dict(quality=quality, ablate=ablate, balance=balance, report=study_report)[args.command](args)
        except Stopped as e:
            print(f"stopped: {e}", file=sys.stderr)
            code["exit"] = 128 + signal.SIGINT

    rc = cli(run, sys.argv[1:] if argv is None else argv, interrupted=INTERRUPTED)
    return code.get("exit", rc)


if __name__ == "__main__":
    sys.exit(main())
