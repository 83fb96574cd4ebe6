"""Continuous batching under load: concurrent streams equal sequential runs, overload answers 429, a client
that disconnects frees its slot, requests go to the least busy replica; API key; /health /stats /metrics."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from serving_testdata import CALC_QUESTION, HELLO_QUESTION

from app.scheduler import IncrementalDecoder, QueueFull, SamplingParams, Scheduler, StopMatcher

openai = pytest.importorskip("openai")
PROMPTS = [f"Tell me story number {i}, please" for i in range(6)] + [CALC_QUESTION, HELLO_QUESTION]


def _stream_chat(url: str, prompt: str, max_tokens: int = 40) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=max_tokens, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_concurrent_streams_are_batched_and_equal_sequential_runs(server):
    sequential = [_stream_chat(server.url, p) for p in PROMPTS]
    before = server.scheduler.workers[0].snapshot()
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def client(i: int) -> None:
        barrier.wait()
        results[i] = _stream_chat(server.url, PROMPTS[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = server.scheduler.workers[0].snapshot()
    assert [results.get(i) for i in range(len(PROMPTS))] == sequential  # every client finished, same greedy text
    steps = after["steps"] - before["steps"]
    tokens = after["generated_tokens"] - before["generated_tokens"]
    assert tokens > 100 and steps < tokens / 2, (steps, tokens)  # several rows per decode step
    assert after["peak_batch"] >= 4


def _wait_idle(scheduler, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while scheduler.stats()["active_sequences"] or any(w.assigned for w in scheduler.workers):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"still busy after {timeout}s: {scheduler.stats()}")
        time.sleep(0.01)
    return time.monotonic() - start


LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 100}}


def test_overload_is_429_in_each_dialect(busy_server):
    text_generation = pytest.importorskip("text_generation")

    key = busy_server.api_key
    headers = {"Authorization": f"Bearer {key}"}
    client = openai.OpenAI(base_url=busy_server.url + "/v1", api_key=key, max_retries=0)
    tgi = text_generation.Client(busy_server.url, headers=headers)
    rejected = busy_server.scheduler.metrics.rejected
    with httpx.stream("POST", busy_server.url + "/generate_stream", json=LONG, headers=headers, timeout=60) as r:
        next(r.iter_lines())  # the only slot is generating
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 429 and "busy" in info.value.message
        with pytest.raises(text_generation.errors.OverloadedError):
            tgi.generate("hi", max_new_tokens=2)
    assert busy_server.scheduler.metrics.rejected == rejected + 2
    _wait_idle(busy_server.scheduler)


def test_client_disconnect_frees_the_slot(busy_server):
    headers = {"X-API-Key": busy_server.api_key}
    worker = busy_server.scheduler.workers[0]
    tokens_before = worker.stats.generated_tokens
    with httpx.stream("POST", busy_server.url + "/generate_stream", json=LONG, headers=headers, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break  # three tokens in: walk away
    assert _wait_idle(busy_server.scheduler) < 2.0
    assert worker.stats.generated_tokens - tokens_before < 15  # ~22 would come without the cancel
    # a non-streaming client that gives up (read timeout) is noticed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(busy_server.url + "/generate", json=LONG, headers=headers, timeout=0.3)
    assert _wait_idle(busy_server.scheduler) < 2.0
    # and the slot serves the next request at once
    r = httpx.post(busy_server.url + "/generate", headers=headers, timeout=60,
                   json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200


def test_api_key(busy_server):
    text_generation = pytest.importorskip("text_generation")

    client = openai.OpenAI(base_url=busy_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(text_generation.errors.UnknownError, match="API key"):
        text_generation.Client(busy_server.url).generate("hi", max_new_tokens=1)
    r = httpx.post(busy_server.url + "/generate", json={"inputs": "hi"})
    assert r.status_code == 401 and r.json()["error_type"] == "authentication"
    assert httpx.get(busy_server.url + "/stats").status_code == 401
    assert httpx.get(busy_server.url + "/health").status_code == 200  # liveness stays open
    ok = openai.OpenAI(base_url=busy_server.url + "/v1", api_key=busy_server.api_key, max_retries=0)
    assert ok.models.list().data[0].id == "tiny"


def test_health_stats_metrics(server):
    httpx.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=60)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["ready"] is True and health["available_workers"] == 1
    stats = httpx.get(server.url + "/stats").json()
    assert stats["total_workers"] == 1 and stats["max_batch"] == 8 and stats["max_queue"] == 16
    assert stats["workers"][0]["generated_tokens"] >= 3 and 0 <= stats["batch_occupancy"] <= 1
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
    tokens = families["nanochat_generated_tokens"].samples[0]  # counters drop their _total suffix
    assert tokens.labels == {"worker": "worker-0", "device": "cpu"} and tokens.value >= 3
    assert families["nanochat_time_to_first_token_seconds"].type == "histogram"
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["nanochat_requests"].samples}
    assert requests[("/generate", "200")] >= 1


def test_routing_to_the_least_busy_replica_and_bounded_queue(model_folder):
    scheduler = Scheduler.from_folder(model_folder, workers=2, max_batch=1, max_queue=1)
    for worker in scheduler.workers:
        worker.engine.model.register_forward_hook(lambda *args: time.sleep(0.01))
    scheduler.start()
    params = SamplingParams(max_tokens=60, temperature=0.0)
    prompt = scheduler.tokenizer("Once upon a time")["input_ids"]

    async def scenario():
        a = scheduler.submit(prompt, params)
        b = scheduler.submit(prompt, params)
        assert a.worker is not b.worker  # the second went to the idle replica
        c = scheduler.submit(prompt, params)  # waits (queue of 1)
        with pytest.raises(QueueFull):
            scheduler.submit(prompt, params)
        assert scheduler.stats()["queued_sequences"] == 1
        for g in (a, b):
            g.cancel()
        await c.result()
        assert c.finishes[0] in ("eos", "length") and c.completion_tokens[0] > 0
        await a.result()
        assert a.finishes == ["cancelled"]

    try:
        asyncio.run(scenario())
    finally:
        scheduler.stop()


def test_incremental_decoder_never_splits_characters(server):
    tokenizer = server.scheduler.tokenizer
    text = "café 日本語 🙂 λ"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens were partial characters


def test_stop_matcher_holds_back_possible_stops():
    m = StopMatcher(("###", "END"))
    assert m.push("abc#") == ("abc", False)
    assert m.push("#x") == ("##x", False)
    assert m.push("E") == ("", False)
    assert m.push("ND and more") == ("", True)
    m = StopMatcher(("###",))
    assert m.push("a##") == ("a", False) and m.flush() == "##"
