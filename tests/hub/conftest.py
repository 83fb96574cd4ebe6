"""Hub/convert fixtures: one tiny tokenizer per session (< 1 s)."""

from __future__ import annotations

import pytest
from hub_testdata import train_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tiny_tokenizer()
