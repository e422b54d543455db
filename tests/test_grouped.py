"""The grouped-GEMM expert path (uoe.dispatch_grouped) against the readable loop (uoe.dispatch_loop),
on the CPU: same outputs and gradients for every routed variant and UoE switch, empty experts and
uneven loads included; one graph under torch.compile; and how expert_path="auto" decides."""

import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import uoe
from conftest import ROUTED_VARIANTS, captured_dispatch, count_calls
from uoe import GPT, GPTConfig


def cpu_grouped_mm_works():
    """Whether this torch build runs grouped_mm on the CPU in float32 (2.13 does)."""
    if uoe.GROUPED_MM is None:
        return False
    try:
        uoe.GROUPED_MM(torch.randn(4, 4), torch.randn(2, 4, 4), offs=torch.tensor([1, 4], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_grouped_mm = pytest.mark.skipif(not cpu_grouped_mm_works(),
                                      reason=f"torch {torch.__version__} has no grouped_mm that runs on the CPU")

# widths that are multiples of 8: 16-byte rows in bfloat16 (and in float32, which needs 4)
SMALL = dict(vocab_size=37, block_size=16, n_layer=1, n_head=2, n_embd=16,
             n_expert=4, top_k=2, expert_hidden=32, d_low=8)           # n_routing = 32 // 4 = 8

VARIANTS = {**ROUTED_VARIANTS,
            "aoe_l1": dict(ffn="aoe", route_norm=1),
            "uoe_inf": dict(ffn="uoe", route_norm="inf"),
            "uoe_twice_pre_r4": dict(ffn="uoe", uoe_output="twice", route_score="pre", n_routing=4)}


def ffn_module(expert_path, **kw):
    """Layer 0's FFN with weights large enough (std 0.3) that routing varies across tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, **kw}, expert_path=expert_path))
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model.transformer.h[0].mlp


@needs_grouped_mm
@pytest.mark.parametrize("name", VARIANTS)
def test_grouped_ffn_equals_loop_forward_and_gradients(name, monkeypatch):
    grouped_calls = count_calls(monkeypatch, uoe, "dispatch_grouped")
    torch.manual_seed(1)
    x = torch.randn(3, 7, SMALL["n_embd"])
    grad_y = torch.randn(3, 7, SMALL["n_embd"])    # a real upstream gradient (grouped_mm refuses stride-0 ones)
    results = {}
    for path in ("loop", "grouped"):
        m = ffn_module(path, **VARIANTS[name])
        x_leaf = x.clone().requires_grad_()
        y = m(x_leaf)
        grads = torch.autograd.grad(y, [x_leaf, *m.parameters()], grad_y)
        results[path] = (y, grads, m.last_routing["topk_idx"])
    (y_loop, g_loop, idx_loop), (y_grouped, g_grouped, idx_grouped) = results["loop"], results["grouped"]
    assert len(grouped_calls) == 1                  # the grouped model really took the grouped path
    assert torch.equal(idx_loop, idx_grouped)
    assert len(torch.unique(idx_loop[:, 0])) > 1    # routing varies, so the test means something
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(g_grouped, g_loop):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def grouped_mm_is_matmul_in_bf16():
    """Whether this build's CPU grouped_mm gives bit for bit what torch.matmul gives in bfloat16 (2.13 does)."""
    a, w = torch.randn(6, 16).bfloat16(), torch.randn(2, 16, 8).bfloat16()
    return torch.equal(uoe.GROUPED_MM(a, w, offs=torch.tensor([2, 6], dtype=torch.int32)),
                       torch.cat([a[:2] @ w[0], a[2:] @ w[1]]))


# every switch, with widths that bfloat16's 16-byte rows allow (n_routing 8)
BF16_VARIANTS = {**ROUTED_VARIANTS,
                 "aoe_l1": dict(ffn="aoe", route_norm=1),
                 "uoe_inf": dict(ffn="uoe", route_norm="inf"),
                 "uoe_no_vse_pre": dict(ffn="uoe", vse=False, route_score="pre"),
                 "uoe_twice_pre": dict(ffn="uoe", uoe_output="twice", route_score="pre")}


@needs_grouped_mm
@pytest.mark.parametrize("name", BF16_VARIANTS)
def test_grouped_equals_loop_bit_for_bit_under_bf16_autocast(name):
    """Both paths round the same tensors to bfloat16 at the same points (the reused routing activations
    included, which the grouped path once rounded before a product the loop took in float32): with
    matmuls that agree bit for bit, the outputs and weight gradients do too. The input's gradient is
    summed in a different order (bf16 vs float32 casts around the gathers): close, not equal."""
    if not grouped_mm_is_matmul_in_bf16():
        pytest.skip(f"torch {torch.__version__}'s CPU grouped_mm and matmul round differently in bfloat16")
    torch.manual_seed(1)
    x = torch.randn(3, 7, SMALL["n_embd"])
    grad_y = torch.randn(3, 7, SMALL["n_embd"], dtype=torch.bfloat16)
    results = {}
    for path in ("loop", "grouped"):
        m = ffn_module(path, **BF16_VARIANTS[name])
        x_leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x_leaf)
        results[path] = (y, torch.autograd.grad(y, [x_leaf, *m.parameters()], grad_y))
    (y_loop, g_loop), (y_grouped, g_grouped) = results["loop"], results["grouped"]
    assert y_loop.dtype == torch.bfloat16 and torch.equal(y_grouped, y_loop)
    torch.testing.assert_close(g_grouped[0], g_loop[0], rtol=2e-2, atol=2e-2)
    for g, g_ref in zip(g_grouped[1:], g_loop[1:]):
        assert torch.equal(g, g_ref)


# (N, K) = (12, 2) assignments to 4 experts, chosen to leave experts empty and the rest uneven
ROUTINGS = {
    "first_empty": [[1, 2]] * 7 + [[3, 1]] * 4 + [[2, 3]],          # loads 0, 11, 8, 5
    "first_and_last_empty": [[1, 2]] * 9 + [[2, 1]] * 3,           # loads 0, 12, 12, 0
    "only_last_two": [[3, 2]] * 11 + [[2, 3]],                     # loads 0, 0, 12, 12
}


@needs_grouped_mm
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("name", ["moe", "aoe", "uoe", "uoe_twice", "uoe_no_vse", "uoe_twice_pre_r4"])
def test_grouped_dispatch_equals_loop_with_empty_and_uneven_experts(name, routing):
    """dispatch with a routing forced on it: each FFN's own expert function, weights and reused
    scoring activations, with experts that get no token; every (token, slot) output compared."""
    m = ffn_module("loop", **VARIANTS[name])
    x = torch.randn(1, 12, SMALL["n_embd"], requires_grad=True)
    (x2d, own_idx, expert_fn, weights), kwargs = captured_dispatch(m, x)
    topk_idx = torch.tensor(ROUTINGS[routing])[:, :own_idx.shape[1]]
    grad_y = torch.randn(12, own_idx.shape[1], SMALL["n_embd"])   # one per (token, slot) output
    leaves = [x, *m.parameters()]
    outs = {}
    for path in ("loop", "grouped"):
        y = uoe.dispatch(x2d, topk_idx, expert_fn, weights, reused=kwargs.get("reused"), path=path)   # (N, K, C)
        outs[path] = (y, torch.autograd.grad(y, leaves, grad_y, retain_graph=True, allow_unused=True))
    torch.testing.assert_close(outs["grouped"][0], outs["loop"][0], rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(outs["grouped"][1], outs["loop"][1]):
        if g_ref is None:                           # e.g. the router: dispatch gets the choice, not logits
            assert g is None
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@needs_grouped_mm
@pytest.mark.parametrize("ffn", ["moe", "aoe", "uoe"])
def test_grouped_block_compiles_to_one_graph_whatever_the_expert_loads(ffn):
    """A routed block on the grouped path is one graph (fullgraph=True: no graph break) and is
    not recompiled when the loads change, empty experts included. bfloat16 autocast: torch's
    meta kernel for grouped_mm, which tracing uses, accepts bfloat16 only."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = uoe.Block(GPTConfig(**SMALL, ffn=ffn, uoe_output="twice", expert_path="grouped"))
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    counter = CompileCounter()
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    loads = set()
    for step in range(4):
        x = torch.randn(1, 2, SMALL["n_embd"], requires_grad=True)   # 2 tokens x 2 choices: experts often empty
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = compiled(x)
        y.backward(torch.randn_like(y))
        loads.add(tuple(torch.bincount(block.mlp.last_routing["topk_idx"].flatten(), minlength=4).tolist()))
    assert counter.frame_count == 1
    assert len(loads) > 1 and any(0 in load for load in loads)


@needs_grouped_mm
def test_grouped_gpt_training_steps_compile_to_one_graph():
    """The whole model on the grouped path: one graph (fullgraph=True) for every training step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, "n_layer": 2}, ffn="uoe", expert_path="grouped"))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = compiled(idx, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert counter.frame_count == 1


@pytest.mark.skipif(not os.environ.get("UOE_SLOW_TESTS"), reason="inductor on the CPU takes minutes; "
                    "set UOE_SLOW_TESTS=1 to run it")
@needs_grouped_mm
@pytest.mark.parametrize("ffn", ["moe", "aoe", "uoe"])
def test_inductor_compiled_grouped_block_matches_eager(ffn):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = uoe.Block(GPTConfig(**SMALL, ffn=ffn, expert_path="grouped"))
    for p in block.parameters():                    # a bare Block is uninitialised (GPT initialises)
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 8, SMALL["n_embd"])
    grad_y = torch.randn(2, 8, SMALL["n_embd"], dtype=torch.bfloat16)
    results = []
    for run in (block, torch.compile(block, fullgraph=True)):
        x_leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run(x_leaf)
        results.append((y, *torch.autograd.grad(y, [x_leaf, block.mlp.w_up], grad_y)))
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


# ---- expert_path: validation and what "auto" picks ------------------------------------------

def test_invalid_expert_path_raises_value_error_naming_the_field():
    with pytest.raises(ValueError, match="expert_path"):
        GPTConfig(**SMALL, ffn="moe", expert_path="fast")


def test_grouped_without_grouped_mm_raises_value_error_naming_the_field(monkeypatch):
    monkeypatch.setattr(uoe, "GROUPED_MM", None)
    with pytest.raises(ValueError, match="expert_path"):
        GPTConfig(**SMALL, ffn="moe", expert_path="grouped")
    assert uoe.resolve_expert_path(GPTConfig(**SMALL, ffn="moe"), "cpu", torch.bfloat16) == "loop"


def fake_gpu(monkeypatch, major):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))


@pytest.mark.parametrize("ffn", ["moe", "aoe", "uoe"])
def test_auto_picks_grouped_on_hopper_in_bf16_with_aligned_widths(ffn, monkeypatch):
    if uoe.GROUPED_MM is None:
        pytest.skip(f"torch {torch.__version__} has no grouped_mm")
    c = GPTConfig(**SMALL, ffn=ffn)
    fake_gpu(monkeypatch, 9)                                                    # H100/H200
    assert uoe.resolve_expert_path(c, "cuda", torch.bfloat16) == "grouped"
    assert uoe.resolve_expert_path(c, torch.device("cuda", 0), torch.bfloat16) == "grouped"
    assert uoe.resolve_expert_path(c, "cuda", torch.float32) == "loop"         # not where it is fast
    fake_gpu(monkeypatch, 8)                                                    # A100: loop
    assert uoe.resolve_expert_path(c, "cuda", torch.bfloat16) == "loop"
    assert uoe.resolve_expert_path(c, "cpu", torch.bfloat16) == "loop"
    assert uoe.resolve_expert_path(c, "cpu", torch.float32) == "loop"


@pytest.mark.parametrize("ffn", ["moe", "aoe", "uoe"])
def test_auto_stays_on_the_loop_on_blackwell_and_explicit_grouped_warns(ffn, monkeypatch):
    """PyTorch issue #172439: on compute capability 10.x grouped_mm gives experts with no tokens
    non-zero weight gradients, so auto must not pick it there; an explicit 'grouped' runs, warned."""
    if uoe.GROUPED_MM is None:
        pytest.skip(f"torch {torch.__version__} has no grouped_mm")
    fake_gpu(monkeypatch, 10)                                                   # B200
    assert uoe.resolve_expert_path(GPTConfig(**SMALL, ffn=ffn), "cuda", torch.bfloat16) == "loop"
    with pytest.warns(UserWarning, match="172439"):
        path = uoe.resolve_expert_path(GPTConfig(**SMALL, ffn=ffn, expert_path="grouped"), "cuda", torch.bfloat16)
    assert path == "grouped"
    fake_gpu(monkeypatch, 9)                                                    # no warning where it is correct
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert uoe.resolve_expert_path(GPTConfig(**SMALL, ffn=ffn, expert_path="grouped"), "cuda",
                                       torch.bfloat16) == "grouped"


@pytest.mark.parametrize("kw", [dict(ffn="moe", n_embd=18, n_head=2), dict(ffn="moe", expert_hidden=36),
                                dict(ffn="aoe", d_low=6), dict(ffn="uoe", n_routing=6)], ids=str)
def test_misaligned_widths_fall_back_to_loop_or_raise_when_grouped_is_asked(kw, monkeypatch):
    if uoe.GROUPED_MM is None:
        pytest.skip(f"torch {torch.__version__} has no grouped_mm")
    fake_gpu(monkeypatch, 9)
    assert uoe.resolve_expert_path(GPTConfig(**{**SMALL, **kw}), "cuda", torch.bfloat16) == "loop"
    with pytest.raises(ValueError, match="expert_path"):
        uoe.resolve_expert_path(GPTConfig(**{**SMALL, **kw}, expert_path="grouped"), "cuda", torch.bfloat16)


def test_loop_and_dense_always_resolve_to_loop(monkeypatch):
    fake_gpu(monkeypatch, 9)
    assert uoe.resolve_expert_path(GPTConfig(**SMALL, ffn="uoe", expert_path="loop"), "cuda", torch.bfloat16) == "loop"
    assert uoe.resolve_expert_path(GPTConfig(**SMALL, ffn="dense"), "cuda", torch.bfloat16) == "loop"
