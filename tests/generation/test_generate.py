"""`model.generate()` and pipelines with NanoChatCache: greedy, sampling, padding, beams, remote code."""

from __future__ import annotations

import torch
from transformers import pipeline

from modeling_nanochat import NanoChatCache


def naive_greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


def test_generate_builds_a_presized_nanochat_cache(make_model):
    model = make_model()
    prompt = torch.randint(2, 200, (3, 7))
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0,
                         return_dict_in_generate=True)
    cache = out.cache
    assert isinstance(cache, NanoChatCache)
    assert cache.max_cache_len == 11  # prompt + new tokens - 1 (the last token is never fed)
    assert [layer.capacity for layer in cache.layers] == [9, 9, 11, 11]
    assert cache.seqlens.tolist() == [11, 11, 11]


def test_greedy_generate_past_the_windows_equals_naive_loop(make_model):
    # 6 + 70 tokens: past the short window (8) and past max_position_embeddings (64), where "L" slides too
    model = make_model(window_pattern="SSSL")
    prompt = torch.randint(2, 200, (2, 6))
    out = model.generate(prompt, max_new_tokens=70, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, naive_greedy(model, prompt, 70))


def test_left_padded_batch_equals_one_by_one(make_model):
    model = make_model()
    prompts = [torch.randint(2, 200, (n,)) for n in (9, 4, 13)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    kwargs = dict(max_new_tokens=25, do_sample=False, eos_token_id=None, pad_token_id=0)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for r, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)
        assert torch.equal(batched[r, width:], alone[0, len(p):]), r


def test_seeded_sampling_is_reproducible_and_matches_no_cache(make_model):
    model = make_model()
    prompt = torch.randint(2, 200, (2, 5))
    kwargs = dict(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, eos_token_id=None,
                  pad_token_id=0, num_return_sequences=3)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        runs.append(model.generate(prompt, use_cache=use_cache, **kwargs))
    assert runs[0].shape == (6, 25)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    torch.manual_seed(124)
    assert not torch.equal(model.generate(prompt, **kwargs), runs[0])


def test_beam_search_matches_no_cache(make_model):
    # reorder_cache every step must move keys, values, lengths and the smear state together
    model = make_model(window_pattern="SSL")
    prompt = torch.randint(2, 200, (2, 6))
    kwargs = dict(max_new_tokens=20, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None,
                  pad_token_id=0, length_penalty=0.0)
    with_cache = model.generate(prompt, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (4, 26)
    assert torch.equal(with_cache, without)


def test_generate_continues_from_a_user_cache(make_model):
    model = make_model()
    prompt = torch.randint(2, 200, (1, 10))
    cache = NanoChatCache(model.config, max_cache_len=64)
    out = model.generate(prompt, cache=cache, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, naive_greedy(model, prompt, 8))
    assert cache.get_seq_length() == 17


def test_text_generation_pipeline_with_remote_code(make_model, byte_tokenizer, tmp_path):
    model = make_model(vocab_size=len(byte_tokenizer), bos_token_id=256, eos_token_id=260, pad_token_id=256)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True, device="cpu")
    out = generator("Hello", max_new_tokens=6, do_sample=False, return_full_text=False)
    ids = torch.tensor([byte_tokenizer.encode("Hello")])
    expected = naive_greedy(model, ids, 6)[0, ids.shape[1]:]
    stop = (expected == 260).nonzero()
    expected = expected[: int(stop[0]) if len(stop) else None]
    assert out[0]["generated_text"] == byte_tokenizer.decode(expected, skip_special_tokens=True)
