"""Tests for train.py: it trains, its options, exact resume after SIGKILL, DDP equals one process."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from conftest import ENV, TINY, TRAIN, losses, records, run_train, start_train, wait_for_step
from uoe import load_checkpoint


def test_char_run_lowers_the_loss_and_logs_the_schema(data, tmp_path):
    out = tmp_path / "out"
    p = run_train(*TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", "--max_iters=30",
                  "--eval_interval=15")
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5      # from ~ln(vocab) down
    assert f"val loss {evals[-1]['val_loss']:.4f}" in p.stdout.splitlines()[-1]   # the final line says it
    assert "8 experts top-2 (experts: loop);" in p.stdout.splitlines()[0] and "MFU" not in p.stdout   # the banner
    train_rec = records(out)[-1]
    assert set(train_rec) >= {"kind", "step", "tokens", "flops", "lr", "loss", "ce", "aux", "tok_per_s",
                              "step_ms", "mfu", "peak_mem_mb", "routing"}      # at least these: more is harmless
    assert set(evals[-1]) >= {"kind", "step", "tokens", "flops", "train_loss", "val_loss"}
    assert train_rec["tokens"] == 30 * 8 * 32 and train_rec["mfu"] is None and train_rec["peak_mem_mb"] is None
    assert len(train_rec["routing"]) == 1 and len(train_rec["routing"][0]["load"]) == 8
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["dataset"] == "tiny" and run_json["config"]["n_embd"] == 32
    assert run_json["config"]["vocab_size"] == run_json["meta"]["vocab_size"]
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 30 and ckpt["train_config"]["max_iters"] == 30


def test_gpt2_bpe_run_lowers_the_loss(data, tmp_path):
    out = tmp_path / "out"
    run_train(*TINY, f"--data_dir={data}", "--dataset=tiny_bpe", f"--out_dir={out}", "--max_iters=10",
              "--eval_interval=10", "--ffn=moe")
    evals = records(out, "eval")
    assert evals[0]["val_loss"] > 10 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 1   # ln(50257) = 10.8
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["config"]["vocab_size"] == 50304 and run_json["meta"]["vocab_size"] == 50257   # padded
    assert load_checkpoint(out / "ckpt.pt")["data"]["meta_vocab_size"] == 50257


def test_gpt2_vocab_is_padded_to_a_multiple_of_64_unless_set():
    bpe, char = {"vocab_size": 50257, "tokenizer": "gpt2"}, {"vocab_size": 65, "tokenizer": "char"}
    cfg = train.GPTConfig(vocab_size=50257)
    assert train.fit_vocab(cfg, bpe, set(), None, Path("d")).vocab_size == 50304
    assert train.fit_vocab(cfg, char, set(), None, Path("d")).vocab_size == 65        # char level: as is
    assert train.fit_vocab(cfg, bpe, {"vocab_size"}, None, Path("d")).vocab_size == 50257   # --vocab_size wins
    assert train.fit_vocab(dataclasses.replace(cfg, vocab_size=50400), bpe, {"vocab_size"}, None,
                           Path("d")).vocab_size == 50400


def test_mfu_peak_by_gpu_name_for_bfloat16_only():
    peaks = {"NVIDIA H200": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 80GB HBM3": 989, "NVIDIA A100-SXM4-80GB": 312,
             "NVIDIA L40S": 362, "NVIDIA L40": 181, "NVIDIA L4": 121, "NVIDIA A10G": 70,
             "NVIDIA GeForce RTX 4090": 165, "NVIDIA GeForce RTX 3090": 71}
    for name, tflops in peaks.items():
        peak, label = train.mfu_peak(name, torch.bfloat16)
        assert peak == tflops * 1e12 and label.endswith(f"bf16 dense {tflops} TFLOP/s"), (name, label)
    assert train.mfu_peak("NVIDIA H100 PCIe", "bfloat16")[1] == "H100 PCIe bf16 dense 756 TFLOP/s"
    assert train.mfu_peak("NVIDIA L40S", "bfloat16")[1].startswith("L40S ")
    for name, dtype in (("NVIDIA H200", torch.float32), ("NVIDIA H200", "float32"), ("Tesla T4", torch.bfloat16)):
        peak, label = train.mfu_peak(name, dtype)
        assert peak is None and label.startswith("no MFU"), label
    assert train.mfu_peak("Tesla T4", torch.float32, override_tflops=65) == (65e12, "given peak 65 TFLOP/s")


def test_options_given_on_resume_reach_the_optimizer(data, tmp_path):
    out = tmp_path / "out"
    run_train(*TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    run_train(f"--data_dir={data}", f"--out_dir={out}", "--init_from=resume", "--max_iters=4", "--weight_decay=0",
              "--beta2=0.95", "--plot=False")
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert [(g["weight_decay"], tuple(g["betas"])) for g in ckpt["optimizer"]["param_groups"]] == \
        [(0.0, (0.9, 0.95))] * 2
    saved = json.loads((out / "run.json").read_text())["train"]
    assert (saved["weight_decay"], saved["beta2"]) == (0.0, 0.95) == \
        (ckpt["train_config"]["weight_decay"], ckpt["train_config"]["beta2"])
    assert ckpt["step"] == 4


# lr_decay_iters fixed: the learning rate then does not depend on max_iters, so a run cut short with
# a large max_iters and resumed with --max_iters=24 computes exactly what a 24-step run computes
RESUMABLE = TINY + ["--lr_decay_iters=40", "--eval_interval=8", "--ckpt_interval=4", "--ffn=uoe"]


def test_sigkill_then_resume_continues_and_reproduces_the_uninterrupted_run(data, tmp_path):
    common = [*RESUMABLE, f"--data_dir={data}", "--dataset=tiny"]
    killed = tmp_path / "killed"
    proc = start_train(*common, f"--out_dir={killed}", "--max_iters=1000", stdout=subprocess.DEVNULL)
    reference = start_train(*common, f"--out_dir={tmp_path / 'ref'}", "--max_iters=24", stdout=subprocess.DEVNULL)
    try:
        wait_for_step(proc, killed, 10)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert reference.wait() == 0, reference.stderr.read()
    ckpt_step = load_checkpoint(killed / "ckpt.pt")["step"]
    assert ckpt_step >= 8 and ckpt_step % 4 == 0

    p = run_train(f"--data_dir={data}", f"--out_dir={killed}", "--init_from=resume", "--max_iters=24", "--plot=False")
    assert f"resuming at step {ckpt_step}" in p.stdout
    steps = [r["step"] for r in records(killed)]
    assert steps == list(range(1, 25))                 # continued, and the log reads as one run
    ref, got = losses(tmp_path / "ref"), losses(killed)
    assert all(abs(got[s] - ref[s]) <= 1e-5 for s in ref), (ref, got)
    assert load_checkpoint(killed / "ckpt.pt")["step"] == 24


def test_two_process_gloo_run_matches_one_process_with_the_same_global_batch(data, tmp_path):
    common = [*TINY, f"--data_dir={data}", "--dataset=tiny", "--max_iters=6", "--eval_interval=6",
              "--gradient_accumulation_steps=2", "--batch_size=4"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *TRAIN[1:], *common, f"--out_dir={tmp_path / 'ddp'}"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "x 2 processes" in ddp.stdout
    run_train(*common, f"--out_dir={tmp_path / 'single'}")
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert sorted(a) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    val = [r["val_loss"] for r in records(tmp_path / "ddp", "eval")]
    assert val == pytest.approx([r["val_loss"] for r in records(tmp_path / "single", "eval")], abs=1e-5)


def test_every_rank_stops_with_the_error_when_rank_0_cannot_prepare_the_data(tmp_path):
    # (torchrun's --monitor-interval=2: it would SIGTERM rank 1 as soon as it notices that rank 0 exited)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--monitor-interval=2", *TRAIN[1:], f"--data_dir={tmp_path}", "--dataset=nope",
                        f"--out_dir={tmp_path / 'out'}", "--gradient_accumulation_steps=2"],
                       capture_output=True, text=True, env=ENV, timeout=120)   # (a stuck rank would wait 30 min)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], p.stderr
    assert "dataset 'nope' is not prepared" in errors[0]
    assert "[rank1]: Traceback" not in p.stderr and "[rank0]: Traceback" not in p.stderr   # (torchrun's own follows)


def test_a_rank_without_its_own_gpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(train.UserError, match=r"cuda:1 is needed but this machine has 1 GPU\(s\); start at most one"):
        train.resolve_device("auto", local_rank=1)
    with pytest.raises(train.UserError, match="use --device=cuda:0"):
        train.resolve_device("cuda:3", local_rank=None)


def test_mps_runs_float32_eager_on_the_loop_path_and_is_a_one_line_error_without_mps(monkeypatch):
    """Apple silicon cannot run here: the options are resolved with MPS pretended, without a step."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    values, _ = train.parse_args(["--device=mps"])
    device = train.resolve_device(values["device"], local_rank=None)
    tc, model = train.split_options(values)
    use_compile, use_bf16, _, dtype = train.precision(tc, device)
    assert (device, use_compile, use_bf16, dtype) == (torch.device("mps"), False, False, torch.float32)
    assert train.expert_path(train.make_model_config(model), device, dtype, use_compile) == "loop"
    tc, _ = train.split_options(train.parse_args(["--device=mps", "--compile=True"])[0])
    assert train.precision(tc, device)[0] is True                       # compile: off by default only
    tc, _ = train.split_options(train.parse_args(["--device=mps", "--dtype=bfloat16"])[0])
    with pytest.raises(train.UserError, match=r"^--device=mps runs float32 only .*; drop --dtype=bfloat16 or use"):
        train.precision(tc, device)
    with pytest.raises(train.UserError, match="--expert_path=grouped does not run on mps .*; use --expert_path=loop"):
        train.expert_path(train.GPTConfig(expert_path="grouped"), device, dtype)
    with pytest.raises(train.UserError, match="--device=mps runs one process only"):
        train.resolve_device("mps", local_rank=0)                       # under torchrun
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(train.UserError, match=r"^--device=mps but MPS .* not available .*; use --device=cpu$"):
        train.resolve_device("mps", local_rank=None)
    with pytest.raises(train.UserError, match=r"use auto, cpu, cuda\[:N\] or mps"):
        train.resolve_device("metal", local_rank=None)


def test_help_lists_every_training_and_model_option(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in train.option_table():
        assert f"--{name}=" in text
    assert "--ffn='uoe'" in text and "--max_iters=" in text
    device_help = next(line for line in text.splitlines() if line.lstrip().startswith("--device="))
    assert "'mps'" in device_help


def test_help_into_a_pipe_closed_early_exits_quietly():
    """`python train.py --help | head`: the reader leaving is no error and no line about checkpoints."""
    p = subprocess.Popen([*TRAIN, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    p.stdout.close()                  # the reader left before the help was written
    assert (p.stderr.read(), p.wait(timeout=120)) == ("", 0)


def test_unknown_option_suggests_the_nearest_valid_ones():
    with pytest.raises(train.UserError, match=r"unknown option --n_embed; did you mean --n_embd"):
        train.parse_args(["--n_embed=64"])


def test_every_model_field_is_an_option_with_its_type_checked():
    values, explicit = train.parse_args(["--ffn=moe", "--n_shared=1", "--d_low=None", "--route_norm=inf",
                                         "--route_norm=1", "--aux_loss_coef=0", "--compile"])
    assert (values["ffn"], values["n_shared"], values["route_norm"], values["compile"]) == ("moe", 1, 1, True)
    assert values["aux_loss_coef"] == 0.0 and isinstance(values["aux_loss_coef"], float)
    assert explicit == {"ffn", "n_shared", "d_low", "route_norm", "aux_loss_coef", "compile"}
    assert values["n_layer"] == train.GPTConfig().n_layer          # model defaults come from uoe.GPTConfig
    with pytest.raises(train.UserError, match="--vse expects bool"):
        train.parse_args(["--vse=1"])


def test_a_model_option_the_variant_does_not_read_is_refused_unless_at_its_default(tmp_path):
    def check(*argv):
        values, explicit = train.parse_args(list(argv))
        _, model = train.split_options(values)
        train.check_read(train.make_model_config(model), model, explicit)
    with pytest.raises(train.UserError, match=r"^--n_shared=1 is not read by --ffn=uoe, so the run would ignore it; "
                                              r"drop it, or choose a variant that reads it \(--ffn=moe\)$"):
        check("--n_shared=1")
    with pytest.raises(train.UserError, match=r"^--uoe_output='twice' --vse=False are not read by --ffn=moe, .*; "
                                              r"drop them, or choose a variant that reads them \(--ffn=uoe\)$"):
        check("--ffn=moe", "--vse=False", "--uoe_output=twice")
    with pytest.raises(train.UserError, match=r"\(--ffn=aoe or --ffn=uoe\)$"):
        check("--ffn=dense", "--route_norm=1")
    with pytest.raises(train.UserError, match=r"\(n_shared: --ffn=moe; vse: --ffn=uoe\)$"):   # no variant reads both
        check("--ffn=aoe", "--n_shared=1", "--vse=False")
    cfg = tmp_path / "cfg.py"
    cfg.write_text("ffn = 'moe'\nd_low = 7\n")
    with pytest.raises(train.UserError, match=r"^--d_low=7 is not read by --ffn=moe"):   # a config file sets it too
        check(str(cfg))
    for ffn in train.FFN_VARIANTS:       # study.py gives every field: those the variant does not read at their defaults
        check(*(f"--{k}={v!r}" for k, v in dataclasses.asdict(train.GPTConfig(ffn=ffn)).items()))
    check("--ffn=moe", "--n_shared=1", "--route_norm=2", "--n_routing=None")


def test_config_file_then_command_line(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import math\nffn = 'moe'\nmax_iters = 7\nlearning_rate = 1e-3 * math.sqrt(4)\n")
    values, explicit = train.parse_args([str(cfg), "--max_iters=9"])
    assert (values["ffn"], values["max_iters"], values["learning_rate"]) == ("moe", 9, 2e-3)
    values, _ = train.parse_args([f"--config={cfg}"])
    assert values["max_iters"] == 7


def test_learning_rate_warms_up_then_decays_to_min_lr():
    t = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lrs = [train.get_lr(s, t) for s in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0 and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[110] == lrs[119] == 0.1
    t = dataclasses.replace(t, lr_decay_iters=10)                      # the decay ends where it is told
    assert train.get_lr(10, t) == 0.1 and train.get_lr(9, t) == lrs[9]


def test_lr_decay_iters_below_1_or_the_warmup_is_an_error_not_max_iters():
    """--lr_decay_iters=0 used to mean max_iters (`lr_decay_iters or max_iters`): only None means that."""
    check = train.check_train_config
    with pytest.raises(train.UserError, match=r"^--lr_decay_iters must be >= 1; fix the option$"):
        check(train.TrainConfig(lr_decay_iters=0, warmup_iters=0), 1)
    with pytest.raises(train.UserError, match=r"^--lr_decay_iters=50 must be >= --warmup_iters=100 .*None: decay"):
        check(train.TrainConfig(lr_decay_iters=50), 1)
    for ok in (None, 100, 5000):
        check(train.TrainConfig(lr_decay_iters=ok), 1)


def test_seed_must_suit_numpy_and_torch_for_every_rank():
    """numpy's default_rng takes seeds >= 0 and torch.manual_seed seeds < 2**64; rank r seeds torch with seed + r."""
    check = train.check_train_config
    for seed, world in ((0, 1), (2**64 - 1, 1), (2**64 - 2, 2)):
        check(train.TrainConfig(seed=seed, gradient_accumulation_steps=world), world)
        np.random.default_rng(seed)
        torch.manual_seed(seed + world - 1)
    for seed, world in ((-1, 1), (2**64, 1), (2**64 - 1, 2)):
        with pytest.raises(train.UserError, match=rf"^--seed must be in \[0, {2**64 - world}\]; fix the option$"):
            check(train.TrainConfig(seed=seed, gradient_accumulation_steps=world), world)


def test_batches_go_to_a_device_that_is_neither_cuda_nor_cpu():
    """--device=mps trains only if get_batch moves its batches there; no MPS here, so the meta device (every
    torch has it) stands in for any device that is not cuda and not cpu."""
    data = np.arange(100, dtype=np.uint16)
    for device in (torch.device("meta"), torch.device("cpu")):
        x, y = train.get_batch(data, [0, 7], 4, device)
        assert x.device == y.device == device and x.shape == y.shape == (2, 4) and x.dtype == torch.int64
    x, y = train.get_batch(data, [0, 7], 4, torch.device("cpu"))
    assert x.tolist() == [[0, 1, 2, 3], [7, 8, 9, 10]] and y.tolist() == [[1, 2, 3, 4], [8, 9, 10, 11]]


@pytest.mark.skipif(not os.environ.get("UOE_SLOW_TESTS"), reason="torch.compile on CPU takes a minute or more; "
                    "set UOE_SLOW_TESTS=1 to run it")
def test_compile_trains_like_eager(data, tmp_path):
    common = [*TINY, f"--data_dir={data}", "--dataset=tiny", "--max_iters=8", "--eval_interval=8"]
    p = run_train(*common, f"--out_dir={tmp_path / 'compiled'}", "--compile=True")
    assert "compiled" in p.stdout.splitlines()[0]
    run_train(*common, f"--out_dir={tmp_path / 'eager'}")
    a, b = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert sorted(a) == list(range(1, 9)) and all(abs(a[s] - b[s]) < 1e-3 for s in a), (a, b)
