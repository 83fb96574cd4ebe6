"""Limits and malformed input: nanochat's limits in nanochat's order, each refusal a 4xx in the API's own shape
naming the field (OpenAI `{"error": {"message", "param"}}` 400, TGI `{"error", "error_type"}` 422, nanochat's
form `{"detail"}` 400)."""

from __future__ import annotations

import httpx
import pytest

from app import limits
from app.limits import RequestError

USER = {"role": "user", "content": "hi"}


# --------------------------------------------------------------------------- limits, without a server
@pytest.mark.parametrize(
    ("messages", "kwargs", "param", "words"),
    [
        ([], {"temperature": 9}, "messages", "At least one message"),
        ([USER] * 501, {}, "messages", "Too many messages"),
        ([USER, {"role": "assistant", "content": ""}, {"role": "robot", "content": "x" * 9000}], {},
         "messages.1.content", "empty content"),
        ([{"role": "robot", "content": "x" * 8001}], {"temperature": 9}, "messages.0.content", "too long"),
        ([{"role": "user", "content": "x" * 8000}] * 5, {}, "messages", "32000"),
        ([{"role": "robot", "content": "x"}], {"temperature": 9}, "messages.0.role", "invalid role"),
        ([USER], {"temperature": 2.01, "top_k": 500}, "temperature", "between 0.0 and 2.0"),
        ([USER], {"top_k": 201, "max_tokens": 0}, "top_k", "between 0 and 200"),
        ([USER], {"max_tokens": 4097, "top_p": 0}, "max_tokens", "between 1 and 4096"),
        ([USER], {"top_p": 0.0}, "top_p", "(0, 1]"),
        ([USER], {"n": 9}, "n", "between 1 and 8"),
        ([USER], {"seed": -1}, "seed", "seed"),
        ([USER], {"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ([USER], {"temperature": float("nan")}, "temperature", "between"),
    ],
)
def test_limits_in_nanochats_order(messages, kwargs, param, words):
    with pytest.raises(RequestError) as info:
        limits.check_messages(messages)
        limits.check_sampling(**kwargs)
    assert info.value.param == param and words in info.value.message and info.value.status == 400


def test_limits_accept_the_edges_and_resolve_defaults():
    limits.check_messages([{"role": "user", "content": "x" * 8000}] * 4)
    s = limits.check_sampling(temperature=2.0, top_k=200, max_tokens=4096, top_p=1.0, n=8, stop="##")
    assert (s.temperature, s.top_k, s.max_tokens, s.top_p, s.n, s.stop) == (2.0, 200, 4096, None, 8, ("##",))
    d = limits.check_sampling(default_temperature=0.6, default_top_k=0)
    assert (d.temperature, d.top_k, d.max_tokens) == (0.6, None, None)
    assert limits.token_budget(100, None, 128, 512) == 28  # the default is cut to what fits
    with pytest.raises(RequestError, match="at most 28"):
        limits.token_budget(100, 29, 128, 512)
    with pytest.raises(RequestError, match="context is 128"):
        limits.token_budget(128, None, 128, 512)


# --------------------------------------------------------------------------- over HTTP
def _chat(server, **body):
    return httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", **body}, timeout=60)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": []}, "messages", "At least one message"),
        ({"messages": [USER] * 501}, "messages", "Too many messages"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages.0.content", "empty"),
        ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages.0.content", "8000"),
        ({"messages": [{"role": "user", "content": "x" * 7000}] * 5}, "messages", "32000"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "robot"),
        ({"messages": [USER], "temperature": 2.5}, "temperature", "2.0"),
        ({"messages": [USER], "top_k": 201}, "top_k", "200"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens", "4096"),
        ({"messages": [USER], "max_completion_tokens": 5000}, "max_completion_tokens", "4096"),
        ({"messages": [USER], "max_tokens": 200}, "max_tokens", "context length is 128"),
        ({"messages": [{"role": "user", "content": "x " * 2000}]}, "messages", "context is 128"),
        ({"messages": [USER], "temperature": "hot"}, "temperature", "valid number"),
        ({"messages": [USER], "n": 1.5}, "n", "valid integer"),
        ({"messages": "hi"}, "messages", "valid list"),
        ({}, "messages", "Field required"),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "empty"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role", "Field required"),
        ({"messages": [USER, {"role": "assistant", "content": "yo"}]}, "messages", "last message"),
        ({"messages": [USER, USER]}, "messages", "alternate"),
        ({"messages": [USER, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}, USER]},
         "messages", "system"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, "messages", "text part"),
    ],
)
def test_openai_errors_name_the_field(server, body, param, words):
    r = _chat(server, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_openai_sdk_raises_bad_request_with_the_message(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[USER], temperature=3)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny", prompt="")


def test_malformed_json_and_non_objects(server):
    for content in (b"{not json", b"[1, 2]", b"null", "{\"messages\": [\"\xff\"]}".encode("latin-1")):
        r = httpx.post(server.url + "/v1/chat/completions", content=content,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), (content, r.text)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "Malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"inputs": ""}, "inputs is empty"),
        ({"inputs": 3}, "inputs"),
        ({"inputs": "x" * 32001}, "32000"),
        ({"inputs": "Hi", "parameters": {"temperature": 2.5}}, "temperature"),
        ({"inputs": "Hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"inputs": "Hi", "parameters": {"best_of": 2}}, "best_of"),
        ({"inputs": "Hi", "parameters": {"stop": "x"}}, "parameters.stop"),
        ({"inputs": "Hi", "parameters": {"truncate": 0}}, "truncate"),
    ],
)
def test_tgi_errors(server, body, words):
    for path in ("/generate", "/generate_stream", "/"):
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error_type"] == "validation" and words in r.json()["error"]


def test_nanochat_form_errors_are_detail_400(server):
    r = httpx.post(server.url + "/chat/completions", json={"messages": [USER], "top_k": 300})
    assert r.status_code == 400 and "top_k" in r.json()["detail"]
    r = httpx.post(server.url + "/chat/completions", json={"messages": [{"role": "system", "content": "s"}]})
    assert r.status_code == 400 and "last message" in r.json()["detail"]


def test_body_too_large_is_413(server):
    big = {"messages": [{"role": "user", "content": "x" * 1_100_000}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/generate", json={"inputs": "x" * 1_100_000})
    assert r.status_code == 413 and r.json()["error_type"] == "validation"
