"""Baselines shared by the benchmarks (a module, not a benchmark: `make bench` skips it)."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from modeling_nanochat import NanoChatConfig


def llama_like(config: NanoChatConfig) -> LlamaForCausalLM:
    """Same width, depth, heads, head dim and (padded) vocab; gated MLP at 8C/3 for equal matmul params."""
    C = config.hidden_size
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=config.padded_vocab_size, hidden_size=C, intermediate_size=8 * C // 3,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, attn_implementation="sdpa",
        tie_word_embeddings=False,
    ))
