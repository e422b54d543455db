"""Tests for plot.py: figures come from a short real run and show the run's own numbers."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
import torch

import plot
import uoe
from conftest import REPO
from uoe import GPT, GPTConfig

TEXT = "the quick brown fox jumps over the lazy dog.\nA bad cat sat on a mat; " * 120
SIZES = dict(block_size=32, n_layer=2, n_head=2, n_embd=32, n_expert=4, top_k=2, expert_hidden=32)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_dataset(root, name="tiny"):
    """data/<name>/{train.bin, val.bin, meta.json} of TEXT, char level, as data/prepare.py writes it."""
    itos = sorted(set(TEXT))
    ids = np.array([itos.index(c) for c in TEXT], dtype=np.uint16)
    n_val = len(ids) // 10
    folder = Path(root) / name
    folder.mkdir(parents=True)
    ids[:-n_val].tofile(folder / "train.bin")
    ids[-n_val:].tofile(folder / "val.bin")
    meta = {"name": name, "tokenizer": "char", "vocab_size": len(itos), "dtype": "uint16",
            "train_tokens": len(ids) - n_val, "val_tokens": n_val, "itos": itos,
            "stoi": {c: i for i, c in enumerate(itos)}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder, meta


def make_run(out_dir, data_folder, meta, ffn, steps=20, batch_size=8, **overrides):
    """Train a tiny GPT for a few steps and write ckpt.pt, run.json and metrics.jsonl in the
    INTERFACE schema, as train.py does."""
    torch.manual_seed(0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    config = GPTConfig(vocab_size=meta["vocab_size"], ffn=ffn, **{**SIZES, **overrides})
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = {s: torch.from_numpy(np.fromfile(data_folder / f"{s}.bin", dtype=np.uint16).astype(np.int64))
            for s in ("train", "val")}
    gen = torch.Generator().manual_seed(0)
    T = config.block_size

    def batch(split):
        ix = torch.randint(len(data[split]) - T - 1, (batch_size,), generator=gen)
        return (torch.stack([data[split][i:i + T] for i in ix]),
                torch.stack([data[split][i + 1:i + T + 1] for i in ix]))

    train = dict(dataset=data_folder.name, batch_size=batch_size, max_iters=steps, learning_rate=1e-2)
    (out_dir / "run.json").write_text(json.dumps({"config": asdict(config), "train": train,
                                                  "dataset": data_folder.name, "meta": meta}))
    fpt = uoe.flops_per_token(config)
    with open(out_dir / "metrics.jsonl", "w") as f:
        for step in range(steps + 1):
            tokens = step * batch_size * T
            if step % 5 == 0:
                model.eval()
                losses = {s: estimate_ce(model, [batch(s) for _ in range(2)]) for s in ("train", "val")}
                model.train()
                f.write(json.dumps({"kind": "eval", "step": step, "tokens": tokens, "flops": 3 * fpt * tokens,
                                    "train_loss": losses["train"], "val_loss": losses["val"]}) + "\n")
            if step == steps:
                break
            _, loss = model(*batch("train"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tokens += batch_size * T
            if step % 2 == 0 or step == steps - 1:
                f.write(json.dumps({"kind": "train", "step": step + 1, "tokens": tokens, "flops": 3 * fpt * tokens,
                                    "lr": 1e-2, "loss": loss.item(), "ce": model.last_ce.item(),
                                    "aux": model.last_aux.item(), "tok_per_s": 1.0, "step_ms": 1.0, "mfu": None,
                                    "routing": model.routing_summary()}) + "\n")
    uoe.save_checkpoint(str(out_dir / "ckpt.pt"), {"model": model.state_dict(), "config": asdict(config),
                                                   "step": steps, "train_config": train, "version": 1})
    return out_dir


@torch.no_grad()
def estimate_ce(model, batches):
    ce = []
    for x, y in batches:
        model(x, y)
        ce.append(model.last_ce.item())
    return float(np.mean(ce))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    folder, meta = make_dataset(root / "data")
    return {"data": folder, "meta": meta,
            **{ffn: make_run(root / f"out-{ffn}", folder, meta, ffn) for ffn in ("uoe", "moe", "dense")}}


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200


# what plot_run writes for a routed run from metrics.jsonl alone, and what it needs the checkpoint and val.bin for
ROUTING_FIGURES = {"ent_load.png", "load_minmax.png", "conf_entropy.png", "vse_share.png", "load_heatmap.png"}
CHECKPOINT_FIGURES = {"intensity.png", "specialisation.png", "specialisation.md"}


def test_plot_run_writes_every_figure_of_a_uoe_run(runs):
    written = plot.plot_run(runs["uoe"], data_dir=runs["data"], strict=True)
    names = {p.name for p in written}
    assert names >= {"loss.png", "loss_flops.png"} | ROUTING_FIGURES | CHECKPOINT_FIGURES   # more is harmless
    for p in written:
        assert p.parent == runs["uoe"] and p.is_file()
        if p.suffix == ".png":
            assert_png(p)
    assert "| expert | tokens routed | preferred tokens (lift) |" in (runs["uoe"] / "specialisation.md").read_text()


def test_dense_run_skips_routing_figures(runs, capsys):
    names = {p.name for p in plot.plot_run(runs["dense"], data_dir=runs["data"], strict=True)}
    assert names >= {"loss.png", "loss_flops.png"}
    assert not names & (ROUTING_FIGURES | CHECKPOINT_FIGURES)


def test_missing_val_data_skips_checkpoint_figures_with_a_note(runs, tmp_path, capsys):
    names = {p.name for p in plot.plot_run(runs["moe"], data_dir=tmp_path, strict=True)}
    assert "note: skipped specialisation.png: no val.bin" in capsys.readouterr().err
    assert names >= {"loss.png", "loss_flops.png"} | (ROUTING_FIGURES - {"vse_share.png"})
    assert not names & (CHECKPOINT_FIGURES | {"vse_share.png"})   # no checkpoint data; no VSE in a moe


def test_plot_run_survives_a_cut_log_without_run_json(runs, tmp_path):
    out = tmp_path / "partial"
    out.mkdir()
    log = (runs["uoe"] / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(log[:len(log) // 2])   # the last line cut in the middle
    names = {p.name for p in plot.plot_run(out, strict=True)}
    assert {"loss.png", "ent_load.png", "load_heatmap.png"} <= names
    (out / "metrics.jsonl").write_text("")
    assert plot.plot_run(out, strict=True) == []


def lines(ax, gid):
    return [line for line in ax.lines if line.get_gid() == gid]


def test_loss_curves_show_the_runs_logged_and_eval_losses_against_tokens_and_flops(runs):
    all_runs = plot.load_runs([runs["uoe"], runs["moe"]])
    for x in ("tokens", "flops"):
        fig = plot.plot_loss(all_runs, x=x)
        ax_train, ax_val = fig.axes
        for i, name in enumerate(("uoe", "moe")):
            ev = [r for r in metrics(runs[name]) if r["kind"] == "eval"]
            tr = [r for r in metrics(runs[name]) if r["kind"] == "train"]
            np.testing.assert_allclose(ax_val.lines[i].get_xdata(), [r[x] for r in ev])
            np.testing.assert_allclose(ax_val.lines[i].get_ydata(), [r["val_loss"] for r in ev])
            assert ax_val.lines[i].get_color() == all_runs[i].color
            # training panel: every logged training ce (raw and smoothed), the eval points on top
            logged, smooth, dots = (lines(ax_train, gid)[i] for gid in ("train_logged", "train_smoothed", "train_eval"))
            for line in (logged, smooth):
                np.testing.assert_allclose(line.get_xdata(), [r[x] for r in tr])
            np.testing.assert_allclose(logged.get_ydata(), [r["ce"] for r in tr])
            np.testing.assert_allclose(smooth.get_ydata(), plot.smoothed([r["ce"] for r in tr]))
            np.testing.assert_allclose(dots.get_xdata(), [r[x] for r in ev])
            np.testing.assert_allclose(dots.get_ydata(), [r["train_loss"] for r in ev])
            assert dots.get_zorder() > smooth.get_zorder() and logged.get_alpha() < 1
        labels = [t.get_text() for t in ax_train.get_legend().get_texts()]
        assert labels == ["uoe E4 K2 D32 R8", "moe E4 K2 D32"]
    assert plot.plot_loss(all_runs, log=True).axes[0].get_yscale() == "log"


def test_smoothing_is_light_and_starts_at_the_first_value():
    assert plot.smoothed([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])
    steps = plot.smoothed([1.0] + [0.0] * 19)
    assert steps[0] == 1.0 and steps[-1] < 0.01          # forgets within ~20 points


def test_variant_colours_are_fixed_and_repeats_get_shades(runs):
    a, b, c = plot.load_runs([runs["uoe"], runs["moe"], runs["uoe"]])
    assert b.color == pytest.approx(matplotlib.colors.to_rgb(plot.COLORS["moe"]))
    assert a.color == pytest.approx(matplotlib.colors.to_rgb(plot.COLORS["uoe"])) and c.color != a.color
    assert a.label != c.label


def test_a_variant_without_its_own_colour_still_gets_one(runs, monkeypatch):
    monkeypatch.delitem(plot.COLORS, "moe")
    [run] = plot.load_runs([runs["moe"]])
    assert run.color == pytest.approx(matplotlib.colors.to_rgb(plot.OTHER_COLOR))


# the labels plot gave before uoe.ffn_label made them, byte for byte; settings a variant does not read stay out
@pytest.mark.parametrize("settings,label", [
    (dict(ffn="dense"), "dense D256"), (dict(ffn="dense", n_expert=4, vse=False), "dense D256"),
    (dict(ffn="moe"), "moe E8 K2 D256"), (dict(ffn="moe", n_shared=1, vse=False), "moe E8 K2 D256 S1"),
    (dict(ffn="aoe"), "aoe E8 K2 D256 L42"), (dict(ffn="aoe", d_low=7, n_shared=1), "aoe E8 K2 D256 L7"),
    (dict(ffn="uoe"), "uoe E8 K2 D256 R32"),
    (dict(ffn="uoe", vse=False, uoe_output="twice", route_score="pre"), "uoe E8 K2 D256 R32 noVSE twice pre"),
    (dict(ffn="uoe", route_score="swiglu", n_routing=5, n_expert=4, top_k=1, expert_hidden=48, n_shared=1),
     "uoe E4 K1 D48 R5 swiglu")])
def test_settings_label_of_each_variant_is_unchanged(settings, label):
    assert plot.settings_label(asdict(GPTConfig(**settings))) == label


@pytest.mark.parametrize("ffn,msgs", [("soe", ["'soe'", "dense, moe, aoe, uoe"]), (None, ["names no ffn"])])
def test_a_run_of_an_unregistered_variant_is_one_line_exit_2(runs, tmp_path, capsys, ffn, msgs):
    out = tmp_path / "out-new"
    out.mkdir()
    (out / "metrics.jsonl").write_text((runs["moe"] / "metrics.jsonl").read_text())
    info = json.loads((runs["moe"] / "run.json").read_text())
    info["config"]["ffn"] = ffn   # trained by a uoe.py with a variant that this one lacks
    if ffn is None:
        del info["config"]["ffn"]
    (out / "run.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit) as e:
        plot.main([str(out), "--no_ckpt"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot plot {out}: run.json: ") and all(m in err for m in msgs)
    assert not list(out.glob("*.png"))


def test_load_heatmap_is_the_last_logged_load(runs):
    run = plot.load_run(runs["uoe"])
    last = [r for r in metrics(runs["uoe"]) if r["kind"] == "train"][-1]
    grid = plot.plot_load_heatmap(run).axes[0].images[0].get_array()
    np.testing.assert_allclose(grid, [layer["load"] for layer in last["routing"]])
    assert grid.shape == (SIZES["n_layer"], SIZES["n_expert"])


@pytest.mark.parametrize("fn,keys", [(plot.plot_ent_load, ["ent_load"]), (plot.plot_conf_entropy, ["conf_entropy"]),
                                     (plot.plot_vse_share, ["vse_share"]),
                                     (plot.plot_load_minmax, ["max_load", "min_load"])])
def test_routing_over_training_shows_the_logged_statistics(runs, fn, keys):
    fig = fn(plot.load_runs([runs["uoe"]]))
    train = [r for r in metrics(runs["uoe"]) if r["kind"] == "train"]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [f"layer {i}" for i in range(SIZES["n_layer"])]
    for layer, ax in enumerate(panels):
        for key in keys:   # one line per statistic: the logged values of this layer, against tokens seen
            [line] = lines(ax, key)
            np.testing.assert_allclose(line.get_xdata(), [r["tokens"] for r in train])
            np.testing.assert_allclose(line.get_ydata(), [r["routing"][layer][key] for r in train])


def test_vse_share_figure_leaves_out_runs_without_vse(runs):
    fig = plot.plot_vse_share(plot.load_runs([runs["uoe"], runs["moe"]]))
    assert all(len(lines(ax, "vse_share")) == 1 for ax in fig.axes[:SIZES["n_layer"]])   # the uoe's only


def test_intensity_violins_are_the_checkpoints_routing_scores_on_val(runs):
    run = plot.load_run(runs["uoe"])
    model = plot.load_model(run)
    val = np.fromfile(runs["data"] / "val.bin", dtype=np.uint16)
    r = plot.val_routing(model, val, n_tokens=256)
    fig = plot.plot_intensity(run, r["scores"], model.config)
    # recompute the scores with an ordinary forward of the same tokens
    T = len(r["tokens"]) // (256 // SIZES["block_size"])
    model(r["tokens"].view(-1, T))
    for layer, ax in enumerate(fig.axes[:SIZES["n_layer"]]):
        scores = model.transformer.h[layer].mlp.last_routing["scores"]
        torch.testing.assert_close(r["scores"][layer], scores)
        medians = next(c for c in ax.collections if c.get_gid() == "medians")
        got = [seg[0][1] for seg in medians.get_segments()]
        np.testing.assert_allclose(got, np.median(scores.numpy(), axis=0), rtol=1e-5)
    assert fig.get_supylabel() == "routing-neuron intensity ||SiLU(x W_g)||_2"


@pytest.mark.parametrize("score,norm,label", [("silu", 2, "||SiLU(x W_g)||_2"), ("pre", "inf", "||x W_g||_inf"),
                                              ("swiglu", 1, "||SiLU(x W_g) * x W_p||_1")])
def test_intensity_axis_names_the_runs_own_score(score, norm, label):
    assert plot.intensity_label(GPTConfig(ffn="uoe", route_score=score, route_norm=norm)) == label


def test_specialisation_ranks_tokens_by_lift_per_expert():
    # token 0 always -> expert 0, token 1 -> expert 1, token 2 split between experts 0 and 1,
    # token 3 below min_count; K = 1, 2 experts
    tokens = torch.tensor([0] * 10 + [1] * 10 + [2] * 20 + [3] * 2)
    experts = torch.tensor([0] * 10 + [1] * 10 + [0, 1] * 10 + [0] * 2).view(-1, 1)
    spec = plot.specialisation(tokens, [experts, None], n_expert=2, min_count=5, top=2)
    assert spec[1] is None
    share0 = 22 / 42
    assert spec[0]["share"] == pytest.approx([share0, 1 - share0])
    top0 = spec[0]["experts"][0]
    assert [t["token"] for t in top0] == [0]   # token 2's lift 0.5 / share0 < 1: not preferred
    assert top0[0]["lift"] == pytest.approx(1 / share0) and top0[0]["share"] == 1 and top0[0]["count"] == 10
    top1 = spec[0]["experts"][1]
    assert [t["token"] for t in top1] == [1, 2]
    assert [t["lift"] for t in top1] == pytest.approx([1 / (1 - share0), 0.5 / (1 - share0)])


def routed_by_hand(n_vocab=8, E=4):
    """A one-layer top-1 MoE whose router sends token v to expert v % E: one-hot embeddings, no
    attention output, router row v -> column v % E."""
    config = GPTConfig(vocab_size=n_vocab, block_size=16, n_layer=1, n_head=1, n_embd=16, ffn="moe",
                       n_expert=E, top_k=1, expert_hidden=8)
    model = GPT(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.eye(n_vocab, 16))
        model.transformer.wpe.weight.zero_()
        model.transformer.h[0].attn.c_proj.weight.zero_()
        router = model.transformer.h[0].mlp.router
        router.zero_()
        for v in range(n_vocab):
            router[v, v % E] = 10.0
    return model


def test_specialisation_of_a_constructed_model_finds_its_token_to_expert_map(tmp_path):
    model = routed_by_hand()
    val = np.tile(np.arange(8, dtype=np.uint16), 64)   # every token equally often
    r = plot.val_routing(model, val, n_tokens=512)
    assert (r["topk_idx"][0][:, 0] == r["tokens"] % 4).all()
    spec = plot.specialisation(r["tokens"], r["topk_idx"], 4, min_count=5, top=2)
    for e in range(4):
        assert sorted(t["token"] for t in spec[0]["experts"][e]) == [e, e + 4]
        assert all(t["lift"] == pytest.approx(4.0) and t["share"] == 1.0 for t in spec[0]["experts"][e])
    show = plot.token_decoder({"tokenizer": "char", "itos": list("ab cdefg")})
    assert show(2) == "␣" and show(0) == "a"
    md = plot.specialisation_markdown(spec, show, "moe", 512, 5)
    assert "| 0 | 25.0% | `a` 4.00, `d` 4.00 |" in md


def test_cli_compares_several_runs_in_one_folder(runs, tmp_path):
    out = tmp_path / "figures"
    p = subprocess.run([sys.executable, "plot.py", str(runs["uoe"]), str(runs["moe"]), "--out_dir", str(out),
                        "--x", "flops", "--log", "--data_dir", str(runs["data"])],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    names = {f.name for f in out.iterdir()}
    assert {"loss_flops.png", "ent_load.png", "vse_share.png", "load_heatmap_out-uoe.png", "load_heatmap_out-moe.png",
            "intensity_out-uoe.png", "specialisation_out-moe.md"} <= names
    assert "intensity_out-moe.png" not in names
    assert "# Expert specialisation: uoe E4 K2 D32 R8" in p.stdout


@pytest.mark.parametrize("args,msg", [(["/nonexistent"], "no metrics.jsonl"), (["--x", "steps", "a"], "invalid choice"),
                                      ([], "required")])
def test_cli_errors_are_one_line_exit_2(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and msg in err


def test_an_out_dir_that_cannot_be_made_is_one_line_exit_2(runs, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        plot.main([str(runs["uoe"]), "--no_ckpt", "--out_dir", str(tmp_path / "a_file" / "figs")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot create --out_dir") and "choose another" in err
