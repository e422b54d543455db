"""
Union-of-Experts (UoE) in one file: a GPT whose feed-forward network is dense, a routed top-k MoE,
Autonomy-of-Experts (AoE) or Union-of-Experts, selected by `GPTConfig.ffn`. Section numbers (§) refer
to METHOD.md, the project's specification.

Read from the top: the model's options, what every FFN variant provides (FFN, a short base class),
then the UoE layer (UoEFFN) and its one-token form (uoe_one_token, the definition the tests hold the
layer to), then how the chosen experts run (dispatch, a readable loop shared by all routed layers), the
baselines (dense, MoE, AoE) and the registry of variants (FFN_VARIANTS), the GPT, and last the
plumbing: the grouped-GEMM speed path, accounting, config checks, checkpoints.

Shapes (METHOD.md §1, the same letters in every file): B batch, T time, C = n_embd (d), N = B*T tokens,
E = n_expert, K = top_k, D = expert_hidden, N_s = n_routing (routing neurons per expert).
"""

import math
import os
import tempfile
import warnings
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    n_routing: int | None = None  # uoe: routing neurons per expert; None -> D // E, at most D - 1 (§3)
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
            # D // E; at most D - 1, so that a lone expert (E = 1) keeps a unit besides its routing neurons
            self.n_routing = max(1, min(self.expert_hidden // self.n_expert, self.expert_hidden - 1))
        validate_config(self)     # a bad value raises one ValueError that names the field


def swiglu(x, w_gate, w_up, w_down, mm=torch.matmul):
    """FFN(x) = (SiLU(x W_g) * (x W_p)) W_o  (§1), every FFN and every expert here; mm is the matmul
    (the grouped-GEMM speed path passes its own)."""
    return mm(F.silu(mm(x, w_gate)) * mm(x, w_up), w_down)


class SwiGLUWeights(NamedTuple):
    """The three matrices of a SwiGLU FFN (§1), stacked over experts (E, ...) for dispatch."""
    gate: torch.Tensor   # W_g (C, D)
    up: torch.Tensor     # W_p (C, D)
    down: torch.Tensor   # W_o (D, C)


# -----------------------------------------------------------------------------
# What every FFN variant (--ffn) is. A variant is one class: it says here what it reads, how it starts and
# what it costs, and FFN_VARIANTS (after the layers) names it. Nothing else in the project lists variants.

# the GPTConfig fields every variant reads; each class's `options` names the ones only it reads
COMMON_OPTIONS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "ffn",
                  "expert_hidden", "expert_path")
ROUTED_OPTIONS = ("n_expert", "top_k", "aux_loss_coef")     # read by every routed variant


class FFN(nn.Module):
    """The base of every FFN variant: x (B, T, C) -> y (B, T, C). A variant sets
      routed   whether it routes tokens to experts (GPT then adds its aux_loss and summarises last_routing);
      options  the GPTConfig fields it reads beyond COMMON_OPTIONS (train.py refuses the others when set);
      init     how GPT.reset_parameters starts each of its parameters, by name: "normal" N(0, 0.02),
               "residual" N(0, 0.02 / sqrt(2 n_layer)) for weights that write into the residual stream,
               "fan_in" N(0, 1 / sqrt(shape[1])); a parameter missing here is an error, never a default;
    and defines accounting(config) (§5), label(config) and parts(x) (its pieces, for bench.py)."""
    routed = False
    options = ()
    init = {}

    @staticmethod
    def accounting(config):
        """Per layer: total FFN params ("params"), active params per token ("active"), and the per-token
        multiply-adds of the three kinds of FFN work: "scoring" (router / C_i / routing neurons), "shared"
        (dense FFN, shared experts, VSE) and "experts" (the chosen experts' own units)."""
        raise NotImplementedError

    @staticmethod
    def label(config):
        """The variant and the settings that distinguish it, e.g. 'uoe E8 K2 D256 R32' (figure legends)."""
        raise NotImplementedError

    def parts(self, x):
        """For bench.py: the layer's work after scoring, each part a callable on inputs of its own (leaves,
        so backward stops there): "experts", the chosen experts on the choice this layer makes for x (N, C),
        where it routes; "shared", its always-on part where it has one. Call under the autocast to time."""
        raise NotImplementedError

    def choice_for_timing(self, x):
        """parts' inputs: the layer's own choice for x (N, C), and gates of its shape that are leaves (their
        values do not change the work)."""
        with torch.no_grad():
            self(x.detach().unsqueeze(0))
        topk_idx = self.last_routing["topk_idx"]                                          # (N, K)
        gates = torch.full(topk_idx.shape, 1 / self.config.top_k, device=x.device, requires_grad=True)
        return topk_idx, gates


# -----------------------------------------------------------------------------
# Union-of-Experts (§3). Each expert i is a SwiGLU FFN of width D whose first N_s hidden units are
# its routing neurons; split it into those units' output R_i(x) and the rest's, Q_i(x).

class UoEFFN(FFN):
    """§3 Union-of-Experts: x (B, T, C) -> y (B, T, C).

    Which experts a token visits: every expert's routing neurons run on every token (one matmul for
    all experts); an expert's score is their activation intensity ||a_i||; the K highest win.
    How the chosen are weighted: by gates g = softmax over the K winning scores.
    The routing neurons of the experts NOT chosen still add their output R_i(x), unweighted, through
    the virtual shared expert VSE(x) = sum over all experts of R_i(x), and so they keep learning from
    every token. Default output: y = VSE(x) + sum_{i in I} g_i Q_i(x).
    Switches (GPTConfig): uoe_output="twice" (chosen experts output g_i (R_i + Q_i), R_i counted
    again), vse=False (no VSE: routing neurons only score, chosen output g_i (R_i + Q_i)),
    route_score, route_norm. uoe_one_token below is this layer for one token, written plainly.
    Leaves aux_loss (§4) and last_routing (detached tensors for statistics, §6) on itself."""
    routed = True             # GPT adds up the aux_loss of routed layers and summarises their last_routing
    options = ROUTED_OPTIONS + ("n_routing", "uoe_output", "vse", "route_score", "route_norm")
    init = dict(w_gate="normal", w_up="normal", w_down="residual")   # as one GPT-2 FFN per expert

    def __init__(self, config):
        super().__init__()
        C, E, D = config.n_embd, config.n_expert, config.expert_hidden
        self.config = config            # config.n_routing is N_s (units 0..N_s-1; GPTConfig resolves its default)
        # set by forward; here so that compiled guards never see them appear (None: no forward yet)
        self.aux_loss = self.last_routing = None
        self.w_gate = nn.Parameter(torch.empty(E, C, D))     # W_g^i, stacked over experts
        self.w_up = nn.Parameter(torch.empty(E, C, D))       # W_p^i
        self.w_down = nn.Parameter(torch.empty(E, D, C))     # W_o^i

    def forward(self, x):
        config = self.config
        B, T, C = x.shape
        x = x.reshape(-1, C)                                           # (N, C)
        # Every expert's routing neurons on every token, in float32 or wider (§4).
        pre, a = self.routing_activations(x)                           # (N, E, N_s) each: x W_g^i[:, :N_s], a_i
        # Their hidden units h_i = a_i * x W_p^i[:, :N_s], for all experts only where the VSE or the score needs them.
        h = self.routing_hidden(x, a) if self.h_for_all() else None    # (N, E, N_s)
        # The score of expert i is the activation intensity of its routing neurons; the top K are chosen.
        scores = self.activation_intensity(pre, a, h)                  # (N, E) s_i = ||a_i|| by default
        top_s, topk_idx = scores.topk(config.top_k, dim=-1)            # (N, K) I = topK(s)
        gates = F.softmax(top_s, dim=-1)                               # (N, K) g = softmax(s[I])
        self.aux_loss = load_balance_loss(scores, topk_idx)            # §4: the scores of all experts
        self.last_routing = {"topk_idx": topk_idx.detach(), "scores": scores.detach()}
        # y = VSE(x) + sum_{i in I} g_i Q_i(x): the chosen experts weighted by the gates, and the VSE
        y = self.run_choice(x, topk_idx, gates, a, h, stats=self.last_routing)
        return y.view(B, T, C)

    def run_choice(self, x, topk_idx, gates, a=None, h=None, stats=None):
        """The layer's output (N, C) for the choice topk_idx, gates (N, K), made by forward or elsewhere
        (routers.py): the chosen experts' sum_{i in I} g_i Q_i(x), each term g_i (R_i(x) + Q_i(x)) with
        uoe_output="twice" or vse=False, plus VSE(x). a, h (N, E, N_s): forward's routing activations and
        hidden units (h None where not computed for all experts); for a choice made elsewhere they are not
        given and computed here. stats: a dict (forward's last_routing) that gets the norms of the VSE's
        and of the chosen experts' outputs (§6)."""
        if a is None:
            _, a = self.routing_activations(x)
            h = self.routing_hidden(x, a) if self.h_for_all() else None
        # The experts' matmuls run in the compute dtype (bf16 under autocast): the routing tensors they
        # reuse are rounded to it here, once, the same for both expert paths.
        dtype = compute_dtype(x)
        a, h = a.to(dtype), (h.to(dtype) if h is not None else None)
        y = self.chosen_experts(x, topk_idx, gates, a, h)              # (N, C) sum_{i in I} g_i Q_i(x)
        if not self.config.vse:
            return y
        # the routing neurons of ALL experts, chosen or not, add R_i(x) unweighted
        vse = self.virtual_shared_expert(h)                            # (N, C) VSE(x) = sum_i R_i(x)
        if stats is not None:
            stats["vse_norm"], stats["routed_norm"] = vse.detach().norm(dim=-1), y.detach().norm(dim=-1)
        return vse + y

    def h_for_all(self):
        """Whether the routing hidden units h_i are computed for all experts: the VSE or the swiglu score reads them."""
        return self.config.vse or self.config.route_score == "swiglu"

    def routing_neurons(self, w):
        """The routing columns of all experts side by side: (E, C, D) -> (C, E*N_s), for one matmul."""
        E, C, _ = w.shape
        Ns = self.config.n_routing
        return w[:, :, :Ns].transpose(0, 1).reshape(C, E * Ns)

    def routing_activations(self, x):
        """x (N, C) through every expert's routing neurons: (pre, a), each (N, E, N_s): the
        pre-activations x W_g^i[:, :N_s] and the routing activations a_i = SiLU(pre), in float32 or
        wider also under bf16 autocast (routing_matmul), so that near-ties pick the float32 top-K."""
        E = self.w_gate.shape[0]
        pre = routing_matmul(x, self.routing_neurons(self.w_gate)).view(-1, E, self.config.n_routing)
        return pre, F.silu(pre)

    def routing_hidden(self, x, a):
        """The routing neurons' hidden units h_i = a_i * x W_p^i[:, :N_s] of every expert, (N, E, N_s).
        x W_p runs in float32 or wider only where the score depends on it (route_score="swiglu");
        else in the compute dtype, like every matmul that only produces output."""
        E = self.w_up.shape[0]
        matmul = routing_matmul if self.config.route_score == "swiglu" else torch.matmul
        return a * matmul(x, self.routing_neurons(self.w_up)).view(-1, E, self.config.n_routing)

    def activation_intensity(self, pre, a, h):
        """The scores s_i, (N, E): the route_norm norm of a_i (route_score="silu"), of the
        pre-activations ("pre", as AoE scores) or of the hidden units h_i ("swiglu")."""
        score_of = {"silu": a, "pre": pre, "swiglu": h}[self.config.route_score]
        return lp_norm(score_of, self.config.route_norm)

    def chosen_experts(self, x, topk_idx, gates, a, h=None):
        """sum over the chosen i of g_i Q_i(x), (N, C); with uoe_output="twice" or vse=False of
        g_i (R_i(x) + Q_i(x)). R_i(x) = h_i W_o^i[:N_s] reuses the hidden units h (N, E, N_s) where
        they were computed for all experts, else the chosen experts finish them from a (N, E, N_s).
        x (N, C); topk_idx, gates (N, K); a and h in the compute dtype. The choice may come from
        anywhere (e.g. another router): only topk_idx and gates say which experts and how much."""
        config = self.config
        if config.vse and config.uoe_output == "once":                 # R_i is in the VSE already
            return gated_experts(config, x, topk_idx, gates, swiglu_expert, self.expert_weights())
        if self.h_for_all():                                           # h_i were computed for all experts
            return gated_experts(config, x, topk_idx, gates, uoe_expert_from_h, self.expert_weights("h"), reused=h)
        # no VSE, score without h: h_i only for the chosen experts
        return gated_experts(config, x, topk_idx, gates, uoe_expert_from_a, self.expert_weights("a"), reused=a)

    def virtual_shared_expert(self, h):
        """VSE(x) = sum over ALL experts i of R_i(x) = h_i W_o^i[:N_s], unweighted (N, C): an ordinary
        SwiGLU FFN of width E*N_s made of every expert's routing neurons (§3), here one matmul on
        their hidden units h (N, E, N_s), in the compute dtype."""
        (E, _, C), Ns = self.w_down.shape, self.config.n_routing
        w_down_routing = self.w_down[:, :Ns, :].reshape(E * Ns, C)   # (E*N_s, C)
        return h.reshape(-1, E * Ns) @ w_down_routing

    def expert_weights(self, r_from=None):
        """The chosen experts' weights, stacked over experts, only those their expert function reads (the
        grouped path casts every tensor it gets): Q_i's units N_s..D-1 as SwiGLUWeights; with R_i
        finished from h_i (r_from="h") as UoEExpertWeights, which add R_i's W_o; from a_i ("a") as
        UoEExpertWeightsFromA, which add its W_p too. Slicing the stacked tensors once, rather than
        each expert's, keeps backward at one copy per tensor."""
        Ns = self.config.n_routing
        q = SwiGLUWeights(gate=self.w_gate[:, :, Ns:], up=self.w_up[:, :, Ns:], down=self.w_down[:, Ns:])
        if r_from is None:
            return q
        if r_from == "h":
            return UoEExpertWeights(*q, routing_down=self.w_down[:, :Ns])
        return UoEExpertWeightsFromA(*q, routing_up=self.w_up[:, :, :Ns], routing_down=self.w_down[:, :Ns])

    @staticmethod
    def accounting(config):
        """§5. Each active weight is one multiply-add per token, except with uoe_output="twice" and the VSE,
        whose chosen experts reuse their routing hidden units but project them through W_o again
        (K*N_s*C more multiply-adds, no more active weights)."""
        C, E, K, D, Ns = config.n_embd, config.n_expert, config.top_k, config.expert_hidden, config.n_routing
        swiglu_score = config.route_score == "swiglu"
        scoring = E * C * Ns * (2 if swiglu_score else 1)                  # x W_g (and x W_p) of routing neurons
        shared = 0
        if config.vse:                                                     # VSE's x W_p (unless scoring ran it), W_o
            shared = (0 if swiglu_score else E * C * Ns) + E * Ns * C
        experts = K * 3 * C * (D - Ns)                                     # Q_i of the chosen
        reused = 0
        if config.uoe_output == "twice" or not config.vse:                 # + R_i of the chosen: its W_o,
            h_for_all = config.vse or swiglu_score                         # and x W_p unless h was computed for all
            experts += K * Ns * C + (0 if h_for_all else K * C * Ns)
            reused = K * Ns * C if config.vse else 0                       # W_o rows the VSE counted already
        return dict(params=3 * E * C * D, active=scoring + shared + experts - reused,
                    scoring=scoring, shared=shared, experts=experts)

    @staticmethod
    def label(config):
        s = f"uoe E{config.n_expert} K{config.top_k} D{config.expert_hidden} R{config.n_routing}"
        s += "" if config.vse else " noVSE"
        s += " twice" if config.uoe_output == "twice" else ""
        return s + ("" if config.route_score == "silu" else f" {config.route_score}")

    def parts(self, x):
        """"experts": the chosen experts (Q_i, or R_i + Q_i) on the layer's own choice, from the routing
        tensors forward would hand them; "shared": the VSE beyond scoring (h_i = a_i * x W_p^i, their W_o)."""
        topk_idx, gates = self.choice_for_timing(x)
        with torch.no_grad():
            _, a = self.routing_activations(x)                               # (N, E, N_s), float32
            h = self.routing_hidden(x, a) if self.h_for_all() else None
        dtype = compute_dtype(x)                                             # as run_choice casts them
        a_c, h_c = (None if t is None else t.detach().to(dtype).requires_grad_() for t in (a, h))
        parts = {"experts": lambda: self.chosen_experts(x, topk_idx, gates, a_c, h_c)}
        if self.config.vse:
            a = a.detach().requires_grad_()
            parts["shared"] = lambda: self.virtual_shared_expert(self.routing_hidden(x, a))
        return parts


class UoEExpertWeights(NamedTuple):
    """What a chosen UoE expert computes R_i(x) + Q_i(x) with when its routing hidden units h_i come in
    computed, each stacked over experts (dispatch hands the expert functions one expert's, or all for the
    grouped path): Q_i's units N_s..D-1 and R_i's W_o. (R_i's W_g and W_p acted where h_i was made.)"""
    gate: torch.Tensor            # W_g^i[:, N_s:]  (E, C, D-N_s)
    up: torch.Tensor              # W_p^i[:, N_s:]  (E, C, D-N_s)
    down: torch.Tensor            # W_o^i[N_s:]     (E, D-N_s, C)
    routing_down: torch.Tensor    # W_o^i[:N_s]     (E, N_s, C)


class UoEExpertWeightsFromA(NamedTuple):
    """The same when only the routing activations a_i come in computed (no VSE, a score without h_i):
    R_i's W_p too, for h_i = a_i * x W_p^i[:, :N_s]. (R_i's W_g columns act in scoring only.)"""
    gate: torch.Tensor            # W_g^i[:, N_s:]  (E, C, D-N_s)
    up: torch.Tensor              # W_p^i[:, N_s:]  (E, C, D-N_s)
    down: torch.Tensor            # W_o^i[N_s:]     (E, D-N_s, C)
    routing_up: torch.Tensor      # W_p^i[:, :N_s]  (E, C, N_s)
    routing_down: torch.Tensor    # W_o^i[:N_s]     (E, N_s, C)


# The expert functions that dispatch runs, each on one expert's tokens x (n, C) with its weights w;
# the third argument is what scoring computed for those (token, expert) pairs; mm is the matmul.

def swiglu_expert(x, w, _, mm):
    """FFN_i(x) of an MoE expert, or Q_i(x) of a UoE expert (its units N_s..D-1)."""
    return swiglu(x, w.gate, w.up, w.down, mm=mm)


def uoe_expert_from_h(x, w, h, mm):
    """R_i(x) + Q_i(x) of a chosen UoE expert, R_i from its routing hidden units h (n, N_s); w: UoEExpertWeights."""
    return swiglu(x, w.gate, w.up, w.down, mm=mm) + mm(h, w.routing_down)


def uoe_expert_from_a(x, w, a, mm):
    """R_i(x) + Q_i(x) of a chosen UoE expert, finishing h_i = a_i * x W_p^i[:, :N_s] from a (n, N_s);
    w: UoEExpertWeightsFromA."""
    return uoe_expert_from_h(x, w, a * mm(x, w.routing_up), mm)


def uoe_one_token(layer, x):
    """§3 for ONE token x (C,), one expert at a time, no batching: what UoEFFN computes for each token.
    layer: a UoEFFN (its weights and config). tests/test_uoe.py holds the batched layer, with its
    gradients, to this function for every switch."""
    c, Wg, Wp, Wo = layer.config, layer.w_gate, layer.w_up, layer.w_down
    E, Ns = c.n_expert, c.n_routing
    pre = [x @ Wg[i, :, :Ns] for i in range(E)]                          # routing pre-activations
    a = [F.silu(pre[i]) for i in range(E)]                               # routing activations a_i
    h = [a[i] * (x @ Wp[i, :, :Ns]) for i in range(E)]                   # routing hidden units
    R = [h[i] @ Wo[i, :Ns] for i in range(E)]                            # R_i(x): the routing neurons' output
    Q = [swiglu(x, Wg[i, :, Ns:], Wp[i, :, Ns:], Wo[i, Ns:]) for i in range(E)]   # Q_i(x): the other units
    score_of = {"silu": a, "pre": pre, "swiglu": h}[c.route_score]
    p = math.inf if c.route_norm == "inf" else c.route_norm
    s = torch.stack([torch.linalg.vector_norm(v, ord=p) for v in score_of])   # s_i, activation intensity
    chosen = s.topk(c.top_k).indices                                     # I = topK(s)
    g = F.softmax(s[chosen], dim=0)                                      # gates
    if c.vse and c.uoe_output == "once":
        return sum(R) + sum(g[j] * Q[i] for j, i in enumerate(chosen))   # VSE(x) + sum_{i in I} g_i Q_i(x)
    routed = sum(g[j] * (R[i] + Q[i]) for j, i in enumerate(chosen))     # sum_{i in I} g_i (R_i(x) + Q_i(x))
    return sum(R) + routed if c.vse else routed


# -----------------------------------------------------------------------------
# What every routed layer shares: scoring in float32, the load-balance loss, and the dispatch that
# runs each token through its K chosen experts.

def routing_matmul(x, w):
    """x @ w for routing scores, in at least float32 even under autocast (which would run it in
    bfloat16 and round the result: near-ties would then flip the top-k). Upcasting the product
    afterwards is too late. On CUDA with TF32 allowed (train.py allows it) "float32" means TF32."""
    with torch.autocast(x.device.type, enabled=False):
        return upcast(x) @ upcast(w)


def upcast(t):
    """t in at least float32 (float16/bfloat16 -> float32; float32/float64 unchanged)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def lp_norm(v, p):
    """||v||_p over the last dim, p in {2, 1, "inf"} (GPTConfig.route_norm): the activation intensity."""
    return torch.linalg.vector_norm(v, ord=math.inf if p == "inf" else p, dim=-1)


def compute_dtype(x):
    """The dtype x's matmuls run in: autocast's where autocast is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def load_balance_loss(scores, topk_idx):
    """Switch-style L_aux = n * sum_i f_i P_i of one layer (§4); equals 1 at perfect balance.
    scores: (N, E) router logits or norms; topk_idx: (N, K). GPT.forward adds up the layers', so the
    logged aux loss (train.py's "aux") is n_layer at perfect balance, not 1."""
    E = scores.size(-1)
    ones = torch.ones(topk_idx.numel(), dtype=scores.dtype, device=scores.device)
    # index_add_, not bincount: no graph break under torch.compile
    f = scores.new_zeros(E).index_add_(0, topk_idx.flatten(), ones) / topk_idx.numel()   # (E,)
    P = F.softmax(scores, dim=-1).mean(dim=0)                                             # (E,)
    return E * (f * P).sum()


def dispatch(x, topk_idx, expert_fn, weights, reused=None, path="loop"):
    """Run every token through its K chosen experts: dropless, no capacity, no loop over tokens.
    Returns (N, K, C): row [t, k] is expert topk_idx[t, k]'s output on token t, not yet gated (the
    layer weights and sums them).

    x: (N, C); topk_idx: (N, K); expert_fn(x, w, reused, mm) computes one expert on its tokens
    (one expert's weights w in the loop, all experts' on the grouped path, with mm the matmul);
    weights: a NamedTuple of expert-stacked (E, ...) tensors; reused: optional (N, E, X) tensor
    that scoring computed for every (token, expert) and the experts reuse (AoE's C_i, UoE's a or h).
    path: "loop", the readable reference below, or "grouped", the same maths with one grouped GEMM
    per matmul (dispatch_grouped, the speed path); resolve_expert_path chooses."""
    run = dispatch_grouped if path == "grouped" else dispatch_loop
    return run(x, topk_idx, expert_fn, weights, reused)


def gated_experts(config, x, topk_idx, gates, expert_fn, weights, reused=None):
    """sum over the K chosen experts of g_k times expert k's output, (N, C): what every routed layer's
    chosen_experts returns. dispatch (arguments as there) on the path that resolve_expert_path picks for
    config, x's device and compute dtype, then the gates (N, K) in the experts' output dtype."""
    path = resolve_expert_path(config, x.device, compute_dtype(x))
    out = dispatch(x, topk_idx, expert_fn, weights, reused=reused, path=path)   # (N, K, C), not yet gated
    return (gates.unsqueeze(-1).to(out.dtype) * out).sum(dim=1)


# Under torch.compile the loop runs eagerly (one graph break per layer, as its .tolist() would
# cause anyway): its block sizes are data, and dynamo, which specialises sizes 0 and 1, would
# recompile whenever a new set of experts gets 0 or 1 tokens, and fall back to eager after 8.
@torch.compiler.disable
def dispatch_loop(x, topk_idx, expert_fn, weights, reused=None):
    """The reference (Mixtral-style): sort the N*K (token, expert) assignments by expert, so that each
    expert sees one contiguous block of its tokens, run the experts one at a time, unsort.

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
    reused_e = [None] * E if reused is None else reused[token, flat_expert[order]].split(counts)   # (n_e, X)
    weights_e = [type(weights)(*one) for one in zip(*(w.unbind(0) for w in weights))]   # E: each expert's
    y_sorted = torch.cat([expert_fn(x_e[e], weights_e[e], reused_e[e], torch.matmul) for e in range(E)])
    return y_sorted[order.argsort()].view(N, K, -1)              # (N, K, C) back in (token, slot) order


# -----------------------------------------------------------------------------
# The baselines (§2): DenseFFN, MoEFFN, AoEFFN. Each takes x (B, T, C) and returns y (B, T, C); the
# routed ones (`routed = True`) also leave `aux_loss` (§4) and `last_routing` (detached tensors, §6) on themselves.

class DenseFFN(FFN):
    """§2 dense: one SwiGLU FFN of width D."""
    init = dict(w_gate="normal", w_up="normal", w_down="residual")

    def __init__(self, config):
        super().__init__()
        C, D = config.n_embd, config.expert_hidden
        self.w_gate = nn.Parameter(torch.empty(C, D))
        self.w_up = nn.Parameter(torch.empty(C, D))
        self.w_down = nn.Parameter(torch.empty(D, C))

    def forward(self, x):
        return swiglu(x, self.w_gate, self.w_up, self.w_down)

    @staticmethod
    def accounting(config):
        C, D = config.n_embd, config.expert_hidden
        return dict(params=3 * C * D, active=3 * C * D, scoring=0, shared=3 * C * D, experts=0)

    @staticmethod
    def label(config):
        return f"dense D{config.expert_hidden}"

    def parts(self, x):
        """All of a dense FFN is always-on."""
        return {"shared": lambda: self(x)}


class MoEFFN(FFN):
    """§2 moe: router W_r, p = softmax(x W_r), top-K, gates p[I] / sum p[I] (Mixtral), plus
    n_shared always-on shared experts (DeepSeekMoE), stored as one SwiGLU of width n_shared*D."""
    routed = True
    options = ROUTED_OPTIONS + ("n_shared", "z_loss_coef")
    init = dict(router="normal", w_gate="normal", w_up="normal", w_down="residual",
                shared_gate="normal", shared_up="normal", shared_down="residual")

    def __init__(self, config):
        super().__init__()
        C, E, D, S = config.n_embd, config.n_expert, config.expert_hidden, config.n_shared
        self.config = config
        self.aux_loss = self.z_loss = self.last_routing = None     # set by forward (see UoEFFN)
        self.router = nn.Parameter(torch.empty(C, E))
        self.w_gate = nn.Parameter(torch.empty(E, C, D))
        self.w_up = nn.Parameter(torch.empty(E, C, D))
        self.w_down = nn.Parameter(torch.empty(E, D, C))
        if S:
            self.shared_gate = nn.Parameter(torch.empty(C, S * D))
            self.shared_up = nn.Parameter(torch.empty(C, S * D))
            self.shared_down = nn.Parameter(torch.empty(S * D, C))

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)                                       # (N, C)
        logits = routing_matmul(x, self.router)                    # (N, E) router logits, >= float32
        top_p, topk_idx = F.softmax(logits, dim=-1).topk(self.config.top_k, dim=-1)   # (N, K)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)            # renormalised over the K
        y = self.run_choice(x, topk_idx, gates)                    # (N, C)
        self.aux_loss = load_balance_loss(logits, topk_idx)
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()  # keeps router logits small
        self.last_routing = {"topk_idx": topk_idx.detach(), "scores": logits.detach()}
        return y.view(B, T, C)

    def run_choice(self, x, topk_idx, gates):
        """The layer's output (N, C) for the choice topk_idx, gates (N, K), made by forward or elsewhere
        (routers.py): sum_{i in I} g_i FFN_i(x), plus the n_shared always-on experts."""
        y = self.chosen_experts(x, topk_idx, gates)
        if self.config.n_shared:
            y = y + self.shared_experts(x)
        return y

    def chosen_experts(self, x, topk_idx, gates):
        """sum over the chosen i of g_i FFN_i(x), (N, C), without the shared experts; x (N, C),
        topk_idx and gates (N, K), which may come from another router than this layer's."""
        weights = SwiGLUWeights(self.w_gate, self.w_up, self.w_down)
        return gated_experts(self.config, x, topk_idx, gates, swiglu_expert, weights)

    def shared_experts(self, x):
        """The n_shared always-on experts, unweighted, (N, C); only when n_shared > 0."""
        return swiglu(x, self.shared_gate, self.shared_up, self.shared_down)

    @staticmethod
    def accounting(config):
        C, E, K, D, S = config.n_embd, config.n_expert, config.top_k, config.expert_hidden, config.n_shared
        scoring, shared, experts = C * E, 3 * S * C * D, 3 * K * C * D
        return dict(params=C * E + 3 * E * C * D + 3 * S * C * D, active=scoring + shared + experts,
                    scoring=scoring, shared=shared, experts=experts)

    @staticmethod
    def label(config):
        s = f"moe E{config.n_expert} K{config.top_k} D{config.expert_hidden}"
        return s + (f" S{config.n_shared}" if config.n_shared else "")

    def parts(self, x):
        """"experts": the chosen experts on the router's choice; "shared": the shared experts, if any."""
        topk_idx, gates = self.choice_for_timing(x)
        parts = {"experts": lambda: self.chosen_experts(x, topk_idx, gates)}
        if self.config.n_shared:
            parts["shared"] = lambda: self.shared_experts(x)
        return parts


class AoEWeights(NamedTuple):
    """What a chosen AoE expert computes with, stacked over experts (C_i = x A_i comes in computed)."""
    gate_b: torch.Tensor   # B_i  (E, d_low, D)
    up: torch.Tensor       # W_p^i (E, C, D)
    down: torch.Tensor     # W_o^i (E, D, C)


def aoe_expert(x, w, c, mm):
    """FFN_i(x) of a chosen AoE expert, (SiLU(C_i B_i) * x W_p^i) W_o^i, reusing C_i = x A_i (n, d_low)."""
    return mm(F.silu(mm(c, w.gate_b)) * mm(x, w.up), w.down)


class AoEFFN(FFN):
    """§2 aoe: no router. W_g^i = A_i B_i is factorised (w_gate_a, w_gate_b); one matmul gives
    C_i = x A_i for all experts, the score is ||C_i||, gates softmax over the top K, and the
    chosen experts reuse C_i."""
    routed = True
    options = ROUTED_OPTIONS + ("d_low", "route_norm")
    # B_i at 1/sqrt(d_low): x A_i B_i then starts as wide as a full-rank x W_g at 0.02 (§2)
    init = dict(w_gate_a="normal", w_gate_b="fan_in", w_up="normal", w_down="residual")

    def __init__(self, config):
        super().__init__()
        C, E, D, L = config.n_embd, config.n_expert, config.expert_hidden, config.d_low
        self.config = config
        self.aux_loss = self.last_routing = None                   # set by forward (see UoEFFN)
        self.w_gate_a = nn.Parameter(torch.empty(E, C, L))     # A_i: d x d_low
        self.w_gate_b = nn.Parameter(torch.empty(E, L, D))     # B_i: d_low x D
        self.w_up = nn.Parameter(torch.empty(E, C, D))         # W_p^i
        self.w_down = nn.Parameter(torch.empty(E, D, C))       # W_o^i

    def forward(self, x):
        B, T, C = x.shape
        E, L = self.w_gate_a.shape[0], self.w_gate_a.shape[2]
        x = x.reshape(-1, C)                                       # (N, C)
        c = routing_matmul(x, self.w_gate_a.transpose(0, 1).reshape(C, E * L)).view(-1, E, L)  # (N, E, L)
        scores = lp_norm(c, self.config.route_norm)                # (N, E), >= float32
        top_s, topk_idx = scores.topk(self.config.top_k, dim=-1)   # (N, K)
        gates = F.softmax(top_s, dim=-1)
        y = self.chosen_experts(x, topk_idx, gates, c.to(compute_dtype(x)))   # the chosen experts reuse C_i
        self.aux_loss = load_balance_loss(scores, topk_idx)
        self.last_routing = {"topk_idx": topk_idx.detach(), "scores": scores.detach()}
        return y.view(B, T, C)

    def chosen_experts(self, x, topk_idx, gates, c):
        """sum over the chosen i of g_i FFN_i(x), (N, C); c (N, E, d_low): C_i of every expert."""
        weights = AoEWeights(self.w_gate_b, self.w_up, self.w_down)
        return gated_experts(self.config, x, topk_idx, gates, aoe_expert, weights, reused=c)

    @staticmethod
    def accounting(config):
        C, E, K, D, L = config.n_embd, config.n_expert, config.top_k, config.expert_hidden, config.d_low
        scoring, experts = E * C * L, K * (L * D + 2 * C * D)
        return dict(params=E * C * L + E * L * D + 2 * E * C * D, active=scoring + experts,
                    scoring=scoring, shared=0, experts=experts)

    @staticmethod
    def label(config):
        return f"aoe E{config.n_expert} K{config.top_k} D{config.expert_hidden} L{config.d_low}"

    def parts(self, x):
        """"experts": the chosen experts on the layer's choice, from C_i of the right shape (any values)."""
        topk_idx, gates = self.choice_for_timing(x)
        c = torch.randn(x.shape[0], self.config.n_expert, self.config.d_low, device=x.device,
                        dtype=compute_dtype(x), requires_grad=True)                  # (N, E, d_low)
        return {"experts": lambda: self.chosen_experts(x, topk_idx, gates, c)}


# The registry: --ffn=<name> -> its class. Adding a variant is its class above and one entry here.
FFN_VARIANTS = {"dense": DenseFFN, "moe": MoEFFN, "aoe": AoEFFN, "uoe": UoEFFN}


def ffn_class(name):
    """The FFN class registered as `name`; ValueError for any other name (never a fallback)."""
    if name not in FFN_VARIANTS:
        raise ValueError(f"unknown ffn {name!r}: the registered variants are {', '.join(FFN_VARIANTS)}")
    return FFN_VARIANTS[name]


def ffn_label(config):
    """'uoe E8 K2 D256 R32': config's variant and the settings that distinguish it."""
    return ffn_class(config.ffn).label(config)


def unread_options(config, given):
    """The options in `given` (name -> value, set explicitly by a user) that config's variant does not read
    and that differ from what config would have without them: set, they would change nothing, silently."""
    reads = COMMON_OPTIONS + ffn_class(config.ffn).options
    plain = GPTConfig(**{f: getattr(config, f) for f in reads})       # the unread fields at their defaults
    return [k for k, v in given.items()
            if hasattr(plain, k) and k not in reads and v != getattr(plain, k)]


# -----------------------------------------------------------------------------
# The GPT (nanoGPT's, with one of the FFNs in each block) and its routing statistics (§6)

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


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = ffn_class(config.ffn)(config)
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
        """GPT-2 init, overwriting whatever the modules' __init__ put there, in the order of
        named_parameters (the order the RNG is drawn in). An FFN's parameters start as its class's `init`
        table says (next to the layer; a parameter missing there is an error). The rest: LayerNorm scales
        1 and biases 0; c_proj.weight (writes into the residual stream) N(0, 0.02 / sqrt(2 * n_layer));
        every other matrix and the embeddings N(0, 0.02)."""
        std = {"normal": lambda p: 0.02, "residual": lambda p: 0.02 / math.sqrt(2 * self.config.n_layer),
               "fan_in": lambda p: 1 / math.sqrt(p.shape[1])}
        for name, p in self.named_parameters():
            owner_name, _, short = name.rpartition(".")
            owner = self.get_submodule(owner_name)
            if isinstance(owner, FFN):
                if short not in owner.init:
                    raise ValueError(f"{type(owner).__name__}.{short} has no entry in {type(owner).__name__}.init: "
                                     "say there how it starts")
                rule = owner.init[short]
            elif p.dim() == 1:
                (torch.nn.init.ones_ if short == "weight" else torch.nn.init.zeros_)(p)
                continue
            else:
                rule = "residual" if name.endswith("c_proj.weight") else "normal"
            torch.nn.init.normal_(p, std=std[rule](p))

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
        routed = [block.mlp for block in self.transformer.h if block.mlp.routed]
        if routed:   # (a dense model's loss stays ce itself: inductor in torch 2.13 drops the grad of ce + 0*zeros)
            aux = sum(m.aux_loss for m in routed)        # the SUM over layers: n_layer at perfect balance
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
        """Per-layer routing statistics of the last forward (§6); None for dense layers, and for every
        layer before the first forward."""
        mlps = [block.mlp for block in self.transformer.h]
        return [routing_stats(m.last_routing) if m.routed and m.last_routing is not None else None for m in mlps]


def entropy(p, dim=-1):
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def routing_stats(r):
    """Load per expert (share of the N*K assignments), Ent_load, the confidence entropy of the
    score softmax (mean over tokens) and, for UoE, the VSE's share of the output norm. Computed in
    float64 on the CPU (MPS has no float64; these are small tensors, read once per log step)."""
    r = {k: v.cpu() for k, v in r.items()}
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
# The speed path: the same dispatch with one grouped GEMM per matmul for all experts at once
# (torch's grouped_mm), beside the readable loop above. GPTConfig.expert_path chooses (§7).

def resolve_expert_path(config, device, dtype):
    """The expert path, "loop" or "grouped", that a routed layer of `config` takes on `device` when
    its matmuls run in `dtype`.
    "auto" is "grouped" where torch's grouped GEMM is fast and correct: CUDA compute capability 9.x
    (H100/H200), bfloat16, widths whose rows start on 16-byte boundaries; else "loop". Not on 10.x
    (B200): there grouped_mm gives non-zero weight gradients to experts that got no tokens (PyTorch
    issue #172439, open), so "auto" stays on the loop; an explicit "grouped" there runs, with a
    warning. An explicit "grouped" with misaligned widths raises ValueError naming the field.
    Without torch.compile, float32 grouped GEMMs on CUDA take a fallback that copies the offsets to
    the host on every call (a sync per matmul); under torch.compile grouped_mm needs bfloat16 (its
    tracing rule has no other dtype)."""
    device = torch.device(device)
    if config.expert_path == "loop" or not ffn_class(config.ffn).routed:   # no routed layer to group
        return "loop"
    align = 16 // dtype.itemsize
    misaligned = {k: v for k, v in expert_widths(config).items() if v % align}
    major = torch.cuda.get_device_properties(device).major if device.type == "cuda" else None
    if config.expert_path == "grouped":
        if misaligned:
            raise ValueError(f"GPTConfig.expert_path='grouped' needs widths that are multiples of {align} "
                             f"for {dtype} (16 bytes); these are not: {misaligned}. Use 'auto' or 'loop'")
        if major == 10 and not torch.compiler.is_compiling():
            warnings.warn("expert_path='grouped' on compute capability 10.x: torch's grouped_mm gives experts "
                          "that got no tokens non-zero weight gradients there (PyTorch issue #172439); "
                          "use 'auto' or 'loop' for training", stacklevel=2)
        return "grouped"
    if GROUPED_MM is not None and major == 9 and dtype == torch.bfloat16 and not misaligned:
        return "grouped"
    return "loop"


def expert_widths(config):
    """The widths of the matrices the grouped GEMMs read row by row; each row must start on a
    16-byte boundary (a multiple of 8 bfloat16 or 4 float32 values)."""
    widths = {"n_embd": config.n_embd, "expert_hidden": config.expert_hidden}
    if config.ffn == "aoe":
        widths["d_low"] = config.d_low
    if config.ffn == "uoe":
        widths["expert_hidden - n_routing"] = config.expert_hidden - config.n_routing
        widths["n_routing"] = config.n_routing   # R_i's matrices ("twice", no VSE); checked for every switch
    return widths


def dispatch_grouped(x, topk_idx, expert_fn, weights, reused=None):
    """dispatch's fast path: the same sort by expert, then expert_fn runs ONCE on all N*K sorted rows
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
    reused_sorted = None if reused is None else reused[token, sorted_expert].to(dtype)   # (N*K, X)
    weights = type(weights)(*(w.to(dtype).contiguous() for w in weights))   # (E, X, Y) each, aligned rows
    y_sorted = expert_fn(x_sorted, weights, reused_sorted, mm)   # (N*K, C)
    return y_sorted[order.argsort()].view(N, K, -1)              # (N, K, C) back in (token, slot) order


# -----------------------------------------------------------------------------
# Accounting (§5): parameters and forward FLOPs per token, from the config alone.
# FLOPs count matmuls only (2 per multiply-add; elementwise ops, norms and softmax are noise),
# attention over the full block_size as nanoGPT's estimate does.

def ffn_breakdown(config):
    """Per layer: the FFN's params, active params and per-token multiply-adds by kind, as its class
    accounts them (FFN.accounting)."""
    return ffn_class(config.ffn).accounting(config)


def param_counts(config):
    """(total parameters, active parameters per token). Embeddings included (wte is tied
    to lm_head, counted once). Active = weights that touch a token in the forward pass."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    ln = C * (2 if config.bias else 1)
    attn = 4 * C * C + (4 * C if config.bias else 0)
    f = ffn_breakdown(config)
    base = V * C + config.block_size * C + L * (attn + 2 * ln) + ln
    return base + L * f["params"], base + L * f["active"]


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
    up to one step of it). UoE keeps its fraction of routing neurons n_routing / D; the other variants,
    which do not read n_routing, get its default for their D (so no option they ignore is set)."""
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of!r} is invalid: it must be an integer >= 1")
    metric = {"flops": flops_per_token, "params": lambda c: param_counts(c)[0]}[by]
    goal, frac = metric(target), config.n_routing / config.expert_hidden

    def at(units):                        # D = units * multiple_of
        D = units * multiple_of
        if config.ffn != "uoe":           # n_routing is UoE's: the others keep its default for their D
            return replace(config, expert_hidden=D, n_routing=None)
        return replace(config, expert_hidden=D, n_routing=min(D - 1, max(1, round(D * frac))))

    lo = hi = math.ceil(2 / multiple_of)  # the smallest D >= 2 (UoE needs a unit besides its routing ones)
    while metric(at(hi)) < goal:          # metric grows with D: bracket, then bisect
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if metric(at(mid)) < goal else (lo, mid)
    return min((at(lo), at(hi)), key=lambda c: abs(metric(c) - goal))


# -----------------------------------------------------------------------------
# Config checks: every GPTConfig is validated when it is made.

def validate_config(config):
    """Raise ValueError naming the first invalid field of a GPTConfig and what it must be."""
    def bad(field, allowed):
        raise ValueError(f"GPTConfig.{field}={getattr(config, field)!r} is invalid: {allowed}")
    for f in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_expert", "expert_hidden"):
        if not isinstance(getattr(config, f), int) or getattr(config, f) < 1:
            bad(f, "it must be an integer >= 1")
    if config.ffn not in FFN_VARIANTS:
        bad("ffn", f"it must be one of {', '.join(FFN_VARIANTS)}")
    if config.n_embd % config.n_head != 0:
        bad("n_embd", f"it must be divisible by n_head={config.n_head}")
    if not 0.0 <= config.dropout < 1.0:
        bad("dropout", "it must be in [0, 1)")
    if not isinstance(config.top_k, int) or not 1 <= config.top_k <= config.n_expert:
        bad("top_k", f"it must be an integer in 1..n_expert={config.n_expert}")
    # a variant's own widths only: dense with expert_hidden=1 is fine, though no uoe could have that D
    if config.ffn == "uoe" and config.expert_hidden < 2:
        bad("expert_hidden", "uoe needs at least 2 (a routing neuron and a unit besides it)")
    if config.ffn == "uoe" and (not isinstance(config.n_routing, int)
                                or not 1 <= config.n_routing <= config.expert_hidden - 1):
        bad("n_routing", f"it must be an integer in 1..expert_hidden-1={config.expert_hidden - 1}")
    if config.ffn == "aoe" and (not isinstance(config.d_low, int) or config.d_low < 1):
        bad("d_low", "it must be an integer >= 1")
    if not isinstance(config.n_shared, int) or config.n_shared < 0:
        bad("n_shared", "it must be an integer >= 0")
    if config.uoe_output not in ("once", "twice"):
        bad("uoe_output", "it must be 'once' or 'twice'")
    if config.route_score not in ("silu", "pre", "swiglu"):
        bad("route_score", "it must be 'silu', 'pre' or 'swiglu'")
    if config.route_norm not in (1, 2, "inf"):
        bad("route_norm", "it must be 2, 1 or 'inf'")
    for f in ("aux_loss_coef", "z_loss_coef"):
        if getattr(config, f) < 0:
            bad(f, "it must be >= 0")
    if config.expert_path not in EXPERT_PATHS:
        bad("expert_path", "it must be 'auto', 'loop' or 'grouped'")
    if config.expert_path == "grouped" and GROUPED_MM is None:
        bad("expert_path", f"'grouped' needs torch's grouped_mm, which torch {torch.__version__} lacks "
                           "(use 'auto' or 'loop', or a newer torch)")


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


def model_from_checkpoint(ckpt, expert_path="auto"):
    """Rebuild the GPT stored in a checkpoint dict from load_checkpoint. The stored expert_path says how
    the experts ran where it was trained (maybe 'grouped' on a GPU); both paths compute the same model,
    so it runs here on expert_path ('auto': the path this device and torch can take)."""
    try:
        model = GPT(GPTConfig(**{**ckpt["config"], "expert_path": expert_path}))
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


def main():
    uoe_default = GPTConfig(ffn="uoe")            # every table is matched to the default UoE
    defaults = [(f, GPTConfig(ffn=f)) for f in FFN_VARIANTS]
    print("Default GPTConfig of each variant (FFN columns: forward MFLOPs/token, all layers):\n")
    print(report(defaults))
    print("\nD chosen by match_config to match UoE's active FLOPs per token:\n")
    print(report([(f, match_config(c, uoe_default, "flops")) for f, c in defaults]))
    print("\nD chosen by match_config to match UoE's total parameters:\n")
    print(report([(f, match_config(c, uoe_default, "params")) for f, c in defaults]), flush=True)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:                # `python uoe.py | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)   # no second error when Python flushes stdout at exit
        raise SystemExit(141) from None
