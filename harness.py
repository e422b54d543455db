"""
The pieces bench.py, study.py, routers.py and gpu_check.py share: option parsing helpers, one-line errors and
interrupt handling (cli), JSON output, generated text between marker lines of the markdown (write_blocks), the
machine's description. Each of those scripts imports this.
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

from train import UserError, write_atomic
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
    write_atomic(path, json.dumps(finite(obj), indent=1, allow_nan=False))
    if not quiet:
        print(f"\nwrote {path}")


# -----------------------------------------------------------------------------
# generated text between marker lines of README.md and RESULTS.md (study.py report, routers.py --report)

def block_span(text, path, begin, end, command):
    """(start, stop) of the text between the marker lines begin and end; a UserError when one is missing.
    An empty block gives stop = start - 1 (the newline after begin is also the one before end): text[start:stop]
    is '' and text[:start] + new + text[stop:] puts new on a line of its own, as for any other block."""
    i = text.find(begin + "\n")
    j = text.find("\n" + end, i + len(begin)) if i >= 0 else -1
    if j < 0:
        raise UserError(f"{path} has no '{begin}' line followed by a '{end}' line; add the two lines where the "
                        f"generated text goes, then run {command}")
    return i + len(begin) + 1, j


def first_difference(path, text, start, stop, generated):
    """One line naming where the committed block of path (text[start:stop]) first differs from the generated
    one, by its line number in the file."""
    committed, lines = text[start:stop].split("\n"), generated.split("\n")
    i = next(i for i in range(max(len(committed), len(lines)))
             if i >= len(committed) or i >= len(lines) or committed[i] != lines[i])
    com, gen = (repr(x[i]) if i < len(x) else "the end of the block" for x in (committed, lines))
    return f"{path}:{text[:start].count(chr(10)) + 1 + i}: committed {com}, generated {gen}"


def write_blocks(blocks, check, source, command):
    """Generated markdown between marker lines. blocks: {option: (path, [(begin, end, text), ...])}, option the
    command's flag that names path (said when path cannot be read); source: what the text is generated from;
    command: the command that writes it. Write (check False): put each text between its markers, a file
    rewritten atomically and only when it changes. check: one line naming the first difference, on stderr.
    Every file is read and every marker found before anything is written. Returns the exit code: 0, or 1 when
    check finds a difference; a file that cannot be read or a missing marker is a UserError."""
    texts, spans = {}, {}
    for option, (path, items) in blocks.items():
        try:
            texts[option] = Path(path).read_text()
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror}); give its path with --{option}") from None
        spans[option] = [block_span(texts[option], path, begin, end, command) for begin, end, _ in items]
    if check:
        for option, (path, items) in blocks.items():
            for (start, stop), (_, _, generated) in zip(spans[option], items):
                if texts[option][start:stop] != generated:
                    print(f"{first_difference(path, texts[option], start, stop, generated)} (the text {source} "
                          f"gives); run {command}", file=sys.stderr)
                    return 1
        print(f"{' and '.join(str(path) for path, _ in blocks.values())} match{'es' * (len(blocks) == 1)} {source}")
        return 0
    said = []                               # printed after every file is written: a reader that left (`| head`)
    for option, (path, items) in blocks.items():                           # cannot stop a write half-way
        new = texts[option]
        for (start, stop), (_, _, generated) in sorted(zip(spans[option], items), reverse=True):  # last first:
            new = new[:start] + generated + new[stop:]                     # the earlier spans stay where they were
        if new != texts[option]:
            write_atomic(Path(path), new)
        said.append(f"wrote {path}" if new != texts[option] else f"{path} is up to date")
    print("\n".join(said))
    return 0


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
