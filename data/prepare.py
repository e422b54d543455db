"""
Turn a text source into data/<name>/{train.bin, val.bin, meta.json} for train.py.

    python data/prepare.py shakespeare_char     # tiny Shakespeare, one token per character
    python data/prepare.py shakespeare          # tiny Shakespeare, GPT-2 BPE
    python data/prepare.py pystdlib_char        # this Python's standard library source, characters
    python data/prepare.py pystdlib             # the same, GPT-2 BPE
    python data/prepare.py --input PATH [PATH ...] --name NAME [--tokenizer char|gpt2] [--val_fraction 0.1]
                           [--out_dir DIR] [--bpe_dir DIR]

The tokenizer is --tokenizer, else the named dataset's own (the four above: as their names say), else char
for --input: one token per character, a vocabulary of a few dozen to a few hundred ids, which is what a
toy model wants (gpt2 would give it 50,257, padded to 50,304 by train.py). A name never picks it.
PATH: a file, or a folder whose text and Python files are read in sorted order; files are joined with a
newline after one that lacks it. val.bin is the last val_fraction of the tokens. GPT-2 BPE comes from
--bpe_dir, $UOE_BPE_DIR or the shipped data/gpt2 (data/README.md); tiktoken downloads them only when
none of these holds them (a clone never needs to). pystdlib* is the
running Python's standard library without tests and build-generated files, so another Python (version,
build, distribution) gives another corpus: meta.json records which, and the sha256 of the tokenized text.
"""
import argparse
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent             # data/<name>/ lives here
BUNDLED_BPE = DATA_DIR / "gpt2"                        # GPT-2's encoder.json + vocab.bpe, shipped
BUNDLED_SHAKESPEARE = DATA_DIR / "tinyshakespeare.txt"  # shipped with the repository
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2",   # the built-in datasets -> their tokenizer
            "pystdlib_char": "char", "pystdlib": "gpt2"}
INPUT_TOKENIZER = "char"     # --input's default: a toy model wants a few dozen ids, not GPT-2's 50,257
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".py"}
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__"}   # folders left out of pystdlib
UNK = "\ufffd"               # pystdlib_char: what a non-ASCII character becomes (meta.json's "unk")
CHUNK_CHARS = 4 << 20        # characters per streamed chunk
LAST_CUT = re.compile(r".*\S(?=[ \n])", re.DOTALL)   # greedy: up to the last non-space before a space/newline


class DataError(Exception):
    """A problem the user can fix; main() prints it as one `error: ...` line."""


def find_bpe_dir(bpe_dir=None):
    """Folder with GPT-2's encoder.json + vocab.bpe, or None when there is no local copy."""
    for d, explicit in ((bpe_dir, True), (os.environ.get("UOE_BPE_DIR"), True), (BUNDLED_BPE, False)):
        if not d:
            continue
        if (Path(d) / "encoder.json").is_file() and (Path(d) / "vocab.bpe").is_file():
            return str(Path(d).resolve())
        if explicit:  # a folder the user named must hold the files
            raise DataError(f"{d} lacks encoder.json and vocab.bpe; point --bpe_dir or UOE_BPE_DIR at GPT-2's "
                            "BPE files")
    return None


@functools.lru_cache(maxsize=None)
def gpt2_encoding(bpe_dir):
    """tiktoken's GPT-2 encoding, built from the files in bpe_dir (offline) or downloaded if None."""
    import tiktoken
    if bpe_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: requests ConnectionError, OSError, ...
            raise DataError(f"no local GPT-2 BPE files and tiktoken could not download them ({type(e).__name__}); "
                            "put encoder.json and vocab.bpe in a folder and pass --bpe_dir or set "
                            "UOE_BPE_DIR") from None
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str   # GPT-2's pre-token pattern, as tiktoken spells it
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # "" = read the local files directly, copy nothing into a cache
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=os.path.join(bpe_dir, "vocab.bpe"),
                                                encoder_json_file=os.path.join(bpe_dir, "encoder.json"))
    finally:
        if cache is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def code_points(text):
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)   # (len(text),)


def read_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}); run python data/prepare.py for this "
                        "dataset") from None


def get_tokenizer(meta, bpe_dir=None):
    """(encode, decode) for a prepared dataset's meta: encode(str) -> list of ids, decode(ids) -> str.
    A char dataset with an unknown token (meta's "unk": pystdlib_char's UNK) encodes a character outside its
    vocabulary as that token, as prepare() did in its corpus, with a warning on stderr; one without refuses it."""
    if meta["tokenizer"] == "char":
        itos = meta["itos"]
        stoi = {c: i for i, c in enumerate(itos)}
        unk = meta.get("unk")

        def encode(text):
            missing = sorted(set(text) - stoi.keys())
            if missing and unk is None:
                raise DataError(f"characters {''.join(missing)!r} are not in the dataset's vocabulary; leave them out")
            if missing:
                n = sum(c not in stoi for c in text)
                shown = "".join(missing[:20]) + ("..." if len(missing) > 20 else "")
                print(f"warning: {n} character{'s' * (n != 1)} ({shown!r}) "
                      f"{'are' if n != 1 else 'is'} not in the dataset's vocabulary; encoded as its unknown token "
                      f"{unk!r}, as in its corpus", file=sys.stderr)
            return [stoi[c] if c in stoi else stoi[unk] for c in text]
        return encode, lambda ids: "".join(itos[int(i)] for i in ids)
    enc = gpt2_encoding(find_bpe_dir(bpe_dir))
    return enc.encode_ordinary, lambda ids: enc.decode([int(i) for i in ids])


def input_files(paths):
    """The files of one or several --input paths, in the order given: a file whatever its name, a folder's
    TEXT_SUFFIXES files (recursive, sorted by path, hidden ones skipped)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path} does not exist; give an existing text file or folder")
        found = [path] if path.is_file() else sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix())
        if not found:
            raise DataError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in {path}; give a folder that "
                            "has some")
        files += found
    if sum(p.stat().st_size for p in files) == 0:
        raise DataError(f"{' '.join(map(str, paths))} {'is' if len(paths) == 1 else 'are'} empty (no text); "
                        "give a file or folder with text in it")
    return files


def stdlib_files(root=None):
    """(files, root): the standard library's *.py files (default: the running interpreter's) without
    STDLIB_SKIP folders and build-generated files, ordered by the sha256 of their path relative to root:
    a fixed order in which val.bin, the tail, samples many modules instead of the alphabetical last ones."""
    import sysconfig
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"no standard library folder at {root}; use --input with your own files instead")

    def kept(rel):  # _sysconfigdata_*.py and config-3.x-*/python-config.py embed the install path and flags
        folders = rel.parts[:-1]
        return not (STDLIB_SKIP & set(folders) or rel.name.startswith("_sysconfigdata")
                    or any(f.startswith("config-") for f in folders))
    files = [p for p in root.rglob("*.py") if p.is_file() and kept(p.relative_to(root))]
    if not files:
        raise DataError(f"no *.py files under {root}; use --input with your own files instead")
    files.sort(key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())
    return files, root


def download(url, dest, timeout=10):
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data = r.read()
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def shakespeare_files(out_dir):
    """(files, source label) of tiny Shakespeare: $UOE_SHAKESPEARE, the shipped copy, an earlier
    download, else a download. A dataset is what its name says: no stand-in text."""
    if os.environ.get("UOE_SHAKESPEARE"):
        return input_files(os.environ["UOE_SHAKESPEARE"]), str(Path(os.environ["UOE_SHAKESPEARE"]).resolve())
    for p in (BUNDLED_SHAKESPEARE, out_dir / "input.txt"):
        if p.is_file():
            return [p], str(p.resolve())
    try:
        download(SHAKESPEARE_URL, out_dir / "input.txt")
    except Exception as e:  # offline, timeout, HTTP error: any of them means "no Shakespeare here"
        raise DataError(f"tiny Shakespeare is missing ({BUNDLED_SHAKESPEARE} is not in this copy of the repository) "
                        f"and its download failed ({type(e).__name__}); restore the file (git checkout -- data) "
                        "or point UOE_SHAKESPEARE at a copy") from None
    return [out_dir / "input.txt"], SHAKESPEARE_URL


# -----------------------------------------------------------------------------
# Streaming, the one part here for inputs far larger than the shipped data: the text is read a few MB at a
# time, cut where no GPT-2 pre-token can span, and encoded a few chunks at a time on as many threads.

def text_chunks(files, chunk_chars, sha=None):
    """The files' text joined (a newline added after a file that lacks one) and hashed into sha, in chunks
    of about chunk_chars that each end at a non-space character followed by a space or newline. No GPT-2
    pre-token spans such a point, so encoding chunk by chunk gives exactly the ids of the whole text."""
    buf, end = "", "\n"  # end: the text's last character so far
    for path in files:
        sep = "" if end == "\n" else "\n"   # owed to the first piece of the next non-empty file
        try:
            with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as it is
                while piece := f.read(chunk_chars):
                    piece, sep, end = sep + piece, "", piece[-1]
                    if sha:
                        sha.update(piece.encode())
                    buf += piece
                    m = LAST_CUT.match(buf) if len(buf) >= chunk_chars else None
                    if m is None and len(buf) < max(4 * chunk_chars, 1 << 20):
                        continue  # no cut point yet; past 4 chunks (1M characters at least) cut anyway
                    if m is None:
                        print("note: no space or newline in 1M+ characters: cut there anyway; GPT-2 ids at "
                              "that point may differ from encoding the text in one piece", file=sys.stderr)
                    cut = m.end() if m else len(buf)
                    yield buf[:cut]
                    buf = buf[cut:]
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text; convert it (e.g. iconv -f latin1 -t utf-8) or "
                            "remove it") from None
    if buf:
        yield buf


def write_tokens(path, chunks, encode, dtype, workers, name):
    """encode(chunk) of every chunk, in order, appended to path; `workers` chunks at a time on as many threads
    (tiktoken releases the GIL), so the text is never read further ahead than that."""
    batches = iter(lambda: list(itertools.islice(chunks, workers)), [])
    with open(path, "wb") as f, ThreadPoolExecutor(workers) as pool:
        for i, batch in enumerate(batches, 1):
            for ids in pool.map(encode, batch):
                f.write(np.asarray(ids, dtype=dtype).tobytes())
            if i % 16 == 0:  # a sign of life on GB-sized inputs
                print(f"{name}: {f.tell() // np.dtype(dtype).itemsize:,} tokens so far", flush=True)


# -----------------------------------------------------------------------------

def char_vocabulary(files, chunk_chars, ascii_only):
    """(itos, encode, n_unk): the characters of the text in code point order, encode(text) -> ids, and n_unk,
    how many of its characters are not ASCII; ascii_only: each of those is encoded as UNK."""
    counts = np.zeros(0x110000, dtype=np.int64)     # (code points,) occurrences in the text
    for chunk in text_chunks(files, chunk_chars):
        n = np.bincount(code_points(chunk))
        counts[:len(n)] += n
    table = np.arange(len(counts))                   # code point -> the character it is encoded as
    if ascii_only:
        table[128:] = ord(UNK)
    present = np.unique(table[counts > 0])           # (vocab_size,) in code point order
    table = np.searchsorted(present, table).astype(np.uint32)   # code point -> token id
    return [chr(c) for c in present], lambda text: table[code_points(text)], int(counts[128:].sum())


def choose_tokenizer(name, input=None, tokenizer=None):
    """(tokenizer, why): the one given, else a built-in dataset's own, else INPUT_TOKENIZER for --input.
    The name alone never picks it: `--input a.txt --name mine` and `--name mine_bpe` both get char."""
    if tokenizer:
        return tokenizer, "--tokenizer"
    if input is None and name in DATASETS:
        return DATASETS[name], f"the built-in {name}'s own"
    return INPUT_TOKENIZER, "--tokenizer default for --input; --tokenizer=gpt2 for GPT-2 BPE"


def prepare(name, input=None, tokenizer=None, val_fraction=0.1, out_dir=None, bpe_dir=None,
            chunk_chars=CHUNK_CHARS, workers=min(8, os.cpu_count() or 1), stdlib_root=None):
    """Write out_dir (default data/<name>)/{train.bin, val.bin, meta.json}; returns out_dir.
    tokenizer: char, gpt2 or None (choose_tokenizer's default); input: a path or a list of paths;
    stdlib_root: the folder pystdlib* reads (default: this Python's); workers: threads that encode (the ids
    do not depend on it)."""
    t0 = time.time()
    if input is None and name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; use {' or '.join(DATASETS)}, or give --input PATH --name {name}")
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise DataError(f"dataset name {name!r} is not a plain folder name; use letters, digits, _ . -")
    tokenizer, why = choose_tokenizer(name, input, tokenizer)
    if tokenizer not in ("char", "gpt2"):
        raise DataError(f"unknown tokenizer {tokenizer!r}; use char or gpt2")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction} is not between 0 and 1; use e.g. 0.1")
    files = input_files(input) if input else None  # check the input before creating anything
    stdlib = input is None and name.startswith("pystdlib")
    if stdlib:
        files, stdlib_root = stdlib_files(stdlib_root)
    out_dir = Path(out_dir) if out_dir else DATA_DIR / name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()   # can we write there?
    except OSError as e:
        raise DataError(f"cannot write to {out_dir} ({e.strerror}); choose another --out_dir") from None
    print(f"tokenizer: {tokenizer} ({why})", flush=True)

    meta = {"name": name, "tokenizer": tokenizer}
    if stdlib:  # the corpus depends on this Python's version, build and distribution
        source = f"Python {sys.version.split()[0]} standard library: {stdlib_root.resolve()}"
        meta.update(python_version=sys.version, python_implementation=sys.implementation.name,
                    excluded=sorted(STDLIB_SKIP) + ["_sysconfigdata*.py", "config-*/"])
    elif files is None:
        files, source = shakespeare_files(out_dir)
    else:
        source = " ".join(str(Path(p).resolve()) for p in ([input] if isinstance(input, (str, os.PathLike)) else input))
    if tokenizer == "char":  # the vocabulary needs a first pass over the text
        meta["itos"], encode, n_unk = char_vocabulary(files, chunk_chars, ascii_only=stdlib)
        meta["stoi"] = {c: i for i, c in enumerate(meta["itos"])}
        if stdlib:  # pystdlib_char
            meta.update(unk=UNK, non_ascii_mapped_to_unk=n_unk)
        vocab_size = len(meta["itos"])
    else:
        bpe_dir = find_bpe_dir(bpe_dir)
        enc = gpt2_encoding(bpe_dir)
        vocab_size, encode, meta["bpe"] = enc.n_vocab, enc.encode_ordinary, bpe_dir or "tiktoken gpt2"
    dtype, sha = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32), hashlib.sha256()

    tmp = {f: out_dir / f"{f}.{os.getpid()}.tmp" for f in ("train.bin", "val.bin", "meta.json")}
    try:  # all tokens go to the train file first; the last val_fraction then moves to val.bin
        write_tokens(tmp["train.bin"], text_chunks(files, chunk_chars, sha), encode, dtype, workers, name)
        n = tmp["train.bin"].stat().st_size // dtype.itemsize
        n_val = int(n * val_fraction)
        if n_val < 1:
            raise DataError(f"{n} tokens leave an empty val split at val_fraction {val_fraction}; "
                            "give more text or raise --val_fraction")
        with open(tmp["train.bin"], "r+b") as f, open(tmp["val.bin"], "wb") as g:
            f.seek((n - n_val) * dtype.itemsize)
            shutil.copyfileobj(f, g)
            f.truncate((n - n_val) * dtype.itemsize)
        meta.update(vocab_size=vocab_size, dtype=dtype.name, train_tokens=n - n_val, val_tokens=n_val,
                    val_fraction=val_fraction, split="val.bin = the last val_fraction of the token stream",
                    source=source, source_files=len(files), source_sha256=sha.hexdigest())
        tmp["meta.json"].write_text(json.dumps(meta, indent=1))
        # an old meta.json goes first and the new one comes last, so a crash in between leaves
        # a folder that reads as "not prepared", never a mix of old and new files
        (out_dir / "meta.json").unlink(missing_ok=True)
        for f in ("train.bin", "val.bin", "meta.json"):
            os.replace(tmp[f], out_dir / f)
    except OSError as e:  # a disk full or an unreadable input file
        raise DataError(f"{e.strerror}: {e.filename}; check the path, its permissions and free disk space") from None
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    print(f"wrote {out_dir}: {n - n_val:,} train + {n_val:,} val tokens, vocab {vocab_size:,} ({tokenizer}), "
          f"{dtype.name}, from {source} in {time.time() - t0:.1f} s")
    return out_dir


def ensure_dataset(name, data_dir=DATA_DIR):
    """data_dir/name, prepared first if it has no meta.json yet (known dataset names only)."""
    out_dir = Path(data_dir) / name
    if (out_dir / "meta.json").is_file():
        return out_dir
    if name not in DATASETS:
        raise DataError(f"dataset {name!r} is not prepared in {data_dir}; "
                        f"run python data/prepare.py --input PATH --name {name} --out_dir {out_dir}")
    return prepare(name, out_dir=out_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare a text dataset: train.bin, val.bin, meta.json.")
    p.add_argument("dataset", nargs="?", help=f"{' or '.join(DATASETS)} (or use --input and --name)")
    p.add_argument("--input", nargs="+", help="files (any suffix: .txt, .py, ...) and/or folders of text and .py files")
    p.add_argument("--name", help="dataset name (default: the input's file name)")
    p.add_argument("--tokenizer", choices=["char", "gpt2"],
                   help="char: one token per character; gpt2: GPT-2 BPE (50,257 tokens). Default: a built-in "
                        f"dataset's own ({', '.join(f'{n}: {t}' for n, t in DATASETS.items())}), "
                        f"{INPUT_TOKENIZER} for --input whatever its --name")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--out_dir", help="default: data/<name>")
    p.add_argument("--bpe_dir", help="folder with GPT-2's encoder.json and vocab.bpe (or set UOE_BPE_DIR)")
    args = p.parse_args(argv)
    name = args.name or args.dataset or (args.input and Path(args.input[0]).stem)
    try:
        if not name:
            raise DataError(f"no dataset given; name one ({', '.join(DATASETS)}) or give --input PATH")
        prepare(name, input=args.input, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                out_dir=args.out_dir, bpe_dir=args.bpe_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
