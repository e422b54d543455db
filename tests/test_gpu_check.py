"""gpu_check.py without a GPU: a one-line refusal, the stage limits sized from a measured compile time (with a
fake runner and clock), the timeout of a stage, Ctrl-C / SIGTERM and a closed output pipe (with a faked GPU), and the
tables it builds from bench/train output."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the check would run for real")
def test_without_a_gpu_it_exits_2_with_one_line(capsys):
    assert gpu_check.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: no CUDA GPU")


def test_unknown_stage_is_refused_in_one_line(capsys):
    assert gpu_check.main(["--skip", "tests,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown stage(s) nope")


def test_train_summary_skips_the_compiling_records_and_takes_medians(tmp_path):
    records = [{"kind": "eval", "step": 0, "val_loss": 10.8}]
    records += [{"kind": "train", "step": 5 * i, "step_ms": ms, "tok_per_s": 8192 / ms * 1e3, "mfu": None}
                for i, ms in enumerate([9000.0, 800.0, 20.0, 22.0, 21.0], 1)]
    records.append({"kind": "eval", "step": 60, "val_loss": 6.5})
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
    s = gpu_check.train_summary(tmp_path)
    assert s["step_ms"] == 21.0 and s["tok_per_s"] == pytest.approx(8192 / 21.0 * 1e3)
    assert s["mfu"] is None and s["peak_mem_mb"] is None
    assert (s["first_val"], s["last_val"]) == (10.8, 6.5)


def test_bench_table_gives_each_step_against_dense():
    rows = [dict(variant="dense", expert_hidden=3072, step_ms=100.0, tokens_per_s=81920.0, mfu=0.41,
                 peak_mem_mb=20000.0, graph_breaks=0, recompiles_during_timing=0),
            dict(variant="uoe", expert_hidden=1024, expert_path="grouped", step_ms=125.0, tokens_per_s=65536.0,
                 mfu=0.33, peak_mem_mb=None, graph_breaks=0, recompiles_during_timing=0)]
    table = gpu_check.bench_table({"rows": rows})
    assert table[2].startswith("| dense | 3072 | – | 100.0 | 1.00 | 81,920 | 41.0% | 20,000 | 0 | 0 |")
    assert table[3].startswith("| uoe | 1024 | grouped | 125.0 | 1.25 | 65,536 | 33.0% | – | 0 | 0 |")


def test_train_summary_skips_a_record_cut_off_by_a_timeout(tmp_path):
    lines = [json.dumps({"kind": "eval", "step": 0, "val_loss": 10.8}),
             json.dumps({"kind": "train", "step": 5, "step_ms": 30.0}), '{"kind": "train", "st']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    s = gpu_check.train_summary(tmp_path)
    assert s["first_val"] == s["last_val"] == 10.8 and s["step_ms"] is None


def test_stage_limit_is_twice_the_prediction_less_what_later_runs_need():
    assert gpu_check.MARGIN == 2.0
    assert gpu_check.stage_limit([10, 20, 30], 100) == 20           # plenty of time: 2 x 10
    assert gpu_check.stage_limit([10, 20, 30], 70) == 20            # 70 - 50 = 20 left for the first
    assert gpu_check.stage_limit([10, 20, 30], 65) == 15            # later runs keep their predicted time
    assert gpu_check.stage_limit([10, 20, 30], 35) == 15            # 30 does not fit after 10 + 20: not kept
    assert gpu_check.stage_limit([10, 20, 30], 12) == 12            # only the first fits
    assert gpu_check.stage_limit([50, 1], 40) is None                # not even the first: not run


RUNS = ["tests", "bench", "train dense", "train moe", "train uoe"]


class FakeGPU:
    """gpu_check.run and a clock for run_stages: each run takes `took[name]` seconds (its limit if that is less)."""

    def __init__(self, monkeypatch, took):
        self.now, self.took, self.limits = 0.0, took, {}
        monkeypatch.setattr(gpu_check, "run", self.run)

    def clock(self):
        return self.now

    def run(self, cmd, limit, log):
        name = log.stem.replace("-", " ")
        self.limits[name] = limit
        secs = min(limit, self.took[name])
        self.now += secs
        return ("timeout" if self.took[name] > limit else 0), secs


def fake_runs(tmp_path, skip=()):
    """The check's runs, each judged by its exit code alone (verdict's loss check has its own test)."""
    return [(name, stage, cmd, None) for name, stage, cmd, _ in gpu_check.stage_runs(set(skip), tmp_path)]


def test_limits_are_sized_from_the_measured_compile_time(tmp_path, monkeypatch):
    """A compile twice as slow gets limits twice as long on its compile part, within the same budget."""
    limits = {}
    for compile_s in (5, 10):
        gpu = FakeGPU(monkeypatch, dict.fromkeys(RUNS, 1))
        rows = gpu_check.run_stages(fake_runs(tmp_path), compile_s, 480, tmp_path, gpu.clock)
        assert [r[1] for r in rows] == ["passed"] * 5
        limits[compile_s] = gpu.limits
    assert limits[5]["tests"] == 2 * (4 * 5 + 30) and limits[10]["tests"] == 2 * (4 * 10 + 30)
    assert limits[5]["train moe"] == 2 * (2 * 5 + 20) and limits[10]["train moe"] == 2 * (2 * 10 + 20)


def test_a_timeout_is_reported_and_every_stage_gets_a_row_within_the_budget(tmp_path, monkeypatch):
    took = {"tests": 60, "bench": 10_000, "train dense": 30, "train moe": 30, "train uoe": 30}   # bench hangs
    gpu = FakeGPU(monkeypatch, took)
    rows = gpu_check.run_stages(fake_runs(tmp_path), 20, 400, tmp_path, gpu.clock)
    status = {name: s for name, s, _, _ in rows}
    assert list(status) == ["tests", "bench", "train dense", "train moe", "train uoe"]
    assert status["tests"] == "passed" and status["bench"] == "timeout"
    assert all(status[f"train {v}"] == "passed" for v in gpu_check.VARIANTS)   # bench left them their time
    assert gpu.now <= 400
    assert "| bench | timeout | " in "\n".join(gpu_check.summary(rows, 20, tmp_path))


def test_a_run_that_does_not_fit_is_reported_as_not_run(tmp_path, monkeypatch):
    """A 60 s compile predicts 285 s for bench and 140 s per train run: 705 s, more than the 480 s."""
    gpu = FakeGPU(monkeypatch, {"bench": 200, "train dense": 130, "train moe": 130, "train uoe": 130})
    rows = gpu_check.run_stages(fake_runs(tmp_path, skip=["tests"]), 60, 480, tmp_path, gpu.clock)
    assert [r[:2] for r in rows[:3]] == [("bench", "passed"), ("train dense", "passed"), ("train moe", "passed")]
    assert gpu.limits == {"bench": 340, "train dense": 140, "train moe": 150}
    assert rows[3][:2] == ("train uoe", "not run: predicted 140 s, 20 s of the 480 s left "
                                        "(check it alone: --skip tests,bench)") and rows[3][2] is None
    assert gpu.now <= 480


def test_a_train_run_passes_only_when_its_val_loss_fell(tmp_path):
    records = [{"kind": "eval", "step": 0, "val_loss": 10.8}, {"kind": "eval", "step": 60, "val_loss": 11.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
    assert gpu_check.verdict(0, tmp_path) == "failed: val loss did not fall"
    assert gpu_check.verdict(0, tmp_path / "never_ran") == "failed: val loss did not fall"
    assert gpu_check.verdict(1, None) == "failed: exit 1" and gpu_check.verdict("timeout", None) == "timeout"
    records[1]["val_loss"] = 6.5
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
    assert gpu_check.verdict(0, tmp_path) == "passed"


def test_a_timeout_kills_the_whole_process_group(tmp_path):
    """A stage's children (inductor's compile workers) must not outlive its time limit."""
    child = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    code, secs = gpu_check.run([sys.executable, "-c", script], 1.0, tmp_path / "log")
    assert code == "timeout" and secs < 30
    pid = int(child.read_text())
    assert gone(pid, timeout=5), f"process {pid} outlived the timeout"


def gone(pid, timeout=10):
    """Whether process pid has ended (or is a zombie waiting for its parent or init to reap it), waiting up to
    timeout seconds for it."""
    deadline = time.time() + timeout
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.05)


# a stage that starts a worker (as inductor does), writes both pids and sleeps; with ignore_term both ignore
# SIGTERM, so that only the kill after the grace period ends them
STAGE = """
import signal, subprocess, sys, time
if {ignore_term}:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ignore = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if {ignore_term} else ""
worker = subprocess.Popen([sys.executable, "-c", ignore + "import time; time.sleep(120)"])
open({pids!r}, "w").write(f"{{__import__('os').getpid()}} {{worker.pid}}")
time.sleep(120)
"""
# gpu_check.main as on a GPU machine, its one stage the one above
CHECK = """
import sys
sys.path.insert(0, {repo!r})
import torch
import gpu_check
torch.cuda.is_available = lambda: True
gpu_check.environment = lambda: {{"gpu": "fake"}}
gpu_check.measure_compile_s = lambda: 1.0
gpu_check.stage_runs = lambda skip, out: [("tests", "tests", [sys.executable, "-c", {stage!r}], None)]
gpu_check.STOP_GRACE_S = 1
sys.exit(gpu_check.main(["--skip", "train", "--out_dir", {out!r}]))
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups")
@pytest.mark.parametrize("signum, ignore_term", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                                 (signal.SIGTERM, True)])
def test_ctrl_c_or_sigterm_stops_the_running_stage_before_the_check_exits(tmp_path, signum, ignore_term):
    """The stage runs in a session of its own, so a Ctrl-C in the terminal never reaches it: gpu_check ends its
    whole process group (SIGTERM, then SIGKILL after STOP_GRACE_S for what is left) before it exits 130 / 143."""
    pids = tmp_path / "pids"
    stage = STAGE.format(ignore_term=ignore_term, pids=str(pids))
    check = subprocess.Popen([sys.executable, "-c", CHECK.format(repo=str(gpu_check.REPO), stage=stage,
                                                                 out=str(tmp_path / "out"))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(2400):
            if pids.exists() and len(pids.read_text().split()) == 2:
                break
            assert check.poll() is None, check.communicate()
            time.sleep(0.05)
        stage_pids = [int(pid) for pid in pids.read_text().split()]            # the stage and its worker
        check.send_signal(signum)
        out, err = check.communicate(timeout=60)
        assert check.returncode == 128 + signum
        assert err.strip() == "interrupted: the running stage was stopped; summary.md is not written"
        assert all(gone(pid) for pid in stage_pids), "a process of the stage outlived gpu_check"
    finally:
        if check.poll() is None:
            check.kill()
            check.wait()
        for pid in (int(p) for p in (pids.read_text().split() if pids.exists() else ())):
            if not gone(pid, timeout=0):                                       # the test failed: clean up
                os.kill(pid, signal.SIGKILL)


def test_a_closed_output_pipe_ends_the_check_quietly(tmp_path):
    """`python gpu_check.py | head -1`: 141 (128 + SIGPIPE), without a traceback; its reader left before the
    environment's first line, so no stage started."""
    read, write = os.pipe()
    os.close(read)
    pids = tmp_path / "pids"
    try:
        r = subprocess.run([sys.executable, "-c", CHECK.format(repo=str(gpu_check.REPO), out=str(tmp_path / "out"),
                                                               stage=STAGE.format(ignore_term=False, pids=str(pids)))],
                           stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == "" and not pids.exists()


def test_main_reports_every_stage_when_the_compile_measurement_fails_and_bench_times_out(tmp_path, monkeypatch):
    import data.prepare

    def no_compile():
        raise RuntimeError("inductor crashed")

    def fake_run(cmd, limit, log):
        log.write_text("output\n")
        if "bench.py" in cmd:
            return "timeout", limit
        if "train.py" in cmd:   # a run that lowers the loss
            run_dir = Path(next(a for a in cmd if a.startswith("--out_dir=")).split("=", 1)[1])
            run_dir.mkdir(parents=True)
            records = [{"kind": "eval", "step": 0, "val_loss": 10.8}, {"kind": "eval", "step": 60, "val_loss": 6.5}]
            (run_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
        return 0, 1.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "environment", lambda: {"gpu": "fake"})
    monkeypatch.setattr(gpu_check, "measure_compile_s", no_compile)
    monkeypatch.setattr(gpu_check, "run", fake_run)
    monkeypatch.setattr(data.prepare, "ensure_dataset", lambda name: None)
    assert gpu_check.main(["--out_dir", str(tmp_path / "out")]) == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| cold compile (train uoe model) | failed (RuntimeError: inductor crashed); 30 s assumed | – | – |" \
        in summary
    assert "| tests | passed | 1 | 155 |" in summary   # 480 s less the 325 s predicted for bench and two train runs
    assert "| bench | timeout | " in summary and "## bench.py" not in summary
    for v in gpu_check.VARIANTS:
        assert f"| train {v} | passed | 1 | 160 |" in summary          # 2 x (2 x 30 + 20)
        assert f"| {v} | – | – | – | – | 10.800 -> 6.500 |" in summary
    assert summary.endswith("all stages passed: False\n")
