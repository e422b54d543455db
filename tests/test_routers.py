"""Tests for routers.py: the protocol's statistics on constructed models and data whose answer is known, the
markdown written from the JSON, and the command's outputs and errors."""

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import routers
import study
import uoe
from conftest import ENV, REPO, ROUTED_VARIANTS
from uoe import GPT, GPTConfig

SIZES = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_expert=4, top_k=2, expert_hidden=16)
FAST = dict(batch_size=8, resamples=200, random_draws=3, random_choices=2)   # the protocol's counts, scaled down


def tokens(n_windows, seed=0, sizes=SIZES):
    """(n_windows, block_size + 1) random token windows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(sizes["vocab_size"], (n_windows, sizes["block_size"] + 1), generator=g)


def model_of(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SIZES, **overrides})).eval()


def measured(model, train, val, **kwargs):
    """measure() and the Holm adjustment over its own tests."""
    r = routers.measure(model, train, val, **{**FAST, **kwargs})
    routers.adjust([r])
    return r


@torch.no_grad()
def router_is_intensity(seed=0, unit=3):
    """A float64 MoE with 8 experts (the pairing null needs more than 4: 4! pairings cannot give p < 0.05) whose
    router ranks the experts exactly as their intensity does: ln_2 makes feature 0 of every FFN input 1 (weight
    0, bias 1); expert i has one live hidden unit, whose gate column w_i is also the router's column i, with
    w_i[0] = 25. So the logit is z_i = x w_i ~ 25 > 0 and the intensity ||SiLU(x W_g^i)|| = SiLU(z_i),
    increasing in z_i: expert i's intensity tracks its own logit."""
    E = 8
    model = model_of(seed, ffn="moe", bias=True, n_expert=E).double()
    C = SIZES["n_embd"]
    g = torch.Generator().manual_seed(seed)
    for block in model.transformer.h:
        block.ln_2.weight[0], block.ln_2.bias[0] = 0.0, 1.0
        w = torch.randn(C, E, generator=g, dtype=torch.float64) * 0.3 / C ** 0.5
        w[0] = 25.0
        block.mlp.router.copy_(w)
        block.mlp.w_gate.zero_()
        block.mlp.w_gate[:, :, unit] = w.T
    return model


@pytest.fixture(scope="module")
def planted():
    return measured(router_is_intensity(), tokens(16), tokens(32, seed=1))


def test_a_planted_router_aligned_expert_is_found_by_every_test(planted):
    """Own AUROC high, far above every shift and every other pairing, the interval of own - shifts above 0:
    'aligned'. (Not 1: with independent logits a token can have a high z_i and still lose to two others, and
    even z_i itself, which the intensity orders exactly, scores below 1.) The selected units contain the live
    unit and beat every shift; routing by the intensity with the router's gates is the model."""
    for row in planted["layers"]:
        u = row["unsupervised"]["all"]
        assert u["own"] > 0.8 and all(u["own"] > s + 0.2 for s in u["shifts"]) and u["rank"] == 1
        assert u["diff"]["p_pairing"] == pytest.approx(2 / 40320) and u["pairings"]["hi"] < u["own"]
        assert u["diff"]["lo"] > 0 and u["diff"]["verdict"] == "aligned"
        assert u["overlap"]["own"] == 1.0                        # the intensity's top K is the router's
        s = row["supervised"]["auc"]
        assert s["own"] == pytest.approx(u["own"], abs=1e-9) and s["rank_shifts"] == 1 and s["diff_shifts"]["lo"] > 0
        assert all(3 in units for units in row["supervised"]["own_units"])
        # same choice, same gates as the model: the loss does not move
        assert row["loss"]["router"]["intensity"]["est"] == pytest.approx(0, abs=1e-9)
    assert planted["every_layer"]["router"]["intensity"]["est"] == pytest.approx(0, abs=1e-9)
    # another choice changes the output (float64: rounding is 1e-12)
    assert all(abs(v["est"]) > 1e-6 for k, v in planted["every_layer"]["router"].items() if k.startswith("random"))


@torch.no_grad()
def test_a_router_independent_of_the_experts_shows_no_evidence():
    """Router columns read features 0..C/2-1 of the FFN input, the experts' gates only the others, and the FFN
    input is the layer-normed embedding of one of 2048 random token types (no position embedding, attention
    output 0): expert i's intensity says nothing about the router's choice, own is inside the shifts' null.
    (At 95%, one such model in twenty would show a difference by chance; this one does not.)"""
    sizes = dict(SIZES, vocab_size=2048, n_layer=1, n_expert=8)
    C = sizes["n_embd"]
    model = model_of(1, **sizes, ffn="moe")
    model.transformer.wpe.weight.zero_()
    for block in model.transformer.h:
        block.attn.c_proj.weight.zero_()
        block.mlp.router[C // 2:] = 0
        block.mlp.w_gate[:, :C // 2] = 0
    r = measured(model, tokens(8, sizes=sizes), tokens(64, seed=1, sizes=sizes), n_units=4)
    for name in ("all", "subset"):
        u = r["layers"][0]["unsupervised"][name]
        assert u["diff"]["lo"] < 0 < u["diff"]["hi"] and u["diff"]["verdict"] == "no evidence"
        assert u["own"] == pytest.approx(0.5, abs=0.05) and 1 < u["rank"] < 8
        assert u["overlap"]["own"] == pytest.approx(0.25, abs=0.05)   # chance K/E


def test_an_untrained_models_chance_alignment_is_no_evidence():
    """Random initial weights: router column i and expert i's gate columns are independent, yet for these fixed
    weights own - shifts is not exactly 0, and enough tokens measure it: the window bootstrap alone calls layers
    aligned or anti-aligned. Against every pairing of experts with intensities own is unremarkable, so no layer
    gets a verdict."""
    sizes = dict(SIZES, n_expert=8, n_embd=64, vocab_size=512)
    model = model_of(11, **sizes, ffn="moe")
    r = measured(model, tokens(8, sizes=sizes), tokens(128, seed=1, sizes=sizes), n_units=4)
    diffs = [u["diff"] for row in r["layers"] for u in row["unsupervised"].values()]
    assert any(d["lo"] > 0 or d["hi"] < 0 for d in diffs)     # the bootstrap alone would flag these
    assert all(d["verdict"] == "no evidence" and d["p_pairing"] > 0.05 for d in diffs)


def test_the_pairing_null_counts_every_pairing():
    """E! pairings of expert labels with intensities: a dominant diagonal is the most extreme of them (p = 2/E!),
    a constant matrix is no different from any pairing (p = 1), and a pairing-free matrix (rows equal) likewise."""
    M = torch.full((4, 4), 0.5, dtype=torch.float64)
    assert routers.pairing_p(M, None)[0] == 1.0
    M.fill_diagonal_(0.9)
    p, null = routers.pairing_p(M, None)
    assert p == pytest.approx(2 / 24) and null["mean"] == pytest.approx(0.5 + 0.4 / 4)
    rows = torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).expand(4, 4)
    assert routers.pairing_p(rows, None)[0] == 1.0
    big = torch.eye(9, dtype=torch.float64)                        # 9! pairings: a sample of them and the own
    p = routers.pairing_p(big, torch.Generator().manual_seed(0))[0]
    assert p == pytest.approx(2 / (routers.SAMPLED_PAIRINGS + 1))


def test_uoe_routing_neurons_are_the_check_and_not_tested():
    r = measured(model_of(4, ffn="uoe"), tokens(4), tokens(8, seed=1))
    for row in r["layers"]:
        sets = row["unsupervised"]
        assert set(sets) == {"rest", "rest subset", "routing"}
        assert sets["routing"]["overlap"]["own"] == 1.0 and not sets["routing"]["tested"]
        assert sets["rest"]["units"] == 16 - 4 and sets["rest subset"]["units"] == 4
        assert all(u >= 4 for units in row["supervised"]["own_units"] for u in units)   # chosen among the rest
    assert [name for _, _, name in routers.holm_family([r])] == ["rest", "rest subset"] * SIZES["n_layer"]


@torch.no_grad()
def test_the_layer_by_layer_forward_is_the_models():
    """collect's own losses are GPT's, and a swap of no rule (the router with the router's gates) from any layer's
    stored residual gives them again."""
    model, val = model_of(8, ffn="uoe"), tokens(4, seed=2)
    seen, own = routers.collect(model, val, 3)
    model(val[:, :-1], val[:, 1:])
    assert (own.sum() / val[:, 1:].numel()).item() == pytest.approx(model.last_ce.item(), abs=1e-6)
    rules = routers.choice_rules(model, val[:, 1:].numel(), {}, 1, torch.Generator())
    for swapped in ({0}, {1}, {0, 1}):
        torch.testing.assert_close(routers.window_losses(model, seen, val, swapped, rules["router"], "router", 3), own)


def test_shifts_score_expert_i_with_expert_i_plus_k():
    scores = torch.arange(12.0).view(3, 4)                               # (N, E) column j = expert j
    for k in range(4):
        for i in range(4):
            assert torch.equal(routers.shifted(scores, k)[:, i], scores[:, (i + k) % 4])


# -----------------------------------------------------------------------------
# the statistics

def brute_auroc(s, y, weight):
    """AUROC of scores s for labels y with token weights: pairs weighted by the product, ties 1/2."""
    p, n = s[y], s[~y]
    wins = (p[:, None] > n[None, :]).double() + 0.5 * (p[:, None] == n[None, :]).double()
    return (weight[y][:, None] * wins * weight[~y][None, :]).sum() / (weight[y].sum() * weight[~y].sum())


def test_the_bootstrap_resamples_whole_windows():
    """Each resample draws W windows with replacement; its AUROC is the AUROC of the tokens of the drawn windows,
    every copy of a window counted (checked against the explicitly concatenated resample, ties included)."""
    g = torch.Generator().manual_seed(0)
    W, T, A, E = 5, 7, 2, 3
    window = torch.arange(W).repeat_interleave(T)
    scores = torch.randint(0, 5, (W * T, A, E), generator=g).double()   # ties on purpose
    labels = torch.rand(W * T, E, generator=g) < 0.4
    counts = routers.resample_counts(W, 6, g)
    assert torch.equal(counts, counts.round()) and (counts.sum(1) == W).all()
    C, pos, neg = routers.pair_counts(scores, labels, window, W)
    got = routers.aurocs(C, pos, neg, counts)
    for b in range(len(counts)):
        drawn = torch.cat([torch.arange(w * T, (w + 1) * T) for w in range(W) for _ in range(int(counts[b, w]))])
        for a in range(A):
            for i in range(E):
                expect = brute_auroc(scores[drawn, a, i], labels[drawn, i], torch.ones(len(drawn), dtype=torch.float64))
                assert got[b, a, i].item() == pytest.approx(expect.item(), abs=1e-12)


def test_copies_within_a_window_do_not_narrow_the_interval():
    """Resampling windows, not tokens: repeating every token of a window 8 times inside that window leaves the
    bootstrap distribution as it was, where a bootstrap over tokens would narrow it."""
    g = torch.Generator().manual_seed(1)
    W, E = 12, 2
    scores = torch.randn(W * 3, 1, E, generator=g)
    labels = torch.rand(W * 3, E, generator=g) < 0.5
    counts = routers.resample_counts(W, 300, g)
    boots = []
    for copies in (1, 8):
        window = torch.arange(W).repeat_interleave(3 * copies)
        s = scores.view(W, 3, 1, E).repeat_interleave(copies, 1).reshape(-1, 1, E)
        y = labels.view(W, 3, E).repeat_interleave(copies, 1).reshape(-1, E)
        boots.append(routers.aurocs(*routers.pair_counts(s, y, window, W), counts)[:, 0, 0])
    torch.testing.assert_close(boots[0], boots[1])


def test_interval_p_value_and_holm():
    assert routers.interval(1.0, torch.linspace(0.5, 1.5, 999))["p"] == pytest.approx(2 / 1000)
    assert routers.interval(0.0, torch.linspace(-1, 1, 1001))["p"] == 1.0
    d = routers.interval(0.2, torch.linspace(0.1, 0.3, 10001))
    assert d["lo"] == pytest.approx(0.105) and d["hi"] == pytest.approx(0.295)
    assert study.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])   # routers' Holm


def test_greedy_units_finds_the_set_whose_squared_intensity_is_the_score():
    """s_i = a_i7^2 + a_i2^2 + a_i5^2, independent units, unit 7 the strongest, and unit 8 a near copy of unit 7:
    alone it tracks s_i better than units 2 and 5, but together with 7 it adds nothing. The greedy selection of the
    set, fed in two batches, finds {7 or 8, 2, 5}; ranking the units one by one would take {7, 8, ...}. A second
    target (here the first, rolled by one expert) is selected from the same sums."""
    g = torch.Generator().manual_seed(0)
    sq = torch.rand(4000, 2, 10, generator=g).square()                  # (N, E, U) a^2
    sq[:, :, 7] *= 3
    sq[:, :, 8] = sq[:, :, 7] + 0.01 * torch.rand(4000, 2, generator=g)
    score = sq[:, :, 7] + sq[:, :, 2] + sq[:, :, 5]                     # (N, E)
    acc = {}
    for part in (slice(0, 1500), slice(1500, 4000)):
        routers.add_unit_stats(acc, sq[part], torch.stack([score[part], score[part].roll(1, -1)]))
    for row in routers.greedy_units(acc, 3).tolist():   # 7 or its copy 8 (which one is sampling noise), 2, 5
        assert sorted(row) in ([2, 5, 7], [2, 5, 8])
    assert routers.greedy_units(acc, 3, target=1).tolist() != routers.greedy_units(acc, 3).tolist()


# -----------------------------------------------------------------------------
# the functional test: the gate rule is held fixed for every choice rule

@pytest.mark.parametrize("variant", [v for v in ROUTED_VARIANTS if v != "aoe"])
@torch.no_grad()
def test_route_is_the_layers_own_routing_and_run_chosen_its_output(variant):
    """route() gives the scores and top K of the layer's forward; run_chosen with them and the router's gates
    reproduces the layer (VSE, shared experts, switches)."""
    mlp = model_of(2, **ROUTED_VARIANTS[variant]).transformer.h[0].mlp
    u = torch.randn(2, 8, SIZES["n_embd"])
    y = mlp(u)
    scores, topk_idx = routers.route(mlp, u.reshape(-1, SIZES["n_embd"]))
    torch.testing.assert_close(scores, mlp.last_routing["scores"])
    assert torch.equal(topk_idx, mlp.last_routing["topk_idx"])
    torch.testing.assert_close(routers.run_chosen(mlp, u, topk_idx, routers.gates("router", scores, topk_idx)), y)


def test_the_router_gates_are_the_models_own_weighting_of_any_choice():
    """For any choice (here random), the 'router' gates are softmax over the chosen router logits, which is
    MoE's p[I] / sum p[I]; 'uniform' is 1/K: the choice stays, only the weighting changes."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g, dtype=torch.float64)
    idx = torch.rand(50, 4, generator=g).topk(2, dim=-1).indices
    p = torch.softmax(logits, dim=-1).gather(1, idx)
    torch.testing.assert_close(routers.gates("router", logits, idx), p / p.sum(-1, keepdim=True))
    assert (routers.gates("uniform", logits, idx) == 0.5).all()


@torch.no_grad()
def test_a_random_choice_runs_with_the_gate_rule_given():
    """The functional test's loss for a random choice is the model run on that choice with the gates of the
    gate rule: router gates from the router's logits (not from an intensity), or 1/K."""
    model = model_of(7, ffn="moe", n_layer=1).double()
    val = tokens(4, seed=1)
    seen, own = routers.collect(model, val, 2)
    rules = routers.choice_rules(model, val[:, 1:].numel(), {0: []}, 1, torch.Generator().manual_seed(3))
    mlp = model.transformer.h[0].mlp
    u = seen[0]["u"]
    idx = rules["random 0"](0, mlp, u, torch.arange(len(u)), None)
    logits = u @ mlp.router
    for gate, g in (("router", torch.softmax(logits.gather(1, idx), -1)), ("uniform", torch.full(idx.shape, 0.5))):
        y = mlp.run_choice(u, idx, g.double()).view(len(val), -1, SIZES["n_embd"])
        x = seen[0]["mid"] + y
        logits_out = model.lm_head(model.transformer.ln_f(x))
        expect = routers.window_ce(logits_out, val[:, 1:])
        got = routers.window_losses(model, seen, val, {0}, rules["random 0"], gate, 2)
        torch.testing.assert_close(got, expect)
    assert not torch.equal(routers.window_losses(model, seen, val, {0}, rules["random 0"], "router", 2),
                           routers.window_losses(model, seen, val, {0}, rules["random 0"], "uniform", 2))


@pytest.mark.parametrize("ffn", ["moe", "uoe"])
@torch.no_grad()
def test_with_identical_experts_every_rule_and_gate_gives_the_models_loss(ffn, tmp_path):
    """All experts equal and gates summing to 1: whichever K experts are chosen and however they are weighted,
    the output is the model's. (uoe's equal scores choose the same experts for every token: no AUROC is defined,
    and the markdown of the strict JSON says n/a.)"""
    model = model_of(3, ffn=ffn)
    for block in model.transformer.h:
        for w in (block.mlp.w_gate, block.mlp.w_up, block.mlp.w_down):
            w.copy_(w[:1].expand_as(w))
    r = routers.measure(model, tokens(2), tokens(2, seed=1), **FAST)
    for by_gate in [row["loss"] for row in r["layers"]] + [r["every_layer"]]:
        assert set(by_gate) == {"router", "uniform"}
        assert {"intensity", "best", "shift 1", "shift 3", "random 1"} <= set(by_gate["router"])
        assert "router" in by_gate["uniform"]
        for rules in by_gate.values():
            for v in rules.values():
                assert v["loss"] == pytest.approx(r["own_loss"], abs=1e-5)
    r["identity"] = dict(step=0, seed=3)
    protocol = dict(level=0.95, alpha=0.05, family=routers.adjust([r]), val_windows=2, resamples=200)
    routers.write_json(tmp_path / "r.json", dict(protocol=protocol, runs=[r]), quiet=True)
    text = routers.markdown(json.loads((tmp_path / "r.json").read_text()))
    assert ("| n/a | n/a [n/a, n/a] |" in text) == (ffn == "uoe")


# -----------------------------------------------------------------------------
# the markdown section

def test_the_markdown_says_what_each_interval_supports_with_the_jsons_numbers(planted):
    """Three layers' differences set by hand: one above 0, one below, one straddling it. The verdicts and the
    counts follow their p-values after Holm; every cell shown is the JSON's number, and a changed number in the
    JSON changes the text."""
    r = json.loads(json.dumps(planted))
    r["identity"] = dict(step=200, seed=5)
    r["layers"].append(json.loads(json.dumps(r["layers"][1])))
    r["layers"][2]["layer"] = 2
    cases = [(0.30, 0.2, 0.4, 0.0002), (-0.12, -0.2, -0.05, 0.0002), (0.01, -0.03, 0.05, 0.6)]
    for row, (est, lo, hi, p) in zip(r["layers"], cases):
        for u in row["unsupervised"].values():
            u["diff"].update(est=est, lo=lo, hi=hi, p=p, p_pairing=p, p_test=p)
    n = routers.adjust([r])
    data = dict(protocol=dict(level=0.95, alpha=0.05, family=n, val_windows=32, resamples=200), runs=[r])
    text = routers.markdown(data)
    rows = [line for line in text.splitlines() if line.startswith("| 5 | ")][:3]
    for line, word, (est, lo, hi, _) in zip(rows, ("aligned", "anti-aligned", "no evidence"), cases):
        assert f"| {est:+.3f} [{lo:+.3f}, {hi:+.3f}] |" in line and f"| {word} |" in line
    own = r["layers"][0]["unsupervised"]["all"]["own"]
    assert rows[0].startswith(f"| 5 | 0 | {own:.3f} |")
    assert ("aligned with the routing in 1 of the 3 layers (layer 0), anti-aligned in 1 (layer 1) and no evidence "
            "either way in 1") in text
    assert "its own operationalisation" in text and "In this MoE model trained 200 steps (seed 5)" in text
    assert f"{r['every_layer']['router']['random 0']['est']:+.3f}" in text
    r["layers"][0]["unsupervised"]["all"]["own"] = own / 2
    assert f"| 5 | 0 | {own / 2:.3f} |" in routers.markdown(data)
    # a family of two models: where each verdict falls, counted over the models
    r2 = json.loads(json.dumps(r))
    r2["identity"]["seed"] = 6
    data = dict(data, runs=[r, r2], protocol=dict(data["protocol"], family=routers.adjust([r, r2])))
    text = routers.markdown(data)
    assert "In these 2 MoE models trained 200 steps (seeds 5, 6)" in text
    assert "aligned with the routing in 2 of the 6 layers (layer 0 in 2 of the 2 models), anti-aligned in 2" in text


# -----------------------------------------------------------------------------
# the generated text of README.md and RESULTS.md §6: --report --write / --check

def test_the_committed_text_is_what_assets_routers_json_gives():
    """README.md's routers paragraph and RESULTS.md §6 are generated from assets/routers.json:
    python routers.py --report=assets/routers.json --check."""
    path = REPO / "assets" / "routers.json"
    try:
        routers.report_texts(path)
    except routers.UserError as e:
        if "is not a routers.json of this version" not in str(e):
            raise
        pytest.skip(f"assets/routers.json is of the old format, which --report refuses ({e}); measure the 9 models "
                    "of routers.py's docstring, then python routers.py --report=assets/routers.json --write")
    assert routers.main([f"--report={path}", "--check"]) == 0


def between(text, begin, end):
    """The lines between the marker lines begin and end of text."""
    return text.split(f"\n{begin}\n", 1)[1].split(f"\n{end}\n", 1)[0]


def report_copies(planted, tmp_path):
    """A routers.json of the planted model in tmp_path, and copies of the committed README.md and RESULTS.md there:
    (its data, the README copy, the RESULTS copy)."""
    r = json.loads(json.dumps(planted))
    r["identity"] = dict(step=200, seed=5)
    data = dict(protocol=dict(level=0.95, alpha=0.05, family=routers.adjust([r]), val_windows=32, resamples=200),
                runs=[r])
    routers.write_json(tmp_path / "routers.json", data, quiet=True)
    readme, results = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text((REPO / "README.md").read_text())
    results.write_text((REPO / "RESULTS.md").read_text())
    return data, readme, results


def test_write_puts_the_text_between_the_markers_and_check_finds_an_edited_number(planted, tmp_path, capsys):
    """On copies of the committed README.md and RESULTS.md: --write fills the two blocks and nothing else, --check
    then passes; a number edited by hand in either block makes --check exit 1 with one line naming it; a marker
    missing is one error line."""
    data, readme, results = report_copies(planted, tmp_path)
    args = [f"--report={tmp_path / 'routers.json'}", f"--readme={readme}", f"--results_md={results}"]
    assert routers.main(args + ["--check"]) == 1                          # the committed blocks are another JSON's
    assert routers.main(args + ["--write"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == [f"wrote {results}", f"wrote {readme}"]
    text, section = routers.summary(data), routers.markdown(data)
    assert between(readme.read_text(), *routers.MARKERS["readme"]) == text
    assert between(results.read_text(), *routers.MARKERS["results_md"]) == section.rstrip("\n")
    for path, (begin, end) in ((readme, routers.MARKERS["readme"]), (results, routers.MARKERS["results_md"])):
        committed, written = (REPO / path.name).read_text(), path.read_text()
        assert written.split(f"\n{begin}\n")[0] == committed.split(f"\n{begin}\n")[0]          # above, untouched
        assert written.split(f"\n{end}\n")[1] == committed.split(f"\n{end}\n")[1]              # below, untouched
    assert routers.main(args + ["--check"]) == 0
    assert capsys.readouterr().out.strip() == f"{results} and {readme} match {tmp_path / 'routers.json'}"
    assert routers.main(args + ["--write"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == [f"{results} is up to date", f"{readme} is up to date"]
    # one number edited by hand in RESULTS.md's first table, then in README.md's paragraph: --check names it
    own = f"{data['runs'][0]['layers'][0]['unsupervised']['all']['own']:.3f}"
    for path, old, new in ((results, f"| 5 | 0 | {own} |", "| 5 | 0 | 0.123 |"),
                           (readme, f"Of the {data['protocol']['family']},", "Of the 99,")):
        written = path.read_text()
        assert old in written
        path.write_text(written.replace(old, new, 1))
        line = written.split(old)[0].count("\n") + 1
        assert routers.main(args + ["--check"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{path}:{line}: committed ") and new.strip(" |,") in err[0]
        assert err[0].endswith(f"run python routers.py --report={tmp_path / 'routers.json'} --write")
        assert routers.main(args + ["--write"]) == 0 and routers.main(args + ["--check"]) == 0
    # a marker missing, a file that is not there: one error line each
    readme.write_text("# uoe\nno markers\n")
    assert routers.main(args + ["--write"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'<!-- routers-summary:begin -->'" in err[0]
    assert routers.main(args[:2] + [f"--results_md={tmp_path / 'nothing.md'}", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing.md" in err[0] and "give its path with --results_md" in err[0]



# -----------------------------------------------------------------------------
# the command

def write_run(root, name, ffn, data_dir):
    """A run folder as train.py leaves it (ckpt.pt, run.json, metrics.jsonl), a randomly initialised model."""
    config = GPTConfig(**{**SIZES, "ffn": ffn})
    out = root / name
    out.mkdir()
    uoe.save_checkpoint(str(out / "ckpt.pt"), {"model": model_of(5, ffn=ffn).state_dict(), "config": asdict(config),
                                               "step": 0, "train_config": {"seed": 5, "max_iters": 0}})
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


SMALL = ["--val_windows=4", "--train_windows=4", "--resamples=50", "--random_draws=2", "--random_choices=1",
         "--device=cpu"]


def test_command_writes_json_markdown_and_figure_and_report_reprints_the_markdown(runs, tmp_path, capsys):
    out = tmp_path / "figs"
    assert routers.main([str(runs["moe"]), str(runs["uoe"]), f"--out_dir={out}", *SMALL]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "routers.json").read_text())
    assert [r["ffn"] for r in result["runs"]] == ["moe", "uoe"]
    assert result["protocol"]["family"] == 2 * 2 * SIZES["n_layer"] and result["protocol"]["resamples"] == 50
    identity = result["runs"][0]["identity"]
    assert identity["step"] == 0 and identity["seed"] == 5 and len(identity["code_sha256"]) == 64
    assert identity["config"]["ffn"] == "moe" and identity["torch"] == torch.__version__
    assert result["runs"][0]["val_windows"] == 4 and len(result["runs"][1]["layers"]) == SIZES["n_layer"]
    assert (out / "routers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in out.iterdir()} == {"routers.json", "routers.md", "routers.png"}
    text = (out / "routers.md").read_text()
    assert text == routers.markdown(result) and text.strip() in printed
    assert routers.main([f"--report={out / 'routers.json'}"]) == 0
    assert capsys.readouterr().out == text


def test_a_closed_output_pipe_still_writes_the_files_and_exits_quietly(runs, tmp_path):
    """`python routers.py ... | head -1`: the reader leaves before the text comes; the files are written anyway."""
    p = subprocess.Popen([sys.executable, str(REPO / "routers.py"), str(runs["moe"]), f"--out_dir={tmp_path}",
                          *SMALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and err == ""
    assert {f.name for f in tmp_path.iterdir()} == {"routers.json", "routers.md", "routers.png"}


def test_write_into_a_closed_pipe_writes_the_blocks_and_exits_quietly(planted, tmp_path):
    """`python routers.py --report=... --write | head -1`: both blocks are written, and no traceback follows."""
    data, readme, results = report_copies(planted, tmp_path)
    p = subprocess.Popen([sys.executable, str(REPO / "routers.py"), f"--report={tmp_path / 'routers.json'}",
                          f"--readme={readme}", f"--results_md={results}", "--write"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141) and "Traceback" not in err and err == ""
    assert between(readme.read_text(), *routers.MARKERS["readme"]) == routers.summary(data)


def test_a_moe_without_a_valid_n_routing_needs_n_units():
    """GPTConfig checks n_routing for uoe only; an moe's is only the default size of the subsets."""
    model = model_of(ffn="moe", n_routing=0)
    with pytest.raises(routers.UserError, match="pass --n_units"):
        routers.measure(model, tokens(2), tokens(2, seed=1), **FAST)
    assert routers.measure(model, tokens(2), tokens(2, seed=1), n_units=2, **FAST)["n_units"] == 2


def test_an_interrupt_while_writing_leaves_no_half_written_file(runs, tmp_path, monkeypatch, capsys):
    def killed_midway(fig, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(routers.plot.Figure, "savefig", killed_midway)
    assert routers.main([str(runs["moe"]), f"--out_dir={tmp_path}", *SMALL]) == 130
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.strip() == "interrupted: no file was left half-written"


@pytest.mark.parametrize("args, message", [
    (["{dense}"], "measures moe and uoe"),
    (["{moe}", "--val_windows=0"], "--val_windows=0 must be >= 1"),
    (["{moe}", "--n_units=99"], "more than the experts' 16 candidate hidden units"),
    (["{uoe}", "--n_units=13"], "more than the experts' 12 candidate hidden units"),
    (["{moe}", "--vaL_windows=5"], "did you mean --val_windows"),
    (["{moe}", "--data_dir={tmp}"], "no train.bin beside"),
    (["nowhere"], "no metrics.jsonl in nowhere"),
    (["{moe}", "--out_dir={tmp}/val.bin/figs", "--val_windows=2", "--train_windows=2", "--resamples=10",
      "--random_draws=1", "--random_choices=1"], "cannot create --out_dir"),
    ([], "give the out_dir of at least one"),
    (["{moe}", "--report={tmp}/routers.json"], "not both"),
    (["--report={tmp}/nothing.json"], "cannot read --report"),
    (["--report={tmp}/val.bin"], "is not a routers.json"),
    (["--write"], "--write and --check go with --report"),
    (["--report={tmp}/routers.json", "--write", "--check"], "give --write or --check, not both"),
    (["--report={tmp}/routers.json", "--readme={tmp}/README.md"], "--readme and --results_md go with --write"),
])
def test_user_errors_are_one_line_and_exit_2(runs, args, message, tmp_path, capsys):
    (tmp_path / "val.bin").write_bytes(np.zeros(100, np.uint16).tobytes())   # --data_dir={tmp}: no train.bin
    args = [a.format(**runs, tmp=tmp_path) for a in args]
    assert routers.main(args + ["--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
