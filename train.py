"""
Train a GPT whose feed-forward layers are dense, MoE, AoE or UoE (see uoe.py and METHOD.md).

    python train.py                                # UoE on shakespeare_char, 1000 steps (README: how long)
    python train.py --ffn=moe --max_iters=500      # any option as --key=value (python literals)
    python train.py config/my_run.py --seed=2      # a file of python assignments, then overrides
    python train.py --init_from=resume             # continue out_dir/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=2 train.py --gradient_accumulation_steps=2   # DDP (see below)

out_dir gets run.json (all settings), metrics.jsonl (one JSON record per log and eval step) and
ckpt.pt, written atomically every ckpt_interval steps, at the end and on SIGINT/SIGTERM. A fresh
run refuses to replace an existing ckpt.pt unless --overwrite=True. On resume the checkpoint's
model and training settings apply; options given on the command line override training settings,
and a model option that differs from the checkpoint's is an error, as is data other than the corpus it was
trained on (ckpt.pt holds the corpus's fingerprint) unless --allow_other_corpus=True. How to run (data_dir,
out_dir, device, dtype, compile, expert_path, ...) is chosen anew by each command, never taken from the
checkpoint; a model option that a checkpoint of an earlier version lacks takes its default, with a note.
A model option set to anything but its default that the chosen --ffn does not read is an error, not ignored.
Devices: cuda (bfloat16, compiled by default), cpu (float32), mps (Apple silicon: float32, not compiled by
default, experts on the loop path, one process; untested: no Apple machine here).
Exit codes: 0 finished; 2 bad input, a non-finite loss or a checkpoint that cannot be written (one `error: ...`
line; ckpt.pt keeps the last checkpoint saved); 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint
(128 + signal number); 141 stdout's pipe closed (`| head`): stopped at once, as SIGPIPE would, with ckpt.pt as
last saved.
DDP: each process takes its share of the gradient_accumulation_steps micro-steps (a multiple of
--nproc_per_node); on CUDA (nccl) every process needs its own GPU (nproc_per_node <= GPUs), on CPU
(gloo, or --device=cpu) the processes share the cores. Under torchrun, signal torchrun: it passes
SIGTERM to every worker, they save and exit 143, and torchrun itself then exits 1 with its own traceback.
"""
import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import cache, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from uoe import (FFN_VARIANTS, GPT, CheckpointError, GPTConfig, ffn_class, flops_per_token, load_checkpoint,
                 param_counts, resolve_expert_path, save_checkpoint, unread_options)

EVAL_SEED = 0        # the fixed eval batches depend on this, not on --seed: every run sees the same ones
# Dense bf16 tensor-core peak (FLOP/s, no sparsity) per GPU, for MFU (train.py and bench.py). Matched as a
# substring of torch.cuda.get_device_name() in this order: "H100 PCIe" before "H100", "L40S" before "L40".
GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                 "L40": 181e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12, "3090": 71e12}
VOCAB_MULTIPLE = 64  # GPT-2 BPE vocabularies are padded to a multiple of this (50257 -> 50304, as nanoGPT)


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "shakespeare_char"   # data_dir/<dataset>/{train,val}.bin, meta.json; prepared if missing
    data_dir: str = "data"              # folder holding the datasets (relative to the current directory)
    out_dir: str = "out"                # where ckpt.pt, metrics.jsonl and run.json go
    init_from: str = "scratch"          # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    overwrite: bool = False             # let a fresh run replace an existing out_dir/ckpt.pt
    allow_other_corpus: bool = False    # on resume, continue on data other than the checkpoint's (same vocab)
    # optimisation
    max_iters: int = 1000               # optimizer steps
    batch_size: int = 16                # sequences per micro-step, per process
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, over all processes together
    learning_rate: float = 2e-3         # peak learning rate
    min_lr: float = 2e-4                # learning rate at the end of the cosine decay
    warmup_iters: int = 100             # steps of linear warmup
    lr_decay_iters: int | None = None   # step where the cosine decay ends; None -> max_iters
    weight_decay: float = 0.1           # AdamW decay, on matrices (params with dim >= 2) only
    beta1: float = 0.9                  # AdamW beta1
    beta2: float = 0.99                 # AdamW beta2 (0.99: small batches of tokens)
    grad_clip: float = 1.0              # clip the global gradient norm to this; 0 disables
    # evaluation, logging, checkpoints
    eval_interval: int = 250            # evaluate every this many steps (and at the end)
    eval_iters: int = 20                # fixed batches per split at each evaluation
    log_interval: int = 10              # a train record and a progress line every this many steps
    ckpt_interval: int | None = None    # save ckpt.pt every this many steps; None -> eval_interval
    plot: bool = True                   # draw figures into out_dir at the end (plot.py)
    # system
    device: str = "auto"                # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps' (Apple)
    dtype: str = "auto"                 # 'auto' (bfloat16 autocast on CUDA, else float32), 'bfloat16', 'float32'
    compile: bool | None = None         # torch.compile the model; None -> True on CUDA, False on CPU and MPS
    seed: int = 1337                    # seeds the weights and the training batches
    # robustness
    nonfinite: str = "stop"             # on a NaN/inf loss or gradient: 'stop' (exit 2) or 'skip' the update
    max_skips: int = 10                 # with nonfinite='skip': stop after this many non-finite steps in a row
    debug_nan_step: int = -1            # testing aid: make the loss NaN at this step (-1: never)


# Model defaults and their --help text live in uoe.GPTConfig (one source of truth); train.py only
# adds, after that text, how it treats a few of them.
MODEL_HELP = {"vocab_size": "train.py takes it from the dataset's meta.json unless set (larger only)",
              "expert_path": "chosen per run, not taken from the checkpoint on resume; 'grouped' with "
                             "--compile=True needs bfloat16; mps runs 'loop' only"}
# Options that describe this invocation, not the run: on resume they are not taken from the checkpoint.
# expert_path is a GPTConfig field, but only says how the same model runs here, like device or dtype.
PER_INVOCATION = {"data_dir", "out_dir", "init_from", "overwrite", "allow_other_corpus", "plot", "device", "dtype",
                  "compile", "debug_nan_step", "expert_path"}
TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


class UserError(Exception):
    """A problem the user can fix: printed as one `error: ...` line, exit code 2."""


# -----------------------------------------------------------------------------
# options: defaults <- config file <- --key=value

@cache   # inspect.getsource parses the whole module: ~50 ms, once per class is enough
def field_comments(cls):
    """The `# comment` after each field of a dataclass's source: the --help text of that option."""
    try:
        return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    except (OSError, TypeError):
        return {}


def option_table(classes=(TrainConfig, GPTConfig)):
    """name -> (default, allowed types, help) for every field of the option dataclasses (by default
    train.py's: every training and model option); the help is the field's `# comment`."""
    table = {}
    for cls in classes:
        comments = dict(field_comments(cls))   # a copy: the cached dict stays as the source says
        if cls is GPTConfig:
            comments |= {k: f"{comments[k]}; {note}" if comments.get(k) else note for k, note in MODEL_HELP.items()}
        for f in fields(cls):
            default = f.default
            names = re.findall(r"\b(int|float|str|bool|None)\b", str(f.type)) + \
                (["None"] if "Optional" in str(f.type) else [])
            types = tuple(dict.fromkeys(TYPES[n] for n in names)) or (type(default),)
            table[f.name] = (default, types, comments.get(f.name, ""))
    return table


def check_type(name, value, types, text=None, program="train.py"):
    """value as the option's type (an int is accepted for a float); text is the raw command-line text."""
    if type(value) in types:
        return value
    if type(value) is int and float in types:
        return float(value)
    if str in types and text is not None:   # --out_dir=2024 means the string '2024'
        return text
    allowed = " or ".join("None" if t is type(None) else t.__name__ for t in types)
    raise UserError(f"--{name} expects {allowed}, got {value!r} ({type(value).__name__}); "
                    f"see python {program} --help")


def unknown_option(name, table, program="train.py"):
    near = difflib.get_close_matches(name, table, n=3)
    hint = f"did you mean {' or '.join('--' + n for n in near)}?" if near else f"python {program} --help lists them"
    return UserError(f"unknown option --{name}; {hint}")


def read_config_file(path):
    """A config file is python assignments (nanoGPT style); each public name it defines is an option."""
    try:
        source = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read config file {path} ({e.strerror}); check the path") from None
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:
        raise UserError(f"config file {path} failed ({type(e).__name__}: {e}); fix the file") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not inspect.ismodule(v) and not callable(v)}


def help_text(table, doc=__doc__, sections=(("training", TrainConfig), ("model (uoe.GPTConfig)", GPTConfig))):
    lines = [doc.strip(), "", "Options (--name=default  what it does):"]
    for title, cls in sections:
        lines.append(f"\n{title}:")
        for f in fields(cls):
            default, _, help = table[f.name]
            lines.append(f"  {f'--{f.name}={default!r}':<38} {help}")
    return "\n".join(lines)


def parse_args(argv):
    """train.py's options from the defaults, then config files (`path` or --config=path), then --key=value.
    Returns (values, explicit): all option values, and the names the user set."""
    table = option_table()
    return parse_options(argv, table, help_text(table), "train.py", config_files=True)


def parse_options(argv, table, help, program, config_files=False):
    """The one option dialect of train.py and sample.py: --key=value (a python literal; a bare word is a
    string), a bare --flag for a boolean, --help, and with config_files python files of assignments.
    table: option_table(); help: the --help text. Returns (values, explicit): all option values, and the
    names the user set. Unknown names, wrong types and unparsable arguments are UserErrors."""
    values = {name: default for name, (default, _, _) in table.items()}
    explicit = set()

    def assign(name, value, text=None):
        if name not in table:
            raise unknown_option(name, table, program)
        values[name] = check_type(name, value, table[name][1], text, program)
        explicit.add(name)

    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(help)
        if config_files and (not arg.startswith("-") or arg.startswith("--config=")):
            for name, value in read_config_file(arg.removeprefix("--config=")).items():
                assign(name, value)
            continue
        name, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            if arg.startswith("--") and name in table and bool in table[name][1]:
                assign(name, True)   # a bare --compile means --compile=True
                continue
            raise UserError(f"cannot parse {arg!r}; write options as --key=value (python {program} --help)")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text             # --ffn=moe: a bare word is a string
        assign(name, value, text)
    return values, explicit


def print_help(text):
    """Print the --help text and exit 0. A reader that leaves early (`--help | head`) has what it wanted:
    no error, and none of main's lines about checkpoints."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when exit flushes
    sys.exit(0)


def split_options(values):
    train_names = {f.name for f in fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in values.items() if k in train_names})
    model = {k: v for k, v in values.items() if k not in train_names}
    return train, model


def check_train_config(train, world):
    """Reject training settings that cannot work, before any work is done."""
    positive = ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
                "max_skips") + tuple(name for name in ("ckpt_interval", "lr_decay_iters")
                                     if getattr(train, name) is not None)   # None: their default
    rules = [(getattr(train, name) >= 1, f"--{name} must be >= 1") for name in positive] + [
        (train.max_iters >= 0, "--max_iters must be >= 0"),
        (train.warmup_iters >= 0, "--warmup_iters must be >= 0"),
        (train.lr_decay_iters is None or train.lr_decay_iters >= train.warmup_iters,
         f"--lr_decay_iters={train.lr_decay_iters} must be >= --warmup_iters={train.warmup_iters} (the decay "
         "follows the warmup; None: decay until --max_iters)"),
        # numpy's default_rng takes seeds >= 0, torch.manual_seed < 2**64, and each process seeds with seed + rank
        (0 <= train.seed <= 2**64 - world, f"--seed must be in [0, {2**64 - world}]"),
        # the optimiser's own checks would end in a traceback, and a negative clip would flip every gradient
        (train.learning_rate > 0, "--learning_rate must be > 0"),
        (train.min_lr >= 0, "--min_lr must be >= 0"),
        (train.weight_decay >= 0, "--weight_decay must be >= 0"),
        (0 <= train.beta1 < 1, "--beta1 must be in [0, 1)"),
        (0 <= train.beta2 < 1, "--beta2 must be in [0, 1)"),
        (train.grad_clip >= 0, "--grad_clip must be >= 0 (0 disables clipping)"),
        (train.init_from in ("scratch", "resume"), "--init_from must be 'scratch' or 'resume'"),
        (train.nonfinite in ("stop", "skip"), "--nonfinite must be 'stop' or 'skip'"),
        (train.dtype in ("auto", "bfloat16", "float32"), "--dtype must be 'auto', 'bfloat16' or 'float32'"),
        (train.gradient_accumulation_steps % world == 0,
         f"--gradient_accumulation_steps={train.gradient_accumulation_steps} must be divisible by the "
         f"number of processes ({world})"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(f"{message}; fix the option")


def make_model_config(model_values):
    try:
        return GPTConfig(**model_values)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid model config: {e}; fix the option") from None


def check_read(cfg, model_values, explicit):
    """Refuse a model option set here (command line or config file, not restored from a checkpoint) that cfg's
    variant does not read: the run would ignore it without a word. One at its default is harmless (study.py
    gives every field). cfg's values, not model_values: --n_routing=None is n_routing's default, resolved."""
    unread = unread_options(cfg, {k: getattr(cfg, k) for k in model_values if k in explicit})
    if not unread:
        return
    readers = {k: [name for name, cls in FFN_VARIANTS.items() if k in cls.options] for k in unread}
    fits = [name for name in FFN_VARIANTS if all(name in r for r in readers.values())]
    where = " or ".join(f"--ffn={name}" for name in fits) if fits else \
        "; ".join(f"{k}: {' or '.join(f'--ffn={name}' for name in r)}" for k, r in readers.items())
    given = " ".join(f"--{k}={model_values[k]!r}" for k in unread)
    it, are = ("it", "is") if len(unread) == 1 else ("them", "are")
    raise UserError(f"{given} {are} not read by --ffn={cfg.ffn}, so the run would ignore {it}; drop {it}, or choose "
                    f"a variant that reads {it} ({where})")


# -----------------------------------------------------------------------------
# setup: device, output folder, checkpoint to resume, data

def resolve_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device={name} but CUDA is not available on this machine; use --device=cpu")
        index = local_rank if local_rank is not None else torch.device(name).index or 0   # torchrun: one GPU per rank
        if index >= torch.cuda.device_count():
            fix = "start at most one process per GPU (torchrun --nproc_per_node), or use --device=cpu" \
                if local_rank is not None else "use --device=cuda:0"
            raise UserError(f"cuda:{index} is needed but this machine has {torch.cuda.device_count()} GPU(s); {fix}")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        return device
    if name == "mps":
        return mps_device(local_rank)
    if name != "cpu":
        raise UserError(f"unknown --device={name!r}; use auto, cpu, cuda[:N] or mps")
    return torch.device("cpu")


def mps_device(local_rank=None):
    """Apple silicon's GPU (train.py and sample.py), checked: a UserError where this torch or machine has no
    MPS, or under torchrun (DDP here is nccl on CUDA or gloo on CPU; neither reduces MPS tensors)."""
    if not torch.backends.mps.is_available():
        raise UserError("--device=mps but MPS (the Apple silicon GPU) is not available on this machine or in this "
                        "torch build; use --device=cpu")
    if local_rank is not None:
        raise UserError("--device=mps runs one process only (DDP needs cuda or cpu); use python train.py, "
                        "not torchrun")
    return torch.device("mps")


def on_rank0(work, master, ddp):
    """work() on rank 0 only, then every rank stops with rank 0's error if it failed. (The other ranks wait
    here for rank 0: with a bare barrier they would wait for a failed rank 0 until the timeout.) Every rank
    must call this at the same point, whether or not rank 0 has anything to do."""
    error = None
    if master:
        try:
            work()
        except UserError as e:
            error = str(e)
    if ddp:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
        if error is not None:   # rank 0 may exit only when every rank has the error: torchrun stops the others
            dist.barrier()      # as soon as one exits, and a rank still receiving would never print it
    if error is not None:
        raise UserError(error)


def prepare_out_dir(out_dir):
    check_out_dir(out_dir)
    for stale in out_dir.glob(".*.tmp"):   # left by a save killed mid-write; ckpt.pt itself is intact
        stale.unlink(missing_ok=True)


def check_out_dir(out_dir):
    """Fail before any work if out_dir cannot be created or written (under a file, read-only, ...)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir} ({e.strerror or e}); choose a writable --out_dir") from None


def read_resume_checkpoint(path):
    if not path.exists():
        raise UserError(f"--init_from=resume but there is no checkpoint at {path}; "
                        "check --out_dir, or start a new run with --init_from=scratch")
    try:
        ckpt = load_checkpoint(str(path), map_location="cpu")   # cpu: RNG states must be CPU tensors
    except CheckpointError as e:
        raise UserError(str(e)) from None
    needed = ("optimizer", "step", "train_config", "rng", "data", "best_val_loss", "rng.torch", "data.batch_rng",
              "data.tokens", "data.meta_vocab_size")   # every train.py checkpoint has had each of these
    missing = [key for key in needed if not has_key(ckpt, key)]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (no {missing[0]!r}); resume only from train.py's ckpt.pt")
    return ckpt


def has_key(tree, dotted):
    """Whether nested dicts hold dotted ('data.tokens': tree['data']['tokens'])."""
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def resume_options(ckpt, values, explicit, path, master=True):
    """The checkpoint's model and training settings, overridden by the training options set on this
    command line. A model option set here must agree with the checkpoint: anything else is another model.
    Per-invocation options (PER_INVOCATION, expert_path among them) are this command line's, never the
    checkpoint's: resuming a grouped run with --expert_path=loop is the same model."""
    stored = stored_model(ckpt, path, master)
    here = {f.name: values[f.name] for f in fields(GPTConfig)}   # expert_path: this command line's
    asked = make_model_config({**here, **stored, **{k: values[k] for k in explicit if k in stored}})
    for name, value in stored.items():
        if getattr(asked, name) != value:
            raise UserError(f"--{name}={values[name]!r} but {path} holds a model with {name}={value!r}; "
                            f"drop --{name} to resume it, or use another --out_dir for a new model")
    train_names = {f.name for f in fields(TrainConfig)}
    restored = {k: v for k, v in ckpt["train_config"].items()
                if k in train_names and k not in explicit and k not in PER_INVOCATION}
    return {**values, **stored, **restored}


def stored_model(ckpt, path, master):
    """The model options stored in ckpt, all but the per-invocation ones. A checkpoint of an earlier version
    may lack a model option added since: it takes its default (with a note on rank 0), as options are
    added with the earlier behaviour as their default."""
    stored = {k: v for k, v in ckpt["config"].items() if k not in PER_INVOCATION}
    try:   # the defaults as GPTConfig completes them (d_low, n_routing: from the stored widths)
        full = asdict(GPTConfig(**stored))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} holds a model this uoe.py cannot build ({e}); resume it with the version "
                        "that wrote it, or start a new run") from None
    missing = {k: full[k] for k in full if k not in stored and k not in PER_INVOCATION}
    if missing and master:
        print(f"note: {path} was written by an earlier version without "
              f"{', '.join(missing)}: resuming with the default{'s' if len(missing) > 1 else ''} "
              f"{', '.join(f'{k}={v!r}' for k, v in missing.items())}", flush=True)
    return {**stored, **missing}


def open_dataset(train, master, ddp):
    """(meta, {"train": tokens, "val": tokens}) of data_dir/dataset, prepared first if it is missing."""
    folder = Path(train.data_dir) / train.dataset
    on_rank0(lambda: prepare_dataset(train.dataset, train.data_dir), master, ddp)
    redo = f"delete {folder} and run again to re-prepare it (or run data/prepare.py)"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype, _ = np.dtype(meta["dtype"]), int(meta["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder}/meta.json is unreadable or incomplete ({type(e).__name__}: {e}); {redo}") from None
    splits = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None
        expected = meta.get(f"{split}_tokens")
        if not size:
            raise UserError(f"{path} is {'missing' if size is None else 'empty'}; {redo}")
        if size % dtype.itemsize or (expected is not None and size // dtype.itemsize != expected):
            raise UserError(f"{path} is truncated or stale ({size} bytes; meta.json says {expected} tokens "
                            f"of {dtype.name}); {redo}")
        splits[split] = np.memmap(path, dtype=dtype, mode="r")
    return meta, splits


def corpus_fingerprint(folder, meta):
    """A sha256 that names the tokens in folder (train.bin and val.bin): stored in each checkpoint, so that a
    resume on another corpus of the same vocabulary is noticed. data/prepare.py's meta.json records the
    sha256 of the source text, which with the tokenizer, vocabulary and split sizes fixes both files: free to
    check, whatever their size. A meta.json without it (a dataset made by hand): the files are hashed, once
    per run."""
    h = hashlib.sha256()
    if "source_sha256" in meta:
        keys = ("source_sha256", "tokenizer", "itos", "unk", "vocab_size", "dtype", "train_tokens", "val_tokens")
        h.update(json.dumps({k: meta.get(k) for k in keys}, sort_keys=True).encode())
        return h.hexdigest()
    for split in ("train", "val"):
        with open(folder / f"{split}.bin", "rb") as f:
            h.update(f"{split}.bin {os.fstat(f.fileno()).st_size}\n".encode())
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def check_corpus(ckpt, corpus, train, folder, ckpt_path, master):
    """On resume: the data must be the corpus the checkpoint was trained on, unless --allow_other_corpus."""
    trained_on = ckpt["data"].get("corpus")
    if trained_on is None:
        if master:
            print(f"note: {ckpt_path} was written by an earlier version without a corpus fingerprint: cannot "
                  f"check that it was trained on {folder}; resuming", flush=True)
    elif trained_on != corpus:
        if not train.allow_other_corpus:
            raise UserError(f"{folder} is not the corpus that {ckpt_path} was trained on (its fingerprint "
                            "differs); resume on the same data (check --dataset and --data_dir), or continue on "
                            "this one with --allow_other_corpus=True")
        if master:
            print(f"warning: {folder} is not the corpus that {ckpt_path} was trained on; continuing on it "
                  "(--allow_other_corpus=True)", file=sys.stderr, flush=True)


def prepare_dataset(name, data_dir):
    """data_dir/name prepared by data/prepare.py, unless it has a meta.json already."""
    if (Path(data_dir) / name / "meta.json").is_file():
        return
    from data.prepare import DataError, ensure_dataset   # only needed when the data is missing
    print(f"preparing dataset {name!r} in {data_dir} ...", flush=True)
    try:
        ensure_dataset(name, data_dir)
    except DataError as e:
        raise UserError(str(e)) from None


def fit_vocab(cfg, meta, explicit, ckpt, folder):
    """The model's vocab_size: --vocab_size if set (not smaller than the data's), else meta.json's,
    padded for GPT-2 BPE (see padded_vocab); on resume the checkpoint's."""
    n = meta["vocab_size"]
    if ckpt is not None:
        trained_on = ckpt["data"]["meta_vocab_size"]   # the data's, not the model's (maybe padded) vocab_size
        if n != trained_on:
            raise UserError(f"{folder}/meta.json has vocab_size {n} but the checkpoint was trained on data with "
                            f"vocab_size {trained_on}; resume on the same data (check --dataset and --data_dir)")
        return cfg
    if "vocab_size" in explicit:
        if cfg.vocab_size < n:
            raise UserError(f"--vocab_size={cfg.vocab_size} is smaller than the dataset's {n} tokens; drop it")
        return cfg
    return dataclasses.replace(cfg, vocab_size=padded_vocab(n, meta.get("tokenizer")))


def padded_vocab(n, tokenizer):
    """GPT-2 BPE's 50257 tokens padded to 50304: the lm_head matmul is the largest in a small model and
    runs faster at a multiple of 64 (the extra ids never occur in the data; sample.py never emits them).
    Character-level vocabularies stay as they are: their models are tiny, and the README's losses stay
    comparable."""
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE if tokenizer == "gpt2" else n


# -----------------------------------------------------------------------------
# training pieces

def get_batch(data, starts, block_size, device):
    """Sequences data[s : s+block_size] for s in starts, and their next-token targets: (len(starts), block_size)."""
    x = torch.from_numpy(np.stack([data[s:s + block_size] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[s + 1:s + 1 + block_size] for s in starts]).astype(np.int64))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)   # mps; on the cpu, x and y themselves


@torch.no_grad()
def estimate_loss(model, splits, eval_starts, block_size, device, ctx):
    """Mean cross-entropy (without the aux loss) of the model on the fixed eval batches of each split."""
    model.eval()
    out = {}
    for split, data in splits.items():
        losses = []
        for starts in eval_starts[split]:
            x, y = get_batch(data, starts, block_size, device)
            with ctx:
                logits, _ = model(x)
            losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
        out[split] = float(np.mean(losses))
    model.train()
    return out


def get_lr(step, train):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT)."""
    decay_iters = train.max_iters if train.lr_decay_iters is None else train.lr_decay_iters
    if step < train.warmup_iters:
        return train.learning_rate * (step + 1) / (train.warmup_iters + 1)
    if step >= decay_iters:
        return train.min_lr
    ratio = (step - train.warmup_iters) / max(1, decay_iters - train.warmup_iters)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (train.learning_rate - train.min_lr)


def make_optimizer(model, train, device):
    """AdamW; weight decay only on matrices (embeddings, linear weights, stacked experts of dim 3)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2),
                             fused=device.type == "cuda")


def mfu_peak(device_name, dtype, override_tflops=None) -> tuple[float | None, str]:
    """(peak FLOP/s for MFU or None, a short label saying which peak or why there is none). device_name:
    torch.cuda.get_device_name(); dtype: torch.bfloat16 or 'bfloat16', ... The table holds bf16 tensor-core
    peaks, so only bfloat16 runs get one. override_tflops: a peak the user gives (TFLOP/s), any GPU and dtype."""
    if override_tflops:
        return override_tflops * 1e12, f"given peak {override_tflops:g} TFLOP/s"
    dtype = str(dtype).removeprefix("torch.")
    if dtype != "bfloat16":
        return None, f"no MFU: the peak table is bf16 only and this run is {dtype}"
    gpu = next((name for name in GPU_PEAK_BF16 if name.lower() in device_name.lower()), None)
    if gpu is None:
        return None, f"no MFU: no bf16 peak known for {device_name}"
    return GPU_PEAK_BF16[gpu], f"{gpu} bf16 dense {GPU_PEAK_BF16[gpu] / 1e12:.0f} TFLOP/s"


def write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def truncate_metrics(path, step):
    """On resume, drop what a killed run logged after its checkpoint (and the eval at that step, which
    is redone), so that metrics.jsonl reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue                 # a last line cut short by a kill
        if rec.get("step", 0) < step or (rec.get("step") == step and rec.get("kind") == "train"):
            keep.append(line + "\n")
    write_atomic(path, "".join(keep))


def peak_memory_mb(device):
    """The most GPU memory this process has held in tensors so far (CUDA), else None."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def finite_or_none(x):
    return x if math.isfinite(x) else None   # strict JSON has no NaN


def fmt_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


STOP = {"signum": None}


def request_stop(signum, frame):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, exit. A second signal exits at once
    (the checkpoint on disk is always complete: saves are atomic)."""
    if STOP["signum"] is not None:
        sys.exit(128 + signum)
    STOP["signum"] = signum
    print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
          "(send it again to quit at once)", file=sys.stderr, flush=True)


def expert_path(cfg, device, dtype, use_compile=False):
    """How a routed model's experts run here (uoe.resolve_expert_path): 'loop' or 'grouped'; None for dense.
    Checked up front: an explicit 'grouped' that the widths, the compiler or the device cannot take would
    otherwise fail in the first forward, after the model is built and the data read."""
    if not ffn_class(cfg.ffn).routed:
        return None
    try:
        path = resolve_expert_path(cfg, device, dtype)
    except ValueError as e:
        raise UserError(f"invalid model config: {e}") from None
    if path == "grouped" and torch.device(device).type == "mps":
        raise UserError("--expert_path=grouped does not run on mps (untested there); use --expert_path=loop "
                        "or auto")
    if path == "grouped" and use_compile and dtype != torch.bfloat16:   # torch's tracing rule: bfloat16 only
        raise UserError(f"--expert_path=grouped with --compile=True needs bfloat16, and this run is "
                        f"{str(dtype).removeprefix('torch.')}; use --dtype=bfloat16, --compile=False or "
                        "--expert_path=loop")
    return path


def banner(cfg, train, step, tokens_per_step, system, path, peak, peak_label):
    """The run's first line: model, size, expert path, device and precision, the MFU reference (CUDA), fresh or
    resumed."""
    total, active = param_counts(cfg)
    routed = ffn_class(cfg.ffn).routed
    experts = f"{cfg.n_expert} experts top-{cfg.top_k}" if routed else f"FFN width {cfg.expert_hidden}"
    experts += {"grouped": " (experts: grouped GEMM)", "loop": " (experts: loop)", None: ""}[path]
    mfu = f"; {peak_label}" if peak_label else ""       # no peak: why there is no MFU
    if peak:
        mfu = f"; MFU against {peak_label}"
    return (f"model {cfg.ffn}: {cfg.n_layer} layers x {cfg.n_embd} wide, {experts}; {total / 1e6:.2f}M params, "
            f"{active / 1e6:.2f}M active per token; {tokens_per_step} tokens/step; {system}{mfu}; "
            f"{f'resuming at step {step}' if train.init_from == 'resume' else 'from scratch'}")


# -----------------------------------------------------------------------------
# the run: every check before any work, then the model, optimizer and data stream (fresh or resumed)

def check_run(values, explicit, procs, device):
    """Find everything wrong with the options, out_dir, the checkpoint to resume and the data before any
    training. Returns (train, cfg, ckpt or None, (meta, corpus_fingerprint), splits, values with the
    checkpoint's settings, the expert path: see expert_path, precision's (compile?, bfloat16?, autocast
    context, dtype))."""
    master, ddp = procs.master, procs.ddp
    out_dir = Path(values["out_dir"])
    ckpt_path = out_dir / "ckpt.pt"
    on_rank0(lambda: prepare_out_dir(out_dir), master, ddp)
    ckpt = None
    if values["init_from"] == "resume":
        ckpt = read_resume_checkpoint(ckpt_path)
        values = resume_options(ckpt, values, explicit, ckpt_path, master)
    elif values["init_from"] == "scratch" and ckpt_path.exists() and not values["overwrite"]:
        raise UserError(f"{ckpt_path} already exists; continue it with --init_from=resume, replace it with "
                        "--overwrite=True, or choose another --out_dir")
    train, model_values = split_options(values)
    check_train_config(train, procs.world)
    cfg = make_model_config(model_values)       # validated before the (maybe slow) data preparation
    check_read(cfg, model_values, explicit)
    prec = precision(train, device)
    use_compile, _, _, dtype = prec
    path = expert_path(cfg, device, dtype, use_compile)   # likewise
    meta, splits = open_dataset(train, master, ddp)
    folder = Path(train.data_dir) / train.dataset
    cfg = fit_vocab(cfg, meta, explicit, ckpt, folder)
    corpus = corpus_fingerprint(folder, meta)
    if ckpt is not None:
        check_corpus(ckpt, corpus, train, folder, ckpt_path, master)
    for split, data in splits.items():
        if len(data) <= cfg.block_size:
            raise UserError(f"block_size {cfg.block_size} is longer than the {split} split ({len(data)} tokens); "
                            f"use --block_size={len(data) - 1} or less, or more data")
    return train, cfg, ckpt, (meta, corpus), splits, values, path, prec


def build(cfg, train, ckpt, device, rank):
    """Model, optimizer and batch generator, restored from ckpt if resuming; and (step, tokens, best val loss)."""
    torch.manual_seed(train.seed + rank)        # + rank: different dropout masks per process
    model = GPT(cfg).to(device)
    optimizer = make_optimizer(model, train, device)
    batch_rng = np.random.default_rng(train.seed)  # the same on every rank: all draw the global batch
    if ckpt is None:
        return model, optimizer, batch_rng, (0, 0, math.inf)
    try:
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"the checkpoint does not fit this model ({str(e).splitlines()[0]}); "
                        "resume with the uoe.py that wrote it, or start a new run") from None
    batch_rng.bit_generator.state = ckpt["data"]["batch_rng"]
    if rank == 0:   # (other ranks' dropout streams are not saved: only dropout > 0 notices)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return model, optimizer, batch_rng, (ckpt["step"], ckpt["data"]["tokens"], ckpt["best_val_loss"])


def load_optimizer_state(optimizer, state):
    """The checkpoint's optimizer state (step counts, moments) under this run's settings: load_state_dict
    would also bring back the saved weight_decay, betas and lr, silently undoing options given on resume."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


# -----------------------------------------------------------------------------
# main's pieces, in the order main uses them: the process, precision, logs, one step of the loop, the end

class Processes(NamedTuple):
    """This process among the run's: under torchrun one of `world` DDP processes, else the only one."""
    ddp: bool
    rank: int
    local_rank: int | None
    world: int

    @property
    def master(self):
        return self.rank == 0   # the one that evaluates, logs and saves


def start_process(device_name):
    """(this process among the run's, its device); under torchrun it joins the process group."""
    procs = Processes(False, 0, None, 1)
    if "RANK" in os.environ:   # started by torchrun
        procs = Processes(True, *(int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")))
    device = resolve_device(device_name, procs.local_rank)
    if procs.ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return procs, device


def precision(train, device):
    """(compile?, bfloat16?, the autocast context, the dtype the matmuls run in) of this run on device;
    on CUDA, float32 matmuls may use TF32. mps runs float32 only: bfloat16 there is untested."""
    if device.type == "mps" and train.dtype == "bfloat16":
        raise UserError("--device=mps runs float32 only (bfloat16 on Apple silicon is untested here); "
                        "drop --dtype=bfloat16 or use --dtype=float32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_compile = train.compile if train.compile is not None else device.type == "cuda"
    use_bf16 = train.dtype == "bfloat16" or (train.dtype == "auto" and device.type == "cuda")
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    return use_compile, use_bf16, ctx, torch.bfloat16 if use_bf16 else torch.float32


def fixed_eval_batches(splits, train, block_size):
    """The start offsets of every evaluation's batches, (eval_iters, batch_size) per split, from EVAL_SEED."""
    eval_rng = np.random.default_rng(EVAL_SEED)
    return {s: eval_rng.integers(0, len(d) - block_size, size=(train.eval_iters, train.batch_size))
            for s, d in splits.items()}


def start_logs(out_dir, cfg, train, meta, step):
    """Write run.json; make metrics.jsonl read as one run (cut back to the checkpoint's step on resume,
    new on a fresh run); return it opened for appending."""
    metrics_path = out_dir / "metrics.jsonl"
    write_atomic(out_dir / "run.json", json.dumps({"config": asdict(cfg), "train": asdict(train),
                                                    "dataset": train.dataset, "meta": meta}, indent=1))
    if step > 0:
        truncate_metrics(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()               # a fresh run (with --overwrite) starts a fresh log
    return open(metrics_path, "a")


def write_record(metrics, record):
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()


def describe_system(device, use_bf16, use_compile, procs):
    return f"{device} {'bfloat16' if use_bf16 else 'float32'}{' compiled' if use_compile else ''}" \
        f"{f' x {procs.world} processes' if procs.ddp else ''}"


def checkpoint(raw_model, optimizer, cfg, train, step, tokens, best_val, batch_rng, meta, corpus, device):
    """Everything a resume needs, as a plain dict of tensors and python data (uoe.save_checkpoint); corpus:
    the data's corpus_fingerprint."""
    return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(cfg),
            "step": step, "train_config": asdict(train), "best_val_loss": best_val, "version": 1,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            "data": {"batch_rng": batch_rng.bit_generator.state, "tokens": tokens,
                     "meta_vocab_size": meta["vocab_size"], "corpus": corpus}}


def save_error(e, step, ckpt_path, last_ckpt_step):
    """The UserError for a checkpoint save that failed with e, or None where e is not a failed write.
    uoe.save_checkpoint writes a temporary file and renames it, so ckpt.pt still holds the last checkpoint
    saved. A failed write (a full disk, a file-size limit) is an OSError, or torch's writer's RuntimeError
    with the OSError as its cause or context."""
    kept = (f"{ckpt_path} still holds step {last_ckpt_step}: resume from it with --init_from=resume"
            if last_ckpt_step is not None else "no checkpoint was saved before: rerun")
    if isinstance(e, CheckpointError):     # non-finite weights: never saved over the last good checkpoint
        return UserError(f"{e}; {kept} with a lower --learning_rate")
    reason, cause = None, e
    while cause is not None and reason is None:
        reason = (cause.strerror or str(cause)) if isinstance(cause, OSError) else None
        cause = cause.__cause__ or cause.__context__
    if reason is None and re.search("PytorchStreamWriter|inline_container", str(e)):
        reason = str(e).splitlines()[0]     # torch's writer, where the OSError did not reach python
    if reason is None:
        return None
    return UserError(f"cannot save the checkpoint of step {step} to {ckpt_path} ({reason}); {kept} once there "
                     "is room (free disk space, or raise the file-size limit: ulimit -f)")


def evaluate(model, splits, eval_starts, block_size, device, ctx, log, step, tokens, flops_token):
    """The loss on the fixed eval batches of each split, logged and printed; returns {split: loss}."""
    losses = estimate_loss(model, splits, eval_starts, block_size, device, ctx)
    log({"kind": "eval", "step": step, "tokens": tokens, "flops": 3 * flops_token * tokens,
         "train_loss": losses["train"], "val_loss": losses["val"]})
    print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
    return losses


def forward_backward(model, raw_model, batch_rng, data, step, train, block_size, procs, device, ctx):
    """The gradients of one optimizer step, clipped. Every rank draws the same global batch and takes its
    micro-batches, so N processes compute exactly what one process with the same global batch computes.
    Returns [loss, ce, aux, grad norm, stop]: the loss terms are means over the micro-steps of all ranks
    (the aux loss and routing statistics are each rank's own, over its own tokens, as in any DDP MoE);
    stop > 0 when any rank got SIGINT/SIGTERM, so that all stop together."""
    starts = batch_rng.integers(0, len(data) - block_size, size=(train.gradient_accumulation_steps, train.batch_size))
    micro_steps = train.gradient_accumulation_steps // procs.world   # per process
    stats = torch.zeros(3, device=device)   # loss, ce, aux: means over this rank's micro-steps
    for i, micro in enumerate(starts[procs.rank * micro_steps:(procs.rank + 1) * micro_steps]):
        x, y = get_batch(data, micro, block_size, device)
        # DDP all-reduces gradients only on the last micro-step
        with (model.no_sync() if procs.ddp and i < micro_steps - 1 else nullcontext()), ctx:
            _, loss = model(x, y)
            if step + 1 == train.debug_nan_step:
                loss = loss * float("nan")
        (loss / micro_steps).backward()
        stats += torch.stack([loss.detach(), raw_model.last_ce, raw_model.last_aux]).float() / micro_steps
    # the total gradient norm (and clipping) tells at once whether any gradient is NaN/inf
    norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), train.grad_clip or math.inf)
    stop = torch.tensor([float(STOP["signum"] is not None)], device=device)
    flags = torch.cat([stats, norm.float().reshape(1), stop])
    if procs.ddp:
        dist.all_reduce(flags)
        flags[:4] /= procs.world
    return flags.tolist()


def count_nonfinite(train, step, loss, norm, skips, ckpt_path, last_ckpt_step, master):
    """A non-finite loss or gradient at step + 1: with --nonfinite=skip the number of skipped updates in a
    row; with 'stop', or after max_skips in a row, a UserError (nothing is saved)."""
    if train.nonfinite == "stop" or skips + 1 >= train.max_skips:
        where = (f"the last good checkpoint is {ckpt_path} (step {last_ckpt_step}): resume from it"
                 if last_ckpt_step is not None else "no checkpoint yet: rerun")
        raise UserError(f"non-finite loss or gradient at step {step + 1} (loss {loss}, grad norm {norm}"
                        f"{f', {skips + 1} in a row' if skips else ''}); nothing was saved; {where} "
                        "with a lower --learning_rate, or use --nonfinite=skip")
    if master:
        print(f"step {step + 1}: non-finite loss or gradient, update skipped ({skips + 1} in a row)", flush=True)
    return skips + 1


def train_record(raw_model, step, tokens, lr, loss, ce, aux, dt, tok_per_s, mfu, flops_token, device):
    return {"kind": "train", "step": step, "tokens": tokens, "flops": 3 * flops_token * tokens, "lr": lr,
            "loss": finite_or_none(loss), "ce": finite_or_none(ce), "aux": finite_or_none(aux),
            "tok_per_s": tok_per_s, "step_ms": 1000 * dt, "mfu": mfu, "peak_mem_mb": peak_memory_mb(device),
            "routing": raw_model.routing_summary()}


def progress_line(step, train, loss, lr, dt, tok_per_s, mfu, eta):
    return (f"step {step}/{train.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {1000 * dt:.0f} ms/step | "
            f"{tok_per_s / 1e3:.1f}k tok/s{f' | mfu {100 * mfu:.1f}%' if mfu else ''} | ETA {fmt_time(eta)}")


def stop_message(signum, step, ckpt_path, values, explicit, procs):
    """Where a run stopped by a signal stopped, and how to resume it."""
    launcher = f"torchrun --standalone --nproc_per_node={procs.world} train.py" if procs.ddp else "python train.py"
    again = " ".join(f"--{k}={values[k]}" for k in ("data_dir", "out_dir", "device") if k in explicit)
    return (f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to {ckpt_path}; "
            f"resume with: {launcher} {again + ' ' if again else ''}--init_from=resume")


def finish(metrics, train, out_dir, step, t_start, last_eval, ckpt_path):
    metrics.close()
    if train.plot:   # the run's figures into out_dir (plot.py; imported here: matplotlib is slow to load)
        try:
            import plot
            plot.plot_run(str(out_dir))
        except Exception as e:    # a figure must never cost the finished run
            print(f"warning: plotting failed ({type(e).__name__}: {e})", file=sys.stderr)
    print(f"done: {step} steps in {fmt_time(time.time() - t_start)}; final train loss {last_eval['train']:.4f}, "
          f"val loss {last_eval['val']:.4f}; checkpoint {ckpt_path}", flush=True)


def main(argv):
    values, explicit = parse_args(argv)
    procs, device = start_process(values["device"])
    master = procs.master
    train, cfg, ckpt, (meta, corpus), splits, values, path, prec = check_run(values, explicit, procs, device)
    out_dir, ckpt_path = Path(train.out_dir), Path(train.out_dir) / "ckpt.pt"
    raw_model, optimizer, batch_rng, (step, tokens, best_val) = build(cfg, train, ckpt, device, procs.rank)
    del ckpt                                    # free the memory of a second copy of the weights
    use_compile, use_bf16, ctx, dtype = prec
    compiled = torch.compile(raw_model) if use_compile else raw_model
    model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None) if procs.ddp else compiled
    peak, peak_label = mfu_peak(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else (None, "")
    # batches: the training stream from batch_rng, fixed eval batches from EVAL_SEED
    tokens_per_step = train.gradient_accumulation_steps * train.batch_size * cfg.block_size
    eval_starts = fixed_eval_batches(splits, train, cfg.block_size)
    flops_token = flops_per_token(cfg)
    metrics = start_logs(out_dir, cfg, train, meta, step) if master else None
    if master:
        system = describe_system(device, use_bf16, use_compile, procs)
        print(banner(cfg, train, step, tokens_per_step, system, path, peak, peak_label), flush=True)
    log = partial(write_record, metrics)

    def save(step):
        try:
            save_checkpoint(str(ckpt_path), checkpoint(raw_model, optimizer, cfg, train, step, tokens, best_val,
                                                       batch_rng, meta, corpus, device))
        except (OSError, RuntimeError, CheckpointError) as e:
            error = save_error(e, step, ckpt_path, last_ckpt_step)
            if error is None:
                raise                           # not a failed write: a bug, whose traceback should show
            raise error from None

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    start_step, skips, last_eval = step, 0, None
    last_ckpt_step = step if train.init_from == "resume" else None
    t_start = time.time()
    while True:
        # evaluation and checkpoint, at the step's start (rank 0)
        done = step >= train.max_iters
        if master and (step % train.eval_interval == 0 or done):
            last_eval = evaluate(compiled, splits, eval_starts, cfg.block_size, device, ctx, log, step, tokens,
                                 flops_token)
            best_val = min(best_val, last_eval["val"])
        unsaved = step > start_step or train.init_from == "scratch"   # this step's state is not in ckpt.pt
        due = step > start_step and step % (train.ckpt_interval or train.eval_interval) == 0
        if master and unsaved and (due or done):
            save(step)
            last_ckpt_step = step
        # termination conditions
        if done:
            break
        t0 = time.time()                        # step_ms times the step alone, not evals or saves

        # forward backward update, with the non-finite policy
        lr = get_lr(step, train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, ce, aux, norm, stop = forward_backward(model, raw_model, batch_rng, splits["train"], step, train,
                                                     cfg.block_size, procs, device, ctx)
        if math.isfinite(loss) and math.isfinite(norm):
            optimizer.step()
            skips = 0
        else:
            skips = count_nonfinite(train, step, loss, norm, skips, ckpt_path, last_ckpt_step, master)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step

        # timing and logging
        now = time.time()
        dt = now - t0
        if master and step % train.log_interval == 0:
            tok_per_s = tokens_per_step / dt
            mfu = 3 * flops_token * tok_per_s / (peak * procs.world) if peak else None
            log(train_record(raw_model, step, tokens, lr, loss, ce, aux, dt, tok_per_s, mfu, flops_token, device))
            eta = (now - t_start) / (step - start_step) * (train.max_iters - step)
            print(progress_line(step, train, loss, lr, dt, tok_per_s, mfu, eta), flush=True)
        # a signal on any rank: save and exit 128 + signal number
        if stop > 0:
            signum = STOP["signum"] or signal.SIGTERM
            if master:
                save(step)
                print(stop_message(signum, step, ckpt_path, values, explicit, procs), flush=True)
            return 128 + signum

    if master:
        finish(metrics, train, out_dir, step, t_start, last_eval, ckpt_path)
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except UserError as e:
        # one write of the whole line: print() writes the text and the newline apart, and under torchrun the
        # ranks' lines would interleave on the shared stderr ("...nopeerror: ...")
        sys.stderr.write(f"error: {e}\n")
        code = 2
    except KeyboardInterrupt:       # Ctrl-C before training started: nothing to save
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        code = 130
    except BrokenPipeError:         # `python train.py | head`: the reader left, so stop as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when exit flushes
        try:
            sys.stderr.write("error: the output pipe closed, so the run stopped; ckpt.pt (if any) holds the last "
                             "checkpoint: continue it with --init_from=resume\n")
        except BrokenPipeError:     # stderr went down the same pipe
            pass
        code = 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
