"""Tests for routers.py: each measure on a constructed model whose answer is known, and the command's
outputs and errors."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

import routers
import uoe
from conftest import ROUTED_VARIANTS
from uoe import GPT, GPTConfig

SIZES = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_expert=4, top_k=2, expert_hidden=16)


def tokens(n_windows, seed=0, sizes=SIZES):
    """(n_windows, block_size + 1) random token windows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(sizes["vocab_size"], (n_windows, sizes["block_size"] + 1), generator=g)


def model_of(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SIZES, **overrides})).eval()


@torch.no_grad()
def router_is_intensity(seed=0, unit=3):
    """A float64 MoE whose router ranks the experts exactly as their intensity does: ln_2 makes feature 0 of
    every FFN input 1 (weight 0, bias 1); expert i has one live hidden unit, whose gate column w_i is also
    the router's column i, with w_i[0] = 25. So the logit is z_i = x w_i ~ 25 > 0 and the intensity
    ||SiLU(x W_g^i)|| = SiLU(z_i), increasing in z_i, and = z_i (1 - 1e-11): UoE's gates softmax(s[I]) are
    the router's renormalised p[I] = softmax(z[I])."""
    model = model_of(seed, ffn="moe", bias=True).double()
    C, E = SIZES["n_embd"], SIZES["n_expert"]
    g = torch.Generator().manual_seed(seed)
    for block in model.transformer.h:
        block.ln_2.weight[0], block.ln_2.bias[0] = 0.0, 1.0
        w = torch.randn(C, E, generator=g, dtype=torch.float64) * 0.3 / C ** 0.5
        w[0] = 25.0
        block.mlp.router.copy_(w)
        block.mlp.w_gate.zero_()
        block.mlp.w_gate[:, :, unit] = w.T
    return model


def test_a_router_that_is_the_intensity_agrees_100_percent_and_loses_nothing():
    model, val = router_is_intensity(), tokens(4, seed=1)
    r = routers.measure(model, tokens(4), val, batch_size=2)
    for row in r["layers"]:
        for name in ("all", "best"):   # best: the live unit is among the chosen units of every expert
            assert row["agreement"][name]["overlap"] == 1.0
            assert row["agreement"][name]["spearman"] == pytest.approx(1.0, abs=1e-12)
        assert (torch.tensor(row["best_units"]) == 3).any(-1).all()
        assert row["loss"]["all"] == pytest.approx(r["own_loss"], abs=1e-6)
        assert abs(row["loss"]["random"] - r["own_loss"]) > 2e-5   # a random choice changes the output (float64: 1e-12)
    assert r["every_layer"]["all"] == pytest.approx(r["own_loss"], abs=1e-6)
    assert r["every_layer"]["best"] == pytest.approx(r["own_loss"], abs=1e-6)
    model(val[:, :-1], val[:, 1:])
    assert r["own_loss"] == pytest.approx(model.last_ce.item(), abs=1e-6)   # the layer-by-layer forward is GPT's


@torch.no_grad()
def test_a_router_that_reads_other_features_than_the_experts_agrees_at_chance():
    """Router columns read features 0..C/2-1 of the FFN input, the experts' gates only the others, and the FFN
    input is the layer-normed embedding of one of 2048 random token types (no position embedding, attention
    output 0): the two rankings are independent, so the top-K overlap is K/E and Spearman's rho 0, up to noise
    (over 6 seeds: overlap 0.241-0.265, rho -0.018-0.031)."""
    sizes = dict(SIZES, vocab_size=2048, n_layer=1, n_expert=8)
    C = sizes["n_embd"]
    model = model_of(1, **sizes, ffn="moe")
    model.transformer.wpe.weight.zero_()
    for block in model.transformer.h:
        block.attn.c_proj.weight.zero_()
        block.mlp.router[C // 2:] = 0
        block.mlp.w_gate[:, :C // 2] = 0
    r = routers.measure(model, tokens(8, sizes=sizes), tokens(64, seed=1, sizes=sizes), n_units=4, batch_size=16)
    assert r["chance_overlap"] == 0.25
    for name in ("all", "best"):
        assert r["layers"][0]["agreement"][name]["overlap"] == pytest.approx(0.25, abs=0.04)
        assert r["layers"][0]["agreement"][name]["spearman"] == pytest.approx(0.0, abs=0.06)


@pytest.mark.parametrize("variant", [v for v in ROUTED_VARIANTS if v != "aoe"])
@torch.no_grad()
def test_the_layer_run_on_its_own_choice_is_the_layer(variant):
    """run_chosen with the FFN's own experts and gates reproduces its forward (VSE, shared experts, switches)."""
    mlp = model_of(2, **ROUTED_VARIANTS[variant]).transformer.h[0].mlp
    u = torch.randn(2, 8, SIZES["n_embd"])
    y = mlp(u)
    own_idx = mlp.last_routing["topk_idx"]
    x = u.reshape(-1, SIZES["n_embd"])
    if isinstance(mlp, uoe.UoEFFN):   # UoE's gates: softmax over the chosen scores
        gates = torch.softmax(mlp.last_routing["scores"].gather(1, own_idx), dim=-1)
    else:                             # MoE's: the router's probabilities renormalised over the chosen
        gates = torch.softmax(uoe.routing_matmul(x, mlp.router), dim=-1).gather(1, own_idx)
        gates = gates / gates.sum(-1, keepdim=True)
    torch.testing.assert_close(routers.run_chosen(mlp, u, own_idx, gates), y)


@pytest.mark.parametrize("ffn", ["moe", "uoe"])
@torch.no_grad()
def test_with_identical_experts_every_choice_gives_the_models_loss(ffn):
    """All experts equal and gates summing to 1: whichever K experts are chosen, the output is the same."""
    model = model_of(3, ffn=ffn)
    for block in model.transformer.h:
        for w in (block.mlp.w_gate, block.mlp.w_up, block.mlp.w_down):
            w.copy_(w[:1].expand_as(w))
    r = routers.measure(model, tokens(2), tokens(2, seed=1))
    for losses in [row["loss"] for row in r["layers"]] + [r["every_layer"]]:
        assert set(losses) == ({"all", "best", "control", "random"} | ({"rest"} if ffn == "uoe" else set()))
        for loss in losses.values():
            assert loss == pytest.approx(r["own_loss"], abs=1e-5)


@torch.no_grad()
def test_uoe_concentration_one_live_routing_unit_and_uniform_units():
    """Only routing unit 0 of each expert is live: all of its score is in its strongest unit (share 1).
    All routing units of an expert equal: every unit has the same share (k / R)."""
    R = 4   # top 10% of 4 units -> 1 unit (round(0.4) = 0, at least 1); top 25% -> 1 unit
    one = model_of(4, ffn="uoe", n_routing=R)
    same = model_of(4, ffn="uoe", n_routing=R)
    for a, b in zip(one.transformer.h, same.transformer.h):
        a.mlp.w_gate[:, :, 1:R] = 0
        b.mlp.w_gate[:, :, :R] = b.mlp.w_gate[:, :, :1]
    for model, expected in ((one, 1.0), (same, 0.25)):
        r = routers.measure(model, tokens(2), tokens(2, seed=1))
        for row in r["layers"]:
            for c in row["concentration"].values():
                assert c["units"] == 1 and c["uniform"] == 0.25
                np.testing.assert_allclose(c["share"], expected, rtol=1e-6)
    assert set(r["layers"][0]["agreement"]) == {"all", "best", "rest", "control"}


def test_greedy_units_finds_the_set_whose_squared_intensity_is_the_score():
    """s_i = a_i7^2 + a_i2^2 + a_i5^2, independent units, unit 7 the strongest, and unit 8 a near copy of unit 7:
    alone it tracks s_i better than units 2 and 5, but together with 7 it adds nothing. The greedy selection of the
    set, fed in two batches, finds {7 or 8, 2, 5}; ranking the units one by one would take {7, 8, ...}."""
    g = torch.Generator().manual_seed(0)
    sq = torch.rand(4000, 2, 10, generator=g).square()                  # (N, E, D) a^2
    sq[:, :, 7] *= 3
    sq[:, :, 8] = sq[:, :, 7] + 0.01 * torch.rand(4000, 2, generator=g)
    score = sq[:, :, 7] + sq[:, :, 2] + sq[:, :, 5]                     # (N, E)
    acc = {}
    for part in (slice(0, 1500), slice(1500, 4000)):
        routers.add_unit_stats(acc, sq[part], score[part])
    for row in routers.greedy_units(acc, 3).tolist():   # 7 or its copy 8 (which one is sampling noise), 2, 5
        assert sorted(row) in ([2, 5, 7], [2, 5, 8])


@torch.no_grad()
def test_the_control_reads_only_the_std_of_the_gate_weights():
    """The control's units come from random weights with the std of W_g: negating W_g (the same std; in a
    one-layer model the FFN's input, the router and its choices stay as they were) changes the experts' own
    agreement and not the control's."""
    model = model_of(6, ffn="moe", n_layer=1)
    train, val = tokens(2), tokens(2, seed=1)
    before = routers.measure(model, train, val)
    model.transformer.h[0].mlp.w_gate.neg_()
    after = routers.measure(model, train, val)
    b, a = before["layers"][0], after["layers"][0]
    assert a["agreement"]["control"] == b["agreement"]["control"] and a["control_units"] == b["control_units"]
    assert a["agreement"]["best"] != b["agreement"]["best"]


def test_spearman_and_overlap_on_known_rankings():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    assert routers.spearman(a, b).tolist() == [1.0, -1.0]
    overlap = routers.top_overlap(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[1, 0], [1, 2]]), 4)
    assert overlap.tolist() == [1.0, 0.5]


# -----------------------------------------------------------------------------
# the command

def write_run(root, name, ffn, data_dir):
    """A run folder as train.py leaves it (ckpt.pt, run.json, metrics.jsonl), a randomly initialised model."""
    config = GPTConfig(**{**SIZES, "ffn": ffn})
    out = root / name
    out.mkdir()
    uoe.save_checkpoint(str(out / "ckpt.pt"), {"model": model_of(5, ffn=ffn).state_dict(), "config": asdict(config)})
    (out / "run.json").write_text(json.dumps({"config": asdict(config), "train": {"data_dir": str(data_dir)},
                                              "dataset": "tiny", "meta": {"dtype": "uint16"}}))
    (out / "metrics.jsonl").write_text("")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("routers")
    folder = root / "data" / "tiny"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(SIZES["vocab_size"], size=4000).astype(np.uint16).tofile(folder / f"{split}.bin")
    return {ffn: write_run(root, f"out-{ffn}", ffn, root / "data") for ffn in ("moe", "uoe", "dense")}


def test_command_prints_a_table_per_run_and_writes_json_and_figure(runs, tmp_path, capsys):
    out = tmp_path / "figs"
    code = routers.main([str(runs["moe"]), str(runs["uoe"]), f"--out_dir={out}", "--val_tokens=64",
                         "--train_tokens=64", "--device=cpu"])
    assert code == 0
    text = capsys.readouterr().out
    assert "| layer | overlap all 16 | overlap best 4 |" in text and "overlap rest 12" in text
    result = json.loads((out / "routers.json").read_text())
    assert [r["ffn"] for r in result["runs"]] == ["moe", "uoe"]
    assert result["runs"][0]["val_tokens"] == 64 and len(result["runs"][1]["layers"]) == SIZES["n_layer"]
    assert (out / "routers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["routers.json", "routers.png"]


def test_a_moe_without_a_valid_n_routing_needs_n_units():
    """GPTConfig checks n_routing for uoe only; an moe's is only the default size of the 'best' set."""
    model = model_of(ffn="moe", n_routing=0)
    with pytest.raises(routers.UserError, match="pass --n_units"):
        routers.measure(model, tokens(2), tokens(2, seed=1))
    assert routers.measure(model, tokens(2), tokens(2, seed=1), n_units=2)["n_units"] == 2


def test_an_interrupt_while_writing_leaves_no_half_written_file(runs, tmp_path, monkeypatch, capsys):
    def killed_midway(fig, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(routers.plot.Figure, "savefig", killed_midway)
    code = routers.main([str(runs["moe"]), f"--out_dir={tmp_path}", "--val_tokens=32", "--train_tokens=32",
                         "--device=cpu"])
    assert code == 130
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.strip() == "interrupted: no file was left half-written"


@pytest.mark.parametrize("args, message", [
    (["{dense}"], "measures moe and uoe"),
    (["{moe}", "--val_tokens=0"], "--val_tokens=0 must be >= 1"),
    (["{moe}", "--n_units=99"], "more than the experts' 16 hidden units"),
    (["{moe}", "--vaL_tokens=5"], "did you mean --val_tokens"),
    (["{moe}", "--data_dir={tmp}"], "no train.bin beside"),
    (["nowhere"], "no metrics.jsonl in nowhere"),
    (["{moe}", "--out_dir={tmp}/val.bin/figs", "--val_tokens=32", "--train_tokens=32"], "cannot create --out_dir"),
    ([], "give the out_dir of at least one"),
])
def test_user_errors_are_one_line_and_exit_2(runs, args, message, tmp_path, capsys):
    (tmp_path / "val.bin").write_bytes(np.zeros(100, np.uint16).tobytes())   # --data_dir={tmp}: no train.bin
    args = [a.format(**runs, tmp=tmp_path) for a in args]
    assert routers.main(args + ["--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
