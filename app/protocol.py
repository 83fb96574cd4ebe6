"""Wire formats of the server: request models, response/chunk builders, error bodies, prompt construction.

Three dialects share one engine:
- OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/models`): what the `openai` SDK,
  `huggingface_hub.InferenceClient` and LangChain-style clients speak; SSE streams end with `data: [DONE]`.
- TGI (`/generate`, `/generate_stream`, `POST /`, `/info`): what `text_generation.Client` speaks; `POST /`
  answers a *list* (the client reads `payload[0]`), errors are `{"error", "error_type"}`.
- nanochat's own (`POST /chat/completions` without a `model` field): `data: {"token", "gpu"}` chunks and a
  final `data: {"done": true}`, so the original's scripts and UI code keep working.

Request models check types only (strict: a string is not a number); ranges and limits live in `app.limits`.
Unknown fields are ignored, as OpenAI-compatible servers do for the many optional parameters clients send.

Tool calls: the model calls its calculator with `<|python_start|>expr<|python_end|>` and the engine forces
`<|output_start|>result<|output_end|>`. These tokens are streamed as their literal text (like nanochat);
`split_tool_calls` turns such text back into nanochat's message parts, so a client that sends a reply back
in the conversation history gives the model the same tokens it produced.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modeling_nanochat.tokenization_nanochat import (
    ASSISTANT_START,
    OUTPUT_END,
    OUTPUT_START,
    PYTHON_END,
    PYTHON_START,
    ChatFormatError,
    render_conversation,
)

from . import limits
from .limits import RequestError


def _range(low, high) -> dict:
    """Documents a limit in the OpenAPI schema; `app.limits` enforces it (in nanochat's order)."""
    return {"minimum": low, "maximum": high}


_TEMPERATURE = _range(limits.MIN_TEMPERATURE, limits.MAX_TEMPERATURE)
_TOP_K = _range(limits.MIN_TOP_K, limits.MAX_TOP_K)
_MAX = _range(limits.MIN_MAX_TOKENS, limits.MAX_MAX_TOKENS)
_N = _range(1, limits.MAX_N)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# --------------------------------------------------------------------------- OpenAI requests
class ContentPart(_Strict):
    type: str = Field(description="'text' (OpenAI), or nanochat's 'python' / 'python_output' for assistant turns")
    text: str | None = None


class ToolCallFunction(_Strict):
    name: str | None = None
    arguments: str | dict[str, Any] | None = None


class ToolCall(_Strict):
    id: str | None = None
    type: str | None = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: str = Field(description="system (first only), user, assistant or tool")
    content: str | list[ContentPart] | None = Field(None, json_schema_extra={"maxLength": limits.MAX_MESSAGE_CHARS})
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """OpenAI chat completion request (plus `top_k`, as vLLM/TGI accept it)."""

    model: str | None = Field(None, description="informational: the server serves one model")
    messages: list[ChatMessage] = Field(description=f"1 to {limits.MAX_MESSAGES} messages")
    temperature: float | None = Field(None, description="0 = greedy", json_schema_extra=_TEMPERATURE)
    top_p: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    top_k: int | None = Field(None, description="0 = off", json_schema_extra=_TOP_K)
    n: int | None = Field(1, description="completions per request", json_schema_extra=_N)
    max_tokens: int | None = Field(None, description="and prompt + max_tokens <= context", json_schema_extra=_MAX)
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens",
                                              json_schema_extra=_MAX)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Strict):
    """OpenAI (legacy) text completion request."""

    model: str | None = None
    prompt: str | list[str]
    temperature: float | None = Field(None, json_schema_extra=_TEMPERATURE)
    top_p: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    top_k: int | None = Field(None, json_schema_extra=_TOP_K)
    n: int | None = Field(1, json_schema_extra=_N)
    max_tokens: int | None = Field(None, description="default: the server's --max-tokens", json_schema_extra=_MAX)
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


# --------------------------------------------------------------------------- TGI requests
class GenerateParameters(_Strict):
    """TGI's `parameters`. Unsupported ones are accepted at their neutral value and refused otherwise."""

    do_sample: bool | None = False
    max_new_tokens: int | None = Field(None, description="default: the server's --max-tokens", json_schema_extra=_MAX)
    temperature: float | None = Field(None, json_schema_extra=_TEMPERATURE)
    top_k: int | None = Field(None, json_schema_extra=_TOP_K)
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    details: bool | None = False
    return_full_text: bool | None = False
    decoder_input_details: bool | None = False
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    truncate: int | None = None
    best_of: int | None = None
    watermark: bool | None = False
    top_n_tokens: int | None = None
    grammar: dict[str, Any] | None = None


class GenerateRequest(_Strict):
    """TGI's request: `inputs` text, optional `parameters`, `stream` (for `POST /`)."""
    inputs: str
    parameters: GenerateParameters | None = None
    stream: bool | None = False


# --------------------------------------------------------------------------- prompts
_TOOL_MARKER = re.compile("(" + "|".join(re.escape(t) for t in (PYTHON_START, PYTHON_END, OUTPUT_START, OUTPUT_END)) + ")")


def split_tool_calls(text: str) -> list[dict[str, str]]:
    """nanochat message parts from text with literal tool markers (what the model streams).

    "x <|python_start|>2+2<|python_end|><|output_start|>4<|output_end|> so 4" ->
    [text "x ", python "2+2", python_output "4", text " so 4"]. An unterminated call (a stream cut short)
    still becomes its part, so partial text renders too.
    """
    parts: list[dict[str, str]] = []
    mode = "text"
    for piece in _TOOL_MARKER.split(text):
        if piece in (PYTHON_START, OUTPUT_START):
            mode = "python" if piece == PYTHON_START else "python_output"
            parts.append({"type": mode, "text": ""})
        elif piece in (PYTHON_END, OUTPUT_END):
            mode = "text"
        elif piece:
            if mode == "text" and (not parts or parts[-1]["type"] != "text"):
                parts.append({"type": "text", "text": ""})
            parts[-1]["text"] += piece
    return parts


def _message_dict(message: ChatMessage | dict) -> dict[str, Any]:
    return message.model_dump(exclude_none=True) if isinstance(message, BaseModel) else dict(message)


def chat_prompt_ids(tokenizer, messages: list[ChatMessage | dict]) -> list[int]:
    """The prompt for the assistant's next reply: nanochat's rendering of the conversation + `<|assistant_start|>`.

    System messages merge into the first user message and assistant replies that carry literal tool markers
    become python/python_output parts (see `split_tool_calls`). The conversation must end with a user message.
    Raises `RequestError` (param "messages") for conversations nanochat cannot render.
    """
    conversation = []
    for message in messages:
        message = _message_dict(message)
        content = message.get("content")
        if message.get("role") == "assistant" and isinstance(content, str) and "<|" in content:
            message["content"] = split_tool_calls(content)
        conversation.append(message)
    if not conversation or conversation[-1].get("role") != "user":
        raise RequestError("The last message must be from the user (the server writes the assistant's reply)",
                           "messages")
    try:
        ids, _ = render_conversation(tokenizer, conversation, max_tokens=None)
    except ChatFormatError as e:
        raise RequestError(str(e), "messages") from None
    return ids + [tokenizer.convert_tokens_to_ids(ASSISTANT_START)]


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """A raw prompt (completions, TGI): `<|bos|>` + the text; special-token text in it is parsed, as TGI does,
    so a client can send an already formatted chat prompt (a leading `<|bos|>` is not doubled)."""
    bos = tokenizer.bos_token or ""
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


# --------------------------------------------------------------------------- OpenAI responses
OPENAI_FINISH = {"eos": "stop", "stop_sequence": "stop", "length": "length"}
TGI_FINISH = {"eos": "eos_token", "stop_sequence": "stop_sequence", "length": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, texts: list[str], finishes: list[str], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """OpenAI `chat.completion` object for finished sequences."""
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": OPENAI_FINISH.get(finish, finish)}
            for i, (text, finish) in enumerate(zip(texts, finishes))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish: str | None = None) -> dict:
    """One OpenAI `chat.completion.chunk` (a delta of one choice)."""
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None,
                     "finish_reason": OPENAI_FINISH.get(finish, finish) if finish else None}],
    }


def completion(rid: str, model: str, texts: list[str], finishes: list[str], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    """OpenAI `text_completion` object for finished sequences."""
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": OPENAI_FINISH.get(finish, finish)}
                    for i, (text, finish) in enumerate(zip(texts, finishes))],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish: str | None = None) -> dict:
    """One streamed `text_completion` chunk."""
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None,
                     "finish_reason": OPENAI_FINISH.get(finish, finish) if finish else None}],
    }


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The final usage-only chunk (`stream_options.include_usage`)."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def openai_error(message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --------------------------------------------------------------------------- TGI responses
TGI_ERROR_TYPES = {400: "validation", 401: "authentication", 413: "validation", 422: "validation",
                   429: "overloaded", 500: "generation", 503: "overloaded"}


def tgi_error(message: str, status: int) -> dict[str, str]:
    """TGI's error body (`error_type` drives `text_generation`'s exception class)."""
    return {"error": message, "error_type": TGI_ERROR_TYPES.get(status, "generation")}


def tgi_token(token_id: int, text: str, logprob: float | None, special: bool) -> dict[str, Any]:
    """A TGI token record."""
    return {"id": token_id, "text": text, "logprob": logprob, "special": special}


def tgi_details(finish: str, tokens: list[dict], seed: int | None, prompt: list[dict] | None = None) -> dict:
    """TGI's `details` of a finished generation."""
    return {"finish_reason": TGI_FINISH.get(finish, finish), "generated_tokens": len(tokens), "seed": seed,
            "prefill": prompt or [], "tokens": tokens, "top_tokens": None, "best_of_sequences": None}


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (non-ASCII kept, like nanochat)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
