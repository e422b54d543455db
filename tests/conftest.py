import sys
from pathlib import Path

import pytest
import torch

# the tests import the project's top-level modules (uoe, train, ...) from the repo root
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


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
