"""Tokenizer fixtures: a small offline corpus and one tokenizer trained on it per session (< 1 s)."""

from __future__ import annotations

import glob
import sysconfig

import pytest
from tokenizer_testdata import MULTILINGUAL, VOCAB_SIZE, synthetic_texts

from modeling_nanochat.tokenization_nanochat import train_tokenizer


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """~1 MB of real text (the Python standard library's sources) plus synthetic multilingual sentences."""
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files[::4]]
    return texts + synthetic_texts(2000)


@pytest.fixture(scope="session")
def heldout() -> list[str]:
    """Text the tokenizer was not trained on."""
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files[1::8]]
    return texts + synthetic_texts(300, seed=1) + [MULTILINGUAL]


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus, VOCAB_SIZE)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path
