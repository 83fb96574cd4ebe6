"""The TGI dialect with the real `text_generation` client (it posts to the base URL and wants a list with
`details`) and `huggingface_hub.InferenceClient` (OpenAI-style chat on a TGI-like server)."""

from __future__ import annotations

import httpx
import pytest
from serving_testdata import CALC_QUESTION, CALC_REPLY_TEXT, HELLO_QUESTION, HELLO_REPLY

text_generation = pytest.importorskip("text_generation")


@pytest.fixture(scope="module")
def tgi(server):
    return text_generation.Client(server.url, timeout=60)


def test_generate_with_details(tgi, server):
    response = tgi.generate("Hello", max_new_tokens=6)
    details = response.details
    assert details.finish_reason == "length" and details.generated_tokens == 6 == len(details.tokens)
    assert response.generated_text == "".join(t.text for t in details.tokens if not t.special)
    assert all(t.logprob is not None and t.logprob <= 0 for t in details.tokens)
    assert details.seed is None  # greedy (do_sample False)
    # /generate answers the same object (not a list)
    direct = httpx.post(server.url + "/generate", timeout=60, json={
        "inputs": "Hello", "parameters": {"max_new_tokens": 6}}).json()
    assert direct == {"generated_text": response.generated_text}


def test_generate_stream_matches_generate(tgi):
    expected = tgi.generate("Hello", max_new_tokens=8).generated_text
    events = list(tgi.generate_stream("Hello", max_new_tokens=8))
    assert "".join(e.token.text for e in events if not e.token.special) == expected
    assert [e.generated_text for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].generated_text == expected
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 8


def test_chat_prompt_through_tgi_stops_at_assistant_end(tgi):
    prompt = f"<|bos|><|user_start|>{HELLO_QUESTION}<|user_end|><|assistant_start|>"
    response = tgi.generate(prompt, max_new_tokens=40, return_full_text=True, decoder_input_details=True)
    assert response.generated_text == prompt + HELLO_REPLY
    assert response.details.finish_reason == "eos_token"
    assert response.details.tokens[-1].special and response.details.tokens[-1].text == "<|assistant_end|>"
    assert response.details.prefill[0].text == "<|bos|>"  # no second BOS was added
    sampled = tgi.generate(prompt, max_new_tokens=5, do_sample=True, seed=3, top_k=20)
    assert sampled.details.seed == 3


def test_tgi_validation_errors(tgi):
    with pytest.raises(text_generation.errors.ValidationError, match="max_new_tokens"):
        tgi.generate("Hello", max_new_tokens=5000)
    with pytest.raises(text_generation.errors.ValidationError, match="top_k"):
        tgi.generate("Hello", max_new_tokens=5, top_k=500)
    with pytest.raises(text_generation.errors.ValidationError, match="repetition_penalty"):
        tgi.generate("Hello", max_new_tokens=5, repetition_penalty=1.3)
    with pytest.raises(text_generation.errors.ValidationError, match="context"):
        tgi.generate("Hello", max_new_tokens=4000)  # fits the limit, not the 128-token context


def test_info(server):
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 128
    assert info["max_batch_size"] == 8 and info["model_pipeline_tag"] == "text-generation"


def test_inference_client_chat_completion(server, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite sets it; this client only talks to 127.0.0.1

    client = InferenceClient(base_url=server.url, timeout=60)
    reply = client.chat_completion([{"role": "user", "content": CALC_QUESTION}], max_tokens=60, temperature=0)
    assert reply.choices[0].message.content == CALC_REPLY_TEXT
    streamed = client.chat_completion([{"role": "user", "content": HELLO_QUESTION}], max_tokens=40, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == HELLO_REPLY
