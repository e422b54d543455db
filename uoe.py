"""
Union-of-Experts (UoE) in one file: a GPT whose feed-forward network is dense, a routed
top-k MoE, Autonomy-of-Experts (AoE) or Union-of-Experts, selected by `GPTConfig.ffn`.

Read top to bottom; the sections, in the file's order:
  1. GPTConfig: every model option, validated
  2. attention (nanoGPT's) and swiglu, the FFN that every expert is
  3. the FFNs: DenseFFN, then the routing helpers (load balance loss, float32 routing matmul, norms)
  4. the expert dispatch shared by the routed FFNs (a readable loop, and grouped GEMMs for speed)
  5. the routed FFNs MoEFFN, AoEFFN, UoEFFN (each maps to a section of METHOD.md)
  6. the transformer Block, the GPT, and its routing statistics
  7. accounting (params/FLOPs, match_config), 8. checkpoints, 9. the table `python uoe.py` prints
Section numbers (§) refer to METHOD.md, the project's specification.

Shapes: B batch, T time, C = n_embd (d), N = B*T tokens, E = n_expert (n), K = top_k,
D = expert_hidden, R = n_routing (N_s in the paper).
"""

import math
import os
import tempfile
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

FFN_VARIANTS = ("dense", "moe", "aoe", "uoe")
EXPERT_PATHS = ("auto", "loop", "grouped")
# one GEMM for many experts over tokens sorted by expert: F.grouped_mm, or its older private name
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class GPTConfig:
    block_size: int = 256         # context length in tokens
    vocab_size: int = 50304       # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 4              # transformer blocks
    n_head: int = 4               # attention heads
    n_embd: int = 128             # d: model width
    dropout: float = 0.0          # dropout probability (0 for short runs)
    bias: bool = False            # biases in Linear/LayerNorm (the FFNs never have biases)
    ffn: str = "uoe"              # "dense" | "moe" | "aoe" | "uoe"
    n_expert: int = 8             # n: experts per layer
    top_k: int = 2                # K: experts chosen per token
    expert_hidden: int = 256      # D: hidden width of one expert (and of the dense FFN)
    n_shared: int = 0             # moe: always-on shared experts of width D (§2)
    d_low: int | None = None      # aoe: rank of the factorised gate; None -> n_embd // 3 (§2)
    n_routing: int | None = None  # uoe: routing neurons per expert; None -> D // n (§3)
    uoe_output: str = "once"      # uoe: "once" | "twice" (§3 switches)
    vse: bool = True              # uoe: add the virtual shared expert (§3)
    route_score: str = "silu"     # uoe: "silu" | "pre" | "swiglu" (§3 switches)
    route_norm: int | str = 2     # aoe/uoe: 2 | 1 | "inf"
    aux_loss_coef: float = 0.01   # load-balancing loss weight, 0 disables (§4)
    z_loss_coef: float = 0.0      # moe: router z-loss weight, 0 disables
    expert_path: str = "auto"     # "auto" | "loop" | "grouped": how routed experts run (resolve_expert_path)

    def __post_init__(self):
        if self.d_low is None:
            self.d_low = max(1, self.n_embd // 3)
        if self.n_routing is None:
            self.n_routing = max(1, self.expert_hidden // self.n_expert)
        self.validate()

    def validate(self):
        def bad(field, allowed):
            raise ValueError(f"GPTConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")
        for f in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_expert", "expert_hidden"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, "it must be an integer >= 1")
        if self.ffn not in FFN_VARIANTS:
            bad("ffn", f"it must be one of {', '.join(FFN_VARIANTS)}")
        if self.n_embd % self.n_head != 0:
            bad("n_embd", f"it must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "it must be in [0, 1)")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.n_expert:
            bad("top_k", f"it must be an integer in 1..n_expert={self.n_expert}")
        if not isinstance(self.n_routing, int) or not 1 <= self.n_routing <= self.expert_hidden - 1:
            bad("n_routing", f"it must be an integer in 1..expert_hidden-1={self.expert_hidden - 1}")
        if not isinstance(self.d_low, int) or self.d_low < 1:
            bad("d_low", "it must be an integer >= 1")
        if not isinstance(self.n_shared, int) or self.n_shared < 0:
            bad("n_shared", "it must be an integer >= 0")
        if self.uoe_output not in ("once", "twice"):
            bad("uoe_output", "it must be 'once' or 'twice'")
        if self.route_score not in ("silu", "pre", "swiglu"):
            bad("route_score", "it must be 'silu', 'pre' or 'swiglu'")
        if self.route_norm not in (1, 2, "inf"):
            bad("route_norm", "it must be 2, 1 or 'inf'")
        for f in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, f) < 0:
                bad(f, "it must be >= 0")
        if self.expert_path not in EXPERT_PATHS:
            bad("expert_path", "it must be 'auto', 'loop' or 'grouped'")
        if self.expert_path == "grouped" and GROUPED_MM is None:
            bad("expert_path", f"'grouped' needs torch's grouped_mm, which torch {torch.__version__} lacks "
                               "(use 'auto' or 'loop', or a newer torch)")


# -----------------------------------------------------------------------------
# Attention (nanoGPT's, with F.scaled_dot_product_attention) and SwiGLU.

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class SwiGLUWeights(NamedTuple):
    """The three matrices of a SwiGLU FFN (§1); in dispatch, stacked over experts (E, ...)."""
    gate: torch.Tensor   # W_g (C, D)
    up: torch.Tensor     # W_p (C, D)
    down: torch.Tensor   # W_o (D, C)


def swiglu(x, w_gate, w_up, w_down, mm=torch.matmul):
    """FFN(x) = (SiLU(x W_g) * (x W_p)) W_o  (§1); mm is the matmul (dispatch passes a grouped one)."""
    return mm(F.silu(mm(x, w_gate)) * mm(x, w_up), w_down)


# -----------------------------------------------------------------------------
# The FFNs. Each takes x (B, T, C) and returns y (B, T, C). Routed FFNs (below the dispatch) also leave
# `aux_loss` (§4) and `last_routing` (detached tensors for statistics) on themselves.

class DenseFFN(nn.Module):
    """§2 dense: one SwiGLU FFN of width D."""

    def __init__(self, config):
        super().__init__()
        C, D = config.n_embd, config.expert_hidden
        self.w_gate = nn.Parameter(torch.empty(C, D))
        self.w_up = nn.Parameter(torch.empty(C, D))
        self.w_down = nn.Parameter(torch.empty(D, C))

    def forward(self, x):
        return swiglu(x, self.w_gate, self.w_up, self.w_down)


def load_balance_loss(scores, topk_idx):
    """Switch-style L_aux = n * sum_i f_i P_i (§4); equals 1 at perfect balance.
    scores: (N, E) router logits or norms; topk_idx: (N, K)."""
    E = scores.size(-1)
    ones = torch.ones(topk_idx.numel(), dtype=scores.dtype, device=scores.device)
    # index_add_, not bincount: no graph break under torch.compile
    f = scores.new_zeros(E).index_add_(0, topk_idx.flatten(), ones) / topk_idx.numel()   # (E,)
    P = F.softmax(scores, dim=-1).mean(dim=0)                                             # (E,)
    return E * (f * P).sum()


def upcast(t):
    """t in at least float32 (float16/bfloat16 -> float32; float32/float64 unchanged)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def routing_matmul(x, w):
    """x @ w for routing scores, in at least float32 even under autocast (which would run it in
    bfloat16 and round the result: near-ties would then flip the top-k). Upcasting the product
    afterwards is too late. On CUDA with TF32 allowed (train.py allows it) "float32" means TF32."""
    with torch.autocast(x.device.type, enabled=False):
        return upcast(x) @ upcast(w)


def route_norm(h, p):
    """Activation intensity ||h|| over the last dim, p in {2, 1, 'inf'}."""
    return torch.linalg.vector_norm(h, ord=math.inf if p == "inf" else p, dim=-1)


# -----------------------------------------------------------------------------
# The expert dispatch, shared by moe, aoe and uoe. One entry point, `dispatch`, and two ways to
# run it: `dispatch_loop`, the readable reference (one matmul chain per expert, Mixtral-style),
# and `dispatch_grouped`, the same maths with one grouped GEMM per matmul for all experts at
# once. `GPTConfig.expert_path` chooses; `resolve_expert_path` says which one runs.

def compute_dtype(x):
    """The dtype x's matmuls run in: autocast's where autocast is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def expert_widths(config):
    """The widths of the matrices the grouped GEMMs read row by row; each row must start on a
    16-byte boundary (a multiple of 8 bfloat16 or 4 float32 values)."""
    widths = {"n_embd": config.n_embd, "expert_hidden": config.expert_hidden}
    if config.ffn == "aoe":
        widths["d_low"] = config.d_low
    if config.ffn == "uoe":
        widths["expert_hidden - n_routing"] = config.expert_hidden - config.n_routing
        widths["n_routing"] = config.n_routing   # reused by "twice" and without VSE; checked always
    return widths


def resolve_expert_path(config, device, dtype):
    """The expert path, "loop" or "grouped", that a routed layer of `config` takes on `device`
    when its matmuls run in `dtype`. "auto" is "grouped" where torch's grouped GEMM is built to be
    fast: CUDA compute capability 9.x/10.x (H100/H200, B200), bfloat16, 16-byte aligned widths;
    else "loop". An explicit "grouped" with misaligned widths raises ValueError naming the field;
    under torch.compile it also needs bfloat16 (torch's tracing rule for grouped_mm has no other)."""
    device = torch.device(device)
    if config.expert_path == "loop" or config.ffn == "dense":   # dense: no routed layer to group
        return "loop"
    align = 16 // dtype.itemsize
    misaligned = {k: v for k, v in expert_widths(config).items() if v % align}
    if config.expert_path == "grouped":
        if misaligned:
            raise ValueError(f"GPTConfig.expert_path='grouped' needs widths that are multiples of {align} "
                             f"for {dtype} (16 bytes); these are not: {misaligned}. Use 'auto' or 'loop'")
        return "grouped"
    fast_gpu = device.type == "cuda" and torch.cuda.get_device_properties(device).major in (9, 10)
    if GROUPED_MM is not None and fast_gpu and dtype == torch.bfloat16 and not misaligned:
        return "grouped"
    return "loop"


def dispatch(x, topk_idx, gates, expert_fn, weights, extra=None, path="loop"):
    """Run every token through its K chosen experts: dropless, no capacity, no loop over tokens.

    The (token, expert) assignments are sorted by expert so that each expert sees one contiguous
    block of its tokens; expert_fn(x, w, extra, mm) computes an expert on its block, with `mm` as
    its matmul; the outputs are scaled by their gates and summed back per token with index_add_
    (Mixtral-style, §2).
    x: (N, C); topk_idx, gates: (N, K); weights: a NamedTuple of expert-stacked (E, ...) tensors
    (expert_fn gets the same kind, with one expert's tensors in the loop, all of them when grouped);
    extra: optional (N, E, X) per-(token, expert) inputs that scoring already computed (AoE's
    C_i, UoE's routing activations): reused, not recomputed. path: "loop" or "grouped"
    (resolve_expert_path); both give the same result up to rounding.
    """
    run = dispatch_grouped if path == "grouped" else dispatch_loop
    return run(x, topk_idx, gates, expert_fn, weights, extra)


# Under torch.compile the loop runs eagerly (one graph break per layer, as its .tolist() would
# cause anyway): its block sizes are data, and dynamo, which specialises sizes 0 and 1, would
# recompile whenever a new set of experts gets 0 or 1 tokens, and fall back to eager after 8.
@torch.compiler.disable
def dispatch_loop(x, topk_idx, gates, expert_fn, weights, extra=None):
    """The reference: one expert at a time, each on its own weights w = (w[e] for w in weights).

    Speed: the per-expert blocks come from one split() of the sorted tokens and one unbind() of
    each stacked weight, whose backward is one cat / stack. Taking them one at a time
    (x_sorted[a:b], w[e]) gives the same forward, but in backward each such index writes its
    gradient into a fresh zero tensor of the full size, and those are summed: E full-size copies
    per tensor and layer (E^2 * C * D work for the weights). On CPU that made the expert path
    (forward + backward) ~1.3x slower; see `python bench.py speed`.
    """
    N, K = topk_idx.shape
    E = weights[0].shape[0]
    flat_expert = topk_idx.flatten()                             # (N*K,)
    order = flat_expert.argsort(stable=True)                     # assignments grouped by expert
    token = order // K                                           # (N*K,) token of each assignment
    counts = torch.bincount(flat_expert, minlength=E).tolist()   # tokens per expert (host sync)
    x_e = x[token].split(counts)                                 # E blocks (n_e, C); n_e may be 0
    extra_e = [None] * E if extra is None else extra[token, flat_expert[order]].split(counts)  # (n_e, X)
    weights_e = [type(weights)(*one) for one in zip(*(w.unbind(0) for w in weights))]   # E: each expert's
    y_sorted = torch.cat([expert_fn(x_e[e], weights_e[e], extra_e[e], torch.matmul) for e in range(E)])  # (N*K, C)
    y_sorted = y_sorted * gates.flatten()[order].unsqueeze(-1).to(y_sorted.dtype)
    return y_sorted.new_zeros(x.shape).index_add_(0, token, y_sorted)   # (N, C)


def dispatch_grouped(x, topk_idx, gates, expert_fn, weights, extra=None):
    """The fast path: the same sort by expert, then expert_fn runs ONCE on all N*K sorted rows
    with the whole stacked weights, each of its matmuls one grouped GEMM: rows offs[e-1]:offs[e]
    times expert e's matrix. Every shape is static (N*K rows, whatever the load); only the
    offsets, computed on the device, vary: no host sync, and under torch.compile one graph with
    no recompiles. Grouped GEMMs have no autocast rule, so inputs are cast to the compute dtype
    here; their rows must be 16-byte aligned (resolve_expert_path checks the widths)."""
    N, K = topk_idx.shape
    E = weights[0].shape[0]
    dtype = compute_dtype(x)
    sorted_expert, order = topk_idx.flatten().sort(stable=True)  # (N*K,) assignments grouped by expert
    token = order // K                                           # (N*K,) token of each assignment
    experts = torch.arange(E, device=x.device, dtype=sorted_expert.dtype)
    offs = torch.searchsorted(sorted_expert, experts, right=True, out_int32=True)  # (E,) end of each block

    def mm(a, w):                                                # (n, X) @ (E, X, Y) -> (n, Y)
        return GROUPED_MM(a, w, offs=offs)

    x_sorted = x.to(dtype)[token]                                # (N*K, C)
    extra_sorted = None if extra is None else extra[token, sorted_expert].to(dtype)  # (N*K, X)
    weights = type(weights)(*(w.to(dtype).contiguous() for w in weights))   # (E, X, Y) each, aligned rows
    y_sorted = expert_fn(x_sorted, weights, extra_sorted, mm)    # (N*K, C)
    y_sorted = y_sorted * gates.flatten()[order].unsqueeze(-1).to(y_sorted.dtype)
    return y_sorted.new_zeros(x.shape).index_add_(0, token, y_sorted)   # (N, C)


# -----------------------------------------------------------------------------
# The routed FFNs: each scores the experts, picks the top K and hands them to dispatch.

class MoEFFN(nn.Module):
    """§2 moe: router W_r, p = softmax(x W_r), top-K, gates p[I] / sum p[I] (Mixtral), plus
    n_shared always-on shared experts (DeepSeekMoE), stored as one SwiGLU of width n_shared*D."""

    def __init__(self, config):
        super().__init__()
        C, E, D, S = config.n_embd, config.n_expert, config.expert_hidden, config.n_shared
        self.config, self.top_k = config, config.top_k
        self.aux_loss = self.z_loss = None     # set by forward; here so that compiled guards never see them appear
        self.router = nn.Parameter(torch.empty(C, E))
        self.w_gate = nn.Parameter(torch.empty(E, C, D))
        self.w_up = nn.Parameter(torch.empty(E, C, D))
        self.w_down = nn.Parameter(torch.empty(E, D, C))
        if S:
            self.shared_gate = nn.Parameter(torch.empty(C, S * D))
            self.shared_up = nn.Parameter(torch.empty(C, S * D))
            self.shared_down = nn.Parameter(torch.empty(S * D, C))

    def expert(self, x, w, _, mm):
        return swiglu(x, w.gate, w.up, w.down, mm=mm)

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)                                       # (N, C)
        logits = routing_matmul(x, self.router)                    # (N, E) router logits, >= float32
        top_p, topk_idx = F.softmax(logits, dim=-1).topk(self.top_k, dim=-1)  # (N, K)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)            # renormalised over the K
        path = resolve_expert_path(self.config, x.device, compute_dtype(x))
        weights = SwiGLUWeights(self.w_gate, self.w_up, self.w_down)
        y = dispatch(x, topk_idx, gates, self.expert, weights, path=path)
        if hasattr(self, "shared_gate"):
            y = y + swiglu(x, self.shared_gate, self.shared_up, self.shared_down)
        self.aux_loss = load_balance_loss(logits, topk_idx)
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()  # keeps router logits small
        self.last_routing = {"topk_idx": topk_idx.detach(), "scores": logits.detach()}
        return y.view(B, T, C)


class AoEFFN(nn.Module):
    """§2 aoe: no router. W_g^i = A_i B_i is factorised (METHOD's W_down^i, W_up^i); one matmul
    gives C_i = x A_i for all experts, the score is ||C_i||, and the chosen experts reuse C_i."""

    def __init__(self, config):
        super().__init__()
        C, E, D, L = config.n_embd, config.n_expert, config.expert_hidden, config.d_low
        self.config, self.top_k, self.p = config, config.top_k, config.route_norm
        self.aux_loss = None                   # set by forward (see MoEFFN)
        self.w_gate_a = nn.Parameter(torch.empty(E, C, L))     # A_i: d x d_low
        self.w_gate_b = nn.Parameter(torch.empty(E, L, D))     # B_i: d_low x D
        self.w_up = nn.Parameter(torch.empty(E, C, D))
        self.w_down = nn.Parameter(torch.empty(E, D, C))

    def expert(self, x, w, c, mm):
        return mm(F.silu(mm(c, w.gate)) * mm(x, w.up), w.down)    # w.gate: B_i (C_i = x A_i is given)

    def forward(self, x):
        B, T, C = x.shape
        E, L = self.w_gate_a.shape[0], self.w_gate_a.shape[2]
        x = x.reshape(-1, C)                                       # (N, C)
        c = routing_matmul(x, self.w_gate_a.transpose(0, 1).reshape(C, E * L)).view(-1, E, L)  # (N, E, L)
        scores = route_norm(c, self.p)                             # (N, E), >= float32
        top_s, topk_idx = scores.topk(self.top_k, dim=-1)          # (N, K)
        gates = F.softmax(top_s, dim=-1)
        path = resolve_expert_path(self.config, x.device, compute_dtype(x))
        y = dispatch(x, topk_idx, gates, self.expert, SwiGLUWeights(self.w_gate_b, self.w_up, self.w_down),
                     extra=c.to(x.dtype), path=path)                # the chosen experts reuse C_i
        self.aux_loss = load_balance_loss(scores, topk_idx)
        self.last_routing = {"topk_idx": topk_idx.detach(), "scores": scores.detach()}
        return y.view(B, T, C)


class UoEVariant(NamedTuple):
    """What the §3 switches (uoe_output, vse, route_score) change, decided in one place: uoe_variant."""
    score_of: str              # the routing quantity whose norm is the score: "a", "pre" or "h" (RoutingActivations)
    vse: bool                  # add the virtual shared expert
    routed_includes_R: bool    # the chosen experts output g_i (R_i + Q_i), not g_i Q_i ("twice", or no VSE)
    hidden_for_all: bool       # the routing neurons' full hidden a_i * x W_p^i is computed for all experts


def uoe_variant(config):
    return UoEVariant(score_of={"silu": "a", "pre": "pre", "swiglu": "h"}[config.route_score], vse=config.vse,
                      routed_includes_R=config.uoe_output == "twice" or not config.vse,
                      hidden_for_all=config.vse or config.route_score == "swiglu")


class RoutingActivations(NamedTuple):
    """The routing neurons of all experts on every token, each (N, E, R)."""
    pre: torch.Tensor          # x W_g^i[:, :R], in >= float32 (§4 precision)
    a: torch.Tensor            # SiLU(pre): the routing activations a_i
    h: torch.Tensor | None     # a_i * x W_p^i[:, :R], the routing neurons' hidden (None unless hidden_for_all)

    @property
    def hidden(self):
        """What the VSE and the chosen experts' R_i reuse: h, or a where h was not needed (R_i finishes it)."""
        return self.a if self.h is None else self.h


class UoEExpertWeights(NamedTuple):
    """What dispatch hands to UoEFFN.expert with routed_includes_R, stacked over experts: Q_i's units
    R..D-1 and the routing units' W_p and W_o (R_i). Without it, Q_i's alone, as SwiGLUWeights."""
    gate: torch.Tensor                 # W_g^i[:, R:]  (E, C, D-R)
    up: torch.Tensor                   # W_p^i[:, R:]  (E, C, D-R)
    down: torch.Tensor                 # W_o^i[R:]     (E, D-R, C)
    routing_up: torch.Tensor           # W_p^i[:, :R]  (E, C, R)
    routing_down: torch.Tensor         # W_o^i[:R]     (E, R, C)


class UoEFFN(nn.Module):
    """§3 Union-of-Experts. Hidden units [0, R) of every expert are its routing neurons:
    all experts compute them for every token (one dense matmul); their activation intensity
    ||a_i|| is the routing score; the top-K experts compute their remaining units [R, D).
    The routing neurons of all experts together form the virtual shared expert (VSE).
    The ablation switches act only through self.variant (uoe_variant)."""

    def __init__(self, config):
        super().__init__()
        C, E, D = config.n_embd, config.n_expert, config.expert_hidden
        self.config, self.top_k, self.R, self.p = config, config.top_k, config.n_routing, config.route_norm
        self.variant = uoe_variant(config)
        self.aux_loss = None                   # set by forward (see MoEFFN)
        self.w_gate = nn.Parameter(torch.empty(E, C, D))
        self.w_up = nn.Parameter(torch.empty(E, C, D))
        self.w_down = nn.Parameter(torch.empty(E, D, C))

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)                                       # (N, C)
        routing = self.routing_activations(x)                      # (N, E, R) each
        scores = route_norm(getattr(routing, self.variant.score_of), self.p)   # (N, E) activation intensity
        top_s, topk_idx = scores.topk(self.top_k, dim=-1)          # (N, K)
        gates = F.softmax(top_s, dim=-1)
        hidden = routing.hidden.to(x.dtype)                        # (N, E, R) reused by the VSE and "twice"
        routed = self.chosen_experts(x, topk_idx, gates, hidden)   # sum over the chosen i of g_i Q_i(x), (N, C)
        self.aux_loss = load_balance_loss(scores, topk_idx)
        self.last_routing = {"topk_idx": topk_idx.detach(), "scores": scores.detach()}
        if not self.variant.vse:
            return routed.view(B, T, C)
        virtual_shared_expert = self.virtual_shared_expert(hidden)   # (N, C)
        self.last_routing["vse_norm"] = virtual_shared_expert.detach().norm(dim=-1)
        self.last_routing["routed_norm"] = routed.detach().norm(dim=-1)
        return (virtual_shared_expert + routed).view(B, T, C)

    def routing_neurons(self, w):
        """Stack the routing columns of all experts: (E, C, D) -> (C, E*R), one matmul for all."""
        E, C, _ = w.shape
        return w[:, :, :self.R].transpose(0, 1).reshape(C, E * self.R)

    def routing_activations(self, x):
        """x (N, C) through the routing neurons of all experts: pre, a, and h where hidden_for_all needs it."""
        E, R = self.w_gate.shape[0], self.R
        pre = routing_matmul(x, self.routing_neurons(self.w_gate)).view(-1, E, R)  # x W_g^i[:, :R], (N, E, R)
        a = F.silu(pre)                                            # routing activations a_i, >= float32
        h = None
        if self.variant.hidden_for_all:   # x W_p^i[:, :R] in >= float32 only where the score depends on it
            up_matmul = routing_matmul if self.variant.score_of == "h" else torch.matmul
            h = a * up_matmul(x, self.routing_neurons(self.w_up)).view(-1, E, R)   # (N, E, R)
        return RoutingActivations(pre, a, h)

    def chosen_experts(self, x, topk_idx, gates, hidden):
        """sum over the chosen i of g_i Q_i(x), or of g_i (R_i(x) + Q_i(x)) with routed_includes_R, which
        reuses the routing hidden units (N, E, R) computed during scoring."""
        extra = hidden if self.variant.routed_includes_R else None
        path = resolve_expert_path(self.config, x.device, compute_dtype(x))
        return dispatch(x, topk_idx, gates, self.expert, self.expert_weights(), extra=extra, path=path)

    def expert(self, x, w, h, mm):
        """Q_i(x) of one expert (its units R..D-1); with routed_includes_R plus R_i(x), from the
        routing hidden h computed during scoring (a_i*xW_p if available, else a_i: finish it)."""
        y = swiglu(x, w.gate, w.up, w.down, mm=mm)                 # Q_i(x), (n, C)
        if self.variant.routed_includes_R:
            h_r = h if self.variant.hidden_for_all else h * mm(x, w.routing_up)   # (n, R)
            y = y + mm(h_r, w.routing_down)                        # + R_i(x)
        return y

    def expert_weights(self):
        """UoEExpertWeights of all experts. Slicing the stacked tensors once, rather than each expert's,
        keeps backward at one copy per tensor."""
        R = self.R
        q = (self.w_gate[:, :, R:], self.w_up[:, :, R:], self.w_down[:, R:])
        if not self.variant.routed_includes_R:
            return SwiGLUWeights(*q)
        return UoEExpertWeights(*q, routing_up=self.w_up[:, :, :R], routing_down=self.w_down[:, :R])

    def virtual_shared_expert(self, hidden):
        """VSE(x) = sum_i R_i(x): an ordinary SwiGLU of width E*R made of the routing neurons (§3);
        hidden: a_i * x W_p^i of all experts, (N, E, R)."""
        E, _, C = self.w_down.shape
        w_down_r = self.w_down[:, :self.R, :].reshape(E * self.R, C)
        return hidden.reshape(-1, E * self.R) @ w_down_r           # (N, C)


FFN_CLASSES = {"dense": DenseFFN, "moe": MoEFFN, "aoe": AoEFFN, "uoe": UoEFFN}


# -----------------------------------------------------------------------------
# The transformer block (nanoGPT's, with one of the FFNs), the GPT, and its routing statistics (§6)

class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FFN_CLASSES[config.ffn](config)
        self.mlp_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight   # weight tying
        self.reset_parameters()
        self.last_ce = self.last_aux = None

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 init: N(0, 0.02) for every matrix (stacked experts included), with the
        projections that write into the residual stream scaled by 1/sqrt(2 * n_layer). AoE's
        B_i gets std 1/sqrt(d_low), so that its gate x A_i B_i starts with the spread of a
        full-rank x W_g (with both factors at 0.02 it would start ~sqrt(d_low)/50 as wide, §2)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                (torch.nn.init.ones_ if name.endswith("weight") else torch.nn.init.zeros_)(p)
            elif name.endswith(("c_proj.weight", "w_down", "shared_down")):
                torch.nn.init.normal_(p, std=residual_std)
            elif name.endswith("w_gate_b"):                  # (E, d_low, D)
                torch.nn.init.normal_(p, std=1 / math.sqrt(p.shape[1]))
            else:
                torch.nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))     # (B, T, vocab_size)
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        loss, aux = ce, ce.new_zeros(())
        routed = [block.mlp for block in self.transformer.h if hasattr(block.mlp, "aux_loss")]
        if routed:   # (a dense model's loss stays ce itself: inductor in torch 2.13 drops the grad of ce + 0*zeros)
            aux = sum(m.aux_loss for m in routed)
            z = sum(getattr(m, "z_loss", 0.0) for m in routed)   # moe only
            loss = ce + self.config.aux_loss_coef * aux + self.config.z_loss_coef * z
        self.last_ce, self.last_aux = ce.detach(), aux.detach()
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None):
        """Sample max_new_tokens tokens after idx (B, T), feeding predictions back in. With
        vocab_limit, no id >= vocab_limit is sampled: the model's vocab_size may be padded past
        the tokenizer's (50304 vs GPT-2's 50257), and those ids decode to nothing."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if vocab_limit is not None:
                logits[:, vocab_limit:] = -float("inf")
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @torch.no_grad()
    def routing_summary(self):
        """Per-layer routing statistics of the last forward (§6); None for dense layers."""
        return [routing_stats(block.mlp.last_routing) if hasattr(block.mlp, "last_routing") else None
                for block in self.transformer.h]


def entropy(p, dim=-1):
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def routing_stats(r):
    """Load per expert (share of the N*K assignments), Ent_load, the confidence entropy of the
    score softmax (mean over tokens) and, for UoE, the VSE's share of the output norm."""
    E = r["scores"].size(-1)
    load = torch.bincount(r["topk_idx"].flatten(), minlength=E).double() / r["topk_idx"].numel()
    out = {"load": load.tolist(), "ent_load": entropy(load).item(),
           "max_load": load.max().item(), "min_load": load.min().item(),
           "conf_entropy": entropy(F.softmax(r["scores"].double(), dim=-1)).mean().item(),
           "vse_share": None}
    if "vse_norm" in r:
        vse, routed = r["vse_norm"].double(), r["routed_norm"].double()
        out["vse_share"] = (vse / (vse + routed).clamp_min(1e-30)).mean().item()
    return out


# -----------------------------------------------------------------------------
# Accounting (§5): parameters and forward FLOPs per token, from the config alone.
# FLOPs count matmuls only (2 per multiply-add; elementwise ops, norms and softmax are noise),
# attention over the full block_size as nanoGPT's estimate does.

def ffn_breakdown(config):
    """Per layer: total FFN params, and the per-token multiply-adds of the three kinds of
    FFN work: scoring (router / C / routing neurons), shared (dense FFN, shared experts, VSE)
    and experts (the chosen experts' own units). Each active weight is one multiply-add per
    token, except UoE 'twice' with the VSE, whose chosen experts reuse their routing hidden
    units but project them through W_o again (K*R*C more)."""
    C, E, K, D = config.n_embd, config.n_expert, config.top_k, config.expert_hidden
    if config.ffn == "dense":
        return dict(params=3 * C * D, scoring=0, shared=3 * C * D, experts=0)
    if config.ffn == "moe":
        S = config.n_shared
        return dict(params=C * E + 3 * E * C * D + 3 * S * C * D,
                    scoring=C * E, shared=3 * S * C * D, experts=3 * K * C * D)
    if config.ffn == "aoe":
        L = config.d_low
        return dict(params=E * C * L + E * L * D + 2 * E * C * D,
                    scoring=E * C * L, shared=0, experts=K * (L * D + 2 * C * D))
    R = config.n_routing
    hidden_for_all, routed_includes_R = uoe_variant(config).hidden_for_all, uoe_variant(config).routed_includes_R
    scoring = E * C * R * (2 if config.route_score == "swiglu" else 1)   # x W_g (and x W_p) of routing neurons
    shared = E * C * R * (1 if config.vse and config.route_score != "swiglu" else 0) \
        + (E * R * C if config.vse else 0)                                 # VSE's x W_p and W_o
    experts = K * 3 * C * (D - R)                                          # Q_i of the chosen
    if routed_includes_R:
        experts += K * R * C + (0 if hidden_for_all else K * C * R)        # R_i's W_o (and x W_p)
    return dict(params=3 * E * C * D, scoring=scoring, shared=shared, experts=experts)


def param_counts(config):
    """(total parameters, active parameters per token). Embeddings included (wte is tied
    to lm_head, counted once). Active = weights that touch a token in the forward pass."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    ln = C * (2 if config.bias else 1)
    attn = 4 * C * C + (4 * C if config.bias else 0)
    f = ffn_breakdown(config)
    active_ffn = f["scoring"] + f["shared"] + f["experts"]
    if config.ffn == "uoe" and config.vse and config.uoe_output == "twice":
        active_ffn -= config.top_k * config.n_routing * C   # reused W_o rows, already counted in the VSE
    base = V * C + config.block_size * C + L * (attn + 2 * ln) + ln
    return base + L * f["params"], base + L * active_ffn


def flops_breakdown(config):
    """Forward FLOPs per token by part; 'total' is their sum. A training step is ~3x."""
    C, L = config.n_embd, config.n_layer
    f = ffn_breakdown(config)
    out = dict(attention=L * (2 * 4 * C * C + 2 * 2 * config.block_size * C),
               lm_head=2 * C * config.vocab_size,
               ffn_scoring=L * 2 * f["scoring"], ffn_shared=L * 2 * f["shared"],
               ffn_experts=L * 2 * f["experts"])
    out["total"] = sum(out.values())
    return out


def flops_per_token(config):
    return flops_breakdown(config)["total"]


def match_config(config, target, by="flops", multiple_of=1):
    """config with expert_hidden D chosen so that its active FLOPs per token (by='flops') or its
    total parameters (by='params') are as close as possible to target's, among the multiples of
    `multiple_of` (e.g. 64 for aligned bf16 GEMMs on a GPU; the rest of the mismatch is then
    up to one step of it). UoE keeps its fraction of routing neurons n_routing / D."""
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of!r} is invalid: it must be an integer >= 1")
    metric = {"flops": flops_per_token, "params": lambda c: param_counts(c)[0]}[by]
    goal, frac = metric(target), config.n_routing / config.expert_hidden

    def at(units):                        # D = units * multiple_of
        D = units * multiple_of
        return replace(config, expert_hidden=D, n_routing=min(D - 1, max(1, round(D * frac))))

    lo = hi = math.ceil(2 / multiple_of)  # the smallest D >= 2 (UoE needs a unit besides its routing ones)
    while metric(at(hi)) < goal:          # metric grows with D: bracket, then bisect
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if metric(at(mid)) < goal else (lo, mid)
    return min((at(lo), at(hi)), key=lambda c: abs(metric(c) - goal))


# -----------------------------------------------------------------------------
# Checkpoints: a plain dict, written atomically, loaded without running any pickled code.

class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line that says what to do."""


def save_checkpoint(path, ckpt):
    """Write ckpt to a temporary file in the same folder, fsync, then rename over path: a crash
    or a full disk at any instant leaves the previous checkpoint intact. Refuses non-finite
    model weights so that a diverged run never replaces the last good checkpoint."""
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to write {path}: non-finite weights in {bad[0]}")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)   # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain Python types only, so a file crafted
    to run code on load fails here and runs nothing."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; check --out_dir or train one first")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if "GLOBAL" in str(e):   # the pickle names a function or class: it could run code
            raise CheckpointError(f"{path} holds objects other than tensors and plain data (possibly "
                                  "code); refusing to load it: use only checkpoints you trust") from None
        raise CheckpointError(f"{path} is corrupt or truncated, or not a checkpoint ({type(e).__name__}); "
                              "delete it or restore a good copy") from None
    known = {f.name for f in fields(GPTConfig)}
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("config"), dict) \
            or not set(ckpt["config"]) <= known:
        raise CheckpointError(f"{path} was not written by this version of uoe (unexpected layout); "
                              "retrain with the current train.py")
    return ckpt


def model_from_checkpoint(ckpt):
    """Rebuild the GPT stored in a checkpoint dict from load_checkpoint."""
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint does not match this version of uoe ({first_line}); "
                              "retrain with the current train.py") from None
    return model


# -----------------------------------------------------------------------------
# The table `python uoe.py` prints (§5)

def report(configs):
    """A markdown table of parameters and forward FLOPs per token for named configs."""
    rows = ["| variant | D | total params | active params | fwd MFLOPs/token | scoring | shared/VSE | experts |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in configs:
        total, active = param_counts(c)
        fl = flops_breakdown(c)
        rows.append(f"| {name} | {c.expert_hidden} | {total / 1e6:.3f}M | {active / 1e6:.3f}M | "
                    f"{fl['total'] / 1e6:.2f} | {fl['ffn_scoring'] / 1e6:.2f} | "
                    f"{fl['ffn_shared'] / 1e6:.2f} | {fl['ffn_experts'] / 1e6:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    defaults = [(f, GPTConfig(ffn=f)) for f in FFN_VARIANTS]
    uoe_default = defaults[-1][1]
    print("Default GPTConfig of each variant (FFN columns: forward MFLOPs/token, all layers):\n")
    print(report(defaults))
    print("\nD chosen by match_config to match UoE's active FLOPs per token:\n")
    print(report([(f, match_config(c, uoe_default, "flops")) for f, c in defaults]))
    print("\nD chosen by match_config to match UoE's total parameters:\n")
    print(report([(f, match_config(c, uoe_default, "params")) for f, c in defaults]))
