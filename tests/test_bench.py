"""Tests for bench.py: argument handling, its arithmetic on known numbers, and tiny end-to-end
runs. No assertions on speed: the machine is shared and timings swing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import uoe

MICRO = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "8", "--batch_size", "2",
         "--n_expert", "4", "--top_k", "2", "--expert_hidden", "16", "--threads", "1"]


# ---- arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    ([], "no command"),
    (["fly"], "invalid choice"),
    (["speed", "--n_layer", "x"], "--n_layer"),
    (["speed", "--n_layer", "0"], "--n_layer"),
    (["speed", "--variants", "moe,gshard"], "gshard"),
    (["speed", "--compile", "sometimes"], "--compile"),
    (["speed", "--n_head", "3"], "n_embd"),                 # GPTConfig's own validation
    (["speed", "--top_k", "9"], "top_k"),
    (["speed", "--preset", "gpu", "--device", "cpu"], "gpu"),
    (["speed", "--dtype", "bfloat16", "--device", "cpu"], "bfloat16"),
    (["quality", "--match", "vibes"], "--match"),
    (["quality", "--lr", "-1"], "--lr"),
    (["speed", "--unknown_flag", "1"], "unrecognized"),
])
def test_bad_arguments_exit_2_with_one_error_line(argv, words, capsys, tmp_path):
    assert bench.main(argv + ["--out_dir", str(tmp_path)] if argv[:1] in (["speed"], ["quality"]) else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not list(tmp_path.iterdir())                    # nothing written


def test_bad_arguments_from_the_command_line_exit_2_without_traceback():
    r = subprocess.run([sys.executable, str(Path(bench.__file__)), "speed", "--reps", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")


def test_preset_defaults_fill_what_the_command_line_leaves_out():
    a = bench.parse_args(["speed", "--n_layer", "3", "--variants", "uoe,moe,uoe"])
    assert a.n_layer == 3 and a.n_embd == bench.PRESETS["cpu"]["n_embd"]
    assert a.variants == ["uoe", "moe"]                    # order kept, duplicates dropped
    assert a.compile == "both" and a.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert a.json == str(Path("bench_out") / "bench_speed.json")
    q = bench.parse_args(["quality", "--seeds", "3", "--match", "params", "--json", "x.json"])
    assert q.seeds == 3 and q.match == ["params"] and q.json == "x.json"
    assert q.steps == bench.QUALITY_PRESETS["cpu"]["steps"] and q.compile == "eager"


# ---- arithmetic --------------------------------------------------------------------------------

def test_training_flops_are_three_forwards():
    c = uoe.GPTConfig(vocab_size=65, n_layer=2, n_embd=32, n_head=2, block_size=16, expert_hidden=32)
    assert bench.train_flops(c, 10) == 3 * 10 * uoe.flops_per_token(c)
    assert bench.flop_rate(c, 10, 0.5) == pytest.approx(60 * uoe.flops_per_token(c))


def test_matmul_rate_mfu_and_matmul_fraction():
    assert bench.matmul_rate(1024, 1.0) == 2 * 1024 ** 3
    assert bench.matmul_rate(2, 1e-3) == pytest.approx(16e3)
    assert bench.gpu_peak_flops("NVIDIA H200") == 989e12
    assert bench.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.gpu_peak_flops("Some Future GPU") is None
    assert bench.gpu_peak_flops("Some Future GPU", override_tflops=100) == 100e12
    assert bench.utilization(494.5e12, 989e12) == pytest.approx(0.5)   # MFU
    assert bench.utilization(20e9, 80e9) == pytest.approx(0.25)        # fraction of the matmul rate
    assert bench.utilization(1.0, None) is None


def test_mean_std_and_ratios():
    assert bench.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert bench.mean_std([1.5]) == (1.5, 0.0)
    rows = [dict(variant=v, mode="eager", step_ms=t, ffn=None) for v, t in
            (("dense", 10.0), ("moe", 20.0), ("aoe", 30.0), ("uoe", 21.0))]
    r = bench.speed_ratios(rows)["eager"]
    assert r["uoe_over_moe"] == pytest.approx(1.05) and r["aoe_over_uoe"] == pytest.approx(30 / 21)
    assert r["moe_over_dense"] == 2.0


def test_variants_are_matched_to_the_uoe_configuration():
    base = uoe.GPTConfig(vocab_size=65, n_layer=2, n_embd=64, n_head=2, block_size=32, expert_hidden=128)
    for by, metric in (("flops", uoe.flops_per_token), ("params", lambda c: uoe.param_counts(c)[0])):
        configs = bench.matched_configs(base, uoe.FFN_VARIANTS, by)
        assert configs["uoe"] == base
        for c in configs.values():
            assert metric(c) == pytest.approx(metric(base), rel=0.02)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert bench.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert bench.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert bench.lr_at(99, 100, 1.0, 10) == pytest.approx(0.1)
    assert bench.lr_at(0, 5, 1.0, 0) == pytest.approx(1.0)


# ---- end to end --------------------------------------------------------------------------------

def test_speed_runs_end_to_end_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert bench.main(["speed", *MICRO, "--reps", "1", "--warmup", "1", "--compile", "eager",
                       "--memory", "off", "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"device", "device_name", "torch", "threads", "matmul", "rows", "ratios", "configs"} <= res.keys()
    assert [r["variant"] for r in res["rows"]] == list(uoe.FFN_VARIANTS)
    for r in res["rows"]:
        assert {"step_ms", "tokens_per_s", "achieved_flops", "matmul_fraction", "peak_mem_mb", "ffn"} <= r.keys()
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["achieved_flops"] > 0 and r["matmul_fraction"] > 0
        assert r["ffn"]["ffn_ms"] > 0
        if r["variant"] != "dense":
            assert r["ffn"]["experts_ms"] > 0 and r["ffn"]["dense_equiv_ms"] > 0
            assert 0 <= r["ffn"]["routing_flop_share"] < 1
    assert res["matmul"]["flops_per_s"] > 0
    assert {"uoe_over_moe", "aoe_over_uoe"} <= res["ratios"]["eager"].keys()
    printed = capsys.readouterr().out
    assert "| variant | mode |" in printed and "| uoe | eager |" in printed


def test_speed_measures_peak_memory_in_a_fresh_process(tmp_path):
    out = tmp_path / "s.json"
    assert bench.main(["speed", *MICRO, "--variants", "uoe", "--reps", "1", "--warmup", "1",
                       "--compile", "eager", "--device", "cpu", "--json", str(out)]) == 0
    mem = json.loads(out.read_text())["rows"][0]["peak_mem_mb"]
    assert isinstance(mem, float) and mem >= 0


def test_quality_trains_every_variant_on_the_same_data_and_plots(tmp_path, monkeypatch, capsys):
    data = torch.randint(0, 11, (3000,))
    monkeypatch.setattr(bench, "load_dataset", lambda name: (data, data[:500], {"vocab_size": 11}))
    out = tmp_path / "q.json"
    assert bench.main(["quality", *MICRO, "--variants", "dense,moe,uoe", "--steps", "3", "--seeds", "2",
                       "--eval_interval", "2", "--eval_iters", "2", "--warmup_steps", "1", "--device", "cpu",
                       "--out_dir", str(tmp_path), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["tables"]) == {"flops", "params"}
    for by, rows in res["tables"].items():
        assert list(rows) == ["dense", "moe", "uoe"]
        for r in rows.values():
            assert len(r["val_loss_per_seed"]) == 2 and r["val_loss_std"] >= 0
            assert [s for s, _ in r["runs"][0]["val"]] == [2, 3]
    # uoe is the same config in both tables: trained once, reported twice
    assert res["tables"]["flops"]["uoe"]["val_loss_per_seed"] == res["tables"]["params"]["uoe"]["val_loss_per_seed"]
    assert (tmp_path / "quality_curves.png").stat().st_size > 0
    assert "matched total parameters" in capsys.readouterr().out
