"""Shared tiny fixtures: offline, CPU, seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_config(**overrides):
    """A 4-layer, 64-wide NanoChat with GQA, windows that bite at ~40 tokens, and every feature on."""
    from modeling_nanochat import NanoChatConfig

    kwargs = dict(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        short_window=8,
        window_pattern="SSL",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return NanoChatConfig(**kwargs)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter so that zero-initialized paths (o_proj, fc2, smear) matter in a test."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return model


@pytest.fixture
def make_model():
    """make_model(**config_overrides) -> a randomized tiny NanoChatForCausalLM in eval mode."""
    from modeling_nanochat import NanoChatForCausalLM

    def _make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = NanoChatForCausalLM(tiny_config(**overrides))
        return randomize(model, seed).eval()

    return _make
