"""The Gradio chat app: a streaming `gr.ChatInterface` over a local model or any chat endpoint, Space-ready.

    nanochat ui runs/d20/sft                                   # in-process model (the server's scheduler)
    nanochat ui --endpoint http://127.0.0.1:8000               # our server, vLLM, any OpenAI-compatible API
    nanochat ui --endpoint https://my-tgi --api tgi            # a real TGI / HF Inference Endpoint
    nanochat space runs/d20/sft my-space/                      # a ready Hugging Face Space running this app

`nanochat serve` mounts the same UI at `/` (one process for UI and API, as nanochat does). Controls:
temperature, top-k, max new tokens. Calculator tool calls are shown as collapsible "🧮 calculator: expr"
messages holding the result; the history sent back to the model turns them into the literal tool tokens again
(see `app.protocol.split_tool_calls`), so the model sees exactly what it produced.

Backends (all stream): `LocalBackend` (a `Scheduler` in this process: continuous batching with the API's
requests), `OpenAIBackend` (the `openai` SDK), `TGIBackend` (`huggingface_hub.AsyncInferenceClient`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from modeling_nanochat.tokenization_nanochat import OUTPUT_END, OUTPUT_START, PYTHON_END, PYTHON_START

from . import limits
from .limits import RequestError
from .protocol import chat_prompt_ids, split_tool_calls

TOOL_TITLE = "🧮 calculator: "
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_MAX_TOKENS = 0.8, 50, 512


# --------------------------------------------------------------------------- display <-> model text
def to_chat_messages(text: str, done: bool = False) -> list[dict[str, Any]]:
    """The assistant's (partial) reply as Gradio messages: text, and one collapsible message per tool call."""
    out: list[dict[str, Any]] = []
    for part in split_tool_calls(text):
        if part["type"] == "text":
            out.append({"role": "assistant", "content": part["text"]})
        elif part["type"] == "python":
            out.append({"role": "assistant", "content": "",
                        "metadata": {"title": TOOL_TITLE + part["text"].strip(), "status": "pending"}})
        elif out and out[-1].get("metadata"):  # the result of the call just before
            out[-1]["content"] = part["text"]
            out[-1]["metadata"]["status"] = "done"
    if done:
        for message in out:
            if message.get("metadata"):
                message["metadata"]["status"] = "done"
    return out or [{"role": "assistant", "content": ""}]


def _text_of(content: Any) -> str:
    if isinstance(content, dict):  # Gradio may wrap text as {"type": "text", "text": ...}
        content = [content]
    return limits.content_text(content) or ""


def history_to_messages(history: list[dict], message: str) -> list[dict[str, str]]:
    """Gradio's history (+ the new user message) as chat messages; tool-call messages become tool tokens again."""
    messages: list[dict[str, str]] = []
    for item in history or []:
        role = item.get("role")
        metadata = item.get("metadata") or {}
        text = _text_of(item.get("content"))
        if role == "assistant" and str(metadata.get("title", "")).startswith(TOOL_TITLE):
            expr = metadata["title"][len(TOOL_TITLE):]
            text = f"{PYTHON_START}{expr}{PYTHON_END}{OUTPUT_START}{text}{OUTPUT_END}"
        if messages and messages[-1]["role"] == role == "assistant":
            messages[-1]["content"] += text  # one reply shown as several messages
        elif role in ("user", "assistant", "system"):
            messages.append({"role": role, "content": text})
    messages.append({"role": "user", "content": message})
    return messages


# --------------------------------------------------------------------------- backends
class LocalBackend:
    """Generates with a `Scheduler` in this process (shares its batch with the HTTP API when mounted)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.started = False

    async def stream(self, messages: list[dict], temperature: float, top_k: int, max_tokens: int) -> AsyncIterator[str]:
        """The reply so far (cumulative text) after every step; `max_tokens` is capped by the context."""
        from .scheduler import QueueFull, SamplingParams

        limits.check_messages(messages)
        sampling = limits.check_sampling(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
        prompt = chat_prompt_ids(self.scheduler.tokenizer, messages)
        # the slider is an upper bound: a long conversation gets what still fits the context
        budget = limits.token_budget(len(prompt), None, self.scheduler.context, sampling.max_tokens)
        if not self.started:
            self.scheduler.start()  # idempotent; the server's lifespan may have started it already
            self.started = True
        try:
            generation = self.scheduler.submit(prompt, SamplingParams(budget, sampling.temperature, sampling.top_k))
        except QueueFull as e:
            raise RequestError(str(e), status=429) from None
        text = ""
        try:
            async for event in generation:
                if event.finish == "error":
                    raise RuntimeError(event.error or "generation failed")
                text += event.text
                yield text
        finally:
            generation.cancel()  # the page was closed or the user pressed stop


class OpenAIBackend:
    """Any OpenAI-compatible server (ours, vLLM, TGI's /v1) through the `openai` SDK; top-k goes in `extra_body`."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None):
        from openai import AsyncOpenAI

        base_url = base_url.rstrip("/")
        self.client = AsyncOpenAI(base_url=base_url if base_url.endswith("/v1") else base_url + "/v1",
                                  api_key=api_key or "not-needed")
        self.model = model

    async def stream(self, messages: list[dict], temperature: float, top_k: int, max_tokens: int) -> AsyncIterator[str]:
        if self.model is None:
            self.model = (await self.client.models.list()).data[0].id
        stream = await self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens, stream=True,
            extra_body={"top_k": top_k} if top_k else None,
        )
        text = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                yield text


class TGIBackend:
    """A text-generation-inference server or HF endpoint through `huggingface_hub.AsyncInferenceClient`."""

    def __init__(self, base_url: str, api_key: str | None = None):
        from huggingface_hub import AsyncInferenceClient

        self.client = AsyncInferenceClient(base_url=base_url.rstrip("/"), api_key=api_key)

    async def stream(self, messages: list[dict], temperature: float, top_k: int, max_tokens: int) -> AsyncIterator[str]:
        stream = await self.client.chat_completion(messages, stream=True, temperature=temperature,
                                                   max_tokens=max_tokens, extra_body={"top_k": top_k} if top_k else None)
        text = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                yield text


# --------------------------------------------------------------------------- the app
def build_chat_ui(backend, title: str = "nanochat", concurrency_limit: int | None = 16,
                  temperature: float = DEFAULT_TEMPERATURE, top_k: int = DEFAULT_TOP_K,
                  max_tokens: int = DEFAULT_MAX_TOKENS):
    """A `gr.ChatInterface` (API name `/chat`: message, temperature, top_k, max_tokens) streaming from `backend`."""
    import gradio as gr

    async def chat(message: str, history: list[dict], temperature: float, top_k: int, max_tokens: int):
        if not message or not message.strip():
            raise gr.Error("Type a message first.")
        messages = history_to_messages(history, message)
        text = ""
        try:
            async for text in backend.stream(messages, float(temperature), int(top_k), int(max_tokens)):
                yield to_chat_messages(text)
        except RequestError as e:
            raise gr.Error(e.message) from None
        yield to_chat_messages(text, done=True)

    return gr.ChatInterface(
        chat,
        title=title,
        description="A NanoChat model. Calculator tool calls appear as collapsible 🧮 messages.",
        additional_inputs=[
            gr.Slider(limits.MIN_TEMPERATURE, limits.MAX_TEMPERATURE, value=temperature, step=0.05,
                      label="temperature (0 = greedy)"),
            gr.Slider(limits.MIN_TOP_K, limits.MAX_TOP_K, value=top_k, step=1, label="top-k (0 = off)"),
            gr.Slider(limits.MIN_MAX_TOKENS, limits.MAX_MAX_TOKENS, value=max_tokens, step=1, label="max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        api_name="chat",
        concurrency_limit=concurrency_limit,
        fill_height=True,
    )


def build_parser() -> argparse.ArgumentParser:
    """The options of `nanochat ui`."""
    p = argparse.ArgumentParser(prog="nanochat ui", description="Run the Gradio chat app on a local model folder "
                                "or against a remote endpoint.")
    p.add_argument("folder", nargs="?", help="a saved NanoChat folder (omit with --endpoint)")
    p.add_argument("--endpoint", help="URL of a chat server instead of a local model")
    p.add_argument("--api", choices=["openai", "tgi"], default="openai",
                   help="the endpoint's API: openai (our server, vLLM, ...) or tgi (TGI / HF endpoints)")
    p.add_argument("--api-key", default=None, help="key for the endpoint")
    p.add_argument("--model", default=None, help="model name to request from an OpenAI endpoint (default: its first)")
    p.add_argument("--max-batch", type=int, default=16, help="local model: sequences decoded together")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    p.add_argument("--title", default=None, help="page title")
    return p


def build_from_args(args: argparse.Namespace):
    """The Blocks for `nanochat ui` / a Space's app.py."""
    if bool(args.folder) == bool(args.endpoint):
        raise SystemExit("nanochat ui: pass either a model folder or --endpoint URL")
    if args.endpoint:
        backend = OpenAIBackend(args.endpoint, args.api_key, args.model) if args.api == "openai" else \
            TGIBackend(args.endpoint, args.api_key)
        return build_chat_ui(backend, title=args.title or f"nanochat · {args.endpoint}")
    from .scheduler import Scheduler

    scheduler = Scheduler.from_folder(args.folder, max_batch=args.max_batch)
    return build_chat_ui(LocalBackend(scheduler), title=args.title or f"nanochat · {Path(args.folder).name}",
                         concurrency_limit=scheduler.capacity + scheduler.max_queue)


def main(argv: list[str] | None = None) -> int:
    """`nanochat ui`: serve the chat app (local folder or --endpoint) until interrupted."""
    args = build_parser().parse_args(argv)
    demo = build_from_args(args)
    demo.launch(server_name=args.host, server_port=args.port)
    return 0


# --------------------------------------------------------------------------- Spaces
SPACE_APP = '''\
"""Hugging Face Space: the nanochat-hf chat app on the model in ./model (written by `nanochat space`)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "nanochat_hf"))  # the vendored app + modeling_nanochat packages

from app.gradio_app import LocalBackend, build_chat_ui  # noqa: E402
from app.scheduler import Scheduler  # noqa: E402

MODEL = os.environ.get("NANOCHAT_MODEL", {model!r})
if not os.path.isabs(MODEL) and os.path.isdir(os.path.join(HERE, MODEL)):
    MODEL = os.path.join(HERE, MODEL)
elif not os.path.isdir(MODEL):  # a Hub repo id
    from huggingface_hub import snapshot_download

    MODEL = snapshot_download(MODEL)
scheduler = Scheduler.from_folder(MODEL, max_batch={max_batch})
demo = build_chat_ui(LocalBackend(scheduler), title={title!r}, concurrency_limit=scheduler.capacity + scheduler.max_queue)

if __name__ == "__main__":
    demo.launch()
'''

SPACE_README = """\
---
title: {title}
emoji: 💬
colorFrom: indigo
colorTo: blue
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: mit
short_description: Chat with a NanoChat model (nanochat-hf)
---

# {title}

A chat UI for a [nanochat](https://github.com/karpathy/nanochat) model rebuilt for the Hugging Face ecosystem
(nanochat-hf). It streams replies, shows calculator tool calls, and batches concurrent users into one decode
loop. The model is {model_desc}.

Written by `nanochat space`; run it locally with `pip install -r requirements.txt && python app.py`.
"""


def write_space(folder: str | Path | None, out: str | Path, model_repo: str | None = None, title: str | None = None,
                max_batch: int = 8) -> Path:
    """Write a ready Gradio Space to `out`: app.py, requirements.txt, README.md (Space metadata), the app code
    (`nanochat_hf/app`, `nanochat_hf/modeling_nanochat`) and the model (copied to `model/`, or downloaded from
    `model_repo` on the Hub when the Space starts)."""
    import gradio
    import torch
    import transformers

    out = Path(out)
    if (folder is None) == (model_repo is None):
        raise ValueError("write_space needs exactly one of a model folder or a Hub model repo id")
    if folder is not None:
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder} is not a NanoChat folder with a tokenizer (config.json, tokenizer.json)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: pick a new folder for the Space")
    root = Path(__file__).resolve().parent.parent
    vendor = out / "nanochat_hf"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "modeling_nanochat", vendor / "modeling_nanochat", ignore=ignore)
    (vendor / "app").mkdir(parents=True)
    for name in ("__init__.py", "gradio_app.py", "scheduler.py", "limits.py", "protocol.py", "metrics.py"):
        shutil.copy2(root / "app" / name, vendor / "app" / name)
    if folder is not None:
        shutil.copytree(folder, out / "model", ignore=shutil.ignore_patterns("checkpoints", "__pycache__"))
    model = "model" if folder is not None else model_repo
    title = title or f"nanochat · {Path(folder).resolve().name if folder is not None else model_repo}"
    (out / "app.py").write_text(SPACE_APP.format(model=model, max_batch=max_batch, title=title))
    (out / "requirements.txt").write_text(
        f"torch=={torch.__version__.split('+')[0]}\ntransformers=={transformers.__version__}\n"
        f"gradio=={gradio.__version__}\nhuggingface_hub\nsafetensors\ntokenizers\n"
    )
    model_desc = "in `model/`" if folder is not None else f"[{model_repo}](https://huggingface.co/{model_repo})"
    (out / "README.md").write_text(SPACE_README.format(title=title, gradio_version=gradio.__version__,
                                                       model_desc=model_desc))
    return out


def space_main(argv: list[str] | None = None) -> int:
    """`nanochat space FOLDER OUT`: write the Space; 2 when the inputs are wrong."""
    p = argparse.ArgumentParser(prog="nanochat space", description=textwrap.dedent(write_space.__doc__ or ""))
    p.add_argument("folder", nargs="?", help="a saved NanoChat folder to ship inside the Space")
    p.add_argument("out", help="the folder to write (must not exist or be empty)")
    p.add_argument("--model-repo", default=None, help="load this Hub model at startup instead of shipping a folder")
    p.add_argument("--title", default=None, help="Space title")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    args = p.parse_args(argv)
    try:
        out = write_space(args.folder, args.out, model_repo=args.model_repo, title=args.title, max_batch=args.max_batch)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"nanochat space: {e}", file=sys.stderr)
        return 2
    print(f"wrote a Gradio Space to {out}: push it with `hf upload <user>/<space> {out} --repo-type space`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
