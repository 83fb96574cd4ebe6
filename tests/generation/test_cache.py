"""NanoChatCache: exact incremental decoding for every window pattern, padding, row operations, memory bound."""

from __future__ import annotations

import pytest
import torch

from modeling_nanochat import NanoChatCache, NanoChatConfig
from modeling_nanochat import modeling_nanochat as modeling

# fp32, incremental vs one full forward: |diff| <= 1e-5 * (1 + |logit|). The residue is fp32 summation order
# (different matmul/SDPA shapes), not the cache: it is the same before the rings wrap as after.
ATOL = RTOL = 1e-5


def full_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def run_pieces(model, ids, boundaries, cache):
    """Feed ids[:, a:b] for consecutive boundaries through one cache; concatenate the logits."""
    pieces = []
    with torch.no_grad():
        for a, b in zip(boundaries[:-1], boundaries[1:]):
            pieces.append(model(ids[:, a:b], cache=cache).logits)
    return torch.cat(pieces, 1)


# tiny_config: max_position_embeddings 64 (the "L" window), short window 8; 90 tokens go past both
@pytest.mark.parametrize("pattern", ["L", "SL", "SSL", "SSSL"])
@pytest.mark.parametrize("max_cache_len", [None, 90])
def test_incremental_decoding_matches_full_forward(make_model, pattern, max_cache_len):
    model = make_model(window_pattern=pattern)
    ids = torch.randint(2, 200, (2, 90))
    # prefill 5, a 20-token chunk (wraps the 9-slot rings), decode past the context (64), a chunk, decode
    boundaries = [0, 5, 25, *range(26, 71), 85, *range(86, 91)]
    cache = NanoChatCache(model.config, max_cache_len=max_cache_len)
    got = run_pieces(model, ids, boundaries, cache)
    torch.testing.assert_close(got, full_logits(model, ids), atol=ATOL, rtol=RTOL)
    assert cache.get_seq_length() == 90 and cache.seqlens.tolist() == [90, 90]
    for layer, window in zip(cache.layers, model.config.layer_windows):
        assert layer.capacity == min(window + 1, 90)  # window-bounded, whatever the context


@pytest.mark.parametrize("chunks", [[1, 1, 30, 1, 9, 40], [13, 13, 13, 13, 13, 13, 2], [80]])
def test_chunked_prefill_is_exact(make_model, chunks):
    model = make_model(window_pattern="SSSL")
    ids = torch.randint(2, 200, (1, sum(chunks)))
    boundaries = [0]
    for c in chunks:
        boundaries.append(boundaries[-1] + c)
    got = run_pieces(model, ids, boundaries, NanoChatCache(model.config))
    torch.testing.assert_close(got, full_logits(model, ids), atol=ATOL, rtol=RTOL)


def test_left_padded_batch_equals_rows_alone(make_model):
    # padding never enters the cache: each row holds exactly what it would hold alone
    model = make_model(window_pattern="SSL")
    lengths, width = [30, 12, 21], 30
    rows = [torch.randint(2, 200, (n + 40,)) for n in lengths]  # prompt + 40 continuation tokens
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        ids[r, width - n:] = row[:n]
        mask[r, width - n:] = 1
    cache = NanoChatCache(model.config)
    with torch.no_grad():
        # chunked prefill with padding (two chunks), then 40 decode steps past the short window
        first = model(ids[:, :17], attention_mask=mask[:, :17], cache=cache).logits
        second = model(ids[:, 17:], attention_mask=mask, cache=cache).logits
        steps = []
        for t in range(40):
            column = torch.stack([row[n + t] for row, n in zip(rows, lengths)])[:, None]
            steps.append(model(column, cache=cache).logits)
    batched = torch.cat([first, second], 1)
    decoded = torch.cat(steps, 1)
    assert cache.seqlens.tolist() == [n + 40 for n in lengths]
    for r, (row, n) in enumerate(zip(rows, lengths)):
        alone = full_logits(model, row[None])[0]
        torch.testing.assert_close(batched[r, width - n:], alone[:n], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(decoded[r], alone[n:], atol=ATOL, rtol=RTOL)


def test_clone_select_and_reorder_rows(make_model):
    model = make_model(window_pattern="SL")
    prompt = torch.randint(2, 200, (1, 15))
    tails = torch.randint(2, 200, (3, 20))
    cache = NanoChatCache(model.config)
    with torch.no_grad():
        model(prompt, cache=cache)
        cache.batch_repeat_interleave(3)  # prefill once, then clone (the engine's num_samples)
        assert cache.prev_embedding.shape[0] == 3 and cache.seqlens.tolist() == [15] * 3
        out = [model(tails[:, t:t + 1], cache=cache).logits for t in range(10)]
        cache.batch_select_indices(torch.tensor([2, 0]))  # rows 2 and 0 survive, swapped
        out2 = [model(tails[[2, 0], t:t + 1], cache=cache).logits for t in range(10, 20)]
        cache.reorder_cache(torch.tensor([1, 1]))  # beam search: both rows continue old row 1 (= tail 0)
        last = model(tails[[0, 0], 0:1], cache=cache).logits
    decoded, decoded2 = torch.cat(out, 1), torch.cat(out2, 1)
    for r in range(3):
        alone = full_logits(model, torch.cat([prompt[0], tails[r]])[None])[0]
        torch.testing.assert_close(decoded[r], alone[15:25], atol=ATOL, rtol=RTOL)
    for i, r in enumerate([2, 0]):
        alone = full_logits(model, torch.cat([prompt[0], tails[r]])[None])[0]
        torch.testing.assert_close(decoded2[i], alone[25:35], atol=ATOL, rtol=RTOL)
    expected = full_logits(model, torch.cat([prompt[0], tails[0], tails[0, :1]])[None])[0, -1]
    torch.testing.assert_close(last[:, -1], expected.expand(2, -1), atol=ATOL, rtol=RTOL)


def test_memory_is_bounded_by_the_windows():
    # SSSL at long context: per four layers (3 * (w + 1) + context) / (4 * context) of a full cache
    config = NanoChatConfig(vocab_size=256, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=512, window_pattern="SSSL")
    w, context, batch = config.layer_windows[0], 512, 2
    assert w == 128 and config.layer_windows == [128, 128, 128, 512] * 2
    from modeling_nanochat import NanoChatForCausalLM

    torch.manual_seed(0)
    model = NanoChatForCausalLM(config).eval()
    ids = torch.randint(0, 256, (batch, context))
    per_token = batch * config.num_key_value_heads * config.head_dim * 2 * 4  # keys + values, fp32
    full = config.num_hidden_layers * context * per_token  # what a cache of every token would hold
    # pre-sized for the context; growing (no max length: the "L" layer may take its window + 1 = S + 1 slots)
    for cache, long_slots in ((NanoChatCache(config, max_cache_len=context), context), (NanoChatCache(config), 513)):
        with torch.no_grad():
            model(ids[:, :500], cache=cache)
            for t in range(500, context):
                model(ids[:, t:t + 1], cache=cache)
        bound = full * (3 * (w + 1) + long_slots) / (4 * context)
        assert cache.allocated_bytes() <= bound, (cache.allocated_bytes(), bound)
        assert cache.allocated_bytes() < 0.44 * full


def test_prompt_longer_than_the_cache_is_refused(make_model):
    model = make_model()
    cache = NanoChatCache(model.config, max_cache_len=16)
    with pytest.raises(ValueError, match="max_cache_len"):
        model(torch.randint(2, 200, (1, 20)), cache=cache)
    cache = NanoChatCache(model.config, max_cache_len=16)
    model(torch.randint(2, 200, (1, 16)), cache=cache)
    with pytest.raises(ValueError, match="max_cache_len"):
        model(torch.randint(2, 200, (1, 1)), cache=cache)


def test_bad_inputs_give_clear_errors(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.zeros(1, 0, dtype=torch.long), cache=NanoChatCache(model.config))
    cache = NanoChatCache(model.config)
    model(torch.randint(2, 200, (2, 5)), cache=cache)
    with pytest.raises(ValueError, match="rows"):
        model(torch.randint(2, 200, (3, 1)), cache=cache)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_cache_len"):
            NanoChatCache(model.config, max_cache_len=bad)


def test_reset_reuses_buffers(make_model):
    model = make_model()
    ids = torch.randint(2, 200, (1, 30))
    cache = NanoChatCache(model.config, max_cache_len=30, max_batch_size=1)
    before = [layer.keys.data_ptr() for layer in cache.layers]
    run_pieces(model, torch.randint(2, 200, (1, 30)), [0, 20, 30], cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.prev_embedding is None
    got = run_pieces(model, ids, [0, 7, *range(8, 31)], cache)
    torch.testing.assert_close(got, full_logits(model, ids), atol=ATOL, rtol=RTOL)
    assert [layer.keys.data_ptr() for layer in cache.layers] == before  # allocated once, written in place


def test_crop_where_exact(make_model):
    model = make_model(use_smear=False, window_pattern="L")
    ids = torch.randint(2, 200, (1, 30))
    cache = NanoChatCache(model.config)
    run_pieces(model, torch.cat([ids[:, :20], torch.randint(2, 200, (1, 5))], 1), [0, 25], cache)
    cache.crop(20)  # drop 5 speculative tokens
    got = run_pieces(model, ids, [20, 30], cache)
    torch.testing.assert_close(got, full_logits(model, ids)[:, 20:], atol=ATOL, rtol=RTOL)
    # a short-window layer already overwrote what a query at 10 would need
    short = make_model(use_smear=False, window_pattern="SL")
    cache = NanoChatCache(short.config)
    run_pieces(short, ids, [0, 30], cache)
    with pytest.raises(ValueError, match="overwrote"):
        cache.crop(10)
    # with the smear (every nanochat model) the state cannot be rolled back
    smear = make_model()
    cache = NanoChatCache(smear.config)
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="smear"):
        cache.crop(-1)


# ----------------------------------------------------------------------------- FA3 decode contract
def _fa_reference(q, k, v, softmax_scale, causal, window_size):
    """FlashAttention semantics in pure torch: (B, T, H, D), bottom-right causal alignment, GQA."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    v = v.repeat_interleave(H // v.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (softmax_scale or D**-0.5)
    qpos = torch.arange(Tq)[:, None] + (Tk - Tq)
    kpos = torch.arange(Tk)[None, :]
    allowed = kpos <= qpos if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    if window_size[0] >= 0:
        allowed &= kpos >= qpos - window_size[0]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


class FA3KVCacheStandIn:
    """FA3's `flash_attn_interface` in pure torch, including `flash_attn_with_kvcache`."""

    def __init__(self):
        self.kvcache_calls = []

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
        return _fa_reference(q, k, v, softmax_scale, causal, window_size)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qs, ks = slice(cu_seqlens_q[i], cu_seqlens_q[i + 1]), slice(cu_seqlens_k[i], cu_seqlens_k[i + 1])
            outs.append(_fa_reference(q[qs][None], k[ks][None], v[ks][None], softmax_scale, causal, window_size)[0])
        return torch.cat(outs)

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None,
                                causal=False, window_size=(-1, -1), **kwargs):
        assert k is None and v is None  # NanoChatCache writes the ring slot itself
        assert q.shape[1] == 1 and k_cache.shape[0] == q.shape[0] and k_cache.shape[2:] == v_cache.shape[2:]
        assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (q.shape[0],)
        self.kvcache_calls.append((tuple(q.shape), tuple(k_cache.shape), window_size, causal))
        rows = [_fa_reference(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], softmax_scale, causal, window_size)
                for b, n in enumerate(cache_seqlens.tolist())]
        return torch.cat(rows)


def test_fa3_decode_uses_flash_attn_with_kvcache(make_model, monkeypatch):
    standin = FA3KVCacheStandIn()
    monkeypatch.setattr(modeling, "load_flash_attn_3", lambda: standin)
    model, reference = make_model(window_pattern="SSL"), make_model(window_pattern="SSL")
    model.set_attn_implementation(modeling.FA3_IMPLEMENTATION)
    ids = torch.randint(2, 200, (2, 80))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding: rows hold different lengths (FA3's per-row cache_seqlens)
    cache, ref_cache = NanoChatCache(model.config, max_cache_len=80), NanoChatCache(model.config, max_cache_len=80)
    with torch.no_grad():
        got = [model(ids[:, :12], attention_mask=mask, cache=cache).logits[:, -1:]]
        ref = [reference(ids[:, :12], attention_mask=mask, cache=ref_cache).logits[:, -1:]]
        got.append(model(ids[:, 12:20], cache=cache).logits)  # a chunk through the varlen path
        ref.append(reference(ids[:, 12:20], cache=ref_cache).logits)
        for t in range(20, 80):  # past the short window (8) and the context (64): the rings wrap
            got.append(model(ids[:, t:t + 1], cache=cache).logits)
            ref.append(reference(ids[:, t:t + 1], cache=ref_cache).logits)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(ref, 1), atol=2e-5, rtol=0)
    assert len(standin.kvcache_calls) == 60 * 4
    shapes = {call[1] for call in standin.kvcache_calls}
    assert shapes == {(2, 9, 2, 16), (2, 65, 2, 16)}  # (B, capacity, Hkv, D): window + 1 slots
    assert {call[2] for call in standin.kvcache_calls} == {(8, 0), (64, 0)}
    assert all(call[3] for call in standin.kvcache_calls)
    # equal rows: a chunk after the prompt goes through the dense path (past keys gathered, no mask)
    cache, ref_cache = NanoChatCache(model.config), NanoChatCache(model.config)
    with torch.no_grad():
        model(ids[:, :10], cache=cache)
        reference(ids[:, :10], cache=ref_cache)
        torch.testing.assert_close(model(ids[:, 10:30], cache=cache).logits,
                                   reference(ids[:, 10:30], cache=ref_cache).logits, atol=2e-5, rtol=0)


@pytest.mark.gpu
def test_gpu_fa3_decode_matches_sdpa_in_bf16(make_model):
    if modeling.load_flash_attn_3() is None:
        pytest.skip("FlashAttention-3 is not installed on this GPU machine")
    model = make_model(hidden_size=256, num_attention_heads=2, num_key_value_heads=2).cuda().to(torch.bfloat16)
    ids = torch.randint(2, 200, (2, 80), device="cuda")
    results = {}
    for impl in ("sdpa", modeling.FA3_IMPLEMENTATION):
        model.set_attn_implementation(impl)
        cache = NanoChatCache(model.config, max_cache_len=80)
        with torch.no_grad():
            out = [model(ids[:, :20], cache=cache).logits[:, -1:]]
            out += [model(ids[:, t:t + 1], cache=cache).logits for t in range(20, 80)]
        results[impl] = torch.cat(out, 1)
    torch.testing.assert_close(results[modeling.FA3_IMPLEMENTATION], results["sdpa"], atol=0.1, rtol=0.02)
