"""Tests for bench.py: argument handling, its arithmetic on known numbers, and tiny end-to-end
runs. No assertions on speed: the machine is shared and timings swing."""

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import uoe

STUDY = (["quality"], ["ablate"], ["balance"])
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
    (["quality", "--lrs", "1e-3,x"], "--lrs"),
    (["quality", "--lrs", "0"], "--lrs"),
    (["quality", "--variants", "moe,gshard"], "gshard"),
    (["quality", "--warmup_steps", "-1"], "--warmup_steps"),
    (["ablate", "--lr", "-1"], "--lr"),
    (["ablate", "--ablations", "no_vse,no_brain"], "no_brain"),
    (["balance", "--aux", "-0.1"], "--aux"),
    (["speed", "--unknown_flag", "1"], "unrecognized"),
])
def test_bad_arguments_exit_2_with_one_error_line(argv, words, capsys, tmp_path):
    assert bench.main(argv + ["--out_dir", str(tmp_path)] if argv[:1] in (["speed"], *STUDY) else argv) == 2
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
    q = bench.parse_args(["quality", "--seeds", "4", "--lrs", "1e-3,3e-3,1e-3", "--json", "x.json"])
    assert q.seeds == 4 and q.lrs == [1e-3, 3e-3] and q.json == "x.json"
    assert q.steps == bench.STUDY_PRESETS["cpu"]["steps"] and q.compile == "eager" and q.jobs == 2
    assert q.variants == ["dense", "moe", "moe+shared", "uoe"] and q.dataset == "pystdlib_char"
    a = bench.parse_args(["ablate"])
    assert a.lr is None and a.ablations == list(bench.ABLATIONS)      # None: the lr comes from quality
    assert bench.parse_args(["balance"]).aux == [0.0, 0.01]


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


def test_paired_difference_on_known_numbers():
    a = {0: 2.0, 1: 2.2, 2: 2.1}
    b = {0: 2.1, 1: 2.4, 2: 2.1, 3: 9.9}            # seed 3 has no partner: left out
    d = bench.paired_difference(a, b)
    assert d["n"] == 3 and d["mean"] == pytest.approx(-0.1) and d["std"] == pytest.approx(0.1)
    assert d["se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert bench.paired_difference({0: 1.0, 1: None}, {0: 0.5, 1: 0.7}) == dict(mean=0.5, std=0.0, se=None, n=1)
    assert bench.paired_difference({}, {0: 1.0})["n"] == 0


def test_best_lr_and_verdict():
    assert bench.best_lr({1e-3: 2.0, 2e-3: 1.9, 4e-3: None}) == 2e-3        # None = diverged
    assert bench.best_lr({1e-3: 1.9, 2e-3: 1.9}) == 1e-3                     # a tie: the smaller rate
    assert bench.best_lr({1e-3: None, 2e-3: float("nan")}) is None
    assert bench.verdict(-0.05, 0.02, "uoe", "moe").startswith("uoe leads by 0.0500 = 2.5 SE")
    assert bench.verdict(0.05, 0.02, "uoe", "moe").startswith("moe leads")
    assert bench.verdict(-0.01, 0.02, "uoe", "moe").startswith("not decisive: uoe ahead by 0.0100 = 0.5 SE")
    assert "no SE" in bench.verdict(-0.01, None)


def test_gap_curve_and_ent_load_summary_on_known_numbers():
    a = {0: [[0, 0, 9, 3.0], [10, 100, 9, 2.0]], 1: [[0, 0, 9, 3.0], [10, 100, 9, 2.2]]}
    b = {0: [[0, 0, 9, 3.0], [10, 100, 9, 2.1]], 1: [[0, 0, 9, 3.0], [10, 100, 9, 2.5]]}
    g = bench.gap_curve(a, b)
    assert g[0] == (0, 0.0, 0.0)
    assert g[1][0] == 100 and g[1][1] == pytest.approx(-0.2) and g[1][2] == pytest.approx(0.1)
    routing = [[10, [1.0, 2.0], [0.5, 0.4], [0.1, 0.0]], [95, [1.2, 2.0], [0.3, 0.4], [0.1, 0.0]],
               [100, [1.4, 2.0], [0.5, 0.4], [0.1, 0.0]]]
    s = bench.ent_load_summary(routing, steps=100)                        # the last 10%: steps 95 and 100
    assert s[0] == dict(ent_load=pytest.approx(1.3), max_load=pytest.approx(0.4), min_load=pytest.approx(0.1))
    assert s[1]["ent_load"] == 2.0 and len(s) == 2


def test_runs_are_paired_across_variants_and_keyed_by_their_options(tmp_path):
    args = bench.parse_args(["quality", "--out_dir", str(tmp_path)])
    base = bench.study_base(args, {"vocab_size": 97})
    configs = bench.variant_configs(base, ["dense", "moe", "moe+shared", "uoe"])
    assert configs["moe+shared"].n_shared == 1 and configs["uoe"] == base
    for c in configs.values():                                             # matched on active FLOPs
        assert uoe.flops_per_token(c) == pytest.approx(uoe.flops_per_token(base), rel=0.01)
    specs = [bench.run_spec(v, c, lr, 1, args) for (v, c), lr in zip(configs.items(), (1e-3, 2e-3, 3e-3, 4e-3))]
    model_keys = set(dataclasses.asdict(base))
    for s in specs:   # the same seed: identical data, order, evaluation and schedule; only the model and lr differ
        skip = model_keys | {"learning_rate", "min_lr"}
        rest = {k: v for k, v in s["options"].items() if k not in skip}
        assert rest == {k: v for k, v in specs[0]["options"].items() if k not in skip}
        assert rest["seed"] == 1 and s["options"]["min_lr"] == pytest.approx(s["options"]["learning_rate"] / 10)
        cmd = bench.train_command(s)
        assert cmd[1].endswith("train.py") and f"--seed=1" in cmd and f"--ffn={s['options']['ffn']!r}" in cmd
    assert len({s["dir"] for s in specs}) == 4
    assert bench.run_spec("other label", configs["uoe"], 4e-3, 1, args)["dir"] == specs[3]["dir"]   # reused
    assert bench.run_spec("uoe", configs["uoe"], 4e-3, 2, args)["dir"] != specs[3]["dir"]
    abl = {a: bench.ablation_config(base, a) for a in bench.ABLATIONS}
    assert abl["uoe"] == base and abl["no_vse"].vse is False and abl["norm_inf"].route_norm == "inf"
    assert abl["n_routing_half"].n_routing == base.n_routing // 2
    assert abl["n_routing_double"].n_routing == 2 * base.n_routing


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


def test_speed_measures_peak_memory_in_a_fresh_process(tmp_path):
    out = tmp_path / "s.json"
    assert bench.main(["speed", *MICRO, "--variants", "uoe", "--reps", "1", "--warmup", "1",
                       "--compile", "eager", "--device", "cpu", "--json", str(out)]) == 0
    mem = json.loads(out.read_text())["rows"][0]["peak_mem_mb"]
    assert isinstance(mem, float) and mem >= 0


class InProcess:
    """bench.launch's stand-in: train.py's main() in this process (no interpreter start per run)."""
    calls = []

    def __init__(self, spec, env, log):
        import train
        InProcess.calls.append(spec["dir"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                self.returncode = train.main(bench.train_command(spec)[2:])
            except train.UserError as e:
                print(f"error: {e}")
                self.returncode = 2
        log.write(out.getvalue())
        log.flush()

    def poll(self):
        return self.returncode


STUDY_MICRO = MICRO[:-2] + ["--steps", "3", "--seeds", "2", "--warmup_steps", "1", "--eval_interval", "2",
                            "--eval_iters", "1", "--log_interval", "1", "--jobs", "1", "--plot", "off"]


@pytest.fixture
def study(tmp_path, monkeypatch, data):
    monkeypatch.setattr(bench, "launch", InProcess)
    InProcess.calls = []
    return STUDY_MICRO + ["--data_dir", str(data), "--dataset", "tiny", "--out_dir", str(tmp_path)]


def test_quality_sweeps_then_runs_seeds_reports_pairs_and_skips_finished_runs(study, tmp_path, capsys):
    argv = ["quality", *study, "--variants", "moe,uoe", "--lrs", "1e-3,2e-3", "--plot", "on"]
    assert bench.main(argv) == 0
    res = json.loads((tmp_path / "bench_quality.json").read_text())
    assert len(InProcess.calls) == 2 * 2 + 2 * 1                # sweep on seed 0, then seed 1 at the best lr
    for v, r in res["variants"].items():
        assert set(r["sweep"]) == {"0.001", "0.002"} and r["best_lr"] in (1e-3, 2e-3)
        assert set(r["val_per_seed"]) == {"0", "1"} and r["val_std"] >= 0
        assert r["val_per_seed"]["0"] == r["sweep"][str(r["best_lr"])]
        assert [e[0] for e in r["curves"]["0"]] == [0, 2, 3]
    d = res["comparisons"]["uoe − moe"]
    u, m = res["variants"]["uoe"]["val_per_seed"], res["variants"]["moe"]["val_per_seed"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(((u["0"] - m["0"]) + (u["1"] - m["1"])) / 2)
    assert set(res["comparisons"]) == {"uoe − moe"}
    assert (tmp_path / "quality_curves.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| uoe − moe |" in printed and "ETA" in printed
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 6
    assert all((r / "result.json").is_file() and not (r / "train" / "ckpt.pt").exists() for r in runs)
    # every run is a train.py run whose recipe is the same for all variants of a seed
    recipes = [json.loads((r / "train" / "run.json").read_text())["train"] for r in runs]
    drop = {"learning_rate", "min_lr", "out_dir"}
    same = {json.dumps({k: v for k, v in t.items() if k not in drop}, sort_keys=True) for t in recipes}
    assert len(same) == 2                                           # one recipe per seed

    # a rerun skips what finished; a run whose result is missing (interrupted) runs again
    (runs[0] / "result.json").unlink()
    InProcess.calls = []
    assert bench.main(argv) == 0
    assert InProcess.calls == [str(runs[0])]
    assert json.loads((tmp_path / "bench_quality.json").read_text())["comparisons"] == res["comparisons"]


def test_ablate_uses_the_best_lr_of_quality_and_reuses_its_uoe_runs(study, tmp_path, capsys):
    assert bench.main(["quality", *study, "--variants", "uoe", "--lrs", "1e-3,3e-3"]) == 0
    best = json.loads((tmp_path / "bench_quality.json").read_text())["best_lr"]["uoe"]
    InProcess.calls = []
    assert bench.main(["ablate", *study, "--ablations", "uoe,no_vse,norm_inf"]) == 0
    res = json.loads((tmp_path / "bench_ablate.json").read_text())
    assert res["lr"] == best and "quality" in res["lr_source"]
    assert len(InProcess.calls) == 2 * 2                           # the full UoE runs were quality's
    assert res["ablations"]["uoe"]["diff_vs_uoe"] is None
    d = res["ablations"]["no_vse"]["diff_vs_uoe"]
    assert d["n"] == 2 and res["ablations"]["norm_inf"]["changes"] == {"route_norm": "inf"}
    assert "| no_vse | vse=False |" in capsys.readouterr().out
    assert bench.main(["ablate", *study, "--ablations", "uoe", "--lr", "5e-4"]) == 0
    assert json.loads((tmp_path / "bench_ablate.json").read_text())["lr_source"] == "--lr"


def test_balance_reports_load_per_layer_with_and_without_the_aux_loss(study, tmp_path, capsys):
    assert bench.main(["balance", *study, "--lr", "1e-3", "--plot", "on"]) == 0
    res = json.loads((tmp_path / "bench_balance.json").read_text())
    assert {(r["variant"], r["aux_loss_coef"], r["layer"]) for r in res["rows"]} == \
        {(v, a, 0) for v in ("moe", "uoe") for a in (0.0, 0.01)}
    for r in res["rows"]:
        assert 0 <= r["ent_load"][0] <= res["ent_load_max"] + 1e-9 and r["seeds"] == 2
        assert r["min_load"][0] <= 1 / 4 <= r["max_load"][0]
    opts = [json.loads(p.read_text())["options"] for p in (tmp_path / "runs").glob("*/result.json")]
    assert sorted({o["aux_loss_coef"] for o in opts}) == [0.0, 0.01]
    assert (tmp_path / "balance.png").stat().st_size > 0
    d = {(x["aux_loss_coef"], x["layer"]): x for x in res["ent_load_diffs"]}
    assert set(d) == {(0.0, 0), (0.01, 0)} and d[(0.0, 0)]["variant"] == "uoe" and d[(0.0, 0)]["n"] == 2
    printed = capsys.readouterr().out
    assert "| uoe | 0 | 0 |" in printed and "| uoe − moe | 0 | 0 |" in printed


def test_a_diverged_run_is_a_result_and_a_broken_one_a_one_line_error(study, tmp_path, capsys):
    args = bench.parse_args(["quality", *study])
    base = bench.study_base(args, {"vocab_size": 65})
    spec = bench.run_spec("uoe", base, 1e-3, 0, args)
    spec["options"]["debug_nan_step"] = 2                          # train.py's testing aid
    r, = bench.run_all([spec], args, bench.Progress(1, 1))
    assert r["diverged"] and r["final_val"] is None
    assert bench.best_lr({1e-3: r["final_val"], 2e-3: 4.0}) == 2e-3
    bad = bench.run_spec("uoe", base, 1e-3, 1, args)
    bad["options"]["n_head"] = 5                                   # 16 is not divisible by 5
    with pytest.raises(bench.UserError, match="train.py failed for uoe lr 0.001 seed 1 .exit 2.: invalid model"):
        bench.run_all([bad], args, bench.Progress(1, 1))


def test_study_runs_train_py_in_a_subprocess(tmp_path, data):
    """The real launcher: one run of `python train.py ...` (a few seconds)."""
    assert bench.main(["balance", *STUDY_MICRO, "--data_dir", str(data), "--dataset", "tiny",
                       "--out_dir", str(tmp_path),
                       "--variants", "uoe", "--aux", "0", "--seeds", "1", "--lr", "1e-3"]) == 0
    run, = (tmp_path / "runs").iterdir()
    assert "done: 3 steps" in (run / "train.log").read_text()
    assert json.loads((run / "result.json").read_text())["final_val"] > 0
