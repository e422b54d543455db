"""
The study: dense, MoE, MoE + shared expert, AoE and UoE at matched active FLOPs per token, every run made by
train.py, under a protocol declared before its runs (RESULTS.md §1). Does UoE beat MoE, and MoE with a shared
expert, and by how much, with intervals and verdicts a statistician would sign?

    python study.py quality                   # budget cpu: 2 x 64, 500 steps; 5 variants, seeds 0..7
    python study.py quality --preset train    # train.py's default model and length (4 x 128, 1000 steps), seeds 0..4
    python study.py ablate                    # the paper's 8 UoE ablations against the full UoE, each lr selected
    python study.py balance                   # expert load of moe and uoe without (and with) the aux loss
    python study.py report                    # results/*.json -> RESULTS.md §1's markdown and the README headline
    python study.py report --write            # ... written between the markers of RESULTS.md and README.md
    python study.py report --check            # exit 1 if the committed text differs from what the JSON gives
    python study.py quality --help            # sizes, what each command costs

Each command writes results/<command>_<preset>.json (committed: every published number is made from it),
rewritten atomically as each run finishes: the declared protocol, the budget, and per run its options,
fingerprints, machine, losses, eval curve and flags. The runs themselves (checkpoints, logs) go to --out_dir
(default bench_out/, not committed), one folder per train.py run under runs/, and the two halves of the corpus's
val.bin to OUT_DIR/data/.

The protocol (DESIGNS; `python study.py report` says it in brief with the results):
- Declared designs: a (command, preset) pair of DESIGNS fixes its variants, reported seeds, sweep seeds and lr
  grid. Any flag that changes the budget or the design (--seeds, --lrs, --steps, a size, ...) makes the command
  exploratory: its JSON is <command>_<preset>-exploratory.json (under OUT_DIR/results/ unless --results_dir),
  and every table made of it says so. A larger n is a new design, never an extension after looking.
- Selection held out in seeds and tokens: val.bin is split by position into a selection half (the first) and a
  report half. Each variant's lr is the grid rate with the lowest mean final selection-half loss over the sweep
  seeds (1000, 1001; a diverged sweep run makes its rate's mean +inf; ties go to the smaller rate); a rate at the
  grid's edge is flagged. Every reported seed (0, 1, ...) trains afresh at that rate and is scored on the report
  half. Each ablation gets its own selection.
- Comparisons: primary uoe − moe+shared and uoe − moe; secondary moe − dense, uoe − dense, moe+shared − dense,
  moe+shared − moe and uoe − aoe (where both ran). Per seed the difference of final report-half loss; the mean,
  its 95% CI from Student's t with n − 1 df, and the two-sided paired-t p; "decisive" only where the
  Holm-adjusted p within the command's family of comparisons is below 0.05.
- A diverged run (non-finite loss: train.py stops it) counts at ln(vocab_size), a uniform guess, in every mean
  and difference, and is named; a run that spikes or stalls is flagged, never dropped.
- Robustness: both variants of each primary pair also run every reported seed at the pair's two best common
  rates (runs already made are reused); reported seed 0 of each primary variant reruns on 2 threads ("machine").
- Run identity: a run's folder and result are keyed by its options, its role (sweep or not), its thread count,
  the CPU, torch's version and sha256 fingerprints of uoe.py + train.py and of the corpus half it is scored on.
  A run made by other code, on another split, CPU or thread count is rerun, never reused.
- A run in progress is claimed (an exclusive lock on runs/<run>/claim.lock, dropped by the kernel when its
  holder exits): another command sharing the out_dir waits for it instead of starting it again.
- A killed run resumes, exactly: train.py checkpoints every eval_interval steps (and on SIGINT/SIGTERM), and a
  run with a checkpoint but no result continues it (--init_from=resume restores weights, optimizer, RNGs and the
  batch order) if runs/<run>/state.json names the same identity. Its seconds are its wall time over all its
  segments.
"""
import argparse
import errno
import filecmp
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from harness import (REPO, Parser, cli, cpu_name, device_name, positive_float, positive_int, settle, variant_list,
                     write_blocks, write_json)
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
# the paired differences of `quality`, first minus second, where both variants ran. Primary: moe+shared is the
# fair comparator (matched on active FLOPs and close on total parameters; UoE's VSE is an always-on part too)
PRIMARY = (("uoe", "moe+shared"), ("uoe", "moe"))
SECONDARY = (("moe", "dense"), ("uoe", "dense"), ("moe+shared", "dense"), ("moe+shared", "moe"), ("uoe", "aoe"))
# the paper's ablations of UoE (Table 4), as GPTConfig changes of the full UoE; n_routing is scaled
ABLATIONS = {"uoe": {}, "no_vse": dict(vse=False), "output_twice": dict(uoe_output="twice"),
             "score_pre": dict(route_score="pre"), "score_swiglu": dict(route_score="swiglu"),
             "norm_1": dict(route_norm=1), "norm_inf": dict(route_norm="inf"),
             "n_routing_half": dict(n_routing=0.5), "n_routing_double": dict(n_routing=2.0)}
SWEEP_SEED = 1000           # sweep seeds are 1000, 1001, ...; reported seeds 0, 1, ... stay below
CODE_FILES = ("uoe.py", "train.py")                    # the model and its training: part of every run's identity
SPLITS = ("select", "report")                          # the halves of val.bin: sweep runs score on the first
ALPHA = 0.05                # "decisive": Holm-adjusted p below this
SPIKE, STALL = 0.1, 0.05    # flags: an eval's val loss this far above the previous eval's; the final above the best
COMMON_RATES = 2            # each primary pair also runs at its this many best common rates
MACHINE_THREADS = 2         # the machine check: reported seed 0 of each primary variant on this many threads

# Budgets: the model and the recipe. cpu: the small one (2 x 64, 1M tokens of pystdlib_char). train: `python
# train.py`'s own default model and length (read from its defaults), on the same corpus. gpu: 8 x 512, 12.3M GPT-2
# BPE tokens, one GPU (no declared design: exploratory). CPU presets run 2 runs at a time on one thread each: on a
# shared machine an op split over 2 threads waits for the second one to get a core. jobs is not part of a design
# (it changes no number).
_T, _M = TrainConfig(), GPTConfig()
PRESETS = {
    "cpu": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, batch_size=16, n_expert=8, top_k=2,
                expert_hidden=128, steps=500, warmup_steps=100, eval_interval=100, eval_iters=8, log_interval=20,
                dataset="pystdlib_char", device="cpu", dtype="float32", compile="eager", threads=1, multiple_of=1,
                jobs=2),
    "train": dict(**{k: getattr(_M, k) for k in MODEL_KEYS}, batch_size=_T.batch_size, steps=_T.max_iters,
                  warmup_steps=_T.warmup_iters, eval_interval=100, eval_iters=_T.eval_iters, log_interval=20,
                  dataset="pystdlib_char", device="cpu", dtype="float32", compile="eager", threads=1,
                  multiple_of=1, jobs=2),
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, batch_size=16, n_expert=8, top_k=2,
                expert_hidden=1024, steps=1500, warmup_steps=150, eval_interval=150, eval_iters=20, log_interval=50,
                dataset="pystdlib", device="cuda", dtype="bfloat16", compile="compile", threads=None,
                multiple_of=64, jobs=1, lrs=[5e-4, 1e-3, 2e-3]),   # lrs: the grid of an exploratory gpu study
}
BUDGET_KEYS = MODEL_KEYS + ("batch_size", "steps", "warmup_steps", "eval_interval", "eval_iters", "log_interval",
                            "dataset", "device", "dtype", "compile", "threads", "multiple_of")
# The declared protocol: what each command runs at a budget, fixed before any run. variants: quality's and
# balance's variants, ablate's ablations; seeds: reported seeds 0..seeds-1; sweep_seeds: 1000..; lrs: the grid.
CPU_LRS = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
DESIGNS = {
    ("quality", "cpu"): dict(variants=["dense", "moe", "moe+shared", "aoe", "uoe"], seeds=8, sweep_seeds=2,
                             lrs=CPU_LRS),
    # no 1e-3: on the first study's held-out sweep seed it was the worst rate of every variant, by > 0.1 nats
    ("quality", "train"): dict(variants=["dense", "moe", "moe+shared", "uoe"], seeds=5, sweep_seeds=2,
                               lrs=[2e-3, 4e-3, 8e-3, 1.6e-2]),
    ("ablate", "cpu"): dict(variants=list(ABLATIONS), seeds=5, sweep_seeds=2, lrs=CPU_LRS),
    # balance: aux 0.01 is quality's recipe, so those runs are quality's reported runs (the same seeds)
    ("balance", "cpu"): dict(variants=["moe", "uoe"], aux=[0.0, 0.01], seeds=8, sweep_seeds=2, lrs=CPU_LRS),
}
DESIGN_KEYS = ("variants", "aux", "seeds", "sweep_seeds", "lrs", "lr")


def design_of(command, preset):
    """(the design of command at preset, whether it is declared). An undeclared pair gets the cpu design of its
    command, with the preset's own lr grid if it has one: an exploratory start."""
    if (command, preset) in DESIGNS:
        return DESIGNS[(command, preset)], True
    return {**DESIGNS[(command, "cpu")], **{k: PRESETS[preset][k] for k in ("lrs",) if k in PRESETS[preset]}}, False


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
    """Mean, sample std, standard error, 95% confidence interval (t, n - 1 degrees of freedom) and two-sided
    paired-t p-value (null: mean difference 0) of the per-seed differences a[s] - b[s] over the seeds both have
    (dicts seed -> value; None is skipped). n = number of pairs; se, ci and p are None below 2 pairs; when every
    difference is the same (se 0), p is 1 if it is 0, else 0."""
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys()) if a[s] is not None and b[s] is not None]
    if not d:
        return dict(mean=None, std=None, se=None, ci=None, p=None, n=0)
    m, s = mean_std(d)
    if len(d) < 2:
        return dict(mean=m, std=s, se=None, ci=None, p=None, n=1)
    se = s / math.sqrt(len(d))
    half = t_quantile(0.975, len(d) - 1) * se
    p = 2 * t_cdf(-abs(m) / se, len(d) - 1) if se > 0 else float(m == 0)
    return dict(mean=m, std=s, se=se, ci=[m - half, m + half], p=min(1.0, p), n=len(d))


def holm(ps):
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of m p-values is multiplied by
    m - i + 1, capped at 1, and made no smaller than the one before it. None (no p) stays None, uncounted."""
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out, running = [None] * len(ps), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def verdict(c):
    """A comparison's verdict in words, from its Holm-adjusted p (c: a row of family(); a − b of losses, lower
    is better)."""
    if c.get("holm") is None:
        return "no verdict (fewer than 2 pairs)"
    if c["holm"] < ALPHA:
        return f"decisive: {c['a'] if c['mean'] < 0 else c['b']} is better"
    return "not decisive"


def raw_verdict(c):
    """What the 95% interval alone says (no multiplicity correction)."""
    if c.get("ci") is None:
        return "–"
    return "excludes 0" if c["ci"][0] > 0 or c["ci"][1] < 0 else "includes 0"


def lowest_mean(means, lrs):
    """The rate with the lowest mean (math.inf for a diverged one); ties go to the smaller rate."""
    return min((means[lr], lr) for lr in lrs)[1]


def common_rates(sel_a, sel_b, lrs, k=COMMON_RATES):
    """The k grid rates with the lowest sum of two variants' mean selection losses (ties: the smaller), ascending."""
    total = {lr: sel_a["means"][lr] + sel_b["means"][lr] for lr in lrs}
    return sorted(sorted(lrs, key=lambda lr: (total[lr], lr))[:k])


def run_flags(evals):
    """A run's flags, from its evals [[step, tokens, train, val], ...]: spike, [[step, rise], ...] of the evals whose
    val loss rose more than SPIKE nats over the previous eval's; stall, how far the final val loss is above the
    run's best eval when that is more than STALL (else None)."""
    vals = [(e[0], e[3]) for e in evals if e[3] is not None]
    spikes = [[s, v - prev] for (_, prev), (s, v) in zip(vals, vals[1:]) if v - prev > SPIKE]
    stall = vals[-1][1] - min(v for _, v in vals) if vals else 0.0
    return dict(spike=spikes, stall=stall if stall > STALL else None)


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


def fmt_p(p):
    """A p-value in 3 significant digits (a float literal: the tests read it back)."""
    return "–" if p is None else f"{p:.3g}"


def fmt_duration(seconds):
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# -----------------------------------------------------------------------------
# the corpus, configs and runs. Every run is `python train.py --key=value ...` in a subprocess, into its own folder
# OUT_DIR/runs/<variant>-D<D>-lr<lr>-s<seed>[-sweep][-t<threads>]-<hash of its identity>/, whose result.json
# (written atomically when the run has finished) makes a rerun skip it. Until then the folder holds train/
# (train.py's out_dir: metrics.jsonl and ckpt.pt, saved every eval_interval steps), train.log (every segment's
# output) and state.json: the run's identity, the seconds of its finished segments and when the running one
# started. A run is made in one or more segments: a command killed mid-run leaves ckpt.pt behind, and the next
# one resumes it.

def sha256_of(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def corpus_sha256(folder):
    """The fingerprint of a dataset folder's tokens: sha256 of its train.bin and val.bin."""
    return sha256_of(Path(folder) / f for f in ("train.bin", "val.bin"))


def code_fingerprint(device="cpu"):
    """What a run's result depends on besides its options and its data: the model and training code, torch's
    version and the machine (the CPU's model; on cuda the GPU's too: rounding differs between machines)."""
    fp = dict(code_sha256=sha256_of(REPO / f for f in CODE_FILES), torch=torch.__version__, cpu=cpu_name())
    if device == "cuda":
        fp["gpu"] = device_name("cuda")
    return fp


def split_root(args):
    """Where the halves of the corpus go: OUT_DIR/data (train.py's --data_dir for every run)."""
    return Path(args.out_dir).resolve() / "data"


def write_split(source, dest, val, meta):
    """dest/{train.bin, val.bin, meta.json}: source's train.bin (a hard link, else a copy), val (the half's
    tokens) and meta, unless dest holds exactly these already. meta.json goes first and comes back last, so that a
    folder cut short reads as not prepared and is written again."""
    text = json.dumps(meta, indent=1)
    try:
        if ((dest / "meta.json").read_text() == text and (dest / "val.bin").read_bytes() == val.tobytes()
                and (os.path.samefile(source / "train.bin", dest / "train.bin")
                     or filecmp.cmp(source / "train.bin", dest / "train.bin", shallow=False))):
            return
    except OSError:
        pass
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "meta.json").unlink(missing_ok=True)
    tmp = {f: dest / f".{f}.{os.getpid()}.tmp" for f in ("train.bin", "val.bin", "meta.json")}
    try:
        tmp["train.bin"].unlink(missing_ok=True)
        try:
            os.link(source / "train.bin", tmp["train.bin"])
        except OSError:                                # another file system, or no hard links: a copy
            shutil.copyfile(source / "train.bin", tmp["train.bin"])
        tmp["val.bin"].write_bytes(val.tobytes())
        tmp["meta.json"].write_text(text)
        for f in ("train.bin", "val.bin", "meta.json"):
            os.replace(tmp[f], dest / f)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)


def split_corpus(folder, meta, dataset, root):
    """The corpus's val.bin split by position into the selection half (its first len // 2 tokens) and the report
    half (the rest), as two dataset folders train.py reads: root/<dataset>-select and root/<dataset>-report, each
    with the corpus's train.bin, its half as val.bin, and the corpus's meta.json with val_tokens set and a note of
    which half. Their meta.json leaves out source_sha256, so train.py fingerprints each by its files (from
    source_sha256 the halves of an even split would get one fingerprint). Returns the corpus as the results JSON
    describes it, with each half's data_sha256."""
    folder, root = Path(folder), Path(root)
    val = np.fromfile(folder / "val.bin", dtype=np.dtype(meta["dtype"]))
    if len(val) < 2:
        raise UserError(f"{folder}/val.bin has {len(val)} token(s): too few to split into a selection and a report "
                        "half; prepare more text")
    half, splits = len(val) // 2, {}
    for split, (lo, hi) in zip(SPLITS, ((0, half), (half, len(val)))):
        dest = root / f"{dataset}-{split}"
        use = "sweep runs are scored on it" if split == "select" else "reported runs are scored on it"
        m = {k: v for k, v in meta.items() if k != "source_sha256"}
        m.update(name=dest.name, val_tokens=hi - lo,
                 split_of=dict(dataset=dataset, source_sha256=meta.get("source_sha256"), val_tokens=len(val),
                               val_range=[lo, hi]),
                 note=f"study.py's {split} half: val.bin is tokens {lo}..{hi - 1} of {dataset}'s val.bin ({use}); "
                      f"train.bin is {dataset}'s")
        write_split(folder, dest, val[lo:hi], m)
        splits[split] = dict(dataset=dest.name, val_tokens=hi - lo, val_range=[lo, hi], data_sha256=corpus_sha256(dest))
    vocab = int(meta["vocab_size"])
    return dict(dataset=dataset, vocab_size=vocab, diverged_loss=math.log(vocab), train_tokens=meta.get("train_tokens"),
                val_tokens=len(val), source_sha256=meta.get("source_sha256"), splits=splits)


def prepare(args):
    """Prepare the dataset once (before parallel runs could race to do it), split its val.bin into the selection
    and report halves (args.corpus), fingerprint the code, the machine and each half into args.fingerprint, and
    return the UoE base config."""
    from data.prepare import DataError, ensure_dataset, read_meta
    try:
        folder = ensure_dataset(args.dataset, Path(args.data_dir))
        meta = read_meta(folder)
        args.corpus = split_corpus(folder, meta, args.dataset, split_root(args))
    except DataError as e:
        raise UserError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{args.data_dir}/{args.dataset}/meta.json is incomplete ({type(e).__name__}: {e}); prepare "
                        f"the dataset again: python data/prepare.py {args.dataset}") from None
    except OSError as e:
        raise UserError(f"cannot read or write {e.filename} ({e.strerror}); prepare the dataset again (python "
                        f"data/prepare.py {args.dataset}) or choose another --out_dir") from None
    args.fingerprint = dict(code_fingerprint(args.device),
                            data_sha256={k: v["data_sha256"] for k, v in args.corpus["splits"].items()})
    vocab = args.corpus["vocab_size"]
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


def recipe(args, split="report"):
    """The training options every run of a study shares (the learning rate and seed vary); split: the half of
    val.bin the run is scored on. data_dir (OUT_DIR/data) is not among them: where the files lie is no part of a
    run's identity, their fingerprint is."""
    return dict(dataset=f"{args.dataset}-{split}", max_iters=args.steps, warmup_iters=args.warmup_steps,
                batch_size=args.batch_size, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                log_interval=args.log_interval, device=args.device, dtype=args.dtype,
                compile=args.compile == "compile", plot=False)


def run_spec(label, config, lr, seed, args, role="reported"):
    """One train.py run: its label, lr, seed, role in the study (sweep, reported, common-lr or machine), the half
    of val.bin it is scored on (sweep runs: select, every other: report), its threads, options, identity and
    folder. The identity's role is only sweep or not: a common-lr run at a variant's own rate is its reported
    run, made once; a machine run differs from it by its threads."""
    split = "select" if role == "sweep" else "report"
    threads = MACHINE_THREADS if role == "machine" else args.threads
    options = {**asdict(config), **recipe(args, split), "learning_rate": lr, "min_lr": lr / 10, "seed": seed}
    fp = args.fingerprint
    identity = dict(options=options, role="sweep" if role == "sweep" else "reported", threads=threads,
                    **{k: v for k, v in fp.items() if k != "data_sha256"}, data_sha256=fp["data_sha256"][split])
    key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    # the folder depends on the identity only: the same run asked for by two commands is run once
    name = (f"{config.ffn}-D{config.expert_hidden}-lr{lr:g}-s{seed}{'-sweep' if role == 'sweep' else ''}"
            f"{f'-t{threads}' if threads != args.threads else ''}-{key}")
    return dict(label=label, lr=lr, seed=seed, role=role, split=split, threads=threads, options=options,
                identity=identity, data_dir=str(split_root(args)),
                dir=str(Path(args.out_dir).resolve() / "runs" / name))


def train_command(spec, resume=False):
    """The train.py command line of a run: afresh (replacing whatever train/ holds), or resuming train/ckpt.pt.
    ckpt_interval is not among the options, so not in the identity: resume is exact, so where a run was
    checkpointed cannot change its result. Every option is given again on resume: train.py checks that the
    model options agree with the checkpoint's, and the training options it gets are the same ones."""
    opts = {**spec["options"], "data_dir": spec["data_dir"], "out_dir": str(Path(spec["dir"]) / "train"),
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
    """The compact result of a finished run, from its metrics.jsonl: its evals, routing records and final train
    and val loss (a diverged run: the evals before it diverged, no final losses). seconds: the wall time of its
    train.py processes, summed over its segments (see start_segment)."""
    evals, trains = [], []
    metrics = Path(spec["dir"]) / "train" / "metrics.jsonl"
    if not diverged or metrics.exists():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            (evals if r["kind"] == "eval" else trains).append(r)
    routing = [[t["step"], [l["ent_load"] for l in t["routing"]], [l["max_load"] for l in t["routing"]],
                [l["min_load"] for l in t["routing"]]]
               for t in trains if t.get("routing") and all(l is not None for l in t["routing"])]
    last = evals[-1] if evals and not diverged else {}
    return dict(label=spec["label"], lr=spec["lr"], seed=spec["seed"], identity=spec["identity"], seconds=seconds,
                diverged=diverged, final_val=last.get("val_loss"), final_train=last.get("train_loss"),
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
    """Counts the runs of a command as they are found finished (reused) or finish, prints each that ran with the
    elapsed time and an ETA, and hands every result on: on_result(spec, result, fresh)."""

    def __init__(self, total, jobs, on_result=None):
        self.total, self.jobs, self.on_result, self.seen, self.ran, self.t0 = total, jobs, on_result, set(), [], \
            time.time()

    def reused(self, spec, result):
        self.seen.add(spec["dir"])
        if self.on_result:
            self.on_result(spec, result, False)

    def finished(self, spec, result):
        self.seen.add(spec["dir"])
        self.ran.append(result["seconds"])
        eta = statistics.fmean(self.ran) * max(0, self.total - len(self.seen)) / self.jobs
        val = "diverged" if result["diverged"] else f"val {result['final_val']:.4f}"
        print(f"  [{len(self.seen)}/{self.total}] {spec['label']:16s} {spec['role']:9s} lr {spec['lr']:<8g} seed "
              f"{spec['seed']}: {val} ({result['seconds']:.0f} s) | elapsed {fmt_duration(time.time() - self.t0)}, "
              f"ETA {fmt_duration(eta)}", flush=True)
        if self.on_result:
            self.on_result(spec, result, True)


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


def run_env(spec):
    """The environment of a run: this one, with the run's thread count (None: torch's default, all cores)."""
    env = dict(os.environ)
    if spec["threads"]:
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    return env


def run_all(specs, args, progress):
    """Run every spec that has no result yet, args.jobs at a time; return [result per spec]. A run that
    another command has claimed is waited for; one with a checkpoint of its identity resumes from it. A run
    that ends in a non-finite loss is a result (diverged); any other failure stops all."""
    results, todo = {}, []
    for s in specs:
        r = read_result(s)
        if r is not None:
            if s["dir"] not in results:
                progress.reused(s, r)
            results[s["dir"]] = r
        elif s["dir"] not in (t["dir"] for t in todo):
            todo.append(s)
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
                    progress.reused(s, r)
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
                    p = launch(s, run_env(s), log, c, resume=step is not None)
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


# -----------------------------------------------------------------------------
# the results JSON: one per command and preset, the declared protocol and a record per run. Everything the report
# says is computed from it alone (plan, analyse), by the same functions that decide what a command runs.

FORMAT = 1                  # of the results JSON


def comparisons_of(command, variants):
    """[[a, b, kind]] of a command's family (one Holm family): quality's primary and secondary pairs among its
    variants; ablate's ablations − the full UoE."""
    if command == "ablate":
        return [[a, "uoe", "ablation"] for a in variants if a != "uoe" and "uoe" in variants]
    if command == "quality":
        return [[a, b, kind] for kind, pairs in (("primary", PRIMARY), ("secondary", SECONDARY)) for a, b in pairs
                if a in variants and b in variants]
    return []


def new_doc(args, base, variants):
    """A command's results JSON before its runs: what it is, its protocol as declared (or how an exploratory one
    departs from it), the budget, the corpus and its halves, what it is made with, and its variants' sizes
    (variants: {label: describe()})."""
    protocol = dict(declared=not args.exploratory, exploratory=args.exploratory, variants=list(args.variants),
                    seeds=list(range(args.seeds)), sweep_seeds=list(range(SWEEP_SEED, SWEEP_SEED + args.sweep_seeds)),
                    lrs=list(args.lrs), lr=getattr(args, "lr", None),
                    comparisons=comparisons_of(args.command, args.variants), alpha=ALPHA, spike=SPIKE, stall=STALL,
                    common_rates=COMMON_RATES, machine_threads=MACHINE_THREADS)
    if args.command == "balance":
        protocol["aux"] = list(args.aux)
    budget = dict(dataset=args.dataset, steps=args.steps, batch_size=args.batch_size, block_size=base.block_size,
                  tokens=args.steps * args.batch_size * base.block_size, warmup_iters=args.warmup_steps,
                  eval_interval=args.eval_interval, eval_iters=args.eval_iters, device=args.device, dtype=args.dtype,
                  compile=args.compile, threads=args.threads, jobs=args.jobs, multiple_of=args.multiple_of,
                  base_config=asdict(base))
    return dict(format=FORMAT, command=args.command, preset=args.preset, name=Path(args.json).stem, protocol=protocol,
                budget=budget, corpus=args.corpus, **{k: v for k, v in args.fingerprint.items() if k != "data_sha256"},
                variants=variants, runs=[])


def run_record(spec, result, routing=False):
    """A run as the results JSON keeps it: what it is, what it was made with (its options are train.py's, all
    but where its files go), and what it gave."""
    idn = spec["identity"]
    rec = dict(label=spec["label"], role=spec["role"], also=[], lr=spec["lr"], seed=spec["seed"], split=spec["split"],
               threads=spec["threads"], options=idn["options"], code_sha256=idn["code_sha256"],
               data_sha256=idn["data_sha256"], torch=idn["torch"], cpu=idn["cpu"], final_train=result["final_train"],
               final_val=result["final_val"], evals=result["evals"], diverged=result["diverged"],
               flags=run_flags(result["evals"]), seconds=result["seconds"], run=Path(spec["dir"]).name)
    if "gpu" in idn:
        rec["gpu"] = idn["gpu"]
    if routing:
        rec["routing"] = result["routing"]
    return rec


class Ledger:
    """A command's results JSON (new_doc) with a record per run (run_record), written atomically after each run
    that finishes. A run asked for in a second role (a reported run that is also a common-lr run at its variant's
    own rate) is kept once, with the other role under `also`. Runs are kept in a fixed order (split, label, lr,
    seed, threads), so the file does not depend on which run finished first."""

    def __init__(self, path, doc):
        self.path, self.doc, self.runs = Path(path), doc, {}

    def add(self, spec, result, write=True):
        rec = self.runs.get(spec["dir"])
        if rec is None:
            self.runs[spec["dir"]] = run_record(spec, result, routing=self.doc["command"] == "balance")
            self.doc["runs"] = sorted(self.runs.values(), key=lambda r: (r["split"] != "select", r["label"], r["lr"],
                                                                         r["seed"], r["threads"] or 0))
        elif spec["role"] != rec["role"] and spec["role"] not in rec["also"]:
            rec["also"].append(spec["role"])
        if write:
            self.write()

    def write(self):
        write_json(self.path, self.doc, quiet=True)


def arms(doc):
    """[(the label of a reported arm, the label of the sweep that sets its lr)], in the declared order: balance's
    arms are each variant at each aux_loss_coef, at the variant's selected lr."""
    p = doc["protocol"]
    if doc["command"] == "balance":
        return [(f"{v}:aux{c:g}", v) for c in p["aux"] for v in p["variants"]]
    return [(v, v) for v in p["variants"]]


def run_key(label, lr, seed, split, threads):
    return (label, lr, seed, split, threads)


def entry_key(e):
    return run_key(e["label"], e["lr"], e["seed"], e["split"], e["threads"])


def index_runs(doc):
    """{run_key: record} of doc's runs."""
    return {entry_key(r): r for r in doc["runs"]}


def sweep_value(run):
    """A sweep run's final selection-half loss: inf if it diverged, None if it has not run."""
    return None if run is None else math.inf if run["diverged"] else run["final_val"]


def final_value(doc, run):
    """A run's final report-half loss as every mean and paired difference takes it: ln(vocab_size), a uniform
    guess, if it diverged."""
    return doc["corpus"]["diverged_loss"] if run["diverged"] else run["final_val"]


def selection(doc, runs, label):
    """A variant's learning-rate sweep, from doc's runs: values {lr: {sweep seed: final selection loss (inf:
    diverged; None: not run yet)}}, means {lr: mean over the sweep seeds} of the rates whose runs have all finished,
    lr: the chosen rate (the lowest mean, ties to the smaller; None while a sweep run is missing) and edge: chosen
    at the grid's edge. An exploratory command with a fixed --lr has no sweep."""
    p, t = doc["protocol"], doc["budget"]["threads"]
    if p.get("lr") is not None:
        return dict(values={}, means={}, lr=p["lr"], edge=False)
    values = {lr: {s: sweep_value(runs.get(run_key(label, lr, s, "select", t))) for s in p["sweep_seeds"]}
              for lr in p["lrs"]}
    means = {lr: statistics.fmean(x.values()) for lr, x in values.items() if None not in x.values()}
    lr = lowest_mean(means, p["lrs"]) if len(means) == len(values) else None
    return dict(values=values, means=means, lr=lr,
                edge=lr is not None and len(p["lrs"]) > 1 and lr in (min(p["lrs"]), max(p["lrs"])))


def primary_pairs(doc):
    return [(a, b) for a, b, kind in doc["protocol"]["comparisons"] if kind == "primary"]


def plan(doc, runs):
    """The runs doc's protocol asks for, as far as its finished runs (runs: index_runs) decide them, in the order
    to run them (seeds interleaved across variants): every sweep run; the reported runs of each arm whose sweep is
    complete; for each primary pair whose sweeps are complete, both variants at the pair's common rates and the
    machine runs. Returns ([dict(label, role, also, lr, seed, split, threads)], {sweep label: selection}); a run
    asked for twice (a common rate that is a variant's own) is listed once, in its first role, the other in also."""
    p, t = doc["protocol"], doc["budget"]["threads"]
    sel = {v: selection(doc, runs, v) for v in dict.fromkeys(v for _, v in arms(doc))}
    grid = p["lrs"] if p.get("lr") is None else []
    out = [(v, "sweep", lr, s, "select", t) for s in p["sweep_seeds"] for lr in grid for v in sel]
    out += [(label, "reported", sel[v]["lr"], s, "report", t) for s in p["seeds"] for label, v in arms(doc)
            if sel[v]["lr"] is not None]
    pairs = [(a, b) for a, b in primary_pairs(doc) if sel[a]["lr"] is not None and sel[b]["lr"] is not None]
    out += [(v, "common-lr", lr, s, "report", t) for a, b in pairs for s in p["seeds"]
            for lr in common_rates(sel[a], sel[b], p["lrs"]) for v in (a, b)]
    out += [(v, "machine", sel[v]["lr"], p["seeds"][0], "report", p["machine_threads"])
            for v in dict.fromkeys(v for pair in pairs for v in pair)]
    entries = {}
    for label, role, lr, seed, split, threads in out:
        e = entries.setdefault(run_key(label, lr, seed, split, threads),
                               dict(label=label, role=role, also=[], lr=lr, seed=seed, split=split, threads=threads))
        if role != e["role"] and role not in e["also"]:
            e["also"].append(role)
    return list(entries.values()), sel


def family(doc, finals):
    """doc's comparisons (a − b of final report-half loss, paired by seed), each with its Holm-adjusted p within the
    family."""
    rows = [dict(name=f"{a} − {b}", a=a, b=b, kind=kind, **paired_difference(finals[a], finals[b]))
            for a, b, kind in doc["protocol"]["comparisons"]]
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["holm"] = adjusted
    return rows


def analyse(doc):
    """Everything the report says of one results JSON, from its runs alone: each variant's selection, the runs
    still missing, and once none is: per-seed finals (ln(vocab_size) for a diverged run) and the diverged seeds of
    each arm, the family of comparisons with Holm-adjusted p, quality's common-lr and machine checks, balance's
    load rows."""
    p, t = doc["protocol"], doc["budget"]["threads"]
    runs = index_runs(doc)
    entries, sel = plan(doc, runs)
    an = dict(runs=runs, sel=sel, planned=len(entries), missing=[e for e in entries if entry_key(e) not in runs])
    an["complete"] = not an["missing"]
    if not an["complete"]:
        return an

    def finals_at(label, lr, threads=t):
        rs = {s: runs[run_key(label, lr, s, "report", threads)] for s in p["seeds"]}
        return {s: final_value(doc, r) for s, r in rs.items()}, [s for s, r in rs.items() if r["diverged"]]
    an["finals"], an["diverged"] = {}, {}
    for label, v in arms(doc):
        an["finals"][label], an["diverged"][label] = finals_at(label, sel[v]["lr"])
    an["comparisons"] = family(doc, an["finals"])
    an["common"] = []
    for a, b in primary_pairs(doc):
        rows = [dict(lr=None, **paired_difference(an["finals"][a], an["finals"][b]),
                     diverged=[len(an["diverged"][a]), len(an["diverged"][b])])]
        for lr in common_rates(sel[a], sel[b], p["lrs"]):
            (fa, da), (fb, db) = finals_at(a, lr), finals_at(b, lr)
            rows.append(dict(lr=lr, **paired_difference(fa, fb), diverged=[len(da), len(db)]))
        an["common"].append(dict(name=f"{a} − {b}", a=a, b=b, rows=rows))
    an["machine"] = []
    for v in dict.fromkeys(v for pair in primary_pairs(doc) for v in pair):
        one, two = (runs[run_key(v, sel[v]["lr"], p["seeds"][0], "report", th)] for th in (t, p["machine_threads"]))
        an["machine"].append(dict(variant=v, seed=p["seeds"][0], lr=sel[v]["lr"], one=final_value(doc, one),
                                  two=final_value(doc, two), diverged=one["diverged"] or two["diverged"]))
    if doc["command"] == "balance":
        an.update(balance_rows(doc, runs, sel))
    return an


def balance_rows(doc, runs, sel):
    """Per variant, aux_loss_coef and layer: Ent_load, max and min load over the last 10% of training (mean ± std
    over the seeds that did not diverge), max / min as a ratio of means, and the val loss (every seed, a diverged
    one at ln(vocab_size)); then each variant's Ent_load minus the first variant's, paired by seed."""
    p, t = doc["protocol"], doc["budget"]["threads"]
    n_layer, steps = doc["budget"]["base_config"]["n_layer"], doc["budget"]["steps"]
    ent, rows = {}, []
    for c in p["aux"]:
        for v in p["variants"]:
            rs = [runs[run_key(f"{v}:aux{c:g}", sel[v]["lr"], s, "report", t)] for s in p["seeds"]]
            ent[(v, c)] = {r["seed"]: ent_load_summary(r["routing"], steps) for r in rs
                           if r.get("routing") and not r["diverged"]}
            finals = [final_value(doc, r) for r in rs]
            for layer in range(n_layer if ent[(v, c)] else 0):
                stat = {k: [e[layer][k] for e in ent[(v, c)].values()] for k in ("ent_load", "max_load", "min_load")}
                rows.append(dict(variant=v, aux_loss_coef=c, layer=layer, lr=sel[v]["lr"], seeds=len(ent[(v, c)]),
                                 **{k: mean_std(x) for k, x in stat.items()}, val=mean_std(finals),
                                 val_seeds=len(finals), max_over_min=load_ratio(stat["max_load"], stat["min_load"])))
    first = p["variants"][0]                         # paired by seed: each variant minus the first (uoe − moe)
    diffs = [dict(variant=v, versus=first, aux_loss_coef=c, layer=layer,
                  **paired_difference({s: e[layer]["ent_load"] for s, e in ent[(v, c)].items()},
                                      {s: e[layer]["ent_load"] for s, e in ent[(first, c)].items()}))
             for c in p["aux"] for v in p["variants"][1:] for layer in range(n_layer)
             if ent[(v, c)] and ent[(first, c)]]
    return dict(balance=rows, ent_load_diffs=diffs, ent_load_max=math.log(doc["budget"]["base_config"]["n_expert"]))


# -----------------------------------------------------------------------------
# the commands

def run_specs(specs, args, progress):
    """run_all over specs; returns {run dir: result}."""
    return {s["dir"]: r for s, r in zip(specs, run_all(specs, args, progress))}


def execute(args, doc, configs):
    """Run what doc's protocol asks for (plan), recording each run in the results JSON as it finishes: the sweep
    first, then the runs its selection decides, until the plan is complete. configs: {label: GPTConfig}."""
    ledger = Ledger(args.json, doc)
    progress = Progress(0, args.jobs, ledger.add)
    size = None
    while True:
        entries, _ = plan(doc, index_runs(doc))
        if len(entries) == size:
            return doc
        size = len(entries)
        specs = [run_spec(e["label"], configs[e["label"]], e["lr"], e["seed"], args, e["role"]) for e in entries]
        progress.total = len({s["dir"] for s in specs})
        done = run_specs(specs, args, progress)
        for s, e in zip(specs, entries):
            for role in [e["role"], *e["also"]]:
                ledger.add(dict(s, role=role), done[s["dir"]], write=False)
        ledger.write()


def announce(doc):
    print(f"# study.py {doc['command']} --preset {doc['preset']}{exploratory_words(doc, ' ')}: {budget_words(doc)}; "
          f"results: {doc['name']}.json", flush=True)


def finish(doc, args):
    """A command's end: its part of the report (no figures: python study.py report --write draws them)."""
    print()
    print(doc_markdown(doc, analyse(doc)))
    print(f"\nwrote {args.json}")
    return doc


def quality(args):
    base = prepare(args)
    configs = variant_configs(base, args.variants, args.multiple_of)
    doc = new_doc(args, base, {v: describe(c, base) for v, c in configs.items()})
    announce(doc)
    return finish(execute(args, doc, configs), args)


def ablate(args):
    base = variant_configs(prepare(args), ["uoe"], args.multiple_of)["uoe"]     # the exact UoE of quality
    configs = {a: ablation_config(base, a) for a in args.variants}
    doc = new_doc(args, base, {a: dict(describe(c, base), changes={k: getattr(c, k) for k in ABLATIONS[a]})
                               for a, c in configs.items()})
    announce(doc)
    return finish(execute(args, doc, configs), args)


def balance(args):
    base = prepare(args)
    configs = variant_configs(base, args.variants, args.multiple_of)
    arms_ = {f"{v}:aux{c:g}": replace(configs[v], aux_loss_coef=c) for c in args.aux for v in args.variants}
    doc = new_doc(args, base, {v: describe(c, base) for v, c in configs.items()})
    announce(doc)
    return finish(execute(args, doc, {**configs, **arms_}), args)


# -----------------------------------------------------------------------------
# the report: markdown for RESULTS.md §1 and the README headline, every number formatted from the results JSON and
# every sentence chosen by the numbers

def fmt_values(v):
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, list) else f"{v}"


def exploratory_details(doc):
    """How an exploratory command departed from its declared design, in words ('' for a declared one)."""
    return "; ".join(v if k == "design" else f"--{k}={fmt_values(v)}"
                     for k, v in doc["protocol"]["exploratory"].items())


def exploratory_words(doc, lead=""):
    x = exploratory_details(doc)
    return f"{lead}(exploratory: {x})" if x else ""


def caption(doc, text):
    """A table's caption; an exploratory command's says so first (its heading says how)."""
    return f"**Exploratory, not the declared protocol** (see the heading): {text}" if exploratory_details(doc) else text


def budget_words(doc):
    b, c = doc["budget"], doc["budget"]["base_config"]
    return (f"UoE {c['n_layer']} x {c['n_embd']}, E={c['n_expert']}, K={c['top_k']}, D={c['expert_hidden']}, block "
            f"{c['block_size']}, batch {b['batch_size']}; {b['steps']} steps = {b['tokens'] / 1e6:.2f}M tokens of "
            f"{b['dataset']}, warmup {b['warmup_iters']}, cosine to lr/10; {b['device']} {b['dtype']} {b['compile']}")


def seed_range(seeds):
    return f"{seeds[0]}..{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2 else \
        ", ".join(map(str, seeds))


def protocol_words(doc):
    """The protocol of doc's command, in brief."""
    p, c = doc["protocol"], doc["corpus"]
    what = {"quality": f"{', '.join(p['variants'])} at UoE's active FLOPs per token",
            "ablate": f"the full UoE and its ablations ({', '.join(a for a in p['variants'] if a != 'uoe')}), each "
                      "with UoE's D",
            "balance": f"{', '.join(p['variants'])} with aux_loss_coef {', '.join(f'{x:g}' for x in p.get('aux', []))}"
            }[doc["command"]]
    out = (f"{what}; {budget_words(doc)}. Reported seeds {seed_range(p['seeds'])} (n = {len(p['seeds'])}), each "
           f"trained afresh and scored on the report half of val.bin (its last {c['splits']['report']['val_tokens']:,} "
           "tokens). ")
    if p.get("lr") is not None:
        out += f"Every run at lr {p['lr']:g} (--lr: no selection). "
    else:
        out += (f"Each variant's lr is the one of {', '.join(f'{x:g}' for x in p['lrs'])} with the lowest mean final "
                f"loss on the selection half (the first {c['splits']['select']['val_tokens']:,} tokens) over sweep "
                f"seeds {seed_range(p['sweep_seeds'])}, never reported. ")
    if p["comparisons"]:
        names = [f"{a} − {b}" + (f" ({k})" if k != "ablation" else "") for a, b, k in p["comparisons"]]
        out += (f"Comparisons: {', '.join(names)}; per seed the difference of final loss; the mean, its 95% "
                "interval from t with n − 1 df and the two-sided paired-t p; decisive only where the Holm-adjusted p "
                f"over these {len(p['comparisons'])} comparisons is below {p['alpha']:g}. ")
    out += f"A diverged run counts at ln({c['vocab_size']}) = {c['diverged_loss']:.4f}, a uniform guess."
    if primary_pairs(doc):
        out += (f" Robustness: each primary pair also at its {p['common_rates']} best common rates; reported seed "
                f"{p['seeds'][0]} of each primary variant rerun on {p['machine_threads']} threads.")
    return out


def made_with(doc):
    b, runs = doc["budget"], doc["runs"]
    seconds = [r["seconds"] for r in runs]
    total = (f"; {len(runs)} runs, {fmt_duration(sum(seconds))} of run time in all, "
             f"{fmt_duration(statistics.fmean(seconds))} per run (mean)") if runs else "; no run yet"
    return (f"Made with code {doc['code_sha256'][:8]} (sha256 of {' + '.join(CODE_FILES)}), torch {doc['torch']}, "
            f"{doc['cpu']}{', ' + doc['gpu'] if 'gpu' in doc else ''}, {b['threads'] or 'all'} thread(s) per run, "
            f"{b['jobs']} run(s) at a time{total}.")


def missing_lines(an):
    groups = {}
    for e in an["missing"]:
        groups.setdefault((e["label"], e["role"], e["lr"], e["threads"]), []).append(e["seed"])
    pending = [v for v, s in an["sel"].items() if s["lr"] is None]
    its = "its" if len(pending) == 1 else "their"
    later = f"; the reported runs of {', '.join(pending)} join the plan once {its} sweep is complete" if pending else ""
    lines = [f"**Incomplete: {len(an['missing'])} of the {an['planned']} runs planned so far have not finished{later}. "
             "No verdict is drawn for this budget until every run has finished.** Missing:", ""]
    lines += [f"- {label}, {role}, lr {lr:g}{f', {threads} threads' if role == 'machine' else ''}: seed"
              f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
              for (label, role, lr, threads), seeds in groups.items()]
    return lines


def loss_cell(x):
    return "–" if x is None else "diverged" if x == math.inf else f"{x:.4f}"


def sweep_table(doc, an):
    p = doc["protocol"]
    if p.get("lr") is not None:
        return [caption(doc, f"No learning-rate sweep: every run at lr {p['lr']:g} (--lr).")]
    lines = [caption(doc, f"Learning-rate selection: final val loss on the selection half of val.bin, the mean over "
                          f"sweep seeds {seed_range(p['sweep_seeds'])} and each seed's (in brackets, in that order); "
                          "diverged: a non-finite loss, which makes the rate's mean infinite; the chosen rate has the "
                          "lowest mean (ties: the smaller); (edge): chosen at the grid's edge, where a wider grid "
                          "might choose otherwise"), "",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in p["lrs"]) + " | chosen lr |",
             "|---|" + "---:|" * (len(p["lrs"]) + 1)]
    for v, s in an["sel"].items():
        cells = [f"{loss_cell(s['means'].get(lr))} ({' / '.join(map(loss_cell, s['values'][lr].values()))})"
                 for lr in p["lrs"]]
        chosen = "–" if s["lr"] is None else f"{s['lr']:g}" + (" (edge)" if s["edge"] else "")
        lines.append(f"| {v} | {' | '.join(cells)} | {chosen} |")
    return lines


def flagged(run):
    return run["diverged"] or run["flags"]["spike"] or run["flags"]["stall"] is not None


def quality_table(doc, an):
    p, c = doc["protocol"], doc["corpus"]
    lines = [caption(doc, f"Quality on the report half of val.bin: final val loss, mean ± std over the "
                          f"{len(p['seeds'])} reported seeds at each variant's chosen lr (a diverged run counted at "
                          f"{c['diverged_loss']:.4f}); flagged: its reported runs that diverged, spiked or stalled "
                          "(listed below)"), "",
             "| variant | D | total params | active params | fwd MFLOP/tok | FLOPs vs UoE | lr | val loss | diverged "
             "| flagged |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, v in arms(doc):
        r, vals = doc["variants"][v], list(an["finals"][label].values())
        runs = [an["runs"][run_key(label, an["sel"][v]["lr"], s, "report", doc["budget"]["threads"])]
                for s in p["seeds"]]
        lines.append(f"| {label} | {r['expert_hidden']} | {r['params_total'] / 1e6:.3f}M | "
                     f"{r['params_active'] / 1e6:.3f}M | {r['fwd_flops_per_token'] / 1e6:.3f} | "
                     f"{r['flop_mismatch']:+.2%} | {an['sel'][v]['lr']:g} | "
                     f"{fmt_pm(*mean_std(vals), n=len(vals))} | {len(an['diverged'][label])} | "
                     f"{sum(map(flagged, runs))} |")
    return lines


def ablate_table(doc, an):
    p, c = doc["protocol"], doc["corpus"]
    lines = [caption(doc, f"UoE's ablations (the paper's Table 4), each at its own chosen lr, on the report half of "
                          f"val.bin: final val loss, mean ± std over the {len(p['seeds'])} reported seeds (a diverged "
                          f"run counted at {c['diverged_loss']:.4f}); every ablation keeps UoE's D, so some change "
                          "the FLOPs"), "",
             "| ablation | change | n_routing | fwd MFLOP/tok | FLOPs vs UoE | total params | lr | val loss | "
             "diverged |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a in p["variants"]:
        r, vals = doc["variants"][a], list(an["finals"][a].values())
        change = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(full UoE)"
        lines.append(f"| {a} | {change} | {r['n_routing']} | {r['fwd_flops_per_token'] / 1e6:.3f} | "
                     f"{r['flop_mismatch']:+.1%} | {r['params_total'] / 1e6:.3f}M | {an['sel'][a]['lr']:g} | "
                     f"{fmt_pm(*mean_std(vals), n=len(vals))} | {len(an['diverged'][a])} |")
    return lines


def ablate_lines(doc, an):
    """The ablation family in words: how many differ decisively from the full UoE, and which ran at another lr
    than the full UoE's (the design has no common-lr runs for this family, so such a difference is the ablation
    and its learning rate together). No line without the full UoE (an exploratory --ablations): no comparison."""
    cs, sel = an["comparisons"], an["sel"]                       # each comparison: an ablation (a) − the full UoE (b)
    if not cs:
        return []
    decisive = [c["name"] for c in cs if verdict(c).startswith("decisive")]
    other = [f"{c['a']} ({sel[c['a']]['lr']:g})" for c in cs if sel[c["a"]]["lr"] != sel[c["b"]]["lr"]]
    out = (f"Of the {len(cs)} ablations, {len(decisive)} differ decisively from the full UoE after Holm"
           + (f": {', '.join(decisive)}." if decisive else "."))
    if other:
        out += (f" {len(other)} of the {len(cs)} ran at a learning rate other than the full UoE's "
                f"{sel[cs[0]['b']]['lr']:g} (each chosen by its own sweep): {', '.join(other)}; this family has no "
                "common-lr runs, so each of their differences is the ablation and its learning rate together.")
    return [out]


def fmt_diff(c):
    return "–" if c["mean"] is None else f"{c['mean']:+.4f}" + (f" ± {c['se']:.4f}" if c["se"] is not None else "")


def comparisons_table(doc, an):
    p = doc["protocol"]
    lines = [caption(doc, f"Paired differences of final report-half val loss, first − second per seed (below 0: the "
                          f"first is better), n = {len(p['seeds'])} pairs: mean ± SE; the 95% interval from t with "
                          "n − 1 df and the two-sided paired-t p, raw (one comparison at a time); Holm p: adjusted "
                          f"over the {len(an['comparisons'])} comparisons of this family; the verdict is decisive only "
                          f"where Holm p < {p['alpha']:g}"), "",
             "| comparison | kind | difference ± SE | 95% CI (raw) | p (raw) | Holm p | raw CI | verdict (Holm) |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    lines += [f"| {c['name']} | {c['kind']} | {fmt_diff(c)} | {fmt_ci(c)} | {fmt_p(c['p'])} | {fmt_p(c['holm'])} | "
              f"{raw_verdict(c)} | {verdict(c)} |" for c in an["comparisons"]]
    return lines


def diverged_words(doc, an, labels):
    """Which runs of labels' reported seeds diverged, counted at ln(vocab_size), in words."""
    parts = [f"{len(an['diverged'][v])} of {len(doc['protocol']['seeds'])} {v} runs (seed"
             f"{'s' if len(an['diverged'][v]) > 1 else ''} {', '.join(map(str, an['diverged'][v]))})"
             for v in labels if an["diverged"][v]]
    if not parts:
        return f"No run of {' or '.join(labels)} diverged."
    return f"Diverged, each counted at {doc['corpus']['diverged_loss']:.4f}: {'; '.join(parts)}."


def edge_words(doc, an, variants):
    lrs = doc["protocol"]["lrs"]
    return ("the chosen lr is at the edge of the grid for " + ", ".join(
        f"{v} ({an['sel'][v]['lr']:g}, its {'highest' if an['sel'][v]['lr'] == max(lrs) else 'lowest'})"
        for v in variants) + "; a wider grid might choose otherwise")


def sentence(doc, an, c):
    """One comparison in a sentence: its difference, interval, p-values and verdict, its variants' diverged runs
    and a chosen lr at the grid's edge."""
    if c["ci"] is None:
        out = f"**{c['name']}** = {fmt_diff(c)} over {c['n']} seed: no interval, no verdict."
    else:
        out = (f"**{c['name']}** = {c['mean']:+.4f} (95% CI {fmt_ci(c)}, n = {c['n']}, p = {fmt_p(c['p'])}, Holm p = "
               f"{fmt_p(c['holm'])}): {verdict(c)}.")
    out += " " + diverged_words(doc, an, (c["a"], c["b"]))
    edge = [v for v in (c["a"], c["b"]) if an["sel"][v]["edge"]]
    return out + (f" Caveat: {edge_words(doc, an, edge)}." if edge else "")


def common_table(doc, an):
    p = doc["protocol"]
    lines = [caption(doc, "Robustness to the learning rate (a check, not a verdict: raw intervals): each primary pair "
                          "at its variants' own chosen rates (as above) and with both variants at each of the pair's "
                          f"{p['common_rates']} best common rates (the lowest sums of their mean selection losses); "
                          "diverged: runs of the first / second variant"), "",
             "| comparison | rates | difference ± SE | 95% CI (raw) | p (raw) | n | diverged |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for cmp in an["common"]:
        for row in cmp["rows"]:
            rates = (f"own: {cmp['a']} {an['sel'][cmp['a']]['lr']:g}, {cmp['b']} {an['sel'][cmp['b']]['lr']:g}"
                     if row["lr"] is None else f"both {row['lr']:g}")
            lines.append(f"| {cmp['name']} | {rates} | {fmt_diff(row)} | {fmt_ci(row)} | {fmt_p(row['p'])} | "
                         f"{row['n']} | {row['diverged'][0]} / {row['diverged'][1]} |")
    return lines


def machine_lines(doc, an):
    p, t = doc["protocol"], doc["budget"]["threads"]
    rows = an["machine"]
    lines = [caption(doc, f"Machine check: reported seed {p['seeds'][0]} of each primary variant at its chosen lr, "
                          f"rerun on {p['machine_threads']} threads instead of {t or 'all'} (same code, CPU and "
                          "options): final report-half val loss"), "",
             f"| variant | seed | lr | {t or 'all'} thread(s) | {p['machine_threads']} threads | difference |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['seed']} | {r['lr']:g} | {r['one']:.6f} | {r['two']:.6f} | "
              f"{r['two'] - r['one']:+.3g} |" for r in rows]                  # 3 digits, however small
    if rows:
        worst = max(rows, key=lambda r: abs(r["two"] - r["one"]))
        moved = abs(worst["two"] - worst["one"])
        means = {c["name"]: abs(c["mean"]) for c in an["comparisons"] if c["mean"] is not None}
        whole = [name for name, m in means.items() if moved >= m]
        near = sum(moved >= m / 10 for m in means.values())
        if whole:         # one run's rounding as large as a mean difference between variants: say so plainly
            reading = (f"as large as the whole of {len(whole)} of the {len(means)} differences above "
                       f"({', '.join(whole)}; a tenth or more of {near}): rounding alone moves one run as far as the "
                       "mean gap of those pairs, so a single seed cannot rank them; only the means over seeds can.")
        elif near:
            reading = (f"a tenth or more of {near} of the {len(means)} differences above, so rounding alone moves a "
                       "run by a visible part of them.")
        else:
            reading = "less than a tenth of every difference above."
        lines += ["", "Another thread count changed no final loss." if moved == 0 else
                  f"Another thread count moved a final loss by {moved:.3g} at most ({worst['variant']}): {reading}"]
    return lines


def seeds_table(doc, an):
    p, t = doc["protocol"], doc["budget"]["threads"]
    common = "; common-lr: at a common rate of a primary pair" if an["common"] else ""
    lines = [caption(doc, "Per-seed final val loss on the report half of val.bin (diverged: counted at "
                          f"{doc['corpus']['diverged_loss']:.4f}); reported: at the variant's chosen lr{common}"), "",
             "| variant | role | lr | " + " | ".join(f"seed {s}" for s in p["seeds"]) + " |",
             "|---|---|---:|" + "---:|" * len(p["seeds"])]
    rows = [(label, "reported", an["sel"][v]["lr"]) for label, v in arms(doc)]
    rows += [(v, "common-lr", row["lr"]) for cmp in an["common"] for row in cmp["rows"][1:]
             for v in (cmp["a"], cmp["b"]) if row["lr"] != an["sel"][v]["lr"]]
    for label, role, lr in dict.fromkeys(rows):
        cells = [an["runs"][run_key(label, lr, s, "report", t)] for s in p["seeds"]]
        lines.append(f"| {label} | {role} | {lr:g} | "
                     + " | ".join("diverged" if r["diverged"] else f"{r['final_val']:.4f}" for r in cells) + " |")
    return lines


def flag_lines(doc):
    p = doc["protocol"]
    runs = [r for r in doc["runs"] if flagged(r)]
    rule = (f"spike: an eval's val loss more than {p['spike']:g} above the previous eval's; stall: the final val loss "
            f"more than {p['stall']:g} above the run's best eval")
    if not runs:
        return [f"No run diverged, spiked or stalled ({rule})."]
    lines = [f"Flagged runs, kept in every mean ({rule}):", ""]
    for r in runs:
        what = ["diverged"] if r["diverged"] else []
        what += [f"spike at step {s} (+{rise:.4f})" for s, rise in r["flags"]["spike"]]
        if r["flags"]["stall"] is not None:
            what.append(f"stall (final {r['flags']['stall']:.4f} above its best eval)")
        threads = f", {r['threads']} threads" if r["threads"] != doc["budget"]["threads"] else ""
        lines.append(f"- {r['label']}, {r['role']}, lr {r['lr']:g}, seed {r['seed']}{threads}: {'; '.join(what)}")
    return lines


def balance_table(doc, an):
    p = doc["protocol"]
    lines = [caption(doc, f"Load balance: routing of the training batches over the last 10% of steps, mean ± std over "
                          "the seeds (n) that did not diverge; Ent_load is at most "
                          f"ln E = {an['ent_load_max']:.3f}, a load of 1/E = "
                          f"{1 / doc['budget']['base_config']['n_expert']:.3f} per expert is perfect balance; max / "
                          "min is the mean max load over the mean min load (\"no tokens\": the least-loaded expert got "
                          f"none); val loss over all {len(p['seeds'])} seeds, a diverged run at "
                          f"{doc['corpus']['diverged_loss']:.4f}"), "",
             "| variant | aux_loss_coef | lr | layer | Ent_load | max load | min load | max / min | val loss | n |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in an["balance"]:
        n = r["seeds"]
        ratio = "no tokens" if r["max_over_min"] is None else f"{r['max_over_min']:.1f}"
        lines.append(f"| {r['variant']} | {r['aux_loss_coef']:g} | {r['lr']:g} | {r['layer']} | "
                     f"{fmt_pm(*r['ent_load'], 3, n)} | {fmt_pm(*r['max_load'], 3, n)} | "
                     f"{fmt_pm(*r['min_load'], 3, n)} | {ratio} | {fmt_pm(*r['val'], n=r['val_seeds'])} | {n} |")
    if an["ent_load_diffs"]:
        lines += ["", caption(doc, "Ent_load, paired by seed (descriptive: raw intervals, no verdict)"), "",
                  "| Ent_load | aux_loss_coef | layer | difference ± SE | 95% CI | seeds |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {d['variant']} − {d['versus']} | {d['aux_loss_coef']:g} | {d['layer']} | "
                  f"{fmt_pm(d['mean'], d['se'], 3)} | {fmt_ci(d, 3)} | {d['n']} |" for d in an["ent_load_diffs"]]
    return lines


TITLES = {"quality": "Results at the `{}` budget", "ablate": "The paper's UoE ablations (its Table 4), `{}` budget",
          "balance": "Load balance without the aux loss, `{}` budget"}


def doc_markdown(doc, an, assets=None):
    """One results JSON as markdown: its protocol in brief, what it was made with, and either the runs still
    missing (no verdict) or its tables, verdict sentences, flags and per-seed values; with assets (the figures'
    folder, relative to the markdown), links to its figures."""
    def figure(kind):
        return [f"![{alt}]({assets}/{name})" for name, k, alt in figures(doc, an) if k == kind and assets is not None]
    lines = [f"### {TITLES[doc['command']].format(doc['preset'])}{exploratory_words(doc, ' ')}", "",
             f"`python study.py {doc['command']} --preset {doc['preset']}` → `{doc['name']}.json`: "
             + protocol_words(doc),
             "", made_with(doc), ""]
    if not an["complete"]:
        return "\n".join(lines + missing_lines(an) + [""] + sweep_table(doc, an))
    if doc["command"] == "quality":
        lines += [f"- {sentence(doc, an, c)}" for c in an["comparisons"] if c["kind"] == "primary"] + [""]
    lines += sweep_table(doc, an) + [""] + figure("sweep") + [""]
    if doc["command"] == "quality":
        lines += quality_table(doc, an) + [""] + comparisons_table(doc, an) + [""]
        if an["common"]:
            lines += common_table(doc, an) + [""] + machine_lines(doc, an) + [""] + figure("seeds") + [""]
    elif doc["command"] == "ablate":
        lines += ablate_table(doc, an) + [""] + comparisons_table(doc, an) + [""] + ablate_lines(doc, an) + [""]
    else:
        lines += balance_table(doc, an) + [""] + figure("balance") + [""]
    lines += seeds_table(doc, an) + [""] + flag_lines(doc)
    return "\n".join(x for i, x in enumerate(lines) if x or (i and lines[i - 1]))     # no doubled blank lines


def results_block(docs, analyses, assets):
    """The text between RESULTS.md's study markers."""
    if not docs:
        return "No run of this protocol has finished yet: there is no result to report."
    lines = ["Generated by `python study.py report --write` from " + ", ".join(f"`results/{n}.json`" for n in docs)
             + ": every number and sentence below is made from those files."]
    not_run = [f"`python study.py {c} --preset {p}`" for c, p in DESIGNS if f"{c}_{p}" not in docs]
    if not_run:
        lines.append(f"Not run yet: {', '.join(not_run)}.")
    codes = {n: d["code_sha256"] for n, d in docs.items()}
    if len(set(codes.values())) > 1:
        lines.append("**Warning**: these results were made with different code (" +
                     ", ".join(f"{n}: {c[:8]}" for n, c in codes.items()) + "): a difference between them may be "
                     "the code's.")
    for name, doc in docs.items():
        lines += ["", doc_markdown(doc, analyses[name], assets)]
    return "\n".join(lines)


def headline_block(docs, analyses):
    """The text between README.md's headline markers: per declared quality budget, every comparison with its
    interval and Holm verdict (or why there is none yet)."""
    budgets = [p for c, p in DESIGNS if c == "quality"]
    if not any(f"quality_{p}" in docs for p in budgets):
        return ("Not known yet: no budget of the declared protocol has finished "
                "([RESULTS.md §1](RESULTS.md#1-does-uoe-beat-moe-the-study)).")
    lines = ["| budget | seeds (n) | comparison | difference [95% CI] | Holm p | verdict |",
             "|---|---:|---|---|---:|---|"]
    alpha = ALPHA
    for p in budgets:
        doc, an = docs.get(f"quality_{p}"), analyses.get(f"quality_{p}")
        n = DESIGNS[("quality", p)]["seeds"]
        if doc is None:
            lines.append(f"| `{p}` | {n} | – | not run yet | – | – |")
        elif not an["complete"]:
            lines.append(f"| `{p}` | {n} | – | incomplete: {len(an['missing'])} of {an['planned']} planned runs "
                         "missing | – | no verdict yet |")
        else:
            alpha = doc["protocol"]["alpha"]
            for c in an["comparisons"]:
                k = len(an["diverged"][c["a"]]) + len(an["diverged"][c["b"]])
                lines.append(f"| `{p}` | {c['n']} | {c['name']} ({c['kind']}) | {c['mean']:+.4f} {fmt_ci(c)} | "
                             f"{fmt_p(c['holm'])} | {verdict(c)}{f'; {k} diverged run(s) counted' if k else ''} |")
    lines += ["", *headline_reading(docs, analyses, budgets)]
    lines += ["", "Final validation loss on the report half of val.bin (never used to choose a learning rate), first "
                  "minus second, paired by seed: below 0, the first is better. A verdict is decisive only where the "
                  f"Holm-adjusted p over its budget's comparisons is below {alpha:g}; a diverged run counts at "
                  "ln(vocabulary size). The protocol, every table, the per-seed values and the figures: "
                  "[RESULTS.md §1](RESULTS.md#1-does-uoe-beat-moe-the-study)."]
    return "\n".join(lines)


def headline_reading(docs, analyses, budgets):
    """The table's reading in one paragraph, from its numbers: which verdicts are decisive, which raw intervals
    exclude 0 without surviving Holm, and for each primary comparison whether its intervals include 0 and how large
    a gap they leave possible ([] before any budget is complete)."""
    done = [p for p in budgets if f"quality_{p}" in docs and analyses[f"quality_{p}"]["complete"]]
    if not done:
        return []
    rows = [(p, c) for p in done for c in analyses[f"quality_{p}"]["comparisons"] if c.get("ci")]
    decisive = [f"{c['name']} at `{p}` ({verdict(c).removeprefix('decisive: ')})" for p, c in rows
                if verdict(c).startswith("decisive")]
    raw_only = [f"{c['name']} at `{p}` ({c['mean']:+.3f})" for p, c in rows
                if raw_verdict(c) == "excludes 0" and not verdict(c).startswith("decisive")]
    words = [f"**Reading.** Decisive after Holm: {'; '.join(decisive)}." if decisive else
             f"**Reading.** No comparison is decisive after Holm at {' or '.join(f'`{p}`' for p in done)}."]
    if raw_only:
        words.append(f"Raw intervals exclude 0, but not after Holm, for {'; '.join(raw_only)}: leads to test "
                     "afresh, not findings.")
    for a, b in PRIMARY:
        cs = [(p, c) for p, c in rows if c["name"] == f"{a} − {b}"]
        if cs and all(raw_verdict(c) == "includes 0" for _, c in cs):
            reach = " and ".join(f"{max(-c['ci'][0], c['ci'][1]):.3f} nats (`{p}`)" for p, c in cs)
            words.append(f"{a} − {b}: every raw 95% interval includes 0, so in these models the runs do not say "
                         f"which of the two is better, and gaps as large as {reach} remain consistent with them.")
    return [" ".join(words)]


def read_results(folder):
    """{name: results JSON} of folder/*.json: the declared designs in DESIGNS' order, then the others by name; a
    file that is not a results JSON of this study is a UserError."""
    docs = {}
    for path in sorted(Path(folder).glob("*.json")):
        command, _, preset = path.stem.removesuffix("-exploratory").partition("_")
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("name") != path.stem:
                raise ValueError("not a results JSON of this study.py")
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}); delete it and run python study.py {command} --preset {preset} "
                            "again to rewrite it (its finished runs are reused)") from None
        docs[path.stem] = doc
    order = {f"{c}_{p}": i for i, (c, p) in enumerate(DESIGNS)}
    return dict(sorted(docs.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


# -----------------------------------------------------------------------------
# figures

def new_figure(w, h):
    """plot.py's figure (no pyplot: no global state to close); imported here, when a figure is drawn."""
    import plot
    return plot.new_figure(w, h)


def save_figure(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
    return str(path)


def colours(doc):
    """A colour per label, fixed by its place in VARIANTS (in ABLATIONS for ablate), the same in every figure and
    budget; the differences are drawn in black and grey, which no variant has."""
    return {v: f"C{i}" for i, v in enumerate(ABLATIONS if doc["command"] == "ablate" else VARIANTS)}


DIFF_STYLES = {PRIMARY[0]: (dict(color="k", ls="-"), dict(color="k", alpha=0.12, lw=0)),
               PRIMARY[1]: (dict(color="0.5", ls="--"), dict(facecolor="none", edgecolor="0.6", hatch="///", lw=0))}


def figures(doc, an):
    """[(file name, kind, alt text)] of doc's figures (a complete doc's): the sweep, the per-seed curves of the
    primary variants (quality), the load over training (balance)."""
    if not an["complete"]:
        return []
    kinds = [] if doc["protocol"].get("lr") is not None or doc["command"] == "balance" else ["sweep"]
    kinds += {"quality": ["seeds"] if primary_pairs(doc) else [], "ablate": [], "balance": ["balance"]}[doc["command"]]
    alt = {"sweep": "final selection-half val loss against the learning rate, per variant",
           "seeds": "per-seed val loss curves of the primary variants and their paired differences",
           "balance": "Ent_load over training, per layer"}
    return [(f"study_{k}_{doc['name']}.png", k, alt[k]) for k in kinds]


def plot_sweep(doc, an, path):
    """Each variant's final selection-half loss against the learning rate: the mean over the sweep seeds (line),
    each seed (dots), the chosen rate (star). A diverged run is not drawn (its rate's mean is infinite)."""
    fig = new_figure(7, 4.5)
    ax = fig.subplots()
    col = colours(doc)
    for v, s in an["sel"].items():
        finite = sorted((lr, m) for lr, m in s["means"].items() if math.isfinite(m))
        if finite:
            ax.plot(*zip(*finite), marker="o", color=col[v],
                    label=f"{v}: lr {s['lr']:g}" + (" (edge)" if s["edge"] else ""))
        dots = [(lr, x) for lr, xs in s["values"].items() for x in xs.values() if x is not None and math.isfinite(x)]
        if dots:
            ax.scatter(*zip(*dots), s=12, color=col[v], alpha=0.5)
        if math.isfinite(s["means"][s["lr"]]):
            ax.plot([s["lr"]], [s["means"][s["lr"]]], marker="*", ms=14, color=col[v])
    ax.set_xscale("log", base=2)
    ax.set_xticks(doc["protocol"]["lrs"], [f"{lr:g}" for lr in doc["protocol"]["lrs"]])
    ax.minorticks_off()
    ax.set(xlabel="peak learning rate", ylabel="final val loss, selection half (nats/token)",
           title=f"{doc['name']}: sweep over seeds {seed_range(doc['protocol']['sweep_seeds'])}; star: chosen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_seeds(doc, an, path):
    """Left: val loss (report half) against tokens of every reported seed of the primary variants (thin) and their
    mean (thick); right: the primary differences over training, paired by seed, with their 95% t bands."""
    p, t, col = doc["protocol"], doc["budget"]["threads"], colours(doc)
    fig = new_figure(12, 4.4)
    ax, ax2 = fig.subplots(1, 2)
    curves = {}
    for v in dict.fromkeys(v for pair in primary_pairs(doc) for v in pair):
        lr = an["sel"][v]["lr"]
        curves[v] = {s: [e for e in an["runs"][run_key(v, lr, s, "report", t)]["evals"] if e[3] is not None]
                     for s in p["seeds"]}
        for ev in curves[v].values():
            ax.plot([e[1] / 1e6 for e in ev[1:]], [e[3] for e in ev[1:]], color=col[v], lw=0.6, alpha=0.5)
        n = min(map(len, curves[v].values()))
        ax.plot([curves[v][p["seeds"][0]][j][1] / 1e6 for j in range(1, n)],
                [statistics.fmean(ev[j][3] for ev in curves[v].values()) for j in range(1, n)], color=col[v], lw=2,
                label=f"{v} (lr {lr:g}): mean of {len(curves[v])} seeds")
    ax.set(xlabel="tokens seen (M)", ylabel="validation loss, report half (nats/token)",
           title=f"{doc['name']}: every reported seed (thin) and the mean (thick)")
    for a, b in primary_pairs(doc):
        g = [x for x in gap_curve(curves[a], curves[b])[1:] if x[2] is not None]      # an interval needs 2 seeds
        if g:
            x, m, half = zip(*g)
            x = [tok / 1e6 for tok in x]
            line, band = DIFF_STYLES.get((a, b), DIFF_STYLES[PRIMARY[1]])
            ax2.plot(x, m, marker="o", ms=3, label=f"{a} − {b}", **line)
            ax2.fill_between(x, [y - h for y, h in zip(m, half)], [y + h for y, h in zip(m, half)], **band)
    ax2.axhline(0, color="k", lw=0.6, ls=":")
    ax2.set(xlabel="tokens seen (M)", ylabel="validation loss difference (nats/token)",
            title="paired differences, band: raw 95% CI (< 0: first better)")
    for axis in (ax, ax2):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    return save_figure(fig, path)


def plot_balance(doc, an, path):
    """Ent_load against step, per layer, for each variant and aux coefficient (mean over the seeds that did not
    diverge)."""
    p, t, col = doc["protocol"], doc["budget"]["threads"], colours(doc)
    n_layer = doc["budget"]["base_config"]["n_layer"]
    fig = new_figure(5 * n_layer, 4)
    axes = fig.subplots(1, n_layer, squeeze=False, sharey=True)
    for layer, ax in enumerate(axes[0]):
        for c in p["aux"]:
            for v in p["variants"]:
                rs = [an["runs"][run_key(f"{v}:aux{c:g}", an["sel"][v]["lr"], s, "report", t)] for s in p["seeds"]]
                routing = [r["routing"] for r in rs if r.get("routing") and not r["diverged"]]
                if not routing:
                    continue
                n = min(map(len, routing))
                ax.plot([routing[0][j][0] for j in range(n)], [statistics.fmean(r[j][1][layer] for r in routing)
                                                               for j in range(n)],
                        color=col[v], ls="-" if c == 0 else "--", label=f"{v}, aux_loss_coef {c:g}")
        ax.axhline(an["ent_load_max"], color="k", lw=0.8, ls=":")
        ax.set(title=f"layer {layer}", xlabel="step", ylabel="Ent_load (training batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


PLOTS = {"sweep": plot_sweep, "seeds": plot_seeds, "balance": plot_balance}


# -----------------------------------------------------------------------------
# report --write / --check

MARKERS = {"results_md": ("<!-- study:begin -->", "<!-- study:end -->"),
           "readme": ("<!-- headline:begin -->", "<!-- headline:end -->")}


def study_report(args):
    """The report: results_dir/*.json -> the markdown of RESULTS.md §1 and of the README headline. Plain: print
    both (with their markers); --write: put them between the markers of --results_md and --readme and draw the
    figures into --assets_dir; --check: exit 1, with one line naming the first difference, when the committed text
    differs. Returns the exit code."""
    docs = read_results(args.results_dir)
    analyses = {name: analyse(doc) for name, doc in docs.items()}
    paths = {"results_md": Path(args.results_md), "readme": Path(args.readme)}
    assets = Path(os.path.relpath(Path(args.assets_dir).resolve(), paths["results_md"].resolve().parent)).as_posix()
    blocks = {"results_md": results_block(docs, analyses, assets), "readme": headline_block(docs, analyses)}
    if not (args.write or args.check):
        for k, (begin, end) in MARKERS.items():
            print(f"{begin}\n{blocks[k]}\n{end}\n")
        return 0
    code = write_blocks({k: (path, [(*MARKERS[k], blocks[k])]) for k, path in paths.items()}, args.check,
                        f"{args.results_dir}/*.json", "python study.py report --write")
    if args.write and args.plot == "on":
        for name, doc in docs.items():
            for file, kind, _ in figures(doc, analyses[name]):
                PLOTS[kind](doc, analyses[name], Path(args.assets_dir) / file)
    return code


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


# Run counts and times: measured run times on one thread of this project's 2-core CPU machine (cpu budget about
# 45 s per run, train budget about 14.5 min), 2 runs at a time. The common-lr runs depend on the selection: both
# variants of each primary pair at its 2 best common rates, less those at a variant's own rate (usually about half).
HELP = {
    "quality": "val loss of dense, MoE, MoE + shared expert, (AoE) and UoE at matched active FLOPs, under the "
               "declared protocol: a learning-rate sweep on sweep seeds 1000, 1001 scored on the selection half of "
               "val.bin, then every reported seed afresh at each variant's chosen lr, scored on the report half; "
               "paired differences with 95% t intervals, p and Holm-adjusted p; the primary pairs at their common "
               "rates; a 2-thread machine check. cpu: 50 sweep + 40 reported + 24-32 common-lr (at most 64) + 3 "
               "machine runs, about 45 s each: about 45 min on 2 idle cores. train: 32 sweep + 20 reported + 15-20 "
               "common-lr (at most 40) + 3 machine runs of about 14.5 min: about 9 h on 2 idle cores. On a shared "
               "machine, 2-3 times that",
    "ablate": "the paper's UoE ablations (no VSE, output twice, score pre/swiglu, norm 1/inf, n_routing halved/"
              "doubled) against the full UoE, each with its own lr selected on the cpu grid over sweep seeds 1000, "
              "1001, seeds 0..4, Holm over the 8; cpu: 90 sweep + 45 reported runs of about 50 s (the full UoE's 15 "
              "are quality's when it ran first into the same --out_dir): about 50 min on 2 idle cores",
    "balance": "expert load of UoE and MoE without the load-balancing loss (and with it, for reference), each at its "
               "lr selected as in quality; cpu: 20 sweep + 32 reported runs, of which the 20 sweep and the 16 with "
               "the loss are quality's when it ran first into the same --out_dir: 16 new runs, about 6 min",
    "report": "results/*.json -> the markdown of RESULTS.md §1 (per command and budget: the protocol in brief, the "
              "sweep, quality, comparison, common-lr and machine-check tables, flags, per-seed values; the ablation "
              "and balance tables) and the README headline, printed; --write puts them between the markers and draws "
              "the figures into assets/; --check compares. Reads nothing but the results JSON",
}
EPILOG = """Every run is `python train.py --key=value ...` (the same recipe as a run you start yourself), run in
a subprocess with its own folder under OUT_DIR/runs/ and its result written there as soon as it
finishes: interrupt at any time (Ctrl-C, or SIGTERM) and rerun the same command to continue;
finished runs are skipped, and a run cut short resumes from its last checkpoint (saved every
eval_interval steps, and on the interrupt). Seeds are paired across variants: seed s gives every
variant the same batches in the same order, the same evaluation batches, and the same initial
embeddings and first attention layer.
Presets: cpu (2 x 64, E=8, K=2, UoE D=128, block 128, batch 16, 500 steps = 1.0M tokens of
pystdlib_char); train (python train.py's defaults: 4 x 128, E=8, K=2, D=256, block 256, batch 16,
1000 steps = 4.1M tokens of pystdlib_char); both run 2 runs at a time on 1 thread each. gpu (8 x 512,
block 512, batch 16, 1500 steps = 12.3M GPT-2 BPE tokens of pystdlib; bf16, compiled, widths
multiples of 64; one run at a time) has no declared design: it is exploratory.
A declared design (quality cpu and train, ablate cpu, balance cpu) fixes its seeds, sweep seeds,
lr grid and variants: a flag that changes them or the budget (--seeds, --lrs, --steps, a size, ...)
makes the command exploratory, with its own results file, and every table of it says so."""


def build_parser():
    p = Parser(prog="study.py", description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="command", metavar="{quality,ablate,balance,report}", parser_class=Parser)
    for name in ("quality", "ablate", "balance", "report"):
        s = sub.add_parser(name, help=HELP[name].replace("%", "%%"), description=textwrap.fill(HELP[name], 100),
                           epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "report":
            s.add_argument("--results_dir", default=str(REPO / "results"), help="the results JSON (default results/)")
            mode = s.add_mutually_exclusive_group()
            mode.add_argument("--write", action="store_true", help="write the text between the markers, draw figures")
            mode.add_argument("--check", action="store_true", help="exit 1 if the committed text differs")
            s.add_argument("--results_md", default=str(REPO / "RESULTS.md"))
            s.add_argument("--readme", default=str(REPO / "README.md"))
            s.add_argument("--assets_dir", default=str(REPO / "assets"), help="where --write draws the figures")
            s.add_argument("--plot", choices=("on", "off"), default="on", help="with --write: draw the figures")
            continue
        s.add_argument("--out_dir", default="bench_out", help="the runs and the corpus halves (not committed)")
        s.add_argument("--results_dir", help="where the results JSON goes (default: results/ in the repository; "
                                             "OUT_DIR/results for an exploratory command)")
        s.add_argument("--preset", choices=tuple(PRESETS), default="cpu", help="the budget (see below)")
        if name == "ablate":
            s.add_argument("--ablations", dest="variants", type=lambda x: variant_list(x, tuple(ABLATIONS)),
                           help=f"comma-separated, of {','.join(ABLATIONS)} (declared: all)")
        else:
            s.add_argument("--variants", type=lambda x: variant_list(x, tuple(VARIANTS)),
                           help=f"comma-separated, of {','.join(VARIANTS)} (declared: quality cpu all, train all but "
                                "aoe; balance moe,uoe)")
        if name == "balance":
            s.add_argument("--aux", type=float_list, help="aux_loss_coef values (declared: 0,0.01)")
        if name != "quality":
            s.add_argument("--lr", type=positive_float, help="one peak learning rate for every run, no sweep")
        s.add_argument("--lrs", type=positive_float_list, help="the sweep's learning rates, comma-separated")
        s.add_argument("--sweep_seeds", type=positive_int, help=f"number of sweep seeds ({SWEEP_SEED}, ...)")
        s.add_argument("--seeds", type=positive_int, help=f"reported seeds 0 .. N-1 (below {SWEEP_SEED})")
        for k in MODEL_KEYS + ("batch_size",):
            s.add_argument(f"--{k}", type=positive_int,
                           help="of UoE; the others' D is matched on FLOPs" if k == "expert_hidden" else None)
        s.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16 = autocast (CUDA)")
        s.add_argument("--device", choices=("auto", "cpu", "cuda"), help="cpu presets: cpu; gpu: cuda")
        s.add_argument("--compile", choices=("eager", "compile"), help="train.py --compile (cpu presets: eager)")
        s.add_argument("--threads", type=positive_int, help="threads per run (OMP_NUM_THREADS; cpu presets: 1)")
        s.add_argument("--jobs", type=positive_int, help="runs at a time (cpu presets: 2, gpu: 1; changes no number)")
        s.add_argument("--steps", type=positive_int, help="optimizer steps per run")
        s.add_argument("--warmup_steps", type=int, help="linear warmup steps, then cosine to lr/10")
        s.add_argument("--eval_interval", type=positive_int)
        s.add_argument("--eval_iters", type=positive_int)
        s.add_argument("--log_interval", type=positive_int, help="routing statistics every this many steps")
        s.add_argument("--dataset", help="data/<name> (pystdlib_char and pystdlib are prepared if missing)")
        s.add_argument("--data_dir", default=str(REPO / "data"))
        s.add_argument("--multiple_of", type=positive_int, help="round matched widths to a multiple of this")
    return p


def parse_args(argv):
    """Parsed options with the preset's budget and the command's design filled in; args.exploratory: the flags
    that depart from a declared design ({} when none does); args.json: the results JSON. Raises UserError on bad
    input."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        raise UserError("no command; run python study.py quality, ablate, balance or report")
    if args.command == "report":
        return args
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UserError("--warmup_steps must be >= 0")
    if args.seeds is not None and args.seeds > SWEEP_SEED:
        raise UserError(f"--seeds must be <= {SWEEP_SEED}: seeds from {SWEEP_SEED} on are the sweep's")
    design, declared = design_of(args.command, args.preset)
    preset = {**PRESETS[args.preset], **design}
    given = {k: getattr(args, k) for k in BUDGET_KEYS + DESIGN_KEYS if getattr(args, k, None) is not None}
    args.exploratory = {k: v for k, v in given.items() if v != preset.get(k)}
    if not declared:
        args.exploratory["design"] = f"no declared design for {args.command} --preset {args.preset}"
    name = f"{args.command}_{args.preset}{'-exploratory' if args.exploratory else ''}.json"
    folder = args.results_dir or (Path(args.out_dir) / "results" if args.exploratory else REPO / "results")
    args.json = str(Path(folder) / name)
    return settle(args, preset, name)


INTERRUPTED = "interrupted: finished runs are kept; run the same command again to continue"


def main(argv=None):
    """The command line: 0 done, 1 report --check found a difference, 2 a UserError (one line); stopped (one line):
    130 on Ctrl-C or a run stopped by a signal, 143 on SIGTERM to this command (harness.cli). Either way our runs
    save a checkpoint and the same command continues."""
    code = {}

    def run(argv):
        args = parse_args(argv)
        try:
            if args.command == "report":
                code["exit"] = study_report(args)
            else:
                dict(quality=quality, ablate=ablate, balance=balance)[args.command](args)
        except Stopped as e:
            print(f"stopped: {e}", file=sys.stderr)
            code["exit"] = 128 + signal.SIGINT

    rc = cli(run, sys.argv[1:] if argv is None else argv, interrupted=INTERRUPTED)
    return code.get("exit", rc) if rc == 0 else rc


if __name__ == "__main__":
    sys.exit(main())
