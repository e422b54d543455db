"""
The pieces bench.py, study.py and gpu_check.py share: option parsing helpers, one-line errors and
interrupt handling (cli), JSON output, the machine's description. Neither of those scripts imports
another; each imports this.
"""
import argparse
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from train import UserError
from uoe import FFN_VARIANTS

REPO = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# options

class Parser(argparse.ArgumentParser):
    def error(self, message):           # argparse's own errors, one line, same convention
        raise UserError(f"{message}; see python {self.prog} --help")


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s} must be >= 1")
    return v


def positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"{s} must be a positive number")
    return v


def variant_list(s, allowed=FFN_VARIANTS):
    names = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown variant {bad[0] if bad else s!r} "
                                         f"(choose from {','.join(allowed)})")
    return list(dict.fromkeys(names))


def settle(args, preset, json_name):
    """bench's and study's options, completed: preset defaults where the command line left them out, --device
    auto resolved, OUT_DIR and the JSON's folder made now rather than after minutes of runs. A device or dtype
    this machine cannot give is a UserError."""
    for k, v in preset.items():
        if getattr(args, k, 0) is None:
            setattr(args, k, v)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    if args.preset == "gpu" and args.device != "cuda":
        raise UserError("--preset gpu needs a CUDA GPU; use --preset cpu")
    if args.dtype == "bfloat16" and args.device != "cuda":
        raise UserError("--dtype bfloat16 (autocast) is for CUDA here; use --dtype float32 on CPU")
    args.json = args.json or str(Path(args.out_dir) / json_name)
    make_folders(args.out_dir, Path(args.json).parent)
    return args


def make_folders(*folders):
    try:
        for folder in folders:
            Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {e.filename} ({e.strerror}); choose another --out_dir / --json") from None


# -----------------------------------------------------------------------------
# the command line: one line for every way a command can end early

class Terminated(KeyboardInterrupt):
    """SIGTERM to this command (kill, a scheduler, a container stop): it stops as on Ctrl-C. By default SIGTERM
    would end the process at once, leaving what it started (a study's runs, gpu_check's stage) running."""


def on_sigterm(signum, frame):
    raise Terminated


def cli(run, argv, interrupted="interrupted"):
    """run(argv) as a command line program; returns the exit code: 0 done; 2 a UserError or a bad model size
    (GPTConfig's ValueError), in one `error: ...` line; 130 Ctrl-C and 143 SIGTERM, in one line (`interrupted`);
    141 when stdout's reader left (`| head`): quietly, as a program that SIGPIPE ends."""
    main_thread = threading.current_thread() is threading.main_thread()       # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\n{interrupted}", file=sys.stderr)         # on a line of its own: the terminal has echoed ^C
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    except BrokenPipeError:
        try:                                              # no second error when the interpreter flushes stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):                     # stdout is no file here (a test's capture)
            pass
        return 141                                        # 128 + SIGPIPE, as train.py and sample.py
    except ValueError as e:                               # GPTConfig's validation
        if "GPTConfig" not in str(e):
            raise
        print(f"error: {e}; change the size flags", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


# -----------------------------------------------------------------------------
# output

def finite(obj):
    """obj with every non-finite float (inf, nan) replaced by None: strict JSON has neither (train.py's
    metrics.jsonl does the same, finite_or_none)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path, obj, quiet=False):
    """Write obj as strict JSON (a non-finite float becomes null), atomically: a temporary file renamed into
    place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(finite(obj), indent=1, allow_nan=False))
    os.replace(tmp, path)
    if not quiet:
        print(f"\nwrote {path}")


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "CPU"


def device_name(device):
    """The machine a command ran on, for its output: the GPU's name on cuda, else the CPU's."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()
