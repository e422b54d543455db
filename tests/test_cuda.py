"""CUDA-only tests, each skipped (with its reason) where no GPU is visible: the grouped-GEMM expert
path equals the loop in bfloat16, `expert_path="auto"` picks it on Hopper (not on Blackwell), and compiled
bf16 training lowers the loss for every variant. On a GPU machine: python -m pytest -q tests/test_cuda.py
(gpu_check.py runs them too)."""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import uoe
from conftest import ROUTED_VARIANTS, captured_dispatch, count_calls
from uoe import GPT, GPTConfig

HAS_CUDA = torch.cuda.is_available()
MAJOR = torch.cuda.get_device_properties(0).major if HAS_CUDA else None
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
# 9.x only: on 10.x grouped_mm gives experts with no tokens non-zero weight gradients (PyTorch issue #172439),
# so "auto" keeps the loop there and these comparisons would test torch's bug
needs_fast_grouped = pytest.mark.skipif(
    HAS_CUDA and (uoe.GROUPED_MM is None or MAJOR != 9),
    reason=f"grouped path needs torch's grouped_mm and a GPU of compute capability 9.x (torch "
           f"{torch.__version__}, grouped_mm {'present' if uoe.GROUPED_MM else 'absent'}, capability {MAJOR}.x)")

# every width a multiple of 8 (16-byte bf16 rows): n_routing = 128 // 8 = 16, expert_hidden - n_routing = 112
SMALL = dict(vocab_size=64, block_size=32, n_layer=1, n_head=4, n_embd=64,
             n_expert=8, top_k=2, expert_hidden=128, d_low=24)

VARIANTS = {**ROUTED_VARIANTS,
            "uoe_twice_pre_r8": dict(ffn="uoe", uoe_output="twice", route_score="pre", n_routing=8)}


def assert_bf16_close(actual, expected):
    """Tolerance: 2% of the largest |value| of the reference tensor. bfloat16 keeps 8 significant
    bits (a relative step of 0.4%), and the two paths round intermediate results and accumulate in
    different orders; a wrong expert, gate or offset would be off by about 100%."""
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= 0.02 * scale + 1e-6, f"max |difference| {err:.3g} exceeds 2% of max |value| {scale:.3g}"


def ffn_module(expert_path, bf16_params, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, **kw}, expert_path=expert_path)).cuda()
    for p in model.parameters():
        p.data.normal_(0, 0.1)        # larger than GPT-2 init: routing varies more across tokens
    if bf16_params:
        model = model.to(torch.bfloat16)
    return model.transformer.h[0].mlp


def forward_backward(m, x, grad_y, autocast):
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = m(x)
    grads = torch.autograd.grad(y, [x, *m.parameters()], grad_y.to(y.dtype))
    return y, grads, m.last_routing["topk_idx"]


@needs_fast_grouped
@pytest.mark.parametrize("mode", ["autocast", "bf16_params"])
@pytest.mark.parametrize("name", VARIANTS)
def test_grouped_equals_loop_in_bf16(name, mode, monkeypatch):
    calls = count_calls(monkeypatch, uoe, "dispatch_grouped")
    torch.manual_seed(1)
    dtype = torch.bfloat16 if mode == "bf16_params" else torch.float32
    x = torch.randn(3, 7, SMALL["n_embd"], device="cuda", dtype=dtype)       # 21 tokens: groups of any size
    grad_y = torch.randn(3, 7, SMALL["n_embd"], device="cuda")
    y_loop, g_loop, idx_loop = forward_backward(ffn_module("loop", mode == "bf16_params", **VARIANTS[name]),
                                                x, grad_y, autocast=mode == "autocast")
    y, g, idx = forward_backward(ffn_module("grouped", mode == "bf16_params", **VARIANTS[name]),
                                 x, grad_y, autocast=mode == "autocast")
    assert len(calls) == 1 and y.dtype == torch.bfloat16
    assert torch.equal(idx, idx_loop)                   # routing is computed in float32 either way
    assert_bf16_close(y, y_loop)
    for a, b in zip(g, g_loop):
        assert_bf16_close(a, b)


# (N, K) = (16, 2) assignments to 8 experts that leave experts empty (first, last, most) and uneven
ROUTINGS = {
    "first_empty": [[1, 2]] * 9 + [[3, 7]] * 5 + [[2, 5]] * 2,
    "first_and_last_empty": [[1, 2]] * 13 + [[6, 1]] * 3,
    "only_two": [[4, 5]] * 15 + [[5, 4]],
}


@needs_fast_grouped
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("name", ["moe", "aoe", "uoe_twice"])
def test_grouped_equals_loop_in_bf16_with_empty_experts(name, routing):
    """dispatch itself, with a routing forced on it: empty groups in the grouped GEMMs' forward
    and in their weight-gradient GEMMs (a zero-length contraction)."""
    m = ffn_module("loop", False, **VARIANTS[name])
    x = torch.randn(1, 16, SMALL["n_embd"], device="cuda", requires_grad=True)
    (x2d, _, expert_fn, weights), kwargs = captured_dispatch(m, x, autocast_dtype=torch.bfloat16)
    topk_idx = torch.tensor(ROUTINGS[routing], device="cuda")
    grad_y = torch.randn(16, 2, SMALL["n_embd"], device="cuda", dtype=torch.bfloat16)   # (N, K, C) outputs
    leaves = [x, *m.parameters()]
    outs = {}
    for path in ("loop", "grouped"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = uoe.dispatch(x2d, topk_idx, expert_fn, weights, reused=kwargs.get("reused"), path=path)
        outs[path] = (y, torch.autograd.grad(y, leaves, grad_y, retain_graph=True, allow_unused=True))
    torch.cuda.synchronize()
    assert_bf16_close(outs["grouped"][0], outs["loop"][0])
    for g, g_ref in zip(outs["grouped"][1], outs["loop"][1]):
        assert (g is None) == (g_ref is None)
        if g_ref is not None:
            assert_bf16_close(g, g_ref)


@needs_fast_grouped
@pytest.mark.parametrize("ffn", ["moe", "aoe", "uoe"])
def test_auto_picks_grouped_for_bf16_with_aligned_widths_on_this_gpu(ffn, monkeypatch):
    c = GPTConfig(**SMALL, ffn=ffn)
    assert uoe.resolve_expert_path(c, "cuda", torch.bfloat16) == "grouped"
    assert uoe.resolve_expert_path(c, torch.device("cuda", 0), torch.bfloat16) == "grouped"
    assert uoe.resolve_expert_path(c, "cuda", torch.float32) == "loop"
    assert uoe.resolve_expert_path(GPTConfig(**SMALL, ffn=ffn, expert_hidden=132), "cuda", torch.bfloat16) == "loop"
    calls = count_calls(monkeypatch, uoe, "dispatch_grouped")
    model = GPT(c).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.zeros(2, 8, dtype=torch.long, device="cuda"))
    assert len(calls) == SMALL["n_layer"]            # auto ran the grouped path in every routed layer


@pytest.mark.skipif(HAS_CUDA and MAJOR != 10, reason=f"needs a GPU of compute capability 10.x (this is {MAJOR}.x)")
def test_auto_keeps_the_loop_on_blackwell():
    """PyTorch issue #172439: grouped_mm's weight gradients are wrong for experts with no tokens on 10.x."""
    assert uoe.resolve_expert_path(GPTConfig(**SMALL, ffn="uoe"), "cuda", torch.bfloat16) == "loop"


@pytest.mark.parametrize("ffn", ["dense", "moe", "aoe", "uoe"])
def test_compiled_bf16_training_lowers_the_loss(ffn):
    """20 AdamW steps of a compiled model under bf16 autocast fit a fixed batch: the loss falls
    by a fifth or more. On the grouped path the model is one graph (fullgraph) at every step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = GPTConfig(**SMALL, ffn=ffn)
    path = uoe.resolve_expert_path(config, "cuda", torch.bfloat16)
    model = GPT(config).cuda()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=ffn == "dense" or path == "grouped")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, SMALL["vocab_size"], (8, SMALL["block_size"]), device="cuda")
    targets = torch.randint(0, SMALL["vocab_size"], (8, SMALL["block_size"]), device="cuda")
    losses = []
    for step in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.8 * losses[0], losses
    if ffn == "dense" or path == "grouped":
        assert counter.frame_count == 1              # no recompile as the expert loads change
