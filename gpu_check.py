"""
Check the GPU paths in one command, offline, from the repository root:

    python gpu_check.py                 # ~6-8 minutes on one H100-class GPU
    python gpu_check.py --skip tests    # any of: tests, bench, train

1. environment: torch, CUDA, the GPU, whether this torch has grouped_mm, which expert path
   `auto` picks at the GPU preset;
2. the CUDA tests (tests/test_cuda.py: grouped GEMM == loop in bf16, compiled bf16 training);
3. `bench.py speed --preset gpu` for dense, moe and uoe, compiled (step time, tokens/s, MFU,
   peak memory, graph breaks, recompiles) at matched active FLOPs;
4. a short compiled bf16 `train.py` run per variant on GPT-2 BPE tiny Shakespeare (prepared from
   the files in data/, no download), read back from its metrics.jsonl.

Each stage has its own time limit, so the whole stays under 8 minutes; a stage that fails or
times out is reported and the others still run. Everything goes to --out_dir (default
gpu_check_out/), with the summary in summary.md. Exit code 0 only when every stage passed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
STAGES = ("tests", "bench", "train")
VARIANTS = ("dense", "moe", "uoe")
# the train runs: a 6 x 512 model, big enough for the GPU to matter, small enough to compile fast
TRAIN_OPTIONS = ["--dataset=shakespeare", "--n_layer=6", "--n_head=8", "--n_embd=512", "--expert_hidden=1024",
                 "--block_size=512", "--batch_size=16", "--max_iters=60", "--eval_interval=60", "--eval_iters=5",
                 "--log_interval=5", "--warmup_iters=10", "--learning_rate=6e-4", "--min_lr=6e-5",
                 "--device=cuda", "--dtype=bfloat16", "--compile=True", "--plot=False", "--overwrite=True"]
LIMITS = {"tests": 180, "bench": 180, "train": 40}   # seconds (train: per variant); 480 s in all


def run(cmd, limit, log):
    """(exit code or 'timeout', seconds, output tail) of cmd, its output also written to log."""
    t0 = time.time()
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    tail = Path(log).read_text(errors="replace").strip().splitlines()[-12:]
    return code, time.time() - t0, tail


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
    """Median step time, tokens/s, MFU and peak memory of a run's timed train records."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Run the GPU checks (needs a CUDA GPU; no network).")
    p.add_argument("--out_dir", default="gpu_check_out")
    p.add_argument("--skip", default="", help=f"comma-separated stages to skip: {', '.join(STAGES)}")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STAGES):
        p.error(f"unknown stage(s) {', '.join(sorted(skip - set(STAGES)))}; use {', '.join(STAGES)}")
    import torch
    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible to torch here; run this on a machine with one "
              "(the CPU tests are `python -m pytest -q`)", file=sys.stderr)
        return 2
    out = (REPO / args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONUNBUFFERED"] = "1"     # the logs show progress as it happens
    lines, ok = ["# gpu_check.py", ""], True

    facts = environment()
    lines += ["## Environment", "", *[f"- {k}: {v}" for k, v in facts.items()], ""]
    print("\n".join(lines), flush=True)

    if "tests" not in skip:
        code, secs, tail = run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"],
                               LIMITS["tests"], out / "tests.log")
        ok &= code == 0
        lines += ["## CUDA tests", "", f"`python -m pytest -q tests/test_cuda.py`: "
                  f"exit {code} in {secs:.0f} s; {tail[-1] if tail else ''}", ""]
        print("\n".join(lines[-4:]), flush=True)

    if "bench" not in skip:
        cmd = [sys.executable, "bench.py", "speed", "--preset", "gpu", "--variants", ",".join(VARIANTS),
               "--compile", "compile", "--reps", "10", "--out_dir", str(out)]
        code, secs, _ = run(cmd, LIMITS["bench"], out / "bench.log")
        ok &= code == 0
        table = bench_table(json.loads((out / "bench_speed.json").read_text())) if code == 0 else []
        lines += ["## bench.py speed --preset gpu (compiled, bf16, matched active FLOPs)", "",
                  f"`{' '.join(cmd[1:])}`: exit {code} in {secs:.0f} s (full table in bench.log)", "", *table, ""]
        print("\n".join(lines[-len(table) - 4:]), flush=True)

    if "train" not in skip:
        from data.prepare import ensure_dataset
        ensure_dataset("shakespeare")
        rows = ["| variant | exit | wall s | ms/step | tokens/s | MFU | peak MiB | val loss (step 0 -> 60) |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for v in VARIANTS:
            run_dir = out / f"train-{v}"
            code, secs, _ = run([sys.executable, "train.py", f"--ffn={v}", f"--out_dir={run_dir}", *TRAIN_OPTIONS],
                                LIMITS["train"], out / f"train-{v}.log")
            s = train_summary(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
            lowered = s.get("last_val") is not None and s["last_val"] < s["first_val"]
            ok &= code == 0 and lowered
            rows.append(f"| {v} | {code} | {secs:.0f} | {fmt(s.get('step_ms'), '.1f')} | "
                        f"{fmt(s.get('tok_per_s'), ',.0f')} | {fmt(s.get('mfu'), '.1%')} | "
                        f"{fmt(s.get('peak_mem_mb'), ',.0f')} | {fmt(s.get('first_val'), '.3f')} -> "
                        f"{fmt(s.get('last_val'), '.3f')} |")
            print(rows[-1], flush=True)
        lines += ["## train.py, compiled bf16, 60 steps (" + " ".join(TRAIN_OPTIONS[:8]) + ")", "", *rows, ""]

    lines.append(f"all stages passed: {ok}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"\nall stages passed: {ok}; summary in {out / 'summary.md'}, logs beside it")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
