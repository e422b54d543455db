"""Tests for study.py: arguments, the statistics on known numbers, run identity, held-out selection, the
claim on a run in progress, resuming a killed run, and tiny end-to-end studies (train.py's main() in this
process; real subprocesses in two)."""

import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import harness
import study
import train
import uoe

MICRO = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "8", "--batch_size", "2",
         "--n_expert", "4", "--top_k", "2", "--expert_hidden", "16", "--steps", "3", "--seeds", "2",
         "--warmup_steps", "1", "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "1", "--jobs", "1",
         "--plot", "off", "--device", "cpu"]
FINGERPRINT = dict(code_sha256="c" * 64, data_sha256="d" * 64, torch="2.x")


def micro_run(micro):
    """(args of a micro `balance` command, the spec of its UoE run at lr 1e-3, seed 0)."""
    args = study.parse_args(["balance", *micro])
    args.fingerprint = FINGERPRINT
    return args, study.run_spec("uoe", uoe.GPTConfig(vocab_size=65, **{k: getattr(args, k) for k in study.MODEL_KEYS}),
                                1e-3, 0, args)


# ---- arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    ([], "no command"),
    (["quality", "--lrs", "1e-3,x"], "--lrs"),
    (["quality", "--lrs", "0"], "--lrs"),
    (["quality", "--variants", "moe,gshard"], "gshard"),
    (["quality", "--warmup_steps", "-1"], "--warmup_steps"),
    (["quality", "--seeds", "1001"], "sweep"),
    (["quality", "--preset", "huge"], "--preset"),
    (["ablate", "--lr", "-1"], "--lr"),
    (["ablate", "--ablations", "no_vse,no_brain"], "no_brain"),
    (["balance", "--aux", "-0.1"], "--aux"),
    (["report", "--presets", "cpu,huge"], "huge"),
    (["report"], "run python study.py quality --preset cpu first"),
])
def test_bad_arguments_exit_2_with_one_error_line(argv, words, capsys, tmp_path):
    assert study.main(argv + ["--out_dir", str(tmp_path)] if argv else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not list(tmp_path.iterdir())                    # nothing written


def test_presets_and_defaults():
    q = study.parse_args(["quality", "--seeds", "4", "--lrs", "1e-3,3e-3,1e-3", "--json", "x.json"])
    assert q.seeds == 4 and q.lrs == [1e-3, 3e-3] and q.json == "x.json" and q.sweep_seeds == 1
    assert q.steps == 500 and q.n_embd == 64 and q.compile == "eager" and q.jobs == 2 and q.threads == 1
    assert q.variants == ["dense", "moe", "moe+shared", "aoe", "uoe"] and q.dataset == "pystdlib_char"
    t = study.parse_args(["quality", "--preset", "train"])            # python train.py's own model and length
    model, recipe = uoe.GPTConfig(), train.TrainConfig()
    assert (t.n_layer, t.n_embd, t.block_size, t.n_expert, t.top_k, t.expert_hidden) == (4, 128, 256, 8, 2, 256) == \
        (model.n_layer, model.n_embd, model.block_size, model.n_expert, model.top_k, model.expert_hidden)
    assert (t.steps, t.batch_size) == (recipe.max_iters, recipe.batch_size) == (1000, 16) and t.seeds >= 5
    assert t.variants == ["dense", "moe", "moe+shared", "uoe"] and t.json == str(Path("bench_out/quality_train.json"))
    a = study.parse_args(["ablate"])
    assert a.lr is None and a.ablations == list(study.ABLATIONS) and a.seeds >= 5
    assert study.parse_args(["balance"]).aux == [0.0, 0.01]
    assert study.parse_args(["report"]).presets == ["cpu", "train"]


# ---- statistics --------------------------------------------------------------------------------

def test_t_quantiles_match_the_tables():
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert study.t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)
    assert study.t_cdf(0.0, 3) == pytest.approx(0.5) and study.t_cdf(-1.0, 3) == pytest.approx(1 - study.t_cdf(1, 3))
    assert study.betainc(1, 1, 0.3) == pytest.approx(0.3) and study.betainc(2.5, 2.5, 0.5) == pytest.approx(0.5)


def test_paired_difference_interval_and_verdict_on_known_numbers():
    a = {0: 2.0, 1: 2.2, 2: 2.1}
    b = {0: 2.1, 1: 2.4, 2: 2.1, 3: 9.9}            # seed 3 has no partner: left out
    d = study.paired_difference(a, b)
    se = 0.1 / 3 ** 0.5
    assert d["n"] == 3 and d["mean"] == pytest.approx(-0.1) and d["std"] == pytest.approx(0.1)
    assert d["se"] == pytest.approx(se) and d["ci"] == pytest.approx([-0.1 - 4.3027 * se, -0.1 + 4.3027 * se], abs=1e-4)
    # -0.1 is 1.7 SE: with 3 seeds the interval (t = 4.30) includes 0, so not decisive
    assert study.verdict(d, "uoe", "moe").startswith("not decisive") and "uoe ahead by 0.1000" in study.verdict(d)
    # 2.5 SE at 3 seeds: beyond the old 2-SE rule, still inside t(2)'s interval
    d = dict(mean=-0.05, se=0.02, ci=[-0.05 - 4.303 * 0.02, -0.05 + 4.303 * 0.02], n=3)
    assert study.verdict(d).startswith("not decisive")
    d = study.paired_difference({s: 2.0 + s / 100 for s in range(5)}, {s: 2.1 + s / 99 for s in range(5)})
    assert d["ci"][1] < 0 and study.verdict(d, "uoe", "moe").startswith("decisive: uoe is better")
    assert study.paired_difference({0: 1.0, 1: None}, {0: 0.5, 1: 0.7}) == \
        dict(mean=0.5, std=0.0, se=None, ci=None, n=1)
    assert study.verdict(dict(mean=0.5, se=None, ci=None, n=1)) == "one pair: no interval"
    assert study.paired_difference({}, {0: 1.0})["n"] == 0


def test_best_lr_gap_curve_and_ent_load_summary_on_known_numbers():
    assert study.best_lr({1e-3: 2.0, 2e-3: 1.9, 4e-3: None}) == 2e-3        # None = diverged
    assert study.best_lr({1e-3: 1.9, 2e-3: 1.9}) == 1e-3                     # a tie: the smaller rate
    assert study.best_lr({1e-3: None, 2e-3: float("nan")}) is None
    a = {0: [[0, 0, 9, 3.0], [10, 100, 9, 2.0]], 1: [[0, 0, 9, 3.0], [10, 100, 9, 2.2]]}
    b = {0: [[0, 0, 9, 3.0], [10, 100, 9, 2.1]], 1: [[0, 0, 9, 3.0], [10, 100, 9, 2.5]]}
    g = study.gap_curve(a, b)
    assert g[0] == (0, 0.0, 0.0)
    assert g[1][0] == 100 and g[1][1] == pytest.approx(-0.2) and g[1][2] == pytest.approx(12.706 * 0.1, abs=1e-3)
    routing = [[10, [1.0, 2.0], [0.5, 0.4], [0.1, 0.0]], [95, [1.2, 2.0], [0.3, 0.4], [0.1, 0.0]],
               [100, [1.4, 2.0], [0.5, 0.4], [0.1, 0.0]]]
    s = study.ent_load_summary(routing, steps=100)                        # the last 10%: steps 95 and 100
    assert s[0] == dict(ent_load=pytest.approx(1.3), max_load=pytest.approx(0.4), min_load=pytest.approx(0.1))
    assert s[1]["ent_load"] == 2.0 and len(s) == 2


def test_balance_gives_max_over_min_as_a_ratio_of_means_never_infinity(micro, tmp_path, monkeypatch, capsys):
    """A row's max / min load is its mean max load over its mean min load (a mean of per-seed ratios is ruled by
    the seed with the emptiest expert: 1253 where the means give 117, and inf when an expert got no tokens in one
    seed, which the JSON then held as Infinity); a row whose least-loaded expert got none in every seed says "no
    tokens". Routing made up per seed: [max load, min load]."""
    loads = {("moe", 0.0): [[0.5, 0.01], [0.4, 0.0]], ("uoe", 0.0): [[0.6, 0.0], [0.5, 0.0]],
             ("moe", 0.01): [[0.3, 0.2], [0.3, 0.1]], ("uoe", 0.01): [[0.2, 0.1], [0.2, 0.1]]}

    def made_up_runs(specs, args, progress=None):
        return {s["dir"]: dict(final_val=2.0, routing=[[args.steps, [1.0], [loads[key][s["seed"]][0]],
                                                        [loads[key][s["seed"]][1]]]])
                for key, ss in specs.items() for s in ss}
    monkeypatch.setattr(study, "run_specs", made_up_runs)
    assert study.main(["balance", *micro, "--lr", "1e-3"]) == 0
    text = (tmp_path / "balance_cpu.json").read_text()

    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    rows = json.loads(text, parse_constant=refuse)["rows"]
    ratio = {(r["variant"], r["aux_loss_coef"]): r["max_over_min"] for r in rows}
    assert ratio[("moe", 0.0)] == pytest.approx(0.45 / 0.005) and ratio[("uoe", 0.0)] is None
    assert ratio[("moe", 0.01)] == pytest.approx(0.3 / 0.15) and ratio[("uoe", 0.01)] == pytest.approx(2.0)
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| moe |") or line.startswith("| uoe |")}
    assert rows[("| moe", "0")][6] == "90.0" and rows[("| uoe", "0")][6] == "no tokens"
    assert rows[("| moe", "0.01")][6] == "2.0"


# ---- run identity ------------------------------------------------------------------------------

def test_runs_are_paired_and_identified_by_options_role_code_and_data(tmp_path):
    args = study.parse_args(["quality", "--out_dir", str(tmp_path), "--device", "cpu"])
    args.fingerprint = FINGERPRINT
    base = uoe.GPTConfig(vocab_size=97, **{k: getattr(args, k) for k in study.MODEL_KEYS})
    configs = study.variant_configs(base, ["dense", "moe", "moe+shared", "uoe"])
    assert configs["moe+shared"].n_shared == 1 and configs["uoe"] == base
    for c in configs.values():                                             # matched on active FLOPs
        assert uoe.flops_per_token(c) == pytest.approx(uoe.flops_per_token(base), rel=0.01)
    specs = [study.run_spec(v, c, lr, 1, args) for (v, c), lr in zip(configs.items(), (1e-3, 2e-3, 3e-3, 4e-3))]
    model_keys = set(dataclasses.asdict(base))
    for s in specs:   # the same seed: identical data, order, evaluation and schedule; only the model and lr differ
        skip = model_keys | {"learning_rate", "min_lr"}
        rest = {k: v for k, v in s["options"].items() if k not in skip}
        assert rest == {k: v for k, v in specs[0]["options"].items() if k not in skip}
        assert rest["seed"] == 1 and s["options"]["min_lr"] == pytest.approx(s["options"]["learning_rate"] / 10)
        cmd = study.train_command(s)
        assert cmd[1].endswith("train.py") and "--seed=1" in cmd and f"--ffn={s['options']['ffn']!r}" in cmd
    assert len({s["dir"] for s in specs}) == 4
    uoe_run = specs[3]
    assert study.run_spec("other label", configs["uoe"], 4e-3, 1, args)["dir"] == uoe_run["dir"]   # reused
    assert study.run_spec("uoe", configs["uoe"], 4e-3, 2, args)["dir"] != uoe_run["dir"]
    sweep = study.run_spec("uoe", configs["uoe"], 4e-3, 1, args, "sweep")      # never a reported run, even at
    assert sweep["dir"] != uoe_run["dir"] and sweep["dir"].endswith(sweep["dir"][-10:])   # the same seed
    for change in (dict(code_sha256="e" * 64), dict(data_sha256="f" * 64), dict(torch="9.9")):
        args.fingerprint = dict(FINGERPRINT, **change)                   # other code, corpus or torch: rerun
        assert study.run_spec("uoe", configs["uoe"], 4e-3, 1, args)["dir"] != uoe_run["dir"]
    abl = {a: study.ablation_config(base, a) for a in study.ABLATIONS}
    assert abl["uoe"] == base and abl["no_vse"].vse is False and abl["norm_inf"].route_norm == "inf"
    assert abl["n_routing_half"].n_routing == base.n_routing // 2
    assert abl["n_routing_double"].n_routing == 2 * base.n_routing


def test_the_checkpoint_interval_is_not_part_of_a_runs_identity(tmp_path):
    """Resume is exact, so where a run was checkpointed cannot change it: ckpt_interval is given to train.py
    but kept out of the options that identify the run."""
    args = study.parse_args(["quality", "--out_dir", str(tmp_path), "--device", "cpu"])
    args.fingerprint = FINGERPRINT
    spec = study.run_spec("uoe", uoe.GPTConfig(vocab_size=97, **{k: getattr(args, k) for k in study.MODEL_KEYS}),
                          1e-3, 0, args)
    assert "ckpt_interval" not in spec["options"] and "ckpt_interval" not in spec["identity"]["options"]
    assert "ckpt_interval" not in study.recipe(args)
    fresh, resume = study.train_command(spec), study.train_command(spec, resume=True)
    assert f"--ckpt_interval={args.eval_interval}" in fresh and f"--ckpt_interval={args.eval_interval}" in resume
    assert "--overwrite=True" in fresh and not any(a.startswith("--init_from") for a in fresh)
    assert "--init_from='resume'" in resume and not any(a.startswith("--overwrite") for a in resume)
    assert fresh[:2] == resume[:2] and set(fresh) - set(resume) == {"--overwrite=True"}


def test_the_identity_of_a_run_is_pinned(tmp_path):
    """A run's folder name holds a hash of its identity (options, role, fingerprints): a change to how it is
    computed (recipe, run_spec, variant_configs, the presets) would make every finished run of a study in progress
    unfindable, and rerun. These names were computed with the code of commit 8be963b, which made the runs of the
    study of that time; change them only knowingly, with every study's runs to be made again."""
    args = study.parse_args(["quality", "--out_dir", str(tmp_path), "--device", "cpu", "--data_dir", "/data"])
    args.fingerprint = FINGERPRINT
    base = uoe.GPTConfig(vocab_size=97, **{k: getattr(args, k) for k in study.MODEL_KEYS})
    configs = study.variant_configs(base, list(study.VARIANTS))
    names = {v: Path(study.run_spec(v, c, 4e-3, 0, args)["dir"]).name for v, c in configs.items()}
    assert names == {"dense": "dense-D352-lr0.004-s0-75c0630552", "moe": "moe-D175-lr0.004-s0-f97f996bf3",
                     "moe+shared": "moe-D116-lr0.004-s0-a7a4551bcd", "aoe": "aoe-D191-lr0.004-s0-0deb04f16f",
                     "uoe": "uoe-D128-lr0.004-s0-389080416c"}
    assert Path(study.run_spec("uoe", configs["uoe"], 1e-3, 1000, args, "sweep")["dir"]).name == \
        "uoe-D128-lr0.001-s1000-sweep-c6c5c74501"
    assert Path(study.run_spec("x", study.ablation_config(base, "n_routing_half"), 4e-3, 0, args)["dir"]).name == \
        "uoe-D128-lr0.004-s0-1986cc11d8"
    args = study.parse_args(["quality", "--preset", "train", "--out_dir", str(tmp_path), "--device", "cpu",
                             "--data_dir", "/data"])
    args.fingerprint = FINGERPRINT
    base = uoe.GPTConfig(vocab_size=97, **{k: getattr(args, k) for k in study.MODEL_KEYS})
    moe = study.variant_configs(base, ["moe"])["moe"]
    assert Path(study.run_spec("moe", moe, 2e-3, 3, args)["dir"]).name == "moe-D351-lr0.002-s3-2d799b9e40"


def change_first_token(path):
    with open(path, "r+b") as f:
        first = f.read(2)
        f.seek(0)
        f.write(b"\1\0" if first == b"\0\0" else b"\0\0")


def test_the_fingerprint_is_of_the_code_and_the_corpus(tmp_path, data, monkeypatch):
    shutil.copytree(data / "tiny", tmp_path / "tiny")
    f = study.fingerprint(tmp_path / "tiny")
    assert f == study.fingerprint(data / "tiny") and len(f["code_sha256"]) == len(f["data_sha256"]) == 64
    change_first_token(tmp_path / "tiny" / "val.bin")                    # another corpus
    assert study.fingerprint(tmp_path / "tiny")["data_sha256"] != f["data_sha256"]
    (tmp_path / "uoe.py").write_text("# other code\n")
    monkeypatch.setattr(study, "REPO", tmp_path)
    monkeypatch.setattr(study, "CODE_FILES", ("uoe.py",))
    assert study.fingerprint(data / "tiny")["code_sha256"] != f["code_sha256"]


# ---- end to end (train.py in this process) -----------------------------------------------------

class InProcess:
    """study.launch's stand-in: train.py's main() in this process (no interpreter start per run)."""
    calls, commands = [], []

    def __init__(self, spec, env, log, claim_file, resume=False):
        InProcess.calls.append(spec["dir"])
        InProcess.commands.append(study.train_command(spec, resume)[2:])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                self.returncode = train.main(study.train_command(spec, resume)[2:])
            except train.UserError as e:
                print(f"error: {e}")
                self.returncode = 2
        log.write(out.getvalue())
        log.flush()

    def poll(self):
        return self.returncode


@pytest.fixture
def micro(tmp_path, monkeypatch, data):
    monkeypatch.setattr(study, "launch", InProcess)
    InProcess.calls, InProcess.commands = [], []
    return MICRO + ["--data_dir", str(data), "--dataset", "tiny", "--out_dir", str(tmp_path)]


def calls():
    out, InProcess.calls = InProcess.calls, []
    return out


def test_the_study_selects_on_held_out_seeds_and_reports_fresh_runs(micro, tmp_path, capsys):
    """quality, then ablate and balance on its lr and its reported runs, then the report."""
    argv = ["quality", *micro, "--variants", "moe,uoe", "--lrs", "1e-3,2e-3"]
    assert study.main(argv) == 0
    res = json.loads((tmp_path / "quality_cpu.json").read_text())
    assert len(calls()) == 2 * (2 * 1 + 2)                  # per variant: 2 lrs on sweep seed 1000, 2 seeds
    reported, swept = set(), set()
    for v, r in res["variants"].items():
        assert set(r["sweep"]) == {"0.001", "0.002"} and r["best_lr"] in (1e-3, 2e-3)
        assert set(r["val_per_seed"]) == {"0", "1"} and r["val_std"] >= 0 and res["sweep_seeds"] == [1000]
        assert [e[0] for e in r["curves"]["0"]] == [0, 2, 3]
        reported |= set(r["runs"])
        swept |= set(r["sweep_runs"])
    assert len(reported) == 4 and len(swept) == 4 and not reported & swept     # no reported run is a sweep run
    for name in reported | swept:
        result = json.loads((tmp_path / "runs" / name / "result.json").read_text())
        assert (result["identity"]["role"] == "sweep") == (name in swept)
        assert (result["seed"] >= 1000) == (name in swept)
        assert result["identity"]["options"]["learning_rate"] == res["variants"][result["label"]]["best_lr"] \
            or name in swept
    d = res["comparisons"]["uoe − moe"]
    u, m = res["variants"]["uoe"]["val_per_seed"], res["variants"]["moe"]["val_per_seed"]
    assert d["n"] == 2 and all(set(k.split(" − ")) <= {"uoe", "moe"} for k in res["comparisons"])   # of what ran
    assert d["mean"] == pytest.approx(((u["0"] - m["0"]) + (u["1"] - m["1"])) / 2) and len(d["ci"]) == 2
    printed = capsys.readouterr().out
    assert "| uoe − moe |" in printed and "95% CI" in printed and "ETA" in printed
    runs = sorted((tmp_path / "runs").iterdir())
    assert all((r / "result.json").is_file() and not (r / "train" / "ckpt.pt").exists() for r in runs)

    # a rerun skips what finished; a run whose result is missing (interrupted) runs again
    (tmp_path / "runs" / sorted(reported)[0] / "result.json").unlink()
    assert study.main(argv) == 0
    assert calls() == [str(tmp_path / "runs" / sorted(reported)[0])]
    assert json.loads((tmp_path / "quality_cpu.json").read_text())["comparisons"] == res["comparisons"]

    # ablate: UoE's lr from the sweep; its baseline is quality's reported UoE runs, never a sweep run
    assert study.main(["ablate", *micro, "--ablations", "uoe,no_vse"]) == 0
    ab = json.loads((tmp_path / "ablate_cpu.json").read_text())
    assert ab["lr"] == res["best_lr"]["uoe"] and "held-out" in ab["lr_source"]
    assert len(calls()) == 2 and ab["ablations"]["uoe"]["runs"] == res["variants"]["uoe"]["runs"]
    assert ab["ablations"]["no_vse"]["diff_vs_uoe"]["n"] == 2 and ab["ablations"]["uoe"]["diff_vs_uoe"] is None
    assert "| no_vse | vse=False |" in capsys.readouterr().out

    # balance: per layer, without the aux loss (new runs) and with it (quality's runs)
    assert study.main(["balance", *micro, "--plot", "on"]) == 0
    bal = json.loads((tmp_path / "balance_cpu.json").read_text())
    assert len(calls()) == 2 * 2
    assert {(r["variant"], r["aux_loss_coef"], r["layer"]) for r in bal["rows"]} >= \
        {(v, a, 0) for v in ("moe", "uoe") for a in (0.0, 0.01)}
    for r in bal["rows"]:
        assert 0 <= r["ent_load"][0] <= bal["ent_load_max"] + 1e-9 and r["seeds"] == 2
        assert r["min_load"][0] <= 1 / 4 <= r["max_load"][0]
    d = {(x["aux_loss_coef"], x["layer"]): x for x in bal["ent_load_diffs"]}
    assert set(d) >= {(0.0, 0), (0.01, 0)} and d[(0.0, 0)]["variant"] == "uoe" and d[(0.0, 0)]["n"] == 2
    assert (tmp_path / "balance_cpu.png").stat().st_size > 0
    assert "| uoe − moe | 0 | 0 |" in capsys.readouterr().out

    # the report: headline sentences, the tables, the figure, for the budgets found
    assert study.main(["report", "--out_dir", str(tmp_path)]) == 0
    md = (tmp_path / "study_report.md").read_text()
    assert "## Budget `cpu`" in md and "- **uoe − moe** = " in md and "95% CI" in md
    assert "| no_vse | vse=False |" in md and "![" in md and "## Budget `train`" not in md
    assert "- budget `train`: no quality_train.json in " in md and md.startswith("# Does UoE beat MoE? The study at "
                                                                                   "budget `cpu`\n")
    rep = json.loads((tmp_path / "study_report.json").read_text())
    assert rep["headline"]["cpu"]["uoe − moe"] == res["comparisons"]["uoe − moe"]
    assert (tmp_path / "study_report.png").stat().st_size > 0


def test_a_run_of_other_code_or_data_is_rerun(micro, tmp_path, data, monkeypatch):
    shutil.copytree(data / "tiny", tmp_path / "data" / "tiny")
    argv = ["balance", *micro, "--data_dir", str(tmp_path / "data"), "--variants", "uoe", "--aux", "0",
            "--seeds", "1", "--lr", "1e-3"]
    assert study.main(argv) == 0 and len(calls()) == 1
    assert study.main(argv) == 0 and calls() == []                       # the same: reused
    (tmp_path / "uoe.py").write_text("# other code\n")
    monkeypatch.setattr(study, "REPO", tmp_path)                        # (train.py itself still runs from REPO)
    monkeypatch.setattr(study, "CODE_FILES", ("uoe.py",))
    assert study.main(argv) == 0 and len(calls()) == 1                   # other code: rerun
    change_first_token(tmp_path / "data" / "tiny" / "val.bin")
    assert study.main(argv) == 0 and len(calls()) == 1                   # another corpus: rerun
    assert len(list((tmp_path / "runs").iterdir())) == 3


def test_a_diverged_run_is_a_result_and_a_broken_one_a_one_line_error(micro):
    args = study.parse_args(["quality", *micro])
    args.fingerprint = FINGERPRINT
    base = uoe.GPTConfig(vocab_size=65, **{k: getattr(args, k) for k in study.MODEL_KEYS})
    spec = study.run_spec("uoe", base, 1e-3, 0, args)
    spec["options"]["debug_nan_step"] = 2                          # train.py's testing aid
    r, = study.run_all([spec], args, study.Progress(1, 1))
    assert r["diverged"] and r["final_val"] is None
    assert study.best_lr({1e-3: r["final_val"], 2e-3: 4.0}) == 2e-3
    bad = study.run_spec("uoe", base, 1e-3, 1, args)
    bad["options"]["n_head"] = 5                                   # 16 is not divisible by 5
    with pytest.raises(study.UserError, match="train.py failed for uoe lr 0.001 seed 1 .exit 2.: invalid model"):
        study.run_all([bad], args, study.Progress(1, 1))


# ---- a killed run resumes --------------------------------------------------------------------------

class Killed(InProcess):
    """A run stopped by SIGTERM after its first step (train.py saves ckpt.pt and exits 143) while the command
    itself is interrupted: its first poll raises KeyboardInterrupt, as Ctrl-C would in run_all's loop."""

    def __init__(self, *args, **kwargs):
        train.STOP["signum"] = signal.SIGTERM               # as if the signal had come: stop after this step
        try:
            super().__init__(*args, **kwargs)
        finally:
            train.STOP["signum"] = None
        self.polled = False

    def poll(self):
        if not self.polled:
            self.polled = True
            raise KeyboardInterrupt
        return self.returncode


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(micro, tmp_path, monkeypatch, capsys):
    argv = ["balance", *micro, "--variants", "uoe", "--aux", "0", "--seeds", "2", "--lr", "1e-3"]
    monkeypatch.setattr(study, "launch", Killed)
    assert study.main(argv) == 130                                     # interrupted in its first run
    killed, = calls()
    run = Path(killed)
    assert Killed.commands[-1][-1] == "--overwrite=True" and (run / "train" / "ckpt.pt").is_file()
    assert not (run / "result.json").exists() and "stopped by SIGTERM at step 1" in (run / "train.log").read_text()
    state = json.loads((run / "state.json").read_text())
    assert state["segments"] == 1 and state["started"] is None and state["seconds"] > 0
    capsys.readouterr()
    InProcess.commands = []

    monkeypatch.setattr(study, "launch", InProcess)
    assert study.main(argv) == 0
    assert calls()[0] == killed and len(InProcess.commands) == 2
    resumed, fresh = InProcess.commands                              # the other seed had no checkpoint
    assert "--init_from='resume'" in resumed and "--overwrite=True" not in resumed
    assert "--overwrite=True" in fresh and not any(a.startswith("--init_from") for a in fresh)
    assert f"  resuming {run.name} at step 1\n" in capsys.readouterr().out
    log = (run / "train.log").read_text()                            # both segments' output, in order
    assert log.index("stopped by SIGTERM at step 1") < log.index("resuming at step 1") < log.index("done: 3 steps")
    result = json.loads((run / "result.json").read_text())
    assert not (run / "train" / "ckpt.pt").exists()
    state = json.loads((run / "state.json").read_text())
    assert state["segments"] == 2 and result["seconds"] == state["seconds"] > 0

    # the same study, never stopped: the same numbers, to the bit
    assert study.main([*argv, "--out_dir", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "runs" / run.name / "result.json").read_text())
    assert [e[0] for e in result["evals"]] == [0, 2, 3]
    for key in ("final_val", "evals", "routing", "identity"):
        assert result[key] == whole[key], key


@pytest.mark.parametrize("damage", ["corrupt", "no state", "other identity"])
def test_a_checkpoint_that_is_unreadable_or_of_no_known_identity_is_set_aside(micro, damage, monkeypatch, capsys):
    args, spec = micro_run(micro)
    monkeypatch.setattr(study, "launch", Killed)
    with pytest.raises(KeyboardInterrupt):
        study.run_all([spec], args, study.Progress(1, 1))
    run, ckpt = Path(spec["dir"]), Path(spec["dir"]) / "train" / "ckpt.pt"
    good = ckpt.read_bytes()
    if damage == "corrupt":
        ckpt.write_bytes(good[:len(good) // 2])                     # a truncated file
    elif damage == "no state":
        (run / "state.json").unlink()
    else:
        state = json.loads((run / "state.json").read_text())
        study.write_json(run / "state.json", dict(state, identity=dict(state["identity"], role="sweep")), quiet=True)
    monkeypatch.setattr(study, "launch", InProcess)
    InProcess.calls, InProcess.commands = [], []
    capsys.readouterr()
    r, = study.run_all([spec], args, study.Progress(1, 1))
    assert r["final_val"] > 0 and "--overwrite=True" in InProcess.commands[0]          # afresh
    assert f"starting {run.name} afresh: its checkpoint was moved to {ckpt}.bad" in capsys.readouterr().out
    kept = (run / "train" / "ckpt.pt.bad").read_bytes()
    assert kept == (good[:len(good) // 2] if damage == "corrupt" else good)           # kept, not replaced
    assert json.loads((run / "state.json").read_text())["segments"] == 1


# ---- two commands sharing an out_dir -------------------------------------------------------------

def test_a_run_claimed_by_another_command_is_waited_for_not_started_again(micro, capsys):
    args = study.parse_args(["balance", *micro])
    args.fingerprint = FINGERPRINT
    base = uoe.GPTConfig(vocab_size=65, **{k: getattr(args, k) for k in study.MODEL_KEYS})
    theirs, ours = (study.run_spec("uoe", base, 1e-3, s, args) for s in (0, 1))
    held = study.claim(theirs["dir"])                              # the other command is running it
    assert held is not None and study.claim(theirs["dir"]) is None

    def other_command_finishes():
        while not InProcess.calls:                                  # after our own run has started
            time.sleep(0.01)
        time.sleep(0.3)
        study.write_json(Path(theirs["dir"]) / "result.json", dict(identity=theirs["identity"], final_val=1.5),
                         quiet=True)
        held.close()
    t = threading.Thread(target=other_command_finishes)
    t.start()
    r_theirs, r_ours = study.run_all([theirs, ours], args, study.Progress(2, 1))
    t.join()
    assert InProcess.calls == [ours["dir"]]                        # theirs was not started a second time
    assert r_theirs["final_val"] == 1.5 and r_ours["final_val"] > 0
    assert "waiting for " + Path(theirs["dir"]).name in capsys.readouterr().out


def test_a_claim_ends_with_its_holder(micro):
    """A command killed mid-run leaves its claim file behind, but not its lock: the run is started again."""
    args, spec = micro_run(micro)
    Path(spec["dir"]).mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(Path(spec["dir"]) / "claim.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert study.claim(spec["dir"]) is None
    holder.kill()                                                  # the holder dies without cleaning up
    holder.wait()
    r, = study.run_all([spec], args, study.Progress(1, 1))
    assert InProcess.calls == [spec["dir"]] and r["final_val"] > 0


def test_a_file_system_that_cannot_lock_files_is_one_error_line_not_a_wait_forever(micro, monkeypatch, capsys):
    """Only "another process holds the lock" (EWOULDBLOCK / EAGAIN / EACCES) means a run is claimed elsewhere; any
    other failure (ENOLCK: a network file system without locks) would have every run waited for forever."""
    args, spec = micro_run(micro)

    def fails(error):
        def try_lock(f):
            raise OSError(error, os.strerror(error))
        return try_lock
    monkeypatch.setattr(study, "try_lock", fails(errno.ENOLCK))
    with pytest.raises(study.UserError, match="cannot lock .*claim.lock .No locks available.: the file system of "
                                              "the out_dir cannot lock files; use a --out_dir on a local disk"):
        study.claim(spec["dir"])
    assert study.main(["balance", *micro, "--variants", "uoe", "--aux", "0", "--seeds", "1", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot lock") and InProcess.calls == []
    for held in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        monkeypatch.setattr(study, "try_lock", fails(held))
        assert study.claim(spec["dir"]) is None


def test_a_run_is_never_launched_by_other_code_than_its_identity_names(tmp_path):
    """uoe.py or train.py edited while a command runs: the next launch stops instead of training with the new
    code under the old code's identity."""
    spec = dict(identity=dict(code_sha256="0" * 64), dir=str(tmp_path), options={})
    with pytest.raises(study.UserError, match="changed while this command ran"):
        study.launch(spec, {}, None, None)


# train.py as run by the study, but it sends itself SIGINT (a Ctrl-C) while taking step STOP_AT: a stop at a
# known step, where a signal from outside would race the run
STOPPED_TRAIN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train
get_lr = train.get_lr
def get_lr_then_ctrl_c(step, tc):
    if step == {stop_at}:
        os.kill(os.getpid(), signal.SIGINT)
    return get_lr(step, tc)
train.get_lr = get_lr_then_ctrl_c
sys.exit(train.main(sys.argv[1:]))
"""


def test_study_runs_train_py_in_a_subprocess_and_a_killed_run_resumes_to_the_same_numbers(tmp_path, data,
                                                                                          monkeypatch, capsys):
    """The real launcher: `python train.py ...` in subprocesses. A run stopped by a Ctrl-C at step 50 (after
    the checkpoint of step 40) stops its command (exit 130, one line: not a failure); the rerun resumes it from
    the checkpoint its signal saved, and its result equals, to the bit, that of the same run made without a stop
    in another out_dir."""
    argv = ["balance", *MICRO, "--data_dir", str(data), "--dataset", "tiny", "--variants", "uoe", "--aux", "0",
            "--seeds", "1", "--lr", "1e-3", "--steps", "120", "--eval_interval", "20", "--log_interval", "20"]
    cut_dir, whole_dir = tmp_path / "cut", tmp_path / "whole"
    assert study.main([*argv, "--out_dir", str(whole_dir)]) == 0

    real = study.train_command
    stopped = STOPPED_TRAIN.format(repo=str(study.REPO), stop_at=50)
    monkeypatch.setattr(study, "train_command", lambda spec, resume=False: [sys.executable, "-c", stopped, *real(spec, resume)[2:]])
    assert study.main([*argv, "--out_dir", str(cut_dir)]) == 130
    run, = (cut_dir / "runs").iterdir()
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == [f"stopped: {run.name} saved at step 51; rerun the command to continue"]
    assert not (run / "result.json").exists() and (run / "train" / "ckpt.pt").is_file()
    assert "stopped by SIGINT at step 51" in (run / "train.log").read_text()

    monkeypatch.setattr(study, "train_command", real)
    assert study.main([*argv, "--out_dir", str(cut_dir)]) == 0
    assert [x for x in capsys.readouterr().out.splitlines() if "resuming" in x] == [f"  resuming {run.name} at step 51"]
    cut = json.loads((run / "result.json").read_text())
    ref = json.loads((whole_dir / "runs" / run.name / "result.json").read_text())
    assert [e[0] for e in cut["evals"]] == list(range(0, 121, 20))
    for key in ("final_val", "evals", "routing", "identity"):
        assert cut[key] == ref[key], key
    assert json.loads((run / "state.json").read_text())["segments"] == 2
    assert not (run / "train" / "ckpt.pt").exists()


# ---- the report -----------------------------------------------------------------------------------

def fake_quality(preset, finals, code=None, best=None, lrs=(1e-3, 2e-3, 4e-3)):
    """A quality_<preset>.json as study.quality writes it, from per-seed final val losses: finals
    {variant: {seed: val or None (diverged)}}; best {variant: lr} (default the middle rate); code: the code's
    sha256 (default the code now)."""
    variants = {}
    for v, per_seed in finals.items():
        ok = [x for x in per_seed.values() if x is not None]
        m, sd = study.mean_std(ok)
        lr = (best or {}).get(v, lrs[1])
        curves = {str(s): [] if x is None else [[0, 0, 4.0, 4.0], [5, 500, x + 0.5, x + 0.5], [10, 1000, x, x]]
                  for s, x in per_seed.items()}
        variants[v] = dict(expert_hidden=16, params_total=1e5, params_active=5e4, fwd_flops_per_token=1e5,
                           flop_mismatch=0.0, sweep={str(x): 2.5 for x in lrs}, best_lr=lr,
                           best_at_edge=lr in (min(lrs), max(lrs)),
                           val_per_seed={str(s): x for s, x in per_seed.items()}, val_mean=m, val_std=sd,
                           n_seeds=len(ok), curves=curves, runs=[])
    comparisons = {f"{a} − {b}": study.paired_difference(finals[a], finals[b])
                   for a, b in study.COMPARISONS if a in finals and b in finals}
    seeds = max(len(x) for x in finals.values())
    code = code or study.sha256_of(study.REPO / f for f in study.CODE_FILES)
    return dict(command="quality", preset=preset, dataset="tiny", steps=10, batch_size=2, block_size=8, tokens=160,
                seeds=seeds, recipe=dict(warmup_iters=1), device="cpu", dtype="float32", compile="eager",
                machine="a CPU", threads=1, jobs=1, multiple_of=1,
                base_config=dict(n_layer=1, n_embd=16, n_expert=4, top_k=2, expert_hidden=16, block_size=8),
                fingerprint=dict(code_sha256=code, data_sha256="d" * 64, torch="2.x"), lrs=list(lrs),
                sweep_seeds=[1000], best_lr={v: r["best_lr"] for v, r in variants.items()}, variants=variants,
                comparisons=comparisons, runs=len(finals) * (len(lrs) + seeds), seconds=60.0, run_seconds=30.0)


def report(tmp_path, capsys, *presets):
    capsys.readouterr()
    code = study.main(["report", "--out_dir", str(tmp_path), "--plot", "off",
                       *(["--presets", ",".join(presets)] if presets else [])])
    out = capsys.readouterr()
    return code, (tmp_path / "study_report.md").read_text() if code == 0 else out.err


def test_the_report_names_the_budgets_it_has_and_says_which_are_missing_or_made_with_other_code(tmp_path, capsys):
    finals = {"dense": {0: 2.3, 1: 2.4}, "moe": {0: 2.1, 1: 2.2}, "uoe": {0: 2.0, 1: 2.15}}
    study.write_json(tmp_path / "quality_cpu.json", fake_quality("cpu", finals), quiet=True)
    code, md = report(tmp_path, capsys)
    lines = md.splitlines()
    assert code == 0 and lines[0] == "# Does UoE beat MoE? The study at budget `cpu`"
    assert f"- budget `train`: no quality_train.json in {tmp_path} (not run, or its command has not finished)" in lines
    now = study.sha256_of(study.REPO / f for f in study.CODE_FILES)
    assert f"Made with code {now[:8]} (sha256 of uoe.py + train.py), corpus dddddddd (sha256 of train.bin + " \
           "val.bin), torch 2.x." in lines
    assert "Warning" not in md
    assert "15 runs (9 sweep, 6 reported), 0m30s per reported run (mean)" in md

    # the train budget, made with other code: both budgets in the title, one line per kind of mismatch
    study.write_json(tmp_path / "quality_train.json", fake_quality("train", finals, code="e" * 64), quiet=True)
    code, md = report(tmp_path, capsys)
    assert code == 0 and md.startswith("# Does UoE beat MoE? The study at budgets `cpu` and `train`\n")
    assert "no quality_" not in md and "Made with code eeeeeeee" in md
    warnings = [x for x in md.splitlines() if "Warning" in x]
    assert len(warnings) == 2
    assert f"quality_cpu.json: {now[:8]}, quality_train.json: eeeeeeee" in warnings[0]
    assert f"quality_train.json was made with other code than uoe.py + train.py now ({now[:8]})" in warnings[1]
    assert json.loads((tmp_path / "study_report.json").read_text())["missing"] == []

    # a file that cannot be read stops the report, in one line that says what to do
    (tmp_path / "quality_train.json").write_text('{"command": "quality", ')
    code, err = report(tmp_path, capsys)
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(tmp_path / "quality_train.json") in err[0]
    assert "delete it and run python study.py quality --preset train" in err[0]
    (tmp_path / "quality_train.json").unlink()
    (tmp_path / "ablate_cpu.json").write_text("[]")
    code, err = report(tmp_path, capsys)
    assert code == 2 and "ablate_cpu.json (not a JSON object); delete it and run python study.py ablate" in err


def test_the_report_counts_diverged_seeds_shows_no_std_for_one_and_flags_an_lr_at_the_edge(tmp_path, capsys):
    finals = {"dense": {0: 2.3}, "moe": {0: 2.1, 1: 2.2, 2: 2.25}, "moe+shared": {0: 2.2, 1: 2.3, 2: 2.4},
              "uoe": {0: 2.0, 1: None, 2: 2.1}}
    q = fake_quality("cpu", finals, best={"dense": 4e-3, "moe+shared": 1e-3})
    study.write_json(tmp_path / "quality_cpu.json", q, quiet=True)
    code, md = report(tmp_path, capsys, "cpu")
    assert code == 0 and "no quality_" not in md
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in md.splitlines() if line.startswith("| ")}
    assert rows["uoe"][-2:] == ["2.0500 ± 0.0707", "2 (1 of 3 diverged) |"]         # mean ± std of the 2 left
    assert rows["moe"][-1] == "3 |" and rows["dense"][-2:] == ["2.3000 ± –", "1 |"]  # one seed: no std
    assert "left out of the mean and of the paired differences, and counted" in md
    assert "0.0000" not in md
    assert rows["uoe − moe"][3] == "2"                                              # its pairs: seeds 0 and 2
    headline = {x.split("**")[1]: x for x in md.splitlines() if x.startswith("- **")}
    assert "2 paired seeds" in headline["uoe − moe"]
    assert "Diverged: 1 of 3 uoe runs diverged" in headline["uoe − moe"]
    assert "edge" not in headline["uoe − moe"]
    assert "over 1 seed(s): no interval" in headline["moe − dense"]
    assert "Caveat: the best lr is at the edge of the sweep for dense (0.004, its highest)" in headline["moe − dense"]
    assert "Diverged" not in headline["moe − dense"]
    assert "- Caveat: the best lr is at the edge of the sweep for moe+shared (0.001, its lowest)" in md


def test_the_report_figure_keeps_a_colour_per_variant_and_others_for_the_differences(tmp_path, monkeypatch):
    import matplotlib.colors
    saved = []
    monkeypatch.setattr(study, "save_figure", lambda fig, path: saved.append(fig))
    finals = {v: {0: 2.0 + i / 10, 1: 2.1 + i / 10} for i, v in enumerate(["dense", "moe", "moe+shared", "aoe", "uoe"])}
    cpu = fake_quality("cpu", finals)
    train = fake_quality("train", {v: x for v, x in finals.items() if v != "aoe"})    # no aoe: uoe is 4th, not 5th
    study.plot_budgets([cpu, train], tmp_path / "f.png")
    fig, = saved
    hexes = lambda ax: {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in ax.get_lines()
                        if not line.get_label().startswith("_")}
    (cpu_ax, cpu_diff), (train_ax, train_diff) = fig.axes[:2], fig.axes[2:]
    variant_colours = {v: matplotlib.colors.to_hex(f"C{i}") for i, v in enumerate(study.VARIANTS)}
    for ax, res in ((cpu_ax, cpu), (train_ax, train)):
        assert {label.split(" ")[0]: c for label, c in hexes(ax).items()}.items() >= \
            {v: variant_colours[v] for v in res["variants"]}.items()
        assert ax.get_ylabel() == "validation loss (nats/token)"
    labels = [line.get_label() for line in cpu_ax.get_lines()]
    assert any(x.startswith("uoe (D=16, lr 0.002): 2.450 (std 0.071, n=2)") for x in labels)
    for ax in (cpu_diff, train_diff):
        diffs, styles = hexes(ax), {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
        assert diffs.items() >= {"uoe − moe": "#000000", "moe − dense": "#808080"}.items()
        assert not set(diffs.values()) & set(variant_colours.values())
        assert (styles["uoe − moe"], styles["moe − dense"]) == ("-", "--")


class ClosedPipe(io.StringIO):
    """stdout whose reader has left (`python study.py report | head -1`)."""

    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def test_the_report_into_a_closed_pipe_ends_quietly(tmp_path, monkeypatch, capsys):
    finals = {"dense": {0: 2.3, 1: 2.4}, "moe": {0: 2.1, 1: 2.2}, "uoe": {0: 2.0, 1: 2.15}}
    study.write_json(tmp_path / "quality_cpu.json", fake_quality("cpu", finals), quiet=True)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert study.main(["report", "--out_dir", str(tmp_path), "--plot", "off"]) == 141     # 128 + SIGPIPE
    assert capsys.readouterr().err == ""


def test_fmt_pm_shows_no_std_for_one_seed():
    assert study.fmt_pm(2.0, 0.0, n=1) == "2.0000 ± –" and study.fmt_pm(2.0, 0.1, n=2) == "2.0000 ± 0.1000"
    assert study.fmt_pm(2.0, None) == "2.0000" and study.fmt_pm(None, None) == "–"


# ---- stopping a command ---------------------------------------------------------------------------

class FinishesThenCtrlC(InProcess):
    """A run that finishes (exit 0) while the command is interrupted: the first poll raises KeyboardInterrupt."""
    polled = False

    def poll(self):
        if not self.polled:
            self.polled = True
            raise KeyboardInterrupt
        return self.returncode


def test_a_run_that_finishes_while_the_command_stops_gets_its_result(micro, monkeypatch):
    args, spec = micro_run(micro)
    monkeypatch.setattr(study, "launch", FinishesThenCtrlC)
    with pytest.raises(KeyboardInterrupt):
        study.run_all([spec], args, study.Progress(1, 1))
    result = study.read_result(spec)                                 # written, so the next command skips it
    assert result is not None and result["final_val"] > 0 and [e[0] for e in result["evals"]] == [0, 2, 3]
    assert not (Path(spec["dir"]) / "train" / "ckpt.pt").exists()
    assert result["seconds"] == json.loads((Path(spec["dir"]) / "state.json").read_text())["seconds"]


def test_a_run_that_got_the_signal_too_is_told_by_its_log(tmp_path):
    """After an interrupt, a run whose log (of its running segment) shows train.py's stop line is left to save;
    any other is sent the signal."""
    spec = dict(dir=str(tmp_path))
    (tmp_path / "train.log").write_text("old segment\nSIGINT: stopping after this step to save a checkpoint\nstep 1\n")
    start = len("old segment\nSIGINT: stopping after this step to save a checkpoint\n")
    assert study.got_signal(spec, 0) and not study.got_signal(spec, start)
    with open(tmp_path / "train.log", "a") as f:
        f.write("\nSIGTERM: stopping after this step to save a checkpoint (send it again to quit at once)\n")
    assert study.got_signal(spec, start) and not study.got_signal(dict(dir=str(tmp_path / "none")), 0)


class SigtermToTheCommand(InProcess):
    """A SIGTERM to this process (the study command) at the first poll of its run."""
    polled = False

    def poll(self):
        if not self.polled:
            self.polled = True
            signal.signal(signal.SIGTERM, harness.on_sigterm)    # train.main, run in this process, set its own
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)                                            # the handler raises before this returns
        return self.returncode


def test_sigterm_to_the_command_stops_it_as_ctrl_c_does(micro, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(study, "launch", SigtermToTheCommand)
    argv = ["balance", *micro, "--variants", "uoe", "--aux", "0", "--seeds", "1", "--lr", "1e-3"]
    assert study.main(argv) == 143
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == ["interrupted: finished runs are kept; run the same command again to continue"]
    assert signal.getsignal(signal.SIGTERM) == before                # put back as it was


@pytest.mark.skipif(os.name != "posix", reason="signals to a process")
def test_sigterm_to_the_study_process_alone_reaches_its_runs_which_save(tmp_path, data):
    """`kill PID` of study.py: the signal is for the command alone, so it passes it on to its runs (once: a second
    would make train.py quit without saving); each saves a checkpoint, and the command exits 143 in one line."""
    cmd = [sys.executable, str(study.REPO / "study.py"), "balance", *MICRO, "--data_dir", str(data), "--dataset",
           "tiny", "--out_dir", str(tmp_path), "--variants", "uoe", "--aux", "0", "--seeds", "1", "--lr", "1e-3",
           "--steps", "100000", "--eval_interval", "1000", "--log_interval", "10"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:                               # until the run trains (its handler is set)
            logs = list((tmp_path / "runs").glob("*/train.log"))
            if logs and "step 10/" in logs[0].read_text():
                break
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("  waiting")]
    assert lines == ["interrupted: finished runs are kept; run the same command again to continue"]
    run, = (tmp_path / "runs").iterdir()
    assert "stopped by SIGTERM at step" in (run / "train.log").read_text() and (run / "train" / "ckpt.pt").is_file()
    assert json.loads((run / "state.json").read_text())["started"] is None
