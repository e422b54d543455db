"""train.py under bad input, signals, kills and NaNs: clear one-line errors, exit codes, no lost checkpoints."""

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import ENV, REPO, TINY, TRAIN, losses, run_train, start_train, wait_for_step
from uoe import CheckpointError, load_checkpoint

TINY = TINY + ["--lr_decay_iters=40"]


def run(*args):
    """(exit code, stdout, stderr) of train.py with args."""
    p = run_train(*args, check=False)
    return p.returncode, p.stdout, p.stderr


def assert_loadable_and_finite(path):
    ckpt = load_checkpoint(path)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    return ckpt


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).exists() else None


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """out_dir of a finished 2-step run: a real ckpt.pt (n_embd=32) to resume, cut or contradict."""
    out = tmp_path_factory.mktemp("trained")
    code, _, err = run(*TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", "--max_iters=2",
                       "--eval_interval=2")
    assert code == 0, err
    return out


# -----------------------------------------------------------------------------
# Bad input: exit code 2, one line `error: ...`, no traceback, no checkpoint changed.
# A case's setup(ws) prepares its folder ws (ws.out is the out_dir) and returns its extra options.

class Workspace:
    def __init__(self, root, data, trained):
        self.root, self.data, self.trained, self.out = root, data, trained, root / "out"

    def data_copy(self, change):
        """--data_dir of a copy of the prepared dataset with change(dataset_folder) applied."""
        copy = self.root / "data"
        shutil.copytree(self.data / "tiny", copy / "tiny")
        change(copy / "tiny")
        return [f"--data_dir={copy}"]

    def with_ckpt(self, change=None):
        """out_dir/ckpt.pt: a copy of the trained run's checkpoint, then change(path) if given."""
        self.out.mkdir()
        shutil.copy(self.trained / "ckpt.pt", self.out / "ckpt.pt")
        if change:
            change(self.out / "ckpt.pt")
        return []

    def other_corpus(self):
        """--data_dir of another corpus with tiny's vocabulary: its text with the lines in reverse order."""
        from data.prepare import prepare
        text = self.root / "reversed.txt"
        text.write_text("\n".join(reversed((self.data / "text.txt").read_text().splitlines())) + "\n")
        prepare("tiny", input=text, tokenizer="char", out_dir=self.root / "other" / "tiny")
        return [f"--data_dir={self.root / 'other'}"]

    def out_dir_under_a_file(self):
        (self.root / "file").write_text("x")
        return [f"--out_dir={self.root / 'file' / 'sub'}"]


def cut(path, n_bytes):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) - n_bytes])


def set_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


def edit_ckpt(change):
    """A change(ckpt dict) applied to the checkpoint file at path (saved back as train.py saves)."""
    def apply(path):
        ckpt = load_checkpoint(path)
        change(ckpt)
        torch.save(ckpt, path)
    return apply


def code_pickle(path):
    """Replace path by a 'checkpoint' whose unpickling would run os.mkdir(<case folder>/pwned)."""
    class Exploit:
        def __reduce__(self):
            return os.mkdir, (str(path.parent.parent / "pwned"),)
    torch.save({"model": {"w": Exploit()}, "config": {}}, path)


BAD_INPUTS = [
    # id, expected in the message, setup(ws) -> extra options
    ("missing_dataset", "'nope' is not prepared", lambda ws: ["--dataset=nope"]),
    ("empty_bin", "val.bin is empty", lambda ws: ws.data_copy(lambda d: (d / "val.bin").write_bytes(b""))),
    ("odd_sized_bin", "train.bin is truncated", lambda ws: ws.data_copy(lambda d: cut(d / "train.bin", 1))),
    ("bin_shorter_than_meta", "train.bin is truncated", lambda ws: ws.data_copy(lambda d: cut(d / "train.bin", 2))),
    ("block_size_longer_than_val", "longer than the val split", lambda ws: ["--block_size=5000"]),
    ("invalid_model_config", "top_k", lambda ws: ["--top_k=99"]),
    # a model option the variant does not read would be ignored without a word
    ("unread_option", "--n_shared=1 is not read by --ffn=uoe, so the run would ignore it; drop it, or choose a "
     "variant that reads it (--ffn=moe)", lambda ws: ["--n_shared=1"]),
    ("unread_options", "--uoe_output='twice' --vse=False are not read by --ffn=moe",
     lambda ws: ["--ffn=moe", "--vse=False", "--uoe_output=twice"]),
    ("grouped_experts_misaligned", "expert_path", lambda ws: ["--expert_path=grouped", "--expert_hidden=60"]),
    ("unknown_option", "did you mean --n_embd", lambda ws: ["--n_embed=64"]),
    ("bad_type", "--max_iters expects int", lambda ws: ["--max_iters=1.5"]),
    ("bad_choice", "--nonfinite must be", lambda ws: ["--nonfinite=ignore"]),
    # optimiser settings: AdamW's own checks would be a traceback; a negative clip would flip the gradients
    ("negative_learning_rate", "--learning_rate must be > 0", lambda ws: ["--learning_rate=-1"]),
    ("zero_learning_rate", "--learning_rate must be > 0", lambda ws: ["--learning_rate=0"]),
    ("negative_min_lr", "--min_lr must be >= 0", lambda ws: ["--min_lr=-1e-4"]),
    ("beta1_above_1", "--beta1 must be in [0, 1)", lambda ws: ["--beta1=1.5"]),
    ("beta2_of_1", "--beta2 must be in [0, 1)", lambda ws: ["--beta2=1"]),
    ("negative_weight_decay", "--weight_decay must be >= 0", lambda ws: ["--weight_decay=-0.1"]),
    ("negative_grad_clip", "--grad_clip must be >= 0", lambda ws: ["--grad_clip=-1"]),
    ("negative_warmup_iters", "--warmup_iters must be >= 0", lambda ws: ["--warmup_iters=-1"]),
    ("zero_lr_decay_iters", "--lr_decay_iters must be >= 1", lambda ws: ["--lr_decay_iters=0"]),   # not max_iters
    ("lr_decay_iters_below_warmup", "--lr_decay_iters=3 must be >= --warmup_iters=5",
     lambda ws: ["--lr_decay_iters=3"]),
    ("negative_seed", "--seed must be in [0, ", lambda ws: ["--seed=-1"]),          # numpy's seeds are >= 0
    ("seed_of_2_to_the_64", "--seed must be in [0, ", lambda ws: [f"--seed={2**64}"]),   # torch's are < 2**64
    ("cuda_without_cuda", "CUDA is not available", lambda ws: ["--device=cuda"]),
    ("mps_without_mps", "--device=mps but MPS", lambda ws: ["--device=mps"]),
    ("grouped_compiled_float32", "--expert_path=grouped with --compile=True needs bfloat16",
     lambda ws: ["--expert_path=grouped", "--compile=True"]),     # torch's grouped_mm tracing: bfloat16 only
    ("out_dir_under_a_file", "cannot write to out_dir", lambda ws: ws.out_dir_under_a_file()),
    ("resume_without_checkpoint", "no checkpoint at", lambda ws: ["--init_from=resume"]),
    ("resume_random_bytes", "corrupt or truncated",
     lambda ws: ws.with_ckpt(lambda p: p.write_bytes(os.urandom(5000))) + ["--init_from=resume"]),
    ("resume_truncated", "corrupt or truncated",
     lambda ws: ws.with_ckpt(lambda p: cut(p, p.stat().st_size // 2)) + ["--init_from=resume"]),
    ("resume_other_model", "--n_embd=64 but", lambda ws: ws.with_ckpt() + ["--init_from=resume", "--n_embd=64"]),
    ("resume_other_vocab", "vocab_size",
     lambda ws: ws.with_ckpt() + ["--init_from=resume", *ws.data_copy(lambda d: set_meta(d, vocab_size=50))]),
    ("resume_other_corpus", "is not the corpus that",
     lambda ws: ws.with_ckpt() + ["--init_from=resume", *ws.other_corpus()]),
    ("resume_code_pickle", "refusing to load", lambda ws: ws.with_ckpt(code_pickle) + ["--init_from=resume"]),
    ("resume_without_rng_state", "not a train.py checkpoint (no 'data.batch_rng')",
     lambda ws: ws.with_ckpt(edit_ckpt(lambda c: c["data"].pop("batch_rng"))) + ["--init_from=resume"]),
    ("resume_without_data_vocab", "not a train.py checkpoint (no 'data.meta_vocab_size')",
     lambda ws: ws.with_ckpt(edit_ckpt(lambda c: c["data"].pop("meta_vocab_size"))) + ["--init_from=resume"]),
    ("resume_unbuildable_model", "holds a model this uoe.py cannot build",
     lambda ws: ws.with_ckpt(edit_ckpt(lambda c: c["config"].update(top_k=99))) + ["--init_from=resume"]),
    ("fresh_run_over_a_checkpoint", "already exists", lambda ws: ws.with_ckpt()),
    ("nonfinite_skip_limit", "non-finite loss or gradient at step 2",
     lambda ws: ["--nonfinite=skip", "--max_skips=1", "--debug_nan_step=2"]),
]

# Each case runs train.py as __main__ (a fresh module, as `python train.py` would) inside ONE Python
# process, so torch is imported once rather than once per case (~2 s each on 2 cores).
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
repo = sys.argv[1]
sys.path.insert(0, repo)      # as for `python train.py`: the script's folder comes first
results = []
for argv in json.loads(sys.stdin.read()):
    sys.argv, err = [repo + "/train.py", *argv], io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_input_results(data, trained, tmp_path_factory):
    """{case id: (exit code, stderr, workspace, ckpt sha before, ckpt sha after)} for every BAD_INPUTS case."""
    cases, workspaces = [], {}
    for case_id, _, setup in BAD_INPUTS:
        ws = Workspace(tmp_path_factory.mktemp(case_id), data, trained)
        extra = setup(ws)
        argv = ["--device=cpu", *TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={ws.out}", "--max_iters=3",
                *extra]
        workspaces[case_id] = (ws, sha(ws.out / "ckpt.pt"))
        cases.append(argv)
    p = subprocess.run([sys.executable, "-c", DRIVER, str(REPO)], input=json.dumps(cases), capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout.splitlines()[-1])
    return {case_id: (r["code"], r["stderr"], ws, before, sha(ws.out / "ckpt.pt"))
            for (case_id, _, _), r, (ws, before) in zip(BAD_INPUTS, results, workspaces.values())}


@pytest.mark.parametrize("case_id, message", [(c[0], c[1]) for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_changes_no_checkpoint(bad_input_results, case_id, message):
    if case_id == "cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if case_id == "mps_without_mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    code, stderr, ws, before, after = bad_input_results[case_id]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], stderr
    assert message in lines[0]
    assert before == after                      # an existing checkpoint is never overwritten on error
    assert not (ws.root / "pwned").exists()     # the pickled code never ran
    if case_id in ("grouped_compiled_float32", "grouped_experts_misaligned"):
        assert not (ws.out / "run.json").exists()   # refused before any work: no model, no data, no log


# -----------------------------------------------------------------------------
# Resuming: checkpoints of earlier versions, and options that are per run (expert_path)

def train_here(capsys, *args):
    """train.py's main(args) in this process (no interpreter start): (exit code, stdout, stderr). A UserError
    propagates."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = train.main(["--device=cpu", "--plot=False", *map(str, args)])
    finally:
        for s, handler in handlers.items():     # main installs its own
            signal.signal(s, handler)
    out, err = capsys.readouterr()
    return code, out, err


def test_checkpoint_of_an_earlier_version_resumes_with_the_defaults_of_its_missing_fields(data, trained,
                                                                                         tmp_path, capsys):
    out = tmp_path / "out"
    Workspace(tmp_path, data, trained).with_ckpt(edit_ckpt(
        lambda c: [c["config"].pop(k) for k in ("expert_path", "z_loss_coef")] + [c["data"].pop("corpus")]))
    code, stdout, _ = train_here(capsys, f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume",
                                 "--max_iters=3")
    assert code == 0
    notes = [line for line in stdout.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {out / 'ckpt.pt'} was written by an earlier version without z_loss_coef: "
                     "resuming with the default z_loss_coef=0.0",     # expert_path is per run: nothing to note
                     f"note: {out / 'ckpt.pt'} was written by an earlier version without a corpus fingerprint: "
                     f"cannot check that it was trained on {data / 'tiny'}; resuming"]
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 3 and (ckpt["config"]["z_loss_coef"], ckpt["config"]["expert_path"]) == (0.0, "auto")
    assert ckpt["data"]["corpus"] == load_checkpoint(trained / "ckpt.pt")["data"]["corpus"]   # from now on: checked


def test_an_unread_option_restored_from_a_checkpoint_is_no_error(data, trained, tmp_path, capsys):
    """Only the options set on this command line are checked against the variant: a uoe checkpoint written
    before that check, with an --n_shared=1 its run ignored, still resumes."""
    out = tmp_path / "out"
    Workspace(tmp_path, data, trained).with_ckpt(edit_ckpt(lambda c: c["config"].update(n_shared=1)))
    code, _, _ = train_here(capsys, f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume", "--max_iters=3")
    assert code == 0 and load_checkpoint(out / "ckpt.pt")["config"]["n_shared"] == 1


def test_resume_on_another_corpus_when_allowed_warns_in_one_line(data, trained, tmp_path, capsys):
    ws = Workspace(tmp_path, data, trained)
    ws.with_ckpt()
    other = ws.other_corpus()
    capsys.readouterr()
    code, _, stderr = train_here(capsys, *other, f"--out_dir={ws.out}", "--init_from=resume", "--max_iters=3",
                                 "--allow_other_corpus=True")
    assert code == 0
    assert stderr == (f"warning: {tmp_path / 'other' / 'tiny'} is not the corpus that {ws.out / 'ckpt.pt'} was "
                      "trained on; continuing on it (--allow_other_corpus=True)\n")
    corpus = load_checkpoint(ws.out / "ckpt.pt")["data"]["corpus"]
    assert corpus != load_checkpoint(trained / "ckpt.pt")["data"]["corpus"]   # the checkpoint names the new one
    code, _, stderr = train_here(capsys, *other, f"--out_dir={ws.out}", "--init_from=resume", "--max_iters=4")
    assert code == 0 and stderr == ""          # and resumes on it without the option


def test_corpus_fingerprint_names_the_tokens(data, tmp_path):
    """From meta.json's sha256 of the source text where data/prepare.py recorded it (free, whatever the size),
    else from train.bin and val.bin themselves."""
    folder = tmp_path / "tiny"
    shutil.copytree(data / "tiny", folder)
    meta = json.loads((folder / "meta.json").read_text())
    fp = train.corpus_fingerprint
    assert fp(folder, meta) == fp(data / "tiny", meta)                      # the same data, wherever it lies
    assert fp(folder, {**meta, "source": "elsewhere", "name": "x"}) == fp(folder, meta)
    for other in ({"source_sha256": "0" * 64}, {"val_tokens": 1}, {"tokenizer": "gpt2"}):
        assert fp(folder, {**meta, **other}) != fp(folder, meta), other
    by_hand = {k: v for k, v in meta.items() if k != "source_sha256"}      # a meta.json written by hand
    before = fp(folder, by_hand)
    assert fp(folder, {**by_hand, "val_tokens": 1}) == before               # the files themselves count
    val = (folder / "val.bin").read_bytes()
    (folder / "val.bin").write_bytes(val[2:] + val[:2])                     # the same tokens, in another order
    assert fp(folder, by_hand) != before


def test_expert_path_is_chosen_per_run_not_taken_from_the_checkpoint(data, trained, tmp_path, capsys):
    out = tmp_path / "out"
    Workspace(tmp_path, data, trained).with_ckpt(edit_ckpt(lambda c: c["config"].update(expert_path="grouped")))
    code, stdout, _ = train_here(capsys, f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume",
                              "--max_iters=3", "--expert_path=loop")
    assert code == 0 and "(experts: loop)" in stdout.splitlines()[0] and "resuming at step 2" in stdout
    assert load_checkpoint(out / "ckpt.pt")["config"]["expert_path"] == "loop"
    code, stdout, _ = train_here(capsys, f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume",
                              "--max_iters=4", "--expert_path=grouped")
    assert code == 0 and "(experts: grouped GEMM)" in stdout.splitlines()[0]
    code, stdout, _ = train_here(capsys, f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume",
                                 "--max_iters=5")
    assert code == 0 and "(experts: loop)" in stdout.splitlines()[0]   # not given: 'auto' (loop on CPU)


# -----------------------------------------------------------------------------
# Signals and kills

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_a_final_checkpoint_and_exit_cleanly(data, tmp_path, sig):
    out = tmp_path / "out"
    proc = start_train(*TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", "--max_iters=1000",
                 "--eval_interval=1000")        # the signal's checkpoint is the only one
    wait_for_step(proc, out, 3)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    last = stdout.strip().splitlines()[-1]
    ckpt = assert_loadable_and_finite(out / "ckpt.pt")
    assert ckpt["step"] == max(losses(out, cut_ok=True)) >= 3
    assert last == (f"stopped by {sig.name} at step {ckpt['step']}; checkpoint saved to {out / 'ckpt.pt'}; "
                    f"resume with: python train.py --data_dir={data} --out_dir={out} --device=cpu --init_from=resume")


def test_a_closed_output_pipe_stops_with_one_line_and_exit_141_keeping_the_checkpoint(data, tmp_path):
    """`python train.py | head -3`: the reader leaves; train.py stops as SIGPIPE would, no traceback."""
    out = tmp_path / "out"
    proc = start_train(*TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", "--max_iters=1000",
                       "--eval_interval=2")
    wait_for_step(proc, out, 3)                  # checkpointed at step 2
    proc.stdout.close()                          # the reader leaves: the next print meets a closed pipe
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 141, stderr
    assert stderr == ("error: the output pipe closed, so the run stopped; ckpt.pt (if any) holds the last "
                      "checkpoint: continue it with --init_from=resume\n")
    assert assert_loadable_and_finite(out / "ckpt.pt")["step"] >= 2


def test_sigkill_at_any_instant_leaves_a_loadable_checkpoint_and_resume_loses_only_steps_since_it(data, tmp_path):
    common = [*TINY, f"--data_dir={data}", "--dataset=tiny", "--eval_interval=5", "--ckpt_interval=1"]
    out = tmp_path / "out"
    reference = start_train(*common, f"--out_dir={tmp_path / 'ref'}", "--max_iters=20")
    resume = []
    for kill_at, delay in ((3, 0.0), (8, 0.013), (13, 0.031)):   # and a little later: any instant, saves too
        proc = start_train(*common, f"--out_dir={out}", "--max_iters=1000", *resume)
        try:
            wait_for_step(proc, out, kill_at)
            time.sleep(delay)
        finally:
            proc.kill()
            proc.communicate()
        ckpt = assert_loadable_and_finite(out / "ckpt.pt")
        assert max(losses(out, cut_ok=True)) - ckpt["step"] <= 1         # at most the steps since the last save
        resume = ["--init_from=resume"]
    code, stdout, stderr = run(f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume", "--max_iters=20",
                               "--plot=False")
    assert code == 0, stderr
    assert reference.wait() == 0
    ref, got = losses(tmp_path / "ref"), losses(out, cut_ok=True)
    assert sorted(got) == list(range(1, 21))
    assert all(abs(got[s] - ref[s]) <= 1e-5 for s in ref), (ref, got)
    assert not list(out.glob(".*.tmp"))                         # temp files of killed saves are cleaned up


# -----------------------------------------------------------------------------
# Non-finite loss

def test_nan_loss_stops_with_exit_2_naming_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    common = [*TINY, f"--data_dir={data}", "--dataset=tiny", "--eval_interval=100", "--ckpt_interval=3"]
    clean = start_train(*common, f"--out_dir={tmp_path / 'clean'}", "--max_iters=6")   # the same run, up to step 6
    code, _, stderr = run(*common, f"--out_dir={tmp_path / 'nan'}", "--max_iters=20", "--debug_nan_step=7")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: non-finite loss or gradient at step 7 ")
    assert f"the last good checkpoint is {tmp_path / 'nan' / 'ckpt.pt'} (step 6)" in stderr
    ckpt = assert_loadable_and_finite(tmp_path / "nan" / "ckpt.pt")
    assert clean.wait() == 0
    good = load_checkpoint(tmp_path / "clean" / "ckpt.pt")
    assert ckpt["step"] == good["step"] == 6
    assert all(torch.equal(ckpt["model"][k], good["model"][k]) for k in good["model"])


def test_nonfinite_skip_skips_the_update_and_continues(data, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run(*TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", "--max_iters=8",
                               "--eval_interval=100", "--nonfinite=skip", "--debug_nan_step=4")
    assert code == 0, stderr
    assert "step 4: non-finite loss or gradient, update skipped (1 in a row)" in stdout
    steps = losses(out, cut_ok=True)
    assert steps[4] is None and all(steps[s] is not None for s in (1, 2, 3, 5, 6, 7, 8))
    assert assert_loadable_and_finite(out / "ckpt.pt")["step"] == 8


# -----------------------------------------------------------------------------
# A checkpoint that cannot be written: one line, exit 2, the previous checkpoint kept

def no_room(ckpt):
    return (f"{ckpt} still holds step 2: resume from it with --init_from=resume once there is room (free disk "
            "space, or raise the file-size limit: ulimit -f)")


def test_a_file_size_limit_at_a_save_is_one_line_exit_2_keeping_the_previous_checkpoint(data, trained, tmp_path):
    """(ulimit -f N; python train.py ...): python ignores SIGXFSZ, so the save's write fails with EFBIG, which
    torch's writer turns into a RuntimeError."""
    ws = Workspace(tmp_path, data, trained)
    ws.with_ckpt()
    ckpt = ws.out / "ckpt.pt"
    before, limit = sha(ckpt), ckpt.stat().st_size // 2    # run.json and metrics.jsonl stay far below it
    p = subprocess.run([*TRAIN, f"--data_dir={data}", f"--out_dir={ws.out}", "--init_from=resume", "--max_iters=4",
                        "--plot=False"], capture_output=True, text=True, timeout=300,
                       env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"},
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"error: cannot save the checkpoint of step 4 to {ckpt} (File too large); {no_room(ckpt)}\n"
    assert sha(ckpt) == before and not list(ws.out.glob(".*.tmp"))


WRITER_FAILED = "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/3: " \
                "file write failed"


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError(WRITER_FAILED), WRITER_FAILED),
    (RuntimeError("a bug"), None)])
def test_a_failed_save_is_one_user_error_keeping_the_previous_checkpoint(data, trained, tmp_path, capsys,
                                                                         monkeypatch, error, reason):
    ws = Workspace(tmp_path, data, trained)
    ws.with_ckpt()
    ckpt = ws.out / "ckpt.pt"
    before = sha(ckpt)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"the first bytes")
        raise error
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(Exception) as e:
        train_here(capsys, f"--data_dir={data}", f"--out_dir={ws.out}", "--init_from=resume", "--max_iters=4")
    if reason is None:                   # not a failed write: a bug keeps its traceback
        assert e.value is error
    else:
        assert type(e.value) is train.UserError
        assert str(e.value) == f"cannot save the checkpoint of step 4 to {ckpt} ({reason}); {no_room(ckpt)}"
    assert sha(ckpt) == before and not list(ws.out.glob(".*.tmp"))


def test_a_save_error_says_what_is_kept():
    ckpt = Path("out/ckpt.pt")
    e = train.save_error(OSError(errno.ENOSPC, "No space left on device"), 5, ckpt, None)
    assert str(e) == ("cannot save the checkpoint of step 5 to out/ckpt.pt (No space left on device); no checkpoint "
                      "was saved before: rerun once there is room (free disk space, or raise the file-size limit: "
                      "ulimit -f)")
    e = train.save_error(CheckpointError("refusing to write out/ckpt.pt: non-finite weights in lm_head.weight"), 5,
                         ckpt, 4)
    assert str(e) == ("refusing to write out/ckpt.pt: non-finite weights in lm_head.weight; out/ckpt.pt still holds "
                      "step 4: resume from it with --init_from=resume with a lower --learning_rate")
