"""ContinuousBatch: rows join and leave a running decode batch between steps and get exactly what the engine
gives each prompt alone (greedy and seeded sampling), with the calculator, stop tokens and max_tokens per row."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from modeling_nanochat.generation_nanochat import BatchRequest, ContinuousBatch, NanoChatEngine

BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END, PY_START, PY_END, OUT_START, OUT_END = range(256, 265)


@pytest.fixture
def chat_model(make_model, byte_tokenizer):
    return make_model(vocab_size=len(byte_tokenizer), window_pattern="SSL")


def ids(text: str) -> list[int]:
    return [BOS, *text.encode()]


def run(batch: ContinuousBatch, arrivals: dict[int, list[tuple[str, BatchRequest]]], steps: int = 200):
    """Drive the batch; arrivals[step] join before that step. Returns key -> (tokens, forced flags, finish)."""
    out: dict = {}
    for step in range(steps):
        if arrivals.get(step):
            batch.add(arrivals[step])
            for key, _ in arrivals[step]:
                out[key] = ([], [], None)
        for o in batch.step():
            tokens, forced, _ = out[o.key]
            tokens.append(o.token)
            forced.append(o.forced)
            out[o.key] = (tokens, forced, o.finished)
        if not len(batch) and step > max(arrivals):
            break
    return out


def test_rows_joining_and_leaving_equal_the_engine_alone(chat_model, byte_tokenizer):
    engine = NanoChatEngine(chat_model, byte_tokenizer, special_tokens={"assistant_end": None, "bos": None})
    prompts = {"a": ids("Hello there"), "b": ids("hi"), "c": ids("a much longer prompt than the others"),
               "d": ids("x"), "s": ids("Once")}
    lengths = {"a": 40, "b": 12, "c": 25, "d": 30, "s": 20}  # past the short window (8); a: prompt+40 > 48
    requests = {k: BatchRequest(p, lengths[k], temperature=0.0) for k, p in prompts.items()}
    requests["s"] = BatchRequest(prompts["s"], 20, temperature=0.9, top_k=20, top_p=0.9, seed=5)
    expected = {
        k: engine.generate_batch(r.prompt, max_tokens=r.max_tokens, temperature=r.temperature, top_k=r.top_k,
                                 top_p=r.top_p, seed=r.seed)[0][0][len(r.prompt):]
        for k, r in requests.items()
    }
    batch = ContinuousBatch(engine, max_rows=3)
    got = run(batch, {0: [("a", requests["a"]), ("s", requests["s"])], 3: [("b", requests["b"])],
                      16: [("c", requests["c"])], 30: [("d", requests["d"])]})
    for key, (tokens, forced, finish) in got.items():
        assert tokens == expected[key], key
        assert finish == "length" and not any(forced)
    assert len(batch) == 0 and batch.cache is None


class NextTokenModel(torch.nn.Module):
    """The real model runs (so the cache is exercised) but the next token is a function of the last one."""

    def __init__(self, model, table: dict[int, int]):
        super().__init__()
        self.inner, self.table, self.config = model, table, model.config

    @property
    def device(self):
        return self.inner.device

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, **kwargs):
        self.inner(input_ids=input_ids, **kwargs)
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e4)
        for row, last in enumerate(input_ids[:, -1].tolist()):
            logits[row, 0, self.table.get(last, ord("."))] = 0.0
        return SimpleNamespace(logits=logits)


def test_calculator_stop_and_length_per_row(chat_model, byte_tokenizer):
    b = lambda c: ord(c)  # noqa: E731
    table = {b("Q"): PY_START, PY_START: b("6"), b("6"): b("*"), b("*"): b("7"), b("7"): PY_END, PY_END: b("?"),
             OUT_END: b(" "), b(" "): ASSISTANT_END, b("Z"): b("a"), b("a"): b("b"), b("b"): b("a")}
    engine = NanoChatEngine(NextTokenModel(chat_model, table), byte_tokenizer)
    batch = ContinuousBatch(engine, max_rows=4)
    got = run(batch, {0: [("loop", BatchRequest(ids("Z"), 15, temperature=0.0))],
                      2: [("calc", BatchRequest(ids("Q"), 30, temperature=0.0))]})
    tokens, forced, finish = got["calc"]
    assert tokens == [PY_START, b("6"), b("*"), b("7"), PY_END, OUT_START, b("4"), b("2"), OUT_END, b(" "),
                      ASSISTANT_END]
    assert forced == [False] * 5 + [True] * 4 + [False] * 2  # 6*7 = 42 forced by the calculator
    assert finish == "stop"
    tokens, forced, finish = got["loop"]
    assert tokens == [b("a"), b("b")] * 7 + [b("a")] and finish == "length"


def test_remove_and_bad_requests(chat_model, byte_tokenizer):
    engine = NanoChatEngine(chat_model, byte_tokenizer)
    batch = ContinuousBatch(engine, max_rows=2)
    batch.add([("a", BatchRequest(ids("one"), 10, 0.0)), ("b", BatchRequest(ids("two"), 10, 0.0))])
    batch.step()
    assert batch.keys == ["a", "b"] and batch.free == 0
    with pytest.raises(ValueError, match="only 0 of 2 are free"):
        batch.add([("c", BatchRequest(ids("x"), 5))])
    batch.remove(["a", "nobody"])
    assert batch.keys == ["b"] and batch.cache.batch_size == 1 and batch.logits.shape[0] == 1
    assert [o.key for o in batch.step()] == ["b"]
    with pytest.raises(ValueError, match="already in the batch"):
        batch.add([("b", BatchRequest(ids("x"), 5))])
    with pytest.raises(ValueError, match="max_cache_len"):
        batch.add([("c", BatchRequest(ids("x"), 64))])  # context 64
    with pytest.raises(ValueError, match="temperature"):
        batch.add([("c", BatchRequest(ids("x"), 5, temperature=-1.0))])
    with pytest.raises(ValueError, match="max_rows"):
        ContinuousBatch(engine, max_rows=0)
    batch.remove(["b"])
    assert len(batch) == 0 and batch.step() == []


def test_sample_then_forward_and_removal_in_between(chat_model, byte_tokenizer):
    """A server's order (sample, hand out, remove a stopped row, forward) gives the same tokens as step()."""
    engine = NanoChatEngine(chat_model, byte_tokenizer, special_tokens={"assistant_end": None, "bos": None})
    requests = [(k, BatchRequest(ids(k * 3), 12, temperature=0.0)) for k in ("p", "q", "r")]
    reference = ContinuousBatch(engine, max_rows=3)
    expected = run(reference, {0: requests})
    batch = ContinuousBatch(engine, max_rows=3)
    batch.add(requests)
    got = {k: [] for k, _ in requests}
    for step in range(12):
        for o in batch.sample():
            got[o.key].append(o.token)
        if step == 4:
            batch.remove(["q"])  # e.g. its stop sequence matched: the pending token of q is dropped too
        batch.forward()
    assert got["p"] == expected["p"][0] and got["r"] == expected["r"][0]
    assert got["q"] == expected["q"][0][:5] and len(batch) == 0
