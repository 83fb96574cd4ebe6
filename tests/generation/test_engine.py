"""NanoChatEngine: nanochat's batched, tool-aware generation (spec §3.2) on a NanoChat model."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from transformers import TextIteratorStreamer

from modeling_nanochat.generation_nanochat import NanoChatEngine, SpecialTokens, sample_next_token

BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END, PY_START, PY_END, OUT_START, OUT_END = range(256, 265)


@pytest.fixture
def chat_model(make_model, byte_tokenizer):
    return make_model(vocab_size=len(byte_tokenizer), window_pattern="SSL")


def naive_greedy(model, prompt, steps):
    """spec §1.10's GPT.generate at temperature 0: full forward every step, no cache."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(ids, use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


class ScriptedModel(torch.nn.Module):
    """Runs the real model (so the cache is exercised) but makes row r emit scripts[r][step] at temperature 0.

    Step 0 is the prefill, computed once before the rows are cloned: every script starts with the same token.
    """

    def __init__(self, model, scripts):
        super().__init__()
        self.inner, self.scripts, self.step = model, scripts, 0
        self.config = model.config

    @property
    def device(self):
        return self.inner.device

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, **kwargs):
        logits = self.inner(input_ids=input_ids, **kwargs).logits[:, -1:]
        forced = torch.full_like(logits, -1e4)
        for r in range(forced.shape[0]):
            script = self.scripts[r]
            forced[r, -1, script[min(self.step, len(script) - 1)]] = 0.0
        self.step += 1
        return SimpleNamespace(logits=forced)


def text_ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_special_tokens_from_tokenizer(byte_tokenizer):
    special = SpecialTokens.from_tokenizer(byte_tokenizer)
    assert special == SpecialTokens(bos=BOS, assistant_end=ASSISTANT_END, python_start=PY_START, python_end=PY_END,
                                    output_start=OUT_START, output_end=OUT_END)
    assert special.stop_ids == {BOS, ASSISTANT_END} and special.has_tool


def test_special_tokens_from_the_project_tokenizer():
    tokenization = pytest.importorskip("modeling_nanochat.tokenization_nanochat")
    if not hasattr(tokenization, "tokenizer_from_ranks"):
        pytest.skip("project tokenizer API not available")
    tokenizer = tokenization.tokenizer_from_ranks({bytes([i]): i for i in range(256)})
    assert SpecialTokens.from_tokenizer(tokenizer) == SpecialTokens(
        bos=BOS, assistant_end=ASSISTANT_END, python_start=PY_START, python_end=PY_END, output_start=OUT_START,
        output_end=OUT_END)
    engine = NanoChatEngine(SimpleNamespace(config=SimpleNamespace(vocab_size=265)), tokenizer)
    assert engine._encode("36") == [ord("3"), ord("6")]  # no BOS added to tool output


def test_greedy_equals_naive_generate_and_clones_agree(chat_model, byte_tokenizer):
    engine = NanoChatEngine(chat_model, byte_tokenizer, special_tokens={"assistant_end": None, "bos": None})
    prompt = [BOS, *text_ids(byte_tokenizer, "Hello there")]
    columns = list(engine.generate(prompt, num_samples=3, max_tokens=70, temperature=0.0))
    assert len(columns) == 70  # past the short window (8) and the context (64)
    expected = naive_greedy(chat_model, prompt, 70)
    for row in range(3):
        assert [c[0][row] for c in columns] == expected
    assert all(m == [1, 1, 1] for _, m in columns)


def test_several_prompts_prefilled_together_equal_one_by_one(chat_model, byte_tokenizer):
    engine = NanoChatEngine(chat_model, byte_tokenizer, special_tokens={"assistant_end": None, "bos": None})
    prompts = [[BOS, *text_ids(byte_tokenizer, t)] for t in ("a longer first prompt", "hi", "third one")]
    together, masks = engine.generate_batch(prompts, num_samples=2, max_tokens=30, temperature=0.0)
    assert len(together) == 6
    for i, prompt in enumerate(prompts):
        alone, _ = engine.generate_batch(prompt, max_tokens=30, temperature=0.0)
        assert together[2 * i] == together[2 * i + 1] == alone[0]
        assert masks[2 * i] == [0] * len(prompt) + [1] * 30


def test_seeded_sampling_is_reproducible(chat_model, byte_tokenizer):
    engine = NanoChatEngine(chat_model, byte_tokenizer, special_tokens={"assistant_end": None, "bos": None})
    prompt = [BOS, *text_ids(byte_tokenizer, "Once")]
    kwargs = dict(num_samples=4, max_tokens=25, temperature=1.0, top_k=50, top_p=0.9)
    a, _ = engine.generate_batch(prompt, seed=7, **kwargs)
    b, _ = engine.generate_batch(prompt, seed=7, **kwargs)
    c, _ = engine.generate_batch(prompt, seed=8, **kwargs)
    assert a == b and a != c
    assert len({tuple(row) for row in a}) > 1  # rows sample independently from one shared generator


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, gen, temperature=0.0).tolist() == [1, 0]
    for _ in range(20):
        assert sample_next_token(logits, gen, temperature=1.0, top_k=1).tolist() == [1, 0]
        assert sample_next_token(logits, gen, temperature=5.0, top_p=1e-6).tolist() == [1, 0]
        assert int(sample_next_token(logits, gen, temperature=5.0, top_k=2)[0]) in {1, 3}
    drawn = {int(sample_next_token(logits[:1], gen, temperature=100.0, top_p=0.6)) for _ in range(200)}
    assert drawn <= {1, 3, 2} and {1, 3} <= drawn  # top-p: the smallest set reaching 0.6 of the mass


def test_rows_stop_on_assistant_end_and_bos(chat_model, byte_tokenizer):
    prompt = [BOS, ASSISTANT_START]
    a, b, c = ord("a"), ord("b"), ord("c")
    scripts = [[a, b, ASSISTANT_END, c], [a, BOS, c], [a, b]]
    engine = NanoChatEngine(ScriptedModel(chat_model, scripts), byte_tokenizer)
    columns = list(engine.generate(prompt, num_samples=3, max_tokens=6, temperature=0.0))
    assert [col[0][0] for col in columns] == [a, b, ASSISTANT_END, c, c, c]  # completed rows keep being fed
    engine.model.step = 0
    sequences, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=6, temperature=0.0)
    assert sequences == [prompt + [a, b], prompt + [a], prompt + [a] + [b] * 5]
    # generation ends as soon as every row completed
    engine.model.step = 0
    engine.model.scripts = [[a, ASSISTANT_END], [a, BOS]]
    assert len(list(engine.generate(prompt, num_samples=2, max_tokens=50, temperature=0.0))) == 2


def test_calculator_output_is_forced_into_its_row_only(chat_model, byte_tokenizer):
    call = [PY_START, *text_ids(byte_tokenizer, "1,200*3"), PY_END]
    # row 0 calls the tool; after python_end its script is ignored while the output is forced
    scripts = [call + [ord("?")] * 6 + [ord("!"), ASSISTANT_END], [PY_START] + [ord("z")] * 20 + [ASSISTANT_END],
               [PY_START, *text_ids(byte_tokenizer, "2**99"), PY_END, ASSISTANT_END]]
    engine = NanoChatEngine(ScriptedModel(chat_model, scripts), byte_tokenizer)
    sequences, masks = engine.generate_batch([BOS], num_samples=3, max_tokens=40, temperature=0.0)
    result = text_ids(byte_tokenizer, "3600")
    forced = [OUT_START, *result, OUT_END]
    assert sequences[0] == [BOS, *call, *forced, ord("!")]
    assert masks[0] == [0] + [1] * len(call) + [0] * len(forced) + [1]
    assert sequences[1] == [BOS, PY_START] + [ord("z")] * 20 and masks[1] == [0] + [1] * 21  # unclosed call
    # an expression the calculator refuses forces nothing
    assert sequences[2] == [BOS, *scripts[2][:-1]] and 0 not in masks[2][1:]


def test_stream_text_never_splits_a_character(chat_model, byte_tokenizer):
    word = "héllo wörld"
    scripts = [[*text_ids(byte_tokenizer, word), ASSISTANT_END]]
    engine = NanoChatEngine(ScriptedModel(chat_model, scripts), byte_tokenizer)
    deltas = list(engine.stream_text([BOS], max_tokens=50, temperature=0.0))
    assert "".join(deltas) == word
    assert all("\ufffd" not in d for d in deltas) and len(deltas) == len(word)


def test_text_iterator_streamer_from_a_thread(chat_model, byte_tokenizer):
    word = "streamed ✓ text"
    engine = NanoChatEngine(ScriptedModel(chat_model, [[*text_ids(byte_tokenizer, word), ASSISTANT_END]]),
                            byte_tokenizer)
    streamer = TextIteratorStreamer(byte_tokenizer, skip_prompt=True, timeout=30)
    prompt = [BOS, *text_ids(byte_tokenizer, "prompt")]
    thread = threading.Thread(target=engine.generate_batch, args=(prompt,),
                              kwargs=dict(max_tokens=50, temperature=0.0, streamer=streamer))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == word


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=[]), "non-empty"),
    (dict(tokens=[[BOS], []]), "empty"),
    (dict(tokens=[BOS, 999]), r"\[0, 265\)"),
    (dict(tokens=[BOS, 1.5]), "ints"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=266), "top_k"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(num_samples=0), "num_samples"),
    (dict(tokens=[BOS] * 64), "context"),
    (dict(num_samples=2, streamer=object()), "single row"),
])
def test_bad_inputs_give_clear_errors(chat_model, byte_tokenizer, kwargs, match):
    engine = NanoChatEngine(chat_model, byte_tokenizer)
    kwargs = {"tokens": [BOS, 65], **kwargs}
    with pytest.raises(ValueError, match=match):
        next(iter(engine.generate(**kwargs)))


def test_engine_without_tokenizer_uses_explicit_ids(chat_model):
    engine = NanoChatEngine(chat_model, special_tokens=SpecialTokens(bos=BOS, assistant_end=ASSISTANT_END))
    assert not engine.use_tool
    sequences, _ = engine.generate_batch([BOS, 65, 66], max_tokens=5, temperature=0.0)
    assert len(sequences[0]) <= 8
    with pytest.raises(ValueError, match="unknown special token"):
        NanoChatEngine(chat_model, special_tokens={"eos": 3})
    with pytest.raises(ValueError, match="tokenizer"):
        next(engine.stream_text([BOS]))
