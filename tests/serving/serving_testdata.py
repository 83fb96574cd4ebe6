"""Shared helpers for the serving tests: a tiny chat model folder and in-process uvicorn servers.

The model is a 4-layer, 64-wide NanoChat with a BPE tokenizer trained here on a few KB of text, trained for a
few seconds to memorize two conversations (one with a calculator call), so greedy replies are known:

    "What is 6 times 7?" -> "Let me compute. <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> ..."
    "Say hello"          -> "Hello! I am nanochat."

Any other prompt gives fluent-looking noise until max_tokens (handy for long, concurrent generations).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

CONTEXT = 128
CALC_QUESTION = "What is 6 times 7?"
CALC_REPLY = [
    {"type": "text", "text": "Let me compute. "},
    {"type": "python", "text": "6*7"},
    {"type": "python_output", "text": "42"},
    {"type": "text", "text": " The answer is 42."},
]
CALC_REPLY_TEXT = "Let me compute. <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> The answer is 42."
HELLO_QUESTION = "Say hello"
HELLO_REPLY = "Hello! I am nanochat."
CORPUS = """\
The small model reads a line of text and guesses the next word. It learns from many examples.
Numbers like 6, 7 and 42 appear here so that the tokenizer knows digits: 1 2 3 4 5 6 7 8 9 0.
Hello there! What is the answer? Let me compute the product of six and seven, it is forty two.
A chat model answers questions, says hello, and uses a calculator for arithmetic when it needs one.
Unicode is welcome too: café, naïve, 日本語, emoji 🙂 and the Greek letter λ.
"""


def conversations() -> list[list[dict]]:
    return [
        [{"role": "user", "content": CALC_QUESTION}, {"role": "assistant", "content": CALC_REPLY}],
        [{"role": "user", "content": HELLO_QUESTION}, {"role": "assistant", "content": HELLO_REPLY}],
    ]


def build_model_folder(folder: Path, steps: int = 150) -> Path:
    """Train the tokenizer and the tiny model, save both to `folder` (~5 s on one core)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from helpers import tiny_config

    from modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.tokenization_nanochat import render_conversation, train_tokenizer

    tokenizer = train_tokenizer([CORPUS * 4], vocab_size=400)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|assistant_end|>"),
                         pad_token_id=tokenizer.bos_token_id)
    model = NanoChatForCausalLM(config)
    rows = [render_conversation(tokenizer, conv)[0] for conv in conversations()]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.bos_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """A real uvicorn server for `app` on 127.0.0.1 (a free port), in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        import logging

        # long-lived streams (Gradio's heartbeat) are cut after the grace period: expected, not worth a traceback
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def make_server(folder: Path, ui: bool = False, slow_s: float = 0.0, **kwargs):
    """(ServerThread, scheduler) for the folder; `slow_s` sleeps in every forward (to hold slots busy)."""
    from app.routes import ServerSettings
    from app.scheduler import Scheduler
    from app.server import create_app

    settings_keys = {"api_key", "temperature", "top_k", "max_tokens", "model_id", "log_conversations"}
    settings = ServerSettings(**{"model_id": "tiny", "temperature": 0.0, "top_k": None, "max_tokens": 24,
                                 **{k: v for k, v in kwargs.items() if k in settings_keys}})
    scheduler = Scheduler.from_folder(folder, max_batch=kwargs.get("max_batch", 8), max_queue=kwargs.get("max_queue", 16))
    if slow_s:
        for worker in scheduler.workers:
            worker.engine.model.register_forward_hook(lambda *args: time.sleep(slow_s))
    return ServerThread(create_app(scheduler, settings, ui=ui)), scheduler


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: fds 3/4,
    NUL-separated JSON), so no WebSocket client is needed."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", "--no-first-run", "--window-size=1100,900", "--remote-debugging-pipe"]

    def __init__(self, binary: str, profile: Path):
        import os
        import subprocess

        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        # the protocol is on fds 3 (commands in) and 4 (replies out): let the shell move our pipe ends there
        r, w = to_chrome_r, from_chrome_w
        script = f'exec 100<&{r} 101>&{w} {r}<&- {w}>&-; exec "$0" "$@" 3<&100 4>&101 100<&- 101>&-'
        self.proc = subprocess.Popen(["/bin/bash", "-c", script, binary, *self.FLAGS, f"--user-data-dir={profile}",
                                      "about:blank"], pass_fds=(r, w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.session = None

    def _read_message(self, timeout: float) -> dict:
        import json
        import os
        import select

        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], timeout)
            if not ready:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, timeout: float = 30.0, session: bool = True, **params) -> dict:
        import json
        import os

        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message(timeout)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {expression}")

    def screenshot(self, path: Path) -> Path:
        import base64

        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
