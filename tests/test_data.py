"""Tests for data/prepare.py: offline, a few seconds in all."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data.prepare as prep
from conftest import REPO

# whitespace runs, \r\n, contractions, digits, non-ASCII: the cases where a careless chunk cut changes BPE ids
TRICKY = "a  \n\n\n  b\t\r\nit's 12345 x  \n \u00a0y\u3000z 中文。\n\n  \n'll  done   "


def corpus():
    """First 20 kB of the tiny Shakespeare that ships with the repository."""
    return prep.BUNDLED_SHAKESPEARE.read_text(encoding="utf-8")[:20_000]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def load(out_dir):
    """meta, train ids, val ids of a prepared dataset, checking the files agree with meta."""
    meta = json.loads((out_dir / "meta.json").read_text())
    train = np.fromfile(out_dir / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(out_dir / "val.bin", dtype=meta["dtype"])
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert not list(out_dir.glob("*.tmp"))
    return meta, train, val


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_char_dataset_round_trips(tmp_path):
    text = corpus()
    out = prep.prepare("tiny", input=write(tmp_path / "in.txt", text), tokenizer="char", out_dir=tmp_path / "out")
    meta, train, val = load(out)
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert meta["itos"] == sorted(set(text)) and meta["vocab_size"] == len(set(text))
    assert len(train) + len(val) == len(text) and len(val) == int(len(text) * 0.1)
    encode, decode = prep.get_tokenizer(prep.read_meta(out))
    assert decode(np.concatenate([train, val])) == text
    assert decode(val) == text[-len(val):]  # val is the end of the stream
    assert encode(text[:100]) == train[:100].tolist()
    assert meta["source_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_char_encode_refuses_unknown_characters(tmp_path):
    out = prep.prepare("tiny", input=write(tmp_path / "in.txt", "abc\n" * 50), tokenizer="char", out_dir=tmp_path / "o")
    encode, _ = prep.get_tokenizer(prep.read_meta(out))
    with pytest.raises(prep.DataError, match="not in the dataset's vocabulary"):
        encode("abz")


def test_char_encode_maps_unknown_characters_to_the_unknown_token_as_the_corpus_did(tmp_path, capsys):
    """pystdlib_char's corpus has every non-ASCII character as UNK: a prompt's are encoded the same way,
    with one warning line that counts them (sample.py's --start)."""
    root = fake_stdlib(tmp_path / "lib")
    meta, train, val = load(prep.prepare("pystdlib_char", out_dir=tmp_path / "o", stdlib_root=root))
    capsys.readouterr()
    encode, decode = prep.get_tokenizer(meta)
    ids = encode("# caf\u00e9 \u201cquoted\u201d\n")       # json/__init__.py's line, as written
    out, err = capsys.readouterr()
    assert err.startswith("warning: 3 characters ") and err.count("\n") == 1 and "unknown token" in err, err
    assert decode(ids) == "# caf\ufffd \ufffdquoted\ufffd\n"
    corpus_ids = np.concatenate([train, val]).tolist()
    assert any(corpus_ids[i:i + len(ids)] == ids for i in range(len(corpus_ids)))   # the corpus's own ids
    assert encode("x = 1") == [meta["stoi"][c] for c in "x = 1"] and capsys.readouterr().err == ""


def test_gpt2_from_local_files_offline(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("network blocked in tests")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    prep.gpt2_encoding.cache_clear()
    enc = prep.gpt2_encoding(prep.find_bpe_dir())
    assert enc.n_vocab == 50257
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262] and enc.encode_ordinary("\n\n") == [628]
    assert not list((tmp_path / "cache").iterdir())  # local files are read, not copied to a cache
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "cache")

    text = corpus()
    out = prep.prepare("tiny_bpe", input=write(tmp_path / "in.txt", text), tokenizer="gpt2", out_dir=tmp_path / "o")
    meta, train, val = load(out)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    assert np.concatenate([train, val]).tolist() == enc.encode_ordinary(text)
    encode, decode = prep.get_tokenizer(prep.read_meta(out))
    assert encode("Hello world") == [15496, 995] and decode(train) + decode(val) == text


def test_gpt2_without_local_files_or_network_is_a_clear_error(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("network blocked in tests")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setattr(prep, "BUNDLED_BPE", tmp_path / "no_bpe")
    monkeypatch.delenv("UOE_BPE_DIR", raising=False)
    prep.gpt2_encoding.cache_clear()
    with pytest.raises(prep.DataError, match="could not download"):
        prep.prepare("x", input=write(tmp_path / "in.txt", corpus()), tokenizer="gpt2", out_dir=tmp_path / "o")
    with pytest.raises(prep.DataError, match="lacks encoder.json"):
        prep.find_bpe_dir(tmp_path)
    prep.gpt2_encoding.cache_clear()


def test_folder_input_is_recursive_sorted_and_text_only(tmp_path):
    src = tmp_path / "corpus"
    write(src / "b.txt", "bee\n" * 20)
    write(src / "a" / "d.rst", "dee" * 20)  # no final newline: one is added before the next file
    write(src / "a" / "c.md", "see\n" * 20)
    write(src / "a" / "skip.bin", "not text\n")
    write(src / ".hidden" / "x.txt", "hidden\n")
    out = prep.prepare("folder", input=src, tokenizer="char", out_dir=tmp_path / "o")
    meta, train, val = load(out)
    _, decode = prep.get_tokenizer(meta)
    joined = "see\n" * 20 + "dee" * 20 + "\n" + "bee\n" * 20
    assert decode(np.concatenate([train, val])) == joined
    assert meta["source_files"] == 3 and meta["source_sha256"] == hashlib.sha256(joined.encode()).hexdigest()



def test_several_inputs_in_order_and_python_files(tmp_path):
    a = write(tmp_path / "x" / "mod.py", "def f():\n    return 1\n")
    b = write(tmp_path / "notes", "plain words")       # a file is taken whatever its suffix
    write(tmp_path / "pkg" / "z.py", "z = 1\n")
    write(tmp_path / "pkg" / "a.txt", "a\n")
    out = prep.prepare("multi", input=[b, a, tmp_path / "pkg"], tokenizer="char", out_dir=tmp_path / "o")
    meta, train, val = load(out)
    _, decode = prep.get_tokenizer(meta)
    assert decode(np.concatenate([train, val])) == "plain words\n" + "def f():\n    return 1\n" + "a\n" + "z = 1\n"
    assert meta["source_files"] == 4
    r = run_cli("--input", b, a, "--name", "m2", "--tokenizer", "char", "--out_dir", tmp_path / "o2")
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "o2")[0]["source_files"] == 2


def fake_stdlib(root):
    """A tiny stand-in for the standard library: modules, a package, test folders, site-packages."""
    write(root / "os.py", "import sys\n")
    write(root / "json" / "__init__.py", "# caf\u00e9 \u201cquoted\u201d\n")
    write(root / "json" / "decoder.py", "x = 1\n" * 30)
    for skipped in ("test/test_os.py", "json/tests/t.py", "idlelib/idle_test/t.py", "site-packages/pkg/m.py"):
        write(root / skipped, "SKIPPED\n")
    write(root / "README.txt", "not python\n")
    # generated at build time: they hold the install path and compiler flags, which differ between machines
    write(root / "_sysconfigdata__linux_x86_64-linux-gnu.py", "GENERATED = {'prefix': '/opt/py'}\n")
    write(root / "config-3.11-x86_64-linux-gnu" / "python-config.py", "#!/opt/py/bin/python3.11\nGENERATED\n")
    return root


@pytest.mark.parametrize("name", ["pystdlib_char", "pystdlib"])
def test_pystdlib_reads_the_stdlib_python_files_without_tests(tmp_path, name):
    root = fake_stdlib(tmp_path / "lib")
    out = prep.prepare(name, out_dir=tmp_path / name, stdlib_root=root, bpe_dir=prep.BUNDLED_BPE)
    meta, train, val = load(out)
    _, decode = prep.get_tokenizer(meta)
    text = decode(np.concatenate([train, val]))
    assert "GENERATED" not in text and "SKIPPED" not in text and "not python" not in text
    assert "import sys" in text and "x = 1" in text
    assert meta["source_files"] == 3 and meta["python_version"] == sys.version   # with its build and compiler
    assert meta["python_implementation"] == sys.implementation.name
    assert meta["tokenizer"] == ("char" if name == "pystdlib_char" else "gpt2")
    files, _ = prep.stdlib_files(root)          # a fixed order (sha256 of the relative path), not alphabetical
    assert sorted(files) == sorted([root / "os.py", root / "json" / "__init__.py", root / "json" / "decoder.py"])
    assert files == prep.stdlib_files(root)[0]
    if name == "pystdlib_char":                   # non-ASCII characters become one UNK token
        assert "# caf\ufffd \ufffdquoted\ufffd" in text
        assert all(ord(c) < 128 for c in meta["itos"] if c != prep.UNK) and prep.UNK in meta["itos"]
        assert meta["non_ascii_mapped_to_unk"] == 3
    else:                                         # GPT-2 BPE keeps them, and decodes to the hashed text
        assert "caf\u00e9 \u201cquoted\u201d" in text
        assert meta["source_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_pystdlib_of_the_running_python_lists_its_modules():
    files, root = prep.stdlib_files()
    rel = {p.relative_to(root).as_posix() for p in files}
    assert "os.py" in rel and "json/decoder.py" in rel
    assert not any(part in prep.STDLIB_SKIP or part.startswith("config-") for r in rel for part in r.split("/")[:-1])
    assert not any(r.startswith("_sysconfigdata") for r in rel)

@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_streaming_in_tiny_chunks_equals_single_shot(tmp_path, tokenizer):
    text = corpus()[:5000] + TRICKY * 30
    src = write(tmp_path / "in.txt", text)
    whole = prep.prepare("a", input=src, tokenizer=tokenizer, out_dir=tmp_path / "whole")
    tiny = prep.prepare("a", input=src, tokenizer=tokenizer, out_dir=tmp_path / "tiny", chunk_chars=16)
    for f in ("train.bin", "val.bin"):
        assert (whole / f).read_bytes() == (tiny / f).read_bytes()
    if tokenizer == "gpt2":
        ids = np.concatenate(load(whole)[1:]).tolist()
        assert ids == prep.gpt2_encoding(prep.find_bpe_dir()).encode_ordinary(text)


def test_text_chunks_keep_the_text_and_cut_after_a_non_space_before_whitespace(tmp_path):
    text = TRICKY * 20
    chunks = list(prep.text_chunks([write(tmp_path / "a.txt", text), write(tmp_path / "b.txt", "x")], 5))
    assert "".join(chunks) == text + "\nx" and len(chunks) > 20   # a newline after a file that lacks one
    assert all(not c[-1].isspace() and n[0] in " \n" for c, n in zip(chunks, chunks[1:]))


def test_several_threads_write_what_one_thread_writes(tmp_path):
    src = write(tmp_path / "in.txt", corpus() * 3 + TRICKY)
    one = prep.prepare("a", input=src, tokenizer="gpt2", out_dir=tmp_path / "one", chunk_chars=2000, workers=1)
    two = prep.prepare("a", input=src, tokenizer="gpt2", out_dir=tmp_path / "two", chunk_chars=2000, workers=2)
    for f in ("train.bin", "val.bin"):
        assert (one / f).read_bytes() == (two / f).read_bytes()


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    chars = [chr(c) for c in range(32, 32 + 72_000) if not 0xD800 <= c < 0xE000]  # no surrogates
    text = "".join(chars) * 2
    out = prep.prepare("wide", input=write(tmp_path / "in.txt", text), tokenizer="char", out_dir=tmp_path / "o")
    meta, train, val = load(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(chars) > 65536
    assert prep.get_tokenizer(meta)[1](np.concatenate([train, val])) == text


def test_shipped_files_are_the_published_ones():
    """data/README.md's sha256: the tiny Shakespeare of char-rnn and the GPT-2 BPE files tiktoken checks."""
    expected = {prep.BUNDLED_SHAKESPEARE: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                prep.BUNDLED_BPE / "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                prep.BUNDLED_BPE / "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
    for path, digest in expected.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path
        assert digest[:8] in (prep.DATA_DIR / "README.md").read_text()


def test_shakespeare_comes_from_the_shipped_copy_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "download", lambda *a, **k: pytest.fail("downloaded"))
    monkeypatch.delenv("UOE_SHAKESPEARE", raising=False)
    meta, train, val = load(prep.prepare("shakespeare_char", out_dir=tmp_path / "sc"))
    assert meta["source"] == str(prep.BUNDLED_SHAKESPEARE) and meta["vocab_size"] == 65
    assert meta["train_tokens"] + meta["val_tokens"] == 1_115_394


def test_missing_shakespeare_offline_is_a_clear_error_not_another_text(tmp_path, monkeypatch):
    def no_network(url, dest, timeout=10):
        raise OSError("network blocked in tests")
    monkeypatch.setattr(prep, "BUNDLED_SHAKESPEARE", tmp_path / "gone.txt")
    monkeypatch.setattr(prep, "download", no_network)
    monkeypatch.delenv("UOE_SHAKESPEARE", raising=False)
    with pytest.raises(prep.DataError, match="tiny Shakespeare is missing"):
        prep.prepare("shakespeare_char", out_dir=tmp_path / "sc")
    assert not (tmp_path / "sc" / "meta.json").exists()


def test_shakespeare_is_downloaded_when_no_local_copy(tmp_path, monkeypatch):
    def fake_download(url, dest, timeout=10):
        dest.write_text("To be, or not to be\n" * 50)
    monkeypatch.setattr(prep, "BUNDLED_SHAKESPEARE", tmp_path / "gone.txt")
    monkeypatch.setattr(prep, "download", fake_download)
    monkeypatch.delenv("UOE_SHAKESPEARE", raising=False)
    meta, _, _ = load(prep.prepare("shakespeare_char", out_dir=tmp_path / "sc"))
    assert meta["source"] == prep.SHAKESPEARE_URL and meta["vocab_size"] == len(set("To be, or not to be\n"))


def test_ensure_dataset_prepares_once(tmp_path, monkeypatch):
    monkeypatch.setenv("UOE_SHAKESPEARE", str(write(tmp_path / "s.txt", corpus())))
    out = prep.ensure_dataset("shakespeare_char", tmp_path / "data")
    assert out == tmp_path / "data" / "shakespeare_char" and load(out)[0]["tokenizer"] == "char"
    monkeypatch.setattr(prep, "prepare", lambda *a, **k: pytest.fail("prepared twice"))
    assert prep.ensure_dataset("shakespeare_char", tmp_path / "data") == out
    with pytest.raises(prep.DataError, match="not prepared"):
        prep.ensure_dataset("my_corpus", tmp_path / "data")


def test_failed_prepare_leaves_the_old_dataset_and_no_temp_files(tmp_path):
    out = prep.prepare("a", input=write(tmp_path / "in.txt", corpus()), tokenizer="char", out_dir=tmp_path / "o")
    before = (out / "meta.json").read_text()
    write(tmp_path / "src" / "a.txt", corpus())
    (tmp_path / "src" / "b.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(prep.DataError, match="b.txt is not UTF-8"):
        prep.prepare("a", input=tmp_path / "src", tokenizer="gpt2", out_dir=out)
    assert (out / "meta.json").read_text() == before
    names = {p.name for p in out.iterdir()}
    assert {"meta.json", "train.bin", "val.bin"} <= names and not [n for n in names if n.endswith(".tmp")]


def test_cli_prepares_a_file(tmp_path):
    r = run_cli("--input", write(tmp_path / "in.txt", corpus()), "--name", "tiny", "--tokenizer", "char",
                "--val_fraction", "0.2", "--out_dir", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    meta, train, val = load(tmp_path / "o")
    assert meta["name"] == "tiny" and meta["val_fraction"] == 0.2


def test_input_is_char_level_whatever_its_name_unless_tokenizer_says(tmp_path):
    """--input's default is characters: a name ending in _char used to get GPT-2 BPE (50,257 ids)."""
    text = corpus()
    src = write(tmp_path / "in.txt", text)
    r = run_cli("--input", src, "--name", "mine_char", "--out_dir", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tokenizer: char (--tokenizer default for --input")
    meta = load(tmp_path / "a")[0]
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(set(text)) and meta["itos"] == sorted(set(text))
    r = run_cli("--input", src, "--name", "mine", "--tokenizer", "gpt2", "--out_dir", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tokenizer: gpt2 (--tokenizer)\n")
    assert (load(tmp_path / "b")[0]["tokenizer"], load(tmp_path / "b")[0]["vocab_size"]) == ("gpt2", 50257)
    help_text = " ".join(run_cli("--help").stdout.split())
    assert "char for --input whatever its --name" in help_text and "*_char" not in help_text


def test_built_in_datasets_keep_their_tokenizers_and_input_defaults_to_char():
    expected = {"shakespeare_char": "char", "shakespeare": "gpt2", "pystdlib_char": "char", "pystdlib": "gpt2"}
    for name, tokenizer in expected.items():
        assert prep.choose_tokenizer(name) == (tokenizer, f"the built-in {name}'s own")
        assert prep.choose_tokenizer(name, tokenizer="char") == ("char", "--tokenizer")
    for name in ("mine", "mine_char", "mine_bpe", "shakespeare"):
        assert prep.choose_tokenizer(name, input="x.txt")[0] == "char"
    assert prep.choose_tokenizer("mine", input="x.txt", tokenizer="gpt2") == ("gpt2", "--tokenizer")


def _error_cases(tmp):
    (tmp / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    write(tmp / "empty.txt", "")
    write(tmp / "nontext" / "a.bin", "x\n")
    write(tmp / "afile", "x\n")
    write(tmp / "tiny.txt", "ab\n")
    small = write(tmp / "small.txt", corpus())
    return {
        "missing": (["--input", tmp / "nope.txt", "--name", "x"], "does not exist"),
        "empty": (["--input", tmp / "empty.txt", "--name", "x"], "is empty"),
        "not_utf8": (["--input", tmp / "latin1.txt", "--name", "x"], "latin1.txt is not UTF-8"),
        "no_text_files": (["--input", tmp / "nontext", "--name", "x"], "no text files"),
        "unwritable_out_dir": (["--input", small, "--name", "x", "--tokenizer", "char",
                                "--out_dir", tmp / "afile" / "o"],
                               "cannot write"),
        "empty_val": (["--input", tmp / "tiny.txt", "--name", "x", "--tokenizer", "char"], "empty val split"),
        "unknown_dataset": (["nosuch"], "unknown dataset 'nosuch'"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "not_utf8", "no_text_files", "unwritable_out_dir",
                                  "empty_val", "unknown_dataset"])
def test_user_errors_exit_2_with_one_line(tmp_path, case, capsys):
    """In process (the CLI's entry point is main(), run as a script by the tests above): any other exception
    than the one-line exit would fail the test."""
    args, message = _error_cases(tmp_path)[case]
    if case != "unwritable_out_dir" and "--out_dir" not in args:
        args = args + ["--out_dir", tmp_path / "out"]
    with pytest.raises(SystemExit) as e:
        prep.main(list(map(str, args)))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and all(line.startswith("tokenizer: ") for line in out.splitlines()), out
    assert err.startswith("error: ") and err.count("\n") == 1 and "; " in err, err
    assert message in err
    assert not (tmp_path / "out" / "meta.json").exists()
