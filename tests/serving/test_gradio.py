"""The Gradio chat app: through `gradio_client` against the UI mounted in the server, in headless Chromium (a
real page: type, send, read the streamed reply, screenshot), and against remote endpoints (our server through
the OpenAI and TGI clients)."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct

import pytest
from serving_testdata import CALC_QUESTION, CALC_REPLY_TEXT, HELLO_QUESTION, HELLO_REPLY, Chromium

from app.gradio_app import OpenAIBackend, TGIBackend, history_to_messages, to_chat_messages

CALC_MESSAGES = [
    {"role": "assistant", "content": "Let me compute. "},
    {"role": "assistant", "content": "42", "metadata": {"title": "🧮 calculator: 6*7", "status": "done"}},
    {"role": "assistant", "content": " The answer is 42."},
]


def test_tool_calls_display_and_history_round_trip():
    assert to_chat_messages(CALC_REPLY_TEXT, done=True) == CALC_MESSAGES
    partial = to_chat_messages("Let me compute. <|python_start|>6*")
    assert partial[-1]["metadata"] == {"title": "🧮 calculator: 6*", "status": "pending"}
    history = [{"role": "user", "content": CALC_QUESTION}, *CALC_MESSAGES]
    assert history_to_messages(history, "thanks") == [
        {"role": "user", "content": CALC_QUESTION}, {"role": "assistant", "content": CALC_REPLY_TEXT},
        {"role": "user", "content": "thanks"},
    ]
    # Gradio may hand content back as text parts
    assert history_to_messages([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "b")[0] == {
        "role": "user", "content": "a"}


def test_gradio_client_against_the_mounted_ui(server):
    from gradio_client import Client

    client = Client(server.url + "/", verbose=False)
    try:
        reply = client.predict(CALC_QUESTION, 0.0, 0, 60, api_name="/chat")
        assert [m["content"] for m in reply] == [m["content"] for m in CALC_MESSAGES]
        assert reply[1]["metadata"]["title"] == "🧮 calculator: 6*7"
        job = client.submit(HELLO_QUESTION, 0.0, 0, 60, api_name="/chat")
        assert job.result() == [{"role": "assistant", "content": HELLO_REPLY}]
        assert len(job.outputs()) > 3  # it streamed
    finally:
        client.close()


def test_ui_is_behind_the_api_key(busy_server):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError):
        Client(busy_server.url + "/", verbose=False)
    with pytest.raises(ValueError, match="login"):  # gradio_client's message for a wrong password
        Client(busy_server.url + "/", verbose=False, auth=("me", "wrong"))
    client = Client(busy_server.url + "/", verbose=False, auth=("me", busy_server.api_key))
    try:
        reply = client.predict(HELLO_QUESTION, 0.0, 0, 3, api_name="/chat")  # 3 tokens: "Hello! " at most
        assert HELLO_REPLY.startswith(reply[0]["content"]) and reply[0]["content"]
    finally:
        client.close()


def test_remote_backends_talk_to_our_server(server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # InferenceClient to 127.0.0.1 only

    async def last(backend):
        texts = [text async for text in backend.stream([{"role": "user", "content": CALC_QUESTION}], 0.0, 0, 60)]
        assert len(texts) > 3  # streamed (cumulative text)
        return texts[-1]

    assert asyncio.run(last(OpenAIBackend(server.url))) == CALC_REPLY_TEXT  # model name from /v1/models
    assert asyncio.run(last(TGIBackend(server.url))) == CALC_REPLY_TEXT


def _chromium() -> str | None:
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_page_renders_and_chats_in_headless_chromium(server, tmp_path):
    browser = Chromium(_chromium(), tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        browser.wait_for("!!document.querySelector('textarea[data-testid=textbox]')")
        assert "nanochat" in browser.evaluate("document.title")
        browser.evaluate(f"""(() => {{ const box = document.querySelector('textarea[data-testid=textbox]');
            box.value = {CALC_QUESTION!r}; box.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")
        browser.wait_for("!document.querySelector('button.submit-button').disabled")
        browser.evaluate("document.querySelector('button.submit-button').click()")
        reply = browser.wait_for("""(() => { const text = Array.from(document.querySelectorAll('[data-testid=bot]'))
            .map(b => b.innerText).join('\\n'); return text.includes('The answer is 42') ? text : ''; })()""")
        assert "Let me compute." in reply and "calculator: 6*7" in reply
        shot = browser.screenshot(tmp_path / "chat.png")
    finally:
        browser.close()
    png = shot.read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width == 1100 and height > 500 and len(png) > 20_000
    if os.environ.get("NANOCHAT_SCREENSHOT"):  # keep it to look at
        shutil.copy(shot, os.environ["NANOCHAT_SCREENSHOT"])
