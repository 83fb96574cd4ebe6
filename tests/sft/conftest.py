"""Chat-training fixtures: one tokenizer trained on the demo tasks' text and a tiny random base folder."""

from __future__ import annotations

import pytest
from sft_testdata import VOCAB_SIZE, corpus, write_base

from modeling_nanochat.tokenization_nanochat import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(corpus(), VOCAB_SIZE)


@pytest.fixture(scope="session")
def base_dir(tokenizer, tmp_path_factory):
    """A randomized tiny NanoChat saved like a pretraining output (model, tokenizer, summary.json)."""
    return write_base(tmp_path_factory.mktemp("base"), tokenizer)
