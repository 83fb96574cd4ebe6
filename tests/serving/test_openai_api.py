"""The OpenAI dialect with the real `openai` SDK against a real server: chat (plain and streamed), completions,
models, tool calls in the stream, and nanochat's own request form on /chat/completions."""

from __future__ import annotations

import json

import httpx
import pytest
from serving_testdata import CALC_QUESTION, CALC_REPLY_TEXT, HELLO_QUESTION, HELLO_REPLY

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_greedy_with_tool_call_and_usage(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CALC_QUESTION}],
                                           temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == CALC_REPLY_TEXT  # the calculator ran: 42 was forced by the tool
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_shows_the_tool_call_and_ends_with_done(client, server):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CALC_QUESTION}],
                                            temperature=0, max_tokens=60, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CALC_REPLY_TEXT
    assert "<|output_start|>42<|output_end|>" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 10
    # the raw stream: SSE events, the last one `data: [DONE]`
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": HELLO_QUESTION}], "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]) == HELLO_REPLY


def test_history_with_tool_markers_is_rendered_as_tool_tokens(client):
    """A reply sent back in the history (literal tool markers) becomes python/output parts again, and the
    assistant continues the conversation."""
    messages = [{"role": "user", "content": CALC_QUESTION}, {"role": "assistant", "content": CALC_REPLY_TEXT},
                {"role": "user", "content": HELLO_QUESTION}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30)
    assert reply.usage.prompt_tokens > 30
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_n_seed_stop_and_max_completion_tokens(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Tell me something"}], temperature=1.0,
                  max_completion_tokens=12, n=3, seed=7, extra_body={"top_k": 50})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert a.usage.completion_tokens <= 36
    stopped = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": HELLO_QUESTION}],
                                             temperature=0, stop=["am"])
    assert stopped.choices[0].message.content == "Hello! I "
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": HELLO_QUESTION}],
                                           temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_completions_plain_streamed_and_echo(client):
    plain = client.completions.create(model="tiny", prompt="The answer is", max_tokens=8, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].finish_reason in ("length", "stop")
    streamed = client.completions.create(model="tiny", prompt="The answer is", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text
    echoed = client.completions.create(model="tiny", prompt=["The answer is", "Hello"], max_tokens=4, temperature=0,
                                       echo=True)
    assert [c.index for c in echoed.choices] == [0, 1]
    assert echoed.choices[0].text.startswith("The answer is") and echoed.choices[1].text.startswith("Hello")


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_nanochat_request_form_gets_nanochat_stream(server):
    """nanochat's own UI/scripts: POST /chat/completions without model/stream -> {"token", "gpu"} ... {"done"}."""
    with httpx.stream("POST", server.url + "/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": HELLO_QUESTION}], "temperature": 0.0, "top_k": 0,
        "max_tokens": 40}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == {"done": True}
    assert "".join(e["token"] for e in events[:-1]) == HELLO_REPLY
    assert all(e["gpu"] == 0 for e in events[:-1])
    # with `model`, the same path is the OpenAI route
    r = httpx.post(server.url + "/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": HELLO_QUESTION}], "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == HELLO_REPLY
