"""NanoChatForCausalLM: fidelity to the original (spec §1), HF behaviour, backends, packing, padding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize, tiny_config
from reference_nanochat import GPT, GPTConfig
from transformers import AutoModel, AutoModelForCausalLM

from modeling_nanochat import NanoChatCache, NanoChatConfig, NanoChatForCausalLM, NanoChatModel
from modeling_nanochat import modeling_nanochat as modeling
from modeling_nanochat.convert_nanochat_checkpoint import hf_to_original_name, original_to_hf_name

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_reference(seq_len=512, vocab=200, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, pattern="SSL", seed=42):
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=pattern)
    with torch.device("meta"):
        ref = GPT(config)
    ref.to_empty(device="cpu")
    cos, sin = ref._precompute_rotary(ref.rotary_seq_len, n_embd // n_head)
    ref.cos.copy_(cos)
    ref.sin.copy_(sin)
    torch.manual_seed(seed)
    ref.init_weights()
    ours_config = NanoChatConfig(vocab_size=vocab, hidden_size=n_embd, num_hidden_layers=n_layer,
                                 num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                                 max_position_embeddings=seq_len, window_pattern=pattern)
    return ref, ours_config


def to_ours(ref_state: dict) -> dict:
    return {original_to_hf_name(k): v for k, v in ref_state.items()}


# ----------------------------------------------------------------------------- structure and init
def test_parameter_names_and_shapes_match_spec_table():
    config = NanoChatConfig.from_depth(4, head_dim=64, vocab_size=1000)  # C=256, H=4, padded V=1024
    C, V, kv = 256, 1024, 256
    with torch.device("meta"):
        model = NanoChatForCausalLM(config)
    got = {hf_to_original_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    expected = {"transformer.wte.weight": (V, C), "lm_head.weight": (V, C), "resid_lambdas": (4,),
                "x0_lambdas": (4,), "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,)}
    for i in range(4):
        expected |= {f"transformer.h.{i}.attn.c_q.weight": (C, C), f"transformer.h.{i}.attn.c_k.weight": (kv, C),
                     f"transformer.h.{i}.attn.c_v.weight": (kv, C), f"transformer.h.{i}.attn.c_proj.weight": (C, C),
                     f"transformer.h.{i}.mlp.c_fc.weight": (4 * C, C), f"transformer.h.{i}.mlp.c_proj.weight": (C, 4 * C)}
    for i in (1, 3):  # VE layers of an even-depth model: the odd ones
        expected |= {f"transformer.h.{i}.attn.ve_gate.weight": (4, 12), f"value_embeds.{i}.weight": (V, kv)}
    assert got == expected
    assert not any(b for b, _ in model.named_buffers())  # rotary is computed, not stored


def test_init_is_bitwise_nanochats_seeded_init():
    ref, config = build_reference()
    torch.manual_seed(42)
    ours = NanoChatForCausalLM(config)
    ours_state = ours.state_dict()
    for name, tensor in to_ours(ref.state_dict()).items():
        assert torch.equal(ours_state[name], tensor), name


def test_init_statistics():
    torch.manual_seed(0)
    config = NanoChatConfig.from_depth(4, head_dim=64, vocab_size=4096)
    model = NanoChatForCausalLM(config)
    C = config.hidden_size
    s = 3**0.5 / C**0.5
    m = model.model
    assert abs(m.embed_tokens.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 5e-5
    for layer in m.layers:
        assert abs(layer.self_attn.q_proj.weight.std().item() - 1 / C**0.5) < 0.01 / C**0.5 * 10
        assert layer.self_attn.q_proj.weight.abs().max().item() <= s
        assert layer.mlp.fc1.weight.abs().max().item() <= 0.4 * s
        assert layer.self_attn.o_proj.weight.count_nonzero() == 0
        assert layer.mlp.fc2.weight.count_nonzero() == 0
    assert torch.allclose(m.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(m.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert m.smear_lambda.item() == 0.0 and abs(m.backout_lambda.item() - 0.2) < 1e-7
    for w in (m.smear_gate.weight, m.layers[1].self_attn.ve_gate.weight):
        assert w.min().item() >= 0.0 and w.max().item() <= 0.02
    assert m.value_embeds["1"].weight.abs().max().item() <= s


def test_meta_construction_then_initialize():
    config = tiny_config()
    torch.manual_seed(42)
    eager_built = NanoChatForCausalLM(config)
    with torch.device("meta"):
        model = NanoChatForCausalLM(config)
    model.to_empty(device="cpu")
    torch.manual_seed(42)
    model.initialize_weights()
    for (n, a), (_, b) in zip(eager_built.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("pattern,n_layer", [("SSL", 4), ("L", 3), ("SSSL", 5)])
def test_logits_match_reference_implementation(pattern, n_layer):
    ref, config = build_reference(pattern=pattern, n_layer=n_layer)
    randomize(ref, seed=1)
    ours = NanoChatForCausalLM(config).eval()
    ours.load_state_dict(to_ours(ref.state_dict()))
    ids = torch.randint(0, 200, (2, 300), generator=torch.Generator().manual_seed(0))  # > short window 128
    with torch.no_grad():
        expected = ref(ids)
        got = ours(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -1
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, targets=targets).loss, ref(ids, targets), atol=1e-6, rtol=0)


def test_rms_norm_uses_fp32_eps_and_fp32_compute():
    x = torch.randn(4, 64, dtype=torch.bfloat16) * 1e-4
    got = modeling.rms_norm(x, NanoChatConfig().rms_norm_eps)
    xf = x.float()
    expected = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1.1920929e-07)).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0, rtol=0.01)


def test_rotary_sign_convention():
    # nanochat's rotation is by -theta: y1 = x1 cos + x2 sin
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0  # x1 = (1, 0), x2 = (0, 0)
    cos, sin = modeling.rotary_cos_sin(torch.tensor([[1]]), 4, 1e5, torch.float32)
    y = modeling.apply_rotary(x, cos, sin)
    assert torch.allclose(y[..., 0], cos[..., 0]) and torch.allclose(y[..., 2], -sin[..., 0])


def test_bf16_embeddings_give_bf16_activations_and_fp32_logits(make_model):
    model = make_model()
    model.model.embed_tokens.to(torch.bfloat16)
    for ve in model.model.value_embeds.values():
        ve.to(torch.bfloat16)
    ids = torch.randint(0, 200, (1, 20))
    out = model(ids, output_hidden_states=True)
    assert out.hidden_states[-1].dtype == torch.bfloat16
    assert out.logits.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # fp32 masters kept
    assert out.logits.abs().max() <= 15.0


# ----------------------------------------------------------------------------- backends and masks
def test_eager_equals_sdpa(make_model):
    model = make_model()
    ids = torch.randint(0, 200, (2, 40))
    with torch.no_grad():
        sdpa = model(ids).logits
        model.set_attn_implementation("eager")
        eager = model(ids).logits
    torch.testing.assert_close(eager, sdpa, atol=2e-5, rtol=0)


def _single_layer_hidden(model, ids, layer):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[layer + 1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_window_truly_limits_attention(make_model, attn):
    # layer 0 is an S layer with window 8: query p sees p-8..p. Smear off so nothing else leaks.
    model = make_model(use_smear=False)
    model.set_attn_implementation(attn)
    window = model.config.layer_windows[0]
    assert window == 8
    ids = torch.randint(2, 200, (1, 40))
    p = 30
    base = _single_layer_hidden(model, ids, 0)[0, p]
    outside, inside = ids.clone(), ids.clone()
    outside[0, p - window - 1] = (ids[0, p - window - 1] + 1) % 200
    inside[0, p - window] = (ids[0, p - window] + 1) % 200
    torch.testing.assert_close(_single_layer_hidden(model, outside, 0)[0, p], base, atol=0, rtol=0)
    assert (_single_layer_hidden(model, inside, 0)[0, p] - base).abs().max() > 1e-4
    # the last layer is long (window 64): position p - 40 would be outside, p - 30 is inside
    long_w = model.config.layer_windows[-1]
    assert long_w == 64


def test_long_layers_slide_beyond_the_training_context(make_model):
    # nanochat's "L" window is the finite S: a query past S stops seeing the first tokens
    model = make_model(use_smear=False, num_hidden_layers=1, max_position_embeddings=16)
    ids = torch.randint(2, 200, (1, 40))
    p = 35
    base = _single_layer_hidden(model, ids, 0)[0, p]
    changed = ids.clone()
    changed[0, p - 17] += 1
    torch.testing.assert_close(_single_layer_hidden(model, changed, 0)[0, p], base, atol=0, rtol=0)
    changed = ids.clone()
    changed[0, p - 16] += 1
    assert (_single_layer_hidden(model, changed, 0)[0, p] - base).abs().max() > 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_equal_separate_documents(make_model, attn):
    model = make_model()
    model.set_attn_implementation(attn)
    docs = [torch.randint(2, 200, (1, n)) for n in (13, 27, 9)]
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        out = model(packed, position_ids=positions).logits
        start = 0
        for d in docs:
            alone = model(d).logits
            torch.testing.assert_close(out[:, start:start + d.shape[1]], alone, atol=2e-5, rtol=0)
            start += d.shape[1]


def test_packed_documents_with_trl_kwargs(make_model):
    # TRL's padding-free collator adds cu_seq_lens_*, max_length_*, seq_idx and use_cache=False
    model = make_model()
    docs = [torch.randint(2, 200, (1, n)) for n in (10, 20)]
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(10), torch.arange(20)]).unsqueeze(0)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=20,
                    max_length_k=20, use_cache=False).logits
        torch.testing.assert_close(out[:, 10:], model(docs[1]).logits, atol=2e-5, rtol=0)


def test_left_padded_rows_equal_unpadded(make_model):
    model = make_model()
    rows = [torch.randint(2, 200, (n,)) for n in (30, 22)]
    width = 30
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        for r, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(out[r, width - len(row):], alone, atol=2e-5, rtol=0)


def test_incremental_decoding_matches_full_forward(make_model):
    model = make_model()
    ids = torch.randint(2, 200, (2, 50))  # longer than the short window (8) and the context (64)? no: < 64
    with torch.no_grad():
        full = model(ids).logits
        cache = NanoChatCache(model.config)
        pieces = [model(ids[:, :12], cache=cache).logits]
        pieces.append(model(ids[:, 12:20], cache=cache).logits)  # chunked prefill
        for t in range(20, 50):
            pieces.append(model(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=0)


def test_generate_greedy_equals_naive_loop(make_model):
    model = make_model()
    prompt = torch.randint(2, 200, (2, 6))
    out = model.generate(prompt, max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(15):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_plain_dynamic_cache_is_refused(make_model):
    from transformers import DynamicCache

    model = make_model()
    ids = torch.randint(2, 200, (1, 5))
    with pytest.raises(TypeError, match="NanoChatCache"):
        model(ids, cache=DynamicCache())
    with pytest.raises(TypeError, match="NanoChatCache"):
        model.generate(ids, cache=DynamicCache(), max_new_tokens=2)


def test_inputs_embeds_alone_is_refused(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 4, 64))


# ----------------------------------------------------------------------------- losses and training
def test_hf_labels_loss_equals_preshifted_targets_loss(make_model):
    model = make_model()
    ids = torch.randint(2, 200, (2, 30))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored prompt part
    targets = torch.full_like(ids, -1)
    targets[:, :-1] = labels[:, 1:]
    targets[targets == -100] = -1
    with torch.no_grad():
        hf = model(ids, labels=labels).loss
        ours = model(ids, targets=targets).loss
        per_position = model(ids, targets=targets, loss_reduction="none").loss
    torch.testing.assert_close(hf, ours, atol=1e-6, rtol=0)
    assert per_position.shape == (2 * 30,)
    torch.testing.assert_close(per_position[targets.view(-1) >= 0].mean(), ours, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="either labels"):
        model(ids, labels=labels, targets=targets)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_grads(make_model, reentrant):
    model = make_model().train()
    ids = torch.randint(2, 200, (2, 24))

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    model.activation_checkpointing_disable()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert plain["model.value_embeds.1.weight"].abs().sum() > 0  # value embeddings do get gradients


# ----------------------------------------------------------------------------- accounting
SPEC_NUMBERS = {  # depth: (total params, scaling params, FLOPs/token)   spec §6.13
    12: (286_261_730, 110_100_912, 7.597e8),
    20: (896_533_746, 435_160_240, 2.886e9),
    24: (1_384_122_122, 729_810_624, 4.775e9),
    26: (1_681_786_938, 918_423_532, 5.991e9),
}


@pytest.mark.parametrize("depth", sorted(SPEC_NUMBERS))
def test_param_and_flop_counts_match_spec(depth):
    total, scaling, flops = SPEC_NUMBERS[depth]
    got_flops, counts = modeling.count_flops_and_params(NanoChatConfig.from_depth(depth))
    assert counts["total"] == total
    assert counts["transformer_matrices"] + counts["lm_head"] == scaling
    assert counts["scalars"] == 2 * depth + 26
    assert abs(got_flops - flops) / flops < 5e-4


def test_d24_breakdown():
    _, counts = modeling.count_flops_and_params(NanoChatConfig.from_depth(24))
    assert counts == {"wte": 50_331_648, "value_embeds": 603_979_776, "lm_head": 50_331_648,
                      "transformer_matrices": 679_478_976, "scalars": 74, "total": 1_384_122_122}


# ----------------------------------------------------------------------------- save / load
def test_safetensors_round_trip_is_bitwise(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "nanochat_hf"
    assert config_json["auto_map"]["AutoModelForCausalLM"].endswith("NanoChatForCausalLM")
    for name in ("modeling_nanochat.py", "configuration_nanochat.py", "cache_nanochat.py"):
        assert (tmp_path / name).exists(), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, NanoChatForCausalLM)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    ids = torch.randint(2, 200, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert isinstance(backbone, NanoChatModel)


FRESH_PROCESS = r"""
import sys
sys.modules["modeling_nanochat"] = None  # our package must not be importable here
import torch
from transformers import AutoModelForCausalLM
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.arange(2, 22).view(1, 20)
with torch.no_grad():
    logits = model(ids).logits
gen = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False, num_beams=2, eos_token_id=None, pad_token_id=0)
torch.save({"logits": logits, "gen": gen, "cache": type(model.model).__module__}, out)
"""


def test_fresh_process_trust_remote_code_load(make_model, tmp_path):
    model = make_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "out.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    ids = torch.arange(2, 22).view(1, 20)
    with torch.no_grad():
        assert torch.equal(got["logits"], model(ids).logits)
    expected = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False, num_beams=2, eos_token_id=None,
                              pad_token_id=0)
    assert torch.equal(got["gen"], expected)

    # and without trust_remote_code it is refused clearly
    refuse = FRESH_PROCESS.replace(", trust_remote_code=True", "")
    result = subprocess.run([sys.executable, "-c", refuse, str(folder), str(tmp_path / "x.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0 and "trust_remote_code" in result.stderr


# ----------------------------------------------------------------------------- FA3 contract
def _fa_reference(q, k, v, softmax_scale, causal, window_size):
    """FlashAttention semantics in pure torch: (B, T, H, D), bottom-right causal alignment, GQA."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    v = v.repeat_interleave(H // v.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (softmax_scale or D**-0.5)
    qpos = torch.arange(Tq)[:, None] + (Tk - Tq)
    kpos = torch.arange(Tk)[None, :]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        allowed &= kpos <= qpos
    left, right = window_size
    if left >= 0:
        allowed &= kpos >= qpos - left
    if right >= 0:
        allowed &= kpos <= qpos + right
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


class FA3StandIn:
    """A pure-torch stand-in with FA3's `flash_attn_interface` signatures; records every call."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
        assert q.dim() == 4 and q.shape[1] != q.shape[2] or q.shape[1] == q.shape[2]
        self.calls.append(("dense", q.shape, k.shape, window_size, causal))
        return _fa_reference(q, k, v, softmax_scale, causal, window_size)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
        assert q.dim() == 3 and cu_seqlens_q.dtype == torch.int32
        self.calls.append(("varlen", q.shape, k.shape, window_size, causal))
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]][None]
            ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]][None]
            vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]][None]
            assert qs.shape[1] <= max_seqlen_q and ks.shape[1] <= max_seqlen_k
            outs.append(_fa_reference(qs, ks, vs, softmax_scale, causal, window_size)[0])
        return torch.cat(outs)


@pytest.fixture
def fa3_model(make_model, monkeypatch):
    standin = FA3StandIn()
    monkeypatch.setattr(modeling, "load_flash_attn_3", lambda: standin)
    model = make_model()
    reference = make_model()
    model.set_attn_implementation(modeling.FA3_IMPLEMENTATION)
    assert model.config._attn_implementation == "nanochat_fa3"
    return model, reference, standin


def test_fa3_contract_dense(fa3_model):
    model, reference, standin = fa3_model
    ids = torch.randint(2, 200, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=2e-5, rtol=0)
    windows = {call[3] for call in standin.calls}
    assert windows == {(8, 0), (64, 0)}  # nanochat's (left, 0), not transformers' W
    assert all(call[0] == "dense" and call[4] is True for call in standin.calls)
    assert standin.calls[0][1] == (2, 40, 4, 16) and standin.calls[0][2] == (2, 40, 2, 16)  # (B, T, H, D), GQA


def test_fa3_contract_packed_padded_and_decode(fa3_model):
    model, reference, standin = fa3_model
    docs = [torch.randint(2, 200, (1, n)) for n in (11, 19)]
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(11), torch.arange(19)]).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(packed, position_ids=positions).logits,
                                   reference(packed, position_ids=positions).logits, atol=2e-5, rtol=0)
        assert standin.calls[-1][0] == "varlen"
        ids = torch.randint(2, 200, (2, 25))
        mask = torch.ones_like(ids)
        mask[1, :7] = 0
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()],
                                   reference(ids, attention_mask=mask).logits[mask.bool()], atol=2e-5, rtol=0)
        cache, ref_cache = NanoChatCache(model.config), NanoChatCache(model.config)
        model(ids[:, :20], cache=cache)
        reference(ids[:, :20], cache=ref_cache)
        for t in range(20, 25):
            torch.testing.assert_close(model(ids[:, t:t + 1], cache=cache).logits,
                                       reference(ids[:, t:t + 1], cache=ref_cache).logits, atol=2e-5, rtol=0)


def test_fa3_missing_gives_clear_error(make_model, monkeypatch):
    monkeypatch.setattr(modeling, "load_flash_attn_3", lambda: None)
    model = make_model()
    model.set_attn_implementation(modeling.FA3_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="FlashAttention-3"):
        model(torch.randint(2, 200, (1, 5)))


def test_default_attention_is_sdpa_on_cpu(make_model):
    assert make_model().config._attn_implementation == "sdpa"


@pytest.mark.gpu
def test_gpu_fa3_matches_sdpa_in_bf16():
    if modeling.load_flash_attn_3() is None:
        pytest.skip("FlashAttention-3 is not installed on this GPU machine")
    torch.manual_seed(0)
    config = tiny_config(hidden_size=256, num_attention_heads=2, num_key_value_heads=2)
    model = randomize(NanoChatForCausalLM(config)).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(2, 200, (2, 60), device="cuda")
    with torch.no_grad():
        sdpa = model(ids).logits
        model.set_attn_implementation(modeling.FA3_IMPLEMENTATION)
        fa3 = model(ids).logits
    torch.testing.assert_close(fa3, sdpa, atol=0.1, rtol=0.02)


@pytest.mark.gpu
def test_gpu_default_attention_prefers_flash():
    torch.manual_seed(0)
    model = NanoChatForCausalLM.from_pretrained  # noqa: F841  (class-level check below)
    config = tiny_config()
    config.dtype = torch.bfloat16
    chosen = NanoChatForCausalLM(config).config._attn_implementation
    expected = "nanochat_fa3" if modeling.load_flash_attn_3() is not None else None
    if expected:
        assert chosen == expected
    else:
        assert chosen in ("flash_attention_2", "sdpa")
