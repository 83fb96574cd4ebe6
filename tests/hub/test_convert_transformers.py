"""transformers' built-in NanoChat (model_type "nanochat") -> our model, logits equal to transformers' own."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize
from hub_testdata import VOCAB
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import NanoChatConfig as TransformersNanoChatConfig
from transformers import NanoChatForCausalLM as TransformersNanoChatForCausalLM

from app.cli import main as cli_main
from modeling_nanochat.convert_nanochat_checkpoint import (
    convert_transformers_nanochat,
    load_transformers_nanochat,
)

IDS = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(0))


def transformers_model(**overrides) -> TransformersNanoChatForCausalLM:
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, final_logit_softcapping=12.0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return randomize(TransformersNanoChatForCausalLM(TransformersNanoChatConfig(**kwargs)), scale=0.3).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_and_greedy_generation_equal_transformers(tmp_path, tokenizer, tied):
    theirs = transformers_model(tie_word_embeddings=tied)
    theirs.save_pretrained(tmp_path / "theirs")
    tokenizer.save_pretrained(tmp_path / "theirs")
    out = convert_transformers_nanochat(tmp_path / "theirs", tmp_path / "ours")
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    c = ours.config
    assert (c.model_type, c.qk_scale, c.rope_theta, c.rms_norm_eps, c.intermediate_size) == ("nanochat_hf", 1.0, 5000.0,
                                                                                             1e-5, 96)
    assert not (c.use_value_embeds or c.use_smear or c.use_backout or c.use_residual_lambdas)
    assert c.padded_vocab_size == VOCAB and c.final_logit_softcapping == 12.0
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=0)
    prompt = IDS[:1, :20]
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert ours.generate(prompt, **kwargs).tolist() == theirs.generate(prompt, **kwargs).tolist()
    assert len(AutoTokenizer.from_pretrained(out)) == VOCAB


def test_unsupported_configs_and_keys_are_named(tmp_path):
    theirs = transformers_model()
    theirs.save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, hidden_act="gelu")))
    with pytest.raises(ValueError, match=r"config.json: hidden_act='gelu' is not supported"):
        load_transformers_nanochat(tmp_path / "m")
    config_path.write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ValueError, match=r"model_type is 'llama', expected 'nanochat'"):
        load_transformers_nanochat(tmp_path / "m")
    config_path.write_text(json.dumps(config))
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"unknown keys: model.layers.0.self_attn.q_norm.weight"):
        load_transformers_nanochat(tmp_path / "m")


def test_cli(tmp_path, capsys):
    transformers_model().save_pretrained(tmp_path / "theirs")
    assert cli_main(["convert", "from-transformers", str(tmp_path / "theirs"), str(tmp_path / "ours")]) == 0
    assert "modeling_nanochat.py" in capsys.readouterr().out
    assert cli_main(["convert", "to-original", str(tmp_path / "theirs"), str(tmp_path / "o")]) == 1
    assert "convert it with `nanochat convert from-transformers` first" in capsys.readouterr().err
