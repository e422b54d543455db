"""gpu_check.py without a GPU: a one-line refusal, and the tables it builds from bench/train output."""
import json
import subprocess
import sys

import pytest
import torch

import gpu_check
from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the check would run for real")
def test_without_a_gpu_it_exits_2_with_one_line():
    p = subprocess.run([sys.executable, "gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: no CUDA GPU")


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--skip", "tests,nope"])
    assert e.value.code == 2


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
