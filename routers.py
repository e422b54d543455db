"""
Are a trained MoE's neurons secretly routers? The paper's title, tested on your own checkpoints.

    python routers.py out-moe                          # tables; routers.json, routers.md, routers.png into out-moe/
    python routers.py RUN RUN ... --out_dir=assets     # several runs: one JSON, one markdown section, one figure
    python routers.py --report=assets/routers.json     # print the markdown section written from a routers.json
    python routers.py --report=assets/routers.json --write   # put it into RESULTS.md §6, its paragraph into README.md
    python routers.py --report=assets/routers.json --check   # compare: exit 1, naming the first line that differs

Options are train.py's: --key=value (Python literals; strings may be bare); the run folders (train.py's
--out_dir: ckpt.pt, run.json, metrics.jsonl) come first, without a dash. moe and uoe checkpoints.

The question, as this project reads the paper's title (its own operationalisation: the paper's text is not
available to the project): does expert i's activation intensity I_i = ||SiLU(x W_g^i)[U]||_2 over a set U of
its hidden units (METHOD.md §1, §3) say which tokens the router sends to expert i, more than the intensity of
another expert does? The protocol below was written down before the models it names were measured; the
options' defaults are its settings.

Tokens. Validation: --val_windows=64 windows of the model's block_size (256: 16384 tokens) at evenly spaced
offsets of val.bin; training: --train_windows=64 windows of train.bin, taken the same way, used only to choose
and calibrate units (2) and fit the probe (4). A window is one sequence and its tokens are not independent, so
every interval comes from a bootstrap over windows: --resamples=9999 draws of the validation windows with
replacement (the same draws for every statistic of a model; each statistic recomputed exactly on the resampled
tokens), the 95% percentile interval, and the two-sided bootstrap p-value of an estimate d,
p = min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1)), below 0.05 where the 95% interval excludes 0.
Label. y_i = 1 for a token when expert i is among its top K in the model's own routing (moe: the router;
uoe: its routing neurons' score).

1. Unsupervised, the primary test. Per layer and unit set U, on validation tokens: AUROC_i(j), the probability
   that expert j's intensity I_j is higher on a token with y_i = 1 than on one with y_i = 0 (ties count 1/2).
   own = mean over experts i of AUROC_i(i); shift k = mean over i of AUROC_i((i + k) mod E), k = 1..E-1: a null
   that keeps every statistic of the trained intensities and breaks only the pairing of an expert with its own
   units. Reported: own, the E - 1 shifts, d = own - mean of the shifts with its interval, the rank of own among
   the E assignments (1 = highest), and the top-K overlap |topK(I) & router's| / K of own and of the shifts
   (chance K/E). Two nulls must both be rejected, as they answer two doubts: (i) token sampling, the window
   bootstrap p of d; (ii) chance pairing: with nothing special in the pairing of router column i with expert i's
   units, the own pairing is one of the E! ways to give each expert's label one expert's intensity, all alike;
   p_pairing is the share of pairings whose mean AUROC is at least as far out on own's side, doubled (all
   8! = 40320 pairings for E <= 8, else 40000 drawn with --seed). The bootstrap alone does not suffice: the fixed
   random weights of an untrained model already give d a small value that 16384 tokens measure precisely (this
   project saw most intervals of an MoE after 2 training steps exclude 0, with pairing p-values of 0.06 and
   more). The test's p is the larger of the two (an intersection-union test). Unit sets: moe "all" (the D units)
   and "subset" (N_s = D // E units per expert, drawn at random per expert and layer with --seed and kept under
   the shifts: an MoE has no special units); uoe "rest" (the D - N_s units that are not routing neurons, which
   its router never reads), "rest subset" (N_s of them, drawn the same way), and "routing" (its routing
   neurons: a check of the machinery, whose top-K overlap is 1 by construction; not a test). Family: every
   (model, layer, tested unit set: moe all and subset, uoe rest and rest subset) in one command's JSON,
   Holm-adjusted together; for the 9 models below 9 x 4 x 2 = 72 tests. Verdict per test: "aligned" where the
   Holm-adjusted p < 0.05 and d > 0 (the own intensity ranks the router's tokens higher than the other experts'
   intensities do), "anti-aligned" where it is < 0.05 and d < 0, else "no evidence".
2. Supervised selection, a second test (no verdict of its own). Per expert, N_s units chosen on the training
   windows by greedy forward selection (each step adds the unit that makes the sum of a_j^2 over the chosen
   units correlate best, Pearson, with the expert's routing score s_i: moe its router logit) among the
   candidate units (moe: all D; uoe: the rest), and a calibration z = (I - mean) / std with the mean and std of
   their intensity on the training windows (trained experts' norms have different scales). On the validation
   windows: the per-expert AUROC (mean over experts) and the top-K overlap of the calibrated scores with the
   router's choice. Null 1, the E - 1 shifts: for expert i, units of expert (i + k) mod E chosen and calibrated
   to track s_i. Null 2, --random_draws=10 draws of random gate weights N(0, sigma^2) (sigma: the std of the
   layer's candidate W_g columns; --seed), the same selection. Reported: own, each null's mean, min and max,
   the rank of own among own + the E - 1 shifts and among own + the draws, and own minus each null's mean with
   its interval.
3. Functional test. The validation loss when one layer (each in turn) or every layer chooses its K experts by
   a choice rule while the gate rule is held fixed for every choice rule. Choice rules: router (the model's
   own); intensity (own intensity over the candidate units, raw); best (own units of 2, calibrated); shift k
   (the units of shift k of 2, calibrated: mean and range over k); random (K experts uniformly at random per
   token, --random_choices=3 draws, --seed: mean and range). Gate rules: router (softmax of the model's own
   scores over the chosen experts: for moe that is p[I] / sum p[I], for uoe softmax(s[I])) and uniform (1/K).
   The rest of the layer (uoe's virtual shared expert, moe's shared experts) runs as in the model; layers not
   swapped route as the model does, on their inputs. Reported: each loss and its difference to the model's own
   loss with an interval. Per-layer rows show which layer drives the every-layer figure.
4. Ceiling, not a test: a ridge probe from the FFN input x to the E routing scores, fit on the training
   windows, R^2 on the validation windows. A router's logits are linear in x, so any bank of units that
   approximates x approximates them: why selected units that agree with the router say little by themselves.

The models (seeds 0, 1, 2; --max_iters=300 is a run of its own with its own cosine schedule), then one command
(routers.json with the settings, every number and interval and each model's identity: checkpoint step, seed,
config, sha256 of uoe.py + train.py, torch version; routers.md, the markdown section written from the JSON by
markdown(); routers.png). About 2 minutes per default-size model on one CPU core:

    for s in 0 1 2; do
      OMP_NUM_THREADS=1 python train.py --ffn=moe --seed=$s --max_iters=300 --plot=False \\
          --out_dir=out-routers/moe-300-s$s
      OMP_NUM_THREADS=1 python train.py --ffn=moe --seed=$s --plot=False --out_dir=out-routers/moe-1000-s$s
      OMP_NUM_THREADS=1 python train.py --ffn=uoe --seed=$s --plot=False --out_dir=out-routers/uoe-1000-s$s
    done
    OMP_NUM_THREADS=1 python routers.py out-routers/moe-300-s{0,1,2} out-routers/moe-1000-s{0,1,2} \\
        out-routers/uoe-1000-s{0,1,2} --out_dir=assets
"""
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import plot
import study
import uoe
from harness import REPO, write_blocks, write_json
from train import UserError, help_text, option_table, parse_options, resolve_device, write_atomic

SUPPORTED = ("moe", "uoe")
LEVEL = 0.95                    # interval level
ALPHA = 0.05                    # Holm-adjusted p below this: a verdict
GATE_RULES = ("router", "uniform")
# random streams, one per use: changing how many of one kind are drawn leaves the others as they were
SUBSET_STREAM, WEIGHT_STREAM, CHOICE_STREAM, RESAMPLE_STREAM, PAIRING_STREAM = range(5)
EXACT_PAIRINGS = 8              # up to this many experts every pairing (8! = 40320) is counted, above it a sample
SAMPLED_PAIRINGS = 40000


@dataclass
class RoutersConfig:
    out_dir: str = ""              # where routers.json/.md/.png go ('': the run folder, figures/ for several)
    data_dir: str = ""             # dataset folder with train.bin and val.bin ('': the run's, as plot.py finds it)
    val_windows: int = 64          # validation windows of block_size tokens: every measure
    train_windows: int = 64        # training windows: selection and calibration of units, the probe
    n_units: int | None = None     # N_s, units in the subset and the selected set (None: the checkpoint's n_routing)
    resamples: int = 9999          # bootstrap resamples of the validation windows
    random_draws: int = 10         # random gate weights: the supervised selection's second null
    random_choices: int = 3        # draws of the random choice rule
    batch_size: int = 8            # windows per forward
    seed: int = 1337               # the random subsets, weights, choices and resamples
    device: str = "auto"           # auto (cuda if available), cpu, cuda, cuda:1
    report: str = ""               # a routers.json: print its markdown section and stop
    write: bool = False            # with --report: put the section into RESULTS.md, its paragraph into README.md
    check: bool = False            # with --report: exit 1, naming the first difference, if the committed text differs
    readme: str = ""               # with --write/--check: the README.md ('': the repository's)
    results_md: str = ""           # with --write/--check: the RESULTS.md ('': the repository's)


# -----------------------------------------------------------------------------
# options and output

def parse(argv):
    """(run folders, options): the run folders first (no dash), then options in train.py's dialect."""
    runs = [a for a in argv if not a.startswith("-")]
    table = option_table([RoutersConfig])
    opts, _ = parse_options([a for a in argv if a.startswith("-")], table,
                            help_text(table, __doc__, [("routers.py", RoutersConfig)]), "routers.py")
    if (opts["write"] or opts["check"]) and not opts["report"]:
        raise UserError("--write and --check go with --report, e.g. python routers.py --report=assets/routers.json "
                        "--write")
    if not runs and not opts["report"]:
        raise UserError("give the out_dir of at least one trained moe or uoe run, e.g. python routers.py out-moe")
    if runs and opts["report"]:
        raise UserError("give either run folders to measure or --report=routers.json to print, not both")
    if opts["write"] and opts["check"]:
        raise UserError("give --write or --check, not both")
    if (opts["readme"] or opts["results_md"]) and not (opts["write"] or opts["check"]):
        raise UserError("--readme and --results_md go with --write or --check")
    for key in ("val_windows", "train_windows", "resamples", "random_draws", "random_choices", "batch_size"):
        if opts[key] < 1:
            raise UserError(f"--{key}={opts[key]} must be >= 1")
    if opts["n_units"] is not None and opts["n_units"] < 1:
        raise UserError(f"--n_units={opts['n_units']} must be >= 1 (or None)")
    return runs, opts


def say(text):
    """print, and carry on when the reader of stdout has gone (`| head`): the files still get written."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when exit flushes


def generator(seed, stream):
    return torch.Generator().manual_seed(seed * 8 + stream)


# -----------------------------------------------------------------------------
# data: windows of block_size + 1 tokens (inputs and targets) at evenly spaced offsets

def windows(tokens, n_windows, block_size):
    """(n_windows, T+1) int64 windows of the 1-D id array `tokens` at evenly spaced fixed offsets, T = block_size."""
    T = block_size
    if len(tokens) < T + 1:
        raise UserError(f"only {len(tokens)} tokens in the dataset, fewer than a window of {T + 1}; "
                        "prepare a larger one")
    starts = np.linspace(0, len(tokens) - T - 1, n_windows).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + T + 1], dtype=np.int64) for s in starts]))


def run_windows(run, model, opts):
    """(train windows, val windows) of the run's dataset."""
    try:
        val_path, dtype, _ = plot.find_val(run, opts["data_dir"] or None)
    except plot.Skip as e:
        raise UserError(str(e)) from None
    train_path = val_path.with_name("train.bin")
    if not train_path.is_file():
        raise UserError(f"no train.bin beside {val_path} (units are chosen on training tokens); pass --data_dir")
    out = []
    for path, n in ((train_path, opts["train_windows"]), (val_path, opts["val_windows"])):
        w = windows(np.memmap(path, dtype=dtype, mode="r"), n, model.config.block_size)
        if int(w.max()) >= model.config.vocab_size:
            raise UserError(f"{path} has token id {int(w.max())} >= vocab_size {model.config.vocab_size}: "
                            "not this run's dataset; pass the right --data_dir")
        out.append(w)
    return out


# -----------------------------------------------------------------------------
# the model, layer by layer

def embed(model, idx):
    tr = model.transformer
    return tr.drop(tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device)))


@torch.no_grad()
def forward(model, x, ffn, first=0, mid=False, rows=None):
    """GPT.forward from the residual stream x (B, T, C) entering block `first` (embed's output for first = 0),
    or with mid=True x between its attention and its FFN, with each FFN call replaced by
    ffn(layer, block, x, rows): the FFN's output for the residual x (B, T, C) (the FFN reads ln_2(x)); rows
    (B*T,): the positions of these tokens among all measured tokens. Returns the logits (B, T, V)."""
    for layer in range(first, len(model.transformer.h)):
        block = model.transformer.h[layer]
        if not (mid and layer == first):
            x = x + block.attn(block.ln_1(x))
        x = x + block.mlp_dropout(ffn(layer, block, x, rows))
    return model.lm_head(model.transformer.ln_f(x))


def window_ce(logits, targets):
    """Cross-entropy summed over each window's tokens, (B,) float64."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return ce.view(targets.shape).double().sum(-1)


def route(mlp, x):
    """(scores (N, E), topk_idx (N, K)): how the FFN mlp routes x (N, C), as its forward does: moe the router
    logits and the top K of their softmax; uoe its routing neurons' scores and their top K."""
    K = mlp.config.top_k
    if isinstance(mlp, uoe.UoEFFN):
        pre, a = mlp.routing_activations(x)
        scores = mlp.activation_intensity(pre, a, mlp.routing_hidden(x, a) if mlp.h_for_all() else None)
        return scores, scores.topk(K, dim=-1).indices
    logits = uoe.routing_matmul(x, mlp.router)
    return logits, F.softmax(logits, dim=-1).topk(K, dim=-1).indices


def gates(rule, scores, topk_idx):
    """The gates (N, K) of the chosen experts topk_idx (N, K): "router", the softmax of the model's own scores
    (N, E) over the chosen (moe: = p[I] / sum p[I], Mixtral's renormalisation; uoe: softmax(s[I])); "uniform", 1/K."""
    if rule == "uniform":
        return torch.full(topk_idx.shape, 1 / topk_idx.shape[1], dtype=scores.dtype, device=scores.device)
    return F.softmax(scores.gather(1, topk_idx), dim=-1)


def run_chosen(mlp, u, topk_idx, gates):
    """The FFN mlp on u (B, T, C) with the experts topk_idx (N, K) and gates (N, K) given instead of its own
    choice; the rest of the layer (uoe's virtual shared expert, moe's shared experts) as in its forward: the
    layer's run_choice, which its forward ends with."""
    B, T, C = u.shape
    return mlp.run_choice(u.reshape(-1, C), topk_idx, gates.to(u.dtype)).view(B, T, C)


@torch.no_grad()
def collect(model, idx, batch_size):
    """The model's own forward on windows idx (n, T+1). Per layer: "mid" (n, T, C), the residual before its FFN;
    "u" (N, C), the FFN's input ln_2(mid); "scores" (N, E) and "topk_idx" (N, K), its routing. And the
    cross-entropy summed per window (n,)."""
    layers, losses = {}, []

    def ffn(layer, block, x, rows):
        u = block.ln_2(x)
        y = block.mlp(u)
        seen = layers.setdefault(layer, {"mid": [], "u": [], "scores": [], "topk_idx": []})
        for key, value in (("mid", x), ("u", u.flatten(0, 1)), ("scores", block.mlp.last_routing["scores"]),
                           ("topk_idx", block.mlp.last_routing["topk_idx"])):
            seen[key].append(value)
        return y

    device = next(model.parameters()).device
    for w in idx.split(batch_size):
        w = w.to(device)
        losses.append(window_ce(forward(model, embed(model, w[:, :-1]), ffn), w[:, 1:]))
    return {layer: {k: torch.cat(v) for k, v in d.items()} for layer, d in layers.items()}, torch.cat(losses).cpu()


# -----------------------------------------------------------------------------
# units and intensities

def candidates(mlp):
    """The hidden units whose routing information is asked about: moe all D, uoe the D - N_s that are not
    routing neurons."""
    D = mlp.w_gate.shape[-1]
    return torch.arange(mlp.config.n_routing if isinstance(mlp, uoe.UoEFFN) else 0, D, device=mlp.w_gate.device)


def columns(w, units):
    """The gate columns units (E, U) of each expert of w (E, C, D): (E, C, U)."""
    return w.gather(2, units.unsqueeze(1).expand(-1, w.shape[1], -1))


def activations(x, w):
    """a = SiLU(x W_g^i) of every unit of w (E, C, U) on x (N, C): (N, E, U), in >= float32 like routing scores."""
    E, C, U = w.shape
    return F.silu(uoe.routing_matmul(x, w.transpose(0, 1).reshape(C, E * U))).view(-1, E, U)


def intensity(x, w, chunk=4096):
    """I_i = ||SiLU(x W_g^i)||_2 of each expert's units w (E, C, U) on x (N, C): (N, E), in chunks of tokens."""
    return torch.cat([activations(part, w).norm(dim=-1) for part in x.split(chunk)])


def shifted(scores, k):
    """The assignment 'expert i scored by expert (i + k) mod E': column i of the result is column (i + k) mod E
    of scores (N, E)."""
    return scores.roll(-k, dims=-1)


def subsets(mlp, n_units, gen):
    """(E, n_units) random candidate units per expert (the unsupervised 'subset'), fixed by gen."""
    cand = candidates(mlp)
    return torch.stack([cand[torch.randperm(len(cand), generator=gen)[:n_units].to(cand.device)]
                        for _ in range(mlp.w_gate.shape[0])])


def unit_sets(mlp, n_units, gen):
    """name -> (units (E, U), tested): the unsupervised unit sets of the layer (module docstring, 1)."""
    E = mlp.w_gate.shape[0]
    cand = candidates(mlp).expand(E, -1)
    if isinstance(mlp, uoe.UoEFFN):
        Ns = mlp.config.n_routing
        routing = torch.arange(Ns, device=cand.device).expand(E, Ns)
        return {"rest": (cand, True), "rest subset": (subsets(mlp, n_units, gen), True), "routing": (routing, False)}
    return {"all": (cand, True), "subset": (subsets(mlp, n_units, gen), True)}


# -----------------------------------------------------------------------------
# statistics over windows: every statistic is recomputed exactly on each bootstrap resample of the windows,
# from per-window sums (a resample that draws window w c_w times weighs its tokens, and its pairs, by c_w)

def resample_counts(n_windows, n_resamples, gen):
    """(B, W) float64: how often each of W windows is drawn in each of B resamples of W windows with replacement."""
    draws = torch.randint(n_windows, (n_resamples, n_windows), generator=gen)
    return torch.zeros(n_resamples, n_windows, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_resamples, n_windows, dtype=torch.float64))


def pair_counts(scores, labels, window, n_windows):
    """The AUROCs of scores (N, A, E) (A assignments of a score to each expert) for labels (N, E) bool, split
    by windows: C (A, E, W, W), C[a, i, u, v] = the sum over tokens p in window u with labels[p, i] and q in
    window v without of [s_p > s_q] + [s_p = s_q] / 2, s = scores[:, a, i]; and the counts pos, neg (E, W) of
    such tokens. window (N,): each token's window."""
    N, A, E = scores.shape
    W = n_windows
    hot = F.one_hot(window, W).double()                                  # (N, W)
    pos, neg = hot.T @ labels.double(), hot.T @ (~labels).double()       # (W, E)
    # small integer counts: the cumulative sum below is the costly step (int16 holds 2x a window's tokens)
    count = torch.int16 if 2 * int(torch.bincount(window).max()) < 2 ** 15 else torch.int32
    every = torch.arange(N)
    C = torch.zeros(A, E, W, W, dtype=torch.float64)
    for a in range(A):
        for i in range(E):
            s, order = scores[:, a, i].sort()
            y, win = labels[order, i], window[order]
            # below[v, n]: the tokens of window v without the label among the n lowest scores
            below = torch.zeros(W, N + 1, dtype=count)
            below[win[~y], every[~y] + 1] = 1
            below = below.cumsum(1, dtype=count)
            new = torch.ones(N, dtype=torch.bool)
            new[1:] = s[1:] != s[:-1]
            start = torch.nonzero(new).squeeze(1)                        # first position of each run of ties
            end = torch.cat([start[1:], torch.tensor([N])])              # one past its last
            group = (new.cumsum(0) - 1)[y]                               # the run of each labelled token
            twice = below[:, start[group]] + below[:, end[group]]        # (W, n_pos) 2 x (below + half the tied)
            C[a, i] = torch.zeros(W, W, dtype=torch.float64).index_add_(1, win[y], twice.double()).T
    return C / 2, pos.T, neg.T


def aurocs(C, pos, neg, counts, chunk=500):
    """AUROC (B, A, E) of pair_counts' statistics with the windows weighted by counts (B, W) (all ones: the
    measured tokens); NaN where an expert has no positive or no negative token."""
    B, W = counts.shape
    A, E = C.shape[:2]
    flat = C.permute(2, 0, 1, 3).reshape(W, A * E * W)
    out = []
    for c in counts.split(chunk):
        num = ((c @ flat).view(-1, A * E, W) * c.unsqueeze(1)).sum(-1).view(-1, A, E)
        den = ((c @ pos.T) * (c @ neg.T)).unsqueeze(1)                   # (b, 1, E)
        out.append(torch.where(den > 0, num / den.clamp_min(1e-300), torch.nan))
    return torch.cat(out)


def window_means(per_window, counts, sizes):
    """Means over tokens (B, ...) of per-window sums per_window (W, ...) with sizes (W,) tokens, windows
    weighted by counts (B, W)."""
    return torch.tensordot(counts, per_window, dims=1) / (counts @ sizes).view(-1, *[1] * (per_window.dim() - 1))


def interval(est, boot):
    """{"est", "lo", "hi", "p"}: est with the percentile interval at LEVEL of its bootstrap values boot (B,)
    and the two-sided bootstrap p-value of est != 0."""
    boot = boot[~torch.isnan(boot)].double()
    if math.isnan(est) or not len(boot):    # no expert both chosen and not chosen: nothing to test
        return {"est": float(est), "lo": math.nan, "hi": math.nan, "p": 1.0}
    lo, hi = torch.quantile(boot, torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=torch.float64)).tolist()
    tail = min(int((boot <= 0).sum()), int((boot >= 0).sum()))
    return {"est": float(est), "lo": lo, "hi": hi, "p": min(1.0, 2 * (1 + tail) / (len(boot) + 1))}


def pairing_p(M, gen):
    """The pairing null of own = mean_i M[i, i], M (E, E) the AUROCs AUROC_i(j) (expert j's intensity for 'the
    router chose i'): with no special pairing, the own one is one of the E! ways to give each expert one
    intensity, all alike. Returns the two-sided p (the share of pairings whose mean is at least as far out on
    own's side, doubled; every pairing for E <= EXACT_PAIRINGS, else SAMPLED_PAIRINGS random ones and the own)
    and the pairings' mean and 2.5% / 97.5% quantiles."""
    E = M.shape[0]
    if E <= EXACT_PAIRINGS:
        pairings, extra = torch.tensor(list(itertools.permutations(range(E)))), 0   # the own one among them
    else:
        pairings, extra = torch.rand(SAMPLED_PAIRINGS, E, generator=gen).argsort(-1), 1
    values = M[torch.arange(E), pairings].nanmean(-1)                    # (P,)
    own, tol = M.diagonal().nanmean(), 1e-12
    tail = min(int((values >= own - tol).sum()), int((values <= own + tol).sum())) + extra
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype)).tolist()
    return min(1.0, 2 * tail / (len(values) + extra)), dict(mean=values.mean().item(), lo=lo, hi=hi)


def verdict(d, alpha=ALPHA):
    """'aligned' / 'anti-aligned' / 'no evidence' for a tested difference d (own - shifts) with its p_holm."""
    if d["p_holm"] >= alpha:
        return "no evidence"
    return "aligned" if d["est"] > 0 else "anti-aligned"


def rank_of(own, others):
    """1 + how many of others are above own (1: own is the highest)."""
    return 1 + sum(o > own for o in others)


def assignment_stats(scores, labels, window, n_windows, counts, sizes, top_k):
    """AUROC and top-K overlap of A assignments scores (N, A, E) against labels (N, E): point values (A,) (means
    over experts; AUROC per expert (A, E)) and their bootstrap values (B, A)."""
    scores = scores.cpu()
    C, pos, neg = pair_counts(scores, labels, window, n_windows)
    ones = torch.ones(1, n_windows, dtype=torch.float64)
    auc, auc_boot = aurocs(C, pos, neg, ones)[0], aurocs(C, pos, neg, counts)
    chosen = scores.topk(top_k, dim=-1).indices                            # (N, A, K)
    overlap = labels.unsqueeze(1).expand(-1, scores.shape[1], -1).gather(2, chosen).double().mean(-1)   # (N, A)
    per_window = torch.zeros(n_windows, scores.shape[1], dtype=torch.float64).index_add_(0, window, overlap)
    return dict(auc=auc.nanmean(-1), auc_per_expert=auc, auc_boot=auc_boot.nanmean(-1),
                overlap=per_window.sum(0) / sizes.sum(), overlap_boot=window_means(per_window, counts, sizes))


# -----------------------------------------------------------------------------
# 1. unsupervised

def unsupervised(mlp, x, labels, window, n_windows, counts, sizes, n_units, gen, pairing_gen):
    """Per unit set: own and shifted AUROCs and overlaps on x (N, C) for labels (N, E), and the two p-values of
    own - shifts (module docstring, 1)."""
    E, K = labels.shape[1], mlp.config.top_k
    experts = torch.arange(E)
    out = {}
    for name, (units, tested) in unit_sets(mlp, n_units, gen).items():
        I = intensity(x, columns(mlp.w_gate, units))                          # (N, E)
        s = assignment_stats(torch.stack([shifted(I, k) for k in range(E)], 1), labels, window, n_windows,
                             counts, sizes, K)
        d = interval(s["auc"][0] - s["auc"][1:].mean(), s["auc_boot"][:, 0] - s["auc_boot"][:, 1:].mean(1))
        M = torch.empty(E, E, dtype=torch.float64)                          # M[i, j] = AUROC_i(j)
        for k, row in enumerate(s["auc_per_expert"]):                       # assignment k: AUROC_i((i + k) mod E)
            M[experts, (experts + k) % E] = row
        d["p_pairing"], pairings = pairing_p(M, pairing_gen)
        d["p_test"] = max(d["p"], d["p_pairing"])                         # both nulls must go
        out[name] = dict(units=units.shape[1], tested=tested, own=s["auc"][0].item(), shifts=s["auc"][1:].tolist(),
                         own_per_expert=s["auc_per_expert"][0].tolist(), diff=d, pairings=pairings,
                         rank=rank_of(s["auc"][0].item(), s["auc"][1:].tolist()),
                         overlap=dict(own=s["overlap"][0].item(), shifts=s["overlap"][1:].tolist()))
    return out


# -----------------------------------------------------------------------------
# 2. supervised selection

def add_unit_stats(acc, sq, targets):
    """Add a batch to the running sums (float64) from which greedy_units works: sq (N, E, U) the squared unit
    activations a_ij^2, targets (S, N, E) S targets s_i to track. acc: a dict, empty at first."""
    per_expert = sq.transpose(0, 1)                                      # (E, N, U)
    xx = (per_expert.transpose(1, 2) @ per_expert).double()              # in sq's dtype: the costly product
    sq, targets = sq.double(), targets.double()
    for key, value in (("n", sq.shape[0]), ("x", sq.sum(0)), ("xx", xx), ("y", targets.sum(1)),
                       ("yy", targets.square().sum(1)), ("xy", torch.einsum("sne,neu->seu", targets, sq))):
        acc[key] = acc.get(key, 0) + value
    return acc


def greedy_units(acc, n_units, target=0):
    """(E, n_units) units per expert by greedy forward selection: each step adds the unit that makes the sum of
    a_ij^2 over the chosen units j (the squared intensity over them) correlate best, over the tokens, with the
    target s_i (Pearson). From the sums of add_unit_stats: cov(sum_S x_j, y) = sum_S cov(x_j, y), var = sum_S,S cov."""
    n = acc["n"]
    mean_x, mean_y = acc["x"] / n, acc["y"][target] / n                  # (E, U), (E,)
    cov_xx = acc["xx"] / n - mean_x.unsqueeze(-1) * mean_x.unsqueeze(-2)   # (E, U, U)
    cov_xy = acc["xy"][target] / n - mean_x * mean_y.unsqueeze(-1)       # (E, U)
    var_y = (acc["yy"][target] / n - mean_y.square()).clamp_min(1e-30)  # (E,)
    E, U = cov_xy.shape
    rows = torch.arange(E, device=cov_xy.device)
    cov_sum = torch.zeros(E, dtype=cov_xy.dtype, device=cov_xy.device)  # cov(sum over S, y)
    var_sum = torch.zeros_like(cov_sum)                                  # var(sum over S)
    cross = torch.zeros_like(cov_xy)                                     # (E, U) cov(x_j, sum over S)
    taken = torch.zeros(E, U, dtype=torch.bool, device=cov_xy.device)
    chosen = []
    for _ in range(n_units):
        var = (var_sum.unsqueeze(-1) + 2 * cross + cov_xx.diagonal(dim1=1, dim2=2)).clamp_min(1e-30)
        r = (cov_sum.unsqueeze(-1) + cov_xy) / (var * var_y.unsqueeze(-1)).sqrt()   # (E, U) with unit j added
        j = r.masked_fill(taken, -float("inf")).argmax(dim=-1)           # (E,)
        cov_sum += cov_xy[rows, j]
        var_sum += 2 * cross[rows, j] + cov_xx[rows, j, j]
        cross += cov_xx[rows, :, j]
        taken[rows, j] = True
        chosen.append(j)
    return torch.stack(chosen, dim=-1)                                   # (E, n_units) in the order chosen


def select(w, x, scores, shifts, n_units, chunk=4096):
    """For each k in shifts, per expert i the n_units units of expert (i + k) mod E whose intensity tracks expert
    i's score s_i best (greedy_units) on training tokens x (N, C) with scores (N, E). Per k a dict: "w" (E, C,
    n_units), row j the chosen gate columns of expert j (chosen for s_{j-k}); "mean", "std" (E,), their intensity's
    on x (the calibration); "units" (E, n_units), the chosen columns of w."""
    acc = {}
    targets = torch.stack([scores.roll(k, dims=-1) for k in shifts])   # row j of target k: s_{j-k}
    for xs, ts in zip(x.split(chunk), targets.split(chunk, dim=1)):
        add_unit_stats(acc, activations(xs, w).square(), ts)
    out = []
    for t in range(len(shifts)):
        units = greedy_units(acc, n_units, t)
        sel = columns(w, units)
        I = intensity(x, sel)
        out.append(dict(w=sel, mean=I.mean(0), std=I.std(0).clamp_min(1e-12), units=units))
    return out


def calibrated(x, sel, k=0):
    """Expert i's calibrated score on x (N, C) from a selection (select) made for shift k: (N, E)."""
    return shifted((intensity(x, sel["w"]) - sel["mean"]) / sel["std"], k)


def supervised(mlp, train, x, labels, window, n_windows, counts, sizes, n_units, n_draws, gen):
    """Own, shifted and random-weight selections (module docstring, 2). Returns (result, selections by shift)."""
    E, K = labels.shape[1], mlp.config.top_k
    cand = candidates(mlp)
    w = mlp.w_gate[:, :, cand]                                           # (E, C, U)
    sel = select(w, train["u"], train["scores"], range(E), n_units)
    sigma = w.std().item()
    draws = [select((torch.randn(w.shape, generator=gen, dtype=w.dtype) * sigma).to(w.device), train["u"],
                    train["scores"], [0], n_units)[0] for _ in range(n_draws)]
    scores = torch.stack([calibrated(x, s, k) for k, s in enumerate(sel)] + [calibrated(x, s) for s in draws], 1)
    s = assignment_stats(scores, labels, window, n_windows, counts, sizes, K)
    out = dict(units=n_units, candidates=len(cand), own_units=cand[sel[0]["units"]].tolist())   # hidden-unit ids
    for stat in ("auc", "overlap"):
        own, shift, draw = s[stat][0].item(), s[stat][1:E].tolist(), s[stat][E:].tolist()
        boot = s[stat + "_boot"]
        out[stat] = dict(own=own, shifts=shift, random=draw, rank_shifts=rank_of(own, shift),
                         rank_random=rank_of(own, draw),
                         diff_shifts=interval(own - np.mean(shift), boot[:, 0] - boot[:, 1:E].mean(1)),
                         diff_random=interval(own - np.mean(draw), boot[:, 0] - boot[:, E:].mean(1)))
    return out, sel


# -----------------------------------------------------------------------------
# 3. functional test

def choice_rules(model, val_tokens, sel, n_random, gen):
    """name -> rule(layer, mlp, x (N, C), rows (N,), own_idx (N, K)) -> topk_idx (N, K): the choice rules of the
    module docstring (3); sel: per layer the selections of supervised(); rows: the tokens' positions."""
    cfg = model.config
    E, K = cfg.n_expert, cfg.top_k
    device = next(model.parameters()).device
    random_idx = [[torch.rand(val_tokens, E, generator=gen).topk(K, dim=-1).indices.to(device)
                   for _ in range(cfg.n_layer)] for _ in range(n_random)]

    def by_score(score):
        return lambda layer, mlp, x, rows, own_idx: score(layer, mlp, x).topk(K, dim=-1).indices

    rules = {"router": lambda layer, mlp, x, rows, own_idx: own_idx,
             "intensity": by_score(lambda layer, mlp, x: intensity(x, mlp.w_gate[:, :, candidates(mlp)])),
             "best": by_score(lambda layer, mlp, x: calibrated(x, sel[layer][0]))}
    for k in range(1, E):
        rules[f"shift {k}"] = by_score(lambda layer, mlp, x, k=k: calibrated(x, sel[layer][k], k))
    for d in range(n_random):
        rules[f"random {d}"] = lambda layer, mlp, x, rows, own_idx, d=d: random_idx[d][layer][rows]
    return rules


@torch.no_grad()
def window_losses(model, seen, val, swapped, rule, gate, batch_size):
    """The cross-entropy summed per window (n,) when the FFNs of the layers `swapped` choose their experts by
    rule (choice_rules) and weigh them by the gate rule; the others run as the model. Starts from the model's
    own residual (collect's "mid") at the first swapped layer."""
    first = min(swapped)
    T = val.shape[1] - 1
    device = next(model.parameters()).device

    def ffn(layer, block, x, rows):
        u = block.ln_2(x)
        if layer not in swapped:
            return block.mlp(u)
        flat = u.reshape(-1, u.shape[-1])
        scores, own_idx = route(block.mlp, flat)
        topk_idx = rule(layer, block.mlp, flat, rows, own_idx)
        return run_chosen(block.mlp, u, topk_idx, gates(gate, scores, topk_idx))

    out = []
    for start in range(0, len(val), batch_size):
        w = val[start:start + batch_size].to(device)
        rows = torch.arange(start * T, (start + len(w)) * T, device=device)
        mid = seen[first]["mid"][start:start + len(w)]
        out.append(window_ce(forward(model, mid, ffn, first, True, rows), w[:, 1:]))
    return torch.cat(out).cpu()


def functional(model, seen, val, own, rules, counts, batch_size):
    """{"layers": [per layer], "every": ...}, each {gate: {rule: {"loss", "est", "lo", "hi"}}}: the loss when one
    layer or every layer chooses by each rule, and its difference to the model's own per-window losses own (n,)."""
    sizes = torch.full((len(val),), val.shape[1] - 1, dtype=torch.float64)
    n_layer = model.config.n_layer

    def row(swapped):
        out = {}
        for gate in GATE_RULES:
            out[gate] = {}
            for name, rule in rules.items():
                if name == "router" and gate == "router":
                    continue                                             # the model itself
                losses = window_losses(model, seen, val, swapped, rule, gate, batch_size)
                diff = losses - own
                est = (diff.sum() / sizes.sum()).item()
                d = interval(est, window_means(diff, counts, sizes))
                del d["p"]
                out[gate][name] = dict(loss=(losses.sum() / sizes.sum()).item(), **d)
        return out

    return dict(layers=[row({layer}) for layer in range(n_layer)], every=row(set(range(n_layer))))


# -----------------------------------------------------------------------------
# 4. ceiling

def probe_r2(train_x, train_y, x, y, ridge=1e-4):
    """R^2 (mean over the E scores) on x (N, C), y (N, E) of a ridge regression of y on x (with an intercept)
    fit on train_x, train_y; ridge: the penalty relative to the mean diagonal of X^T X."""
    def design(a):
        return torch.cat([a.double(), torch.ones(len(a), 1, dtype=torch.float64, device=a.device)], 1)
    X = design(train_x)
    gram = X.T @ X
    beta = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype,
                                                                                device=gram.device),
                              X.T @ train_y.double())
    res = y.double() - design(x) @ beta
    return (1 - res.square().sum(0) / (y.double() - y.double().mean(0)).square().sum(0)).mean().item()


# -----------------------------------------------------------------------------

def n_units_of(cfg, n_units):
    """N_s: --n_units, else the checkpoint's n_routing (D // E by default)."""
    R = n_units or cfg.n_routing
    if R < 1:   # a moe's n_routing, which GPTConfig checks for uoe only
        raise UserError(f"the checkpoint's n_routing={R} is no number of units for the subsets; pass --n_units")
    available = cfg.expert_hidden - (cfg.n_routing if cfg.ffn == "uoe" else 0)
    if R > available:
        raise UserError(f"--n_units={R} is more than the experts' {available} candidate hidden units")
    return R


@torch.no_grad()
def measure(model, train_idx, val_idx, n_units=None, batch_size=8, seed=1337, resamples=9999, random_draws=10,
            random_choices=3):
    """Every measure of the module docstring for one model on windows (n, T+1). Returns a JSON-able dict; the
    tested differences get their Holm-adjusted p and verdict from adjust()."""
    cfg = model.config
    if cfg.ffn not in SUPPORTED:
        raise UserError(f"routers.py measures moe and uoe checkpoints; this one is ffn={cfg.ffn}")
    if cfg.n_expert < 2:
        raise UserError("routers.py needs at least 2 experts per layer to compare assignments")
    R = n_units_of(cfg, n_units)
    train, _ = collect(model, train_idx, batch_size)
    seen, own = collect(model, val_idx, batch_size)
    W, T = val_idx.shape[0], val_idx.shape[1] - 1
    window = torch.arange(W).repeat_interleave(T)                         # (N,) each token's window
    sizes = torch.full((W,), T, dtype=torch.float64)
    counts = resample_counts(W, resamples, generator(seed, RESAMPLE_STREAM))
    subset_gen, weight_gen = generator(seed, SUBSET_STREAM), generator(seed, WEIGHT_STREAM)
    pairing_gen = generator(seed, PAIRING_STREAM)
    layers, selections = [], {}
    for layer, block in enumerate(model.transformer.h):
        x, mlp = seen[layer]["u"], block.mlp
        labels = torch.zeros(len(x), cfg.n_expert, dtype=torch.bool, device=x.device)
        labels.scatter_(1, seen[layer]["topk_idx"], True)
        labels = labels.cpu()
        un = unsupervised(mlp, x, labels, window, W, counts, sizes, R, subset_gen, pairing_gen)
        sup, selections[layer] = supervised(mlp, train[layer], x, labels, window, W, counts, sizes, R,
                                            random_draws, weight_gen)
        layers.append(dict(layer=layer, unsupervised=un, supervised=sup,
                           probe_r2=probe_r2(train[layer]["u"], train[layer]["scores"], x, seen[layer]["scores"])))
    rules = choice_rules(model, W * T, selections, random_choices, generator(seed, CHOICE_STREAM))
    loss = functional(model, seen, val_idx, own, rules, counts, batch_size)
    for row, by_gate in zip(layers, loss["layers"]):
        row["loss"] = by_gate
    return dict(ffn=cfg.ffn, n_expert=cfg.n_expert, top_k=cfg.top_k, expert_hidden=cfg.expert_hidden, n_units=R,
                n_routing=cfg.n_routing if cfg.ffn == "uoe" else None, chance_overlap=cfg.top_k / cfg.n_expert,
                val_windows=W, window_tokens=T, train_windows=train_idx.shape[0],
                own_loss=(own.sum() / (W * T)).item(), layers=layers, every_layer=loss["every"])


def holm_family(results):
    """[(result, layer row, unit set name)] of every tested difference: the Holm family."""
    return [(r, row, name) for r in results for row in r["layers"] for name, u in row["unsupervised"].items()
            if u["tested"]]


def adjust(results):
    """Holm-adjust the tested differences of all results together; add p_holm and the verdict to each."""
    family = holm_family(results)
    diffs = [row["unsupervised"][name]["diff"] for r, row, name in family]
    for d, p in zip(diffs, study.holm([d["p_test"] for d in diffs])):   # Holm, as the study's
        d["p_holm"] = p
        d["verdict"] = verdict(d)
    return len(family)


def identity(run, ckpt):
    """What the numbers of a model depend on besides the protocol: checkpoint step, seed, config, code, torch."""
    return dict(run=str(run.dir), step=ckpt.get("step"), seed=(ckpt.get("train_config") or {}).get("seed"),
                max_iters=(ckpt.get("train_config") or {}).get("max_iters"), config=ckpt.get("config"),
                code_sha256=study.sha256_of(study.REPO / f for f in study.CODE_FILES),
                code_files=list(study.CODE_FILES), torch=torch.__version__)


# -----------------------------------------------------------------------------
# the markdown section: every number formatted from the JSON

SET_WORDS = {"all": "all {n} units", "subset": "a random subset of {n} units",
             "rest": "the {n} units that are not routing neurons", "rest subset": "a random subset of {n} of them",
             "routing": "its {n} routing neurons"}


def set_label(name, units):
    return f"{name} {units}"


def families(runs):
    """(ffn, checkpoint step) -> the runs of that family, in the order given."""
    out = {}
    for r in runs:
        out.setdefault((r["ffn"], r["identity"]["step"]), []).append(r)
    return out


def family_name(ffn, step, runs):
    """'3 MoE models trained 1000 steps (seeds 0, 1, 2)'."""
    n = len(runs)
    seeds = ", ".join(str(r["identity"]["seed"]) for r in runs)
    return (f"{n} {'MoE' if ffn == 'moe' else 'UoE'} model{'s' * (n > 1)} trained {step} steps "
            f"(seed{'s' * (n > 1)} {seeds})")


def defined(values):
    """values without the undefined ones (NaN, or None in strict JSON): an AUROC with no chosen token."""
    return [v for v in values if v is not None and not math.isnan(v)]


def number(fmt):
    return lambda v: fmt(v) if defined([v]) else "n/a"


signed = number(lambda v: f"{v:+.3f}")
auc = number(lambda v: f"{v:.3f}")
percent = number(lambda v: f"{100 * v:.1f}%")


def span(values, fmt=signed):
    """'x to y' (or 'x' where both read the same) of the smallest and largest of values."""
    values = defined(values)
    if not values:
        return "n/a"
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo} to {hi}"


def with_interval(d):
    return f"{signed(d['est'])} [{signed(d['lo'])}, {signed(d['hi'])}]"


def mean_range(values, fmt=signed):
    values = defined(values)
    return f"{fmt(float(np.mean(values)))} ({fmt(min(values))} to {fmt(max(values))})" if values else "n/a"


def verdict_counts(runs, name):
    """'aligned with the routing in a of the n layers (which), anti-aligned in b (which) and no evidence either
    way in c (own - shifts x to y)'."""
    cases = [(row["layer"], row["unsupervised"][name]["diff"]) for r in runs for row in r["layers"]]

    def count(verdict):
        return sum(d["verdict"] == verdict for _, d in cases)

    def which(verdict):
        layers = [layer for layer, d in cases if d["verdict"] == verdict]
        if not layers:
            return ""
        if len(runs) == 1:
            return f" (layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))})"
        each = ", ".join(f"layer {layer} in {layers.count(layer)}" for layer in sorted(set(layers)))
        return f" ({each} of the {len(runs)} models)"
    return (f"aligned with the routing in {count('aligned')} of the {len(cases)} layers{which('aligned')}, "
            f"anti-aligned in {count('anti-aligned')}{which('anti-aligned')} and no evidence either way in "
            f"{count('no evidence')} (own − shifts {span([d['est'] for _, d in cases])})")


def mean_of(by_rule, rule):
    """A rule's loss difference; for shift and random the mean over shifts or draws."""
    if rule in ("shift", "random"):
        return float(np.mean([v["est"] for k, v in by_rule.items() if k.split()[0] == rule]))
    return by_rule[rule]["est"]


def family_verdicts(ffn, step, runs):
    """The paragraph's sentence on one family of models: the primary test's verdicts."""
    n = len(runs)
    sets = [(name, u["units"]) for name, u in runs[0]["layers"][0]["unsupervised"].items() if u["tested"]]
    parts = [f"the own intensity over {SET_WORDS[name].format(n=units)} is {verdict_counts(runs, name)}"
             if i == 0 else f"over {SET_WORDS[name].format(n=units)}: {verdict_counts(runs, name)}"
             for i, (name, units) in enumerate(sets)]
    models = family_name(ffn, step, runs)
    return f"In {'these ' + models if n > 1 else 'this ' + models.removeprefix('1 ')}, " + "; ".join(parts) + "."


def family_details(ffn, runs):
    """The sentences under a family's heading: uoe's check, the supervised selection and the functional test."""
    rows = [row for r in runs for row in r["layers"]]
    text = ""
    if ffn == "uoe":
        check = [row["unsupervised"]["routing"] for row in rows]
        text += (f"Its routing neurons, the check, give the routing's top K with overlap "
                 f"{span([c['overlap']['own'] for c in check], percent)} "
                 f"(own AUROC {span([c['own'] for c in check], auc)}). ")
    sup = [row["supervised"]["auc"] for row in rows]
    E, R = runs[0]["n_expert"], len(sup[0]["random"])
    text += (f"Units selected on training tokens ({runs[0]['n_units']} per expert among "
             f"{rows[0]['supervised']['candidates']}) reach an own AUROC of {span([s['own'] for s in sup], auc)}; "
             f"it is the highest of the {E} assignments (own and shifts) in "
             f"{sum(s['rank_shifts'] == 1 for s in sup)} of {len(sup)} layers and above all {R} random-weight draws "
             f"in {sum(s['rank_random'] == 1 for s in sup)}.")
    every = [r["every_layer"] for r in runs]

    def loss(gate, rule):
        return span([mean_of(e[gate], rule) for e in every])
    cand = "all-unit" if ffn == "moe" else "rest-unit"
    text += (f" Routing every layer by the own {cand} intensity changes the validation loss against the model's own "
             f"by {loss('router', 'intensity')} nats/token with the router's gates ({loss('uniform', 'intensity')} "
             f"with uniform gates), by the selected units {loss('router', 'best')} ({loss('uniform', 'best')}), by "
             f"the shifted experts' selected units {loss('router', 'shift')} ({loss('uniform', 'shift')}; mean over "
             f"shifts) and at random {loss('router', 'random')} ({loss('uniform', 'random')}).")
    return text


def unsupervised_table(runs):
    names = [(n, u) for n, u in runs[0]["layers"][0]["unsupervised"].items()]
    E = runs[0]["n_expert"]
    head = ["seed", "layer"]
    for name, u in names:
        label = set_label(name, u["units"])
        if u["tested"]:
            head += [f"{label}: own AUROC", "own − shifts [95%]", f"rank of {E}", "pairing p", "Holm p", "verdict"]
        else:
            head += [f"{label}, the check: own AUROC", "top-K overlap"]
    rows = []
    for r in runs:
        for row in r["layers"]:
            cells = [str(r["identity"]["seed"]), str(row["layer"])]
            for name, _ in names:
                u = row["unsupervised"][name]
                if u["tested"]:
                    d = u["diff"]
                    cells += [auc(u["own"]), with_interval(d), str(u["rank"]), f"{d['p_pairing']:.2g}",
                              f"{d['p_holm']:.2g}", d["verdict"]]
                else:
                    cells += [auc(u["own"]), percent(u["overlap"]["own"])]
            rows.append(cells)
    return md_table(head, rows)


def supervised_table(runs):
    E = runs[0]["n_expert"]
    R = len(runs[0]["layers"][0]["supervised"]["auc"]["random"])
    head = ["seed", "layer", "own AUROC", "shifts: mean (min to max)", "random weights: mean (min to max)",
            f"rank of {E}", f"rank of {R + 1}", "top-K overlap: own / shifts / random", "probe R² (ceiling)"]
    rows = []
    for r in runs:
        for row in r["layers"]:
            a, o = row["supervised"]["auc"], row["supervised"]["overlap"]
            rows.append([str(r["identity"]["seed"]), str(row["layer"]), auc(a["own"]), mean_range(a["shifts"], auc),
                         mean_range(a["random"], auc), str(a["rank_shifts"]), str(a["rank_random"]),
                         f"{percent(o['own'])} / {percent(float(np.mean(o['shifts'])))} / "
                         f"{percent(float(np.mean(o['random'])))}", auc(row["probe_r2"])])
    return md_table(head, rows)


def functional_table(runs):
    rules = ("intensity", "best", "shift", "random")
    head = ["seed", "layers", "own loss", "router, uniform gates"]
    head += [f"{rule}, {gate} gates" for gate in GATE_RULES for rule in rules]
    rows = []
    for r in runs:
        for label, by_gate in [(str(row["layer"]), row["loss"]) for row in r["layers"]] + [("every", r["every_layer"])]:
            cells = [str(r["identity"]["seed"]), label, f"{r['own_loss']:.4f}",
                     with_interval(by_gate["uniform"]["router"])]
            for gate in GATE_RULES:
                for rule in rules:
                    if rule in ("shift", "random"):
                        cells.append(mean_range([v["est"] for k, v in by_gate[gate].items() if k.split()[0] == rule]))
                    else:
                        cells.append(with_interval(by_gate[gate][rule]))
            rows.append(cells)
    return md_table(head, rows)


def md_table(head, rows):
    lines = [head, ["---"] * len(head)] + rows
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def summary(data):
    """The section's paragraph: what was measured, and what the tests support per family of models."""
    p, runs = data["protocol"], data["runs"]
    E = sorted({r["n_expert"] for r in runs})
    shifts = f"{E[0] - 1}" if len(E) == 1 else "E − 1"
    diffs = [d for _, row, name in holm_family(runs) for d in [row["unsupervised"][name]["diff"]]]
    verdicts = {v: sum(d["verdict"] == v for d in diffs) for v in ("aligned", "anti-aligned", "no evidence")}
    intro = ("This project reads the paper's title (\"Neurons in Mixture-of-Experts are Secretly Routers\") as a claim "
             "it can test, in its own operationalisation (the paper's text is not available to the project): in a "
             "trained model, expert i's activation intensity ||SiLU(x W_g^i)[U]||_2 ranks the tokens that the router "
             "sends to expert i above the others more than other experts' intensities do. Per layer and unit set U: "
             "own − shifts, the mean AUROC of each expert's own intensity for \"the router chose me\" minus its "
             f"mean over the {shifts} assignments that score expert i with expert (i + k) mod E's intensity, on "
             f"{p['val_windows']} validation windows of "
             f"{'/'.join(str(t) for t in sorted({r['window_tokens'] for r in runs}))} tokens, with "
             f"{round(100 * p['level'])}% intervals from {p['resamples']} bootstrap resamples of the windows. A "
             "verdict needs two nulls rejected: that bootstrap's, and chance pairing's (own against every way to "
             "pair the experts' labels with their intensities; the bootstrap alone would call the fixed random "
             f"weights of an untrained model aligned or anti-aligned); the larger p, Holm-adjusted over the "
             f"{p['family']} (model, layer, unit set) tests here, below {p['alpha']:g}. Of the {p['family']}, "
             f"{verdicts['aligned']} are aligned, {verdicts['anti-aligned']} anti-aligned and "
             f"{verdicts['no evidence']} show no evidence either way.")
    return " ".join([intro] + [family_verdicts(ffn, step, rs) for (ffn, step), rs in families(runs).items()])


def markdown(data):
    """The markdown section of a routers.json (data): the paragraph, then per family of models a few sentences
    on the second and third tests and its tables."""
    out = [summary(data)]
    for (ffn, step), runs in families(data["runs"]).items():
        out += [f"**{family_name(ffn, step, runs)}.** {family_details(ffn, runs)}",
                "Unsupervised, the primary test (own against the expert shifts and against every pairing):",
                unsupervised_table(runs),
                "Supervised selection (units and calibration from training tokens; nulls: shifts, random weights):",
                supervised_table(runs),
                "Validation loss minus the model's own (nats/token) when one layer or every layer chooses by a rule "
                "(shift, random: mean over shifts or draws, their range in brackets):",
                functional_table(runs)]
    return "\n\n".join(out) + "\n"


# -----------------------------------------------------------------------------
# the figure

def figure(data):
    """Three panels over models x layers: own − shifts AUROC with its interval per tested unit set; the
    supervised own AUROC against its nulls; the every-layer loss difference of each choice rule."""
    runs = data["runs"]
    fig = plot.new_figure(13, 11)
    ax_u, ax_s, ax_f = fig.subplots(3, 1)
    ticks, labels, layer_ticks, layer_names, x0 = [], [], [], [], 0
    markers = {"all": "o", "subset": "s", "rest": "o", "rest subset": "s"}
    for i, r in enumerate(runs):
        L = len(r["layers"])
        xs = x0 + np.arange(L)
        ticks.append(x0 + (L - 1) / 2)
        layer_ticks += list(xs)
        layer_names += list(range(L))
        labels.append(f"{r['ffn']} {r['identity']['step']} s{r['identity']['seed']}")
        color = plot.COLORS.get(r["ffn"], plot.OTHER_COLOR)
        for j, (name, u) in enumerate(r["layers"][0]["unsupervised"].items()):
            if not u["tested"]:
                continue
            us = [row["unsupervised"][name] for row in r["layers"]]
            est = np.array([u["diff"]["est"] for u in us])
            err = [est - [u["diff"]["lo"] for u in us], [u["diff"]["hi"] for u in us] - est]
            x = xs + 0.25 * j
            # chance pairing's 95% range of own, on the scale of own - shifts
            base = np.array([np.mean(u["shifts"]) for u in us])
            ax_u.vlines(x, [u["pairings"]["lo"] for u in us] - base, [u["pairings"]["hi"] for u in us] - base,
                        color="0.8", linewidth=7, label="chance pairing, 95%" if i == j == 0 else None)
            first = i == 0 or r["ffn"] != runs[i - 1]["ffn"]
            ax_u.errorbar(x, est, yerr=err, fmt="none", color=color, capsize=2)
            for hollow in (False, True):                    # filled: a verdict; hollow: no evidence
                pick = [(u["diff"]["verdict"] == "no evidence") == hollow for u in us]
                ax_u.plot(x[pick], est[pick], markers.get(name, "o"), color=color,
                          markerfacecolor="none" if hollow else color, linestyle="none",
                          label=f"{r['ffn']}: {name}" if first and not hollow else None)
        sup = [row["supervised"]["auc"] for row in r["layers"]]
        for key, off, c in (("shifts", -0.15, "0.5"), ("random", 0.15, "0.75")):
            lo, hi = [min(s[key]) for s in sup], [max(s[key]) for s in sup]
            ax_s.vlines(xs + off, lo, hi, color=c, linewidth=4, label=f"{key} (min to max)" if i == 0 else None)
        ax_s.plot(xs, [s["own"] for s in sup], "o", color=color, label="own" if i == 0 else None)
        every = r["every_layer"]
        bars = [(gate, rule) for gate in GATE_RULES for rule in ("intensity", "best", "shift", "random")]
        for k, (gate, rule) in enumerate(bars):
            ax_f.bar(x0 + (L - 1) / 2 + (k - 3.5) * L / 9, mean_of(every[gate], rule), L / 9,
                     color=f"C{k % 4}", hatch="" if gate == "router" else "//", edgecolor="white",
                     label=f"{rule}, {gate} gates" if i == 0 else None)
        x0 += L + 1
    for ax in (ax_u, ax_s):                       # layer numbers, and the model's label below them
        ax.set_xticks(layer_ticks, [str(t) for t in layer_names], fontsize="x-small")
        models = ax.secondary_xaxis("bottom")
        models.set_xticks(ticks, labels, fontsize="small")
        models.tick_params(length=0, pad=14)
        models.spines["bottom"].set_visible(False)
    ax_f.set_xticks(ticks, labels, fontsize="small")
    for ax in (ax_u, ax_s, ax_f):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="x-small", ncol=4)
    ax_u.axhline(0, color="0.3", linewidth=0.8)
    ax_u.set_title(f"own − shifted AUROC per layer ({round(100 * data['protocol']['level'])}% window-bootstrap "
                   "intervals; hollow: no evidence): the expert's own intensity for 'the router chose me', against "
                   "other experts'", fontsize="medium")
    ax_s.set_title("selected units (from training tokens): own AUROC per layer, against units selected from the "
                   "shifted experts and from random weights", fontsize="medium")
    ax_f.axhline(0, color="0.3", linewidth=0.8)
    ax_f.set_yscale("symlog", linthresh=0.01)
    ax_f.set_title("validation loss minus the model's own when every layer chooses by a rule (shift, random: mean)",
                   fontsize="medium")
    ax_f.set_ylabel("Δ loss (nats/token, symlog)")
    fig.suptitle("Are neurons secretly routers? Each panel: models (ffn, steps, seed), their layers left to right")
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

def load(run, device):
    """(checkpoint dict, model on device) of a run folder."""
    ckpt = uoe.load_checkpoint(str(run.dir / "ckpt.pt"), "cpu")
    model = uoe.model_from_checkpoint(ckpt).eval().to(device)
    if model.config.ffn not in SUPPORTED:
        raise UserError(f"{run.dir} is an ffn={model.config.ffn} run; routers.py measures moe and uoe runs")
    return ckpt, model


def routers(run_dirs, opts):
    """Measure every run, then write routers.json, routers.md and routers.png (atomically) and print the section."""
    try:
        runs = plot.load_runs(run_dirs)
    except plot.PlotError as e:
        raise UserError(str(e)) from None
    device = resolve_device(opts["device"], None)
    results = []
    for run in runs:
        started = time.time()
        ckpt, model = load(run, device)
        train_idx, val_idx = run_windows(run, model, opts)
        r = measure(model, train_idx, val_idx, opts["n_units"], opts["batch_size"], opts["seed"], opts["resamples"],
                    opts["random_draws"], opts["random_choices"])
        r.update(label=run.label, identity=identity(run, ckpt), seconds=round(time.time() - started, 1))
        say(f"{run.dir} ({run.label}): measured in {r['seconds']:.0f} s")
        results.append(r)
    family = adjust(results)
    protocol = dict(level=LEVEL, alpha=ALPHA, family=family, **{k: opts[k] for k in (
        "val_windows", "train_windows", "n_units", "resamples", "random_draws", "random_choices", "seed")})
    data = dict(protocol=protocol, options=opts, device=str(device), torch=torch.__version__, runs=results)
    try:
        out_dir = plot.make_out_dir(opts["out_dir"] or (run_dirs[0] if len(run_dirs) == 1 else "figures"))
    except plot.PlotError as e:
        raise UserError(str(e)) from None
    text = markdown(data)
    save_figure_atomically(figure(data), out_dir / "routers.png")
    write_atomic(out_dir / "routers.md", text)
    write_json(out_dir / "routers.json", data, quiet=True)
    say("\n" + text)
    say(f"wrote {out_dir / 'routers.json'}, {out_dir / 'routers.md'} and {out_dir / 'routers.png'}")
    return data


# the markers of the generated text: RESULTS.md §6 the whole section, the README its paragraph
MARKERS = {"results_md": ("<!-- routers:begin -->", "<!-- routers:end -->"),
           "readme": ("<!-- routers-summary:begin -->", "<!-- routers-summary:end -->")}


def report_texts(path):
    """The text a routers.json generates: {"results_md": markdown(), "readme": summary()}. A file that cannot be
    read, or is not a routers.json of this version, is a UserError."""
    try:
        data = json.loads(Path(path).read_text())
        return {"results_md": markdown(data).rstrip("\n"), "readme": summary(data)}
    except OSError as e:
        raise UserError(f"cannot read --report={path} ({e.strerror}); give a routers.json") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"--report={path} is not a routers.json of this version ({type(e).__name__}: {e}); "
                        "measure again with python routers.py RUN ...") from None


def report(opts):
    """--report: print the markdown section of a routers.json; --write: put it and its paragraph between the
    markers of --results_md and --readme; --check: exit 1, with one line naming the first difference, when the
    committed text differs. Returns the exit code."""
    texts = report_texts(opts["report"])
    if not (opts["write"] or opts["check"]):
        say(texts["results_md"])
        return 0
    paths = {"results_md": opts["results_md"] or REPO / "RESULTS.md", "readme": opts["readme"] or REPO / "README.md"}
    return write_blocks({k: (paths[k], [(*MARKERS[k], texts[k])]) for k in MARKERS}, opts["check"], opts["report"],
                        f"python routers.py --report={opts['report']} --write")


def main(argv=None):
    try:
        runs, opts = parse(sys.argv[1:] if argv is None else argv)
        if opts["report"]:
            return report(opts)
        routers(runs, opts)
    except (UserError, uoe.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no file was left half-written", file=sys.stderr)
        return 130
    except BrokenPipeError:        # `--report ... --write | head`: the blocks are written before the lines saying so
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when exit flushes
        return 141                 # 128 + SIGPIPE, as train.py and harness.cli
    return 0


if __name__ == "__main__":
    sys.exit(main())
