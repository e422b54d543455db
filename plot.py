"""
Figures of one or several finished training runs: loss curves and what the experts do (§6 of
METHOD.md). train.py calls plot_run(out_dir) at the end of every run; to redraw, or to compare runs:

    python plot.py out-uoe                                  # figures into out-uoe/
    python plot.py out-uoe out-moe --out_dir figures [--x flops] [--log]
        [--data_dir data/shakespeare_char] [--val_tokens 4096] [--min_count 10]

Figures (PNG; with several runs the per-run ones get a _<run> suffix):
  loss.png / loss_flops.png  train and validation loss against tokens seen / training FLOPs
  load_heatmap.png           share of the top-k assignments each expert got, layers x experts (last log)
  ent_load.png               Ent_load = -sum_i f_i log f_i per layer over training
  load_minmax.png            the largest and the smallest expert load per layer over training
  conf_entropy.png           entropy of the score softmax per layer over training
  vse_share.png              UoE: the virtual shared expert's share of the FFN output norm
  intensity.png              UoE: routing-neuron intensities per expert on validation data (checkpoint)
  specialisation.png/.md     tokens each expert prefers (lift, see specialisation()) (checkpoint)
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LinearSegmentedColormap, to_rgb
from matplotlib.figure import Figure   # no pyplot: no global state, Agg canvas on savefig
from matplotlib.ticker import EngFormatter, LogFormatter, PercentFormatter

import uoe
from data.prepare import DataError, read_meta

REPO = Path(__file__).resolve().parent
COLORS = {"dense": "#555555", "moe": "#1f77b4", "aoe": "#2ca02c", "uoe": "#d62728"}   # one per variant
OTHER_COLOR = "#9467bd"   # a variant without a colour above
DPI = 120
X_AXES = {"tokens": "tokens seen", "flops": "training FLOPs (3 x forward)"}


class PlotError(Exception):
    """A problem the user can fix; main() prints it as one `error: ...` line."""


class Skip(Exception):
    """A figure that cannot be drawn for this run (no routing, no checkpoint, no data)."""


# -----------------------------------------------------------------------------
# runs

@dataclass
class Run:
    dir: Path
    name: str
    config: dict
    train: dict
    dataset: str | None
    meta: dict
    train_rows: list = field(default_factory=list)
    eval_rows: list = field(default_factory=list)
    label: str = ""
    color: str = OTHER_COLOR

    @property
    def variant(self):
        return self.config.get("ffn", "?")

    @property
    def routing_rows(self):
        """train lines that carry routing statistics of at least one routed layer"""
        return [r for r in self.train_rows if isinstance(r.get("routing"), list)
                and any(isinstance(s, dict) for s in r["routing"])]


def settings_label(c):
    """'uoe E8 K2 D256 R32': the variant and the settings that distinguish it (uoe.ffn_label), of a run's
    config dict c (run.json). Fields this GPTConfig lacks are dropped; on the loop path, so no device check
    runs. A config that GPTConfig refuses (a variant this uoe.py lacks, no ffn) raises ValueError."""
    if "ffn" not in c:
        raise ValueError("its config names no ffn")
    known = {f.name for f in fields(uoe.GPTConfig)}
    return uoe.ffn_label(uoe.GPTConfig(**{**{k: v for k, v in c.items() if k in known}, "expert_path": "loop"}))


def load_run(out_dir):
    out_dir = Path(out_dir)
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"no metrics.jsonl in {out_dir}; give the --out_dir of a train.py run")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue   # a line cut short by a crash
    try:
        info = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        info = {}
    run = Run(dir=out_dir, name=out_dir.resolve().name, config=info.get("config") or {},
              train=info.get("train") or {}, dataset=info.get("dataset"), meta=info.get("meta") or {},
              train_rows=[r for r in rows if r.get("kind") == "train"],
              eval_rows=[r for r in rows if r.get("kind") == "eval"])
    try:
        run.label = settings_label(run.config) if run.config else run.name
    except (TypeError, ValueError) as e:
        raise PlotError(f"cannot plot {out_dir}: run.json: {e}; plot it with the uoe.py that trained it") from None
    return run


def make_out_dir(out_dir):
    """The folder figures go to, created if missing; a path that cannot be made is a PlotError."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlotError(f"cannot create --out_dir {out_dir} ({e.strerror}); choose another") from None
    return out_dir


def load_runs(out_dirs):
    """Runs with unique labels and colours: the variant's colour, lighter/darker for repeats."""
    runs = [load_run(d) for d in out_dirs]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):   # folder names serve as file suffixes: make them unique
        if names.count(r.name) > 1:
            r.name = f"{r.name}-{names[:i].count(r.name) + 1}"
    labels = [r.label for r in runs]
    seen = {}
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.name})"
        n = seen[r.variant] = seen.get(r.variant, -1) + 1
        base = np.array(to_rgb(COLORS.get(r.variant, OTHER_COLOR)))
        shade = [0.0, 0.45, -0.45, 0.7, -0.7][n % 5]   # >0 towards white, <0 towards black
        r.color = tuple(base + (1 - base) * shade if shade > 0 else base * (1 + shade))
    return runs


# -----------------------------------------------------------------------------
# figures from metrics.jsonl

def new_figure(w=8, h=5):
    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def layer_grid(fig, n_layer):
    ncols = math.ceil(math.sqrt(n_layer))
    axes = fig.subplots(math.ceil(n_layer / ncols), ncols, sharex=True, sharey=True, squeeze=False).flatten()
    for ax in axes[n_layer:]:
        ax.set_visible(False)
    return axes[:n_layer]


def smoothed(values, weight=0.8):
    """Exponential moving average, debiased at the start (TensorBoard's smoothing): light, ~5 points."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def train_ce(row):
    """The logged training cross-entropy of a train line (without the aux loss), None if non-finite."""
    return row["ce"] if "ce" in row else row.get("loss")


def plot_loss(runs, x="tokens", log=False):
    """Training loss (left) and validation loss (right) against x in {tokens, flops}. Left: the logged
    training cross-entropy ("ce", every log_interval steps on its own batch) faint, lightly smoothed
    (gid "train_logged" / "train_smoothed"), and the eval lines' train_loss as dots on top ("train_eval":
    the fixed eval batches, the same estimator as val_loss). Right: the eval lines' val_loss."""
    if not any(r.get(x) is not None for run in runs for r in run.train_rows + run.eval_rows):
        raise Skip(f"no train or eval records with {x!r} in metrics.jsonl yet")
    fig = new_figure(10, 4.5)
    ax_train, ax_val = fig.subplots(1, 2, sharex=True, sharey=True)
    for run in runs:
        tr = [r for r in run.train_rows if r.get(x) is not None and train_ce(r) is not None]
        ev = [r for r in run.eval_rows if r.get(x) is not None and r.get("val_loss") is not None]
        if tr:
            xs, ce = [r[x] for r in tr], [train_ce(r) for r in tr]
            ax_train.plot(xs, ce, color=run.color, alpha=0.25, linewidth=0.8, gid="train_logged")
            ax_train.plot(xs, smoothed(ce), color=run.color, label=run.label, gid="train_smoothed")
        if ev:
            ax_train.plot([r[x] for r in ev], [r["train_loss"] for r in ev], color=run.color, linestyle="none",
                          marker="o", markersize=4, markeredgecolor="white", zorder=3, gid="train_eval",
                          label="_nolegend_" if tr else run.label)
            ax_val.plot([r[x] for r in ev], [r["val_loss"] for r in ev], color=run.color, label=run.label,
                        marker="o", markersize=3)
    for ax, title in ((ax_train, "training loss (line: logged, smoothed; dots: eval)"),
                      (ax_val, "validation loss")):
        ax.set_title(title)
        ax.set_xlabel(X_AXES[x])
        ax.grid(alpha=0.3)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter())   # '3', not '3 x 10^0'
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        else:
            ax.xaxis.set_major_formatter(EngFormatter())
    ax_train.set_ylabel("cross-entropy (nats/token)")
    ax_train.legend(fontsize="small")
    fig.suptitle(f"Loss against {X_AXES[x]}")
    return fig


def plot_load_heatmap(run):
    """Share of the top-k assignments each expert received, per layer, at the last logged step."""
    rows = run.routing_rows
    if not rows:
        raise Skip(f"{run.name} has no routing statistics (dense)")
    last = rows[-1]
    layers = [i for i, s in enumerate(last["routing"]) if isinstance(s, dict)]
    load = np.array([last["routing"][i]["load"] for i in layers])          # (layers, E)
    E = load.shape[1]
    fig = new_figure(max(5, 1.2 + 0.6 * E), max(3, 1.6 + 0.5 * len(layers)))
    ax = fig.subplots()
    cmap = LinearSegmentedColormap.from_list(run.variant, ["#ffffff", run.color])
    im = ax.imshow(load, cmap=cmap, vmin=0, aspect="auto")
    if E <= 16:
        for (i, e), v in np.ndenumerate(load):
            ax.text(e, i, f"{100 * v:.0f}", ha="center", va="center", fontsize="small",
                    color="white" if v > 0.6 * load.max() else "black")
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="share of top-k assignments (%)", format=PercentFormatter(1.0))
    ax.set_title(f"Expert load at step {last.get('step')} (balanced: {100 / E:.1f}% each)\n{run.label}",
                 fontsize="medium")
    return fig


def plot_layer_metric(runs, series, ylabel, title, ref=None):
    """One panel per layer, the logged routing statistic(s) against tokens seen, one line per run.
    series: [(key, linestyle, legend suffix)], each line's gid is its key (tests read the lines back);
    ref(run) -> value of a dotted reference line."""
    def has(run, key):
        return any(isinstance(s, dict) and s.get(key) is not None for r in run.routing_rows for s in r["routing"])
    runs = [r for r in runs if any(has(r, key) for key, _, _ in series)]
    if not runs:
        raise Skip("no run has these routing statistics")
    n_layer = max(len(r.routing_rows[-1]["routing"]) for r in runs)
    fig = new_figure(max(8, 2.6 * math.ceil(math.sqrt(n_layer))), max(5, 2.2 * math.ceil(math.sqrt(n_layer))))
    axes = layer_grid(fig, n_layer)
    for layer, ax in enumerate(axes):
        for run in runs:
            pts = [(r["tokens"], r["routing"][layer]) for r in run.routing_rows
                   if layer < len(r["routing"]) and isinstance(r["routing"][layer], dict)]
            for key, ls, suffix in series:
                xy = [(t, s[key]) for t, s in pts if s.get(key) is not None]
                if xy:
                    ax.plot(*zip(*xy), color=run.color, linestyle=ls, label=run.label + suffix, gid=key)
        for value in sorted({ref(r) for r in runs} if ref else []):
            ax.axhline(value, color="0.5", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(EngFormatter())
    fig.supxlabel("tokens seen")
    fig.supylabel(ylabel)
    axes[0].legend(fontsize="x-small")
    fig.suptitle(title + ("   (dotted: " + ref.__doc__ + ")" if ref else ""))
    return fig


def balanced_ent_load(run):
    """perfect balance, log E"""
    return math.log(run.config.get("n_expert") or len(run.routing_rows[-1]["routing"][-1]["load"]))


def balanced_load(run):
    """perfect balance, 1/E"""
    return 1 / (run.config.get("n_expert") or len(run.routing_rows[-1]["routing"][-1]["load"]))


def uniform_entropy(run):
    """uniform scores, log E"""
    return balanced_ent_load(run)


def plot_ent_load(runs):
    return plot_layer_metric(runs, [("ent_load", "-", "")], "Ent_load (nats)",
                             "Load entropy per layer over training", ref=balanced_ent_load)


def plot_load_minmax(runs):
    return plot_layer_metric(runs, [("max_load", "-", " max"), ("min_load", "--", " min")],
                             "share of top-k assignments", "Largest (solid) and smallest (dashed) expert load",
                             ref=balanced_load)


def plot_conf_entropy(runs):
    return plot_layer_metric(runs, [("conf_entropy", "-", "")], "entropy of score softmax (nats)",
                             "Routing confidence (lower = more confident)", ref=uniform_entropy)


def plot_vse_share(runs):
    return plot_layer_metric(runs, [("vse_share", "-", "")], "||VSE|| / (||VSE|| + ||routed||)",
                             "UoE: virtual shared expert's share of the FFN output")


# -----------------------------------------------------------------------------
# figures from the checkpoint on validation data

def find_val(run, data_dir=None):
    """(val.bin path, its dtype, its meta.json) or raise Skip. data_dir: a dataset folder holding val.bin, or a
    folder holding <dataset>/val.bin; default: train.py's data_dir setting, then data/<dataset>."""
    candidates = [data_dir, run.train.get("data_dir"), REPO / "data"]
    for d in filter(None, candidates):
        for folder in (Path(d), Path(d) / (run.dataset or "")):
            if (folder / "val.bin").is_file():
                try:
                    meta = read_meta(folder)
                except DataError:          # no or broken meta.json beside val.bin: the run's copy
                    meta = run.meta
                return folder / "val.bin", np.dtype(meta.get("dtype", "uint16")), meta
    raise Skip(f"no val.bin for dataset {run.dataset!r} (looked in {', '.join(map(str, filter(None, candidates)))}); "
               "pass --data_dir")


def load_model(run):
    try:
        return uoe.model_from_checkpoint(uoe.load_checkpoint(str(run.dir / "ckpt.pt"), "cpu")).eval()
    except uoe.CheckpointError as e:
        raise Skip(str(e)) from None


@torch.no_grad()
def val_routing(model, val, n_tokens=4096, seq_len=256, batch_size=8):
    """Route n_tokens validation tokens (sequences at evenly spaced, fixed offsets of val, a 1-D
    array of ids). Returns tokens (N,) and per layer the "scores" (N, E) and "topk_idx" (N, K) of
    last_routing, or None for a dense layer; rows in the order of the tokens."""
    T = min(model.config.block_size, seq_len, len(val))
    starts = np.linspace(0, len(val) - T, max(1, n_tokens // T)).astype(np.int64)
    idx = torch.from_numpy(np.stack([np.asarray(val[s:s + T], dtype=np.int64) for s in starts]))
    if int(idx.max()) >= model.config.vocab_size:
        raise Skip(f"validation token id {int(idx.max())} >= vocab_size {model.config.vocab_size}: wrong dataset")
    out = {"tokens": idx.flatten(), "scores": [], "topk_idx": []}
    per_layer = [[] for _ in model.transformer.h]
    for xb in idx.split(batch_size):
        model(xb)   # the forward leaves each routed FFN's decisions in block.mlp.last_routing
        for block, acc in zip(model.transformer.h, per_layer):
            acc.append(getattr(block.mlp, "last_routing", None))
    for acc in per_layer:
        routed = acc[0] is not None
        out["scores"].append(torch.cat([r["scores"] for r in acc]).float() if routed else None)
        out["topk_idx"].append(torch.cat([r["topk_idx"] for r in acc]) if routed else None)
    return out


def plot_intensity(run, scores, config):
    """UoE: violins of the routing score s_i of each expert on validation tokens, per layer (the y axis says
    which norm of which activations: intensity_label)."""
    layers = [i for i, s in enumerate(scores) if s is not None]
    fig = new_figure(max(8, 2.8 * math.ceil(math.sqrt(len(layers)))), max(5, 2.3 * math.ceil(math.sqrt(len(layers)))))
    axes = layer_grid(fig, len(layers))
    for layer, ax in zip(layers, axes):
        s = scores[layer].numpy()                               # (N, E)
        parts = ax.violinplot([s[:, e] for e in range(s.shape[1])], positions=range(s.shape[1]),
                              showmedians=True, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(run.color)
            body.set_alpha(0.5)
        parts["cmedians"].set_color("black")
        parts["cmedians"].set_gid("medians")                   # tests read the medians back
        ax.set_title(f"layer {layer}", fontsize="medium")
        ax.set_xticks(range(s.shape[1]))
        ax.grid(alpha=0.3, axis="y")
    fig.supxlabel("expert")
    fig.supylabel(f"routing-neuron intensity {intensity_label(config)}")
    fig.suptitle(f"UoE routing-neuron intensity per expert on {len(scores[layers[0]])} validation tokens\n"
                 f"{SCORE_TEXT[config.route_score]} over the {config.n_routing} routing neurons of expert i, "
                 f"L{config.route_norm} norm; line = median   ({run.label})", fontsize="medium")
    return fig


SCORE_TEXT = {"silu": "SiLU(x W_g)", "pre": "x W_g", "swiglu": "SiLU(x W_g) * x W_p"}   # GPTConfig.route_score


def intensity_label(config):
    """The routing score as the run computes it (route_score, route_norm), e.g. '||SiLU(x W_g)||_2'."""
    return f"||{SCORE_TEXT[config.route_score]}||_{config.route_norm}"


def specialisation(tokens, topk_idx, n_expert, min_count=10, top=5):
    """Which token types each expert prefers, per layer (§6).

    tokens: (N,) token ids; topk_idx: per layer the (N, K) experts chosen for those tokens (None for
    a dense layer). For token type v and expert e the lift is
        lift(v, e) = P(e in top-k | token = v) / P(e in top-k)
    the share of v's occurrences routed to e divided by e's share of all tokens (= P(v | e) / P(v)):
    1 means no preference; at most 1 / P(e in top-k), reached by a type routed to e every time (so a
    rarely chosen expert can show large lifts). Only token types with at
    least min_count occurrences and lift > 1 are listed, at most `top` per expert. Returns per layer None or
        {"share": [E floats, P(e in top-k)], "experts": [per expert the top entries by lift,
         each {"token", "lift", "share" = P(e in top-k | v), "count" = occurrences of v}]}
    """
    tokens = torch.as_tensor(tokens).long().flatten()
    counts = torch.bincount(tokens)                                # (V,) occurrences per type
    eligible = (counts >= min_count).nonzero().flatten()
    out = []
    for idx in topk_idx:
        if idx is None:
            out.append(None)
            continue
        idx = torch.as_tensor(idx).long().view(len(tokens), -1)
        routed = torch.zeros(len(tokens), n_expert).scatter_(1, idx, 1.0)          # (N, E) 0/1
        per_type = torch.zeros(len(counts), n_expert).index_add_(0, tokens, routed)   # (V, E)
        share_v = per_type / counts.clamp_min(1).unsqueeze(1)       # P(e in top-k | v)
        share = routed.mean(0)                                      # P(e in top-k)
        lift = share_v / share.clamp_min(1e-12)
        experts = []
        for e in range(n_expert):
            if share[e] == 0:
                experts.append([])
                continue
            # by lift, then by count (stable sorts), best first
            order = eligible[counts[eligible].argsort(descending=True, stable=True)]
            order = order[lift[order, e].argsort(descending=True, stable=True)]
            order = order[lift[order, e] > 1][:top]                 # preferred: above its average
            experts.append([{"token": int(v), "lift": float(lift[v, e]), "share": float(share_v[v, e]),
                             "count": int(counts[v])} for v in order])
        out.append({"share": share.tolist(), "experts": experts})
    return out


def token_decoder(meta):
    """id -> printable text of that one token: from data/prepare.py's tokenizer, else meta's
    char table, else '#id'. Spaces show as '␣', newlines as '↵', tabs as '⇥'."""
    decode = None
    try:
        from data.prepare import get_tokenizer
        decode = get_tokenizer(meta)[1]
    except Exception:
        itos = meta.get("itos") or meta.get("chars")
        if isinstance(itos, dict):   # {"0": "a", ...} from a JSON-ified dict
            itos = {int(k): v for k, v in itos.items()}
        elif itos is None and isinstance(meta.get("stoi"), dict):
            itos = {i: s for s, i in meta["stoi"].items()}
        if itos is not None:
            decode = lambda ids: "".join(itos[i] for i in ids)   # noqa: E731

    def show(i):
        try:
            s = decode([i]) if decode else f"#{i}"
        except Exception:
            s = f"#{i}"
        return s.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") or "∅"
    return show


def specialisation_markdown(spec, show, label, n_tokens, min_count):
    lines = [f"# Expert specialisation: {label}", "",
             f"{n_tokens} validation tokens. lift(v, e) = (share of token v's occurrences routed to expert e "
             "by top-k) / (share of all tokens routed to e); 1 = no preference, 1 / (e's share) the most "
             "possible (v always routed to e). Token types with at least "
             f"{min_count} occurrences; ␣ = space, ↵ = newline.", ""]
    for layer, s in enumerate(spec):
        if s is None:
            continue
        lines += [f"## Layer {layer}", "", "| expert | tokens routed | preferred tokens (lift) |", "|---:|---:|---|"]
        for e, top in enumerate(s["experts"]):
            cells = []
            for t in top:
                text = show(t["token"]).replace("|", "\\|")
                fence = "``" if "`" in text else "`"
                cells.append(f"{fence}{text}{fence} {t['lift']:.2f}")
            lines.append(f"| {e} | {100 * s['share'][e]:.1f}% | {', '.join(cells) or '-'} |")
        lines.append("")
    return "\n".join(lines)


def plot_specialisation(run, spec, show, max_layers=6, max_experts=16):
    """Per layer: experts (rows) by rank (columns); each cell shows the preferred token and its lift,
    coloured by log2 lift."""
    layers = [i for i, s in enumerate(spec) if s is not None]
    if len(layers) > max_layers:   # first, last and evenly spaced ones between
        layers = sorted({layers[round(j)] for j in np.linspace(0, len(layers) - 1, max_layers)})
    E = min(len(spec[layers[0]]["experts"]), max_experts)
    top = max(1, max(len(t) for i in layers for t in spec[i]["experts"][:E]))
    ncols = 1 if len(layers) == 1 else 2
    nrows = math.ceil(len(layers) / ncols)
    fig = new_figure(max(8, ncols * (1.2 + 0.9 * top)), max(4, nrows * (0.9 + 0.36 * E)))
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    cmap = LinearSegmentedColormap.from_list(run.variant, ["#ffffff", run.color])
    vmax = max(1.0, max((math.log2(max(t["lift"], 1e-9)) for i in layers for x in spec[i]["experts"] for t in x),
                        default=1.0))
    for layer, ax in zip(layers, axes):
        grid = np.full((E, top), np.nan)
        for e, entries in enumerate(spec[layer]["experts"][:E]):
            for r, t in enumerate(entries):
                grid[e, r] = math.log2(max(t["lift"], 1e-9))
                ax.text(r, e, f"{show(t['token'])}  {t['lift']:.1f}", ha="center", va="center", fontsize="small")
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"layer {layer}", fontsize="medium")
        ax.set_yticks(range(E), [f"e{e} {100 * spec[layer]['share'][e]:.0f}%" for e in range(E)], fontsize="small")
        ax.set_xticks(range(top), [f"#{r + 1}" for r in range(top)], fontsize="small")
        ax.set_xlabel("rank by lift")
    fig.suptitle(f"Tokens each expert prefers: token, lift = P(e|v)/P(e); colour log2 lift; "
                 f"row label: share of tokens routed\n{run.label}", fontsize="medium")
    return fig


# -----------------------------------------------------------------------------

def plot_runs(out_dirs, out_dir, xs=("tokens",), log=False, data_dir=None, val_tokens=4096, min_count=10,
              checkpoint=True, strict=False, verbose=True):
    """Draw every figure that the runs support into out_dir; returns the written paths. A figure that
    cannot be drawn (no routing, no checkpoint, no validation data) is skipped with a note on
    stderr; with strict=False any other error in a figure is a note too (training must not fail
    at the very end because of a plot)."""
    runs = load_runs(out_dirs)
    out_dir = make_out_dir(out_dir)
    written, tables = [], []

    def attempt(name, make):
        try:
            fig = make()
        except Skip as e:
            print(f"note: skipped {name}: {e}", file=sys.stderr)
            return
        except Exception as e:
            if strict:
                raise
            print(f"note: {name} failed ({type(e).__name__}: {e})", file=sys.stderr)
            return
        if fig is not None:
            fig.savefig(out_dir / name)
            written.append(out_dir / name)

    def per_run(name, run):
        return name if len(runs) == 1 else name.replace(".", f"_{run.name}.")

    for x in xs:
        attempt("loss.png" if x == "tokens" else f"loss_{x}.png", lambda: plot_loss(runs, x, log))
    routed = [r for r in runs if r.routing_rows]
    if routed:
        attempt("ent_load.png", lambda: plot_ent_load(routed))
        attempt("load_minmax.png", lambda: plot_load_minmax(routed))
        attempt("conf_entropy.png", lambda: plot_conf_entropy(routed))
        uoe_runs = [r for r in routed if r.variant == "uoe" and r.config.get("vse", True)]
        if uoe_runs:
            attempt("vse_share.png", lambda: plot_vse_share(uoe_runs))
    for run in routed:
        attempt(per_run("load_heatmap.png", run), lambda: plot_load_heatmap(run))
        if not checkpoint:
            continue
        state = {}

        def routing_on_val():   # once per run for all figures; a failure is remembered too
            if "error" in state:
                raise state["error"]
            if not state:
                try:
                    path, dtype, meta = find_val(run, data_dir)
                    model = load_model(run)
                    val = np.memmap(path, dtype=dtype, mode="r")
                    state.update(val_routing(model, val, val_tokens), model=model, meta=meta)
                except Exception as e:
                    state["error"] = e
                    raise
            return state

        if run.variant == "uoe":
            attempt(per_run("intensity.png", run),
                    lambda: plot_intensity(run, routing_on_val()["scores"], routing_on_val()["model"].config))

        def spec_figure():
            r = routing_on_val()
            spec = specialisation(r["tokens"], r["topk_idx"], r["model"].config.n_expert, min_count)
            show = token_decoder(run.meta or r["meta"])
            md = specialisation_markdown(spec, show, run.label, len(r["tokens"]), min_count)
            md_path = out_dir / per_run("specialisation.md", run)
            md_path.write_text(md + "\n")
            written.append(md_path)
            tables.append(md)
            return plot_specialisation(run, spec, show)
        attempt(per_run("specialisation.png", run), spec_figure)
    if verbose:
        print(f"plots: wrote {len(written)} files to {out_dir}: {', '.join(p.name for p in written)}")
    return written, tables


def plot_run(out_dir, data_dir=None, strict=False):
    """All figures of one finished run, into its out_dir (train.py calls this at the end)."""
    return plot_runs([out_dir], out_dir, xs=("tokens", "flops"), data_dir=data_dir, strict=strict)[0]


class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit 2 (the project's error convention)
        print(f"error: {message}; see python plot.py --help", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = Parser(description="Plot loss curves and routing statistics of train.py runs.")
    p.add_argument("runs", nargs="+", help="out_dir of one or several runs")
    p.add_argument("--out_dir", help="where the figures go (default: the run's folder, or figures/ for several)")
    p.add_argument("--x", choices=list(X_AXES), default="tokens", help="x axis of the loss curves")
    p.add_argument("--log", action="store_true", help="loss curves on log-log axes")
    p.add_argument("--data_dir", help="dataset folder with val.bin (default: data/<dataset> from run.json)")
    p.add_argument("--val_tokens", type=int, default=4096, help="validation tokens for checkpoint figures")
    p.add_argument("--min_count", type=int, default=10, help="specialisation: least occurrences of a token type")
    p.add_argument("--no_ckpt", action="store_true", help="skip the figures that need the checkpoint")
    args = p.parse_args(argv)
    out_dir = args.out_dir or (args.runs[0] if len(args.runs) == 1 else "figures")
    try:
        _, tables = plot_runs(args.runs, out_dir, xs=(args.x,), log=args.log, data_dir=args.data_dir,
                              val_tokens=args.val_tokens, min_count=args.min_count, checkpoint=not args.no_ckpt)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for md in tables:
        print(md)


if __name__ == "__main__":
    main()
