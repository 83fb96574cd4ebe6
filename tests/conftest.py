"""Shared tiny fixtures: offline, CPU, seconds."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py and tests/reference_nanochat.py

from helpers import randomize, tiny_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_model():
    """make_model(**config_overrides) -> a randomized tiny NanoChatForCausalLM in eval mode."""
    from modeling_nanochat import NanoChatForCausalLM

    def _make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = NanoChatForCausalLM(tiny_config(**overrides))
        return randomize(model, seed).eval()

    return _make
