"""
Are a trained MoE's neurons secretly routers? The paper's title, measured on your own checkpoints.

    python routers.py out-moe                               # table; routers.json and routers.png into out-moe/
    python routers.py out-moe out-uoe --out_dir=assets      # several runs: one table each, one JSON, one figure
    python routers.py out-moe --val_tokens=16384 --device=cuda

Options are train.py's: --key=value (Python literals; strings may be bare); the run folders (train.py's
--out_dir: ckpt.pt, run.json, metrics.jsonl) come first, without a dash. moe and uoe checkpoints.

The activation intensity of expert i on token x over a set U of its hidden units is ||SiLU(x W_g^i)[U]||_2
(METHOD.md §1, §3), computed for every expert on every token. Per layer, on validation tokens of the run's
dataset (sequences at evenly spaced offsets, the model's block_size long), routed as the model routes them:
- agreement: each expert's intensity over U against the model's own routing scores (moe: router logits;
  uoe: its routing score): top-K overlap, |topK(intensity) & topK(scores)| / K, whose chance level for a
  random choice is K/E; and Spearman's rank correlation of the E intensities with the E scores per token
  (chance 0). Means over tokens.
- routing without the router: the validation loss when the layer (each in turn, then every layer at once)
  chooses its top K experts by an intensity instead of its own scores, with UoE's gates softmax(s[I]) over
  the chosen intensities s; next to the model's own loss and a random choice (K experts uniformly at random
  per token, gated by the softmax of their reference intensity: moe all D units, uoe its own routing score).
  Everything else in the layer (uoe's virtual shared expert, moe's shared experts) runs as in the model.
- uoe only: how concentrated each expert's score is in its strongest routing neurons: the share of the
  expert's sum of a_ij^2 over validation tokens (its squared intensity, SiLU scores) that comes from its
  top 10% / 25% routing units (k = round(share * R)), those with the largest mean a_ij^2 on training tokens
  (uniform: k / R).
The unit sets U:
- all: all D hidden units of the expert;
- best: the R units (R = the checkpoint's n_routing, UoE's default D // E for an MoE; --n_units) whose
  intensity best tracks the model's score, chosen on training tokens (train.bin beside val.bin): per
  expert i, by greedy forward selection, each step adding the unit j that makes the squared intensity over
  the chosen units, sum_j a_ij^2 with a_ij = SiLU(x W_g^i)_j, correlate best (Pearson, over the tokens) with
  the score s_i. On a uoe checkpoint the table gives the share of the chosen units that are its routing
  neurons; two things keep it below 1: greedy selection is not exhaustive, and the target is s_i, not s_i^2,
  so even the routing neurons (whose sum_j a_ij^2 is s_i^2 exactly) correlate with it at 0.95-0.98, not 1;
- rest (uoe only): the D - R units that are not routing neurons, which UoE's router never reads;
- control: 'best' chosen the same way from the units of random gate weights (N(0, sigma^2),
  sigma the std of the layer's W_g, fixed by --seed) instead of the expert's own: what the selection of R
  units out of D gives by itself, with no training behind the units.
For a uoe checkpoint the routing neurons' own intensity is its score, so their agreement would be 1 by
construction; "all" and "rest" ask whether the other units say the same.
"""
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import plot
import uoe
from bench import write_json
from train import UserError, help_text, option_table, parse_options, resolve_device

SUPPORTED = ("moe", "uoe")
TOP_SHARES = (0.10, 0.25)       # concentration: the strongest 10% and 25% of an expert's routing units


@dataclass
class RoutersConfig:
    out_dir: str = ""              # where routers.json and routers.png go ('': the run folder, figures/ for several)
    data_dir: str = ""             # dataset folder with train.bin and val.bin ('': the run's, as plot.py finds it)
    val_tokens: int = 8192         # validation tokens measured
    train_tokens: int = 8192       # training tokens on which the 'best' units and the strongest units are chosen
    n_units: int | None = None     # units in the 'best' set (None: the checkpoint's n_routing, D // E by default)
    batch_size: int = 8            # sequences per forward
    seed: int = 1337               # the random choice
    device: str = "auto"           # auto (cuda if available), cpu, cuda, cuda:1


# -----------------------------------------------------------------------------
# options

def parse(argv):
    """(run folders, options): the run folders first (no dash), then options in train.py's dialect."""
    runs = [a for a in argv if not a.startswith("-")]
    table = option_table([RoutersConfig])
    opts, _ = parse_options([a for a in argv if a.startswith("-")], table,
                            help_text(table, __doc__, [("routers.py", RoutersConfig)]), "routers.py")
    if not runs:
        raise UserError("give the out_dir of at least one trained moe or uoe run, e.g. python routers.py out-moe")
    for key in ("val_tokens", "train_tokens", "batch_size"):
        if opts[key] < 1:
            raise UserError(f"--{key}={opts[key]} must be >= 1")
    if opts["n_units"] is not None and opts["n_units"] < 1:
        raise UserError(f"--n_units={opts['n_units']} must be >= 1 (or None)")
    return runs, opts


# -----------------------------------------------------------------------------
# data: windows of block_size + 1 tokens (inputs and targets) at evenly spaced offsets

def windows(tokens, n_tokens, block_size):
    """(n, T+1) int64 windows of the 1-D id array `tokens`, n = n_tokens // T, at evenly spaced fixed offsets."""
    T = min(block_size, len(tokens) - 1)
    if T < 1:
        raise UserError(f"only {len(tokens)} tokens in the dataset; prepare a larger one")
    starts = np.linspace(0, len(tokens) - T - 1, max(1, n_tokens // T)).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + T + 1], dtype=np.int64) for s in starts]))


def run_windows(run, model, opts):
    """(train windows, val windows) of the run's dataset."""
    try:
        val_path, dtype, _ = plot.find_val(run, opts["data_dir"] or None)
    except plot.Skip as e:
        raise UserError(str(e)) from None
    train_path = val_path.with_name("train.bin")
    if not train_path.is_file():
        raise UserError(f"no train.bin beside {val_path} (the 'best' units are chosen on training tokens); "
                        "pass --data_dir")
    out = []
    for path, n in ((train_path, opts["train_tokens"]), (val_path, opts["val_tokens"])):
        w = windows(np.memmap(path, dtype=dtype, mode="r"), n, model.config.block_size)
        if int(w.max()) >= model.config.vocab_size:
            raise UserError(f"{path} has token id {int(w.max())} >= vocab_size {model.config.vocab_size}: "
                            "not this run's dataset; pass the right --data_dir")
        out.append(w)
    return out


# -----------------------------------------------------------------------------
# the model, layer by layer

@torch.no_grad()
def forward(model, idx, ffn):
    """GPT.forward with each FFN call replaced by ffn(layer, block.mlp, u), u = ln_2(x) (B, T, C); returns the
    logits (B, T, V). ffn = lambda l, mlp, u: mlp(u) is the model itself."""
    tr = model.transformer
    x = tr.drop(tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device)))
    for layer, block in enumerate(tr.h):
        x = x + block.attn(block.ln_1(x))
        x = x + block.mlp_dropout(ffn(layer, block.mlp, block.ln_2(x)))
    return model.lm_head(tr.ln_f(x))


def unit_activations(mlp, x, w_gate=None):
    """a = SiLU(x W_g^i) of every hidden unit of every expert, (N, E, D), in >= float32 like routing scores;
    w_gate (E, C, D): other gate weights than the layer's (the control)."""
    w_gate = mlp.w_gate if w_gate is None else w_gate
    E, C, D = w_gate.shape
    return F.silu(uoe.routing_matmul(x, w_gate.transpose(0, 1).reshape(C, E * D))).view(-1, E, D)


def control_weights(model, seed):
    """layer -> random gate weights (E, C, D) for the control: N(0, sigma^2), sigma the std of the layer's W_g."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, block in enumerate(model.transformer.h):
        w = block.mlp.w_gate
        out[layer] = (torch.randn(w.shape, generator=g, dtype=w.dtype) * w.std().item()).to(w.device)
    return out


def intensity(a, units):
    """||a_i[units_i]||_2 per token and expert: a (N, E, D), units (E, U) -> (N, E)."""
    return a.gather(2, units.unsqueeze(0).expand(a.shape[0], -1, -1)).norm(dim=-1)


def unit_sets(mlp, best):
    """name -> (E, U) hidden-unit indices per expert: all, best (given), and for uoe rest (not routing neurons)."""
    E, _, D = mlp.w_gate.shape
    every = torch.arange(D, device=best.device).expand(E, D)
    sets = {"all": every, "best": best}
    if isinstance(mlp, uoe.UoEFFN):
        sets["rest"] = every[:, mlp.config.n_routing:]
    return sets


def intensities(mlp, x, chosen, control, a=None):
    """name -> (N, E) intensities of the experts on x (N, C) over each unit set (unit_sets), and "control": over
    the units chosen["control"] of the random gate weights control (E, C, D). chosen: choose_units' entry of
    the layer; a: unit_activations(mlp, x) where the caller has them already."""
    a = unit_activations(mlp, x) if a is None else a                     # (N, E, D)
    out = {name: intensity(a, units) for name, units in unit_sets(mlp, chosen["best"]).items()}
    out["control"] = intensity(unit_activations(mlp, x, control), chosen["control"])
    return out


def run_chosen(mlp, u, topk_idx, gates):
    """The FFN mlp on u (B, T, C) with the experts topk_idx (N, K) and gates (N, K) given instead of its own
    choice; the rest of the layer (uoe's virtual shared expert, moe's shared experts) as in its forward: the
    layer's run_choice, which its forward ends with."""
    B, T, C = u.shape
    return mlp.run_choice(u.reshape(-1, C), topk_idx, gates).view(B, T, C)


def choose(score, K, gen=None):
    """(topk_idx, gates) (N, K): the top K of score (N, E), or with a generator gen K experts uniformly at
    random; gates = softmax over the chosen experts' scores (UoE's gates)."""
    if gen is not None:
        topk_idx = torch.rand(score.shape, generator=gen).topk(K, dim=-1).indices.to(score.device)
    else:
        topk_idx = score.topk(K, dim=-1).indices
    return topk_idx, F.softmax(score.gather(1, topk_idx), dim=-1)


def reference_score(mlp, x, scores):
    """What a random choice's gates are computed from: moe, the intensity of all D units; uoe, its own score."""
    return scores if isinstance(mlp, uoe.UoEFFN) else unit_activations(mlp, x).norm(dim=-1)


# -----------------------------------------------------------------------------
# measures

def top_overlap(a_idx, b_idx, E):
    """|A & B| / K per token of two (N, K) top-K choices, (N,)."""
    hot = torch.zeros(a_idx.shape[0], E, device=a_idx.device)
    hot.scatter_(1, a_idx, 1.0)
    return hot.gather(1, b_idx).mean(dim=-1)


def spearman(a, b):
    """Spearman's rank correlation of the rows of a and b (N, E), (N,); ties broken by position."""
    E = a.shape[-1]
    ra, rb = (t.argsort(dim=-1).argsort(dim=-1).double() for t in (a, b))
    return 1 - 6 * (ra - rb).square().sum(dim=-1) / (E * (E * E - 1))


def add_unit_stats(acc, sq, score):
    """Add a batch to the running sums (float64) from which greedy_units works: sq (N, E, D) the squared unit
    activations a_ij^2, score (N, E) the model's scores s_i. acc: a dict, empty at first."""
    sq, score = sq.double(), score.double()
    per_expert = sq.transpose(0, 1)                                      # (E, N, D)
    for key, value in (("n", sq.shape[0]), ("x", sq.sum(0)), ("y", score.sum(0)), ("yy", score.square().sum(0)),
                       ("xy", (sq * score.unsqueeze(-1)).sum(0)),
                       ("xx", per_expert.transpose(1, 2) @ per_expert)):  # (E, D, D)
        acc[key] = acc.get(key, 0) + value
    return acc


def greedy_units(acc, n_units):
    """(E, n_units) units per expert by greedy forward selection: each step adds the unit that makes the sum of
    a_ij^2 over the chosen units j (the squared intensity over them) correlate best, over the tokens, with s_i
    (Pearson). From the sums of add_unit_stats: cov(sum_S x_j, y) = sum_S cov(x_j, y), var = sum_S,S cov."""
    n = acc["n"]
    mean_x, mean_y = acc["x"] / n, acc["y"] / n                          # (E, D), (E,)
    cov_xx = acc["xx"] / n - mean_x.unsqueeze(-1) * mean_x.unsqueeze(-2)   # (E, D, D)
    cov_xy = acc["xy"] / n - mean_x * mean_y.unsqueeze(-1)               # (E, D)
    var_y = (acc["yy"] / n - mean_y.square()).clamp_min(1e-30)           # (E,)
    E, D = cov_xy.shape
    rows = torch.arange(E, device=cov_xy.device)
    cov_sum = torch.zeros(E, dtype=cov_xy.dtype, device=cov_xy.device)  # cov(sum over S, y)
    var_sum = torch.zeros_like(cov_sum)                                  # var(sum over S)
    cross = torch.zeros_like(cov_xy)                                     # (E, D) cov(x_j, sum over S)
    taken = torch.zeros(E, D, dtype=torch.bool, device=cov_xy.device)
    chosen = []
    for _ in range(n_units):
        var = (var_sum.unsqueeze(-1) + 2 * cross + cov_xx.diagonal(dim1=1, dim2=2)).clamp_min(1e-30)
        r = (cov_sum.unsqueeze(-1) + cov_xy) / (var * var_y.unsqueeze(-1)).sqrt()   # (E, D) with unit j added
        j = r.masked_fill(taken, -float("inf")).argmax(dim=-1)           # (E,)
        cov_sum += cov_xy[rows, j]
        var_sum += 2 * cross[rows, j] + cov_xx[rows, j, j]
        cross += cov_xx[rows, :, j]
        taken[rows, j] = True
        chosen.append(j)
    return torch.stack(chosen, dim=-1)                                   # (E, n_units) in the order chosen


@torch.no_grad()
def choose_units(model, idx, n_units, batch_size, controls):
    """On training windows idx (n, T+1), per routed layer: the mean a^2 (E, D), the 'best' units (E, n_units)
    (greedy_units against the model's scores; module docstring), and the same selection from the units of
    the random gate weights controls[layer] ("control")."""
    sums = {}

    def ffn(layer, mlp, u):
        y = mlp(u)
        x = u.reshape(-1, u.shape[-1])
        for name, w_gate in (("best", None), ("control", controls[layer])):
            sq = unit_activations(mlp, x, w_gate).square()               # (N, E, D)
            add_unit_stats(sums.setdefault(layer, {}).setdefault(name, {}), sq, mlp.last_routing["scores"])
        return y

    for xb in idx[:, :-1].split(batch_size):
        forward(model, xb.to(next(model.parameters()).device), ffn)
    return {layer: {"mean_sq": s["best"]["x"] / s["best"]["n"], "best": greedy_units(s["best"], n_units),
                    "control": greedy_units(s["control"], n_units)} for layer, s in sums.items()}


@torch.no_grad()
def agreement(model, idx, chosen, controls, batch_size):
    """On validation windows: per layer, for each unit set and the control, the mean top-K overlap and
    Spearman correlation with the model's scores; the sums of a^2 per expert and unit (E, D); and the
    model's own loss."""
    device = next(model.parameters()).device
    acc, losses = {}, []

    def ffn(layer, mlp, u):
        y = mlp(u)
        x = u.reshape(-1, u.shape[-1])
        a = unit_activations(mlp, x)                                     # (N, E, D)
        scores, own_idx = mlp.last_routing["scores"], mlp.last_routing["topk_idx"]
        layer_acc = acc.setdefault(layer, {"n": 0, "sq": 0.0})
        layer_acc["n"] += len(x)
        layer_acc["sq"] = layer_acc["sq"] + a.double().square().sum(0)
        for name, s in intensities(mlp, x, chosen[layer], controls[layer], a).items():
            m = layer_acc.setdefault(name, {"overlap": 0.0, "spearman": 0.0})
            m["overlap"] += top_overlap(s.topk(mlp.config.top_k, dim=-1).indices, own_idx, s.shape[1]).sum().item()
            m["spearman"] += spearman(s, scores).sum().item()
        return y

    for w in idx.split(batch_size):
        w = w.to(device)
        logits = forward(model, w[:, :-1], ffn)
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item())
    n_targets = idx[:, 1:].numel()
    out = {layer: {name: {k: v / a["n"] for k, v in m.items()} for name, m in a.items() if name not in ("n", "sq")}
           for layer, a in acc.items()}
    return out, {layer: a["sq"] for layer, a in acc.items()}, sum(losses) / n_targets


@torch.no_grad()
def loss_with(model, idx, layers, scheme, chosen, controls, batch_size, seed):
    """Validation loss when the FFNs of `layers` choose their experts by `scheme` instead of their own: the
    intensity over a unit set (intensities' names), or "random"."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)

    def ffn(layer, mlp, u):
        y = mlp(u)
        if layer not in layers:
            return y
        x = u.reshape(-1, u.shape[-1])
        if scheme == "random":
            choice = choose(reference_score(mlp, x, mlp.last_routing["scores"]), mlp.config.top_k, gen)
        else:
            choice = choose(intensities(mlp, x, chosen[layer], controls[layer])[scheme], mlp.config.top_k)
        return run_chosen(mlp, u, *choice)

    total = 0.0
    for w in idx.split(batch_size):
        w = w.to(device)
        logits = forward(model, w[:, :-1], ffn)
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
    return total / idx[:, 1:].numel()


def concentration(mean_sq_train, sq_val, R):
    """uoe: per expert, the share of its sum of a_ij^2 over validation tokens (routing units j < R) from its
    strongest 10% / 25% routing units, strongest by mean a_ij^2 on training tokens. -> {"top10%": [E], ...}."""
    out = {}
    for share in TOP_SHARES:
        k = max(1, round(share * R))
        top = mean_sq_train[:, :R].topk(k, dim=-1).indices               # (E, k)
        part = sq_val[:, :R].gather(1, top).sum(-1) / sq_val[:, :R].sum(-1).clamp_min(1e-30)
        out[f"top{round(100 * share)}%"] = {"units": k, "uniform": k / R, "share": part.tolist()}
    return out


def measure(model, train_idx, val_idx, n_units=None, batch_size=8, seed=1337):
    """Every measure of the module docstring for one model; windows (n, T+1). Returns a JSON-able dict."""
    cfg = model.config
    if cfg.ffn not in SUPPORTED:
        raise UserError(f"routers.py measures moe and uoe checkpoints; this one is ffn={cfg.ffn}")
    if cfg.n_expert < 2:
        raise UserError("routers.py needs at least 2 experts per layer to compare rankings")
    R = n_units or cfg.n_routing
    if R < 1:   # a moe's n_routing, which GPTConfig checks for uoe only
        raise UserError(f"the checkpoint's n_routing={R} is no number of units for the 'best' set; pass --n_units")
    if R > cfg.expert_hidden:
        raise UserError(f"--n_units={R} is more than the experts' {cfg.expert_hidden} hidden units")
    controls = control_weights(model, seed)
    chosen = choose_units(model, train_idx, R, batch_size, controls)
    agree, sq_val, own_loss = agreement(model, val_idx, chosen, controls, batch_size)
    schemes = list(agree[0]) + ["random"]
    layers = list(range(cfg.n_layer))

    def loss(swapped, scheme):
        return loss_with(model, val_idx, swapped, scheme, chosen, controls, batch_size, seed)

    out = dict(ffn=cfg.ffn, n_expert=cfg.n_expert, top_k=cfg.top_k, expert_hidden=cfg.expert_hidden, n_units=R,
               n_routing=cfg.n_routing if cfg.ffn == "uoe" else None, chance_overlap=cfg.top_k / cfg.n_expert,
               val_tokens=val_idx[:, 1:].numel(), train_tokens=train_idx[:, 1:].numel(), own_loss=own_loss,
               layers=[], every_layer={s: loss(set(layers), s) for s in schemes})
    for layer in layers:
        best = chosen[layer]["best"]
        row = dict(layer=layer, agreement=agree[layer], best_units=best.tolist(),
                   control_units=chosen[layer]["control"].tolist(),
                   loss={s: loss({layer}, s) for s in schemes})
        if cfg.ffn == "uoe":
            row["best_in_routing"] = (best < cfg.n_routing).double().mean().item()
            row["concentration"] = concentration(chosen[layer]["mean_sq"], sq_val[layer], cfg.n_routing)
        out["layers"].append(row)
    return out


# -----------------------------------------------------------------------------
# output

def unit_label(name, result):
    D, R = result["expert_hidden"], result["n_units"]
    return {"all": f"all {D}", "best": f"best {R}", "rest": f"rest {D - (result['n_routing'] or 0)}",
            "control": f"best {R} of random W_g", "random": "random"}[name]


def table(label, r):
    """The terminal table of one run's result."""
    names, schemes = list(r["layers"][0]["agreement"]), list(r["layers"][0]["loss"])
    own_name = "router" if r["ffn"] == "moe" else "own score"
    head = (["layer"] + [f"overlap {unit_label(n, r)}" for n in names] + [f"rho {unit_label(n, r)}" for n in names]
            + [f"loss {own_name}"] + [f"loss {unit_label(s, r)}" for s in schemes])
    conc = r["ffn"] == "uoe"
    if conc:
        head += [f"{k} units' share" for k in r["layers"][0]["concentration"]]
    rows = []
    for row in r["layers"]:
        cells = [str(row["layer"])] + [f"{100 * row['agreement'][n]['overlap']:.1f}%" for n in names] \
            + [f"{row['agreement'][n]['spearman']:+.3f}" for n in names] + [f"{r['own_loss']:.4f}"] \
            + [f"{row['loss'][s]:.4f}" for s in schemes]
        if conc:
            cells += [f"{100 * np.mean(c['share']):.1f}%" for c in row["concentration"].values()]
        rows.append(cells)
    rows.append(["every"] + [""] * (2 * len(names)) + [f"{r['own_loss']:.4f}"]
                + [f"{r['every_layer'][s]:.4f}" for s in schemes] + ([""] * 2 if conc else []))
    lines = [f"{label}: {r['val_tokens']} validation tokens, units chosen on {r['train_tokens']} training tokens",
             f"top-{r['top_k']} overlap of the intensity's choice with the {own_name}'s (chance K/E = "
             f"{100 * r['chance_overlap']:.1f}%), Spearman rho with its scores per token (chance 0); validation loss "
             f"when the layer (row 'every': every layer) chooses by intensity or at random",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    lines += ["| " + " | ".join(c) + " |" for c in rows]
    if conc:
        uniform = ", ".join(f"{k} {100 * c['uniform']:.1f}%" for k, c in r["layers"][0]["concentration"].items())
        share = ", ".join(f"{100 * row['best_in_routing']:.0f}%" for row in r["layers"])
        lines.append(f"share of the routing-neuron score (sum of a^2) in the strongest units, mean over experts "
                     f"(uniform: {uniform}); routing neurons among the best units per layer: {share}")
    return "\n".join(lines)


def figure(results):
    """Four panels over the layers: top-K overlap, Spearman rho, loss increase when one layer (or every layer)
    chooses by intensity / at random, and uoe's concentration. results: [(run, result)]."""
    fig = plot.new_figure(13, 8.5)
    (ax_o, ax_r), (ax_l, ax_c) = fig.subplots(2, 2)
    hatches = {"all": "", "best": "//", "control": "--", "rest": "..", "random": "xx"}
    n_layer = max(len(r["layers"]) for _, r in results)
    bars = [(run, r, name) for run, r in results for name in r["layers"][0]["agreement"]]
    width = 0.8 / max(1, len(bars))
    for i, (run, r, name) in enumerate(bars):
        xs = np.arange(len(r["layers"])) + (i - (len(bars) - 1) / 2) * width
        label = f"{run.label}: {unit_label(name, r)}"
        for ax, key in ((ax_o, "overlap"), (ax_r, "spearman")):
            ax.bar(xs, [row["agreement"][name][key] for row in r["layers"]], width, color=run.color,
                   hatch=hatches[name], edgecolor="white", label=label, alpha=0.5 if name == "control" else 1)
    for chance in sorted({r["chance_overlap"] for _, r in results}):
        ax_o.axhline(chance, color="0.3", linestyle=":", linewidth=1.2)
    ax_o.set_title("top-K overlap of the intensity's choice with the model's\n(dotted: chance K/E)", fontsize="medium")
    ax_o.set_ylim(0, 1.5)                          # room for the legend above the bars
    ax_o.set_yticks(np.linspace(0, 1, 6))
    ax_o.legend(fontsize="x-small", ncol=2, loc="upper center")
    ax_r.set_title("Spearman rho of the E intensities with the model's E scores\n"
                   "(mean over tokens; chance 0; bars as on the left)", fontsize="medium")
    ax_r.axhline(0, color="0.5", linewidth=0.8)
    ax_r.set_ylim(min(0, *ax_r.get_ylim()), 1)
    losses = [(run, r, s) for run, r in results for s in r["layers"][0]["loss"]]
    width = 0.8 / max(1, len(losses))
    for i, (run, r, s) in enumerate(losses):
        xs = np.arange(len(r["layers"]) + 1) + (i - (len(losses) - 1) / 2) * width
        ys = [row["loss"][s] - r["own_loss"] for row in r["layers"]] + [r["every_layer"][s] - r["own_loss"]]
        ax_l.bar(xs, ys, width, color=run.color, hatch=hatches[s], edgecolor="white",
                 label=f"{run.label}: {unit_label(s, r)}", alpha=0.5 if s == "control" else 1)
    ax_l.set_yscale("symlog", linthresh=0.01)
    ax_l.set_ylim(top=ax_l.get_ylim()[1] * 30)    # room for the legend above the bars
    ax_l.legend(fontsize="x-small", ncol=2, loc="upper center")
    ax_l.axhline(0, color="0.5", linewidth=0.8)
    ax_l.set_xticks(range(n_layer + 1), [str(i) for i in range(n_layer)] + ["every"])
    ax_l.set_title("validation loss minus the model's own, when the layer (or every layer)\n"
                   "chooses its experts by intensity or at random", fontsize="medium")
    ax_l.set_ylabel("Δ loss (nats/token, symlog)")
    uoe_runs = [(run, r) for run, r in results if r["ffn"] == "uoe"]
    for j, (run, r) in enumerate(uoe_runs):
        for k, (key, c) in enumerate(r["layers"][0]["concentration"].items()):
            i = j * len(TOP_SHARES) + k
            n = len(uoe_runs) * len(TOP_SHARES)
            xs = np.arange(len(r["layers"])) + (i - (n - 1) / 2) * 0.8 / n
            shares = np.array([row["concentration"][key]["share"] for row in r["layers"]])   # (layers, E)
            mean = shares.mean(1)
            ax_c.bar(xs, mean, 0.8 / n, yerr=[mean - shares.min(1), shares.max(1) - mean], capsize=2,
                     color=run.color, alpha=1 - 0.45 * k, label=f"{run.label}: strongest {key} ({c['units']})")
            ax_c.axhline(c["uniform"], color=run.color, alpha=1 - 0.45 * k, linestyle=":", linewidth=1.2)
    ax_c.set_ylim(0, 1)
    ax_c.set_title("uoe: share of an expert's routing score (sum of a^2) in its strongest routing units\n"
                   "(bars: mean over experts, whiskers: min-max; dotted: uniform)", fontsize="medium")
    if not uoe_runs:
        ax_c.text(0.5, 0.5, "no uoe run", ha="center", va="center", transform=ax_c.transAxes)
    for ax in (ax_o, ax_r, ax_c):
        ax.set_xticks(range(n_layer), [str(i) for i in range(n_layer)])
    if uoe_runs:
        ax_c.legend(fontsize="x-small")
    for ax in (ax_o, ax_r, ax_l, ax_c):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Are neurons secretly routers? Each expert's activation intensity ||SiLU(x W_g^i)[U]||_2 "
                 "against the model's routing, on validation tokens")
    return fig


def save_figure_atomically(fig, path):
    """fig as PNG at path, through a temporary file renamed into place: an interrupt leaves no half image."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -----------------------------------------------------------------------------

def routers(run_dirs, opts):
    """Measure every run, print its table, then write routers.json and routers.png (atomically)."""
    try:
        runs = plot.load_runs(run_dirs)
    except plot.PlotError as e:
        raise UserError(str(e)) from None
    device = resolve_device(opts["device"], None)
    results = []
    for run in runs:
        try:
            model = plot.load_model(run).to(device)
        except plot.Skip as e:
            raise UserError(str(e)) from None
        if model.config.ffn not in SUPPORTED:
            raise UserError(f"{run.dir} is an ffn={model.config.ffn} run; routers.py measures moe and uoe runs")
        train_idx, val_idx = run_windows(run, model, opts)
        r = measure(model, train_idx, val_idx, opts["n_units"], opts["batch_size"], opts["seed"])
        r.update(run=str(run.dir), label=run.label)
        print(table(f"{run.dir} ({run.label})", r) + "\n", flush=True)
        results.append((run, r))
    try:
        out_dir = plot.make_out_dir(opts["out_dir"] or (run_dirs[0] if len(run_dirs) == 1 else "figures"))
    except plot.PlotError as e:
        raise UserError(str(e)) from None
    save_figure_atomically(figure(results), out_dir / "routers.png")
    write_json(out_dir / "routers.json", {"options": opts, "device": str(device), "torch": torch.__version__,
                                          "runs": [r for _, r in results]}, quiet=True)
    print(f"wrote {out_dir / 'routers.json'} and {out_dir / 'routers.png'}")
    return [r for _, r in results]


def main(argv=None):
    try:
        routers(*parse(sys.argv[1:] if argv is None else argv))
    except (UserError, uoe.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no file was left half-written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
