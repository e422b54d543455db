"""
Check the GPU paths in one command, offline, from the repository root:

    python gpu_check.py                 # at most 8 minutes on one GPU
    python gpu_check.py --skip tests    # any of: tests, bench, train

1. environment: torch, CUDA, the GPU, whether this torch has grouped_mm, which expert path
   `auto` picks at the GPU preset; then one cold torch.compile of the train stage's UoE model
   (forward and backward, bf16), timed: the compile time every stage's limit is sized from;
2. the CUDA tests (tests/test_cuda.py: grouped GEMM == loop in bf16, compiled bf16 training);
3. `bench.py speed --preset gpu` for dense, moe and uoe, compiled (step time, tokens/s, MFU,
   peak memory, graph breaks, recompiles) at matched active FLOPs;
4. a short compiled bf16 `train.py` run per variant on GPT-2 BPE tiny Shakespeare (prepared from
   the files in data/, no download), read back from its metrics.jsonl.

A stage is predicted to take its cold compiles times the measured compile time plus a fixed
allowance for the rest of its work (STAGES); its limit is MARGIN times that, less what the stages
after it are predicted to need, so the whole stays within BUDGET_S. A stage that would not fit
even its prediction is not run and says how to check it alone (--skip the others; a second run
also finds inductor's caches warm). Every stage ends in a row of the summary table (stage,
status, seconds, limit), whether it passed, failed or timed out. Everything goes to --out_dir
(default gpu_check_out/), the summary to summary.md. Exit code 0 only when every stage passed (1 when
one did not; 2 no GPU or a bad option; 130 / 143 Ctrl-C / SIGTERM, which stop the running stage first).
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from harness import REPO, Parser, cli
from train import UserError

VARIANTS = ("dense", "moe", "uoe")
# the train runs: a 6 x 512 model, big enough for the GPU to matter, small enough to compile fast
TRAIN_MODEL = dict(n_layer=6, n_head=8, n_embd=512, expert_hidden=1024, block_size=512)
TRAIN_OPTIONS = [*(f"--{k}={v}" for k, v in TRAIN_MODEL.items()), "--dataset=shakespeare", "--batch_size=16",
                 "--max_iters=60", "--eval_interval=60", "--eval_iters=5", "--log_interval=5", "--warmup_iters=10",
                 "--learning_rate=6e-4", "--min_lr=6e-5", "--device=cuda", "--dtype=bfloat16", "--compile=True",
                 "--plot=False", "--overwrite=True"]
# stage -> (cold compiles in one run, seconds for the rest of a run: start-up, eager work, timed steps and,
# for train, the ~1.3 GB checkpoint of the MoE model); train is one run per variant
STAGES = {"tests": (4, 30), "bench": (4, 45), "train": (2, 20)}
BUDGET_S = 480          # the whole check, the compile measurement included
MARGIN = 2.0            # a stage may take twice its predicted time, if the later stages leave room
FALLBACK_COMPILE_S = 30  # assumed when the measurement itself fails
STOP_GRACE_S = 10       # after Ctrl-C / SIGTERM: the seconds a stage has to exit on SIGTERM before it is killed


def run(cmd, limit, log):
    """(exit code or "timeout", seconds) of cmd, its output written to log. The stage runs in a session of its
    own (a Ctrl-C in the terminal does not reach it), so its whole process group is ended here: on timeout
    killed (inductor's compile workers must not slow the next stage down); when this command is interrupted
    (Ctrl-C, SIGTERM) sent SIGTERM, and killed after STOP_GRACE_S, before the interrupt goes on."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_group(p, signal.SIGKILL)
            code = "timeout"
        except BaseException:               # Ctrl-C or SIGTERM (harness.cli): stop the stage, then go on
            try:
                kill_group(p, signal.SIGTERM)
                try:
                    p.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            finally:                        # (a second Ctrl-C ends the grace at once)
                kill_group(p, signal.SIGKILL)   # what is left of the group: the stage, or its workers
            raise
    return code, time.time() - t0


def kill_group(p, signum):
    """Send signum to the process group that p leads, and reap p if it was killed."""
    try:
        os.killpg(p.pid, signum)
    except ProcessLookupError:              # nothing of the group is left
        pass
    if signum == signal.SIGKILL:
        p.wait()


def stage_limit(predicted, left):
    """Time limit of the first of the remaining runs, given each one's predicted seconds and the seconds left:
    MARGIN x its prediction, less what the later runs that fit are predicted to need; None if it does not fit."""
    if predicted[0] > left:
        return None
    room, later = left - predicted[0], 0.0
    for p in predicted[1:]:   # in order: a later run that fits keeps its predicted time
        if p <= room:
            room, later = room - p, later + p
    return min(MARGIN * predicted[0], left - later)


def measure_compile_s():
    """Seconds of one cold torch.compile of the train stage's UoE model: forward and backward under bf16."""
    import torch
    import uoe
    torch._dynamo.reset()
    model = uoe.GPT(uoe.GPTConfig(ffn="uoe", **TRAIN_MODEL)).cuda()
    idx = torch.randint(0, model.config.vocab_size, (16, TRAIN_MODEL["block_size"]), device="cuda")
    torch.cuda.synchronize()
    t0 = time.time()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = torch.compile(model)(idx, idx)
    loss.backward()
    torch.cuda.synchronize()
    seconds = time.time() - t0
    del model, loss
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return seconds


def environment():
    import torch
    import uoe
    props = torch.cuda.get_device_properties(0)
    config = uoe.GPTConfig(ffn="uoe", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
                           n_expert=8, top_k=2, expert_hidden=1024)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": props.name,
            "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
            "grouped_mm": hasattr(torch, "_grouped_mm") or hasattr(torch.nn.functional, "grouped_mm"),
            "expert_path_auto": uoe.resolve_expert_path(config, "cuda", torch.bfloat16)}


def train_summary(out_dir):
    """Median step time, tokens/s, MFU and peak memory of a run's timed train records; a record cut off by
    a timeout is skipped."""
    records = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    train = [r for r in records if r["kind"] == "train"][2:]   # the first records include compilation
    val = [r["val_loss"] for r in records if r["kind"] == "eval"]

    def median(key):
        values = [r[key] for r in train if r.get(key) is not None]
        return statistics.median(values) if values else None
    return {"step_ms": median("step_ms"), "tok_per_s": median("tok_per_s"), "mfu": median("mfu"),
            "peak_mem_mb": median("peak_mem_mb"), "first_val": val[0] if val else None,
            "last_val": val[-1] if val else None}


def bench_table(result):
    """The headline columns of bench.py's speed rows, and each step's ratio to dense."""
    rows = result["rows"]
    dense = next((r["step_ms"] for r in rows if r["variant"] == "dense"), None)
    table = ["| variant | D | experts | ms/step | x dense | tokens/s | MFU | peak MiB | graph breaks | recompiles |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["step_ms"] / dense if dense else None
        table.append(f"| {r['variant']} | {r['expert_hidden']} | {r.get('expert_path') or '–'} | "
                     f"{r['step_ms']:.1f} | {fmt(ratio, '.2f')} | "
                     f"{r['tokens_per_s']:,.0f} | {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_mem_mb'), ',.0f')} | "
                     f"{fmt(r.get('graph_breaks'), 'd')} | {fmt(r.get('recompiles_during_timing'), 'd')} |")
    return table


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def stage_runs(skip, out):
    """(name, stage, command, run_dir) of each run to do; run_dir: the train run's out_dir, else None."""
    runs = [("tests", "tests", [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"], None),
            ("bench", "bench", [sys.executable, "bench.py", "speed", "--preset", "gpu", "--compile", "compile",
                                "--variants", ",".join(VARIANTS), "--reps", "10", "--out_dir", str(out)], None)]
    runs += [(f"train {v}", "train", [sys.executable, "train.py", f"--ffn={v}", f"--out_dir={out / f'train-{v}'}",
                                      *TRAIN_OPTIONS], out / f"train-{v}") for v in VARIANTS]
    return [r for r in runs if r[1] not in skip]


def verdict(code, run_dir):
    """"passed", or why not: a timeout, the exit code, or (a train run) a validation loss that did not fall."""
    if code != 0:
        return "timeout" if code == "timeout" else f"failed: exit {code}"
    if run_dir is None:
        return "passed"
    s = train_summary(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
    fell = s.get("last_val") is not None and s["last_val"] < s["first_val"]
    return "passed" if fell else "failed: val loss did not fall"


def run_stages(runs, compile_s, deadline, out, clock=time.time):
    """Run each (name, stage, command, run_dir) within its limit; a (name, status, seconds, limit) row for each."""
    predicted = [STAGES[stage][0] * compile_s + STAGES[stage][1] for _, stage, _, _ in runs]
    rows = []
    for i, (name, stage, cmd, run_dir) in enumerate(runs):
        limit = stage_limit(predicted[i:], deadline - clock())
        if limit is None:
            others = ",".join(s for s in STAGES if s != stage)
            rows.append((name, f"not run: predicted {predicted[i]:.0f} s, {deadline - clock():.0f} s of the "
                               f"{BUDGET_S} s left (check it alone: --skip {others})", None, None))
        else:
            if run_dir:  # no numbers of an earlier check in this out_dir
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            code, secs = run(cmd, limit, out / f"{name.replace(' ', '-')}.log")
            rows.append((name, verdict(code, run_dir), secs, limit))
        print(f"{name}: {rows[-1][1]}", flush=True)
    return rows


def summary(rows, compile_s, out):
    """The stage table, then the numbers of the bench and train runs that ran."""
    lines = [f"## Stages (limits from a cold compile of {compile_s:.1f} s; {BUDGET_S} s in all)", "",
             "| stage | status | seconds | limit s |", "|---|---|---:|---:|",
             *(f"| {name} | {status} | {fmt(secs, '.0f')} | {fmt(limit, '.0f')} |" 
               for name, status, secs, limit in rows)]
    ran = {name for name, _, secs, _ in rows if secs is not None}
    if ("bench", "passed") in {row[:2] for row in rows}:   # bench.py writes its JSON when it is done
        lines += ["", "## bench.py speed --preset gpu (compiled, bf16, matched active FLOPs; all of it in bench.log)",
                  "", *bench_table(json.loads((out / "bench_speed.json").read_text()))]
    trained = [v for v in VARIANTS if f"train {v}" in ran and (out / f"train-{v}" / "metrics.jsonl").is_file()]
    if trained:
        lines += ["", f"## train.py, compiled bf16, 60 steps ({' '.join(TRAIN_OPTIONS[:6])})", "",
                  "| variant | ms/step | tokens/s | MFU | peak MiB | val loss (step 0 -> 60) |",
                  "|---|---:|---:|---:|---:|---|"]
        for v in trained:
            s = train_summary(out / f"train-{v}")
            lines.append(f"| {v} | {fmt(s['step_ms'], '.1f')} | {fmt(s['tok_per_s'], ',.0f')} | "
                         f"{fmt(s['mfu'], '.1%')} | {fmt(s['peak_mem_mb'], ',.0f')} | "
                         f"{fmt(s['first_val'], '.3f')} -> {fmt(s['last_val'], '.3f')} |")
    return lines


def check(argv):
    """The whole check; returns the exit code (0 every stage passed, else 1)."""
    p = Parser(prog="gpu_check.py", description="Run the GPU checks (needs a CUDA GPU; no network).")
    p.add_argument("--out_dir", default="gpu_check_out")
    p.add_argument("--skip", default="", help=f"comma-separated stages to skip: {', '.join(STAGES)}")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STAGES):
        p.error(f"unknown stage(s) {', '.join(sorted(skip - set(STAGES)))}; use {', '.join(STAGES)}")
    import torch
    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible to torch here; run this on a machine with one "
                        "(the CPU tests are `python -m pytest -q`)")
    deadline = time.time() + BUDGET_S
    out = (REPO / args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONUNBUFFERED"] = "1"     # the logs show progress as it happens
    env = ["## Environment", "", *[f"- {k}: {v}" for k, v in environment().items()]]
    print("\n".join(env), flush=True)
    try:
        compile_s, measured = measure_compile_s(), "passed"
    except Exception as e:  # report it and size the stages from an assumption: the stages show what fails
        compile_s, measured = FALLBACK_COMPILE_S, f"failed ({type(e).__name__}: {e}); {FALLBACK_COMPILE_S} s assumed"
    print(f"one cold compile: {compile_s:.1f} s ({measured})", flush=True)
    if "train" not in skip:
        from data.prepare import DataError, ensure_dataset
        try:
            ensure_dataset("shakespeare")
        except DataError as e:   # the train runs then fail and say why in their logs
            print(f"note: {e}", flush=True)
    rows = [("cold compile (train uoe model)", measured, compile_s if measured == "passed" else None, None)]
    rows += run_stages(stage_runs(skip, out), compile_s, deadline, out)
    ok = all(status == "passed" for _, status, _, _ in rows)
    report = [*summary(rows, compile_s, out), "", f"all stages passed: {ok}"]
    (out / "summary.md").write_text("\n".join(["# gpu_check.py", "", *env, "", *report]) + "\n")
    print("\n" + "\n".join(report) + f"\nsummary in {out / 'summary.md'}, logs beside it")
    return 0 if ok else 1


def main(argv=None):
    code = {}

    def run_check(argv):
        code["exit"] = check(argv)
    rc = cli(run_check, sys.argv[1:] if argv is None else argv,
             interrupted="interrupted: the running stage was stopped; summary.md is not written")
    return code.get("exit", rc)


if __name__ == "__main__":
    sys.exit(main())
