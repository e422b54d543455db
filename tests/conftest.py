"""Fixtures and helpers shared by the test files (`from conftest import ...`): the tiny training options,
the train.py launcher, and readers of a run's metrics.jsonl."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# the tests import the project's top-level modules (uoe, train, ...) from the repo root
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# a tiny model: every train.py run in the tests takes a few seconds on 2 CPU cores, most of it importing torch
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--expert_hidden=64", "--block_size=32", "--batch_size=8",
        "--eval_iters=2", "--log_interval=1", "--plot=False", "--warmup_iters=5", "--learning_rate=1e-2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # tiny models: one thread is as fast, and runs can overlap
# first on every command line, so that a test's own later --device wins: CPU even where CUDA exists (train.py's
# default is cuda when available), for exact float32 results and a gloo DDP that never asks for cuda:1
TRAIN = [sys.executable, str(REPO / "train.py"), "--device=cpu"]


def start_train(*args, **popen):
    """train.py with args, started (a Popen; stdout and stderr piped as text unless popen says otherwise)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([*TRAIN, *map(str, args)], env=ENV, **popen)


def run_train(*args, check=True, cwd=None):
    """train.py with args, to the end (a CompletedProcess); with check, a failure is an AssertionError."""
    p = subprocess.run([*TRAIN, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def records(out_dir, kind="train", cut_ok=False):
    """The records of one kind in out_dir/metrics.jsonl; cut_ok: skip a line a kill cut short."""
    out = []
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if not cut_ok:
                raise
            continue
        if rec["kind"] == kind:
            out.append(rec)
    return out


def losses(out_dir, cut_ok=False):
    """{step: loss} of the train records in out_dir/metrics.jsonl."""
    return {r["step"]: r["loss"] for r in records(out_dir, cut_ok=cut_ok)}


def wait_for_step(proc, out_dir, step, timeout=120):
    """Wait until the run in out_dir has logged the train record of `step` (and so has checkpointed before it,
    where a checkpoint was due)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if max(losses(out_dir, cut_ok=True), default=0) >= step:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"no step {step} in {timeout} s")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' models are tiny: extra threads only add overhead, and a lot of it when the
    cores are shared."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """data_dir with a 40k-character slice of the repository's tiny Shakespeare prepared char-level
    ("tiny") and as GPT-2 BPE from the repository's BPE files ("tiny_bpe")."""
    from data.prepare import BUNDLED_BPE, BUNDLED_SHAKESPEARE, prepare
    root = tmp_path_factory.mktemp("data")
    text = root / "text.txt"
    text.write_text(BUNDLED_SHAKESPEARE.read_text()[:40_000])
    prepare("tiny", input=text, tokenizer="char", out_dir=root / "tiny")
    prepare("tiny_bpe", input=text, tokenizer="gpt2", out_dir=root / "tiny_bpe", bpe_dir=BUNDLED_BPE)
    return root


# the routed variants and UoE switches (METHOD.md §2-3) that every equivalence test covers; each test file adds
# entries whose sizes (d_low, n_routing) fit its own model
ROUTED_VARIANTS = {
    "moe": dict(ffn="moe"),
    "moe_shared": dict(ffn="moe", n_shared=1),
    "moe_top1": dict(ffn="moe", top_k=1),
    "aoe": dict(ffn="aoe"),
    "uoe": dict(ffn="uoe"),
    "uoe_twice": dict(ffn="uoe", uoe_output="twice"),
    "uoe_no_vse": dict(ffn="uoe", vse=False),
    "uoe_no_vse_swiglu": dict(ffn="uoe", vse=False, route_score="swiglu"),
    "uoe_pre": dict(ffn="uoe", route_score="pre"),
    "uoe_swiglu": dict(ffn="uoe", route_score="swiglu"),
}


def count_calls(monkeypatch, module, name):
    """Wrap module.<name> so that the returned list grows by one entry per call."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    return calls


def captured_dispatch(m, x, autocast_dtype=None):
    """Run the FFN m on x once (under autocast to autocast_dtype if given) and return the (args,
    kwargs) it passed to uoe.dispatch: args (x, topk_idx, expert_fn, weights), kwargs path and, where
    the experts reuse scoring's activations, reused; so that a test can call dispatch itself with a
    forced routing."""
    import uoe
    seen, real = {}, uoe.dispatch

    def spy(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return real(*args, **kwargs)
    uoe.dispatch = spy
    try:
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            m(x)
    finally:
        uoe.dispatch = real
    return seen["args"], seen["kwargs"]

