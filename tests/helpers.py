"""Shared test helpers (a plain module: `conftest` names collide between test folders)."""

from __future__ import annotations

import torch


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
