"""Tests for bench.py (the speed benchmark): argument handling, its arithmetic on known numbers, and
tiny end-to-end runs. No assertions on speed: the machine is shared and timings swing. The study
(study.py) has its own tests, tests/test_study.py; what the scripts share (harness.py) is tested at the end."""

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import harness
import train
import uoe

REPO = Path(bench.__file__).resolve().parent

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
    (["speed", "--unknown_flag", "1"], "unrecognized"),
    (["quality"], "invalid choice"),                        # the study is study.py's alone
])
def test_bad_arguments_exit_2_with_one_error_line(argv, words, capsys, tmp_path):
    assert bench.main(argv + ["--out_dir", str(tmp_path)] if argv else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not list(tmp_path.iterdir())                    # nothing written


@pytest.mark.parametrize("script, argv", [("bench.py", ["speed", "--reps", "0"]),
                                          ("study.py", ["quality", "--seeds", "0"])])
def test_bad_arguments_from_the_command_line_exit_2_without_traceback(script, argv, monkeypatch, capsys):
    """python bench.py speed ... / python study.py quality ...: the scripts' __main__ (run here, not in a new
    interpreter: torch is imported already) and its one-line error."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"error: argument {argv[1]}")
    assert f"{script} {argv[0]} --help" in err


def test_preset_defaults_fill_what_the_command_line_leaves_out():
    a = bench.parse_args(["speed", "--n_layer", "3", "--variants", "uoe,moe,uoe"])
    assert a.n_layer == 3 and a.n_embd == bench.PRESETS["cpu"]["n_embd"]
    assert a.variants == ["uoe", "moe"]                    # order kept, duplicates dropped
    assert a.compile == "both" and a.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert a.json == str(Path("bench_out") / "bench_speed.json")


def test_a_step_is_train_py_s_recipe():
    """The optimizer and the clip of a default train.py run (AdamW, beta2 0.99), not a copy of their own."""
    model = uoe.GPT(uoe.GPTConfig(vocab_size=65, n_layer=1, n_embd=16, n_head=2, block_size=8, expert_hidden=16))
    opt = bench.optimizer(model)
    recipe = train.TrainConfig()
    assert isinstance(opt, torch.optim.AdamW) and bench.make_optimizer is train.make_optimizer
    for g in opt.param_groups:
        assert g["betas"] == (recipe.beta1, recipe.beta2) and g["lr"] == recipe.learning_rate
    assert [g["weight_decay"] for g in opt.param_groups] == [recipe.weight_decay, 0.0]
    assert bench.RECIPE.grad_clip == recipe.grad_clip


# ---- arithmetic --------------------------------------------------------------------------------

def test_training_flops_are_three_forwards():
    c = uoe.GPTConfig(vocab_size=65, n_layer=2, n_embd=32, n_head=2, block_size=16, expert_hidden=32)
    assert bench.train_flops(c, 10) == 3 * 10 * uoe.flops_per_token(c)
    assert bench.flop_rate(c, 10, 0.5) == pytest.approx(60 * uoe.flops_per_token(c))


def test_matmul_rate_mfu_and_matmul_fraction():
    assert bench.matmul_rate(1024, 1.0) == 2 * 1024 ** 3
    assert bench.matmul_rate(2, 1e-3) == pytest.approx(16e3)
    import train                                   # one table of GPU peaks, train.py's
    assert bench.mfu_peak is train.mfu_peak and not hasattr(bench, "GPU_PEAK_BF16")
    assert bench.mfu_peak("NVIDIA H200", "bfloat16")[0] == 989e12
    assert bench.utilization(494.5e12, 989e12) == pytest.approx(0.5)   # MFU
    assert bench.utilization(20e9, 80e9) == pytest.approx(0.25)        # fraction of the matmul rate
    assert bench.utilization(1.0, None) is None


def test_speed_ratios():
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
        f = r["ffn"]
        assert sum(f[f"{p}_flop_share"] for p in ("scoring", "shared", "experts")) == pytest.approx(1)
        assert sum(f[f"{p}_share"] for p in ("scoring", "shared", "experts")) == pytest.approx(1)
        assert r["flop_mismatch"] == pytest.approx(0, abs=0.05)
        if r["variant"] != "dense":
            assert f["experts_ms"] > 0 and f["dense_equiv_ms"] > 0 and r["expert_path"] in ("loop", "grouped")
            assert 0 < f["experts_flop_share"] < 1
        if r["variant"] == "uoe":                    # the VSE is timed and counted apart from scoring
            assert f["shared_ms"] > 0 and 0 < f["shared_flop_share"] < 1 and f["scoring_flop_share"] > 0
        if r["variant"] == "moe":
            assert f["shared_ms"] == 0 and f["shared_flop_share"] == 0
    assert res["matmul"]["flops_per_s"] > 0
    assert {"uoe_over_moe", "aoe_over_uoe"} <= res["ratios"]["eager"].keys()
    assert res["expert_paths"]["uoe"] in ("loop", "grouped")
    printed = capsys.readouterr().out
    assert "| variant | mode |" in printed and "| uoe | eager |" in printed
    assert "VSE/shared ms (time, FLOPs)" in printed and "expert path: moe " in printed


def test_matched_widths_can_be_rounded_for_aligned_gemms():
    base = uoe.GPTConfig(vocab_size=50304, n_layer=2, n_embd=768, n_head=12, block_size=64, expert_hidden=1024)
    configs = bench.matched_configs(base, uoe.FFN_VARIANTS, "flops", multiple_of=64)
    assert configs["uoe"] == base and all(c.expert_hidden % 64 == 0 for c in configs.values())
    assert bench.parse_args(["speed"]).multiple_of == 1 and bench.PRESETS["gpu"]["multiple_of"] == 64


class MoEWithAnotherName(uoe.MoEFFN):
    """A variant that bench.py was never told about: registered in uoe.py, and nowhere else."""


def micro_run(variant, tmp_path, **config):
    """A bench.Run of MICRO's model with `variant`'s FFN, and its args."""
    args = bench.parse_args(["speed", *MICRO, "--device", "cpu", "--out_dir", str(tmp_path)])
    config = uoe.GPTConfig(**{k: getattr(args, k) for k in bench.MODEL_KEYS}, ffn=variant, **config)
    return bench.Run(variant, "eager", config, args), args


def test_the_ffn_pieces_of_any_registered_variant_come_from_its_class(tmp_path, monkeypatch):
    """bench.py times what a variant's class says its parts are (FFN.parts); it never asks a name."""
    monkeypatch.setitem(uoe.FFN_VARIANTS, "moe_again", MoEWithAnotherName)
    run, args = micro_run("moe_again", tmp_path, n_shared=1)
    f = bench.ffn_pieces(run, args, reps=1)
    assert f["experts_ms"] > 0 and f["shared_ms"] > 0 and f["dense_equiv_ms"] > 0
    assert 0 < f["shared_flop_share"] < 1 and 0 < f["experts_flop_share"] < 1


def test_an_ffn_that_uoe_does_not_know_is_its_error_before_any_timing(tmp_path, monkeypatch):
    """A config naming an unregistered ffn (set after the model was built) ends in uoe's ValueError before
    anything is timed: never an AttributeError half-way, never a fallback to another variant's pieces."""
    run, args = micro_run("dense", tmp_path)
    run.config.ffn = "xoe"                          # the model's own config too: dataclasses are not frozen
    timed = []
    monkeypatch.setattr(bench, "time_call", lambda fn, device: timed.append(fn) or 1.0)
    with pytest.raises(ValueError, match="unknown ffn 'xoe'"):
        bench.ffn_pieces(run, args, reps=1)
    assert timed == []


def test_speed_measures_peak_memory_in_a_fresh_process(tmp_path):
    out = tmp_path / "s.json"
    assert bench.main(["speed", *MICRO, "--variants", "uoe", "--reps", "1", "--warmup", "1",
                       "--compile", "eager", "--device", "cpu", "--json", str(out)]) == 0
    mem = json.loads(out.read_text())["rows"][0]["peak_mem_mb"]
    assert isinstance(mem, float) and mem >= 0


# ---- the harness: what bench.py, study.py and gpu_check.py share ---------------------------------

@pytest.mark.parametrize("module, not_imported", [("bench", {"study", "gpu_check"}), ("study", {"bench", "gpu_check"}),
                                                  ("gpu_check", {"bench", "study"})])
def test_the_scripts_do_not_import_each_other(module, not_imported):
    """No import circle: each script takes the shared pieces from harness.py, none from another script."""
    code = f"import sys, {module}; print(sorted(set({sorted(not_imported)!r}) & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_json_output_is_strict_json(tmp_path):
    """JSON has no Infinity or NaN: write_json writes a non-finite float as null, so that every JSON file the
    project writes can be read by any JSON reader."""
    harness.write_json(tmp_path / "x.json", {"ratio": math.inf, "rows": [{"a": -math.inf, "b": math.nan}, 1.5],
                                              "pair": (0.25, math.nan)}, quiet=True)
    text = (tmp_path / "x.json").read_text()

    def refuse(name):
        raise ValueError(f"{name} in {text}")
    assert json.loads(text, parse_constant=refuse) == {"ratio": None, "rows": [{"a": None, "b": None}, 1.5],
                                                       "pair": [0.25, None]}


def test_a_closed_output_pipe_ends_the_command_quietly(tmp_path):
    """`python bench.py speed | head -1`: a reader that left early ends the command with 141 (128 + SIGPIPE, as
    train.py and sample.py), without a traceback. Here the reader has left before the first line."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "bench.py", "speed", *MICRO, "--device", "cpu", "--out_dir", str(tmp_path)],
                           cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == ""
