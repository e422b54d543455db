"""Tests for uoe.py: one test per claim of METHOD.md, named after it."""

import copy
import os
import pickle
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import uoe
from conftest import ROUTED_VARIANTS, captured_dispatch
from uoe import GPT, GPTConfig

SMALL = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16,
             n_expert=4, top_k=2, expert_hidden=12)

# every variant and every UoE switch (and the AoE/MoE options)
VARIANTS = {"dense": dict(ffn="dense"), **ROUTED_VARIANTS,
            "aoe_l1": dict(ffn="aoe", route_norm=1, d_low=3),
            "uoe_l1": dict(ffn="uoe", route_norm=1),
            "uoe_inf": dict(ffn="uoe", route_norm="inf"),
            "uoe_twice_pre_r5": dict(ffn="uoe", uoe_output="twice", route_score="pre", n_routing=5)}


def cfg(**kw):
    return GPTConfig(**{**SMALL, **kw})


def ffn_module(**kw):
    torch.manual_seed(0)
    model = GPT(cfg(**kw)).double()
    for p in model.parameters():       # larger weights than GPT-2 init: routing decisions vary more
        p.data.normal_(0, 0.3)
    return model.transformer.h[0].mlp


# ---- the per-token float64 references, written from METHOD.md with no batching tricks ---------
# UoE's is uoe.uoe_one_token ("UoE, one token at a time", §3 line by line); the batched layers must equal these.

def ref_swiglu(x, wg, wp, wo):
    return (F.silu(x @ wg) * (x @ wp)) @ wo


def norm(v, p):
    return torch.linalg.vector_norm(v, ord=float("inf") if p == "inf" else p)


def moe_one_token(m, c, x):
    """§2 moe for one token x (C,)."""
    p = torch.softmax(x @ m.router, dim=-1)
    chosen = torch.topk(p, c.top_k).indices
    g = p[chosen] / p[chosen].sum()
    y = sum(g[j] * ref_swiglu(x, m.w_gate[i], m.w_up[i], m.w_down[i]) for j, i in enumerate(chosen))
    if c.n_shared:
        y = y + ref_swiglu(x, m.shared_gate, m.shared_up, m.shared_down)
    return y


def aoe_one_token(m, c, x):
    """§2 aoe for one token x (C,)."""
    Cs = [x @ m.w_gate_a[i] for i in range(c.n_expert)]
    s = torch.stack([norm(ci, c.route_norm) for ci in Cs])
    chosen = torch.topk(s, c.top_k).indices
    g = torch.softmax(s[chosen], dim=0)
    return sum(g[j] * ((F.silu(Cs[i] @ m.w_gate_b[i]) * (x @ m.w_up[i])) @ m.w_down[i])
               for j, i in enumerate(chosen))


def dense_one_token(m, c, x):
    return ref_swiglu(x, m.w_gate, m.w_up, m.w_down)


ONE_TOKEN = {"dense": dense_one_token, "moe": moe_one_token, "aoe": aoe_one_token,
             "uoe": lambda m, c, x: uoe.uoe_one_token(m, x)}


@pytest.mark.parametrize("name", VARIANTS)
def test_batched_ffn_equals_per_token_reference(name):
    c = cfg(**VARIANTS[name])
    m = ffn_module(**VARIANTS[name])
    x = torch.randn(3, 7, c.n_embd, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, c.n_embd, dtype=torch.float64)   # a random linear readout for gradients

    y = m(x)
    grads = torch.autograd.grad((y * w).sum(), [x, *m.parameters()])
    y_ref = torch.stack([ONE_TOKEN[c.ffn](m, c, xt) for xt in x.view(-1, c.n_embd)]).view_as(y)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x, *m.parameters()])

    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)
    if c.ffn != "dense":   # routing actually varies across tokens, so the test means something
        assert len(torch.unique(m.last_routing["topk_idx"][:, 0])) > 1


# ---- the layers' pieces, callable on their own (routing analysis and bench.py call them) -------

def forced_choice(N, E, K):
    """K distinct experts per token and positive gates, made by something other than a router."""
    gen = torch.Generator().manual_seed(3)
    topk_idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])     # (N, K)
    gates = torch.rand(N, K, generator=gen, dtype=torch.float64) + 0.1
    return topk_idx, gates


@pytest.mark.parametrize("n_shared", [0, 1])
def test_moe_chosen_experts_runs_a_choice_made_elsewhere(n_shared):
    c = cfg(ffn="moe", n_shared=n_shared)
    m = ffn_module(ffn="moe", n_shared=n_shared)
    x = torch.randn(10, c.n_embd, dtype=torch.float64)
    topk_idx, gates = forced_choice(10, c.n_expert, c.top_k)
    expected = torch.stack([sum(gates[t, j] * ref_swiglu(x[t], m.w_gate[i], m.w_up[i], m.w_down[i])
                                for j, i in enumerate(topk_idx[t])) for t in range(10)])
    torch.testing.assert_close(m.chosen_experts(x, topk_idx, gates), expected, rtol=0, atol=1e-12)
    if n_shared:
        torch.testing.assert_close(m.shared_experts(x), ref_swiglu(x, m.shared_gate, m.shared_up, m.shared_down),
                                   rtol=0, atol=1e-12)


UOE_SWITCHES = [k for k in VARIANTS if VARIANTS[k]["ffn"] == "uoe"]


@pytest.mark.parametrize("name", UOE_SWITCHES)
def test_uoe_pieces_give_the_layer_and_run_a_choice_made_elsewhere(name):
    """routing_activations, routing_hidden, activation_intensity, chosen_experts and
    virtual_shared_expert, called by hand in forward's order, give the layer's output; chosen_experts
    on a forced choice gives sum_j g_j Q_i(x) (with R_i(x) too for "twice" or without the VSE), and
    virtual_shared_expert gives sum over all i of R_i(x)."""
    c = cfg(**VARIANTS[name])
    m = ffn_module(**VARIANTS[name])
    x = torch.randn(10, c.n_embd, dtype=torch.float64)
    pre, a = m.routing_activations(x)                                   # (N, E, N_s) each
    h = m.routing_hidden(x, a)
    top_s, topk_idx = m.activation_intensity(pre, a, h).topk(c.top_k, dim=-1)
    h_reused = h if c.vse or c.route_score == "swiglu" else None       # the layer computes h only there
    y = m.chosen_experts(x, topk_idx, F.softmax(top_s, dim=-1), a, h_reused)
    if c.vse:
        y = m.virtual_shared_expert(h) + y
    torch.testing.assert_close(y, m(x.view(1, 10, -1)).view(10, -1), rtol=0, atol=1e-12)

    Ns = c.n_routing
    R = [(F.silu(x @ m.w_gate[i, :, :Ns]) * (x @ m.w_up[i, :, :Ns])) @ m.w_down[i, :Ns] for i in range(c.n_expert)]
    Q = [ref_swiglu(x, m.w_gate[i, :, Ns:], m.w_up[i, :, Ns:], m.w_down[i, Ns:]) for i in range(c.n_expert)]
    with_R = c.uoe_output == "twice" or not c.vse
    topk_idx, gates = forced_choice(10, c.n_expert, c.top_k)
    expected = torch.stack([sum(gates[t, j] * (Q[i][t] + (R[i][t] if with_R else 0)) for j, i in enumerate(topk_idx[t]))
                            for t in range(10)])
    torch.testing.assert_close(m.chosen_experts(x, topk_idx, gates, a, h_reused), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.virtual_shared_expert(h), sum(R), rtol=0, atol=1e-12)


Q_WEIGHTS = ("gate", "up", "down")


@pytest.mark.parametrize("name, fields", [
    ("uoe", Q_WEIGHTS),                                          # R_i is in the VSE: Q_i only
    ("uoe_twice", Q_WEIGHTS + ("routing_down",)),                # R_i from h_i: its W_o, not its W_p
    ("uoe_no_vse_swiglu", Q_WEIGHTS + ("routing_down",)),
    ("uoe_no_vse", Q_WEIGHTS + ("routing_up", "routing_down")),  # h_i = a_i * x W_p^i[:, :N_s] in the experts
])
def test_uoe_chosen_experts_get_only_the_weights_they_read(name, fields):
    """The grouped path casts every weight it is given, every forward: the experts get only what they read."""
    m = ffn_module(**VARIANTS[name])
    (_, _, _, weights), _ = captured_dispatch(m, torch.randn(1, 6, SMALL["n_embd"], dtype=torch.float64))
    assert weights._fields == fields


# ---- model-level properties ---------------------------------------------------------------

@pytest.mark.parametrize("ffn", uoe.FFN_VARIANTS)
def test_causality(ffn):
    torch.manual_seed(0)
    model = GPT(cfg(ffn=ffn)).double().eval()
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    t = 6
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, SMALL["vocab_size"], (2, 16 - t - 1))
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("ffn", uoe.FFN_VARIANTS)
def test_batch_independence_in_eval(ffn):
    torch.manual_seed(0)
    model = GPT(cfg(ffn=ffn)).double().eval()
    idx = torch.randint(0, SMALL["vocab_size"], (5, 16))
    alone, _ = model(idx[:1])
    batched, _ = model(idx)
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-12)


def test_forward_loss_is_ce_plus_weighted_aux():
    torch.manual_seed(0)
    model = GPT(cfg(ffn="moe", aux_loss_coef=0.5, z_loss_coef=0.1))
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    logits, loss = model(idx, idx)
    ce = F.cross_entropy(logits.view(-1, logits.size(-1)), idx.view(-1))
    mlps = [b.mlp for b in model.transformer.h]
    aux = sum(m.aux_loss for m in mlps)
    z = sum(m.z_loss for m in mlps)
    torch.testing.assert_close(loss, ce + 0.5 * aux + 0.1 * z)
    torch.testing.assert_close(model.last_ce, ce.detach())
    torch.testing.assert_close(model.last_aux, aux.detach())


# ---- UoE: the virtual shared expert (§3) -----------------------------------------------------

def test_vse_equals_dense_swiglu_of_stacked_routing_neurons():
    c = cfg(ffn="uoe")
    m = ffn_module(ffn="uoe")
    R, E = c.n_routing, c.n_expert
    with torch.no_grad():
        m.w_down[:, R:, :] = 0.0       # silence every Q_i: the output is then the VSE alone
    wg = torch.cat([m.w_gate[i, :, :R] for i in range(E)], dim=1)   # (C, E*R)
    wp = torch.cat([m.w_up[i, :, :R] for i in range(E)], dim=1)
    wo = torch.cat([m.w_down[i, :R, :] for i in range(E)], dim=0)   # (E*R, C)
    x = torch.randn(2, 5, c.n_embd, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref_swiglu(x, wg, wp, wo), rtol=0, atol=1e-12)


def routing_grads(vse, aux_loss_coef):
    """Expert 0 gets weak routing neurons so that no token selects it (top-1); returns the
    gradients of expert 0's routing and non-routing neurons after one backward."""
    torch.manual_seed(0)
    model = GPT(cfg(ffn="uoe", vse=vse, top_k=1, aux_loss_coef=aux_loss_coef)).double()
    R = model.config.n_routing
    for block in model.transformer.h:
        with torch.no_grad():
            block.mlp.w_gate[0, :, :R] *= 0.01
            block.mlp.w_gate[1:, :, :R] *= 10.0
    idx = torch.randint(0, SMALL["vocab_size"], (4, 16))
    _, loss = model(idx, idx)
    loss.backward()
    m = model.transformer.h[0].mlp
    assert not (m.last_routing["topk_idx"] == 0).any(), "expert 0 was selected; the test setup is off"
    routing = [m.w_gate.grad[0, :, :R], m.w_up.grad[0, :, :R], m.w_down.grad[0, :R]]
    rest = [m.w_gate.grad[0, :, R:], m.w_up.grad[0, :, R:], m.w_down.grad[0, R:]]
    return routing, rest


def test_vse_gives_gradient_to_routing_neurons_of_unselected_experts():
    routing, rest = routing_grads(vse=True, aux_loss_coef=0.0)
    assert all(g.abs().sum() > 0 for g in routing)
    assert all(g.abs().sum() == 0 for g in rest)


def test_without_vse_routing_neurons_learn_only_through_the_gates():
    routing, rest = routing_grads(vse=False, aux_loss_coef=0.0)
    assert all(g.abs().sum() == 0 for g in routing + rest)   # unselected: no gate, no gradient
    # the load-balancing loss scores every expert, so it alone reaches the routing gate weights
    routing, rest = routing_grads(vse=False, aux_loss_coef=0.01)
    assert routing[0].abs().sum() > 0
    assert all(g.abs().sum() == 0 for g in routing[1:] + rest)


# ---- routing precision and AoE's initialisation (§2, §4) ---------------------------------------

@pytest.mark.parametrize("kw", [dict(ffn="moe"), dict(ffn="aoe"), dict(ffn="uoe"),
                                dict(ffn="uoe", route_score="swiglu"), dict(ffn="uoe", route_score="pre")], ids=str)
def test_routing_under_bf16_autocast_equals_float32(kw):
    """The scores come from float32 matmuls also under bf16 autocast, so the same weights and
    input choose the same top-k experts (a bf16 matmul, upcast afterwards, flipped ~1% of tokens)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**kw)).transformer.h[0].mlp      # default widths, GPT-2 init
    x = torch.randn(4, 256, 128)
    with torch.no_grad():
        m(x)
        fp32 = m.last_routing["topk_idx"].clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
    assert y.dtype == torch.bfloat16                    # the experts did run in bf16
    assert torch.equal(m.last_routing["topk_idx"], fp32)


def test_aoe_factorised_gate_starts_as_wide_as_a_full_rank_gate():
    """x A_i B_i at init has the std of x W_g with W_g ~ N(0, 0.02) (§2 aoe init)."""
    torch.manual_seed(0)
    aoe = GPT(GPTConfig(ffn="aoe")).transformer.h[0].mlp
    dense = GPT(GPTConfig(ffn="dense")).transformer.h[0].mlp
    x = torch.randn(4096, 128)
    with torch.no_grad():
        factorised = torch.einsum("nc,ecl,eld->ned", x, aoe.w_gate_a, aoe.w_gate_b)   # (N, E, D)
        full_rank = x @ dense.w_gate                                                   # (N, D)
    assert factorised.std().item() == pytest.approx(full_rank.std().item(), rel=0.1)
    assert full_rank.std().item() == pytest.approx(0.02 * 128 ** 0.5, rel=0.05)


# ---- MoE and the load-balancing loss (§2, §4) -------------------------------------------------

def test_moe_with_all_experts_is_gate_weighted_sum():
    c = cfg(ffn="moe", top_k=4)
    m = ffn_module(ffn="moe", top_k=4)
    x = torch.randn(10, c.n_embd, dtype=torch.float64)
    p = torch.softmax(x @ m.router, dim=-1)                      # (N, E)
    expected = sum(p[:, i:i + 1] * ref_swiglu(x, m.w_gate[i], m.w_up[i], m.w_down[i]) for i in range(4))
    torch.testing.assert_close(m(x.view(1, 10, -1)).view(10, -1), expected, rtol=0, atol=1e-12)


def test_aux_loss_is_one_for_perfectly_uniform_routing():
    E = 4
    topk_idx = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])   # every expert chosen twice
    scores = torch.zeros(4, E)                                   # uniform softmax
    assert uoe.load_balance_loss(scores, topk_idx).item() == pytest.approx(1.0)
    # collapsed routing is penalised: all tokens to experts 0, 1 with confident scores
    scores = torch.tensor([[9.0, 9.0, 0.0, 0.0]]).expand(4, E)
    collapsed = torch.tensor([[0, 1]] * 4)
    assert uoe.load_balance_loss(scores, collapsed).item() > 1.9


def test_routing_summary_reports_load_and_vse_share():
    torch.manual_seed(0)
    model = GPT(cfg(ffn="uoe"))
    assert model.routing_summary() == [None, None]                      # no forward yet: nothing to report
    model(torch.randint(0, SMALL["vocab_size"], (2, 16)))
    s = model.routing_summary()[0]
    assert sum(s["load"]) == pytest.approx(1.0)
    assert 0 < s["ent_load"] <= torch.log(torch.tensor(4.0)).item() + 1e-9
    assert 0 < s["vse_share"] < 1
    model = GPT(cfg(ffn="dense"))
    model(torch.randint(0, SMALL["vocab_size"], (2, 16)))
    assert model.routing_summary() == [None, None]


@pytest.mark.parametrize("ffn", uoe.FFN_VARIANTS)
def test_routed_layers_say_so_and_start_without_routing(ffn):
    """One test of "routed" (a class attribute) for the aux loss and the summary; last_routing exists
    from __init__ (None), as aux_loss does, so that compiled guards never see it appear."""
    torch.manual_seed(0)
    model = GPT(cfg(ffn=ffn))
    routed = ffn != "dense"
    assert [block.mlp.routed for block in model.transformer.h] == [routed, routed]
    if routed:
        assert all(block.mlp.last_routing is None and block.mlp.aux_loss is None for block in model.transformer.h)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    _, loss = model(idx, idx)
    assert (model.last_aux.item() > 0) == routed and all((s is not None) == routed for s in model.routing_summary())


# ---- accounting (§5) --------------------------------------------------------------------------

# every registered variant at its defaults (a new variant is checked without being named here), every switch
ACCOUNTING = ([dict(ffn=f) for f in uoe.FFN_VARIANTS] + [dict(VARIANTS[k]) for k in VARIANTS]
              + [dict(ffn="uoe", bias=True), dict(ffn="moe", n_shared=2)])


@pytest.mark.parametrize("kw", ACCOUNTING, ids=str)
def test_total_params_equal_model_numel(kw):
    c = cfg(**kw)
    assert uoe.param_counts(c)[0] == sum(p.numel() for p in GPT(c).parameters())


@pytest.mark.parametrize("kw", ACCOUNTING, ids=str)
def test_ffn_flops_equal_measured_matmul_flops(kw):
    """The analytic FFN FLOPs per token equal what torch's FLOP counter sees in a forward."""
    c = cfg(**kw)
    m = GPT(c).transformer.h[0].mlp
    x = torch.randn(4, 8, c.n_embd)
    with FlopCounterMode(display=False) as counter:
        m(x)
    f = uoe.flops_breakdown(c)
    analytic = (f["ffn_scoring"] + f["ffn_shared"] + f["ffn_experts"]) / c.n_layer
    assert counter.get_total_flops() / (4 * 8) == analytic


def test_active_params_and_flops_formulas():
    c = GPTConfig()   # defaults: C=128, E=8, K=2, D=256, R=32, 4 layers, vocab 50304, block 256
    C, E, K, D, R, V, L, T = 128, 8, 2, 256, 32, 50304, 4, 256
    base = V * C + T * C + L * (4 * C * C + 2 * C) + C
    assert uoe.param_counts(c) == (base + L * 3 * E * C * D, base + L * (3 * E * C * R + K * 3 * C * (D - R)))
    assert uoe.flops_per_token(c) == (L * (8 * C * C + 4 * T * C) + 2 * C * V
                                      + L * 2 * (3 * E * C * R + K * 3 * C * (D - R)))
    moe = GPTConfig(ffn="moe")
    assert uoe.param_counts(moe)[1] == base + L * (C * E + K * 3 * C * D)
    aoe = GPTConfig(ffn="aoe")
    Lo = C // 3
    assert uoe.param_counts(aoe)[1] == base + L * (E * C * Lo + K * (Lo * D + 2 * C * D))
    dense = GPTConfig(ffn="dense")
    assert uoe.param_counts(dense) == (base + L * 3 * C * D,) * 2


# ffn_breakdown (params, scoring, shared, experts) and active params per token of the default sizes, as the
# code gave them before uoe.py was reordered (commit 970e9d1): a change of layout must not change the accounting
RECORDED_ACCOUNTING = {
    "dense": (dict(ffn="dense"), (98304, 0, 98304, 0, 7128192)),
    "moe": (dict(ffn="moe"), (787456, 1024, 0, 196608, 7525504)),
    "moe_shared": (dict(ffn="moe", n_shared=1), (885760, 1024, 98304, 196608, 7918720)),
    "moe_top1": (dict(ffn="moe", top_k=1), (787456, 1024, 0, 98304, 7132288)),
    "aoe": (dict(ffn="aoe"), (653312, 43008, 0, 152576, 7517312)),
    "uoe": (dict(ffn="uoe"), (786432, 32768, 65536, 172032, 7816320)),
    "uoe_twice": (dict(ffn="uoe", uoe_output="twice"), (786432, 32768, 65536, 180224, 7816320)),
    "uoe_no_vse": (dict(ffn="uoe", vse=False), (786432, 32768, 0, 188416, 7619712)),
    "uoe_no_vse_swiglu": (dict(ffn="uoe", vse=False, route_score="swiglu"), (786432, 65536, 0, 180224, 7718016)),
    "uoe_no_vse_pre": (dict(ffn="uoe", vse=False, route_score="pre"), (786432, 32768, 0, 188416, 7619712)),
    "uoe_pre": (dict(ffn="uoe", route_score="pre"), (786432, 32768, 65536, 172032, 7816320)),
    "uoe_swiglu": (dict(ffn="uoe", route_score="swiglu"), (786432, 65536, 32768, 172032, 7816320)),
    "uoe_twice_swiglu": (dict(ffn="uoe", uoe_output="twice", route_score="swiglu"),
                         (786432, 65536, 32768, 180224, 7816320)),
    "uoe_twice_no_vse": (dict(ffn="uoe", uoe_output="twice", vse=False), (786432, 32768, 0, 188416, 7619712)),
}


@pytest.mark.parametrize("name", RECORDED_ACCOUNTING)
def test_accounting_equals_the_recorded_values(name):
    kw, expected = RECORDED_ACCOUNTING[name]
    c = GPTConfig(**kw)
    f = uoe.ffn_breakdown(c)
    assert (f["params"], f["scoring"], f["shared"], f["experts"], uoe.param_counts(c)[1]) == expected


@pytest.mark.parametrize("by", ["flops", "params"])
@pytest.mark.parametrize("ffn", uoe.FFN_VARIANTS)
def test_match_config_within_one_hidden_unit(ffn, by):
    metric = uoe.flops_per_token if by == "flops" else (lambda c: uoe.param_counts(c)[0])
    target = GPTConfig(ffn="uoe")
    got = uoe.match_config(GPTConfig(ffn=ffn), target, by)
    one_unit = max(abs(metric(replace(got, expert_hidden=got.expert_hidden + d)) - metric(got)) for d in (-1, 1))
    assert abs(metric(got) - metric(target)) <= one_unit
    assert got.ffn == ffn
    assert uoe.unread_options(got, asdict(got)) == []   # a matched config passes train.py's check as it is


@pytest.mark.parametrize("ffn", uoe.FFN_VARIANTS)
def test_match_config_multiple_of_picks_the_closest_multiple(ffn):
    config, target = GPTConfig(ffn=ffn), GPTConfig(ffn="uoe")
    got = uoe.match_config(config, target, "flops", multiple_of=64)
    D, goal, frac = got.expert_hidden, uoe.flops_per_token(target), config.n_routing / config.expert_hidden
    assert D % 64 == 0
    neighbours = [replace(config, expert_hidden=d, n_routing=max(1, round(d * frac)))
                  for d in (D - 64, D + 64) if d > 0]
    assert all(abs(uoe.flops_per_token(got) - goal) <= abs(uoe.flops_per_token(c) - goal) for c in neighbours)
    with pytest.raises(ValueError, match="multiple_of"):
        uoe.match_config(config, target, multiple_of=0)


# ---- torch.compile ----------------------------------------------------------------------------

@pytest.mark.parametrize("ffn", ["dense", "moe", "uoe"])
def test_compile_matches_eager(ffn):
    """The compiled model's loss AND every parameter's gradient equal eager's: inductor has dropped a
    gradient here before (a dense loss ce + 0 * zeros lost ce's), which a check of the loss alone misses."""
    torch.manual_seed(0)
    model = GPT(cfg(ffn=ffn, n_layer=1))
    twin = copy.deepcopy(model)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    _, eager = model(idx, idx)
    eager.backward()
    _, compiled = torch.compile(twin)(idx, idx)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, p in twin.named_parameters():
        assert p.grad is not None, f"compiled backward gave {name} no gradient"
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-6, msg=f"gradient of {name}")


# ---- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(ffn="switch"), "ffn"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=5), "top_k"),
    (dict(n_routing=0), "n_routing"),
    (dict(n_routing=12), "n_routing"),
    (dict(n_embd=15), "n_embd"),
    (dict(ffn="aoe", d_low=0), "d_low"),
    (dict(uoe_output="thrice"), "uoe_output"),
    (dict(route_score="relu"), "route_score"),
    (dict(route_norm=3), "route_norm"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
])
def test_invalid_config_raises_value_error_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        cfg(**kw)


@pytest.mark.parametrize("ffn, kw", [("dense", dict(expert_hidden=1)), ("moe", dict(expert_hidden=1)),
                                     ("aoe", dict(n_routing=0)), ("uoe", dict(d_low=0))])
def test_a_variant_is_not_checked_on_another_variants_options(ffn, kw):
    """n_routing is UoE's, d_low AoE's: the other variants do not use them (D = 1 leaves UoE no Q_i units)."""
    model = GPT(cfg(ffn=ffn, **kw))
    idx = torch.randint(0, SMALL["vocab_size"], (1, 8))
    assert torch.isfinite(model(idx, idx)[1])


def test_a_lone_uoe_expert_builds_with_its_default_routing_neurons():
    """n_expert=1: the default N_s = D // E would leave no unit besides the routing neurons; it is capped at
    D - 1, so the user, who never set n_routing, is not told about it."""
    c = GPTConfig(ffn="uoe", n_expert=1, top_k=1)
    assert c.n_routing == c.expert_hidden - 1
    with pytest.raises(ValueError, match="expert_hidden"):
        GPTConfig(ffn="uoe", expert_hidden=1)


def test_defaults_follow_method():
    c = GPTConfig()
    assert c.n_routing == c.expert_hidden // c.n_expert    # §3: the VSE is one expert wide
    assert c.d_low == c.n_embd // 3                         # §2: d_low ~ d/3
    assert (c.uoe_output, c.vse, c.route_score, c.route_norm, c.aux_loss_coef) == ("once", True, "silu", 2, 0.01)


# ---- checkpoints ------------------------------------------------------------------------------

def small_checkpoint():
    model = GPT(cfg())
    return {"model": model.state_dict(), "config": asdict(model.config), "step": 3}


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    ckpt = small_checkpoint()
    uoe.save_checkpoint(path, ckpt)
    model = uoe.model_from_checkpoint(uoe.load_checkpoint(path))
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(model.state_dict()[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]   # no temporary files left


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['UOE_TEST_MARKER']}",))


def test_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("UOE_TEST_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    ckpt = small_checkpoint()
    ckpt["payload"] = RunsCode()
    torch.save(ckpt, path)
    with pytest.raises(uoe.CheckpointError, match="refusing"):
        uoe.load_checkpoint(path)
    assert not marker.exists()
    with open(path, "wb") as f:      # a bare pickle, not even a torch zip file
        pickle.dump(RunsCode(), f)
    with pytest.raises(uoe.CheckpointError):
        uoe.load_checkpoint(path)
    assert not marker.exists()


def test_corrupt_and_truncated_checkpoints_give_checkpoint_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    uoe.save_checkpoint(path, small_checkpoint())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(uoe.CheckpointError, match="corrupt or truncated"):
        uoe.load_checkpoint(path)
    path.write_bytes(os.urandom(1000))
    with pytest.raises(uoe.CheckpointError, match="corrupt or truncated"):
        uoe.load_checkpoint(path)
    with pytest.raises(uoe.CheckpointError, match="no checkpoint"):
        uoe.load_checkpoint(tmp_path / "missing.pt")
    ckpt = small_checkpoint()
    ckpt["config"]["n_experts_typo"] = 3
    torch.save(ckpt, path)
    with pytest.raises(uoe.CheckpointError, match="version"):
        uoe.load_checkpoint(path)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    uoe.save_checkpoint(path, small_checkpoint())
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        uoe.save_checkpoint(path, small_checkpoint())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_non_finite_weights_are_never_written(tmp_path):
    path = tmp_path / "ckpt.pt"
    ckpt = small_checkpoint()
    ckpt["model"]["lm_head.weight"][0, 0] = float("nan")
    with pytest.raises(uoe.CheckpointError, match="non-finite"):
        uoe.save_checkpoint(path, ckpt)
    assert not path.exists()


def test_generate_extends_the_sequence():
    torch.manual_seed(0)
    model = GPT(cfg()).eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 20, temperature=0.8, top_k=5)
    assert out.shape == (2, 23)


def test_generate_never_samples_past_vocab_limit():
    torch.manual_seed(0)
    model = GPT(cfg()).eval()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    free = model.generate(prompt, 30, temperature=50.0)       # near-uniform over all 37 ids
    assert (free[:, 3:] >= 5).any()                            # so the limit below is what holds them
    limited = model.generate(prompt, 30, temperature=50.0, vocab_limit=5)
    assert (limited[:, 3:] < 5).all()
    assert (model.generate(prompt, 10, top_k=3, vocab_limit=5)[:, 3:] < 5).all()


# ---- the variant registry: one place per variant ------------------------------------------------

def test_an_unregistered_variant_raises_everywhere_a_variant_is_looked_up():
    """No lookup falls back to another variant's answer (the old accounting took any unknown name as uoe)."""
    c = GPTConfig()
    c.ffn = "switch"          # past GPTConfig's own check, as a config edited after construction would be
    for lookup in (uoe.ffn_breakdown, uoe.param_counts, uoe.flops_per_token, uoe.ffn_label,
                   lambda c: uoe.unread_options(c, {}), lambda c: uoe.resolve_expert_path(c, "cpu", torch.float32)):
        with pytest.raises(ValueError, match="unknown ffn 'switch'"):
            lookup(c)
    with pytest.raises(ValueError, match="ffn"):
        GPT(c)


@pytest.mark.parametrize("ffn", uoe.FFN_VARIANTS)
def test_every_registered_variant_is_a_complete_ffn(ffn):
    """What each variant owns: its options are GPTConfig fields, its init names exactly its parameters, its
    accounting has every key, its label starts with its name, and (routed) its parts run and backpropagate."""
    cls = uoe.ffn_class(ffn)
    fields = set(asdict(GPTConfig()))
    assert set(cls.options) <= fields and set(uoe.COMMON_OPTIONS) <= fields
    c = cfg(ffn=ffn, n_shared=1 if ffn == "moe" else 0)
    layer = GPT(c).transformer.h[0].mlp
    assert isinstance(layer, cls) and set(cls.init) >= {n for n, _ in layer.named_parameters()}
    assert set(uoe.ffn_breakdown(c)) >= {"params", "active", "scoring", "shared", "experts"}
    assert uoe.ffn_label(c).startswith(ffn)
    x = torch.randn(6, c.n_embd, requires_grad=True)
    parts = layer.parts(x)
    assert set(parts) >= ({"experts"} if cls.routed else {"shared"})
    for f in parts.values():
        y = f()
        assert y.shape == x.shape
        y.square().sum().backward()


def test_a_parameter_without_an_init_entry_is_an_error():
    """A new parameter in a layer must say how it starts: reset_parameters refuses to guess."""
    class ScaledUoE(uoe.UoEFFN):
        def __init__(self, config):
            super().__init__(config)
            self.vse_scale = torch.nn.Parameter(torch.ones(()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(uoe.FFN_VARIANTS, "uoe", ScaledUoE)
        with pytest.raises(ValueError, match="vse_scale"):
            GPT(cfg(ffn="uoe"))


@pytest.mark.parametrize("ffn, given, unread", [
    ("uoe", dict(n_shared=1), ["n_shared"]),
    ("moe", dict(vse=False, uoe_output="twice", n_shared=1), ["vse", "uoe_output"]),
    ("dense", dict(n_expert=4, top_k=1), ["n_expert", "top_k"]),
    ("uoe", dict(n_shared=0, d_low=42, z_loss_coef=0.0), []),       # at their defaults: harmless
    ("moe", dict(n_routing=32, route_norm=2), []),                   # n_routing's default D // E = 32
    ("aoe", dict(route_norm=1, d_low=8, n_routing=16), ["n_routing"]),
])
def test_unread_options_are_those_set_away_from_their_default(ffn, given, unread):
    c = GPTConfig(ffn=ffn, **{k: v for k, v in given.items() if k in uoe.COMMON_OPTIONS + uoe.ffn_class(ffn).options})
    assert uoe.unread_options(c, given) == unread


def test_the_table_into_a_closed_pipe_exits_quietly():
    """`python uoe.py | head -1`: no BrokenPipeError traceback."""
    r = subprocess.run(f"{sys.executable} uoe.py | head -c 1 >/dev/null", shell=True, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr
