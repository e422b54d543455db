"""Tests for study.py: arguments and declared designs, the statistics on known numbers (t, p, Holm), run
identity, the selection and report halves of val.bin, the results JSON, the report (every number read back from
the JSON it is made of, --write and --check), the claim on a run in progress, resuming a killed run, and tiny
end-to-end studies (train.py's main() in this process; real subprocesses in two)."""

import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import harness
import study
import train
import uoe

MICRO = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "8", "--batch_size", "2",
         "--n_expert", "4", "--top_k", "2", "--expert_hidden", "16", "--steps", "3", "--seeds", "2",
         "--warmup_steps", "1", "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "1", "--jobs", "1",
         "--device", "cpu"]
FINGERPRINT = dict(code_sha256="c" * 64, torch="2.x", cpu="a CPU", data_sha256=dict(select="d" * 64, report="e" * 64))


def micro_run(micro):
    """(args of a micro `balance` command, with its corpus halves prepared, the spec of its UoE run at lr 1e-3,
    seed 0)."""
    args = study.parse_args(["balance", *micro])
    return args, study.run_spec("uoe", study.prepare(args), 1e-3, 0, args)


# ---- arguments and declared designs ------------------------------------------------------------

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
    (["report", "--write", "--check"], "not allowed with"),
])
def test_bad_arguments_exit_2_with_one_error_line(argv, words, capsys, tmp_path):
    where = ["--results_dir", str(tmp_path)] if argv[:1] == ["report"] else ["--out_dir", str(tmp_path)]
    assert study.main(argv + where if argv else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not list(tmp_path.iterdir())                    # nothing written


def test_the_declared_designs_are_the_protocol(tmp_path):
    out = ["--out_dir", str(tmp_path), "--results_dir", str(tmp_path / "results")]
    q = study.parse_args(["quality", *out])
    assert q.exploratory == {} and q.json == str(tmp_path / "results" / "quality_cpu.json")
    assert (q.seeds, q.sweep_seeds, q.lrs) == (8, 2, [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
    assert q.variants == ["dense", "moe", "moe+shared", "aoe", "uoe"] and q.dataset == "pystdlib_char"
    assert q.steps == 500 and q.n_embd == 64 and q.compile == "eager" and q.jobs == 2 and q.threads == 1
    assert q.device == "cpu"
    t = study.parse_args(["quality", "--preset", "train", *out])            # python train.py's own model and length
    model, recipe = uoe.GPTConfig(), train.TrainConfig()
    assert (t.n_layer, t.n_embd, t.block_size, t.n_expert, t.top_k, t.expert_hidden) == (4, 128, 256, 8, 2, 256) == \
        (model.n_layer, model.n_embd, model.block_size, model.n_expert, model.top_k, model.expert_hidden)
    assert (t.steps, t.batch_size) == (recipe.max_iters, recipe.batch_size) == (1000, 16)
    assert (t.seeds, t.sweep_seeds, t.lrs) == (5, 2, [2e-3, 4e-3, 8e-3, 1.6e-2]) and t.exploratory == {}
    assert t.variants == ["dense", "moe", "moe+shared", "uoe"]
    a = study.parse_args(["ablate", *out])
    assert a.lr is None and a.variants == list(study.ABLATIONS) and (a.seeds, a.sweep_seeds) == (5, 2)
    assert a.lrs == q.lrs and a.exploratory == {}
    b = study.parse_args(["balance", *out])
    assert b.aux == [0.0, 0.01] and b.variants == ["moe", "uoe"] and b.seeds == q.seeds and b.exploratory == {}
    assert study.parse_args(["quality", "--jobs", "1", "--seeds", "8", *out]).exploratory == {}    # changes nothing


def test_a_declared_design_cannot_be_extended_only_left_for_an_exploratory_one(tmp_path):
    """--seeds 7 on the train budget is not the declared design with 2 more seeds: it is an exploratory command,
    with its own results file (under OUT_DIR unless --results_dir), which every table of it names as such."""
    t = study.parse_args(["quality", "--preset", "train", "--seeds", "7", "--out_dir", str(tmp_path)])
    assert t.exploratory == {"seeds": 7} and t.json == str(tmp_path / "results" / "quality_train-exploratory.json")
    s = study.parse_args(["quality", "--lrs", "1e-3,2e-3", "--steps", "10", "--out_dir", str(tmp_path)])
    assert s.exploratory == {"lrs": [1e-3, 2e-3], "steps": 10} and s.json.endswith("quality_cpu-exploratory.json")
    g = study.parse_args(["ablate", "--preset", "train", "--out_dir", str(tmp_path)])    # no declared design
    assert "no declared design" in g.exploratory["design"]
    assert not (tmp_path / "results" / "quality_train.json").exists()


# ---- statistics --------------------------------------------------------------------------------

def test_t_quantiles_match_the_tables():
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert study.t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)
    assert study.t_cdf(0.0, 3) == pytest.approx(0.5) and study.t_cdf(-1.0, 3) == pytest.approx(1 - study.t_cdf(1, 3))
    assert study.betainc(1, 1, 0.3) == pytest.approx(0.3) and study.betainc(2.5, 2.5, 0.5) == pytest.approx(0.5)


def test_paired_difference_interval_and_p_value_on_known_numbers():
    a = {0: 2.0, 1: 2.2, 2: 2.1}
    b = {0: 2.1, 1: 2.4, 2: 2.1, 3: 9.9}            # seed 3 has no partner: left out
    d = study.paired_difference(a, b)
    se = 0.1 / 3 ** 0.5
    assert d["n"] == 3 and d["mean"] == pytest.approx(-0.1) and d["std"] == pytest.approx(0.1)
    assert d["se"] == pytest.approx(se) and d["ci"] == pytest.approx([-0.1 - 4.3027 * se, -0.1 + 4.3027 * se], abs=1e-4)
    # df = 2 has a closed form: P(|T| > t) = 1 - t / sqrt(2 + t^2)
    t = 0.1 / se
    assert d["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    d = study.paired_difference({0: 3.0, 1: 4.0, 2: 5.0}, {0: 2.0, 1: 2.0, 2: 2.0})
    assert d["p"] == pytest.approx(1 - 2 * 3 ** 0.5 / math.sqrt(14), rel=1e-9)         # t = 2 / (1 / sqrt 3)
    for df, t in ((4, 2.776), (9, 2.262)):                              # the two-sided p at the 97.5% quantile
        diffs = {s: x for s, x in enumerate(np.linspace(-1, 1, df + 1))}
        m, sd = study.mean_std(list(diffs.values()))
        shifted = {s: x - m + t * sd / math.sqrt(df + 1) for s, x in diffs.items()}
        assert study.paired_difference(shifted, {s: 0.0 for s in diffs})["p"] == pytest.approx(0.05, abs=2e-4)
    assert study.paired_difference({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0})["p"] == 0.0     # every difference the same
    assert study.paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})["p"] == 1.0
    assert study.paired_difference({0: 1.0, 1: None}, {0: 0.5, 1: 0.7}) == \
        dict(mean=0.5, std=0.0, se=None, ci=None, p=None, n=1)
    assert study.paired_difference({}, {0: 1.0})["n"] == 0


def test_holm_adjusts_known_p_values_and_the_verdict_follows_it():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02
    assert study.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert study.holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]   # None is not counted
    assert study.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])                                # capped at 1
    row = dict(a="uoe", b="moe", mean=-0.02, ci=[-0.03, -0.01], holm=0.06)
    assert study.verdict(row) == "not decisive" and study.raw_verdict(row) == "excludes 0"
    assert study.verdict(dict(row, holm=0.049)) == "decisive: uoe is better"
    assert study.verdict(dict(row, mean=0.02, holm=0.001)) == "decisive: moe is better"
    assert study.verdict(dict(row, holm=None)).startswith("no verdict")


def test_flags_gap_curve_and_ent_load_summary_on_known_numbers():
    evals = [[0, 0, 4.0, 4.0], [10, 100, 3.0, 3.0], [20, 200, 2.0, 2.0], [30, 300, 2.0, 2.07]]
    assert study.run_flags(evals) == dict(spike=[], stall=pytest.approx(0.07))
    evals[2][3] = 3.2                                                      # +0.2 over the previous eval
    flags = study.run_flags(evals)
    assert [s for s, _ in flags["spike"]] == [20] and flags["spike"][0][1] == pytest.approx(0.2)
    assert flags["stall"] is None                                          # the final is the best eval
    assert study.run_flags([[0, 0, 4.0, 4.0], [10, 100, 3.0, 3.04]]) == dict(spike=[], stall=None)
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


# ---- a results JSON made up run by run, through the study's own plan and ledger ---------------------------

CORPUS = dict(dataset="pystdlib_char", vocab_size=97, diverged_loss=math.log(97), train_tokens=10_000_000,
              val_tokens=1200, source_sha256="s" * 64,
              splits=dict(select=dict(dataset="pystdlib_char-select", val_tokens=600, val_range=[0, 600],
                                      data_sha256="d" * 64),
                          report=dict(dataset="pystdlib_char-report", val_tokens=600, val_range=[600, 1200],
                                      data_sha256="e" * 64)))


def made_up_doc(tmp_path, value, command="quality", preset="cpu", extra=(), drop=lambda e: False):
    """A results JSON as `command` writes it, with every run the protocol plans made up: final val loss
    value(label, role, lr, seed, threads) (None: the run diverged); runs for which drop(entry) is true are left
    out. Written to tmp_path/results/<name>.json; returns (the JSON, its path)."""
    args = study.parse_args([command, "--preset", preset, "--out_dir", str(tmp_path), "--results_dir",
                             str(tmp_path / "results"), *extra])
    args.fingerprint, args.corpus = FINGERPRINT, CORPUS
    base = uoe.GPTConfig(vocab_size=97, ffn="uoe", **{k: getattr(args, k) for k in study.MODEL_KEYS})
    if command == "ablate":
        configs = {a: study.ablation_config(base, a) for a in args.variants}
        sizes = {a: dict(study.describe(c, base), changes={k: getattr(c, k) for k in study.ABLATIONS[a]})
                 for a, c in configs.items()}
    else:
        configs = study.variant_configs(base, args.variants)
        sizes = {v: study.describe(c, base) for v, c in configs.items()}
        configs.update({f"{v}:aux{c:g}": dataclasses.replace(configs[v], aux_loss_coef=c)
                        for c in getattr(args, "aux", None) or [] for v in args.variants})
    doc = study.new_doc(args, base, sizes)
    ledger, size = study.Ledger(args.json, doc), None
    while True:
        entries, _ = study.plan(doc, study.index_runs(doc))
        if len(entries) == size:
            break
        size = len(entries)
        for e in entries:
            if drop(e):
                continue
            spec = study.run_spec(e["label"], configs[e["label"]], e["lr"], e["seed"], args, e["role"])
            x = value(e["label"], e["role"], e["lr"], e["seed"], e["threads"])
            evals = [[0, 0, 4.6, 4.6], [250, 512_000, 2.6, 2.6]]
            evals += [] if x is None else [[500, 1_024_000, x + 0.01, x]]
            routing = [[500, [1.9, 1.3], [0.25, 0.45], [0.03, 0.004 * (e["seed"] % 2)]]]
            result = dict(final_val=x, final_train=None if x is None else x + 0.01, evals=evals, diverged=x is None,
                          seconds=40.0 + e["seed"], routing=routing)
            for role in [e["role"], *e["also"]]:
                ledger.add(dict(spec, role=role), result, write=False)
    ledger.write()
    return json.loads(Path(args.json).read_text()), Path(args.json)


BEST = {"dense": 8e-3, "moe": 4e-3, "moe+shared": 8e-3, "aoe": 4e-3, "uoe": 4e-3}
OFFSET = {"dense": 0.004, "moe": 0.012, "moe+shared": 0.06, "aoe": 0.03, "uoe": 0.0}


def quality_value(label, role, lr, seed, threads):
    """Made-up final losses: a bowl in log2(lr) around each variant's best rate, an offset per variant and
    noise per seed."""
    v = label.split(":")[0]                                               # balance's arms: moe:aux0 ...
    noise = random.Random(f"{label}/{seed}").gauss(0, 0.02)
    x = 2.0 + OFFSET[v] + 0.03 * math.log2(lr / BEST[v]) ** 2 + noise
    return x + (1e-6 if threads == study.MACHINE_THREADS else 0.0)


def test_the_selection_takes_the_lowest_mean_a_diverged_sweep_run_makes_it_infinite_and_flags_the_edge(tmp_path):
    def value(label, role, lr, seed, threads):
        if role == "sweep" and label == "moe" and lr == 4e-3 and seed == 1001:
            return None                                          # diverged: moe's best rate is out
        if role == "sweep" and label == "uoe":                   # a tie: the smaller rate
            return {2e-3: 1.9, 4e-3: 1.9}.get(lr, 2.5)
        return quality_value(label, role, lr, seed, threads)
    doc, _ = made_up_doc(tmp_path, value, extra=["--variants", "moe,uoe"])
    runs = study.index_runs(doc)
    moe, uo = study.selection(doc, runs, "moe"), study.selection(doc, runs, "uoe")
    assert moe["values"][4e-3][1001] == math.inf and moe["means"][4e-3] == math.inf and moe["lr"] in (2e-3, 8e-3)
    assert uo["lr"] == 2e-3 and not uo["edge"]
    assert study.selection(doc, runs, "moe")["means"][2e-3] == pytest.approx(
        (runs[("moe", 2e-3, 1000, "select", 1)]["final_val"] + runs[("moe", 2e-3, 1001, "select", 1)]["final_val"]) / 2)
    edge, _ = made_up_doc(tmp_path / "edge", lambda label, role, lr, seed, threads: 3.0 - lr,
                          extra=["--variants", "moe,uoe"])
    s = study.selection(edge, study.index_runs(edge), "uoe")
    assert s["lr"] == 1.6e-2 and s["edge"]
    assert study.selection(doc, {}, "uoe")["lr"] is None                    # no sweep run yet: no choice


# ---- run identity ------------------------------------------------------------------------------

def test_runs_are_paired_and_identified_by_options_role_threads_machine_code_and_data(tmp_path):
    args = study.parse_args(["quality", "--out_dir", str(tmp_path), "--results_dir", str(tmp_path)])
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
        assert s["identity"]["threads"] == 1 and s["identity"]["cpu"] == "a CPU" and s["threads"] == 1
        cmd = study.train_command(s)
        assert cmd[1].endswith("train.py") and "--seed=1" in cmd and f"--ffn={s['options']['ffn']!r}" in cmd
        assert "--dataset='pystdlib_char-report'" in cmd and f"--data_dir={str(tmp_path.resolve() / 'data')!r}" in cmd
    assert len({s["dir"] for s in specs}) == 4
    uoe_run = specs[3]
    assert "data_dir" not in uoe_run["options"]                         # where the files lie: not the run's identity
    assert study.run_spec("other label", configs["uoe"], 4e-3, 1, args)["dir"] == uoe_run["dir"]   # reused
    assert study.run_spec("uoe", configs["uoe"], 4e-3, 1, args, "common-lr")["dir"] == uoe_run["dir"]
    assert study.run_spec("uoe", configs["uoe"], 4e-3, 2, args)["dir"] != uoe_run["dir"]
    sweep = study.run_spec("uoe", configs["uoe"], 4e-3, 1, args, "sweep")      # never a reported run, even at
    assert sweep["dir"] != uoe_run["dir"] and sweep["options"]["dataset"] == "pystdlib_char-select"   # the same seed
    assert sweep["identity"]["data_sha256"] == "d" * 64 and uoe_run["identity"]["data_sha256"] == "e" * 64
    machine = study.run_spec("uoe", configs["uoe"], 4e-3, 1, args, "machine")   # the same run on 2 threads
    assert machine["threads"] == machine["identity"]["threads"] == 2 and machine["options"] == uoe_run["options"]
    assert machine["dir"] != uoe_run["dir"] and "-t2-" in Path(machine["dir"]).name
    args.threads = 3                                                       # another thread count: rerun
    assert study.run_spec("uoe", configs["uoe"], 4e-3, 1, args)["dir"] != uoe_run["dir"]
    args.threads = 1
    for change in (dict(code_sha256="e" * 64), dict(data_sha256=dict(select="d" * 64, report="f" * 64)),
                   dict(torch="9.9"), dict(cpu="another CPU")):
        args.fingerprint = dict(FINGERPRINT, **change)          # other code, corpus, torch or CPU: rerun
        assert study.run_spec("uoe", configs["uoe"], 4e-3, 1, args)["dir"] != uoe_run["dir"]
    abl = {a: study.ablation_config(base, a) for a in study.ABLATIONS}
    assert abl["uoe"] == base and abl["no_vse"].vse is False and abl["norm_inf"].route_norm == "inf"
    assert abl["n_routing_half"].n_routing == base.n_routing // 2
    assert abl["n_routing_double"].n_routing == 2 * base.n_routing


def test_the_run_identity_holds_threads_and_the_cpu_of_this_machine(tmp_path, data):
    args = study.parse_args(["balance", *MICRO, "--data_dir", str(data), "--dataset", "tiny", "--out_dir",
                             str(tmp_path)])
    spec = study.run_spec("uoe", study.prepare(args), 1e-3, 0, args)
    assert spec["identity"]["cpu"] == harness.cpu_name() and spec["identity"]["threads"] == 1
    assert spec["identity"]["torch"] == study.torch.__version__
    assert study.run_env(spec)["OMP_NUM_THREADS"] == "1"
    assert study.run_env(dict(spec, threads=2))["OMP_NUM_THREADS"] == "2"


def test_the_checkpoint_interval_is_not_part_of_a_runs_identity(tmp_path):
    """Resume is exact, so where a run was checkpointed cannot change it: ckpt_interval is given to train.py
    but kept out of the options that identify the run."""
    args = study.parse_args(["quality", "--out_dir", str(tmp_path), "--results_dir", str(tmp_path)])
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
    """A run's folder name holds a hash of its identity (options, role, threads, CPU, fingerprints): a change to how
    it is computed (recipe, run_spec, variant_configs, the presets) would make every finished run of a study in
    progress unfindable, and rerun. These names were computed with the code of the commit that scored runs on the
    halves of val.bin and put the thread count and the CPU into the identity (issue 26's declared protocol, before
    any of its runs; uoe.match_config already gave the other variants n_routing's default); change them only
    knowingly, with every study's runs to be made again."""
    args = study.parse_args(["quality", "--out_dir", str(tmp_path), "--results_dir", str(tmp_path)])
    args.fingerprint = FINGERPRINT
    base = uoe.GPTConfig(vocab_size=97, **{k: getattr(args, k) for k in study.MODEL_KEYS})
    configs = study.variant_configs(base, list(study.VARIANTS))
    names = {v: Path(study.run_spec(v, c, 4e-3, 0, args)["dir"]).name for v, c in configs.items()}
    assert names == {"dense": "dense-D352-lr0.004-s0-4c8aca5742", "moe": "moe-D175-lr0.004-s0-89b3a10e1c",
                     "moe+shared": "moe-D116-lr0.004-s0-c622defd99", "aoe": "aoe-D191-lr0.004-s0-a63af30757",
                     "uoe": "uoe-D128-lr0.004-s0-690eb228b1"}
    assert Path(study.run_spec("uoe", configs["uoe"], 1e-3, 1000, args, "sweep")["dir"]).name == \
        "uoe-D128-lr0.001-s1000-sweep-d504dae177"
    assert Path(study.run_spec("uoe", configs["uoe"], 4e-3, 0, args, "machine")["dir"]).name == \
        "uoe-D128-lr0.004-s0-t2-27f59d2f6d"
    assert Path(study.run_spec("x", study.ablation_config(base, "n_routing_half"), 4e-3, 0, args)["dir"]).name == \
        "uoe-D128-lr0.004-s0-d5dc9e6eda"
    args = study.parse_args(["quality", "--preset", "train", "--out_dir", str(tmp_path), "--results_dir",
                             str(tmp_path)])
    args.fingerprint = FINGERPRINT
    base = uoe.GPTConfig(vocab_size=97, **{k: getattr(args, k) for k in study.MODEL_KEYS})
    moe = study.variant_configs(base, ["moe"])["moe"]
    assert Path(study.run_spec("moe", moe, 2e-3, 3, args)["dir"]).name == "moe-D351-lr0.002-s3-9aa5766fb3"


def change_first_token(path):
    with open(path, "r+b") as f:
        first = f.read(2)
        f.seek(0)
        f.write(b"\1\0" if first == b"\0\0" else b"\0\0")


def test_the_fingerprints_are_of_the_code_and_the_corpus(tmp_path, data, monkeypatch):
    shutil.copytree(data / "tiny", tmp_path / "tiny")
    f = study.corpus_sha256(tmp_path / "tiny")
    assert f == study.corpus_sha256(data / "tiny") and len(f) == 64
    change_first_token(tmp_path / "tiny" / "val.bin")                    # another corpus
    assert study.corpus_sha256(tmp_path / "tiny") != f
    code = study.code_fingerprint()
    assert len(code["code_sha256"]) == 64 and code["cpu"] == harness.cpu_name() and "gpu" not in code
    (tmp_path / "uoe.py").write_text("# other code\n")
    monkeypatch.setattr(study, "REPO", tmp_path)
    monkeypatch.setattr(study, "CODE_FILES", ("uoe.py",))
    assert study.code_fingerprint()["code_sha256"] != code["code_sha256"]


# ---- the selection and report halves of val.bin ------------------------------------------------------------

def test_val_bin_is_split_into_disjoint_selection_and_report_halves(tmp_path, data):
    args = study.parse_args(["quality", *MICRO, "--data_dir", str(data), "--dataset", "tiny", "--out_dir",
                             str(tmp_path)])
    study.prepare(args)
    val = np.fromfile(data / "tiny" / "val.bin", dtype=np.uint16)
    meta = json.loads((data / "tiny" / "meta.json").read_text())
    halves = {}
    for split in study.SPLITS:
        folder = tmp_path / "data" / f"tiny-{split}"
        halves[split] = np.fromfile(folder / "val.bin", dtype=np.uint16)
        assert (folder / "train.bin").read_bytes() == (data / "tiny" / "train.bin").read_bytes()
        m = json.loads((folder / "meta.json").read_text())
        assert m["val_tokens"] == len(halves[split]) and m["vocab_size"] == meta["vocab_size"]
        assert m["itos"] == meta["itos"] and "source_sha256" not in m and split in m["note"]
        assert args.corpus["splits"][split]["data_sha256"] == study.corpus_sha256(folder)
        assert args.fingerprint["data_sha256"][split] == study.corpus_sha256(folder)
    assert len(halves["select"]) == len(val) // 2 and len(halves["report"]) == len(val) - len(val) // 2
    assert np.array_equal(np.concatenate([halves["select"], halves["report"]]), val)    # disjoint, and all of it
    assert args.corpus["diverged_loss"] == pytest.approx(math.log(meta["vocab_size"]))
    before = (tmp_path / "data" / "tiny-select" / "meta.json").stat().st_mtime_ns
    study.prepare(args)                                                   # as it is: left alone
    assert (tmp_path / "data" / "tiny-select" / "meta.json").stat().st_mtime_ns == before


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


RECORD_KEYS = {"label", "role", "also", "lr", "seed", "split", "threads", "options", "code_sha256", "data_sha256",
               "torch", "cpu", "final_train", "final_val", "evals", "diverged", "flags", "seconds", "run"}


def test_a_tiny_study_selects_on_held_out_seeds_and_tokens_and_writes_every_run_to_its_results_json(micro, tmp_path,
                                                                                                    capsys):
    """quality (an exploratory tiny one), then ablate and balance, which reuse its sweep and its runs, then the
    report from the results JSON alone."""
    argv = ["quality", *micro, "--variants", "moe,uoe", "--lrs", "1e-3,2e-3", "--results_dir", str(tmp_path / "res")]
    assert study.main(argv) == 0
    doc = json.loads((tmp_path / "res" / "quality_cpu-exploratory.json").read_text())
    assert doc["protocol"]["declared"] is False and doc["protocol"]["exploratory"]["lrs"] == [1e-3, 2e-3]
    # per variant 2 lrs x sweep seeds 1000, 1001; 2 reported seeds; the pair at both common rates (half of them
    # the reported runs); seed 0 on 2 threads
    ran = calls()
    assert len(ran) == len(set(ran)) == 2 * 2 * 2 + 2 * 2 + 2 * 2 + 2
    runs = doc["runs"]
    assert len(runs) == len(ran) and all(r.keys() >= RECORD_KEYS for r in runs)
    code = study.code_fingerprint()
    for r in runs:
        assert r["code_sha256"] == code["code_sha256"] and r["torch"] == code["torch"] and r["cpu"] == code["cpu"]
        assert (r["role"] == "sweep") == (r["split"] == "select") == (r["seed"] >= 1000)
        assert r["options"]["dataset"] == f"tiny-{r['split']}" and r["options"]["learning_rate"] == r["lr"]
        assert r["data_sha256"] == doc["corpus"]["splits"][r["split"]]["data_sha256"]
        assert [e[0] for e in r["evals"]] == [0, 2, 3] and r["final_val"] == r["evals"][-1][3]
        assert r["final_train"] == r["evals"][-1][2] and r["diverged"] is False and r["seconds"] > 0
        assert r["threads"] == (2 if r["role"] == "machine" else 1)
    sel = {v: study.selection(doc, study.index_runs(doc), v)["lr"] for v in ("moe", "uoe")}
    for r in runs:                                              # every reported run at its variant's chosen rate
        assert r["role"] != "reported" or r["lr"] == sel[r["label"]]
        assert r["role"] != "reported" or "common-lr" in r["also"]         # both rates are common: reused
    for command in InProcess.commands:                          # train.py read the half it was scored on
        assert ("--seed=100" in " ".join(command)) == ("--dataset='tiny-select'" in command)
        assert f"--data_dir={str(tmp_path.resolve() / 'data')!r}" in command
    printed = capsys.readouterr().out
    assert "| uoe − moe | primary |" in printed and "Exploratory" in printed and "ETA" in printed
    assert all((r / "result.json").is_file() and not (r / "train" / "ckpt.pt").exists()
               for r in (tmp_path / "runs").iterdir())

    # a rerun skips what finished; a run whose result is missing (interrupted) runs again
    reported = next(r for r in runs if r["role"] == "reported")
    (tmp_path / "runs" / reported["run"] / "result.json").unlink()
    assert study.main(argv) == 0
    assert calls() == [str(tmp_path / "runs" / reported["run"])]
    again = json.loads((tmp_path / "res" / "quality_cpu-exploratory.json").read_text())["runs"]
    assert [dict(r, seconds=0) for r in again] == [dict(r, seconds=0) for r in runs]

    # ablate: each ablation's own sweep (the full UoE's is quality's: reused), then its reported seeds
    assert study.main(["ablate", *micro, "--ablations", "uoe,no_vse", "--lrs", "1e-3,2e-3", "--results_dir",
                       str(tmp_path / "res")]) == 0
    ab = json.loads((tmp_path / "res" / "ablate_cpu-exploratory.json").read_text())
    assert len(calls()) == 2 * 2 + 2                     # no_vse's sweep and its 2 seeds; the full UoE's: reused
    assert {r["run"] for r in ab["runs"] if r["label"] == "uoe"} <= {r["run"] for r in runs}
    assert ab["protocol"]["comparisons"] == [["no_vse", "uoe", "ablation"]]
    assert "| no_vse − uoe | ablation |" in capsys.readouterr().out

    # balance: each variant at its quality selection (the sweep reused), without the aux loss (new runs) and with it
    # (quality's reported runs)
    assert study.main(["balance", *micro, "--lrs", "1e-3,2e-3", "--results_dir", str(tmp_path / "res")]) == 0
    bal = json.loads((tmp_path / "res" / "balance_cpu-exploratory.json").read_text())
    assert len(calls()) == 2 * 2 and all(r["routing"] for r in bal["runs"])
    an = study.analyse(bal)
    assert {(r["variant"], r["aux_loss_coef"], r["layer"]) for r in an["balance"]} >= \
        {(v, a, 0) for v in ("moe", "uoe") for a in (0.0, 0.01)}
    for r in an["balance"]:
        assert 0 <= r["ent_load"][0] <= an["ent_load_max"] + 1e-9 and r["seeds"] == 2
        assert r["min_load"][0] <= 1 / 4 <= r["max_load"][0]
    assert "| uoe − moe | 0 | 0 |" in capsys.readouterr().out

    # the report, from the results JSON alone (the runs folder gone)
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()
    assert study.main(["report", "--results_dir", str(tmp_path / "res")]) == 0
    md = capsys.readouterr().out
    assert "### Results at the `cpu` budget (exploratory:" in md and "- **uoe − moe** = " in md
    assert "| no_vse − uoe | ablation |" in md and "| uoe − moe | 0 | 0 |" in md
    assert "Not run yet: `python study.py quality --preset cpu`" in md


def test_a_run_of_other_code_or_data_is_rerun(micro, tmp_path, data, monkeypatch):
    shutil.copytree(data / "tiny", tmp_path / "data_in" / "tiny")
    argv = ["balance", *micro, "--data_dir", str(tmp_path / "data_in"), "--variants", "uoe", "--aux", "0",
            "--seeds", "1", "--lr", "1e-3"]
    assert study.main(argv) == 0 and len(calls()) == 1
    assert study.main(argv) == 0 and calls() == []                       # the same: reused
    (tmp_path / "uoe.py").write_text("# other code\n")
    monkeypatch.setattr(study, "REPO", tmp_path)                        # (train.py itself still runs from REPO)
    monkeypatch.setattr(study, "CODE_FILES", ("uoe.py",))
    assert study.main(argv) == 0 and len(calls()) == 1                   # other code: rerun
    change_first_token(tmp_path / "data_in" / "tiny" / "val.bin")        # the first token: the selection half's
    assert study.main(argv) == 0 and calls() == []                       # reported runs never see it: reused
    with open(tmp_path / "data_in" / "tiny" / "val.bin", "r+b") as f:   # the last token: the report half's
        f.seek(-2, os.SEEK_END)
        last = f.read(2)
        f.seek(-2, os.SEEK_END)
        f.write(b"\1\0" if last == b"\0\0" else b"\0\0")
    assert study.main(argv) == 0 and len(calls()) == 1                   # another report half: rerun
    assert len(list((tmp_path / "runs").iterdir())) == 3


def test_a_diverged_run_is_a_result_and_a_broken_one_a_one_line_error(micro):
    args = study.parse_args(["quality", *micro])
    base = study.prepare(args)
    spec = study.run_spec("uoe", base, 1e-3, 0, args)
    spec["options"]["debug_nan_step"] = 2                          # train.py's testing aid
    r, = study.run_all([spec], args, study.Progress(1, 1))
    assert r["diverged"] and r["final_val"] is None and r["final_train"] is None
    assert [e[0] for e in r["evals"]] == [0]                       # its evals before it diverged are kept
    bad = study.run_spec("uoe", base, 1e-3, 1, args)
    bad["options"]["n_head"] = 5                                   # 16 is not divisible by 5
    with pytest.raises(study.UserError, match="train.py failed for uoe lr 0.001 seed 1 .exit 2.: invalid model"):
        study.run_all([bad], args, study.Progress(1, 1))


def test_a_diverged_run_counts_as_ln_vocab_size_and_is_named(tmp_path):
    """A diverged run is not dropped from the pairs (that would favour a variant that diverges): its final loss is
    ln(vocab_size), a uniform guess, in every mean and difference, and the verdict sentence names it."""
    def value(label, role, lr, seed, threads):
        return None if (label, role, seed) == ("moe", "reported", 2) else quality_value(label, role, lr, seed, threads)
    doc, _ = made_up_doc(tmp_path, value)
    an = study.analyse(doc)
    assert an["complete"] and an["finals"]["moe"][2] == pytest.approx(math.log(97)) and an["diverged"]["moe"] == [2]
    c = next(c for c in an["comparisons"] if c["name"] == "uoe − moe")
    assert c["n"] == 8 and c["mean"] == pytest.approx(statistics.fmean(
        [an["finals"]["uoe"][s] - an["finals"]["moe"][s] for s in range(8)]))
    md = study.doc_markdown(doc, an)
    line = next(x for x in md.splitlines() if x.startswith("- **uoe − moe**"))
    assert f"Diverged, each counted at {math.log(97):.4f}: 1 of 8 moe runs (seed 2)." in line
    assert "No run of uoe or moe+shared diverged." in md
    assert "- moe, reported, lr 0.004, seed 2: diverged" in md                       # flagged, by name
    head = study.headline_block({doc["name"]: doc}, {doc["name"]: an})
    assert "1 diverged run(s) counted" in next(x for x in head.splitlines() if "uoe − moe (primary)" in x)


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
    base = study.prepare(args)
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
    monkeypatch.setattr(study, "train_command",
                        lambda spec, resume=False: [sys.executable, "-c", stopped, *real(spec, resume)[2:]])
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




# ---- the report ---------------------------------------------------------------------------------------

def table(md, header_start):
    """The rows of the markdown table whose header line starts with header_start: [[cell, ...], ...]."""
    lines = md.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith(header_start))
    rows = []
    for x in lines[i + 2:]:
        if not x.startswith("|"):
            break
        rows.append([c.strip() for c in x.strip("|").split("|")])
    return rows


def number(cell):
    return float(cell.replace("−", "-"))


def reference_holm(ps):
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def test_the_report_gives_every_number_of_the_json_and_calls_decisive_only_what_holm_allows(tmp_path):
    doc, path = made_up_doc(tmp_path, quality_value)
    ab, _ = made_up_doc(tmp_path, lambda label, role, lr, seed, threads: quality_value(
        "uoe", role, lr, seed, threads) + {"no_vse": 0.05, "output_twice": -0.004}.get(label, 0.0), command="ablate")
    docs = study.read_results(tmp_path / "results")
    assert list(docs) == ["quality_cpu", "ablate_cpu"]                     # declared order
    md = study.results_block(docs, {n: study.analyse(d) for n, d in docs.items()}, "assets")
    assert not re.search(r"[{}]", md)                                    # no placeholder left unformatted
    runs = study.index_runs(doc)
    p = doc["protocol"]

    # per-seed values: each the JSON's run, to 4 decimals
    for label, role, lr, *cells in table(md, "| variant | role | lr | seed 0 |"):
        for s, cell in zip(p["seeds"], cells):
            assert number(cell) == round(runs[(label, float(lr), s, "report", 1)]["final_val"], 4), (label, lr, s)
    # the sweep: the mean over the sweep seeds and each seed's
    for v, *cells, chosen in table(md, "| variant | lr 0.001 |"):
        for lr, cell in zip(p["lrs"], cells):
            vals = [runs[(v, lr, s, "select", 1)]["final_val"] for s in p["sweep_seeds"]]
            m = re.fullmatch(r"(\S+) \((\S+) / (\S+)\)", cell)
            assert number(m[1]) == round(statistics.fmean(vals), 4)
            assert [number(m[2]), number(m[3])] == [round(x, 4) for x in vals]
        best = min(p["lrs"], key=lambda lr: sum(runs[(v, lr, s, "select", 1)]["final_val"] for s in p["sweep_seeds"]))
        assert float(chosen.split()[0]) == best == BEST[v]
    # the quality table: mean ± std over the reported seeds
    for v, d, *_, lr, val, diverged, flagged in table(md, "| variant | D |"):
        vals = [runs[(v, BEST[v], s, "report", 1)]["final_val"] for s in p["seeds"]]
        assert float(lr) == BEST[v] and val == f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f}"
        assert int(d) == doc["variants"][v]["expert_hidden"] and diverged == flagged == "0"
    # the comparisons: mean ± SE, the t interval, p and Holm p, computed here from the JSON's runs
    rows = table(md, "| comparison | kind |")
    assert [r[0] for r in rows] == ["uoe − moe+shared", "uoe − moe", "moe − dense", "uoe − dense",
                                    "moe+shared − dense", "moe+shared − moe", "uoe − aoe"]
    ps = []
    for name, kind, diff, ci, p_raw, p_holm, raw, verdict in rows:
        a, b = name.split(" − ")
        d = [runs[(a, BEST[a], s, "report", 1)]["final_val"] - runs[(b, BEST[b], s, "report", 1)]["final_val"]
             for s in p["seeds"]]
        n, mean = len(d), sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
        half = study.t_quantile(0.975, n - 1) * se
        assert diff == f"{mean:+.4f} ± {se:.4f}" and ci == f"[{mean - half:+.4f}, {mean + half:+.4f}]"
        ps.append(2 * study.t_cdf(-abs(mean) / se, n - 1))
        assert number(p_raw) == float(f"{ps[-1]:.3g}")
        assert raw == ("excludes 0" if mean - half > 0 or mean + half < 0 else "includes 0")
        assert kind == ("primary" if (a, b) in study.PRIMARY else "secondary")
    for (name, *_, p_holm, raw, verdict), h in zip(rows, reference_holm(ps)):
        assert number(p_holm) == float(f"{h:.3g}")
        assert verdict.startswith("decisive") == (h < 0.05), name
    verdicts = [r[-1] for r in rows]
    assert any(v.startswith("decisive") for v in verdicts) and "not decisive" in verdicts
    assert any(r[-2] == "excludes 0" and r[-1] == "not decisive" for r in rows)      # raw and Holm disagree
    assert sum(x.startswith("- **") for x in md.splitlines()) == 2                     # the 2 primary sentences
    for line in md.splitlines():                             # a sentence says decisive only where Holm p < 0.05
        m = re.search(r"Holm p = (\S+)\): (decisive|not decisive)", line)
        if m:
            assert (m[2] == "decisive") == (float(m[1]) < 0.05)
    # the ablations, their own family of 8
    abl = table(md, "| comparison | kind |")                 # the first such table is quality's
    rows = table(md[md.index("UoE's ablations"):], "| comparison | kind |")
    assert len(rows) == 8 and all(r[1] == "ablation" for r in rows) and abl != rows
    assert "over the 8 comparisons of this family" in md and "over the 7 comparisons of this family" in md
    # the README headline: the same numbers
    head = study.headline_block(docs, {n: study.analyse(d) for n, d in docs.items()})
    cmp = {r[0]: r for r in table(md, "| comparison | kind |")}
    for budget, n, name, diff_ci, p_holm, verdict in table(head, "| budget |"):
        if budget == "`cpu`":
            key = name.split(" (")[0]
            assert diff_ci == f"{cmp[key][2].split(' ±')[0]} {cmp[key][3]}" and p_holm == cmp[key][5]
            assert verdict == cmp[key][7] and n == "8"
        else:
            assert (budget, name, diff_ci) == ("`train`", "–", "not run yet")


@pytest.mark.parametrize("shift", [1e-6, 0.03, 0.5])
def test_the_machine_check_names_every_difference_that_one_runs_rounding_matches(tmp_path, shift):
    """The 2-thread rerun's move is set against each comparison's mean: those it matches as a whole are named."""
    made_up_doc(tmp_path, lambda label, role, lr, seed, threads: quality_value(label, role, lr, seed, threads)
                + (shift if threads == study.MACHINE_THREADS and label == "uoe" else 0.0))
    docs = study.read_results(tmp_path / "results")
    md = study.results_block(docs, {n: study.analyse(d) for n, d in docs.items()}, "assets")
    moved = max(abs(float(r[3]) - float(r[4])) for r in table(md, "| variant | seed | lr |"))
    means = {r[0]: abs(number(r[2].split(" ±")[0])) for r in table(md, "| comparison | kind |")}
    line = next(x for x in md.splitlines() if x.startswith("Another thread count moved"))
    named = [n for n, m in means.items() if moved >= m]
    if named:
        assert f"as large as the whole of {len(named)} of the {len(means)} differences above ({', '.join(named)};" in line
    else:
        assert "as large as the whole" not in line and "a tenth" in line


@pytest.mark.parametrize("gap", [1.0, 0.0])
def test_the_headline_reading_names_what_holm_and_the_raw_intervals_allow_and_no_more(tmp_path, gap):
    """gap 1: the made-up offsets between variants (some verdicts decisive); gap 0: every variant alike but for
    noise. The reading's every claim is checked against the headline table it sums up."""
    made_up_doc(tmp_path, lambda label, role, lr, seed, threads: quality_value(label, role, lr, seed, threads)
                - (1 - gap) * OFFSET[label])
    docs = study.read_results(tmp_path / "results")
    head = study.headline_block(docs, {n: study.analyse(d) for n, d in docs.items()})
    reading = next(x for x in head.splitlines() if x.startswith("**Reading.**"))
    rows = table(head, "| budget |")
    assert rows and all(r[0] == "`cpu`" or r[3] == "not run yet" for r in rows)
    decisive, raw_only = [], []
    for budget, n, name, diff_ci, p_holm, verdict in rows:
        if budget != "`cpu`":
            continue
        name, lo, hi = name.split(" (")[0], *map(number, re.search(r"\[(\S+), (\S+)\]", diff_ci).groups())
        if verdict.startswith("decisive"):
            decisive.append(f"{name} at `cpu` ({verdict.removeprefix('decisive: ')})")
        elif not lo <= 0 <= hi:
            raw_only.append(name)
        if name in ("uoe − moe+shared", "uoe − moe"):
            said = f"{name}: every raw 95% interval includes 0"
            assert (said in reading) == (lo <= 0 <= hi), name
            if lo <= 0 <= hi:
                assert f"gaps as large as {max(-lo, hi):.3f} nats (`cpu`)" in reading
    assert (f"Decisive after Holm: {'; '.join(decisive)}." in reading) if decisive else \
        "No comparison is decisive after Holm at `cpu`." in reading
    assert all(f"{name} at `cpu` (" in reading for name in raw_only)
    assert ("but not after Holm" in reading) == bool(raw_only)
    assert bool(decisive) == (gap == 1.0)


def test_an_incomplete_budget_says_which_runs_are_missing_and_draws_no_verdict(tmp_path):
    def drop(e):
        return (e["label"], e["role"], e["seed"]) == ("uoe", "reported", 3) or e["role"] == "machine"
    doc, _ = made_up_doc(tmp_path, quality_value, drop=drop)
    an = study.analyse(doc)
    assert not an["complete"] and len(an["missing"]) == 1 + 3
    md = study.doc_markdown(doc, an)
    assert f"**Incomplete: 4 of the {an['planned']} runs planned so far have not finished." in md
    assert "- uoe, reported, lr 0.004: seed 3" in md and "- moe+shared, machine, lr 0.008, 2 threads: seed 0" in md
    assert "decisive:" not in md and "not decisive" not in md and "- **" not in md and "| comparison |" not in md
    head = study.headline_block({doc["name"]: doc}, {doc["name"]: an})
    assert f"| `cpu` | 8 | – | incomplete: 4 of {an['planned']} planned runs missing | – | no verdict yet |" in head
    # no sweep run yet of one variant: its later runs are not planned yet, and the report says so
    doc, _ = made_up_doc(tmp_path / "b", quality_value, drop=lambda e: e["label"] == "aoe")
    md = study.doc_markdown(doc, study.analyse(doc))
    assert "the reported runs of aoe join the plan once its sweep is complete" in md
    assert "- aoe, sweep, lr 0.001: seeds 1000, 1001" in md


def write_markdown(tmp_path):
    (tmp_path / "RESULTS.md").write_text("# Results\n\nabove\n<!-- study:begin -->\nold text\n<!-- study:end -->\n"
                                          "below\n")
    (tmp_path / "README.md").write_text("# uoe\n<!-- headline:begin -->\nold\n<!-- headline:end -->\nrest\n")
    return ["--results_dir", str(tmp_path / "results"), "--results_md", str(tmp_path / "RESULTS.md"), "--readme",
            str(tmp_path / "README.md"), "--assets_dir", str(tmp_path / "assets")]


def test_write_puts_the_text_between_the_markers_and_check_finds_an_edited_number(tmp_path, capsys):
    made_up_doc(tmp_path, quality_value)
    paths = write_markdown(tmp_path)
    assert study.main(["report", "--check", *paths]) == 1                 # the old text
    assert study.main(["report", "--write", "--plot", "off", *paths]) == 0
    results = (tmp_path / "RESULTS.md").read_text()
    assert results.startswith("# Results\n\nabove\n<!-- study:begin -->\nGenerated by `python study.py report") and \
        results.endswith("\n<!-- study:end -->\nbelow\n") and "old text" not in results
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# uoe\n<!-- headline:begin -->\n| budget |")
    assert readme.endswith("<!-- headline:end -->\nrest\n")
    capsys.readouterr()
    assert study.main(["report", "--check", *paths]) == 0
    # one number edited by hand: --check names the line
    lines = results.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith("| uoe | reported |"))
    edited = lines[i].replace(lines[i].split(" | ")[3], "1.2345")
    (tmp_path / "RESULTS.md").write_text("\n".join(lines[:i] + [edited] + lines[i + 1:]) + "\n")
    capsys.readouterr()
    assert study.main(["report", "--check", *paths]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tmp_path / 'RESULTS.md'}:{i + 1}: committed ")
    assert "1.2345" in err[0] and "run python study.py report --write" in err[0]
    # a marker missing: one error line
    (tmp_path / "README.md").write_text("# uoe\nno markers\n")
    assert study.main(["report", "--write", "--plot", "off", *paths]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "<!-- headline:begin -->" in err[0] and err[0].startswith("error: ")


def test_write_blocks_fills_several_blocks_of_one_file_each_between_its_own_markers(tmp_path, capsys):
    """harness.write_blocks, which study.py report and routers.py --report share: two blocks in one file, one empty
    and one not, each gets its own text and the lines around them stay; --check then passes, and names the line of
    a block's first difference."""
    path = tmp_path / "doc.md"
    path.write_text("top\n<!-- a:begin -->\n<!-- a:end -->\nmiddle\n<!-- b:begin -->\nold\nlines\n<!-- b:end -->\nend\n")
    blocks = {"doc": (path, [("<!-- a:begin -->", "<!-- a:end -->", "one\ntwo"),
                             ("<!-- b:begin -->", "<!-- b:end -->", "three")])}
    assert harness.write_blocks(blocks, False, "the source", "the command") == 0
    assert path.read_text() == ("top\n<!-- a:begin -->\none\ntwo\n<!-- a:end -->\nmiddle\n<!-- b:begin -->\nthree\n"
                                "<!-- b:end -->\nend\n")
    assert harness.write_blocks(blocks, True, "the source", "the command") == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {path}", f"{path} matches the source"]
    blocks["doc"][1][1] = ("<!-- b:begin -->", "<!-- b:end -->", "three\nfour")
    assert harness.write_blocks(blocks, True, "the source", "the command") == 1
    assert capsys.readouterr().err == (f"{path}:9: committed the end of the block, generated 'four' (the text the "
                                       "source gives); run the command\n")


def test_the_report_of_no_results_says_so_and_a_broken_file_is_one_error_line(tmp_path, capsys):
    paths = write_markdown(tmp_path)
    assert study.main(["report", "--write", *paths]) == 0
    assert "<!-- study:begin -->\nNo run of this protocol has finished yet: there is no result to report.\n" \
           "<!-- study:end -->" in (tmp_path / "RESULTS.md").read_text()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "quality_train.json").write_text('{"format": 1, ')
    capsys.readouterr()
    assert study.main(["report", *paths]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "results" / "quality_train.json") in err[0]
    assert "delete it and run python study.py quality --preset train" in err[0]


def test_write_draws_the_figures_it_links_with_a_colour_per_variant(tmp_path, monkeypatch, capsys):
    import matplotlib.colors
    made_up_doc(tmp_path, quality_value)
    made_up_doc(tmp_path, quality_value, command="balance")
    saved, real = {}, study.save_figure

    def save_figure(fig, path):
        saved[path.name] = fig
        return real(fig, path)
    monkeypatch.setattr(study, "save_figure", save_figure)
    paths = write_markdown(tmp_path)
    assert study.main(["report", "--write", *paths]) == 0
    results = (tmp_path / "RESULTS.md").read_text()
    linked = re.findall(r"!\[[^]]*\]\(assets/([^)]+)\)", results)
    assert linked == ["study_sweep_quality_cpu.png", "study_seeds_quality_cpu.png", "study_balance_balance_cpu.png"]
    assert all((tmp_path / "assets" / f).stat().st_size > 0 for f in linked) and set(saved) == set(linked)
    hexes = lambda ax: {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in ax.get_lines()
                        if not line.get_label().startswith("_")}
    variant_colours = {v: matplotlib.colors.to_hex(f"C{i}") for i, v in enumerate(study.VARIANTS)}
    sweep, = saved["study_sweep_quality_cpu.png"].axes
    assert {label.split(":")[0]: c for label, c in hexes(sweep).items()} == variant_colours
    curves, diffs = saved["study_seeds_quality_cpu.png"].axes
    assert {label.split(" ")[0]: c for label, c in hexes(curves).items()} == \
        {v: variant_colours[v] for v in ("uoe", "moe+shared", "moe")}
    assert hexes(diffs) == {"uoe − moe+shared": "#000000", "uoe − moe": "#808080"}


def test_the_committed_text_is_what_the_shipped_results_give():
    """RESULTS.md §1 and the README headline are generated from results/*.json: python study.py report --check."""
    if not list((study.REPO / "results").glob("*.json")):
        pytest.skip("no results/*.json shipped yet (run the study, then python study.py report --write)")
    assert study.main(["report", "--check"]) == 0


class ClosedPipe(io.StringIO):
    """stdout whose reader has left (`python study.py report | head -1`)."""

    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def test_the_report_into_a_closed_pipe_ends_quietly(tmp_path, monkeypatch, capsys):
    made_up_doc(tmp_path, quality_value)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert study.main(["report", "--results_dir", str(tmp_path / "results")]) == 141     # 128 + SIGPIPE
    assert capsys.readouterr().err == ""


def test_fmt_pm_shows_no_std_for_one_seed():
    assert study.fmt_pm(2.0, 0.0, n=1) == "2.0000 ± –" and study.fmt_pm(2.0, 0.1, n=2) == "2.0000 ± 0.1000"
    assert study.fmt_pm(2.0, None) == "2.0000" and study.fmt_pm(None, None) == "–"


def test_balance_gives_max_over_min_as_a_ratio_of_means_never_infinity(micro, tmp_path, monkeypatch, capsys):
    """A row's max / min load is its mean max load over its mean min load (a mean of per-seed ratios is ruled by the
    seed with the emptiest expert: 1253 where the means give 117, and inf when an expert got no tokens in one
    seed); a row whose least-loaded expert got none in every seed says "no tokens". Routing made up per seed:
    [max load, min load]."""
    loads = {("moe", 0.0): [[0.5, 0.01], [0.4, 0.0]], ("uoe", 0.0): [[0.6, 0.0], [0.5, 0.0]],
             ("moe", 0.01): [[0.3, 0.2], [0.3, 0.1]], ("uoe", 0.01): [[0.2, 0.1], [0.2, 0.1]]}

    def made_up_runs(specs, args, progress):
        out = {}
        for s in specs:
            v, aux = s["label"].split(":aux")
            mx, mn = loads[(v, float(aux))][s["seed"]]
            out[s["dir"]] = dict(final_val=2.0, final_train=2.0, evals=[[3, 96, 2.0, 2.0]], diverged=False,
                                 seconds=1.0, routing=[[args.steps, [1.0], [mx], [mn]]])
        return out
    monkeypatch.setattr(study, "run_specs", made_up_runs)
    assert study.main(["balance", *micro, "--lr", "1e-3"]) == 0
    text = (tmp_path / "results" / "balance_cpu-exploratory.json").read_text()

    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    rows = study.analyse(json.loads(text, parse_constant=refuse))["balance"]
    ratio = {(r["variant"], r["aux_loss_coef"]): r["max_over_min"] for r in rows}
    assert ratio[("moe", 0.0)] == pytest.approx(0.45 / 0.005) and ratio[("uoe", 0.0)] is None
    assert ratio[("moe", 0.01)] == pytest.approx(0.3 / 0.15) and ratio[("uoe", 0.01)] == pytest.approx(2.0)
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| moe |") or line.startswith("| uoe |")}
    assert rows[("| moe", "0")][7] == "90.0" and rows[("| uoe", "0")][7] == "no tokens"
    assert rows[("| moe", "0.01")][7] == "2.0"


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


def test_the_ablations_say_how_many_are_decisive_and_which_ran_at_another_lr_than_the_full_uoe(tmp_path):
    """An ablation whose sweep chooses another rate than the full UoE's is named: its difference is the ablation
    and the rate together (the family has no common-lr runs)."""
    def value(label, role, lr, seed, threads):
        if label == "no_vse":                                    # its bowl is centred on 8e-3, the others' on 4e-3
            return 2.05 + 0.03 * math.log2(lr / 8e-3) ** 2 + random.Random(f"{label}/{seed}").gauss(0, 0.02)
        return quality_value("uoe", role, lr, seed, threads)
    doc, _ = made_up_doc(tmp_path, value, command="ablate")
    an = study.analyse(doc)
    md = study.doc_markdown(doc, an)
    rows = table(md, "| comparison | kind |")
    decisive = [r[0] for r in rows if r[-1].startswith("decisive")]
    assert f"Of the 8 ablations, {len(decisive)} differ decisively from the full UoE after Holm" in md
    assert ("1 of the 8 ran at a learning rate other than the full UoE's 0.004 (each chosen by its own sweep): "
            "no_vse (0.008);") in md
    doc, _ = made_up_doc(tmp_path / "same", lambda label, *rest: quality_value("uoe", *rest), command="ablate")
    assert "ran at a learning rate other than" not in study.doc_markdown(doc, study.analyse(doc))
    # an exploratory family without the full UoE has no comparison, and no sentence about one
    doc, _ = made_up_doc(tmp_path / "alone", value, command="ablate", extra=["--ablations", "no_vse,output_twice"])
    md = study.doc_markdown(doc, study.analyse(doc))
    assert "| no_vse | vse=False |" in md and "Of the" not in md
