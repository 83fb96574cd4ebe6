"""NanoChatConfig: the depth dial, windows, aliases, switches and validation (spec §1.1, §1.2, §1.5.2)."""

import pytest
from transformers import AutoConfig

from modeling_nanochat import NanoChatConfig


@pytest.mark.parametrize(
    "depth,head_dim,width,heads",
    [(12, 128, 768, 6), (20, 128, 1280, 10), (24, 128, 1536, 12), (26, 128, 1664, 13), (32, 128, 2048, 16),
     (6, 64, 384, 6)],
)
def test_from_depth_matches_spec_examples(depth, head_dim, width, heads):
    config = NanoChatConfig.from_depth(depth, head_dim=head_dim)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (width, heads, heads)
    assert config.head_dim == head_dim
    assert config.intermediate_size == 4 * width
    assert config.num_hidden_layers == depth


def test_from_depth_rounds_width_up_to_head_dim():
    config = NanoChatConfig.from_depth(5, aspect_ratio=50, head_dim=64)  # 250 -> 256
    assert config.hidden_size == 256 and config.num_attention_heads == 4


def test_windows_d24_sssl():
    config = NanoChatConfig.from_depth(24)
    long_layers = [i for i, w in enumerate(config.layer_windows) if w == 2048]
    assert long_layers == [3, 7, 11, 15, 19, 23]
    assert set(config.layer_windows) == {512, 2048}
    assert config.window_sizes[0] == (512, 0)


def test_windows_d26_forces_last_layer_long():
    config = NanoChatConfig.from_depth(26)
    long_layers = [i for i, w in enumerate(config.layer_windows) if w == 2048]
    assert long_layers == [3, 7, 11, 15, 19, 23, 25]


@pytest.mark.parametrize("seq_len,short", [(2048, 512), (512, 128), (1000, 256), (64, 128)])
def test_short_window_rule(seq_len, short):
    config = NanoChatConfig(num_hidden_layers=2, max_position_embeddings=seq_len, window_pattern="S")
    assert config.layer_windows == [short, seq_len]


def test_layer_types_and_hf_sliding_window_convention():
    config = NanoChatConfig.from_depth(4, head_dim=64, max_seq_len=2048, window_pattern="SL")
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert config.sliding_window == 513  # transformers counts the query: nanochat (512, 0) == HF 513


def test_value_embedding_layers_alternate_and_include_last():
    assert NanoChatConfig(num_hidden_layers=4).value_embed_layers == [1, 3]
    assert NanoChatConfig(num_hidden_layers=5).value_embed_layers == [0, 2, 4]
    assert NanoChatConfig(num_hidden_layers=4, use_value_embeds=False).value_embed_layers == []


def test_padded_vocab():
    assert NanoChatConfig(vocab_size=32768).padded_vocab_size == 32768
    assert NanoChatConfig(vocab_size=50257).padded_vocab_size == 50304
    assert NanoChatConfig(vocab_size=50257, pad_vocab_size_to=1).padded_vocab_size == 50257


def test_nanochat_aliases():
    config = NanoChatConfig(n_embd=128, n_layer=3, n_head=2, n_kv_head=1, sequence_len=256)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 3, 2)
    assert (config.num_key_value_heads, config.max_position_embeddings) == (1, 256)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_kv_head, config.sequence_len) == (128, 3, 2, 1, 256)


def test_save_load_round_trip(tmp_path):
    config = NanoChatConfig.from_depth(4, head_dim=64, window_pattern="SL", use_smear=False, qk_scale=1.0,
                                       rope_theta=10000.0, final_logit_softcapping=None)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, NanoChatConfig)
    drop = {"_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in drop} == {
        k: v for k, v in config.to_dict().items() if k not in drop
    }
    assert loaded.layer_windows == config.layer_windows
    assert loaded.model_type == "nanochat_hf"


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(window_pattern="SXL"), "window_pattern"),
        (dict(window_pattern=""), "window_pattern"),
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads (4) must divide"),
        (dict(hidden_size=100, num_attention_heads=6), "hidden_size (100) must be divisible"),
        (dict(hidden_size=-8), "hidden_size must be a positive integer"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(num_hidden_layers=2.5), "num_hidden_layers"),
        (dict(final_logit_softcapping=0), "final_logit_softcapping"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(hidden_size=66, num_attention_heads=6), "head_dim must be even"),
        (dict(use_smear="yes"), "use_smear"),
        (dict(short_window=0), "short_window"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=None) as err:
        NanoChatConfig(**kwargs)
    assert fragment in str(err.value)
    assert "NanoChatConfig" in str(err.value)


def test_from_depth_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        NanoChatConfig.from_depth(0)
