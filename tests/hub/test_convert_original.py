"""Original nanochat checkpoints (model_<step>.pt + meta_<step>.json + tokenizer.pkl) <-> our HF folder.

The checkpoints are genuine: the spec-literal re-implementation of the original GPT (tests/reference_nanochat.py)
is built, perturbed and saved the way nanochat saves it (bf16 embeddings, optional `_orig_mod.` prefix).
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from hub_testdata import (
    VOCAB,
    build_reference,
    corpus,
    model_config_of,
    neutralize_old_features,
    original_state_dict,
    reference_greedy,
    write_original_checkpoint,
    write_original_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.cli import main as cli_main
from modeling_nanochat.convert_nanochat_checkpoint import (
    HF_CONFIG_META_KEY,
    convert_original_checkpoint,
    find_original_checkpoint,
    load_original_checkpoint,
    read_hf_weights,
    save_original_checkpoint,
)
from modeling_nanochat.tokenization_nanochat import ASSISTANT_END, BOS, encode_texts, train_tokenizer

GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(0, VOCAB, (2, 200), generator=GEN)  # longer than the short window (128)


@pytest.fixture(scope="module")
def current(tmp_path_factory, tokenizer):
    """A current-architecture checkpoint in nanochat's base-dir layout, saved from a compiled model."""
    ref = build_reference()
    base = tmp_path_factory.mktemp("nanochat_base")
    ckpt = write_original_checkpoint(base / "base_checkpoints" / "d4",
                                     original_state_dict(ref, compile_prefix=True), model_config_of(ref))
    write_original_checkpoint(ckpt, original_state_dict(build_reference(seed=7)), model_config_of(ref), step=50)
    write_original_tokenizer(tokenizer, base / "tokenizer")
    out = convert_original_checkpoint(ckpt, tmp_path_factory.mktemp("converted") / "hf")  # tokenizer found in base
    return ref, ckpt, out


def test_logits_equal_the_original_fp32(current):
    ref, _, out = current
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.model_type == "nanochat_hf" and model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS), atol=1e-5, rtol=0)


def test_kv_cache_decode_equals_the_original_naive_loop(current):
    ref, _, out = current
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = IDS[:1, :150]  # 150 + 24 new tokens: decoding crosses the 128-token short window
    expected_tokens, expected_logits = reference_greedy(ref, prompt, 24)
    gen = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True)
    assert gen.sequences[0, 150:].tolist() == expected_tokens
    for got, want in zip(gen.logits, expected_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_folder_contents_switches_and_tokenizer(current, tokenizer):
    ref, ckpt, out = current
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "modeling_nanochat.py", "configuration_nanochat.py", "cache_nanochat.py", "nanochat_meta.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["window_pattern"] == "SSL" and config["max_position_embeddings"] == 512
    assert all(config[k] for k in ("use_value_embeds", "use_smear", "use_backout", "use_residual_lambdas"))
    assert json.loads((out / "nanochat_meta.json").read_text())["step"] == 123  # the largest step was picked
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == VOCAB and tok.chat_template
    assert config["bos_token_id"] == tok.convert_tokens_to_ids(BOS)
    gen = json.loads((out / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted([tok.convert_tokens_to_ids(ASSISTANT_END), tok.convert_tokens_to_ids(BOS)])
    assert encode_texts(tok, ["the model reads 12345"]) == encode_texts(tokenizer, ["the model reads 12345"])
    weights = read_hf_weights(out)
    assert all(t.dtype == torch.float32 for t in weights.values())
    original = original_state_dict(ref)  # bf16 embeddings upcast exactly
    assert torch.equal(weights["model.embed_tokens.weight"], original["transformer.wte.weight"].float())


@pytest.mark.parametrize("drop_window_pattern", [True, False])
def test_old_checkpoints_without_lambdas_smear_backout_value_embeds(tmp_path, drop_window_pattern):
    # the oldest layout: no window_pattern in the meta, and a vocabulary without padding rows
    pattern = "L" if drop_window_pattern else "SL"
    pad = 1 if drop_window_pattern else 64
    ref = neutralize_old_features(build_reference(n_layer=3, pattern=pattern, seed=3, pad_vocab_size_to=pad))
    state = original_state_dict(ref, bf16_embeddings=False, drop_old_features=True)
    assert not any(k.startswith("value_embeds") or "lambda" in k or "smear" in k for k in state)
    drop = ("window_pattern",) if drop_window_pattern else ()
    write_original_checkpoint(tmp_path / "ckpt", state, model_config_of(ref, drop=drop))
    model, meta = load_original_checkpoint(tmp_path / "ckpt")
    c = model.config
    assert (c.use_value_embeds, c.use_smear, c.use_backout, c.use_residual_lambdas) == (False, False, False, True)
    assert c.window_pattern == pattern and c.padded_vocab_size == (VOCAB if pad == 1 else 320)
    assert torch.equal(model.model.resid_lambdas, torch.ones(3)) and torch.equal(model.model.x0_lambdas, torch.zeros(3))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS), atol=1e-5, rtol=0)
    overridden, _ = load_original_checkpoint(tmp_path / "ckpt", overrides={"qk_scale": 1.0, "rope_theta": 10000.0})
    assert overridden.config.qk_scale == 1.0 and overridden.config.rope_theta == 10000.0


def test_ours_to_original_loads_into_the_reference_and_round_trips_bitwise(current, tmp_path, tokenizer):
    ref, ckpt, out = current
    # HF folder -> original: loads strictly into nanochat's GPT, same logits; embeddings back to bf16 = the input
    model_path, meta_path = save_original_checkpoint(out, tmp_path / "orig", embedding_dtype="bfloat16")
    assert model_path.name == "model_000123.pt"  # the step (and the rest of the meta) kept from the original
    back = torch.load(model_path, weights_only=True)
    source = {k.removeprefix("_orig_mod."): v for k, v in torch.load(ckpt / "model_000123.pt", weights_only=True).items()}
    assert back.keys() == source.keys()
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    fresh = build_reference(seed=99)
    fresh.load_state_dict({k: v.float() for k, v in back.items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(IDS), ref(IDS), atol=0, rtol=0)
    meta = json.loads(meta_path.read_text())
    assert meta["model_config"] == model_config_of(ref)
    assert meta["loop_state"]["min_val_bpb"] == 1.2 and meta["val_bpb"] == 1.234  # the original meta, kept
    with open(tmp_path / "orig" / "tokenizer" / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)  # the test's own file: a tiktoken Encoding, as nanochat reads it
    assert enc.n_vocab == VOCAB
    assert enc.encode_ordinary("the model reads 12345") == encode_texts(tokenizer, ["the model reads 12345"])[0]
    assert torch.load(tmp_path / "orig" / "tokenizer" / "token_bytes.pt", weights_only=True).shape == (VOCAB,)
    # original -> HF folder again: bitwise the same tensors (fp32)
    again = convert_original_checkpoint(tmp_path / "orig", tmp_path / "again")
    first, second = read_hf_weights(out), read_hf_weights(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_nonstandard_settings_refuse_or_round_trip_through_meta(tmp_path, make_model):
    model = make_model()  # tiny_config: short_window 8, a setting the original cannot express
    model.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match=r"cannot express these settings of .*short_window=8 \(original: 128\)"):
        save_original_checkpoint(tmp_path / "ours", tmp_path / "orig")
    _, meta_path = save_original_checkpoint(tmp_path / "ours", tmp_path / "orig", step=7, allow_nonstandard=True)
    assert json.loads(meta_path.read_text())[HF_CONFIG_META_KEY]["short_window"] == 8
    assert not (tmp_path / "orig" / "tokenizer").exists()  # the folder has no tokenizer
    out = convert_original_checkpoint(tmp_path / "orig", tmp_path / "back", tokenizer=False)
    before, after = read_hf_weights(tmp_path / "ours"), read_hf_weights(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.layer_windows == model.config.layer_windows
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS[:, :60] % 200).logits, model(IDS[:, :60] % 200).logits, atol=0, rtol=0)


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def small_ckpt(tmp_path):
    ref = build_reference(n_layer=2, pattern="L", seed=5)
    return ref, write_original_checkpoint(tmp_path / "ckpt", original_state_dict(ref), model_config_of(ref))


def test_missing_files_are_named(tmp_path, small_ckpt):
    _, ckpt = small_ckpt
    with pytest.raises(FileNotFoundError, match="no nanochat checkpoint in .*expected model_<step>.pt"):
        find_original_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no model_000007.pt in .*steps available: 123"):
        find_original_checkpoint(ckpt, step=7)
    with pytest.raises(FileNotFoundError, match="no tokenizer found for .*--no-tokenizer"):
        convert_original_checkpoint(ckpt, tmp_path / "out")
    (ckpt / "meta_000123.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta_000123.json is missing next to"):
        find_original_checkpoint(ckpt)


def test_unknown_missing_and_misshapen_keys_are_named(tmp_path, small_ckpt):
    ref, _ = small_ckpt
    state = original_state_dict(ref)
    state["transformer.h.0.attn.c_bogus.weight"] = torch.zeros(3)
    state["transformer.h.5.mlp.c_fc.weight"] = torch.zeros(3)  # a layer the config does not have
    del state["transformer.h.1.mlp.c_proj.weight"]
    state["lm_head.weight"] = state["lm_head.weight"][:, :32]
    write_original_checkpoint(tmp_path / "bad", state, model_config_of(ref))
    with pytest.raises(ValueError) as info:
        load_original_checkpoint(tmp_path / "bad")
    message = str(info.value)
    assert "unknown keys: transformer.h.0.attn.c_bogus.weight, transformer.h.5.mlp.c_fc.weight" in message
    assert "missing keys: transformer.h.1.mlp.c_proj.weight" in message
    assert "wrong shapes: lm_head.weight (320, 32) (expected (320, 64))" in message


def test_vocab_mismatches_are_named(tmp_path, small_ckpt, tokenizer):
    ref, ckpt = small_ckpt
    config = dict(model_config_of(ref), vocab_size=400)  # meta says 400, wte has 320 rows
    write_original_checkpoint(tmp_path / "meta_vocab", original_state_dict(ref), config)
    with pytest.raises(ValueError, match="wte.weight has 320 rows, but model_config.vocab_size 400 pads to 448"):
        load_original_checkpoint(tmp_path / "meta_vocab")
    other = write_original_tokenizer(train_tokenizer(corpus(), 280), tmp_path / "tok280")
    with pytest.raises(ValueError, match=r"vocab mismatch: the tokenizer .*tok280 has 280 tokens but the model .* 300"):
        convert_original_checkpoint(ckpt, tmp_path / "out", tokenizer=other)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoints_are_never_fully_unpickled(tmp_path, small_ckpt):
    ref, _ = small_ckpt
    write_original_checkpoint(tmp_path / "evil", {"transformer.wte.weight": _Evil()}, model_config_of(ref))
    with pytest.raises(ValueError, match=r"model_000123.pt cannot be read with torch.load\(weights_only=True\)"):
        load_original_checkpoint(tmp_path / "evil")


def test_cli_round_trip(tmp_path, small_ckpt, tokenizer, capsys):
    ref, ckpt = small_ckpt
    write_original_tokenizer(tokenizer, ckpt / "tokenizer")
    assert cli_main(["convert", "from-original", str(ckpt), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert all(t.dtype == torch.bfloat16 for t in read_hf_weights(tmp_path / "hf").values())
    assert cli_main(["convert", "from-original", str(ckpt), str(tmp_path / "hf")]) == 1
    assert "already holds a model" in capsys.readouterr().err
    assert cli_main(["convert", "to-original", str(tmp_path / "hf"), str(tmp_path / "orig"), "--step", "5"]) == 0
    assert (tmp_path / "orig" / "model_000005.pt").is_file() and (tmp_path / "orig" / "tokenizer" / "tokenizer.pkl").is_file()
    assert cli_main(["convert", "from-original", str(ckpt), str(tmp_path / "x"), "--set", "bogus=1"]) == 1
    assert "unknown config override(s) ['bogus']" in capsys.readouterr().err
