"""Request limits and validation for the server: the one place where user input is judged (spec §10.1).

nanochat's web server refuses abusive requests with HTTP 400 in a fixed order; we keep its limits and its
order, add the checks an OpenAI/TGI surface needs (top_p, n, stop, seed, prompt text) and the token budget
(prompt + max tokens must fit the model's context). Every failure is a `RequestError` that names the
offending field (`param`, in OpenAI's dotted style: `messages.3.content`) and what is allowed; the routes turn
it into each API's own error shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# nanochat's abuse limits (scripts/chat_web.py)
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 = no top-k
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4_096
# ours, for the OpenAI/TGI surface
MAX_N = 8  # completions per request
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 200
MAX_PROMPTS = 8  # /v1/completions with a list of prompts
ROLES = ("system", "user", "assistant", "tool")


class RequestError(ValueError):
    """A request the server refuses: `message` for the user, `param` naming the field, HTTP `status`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings of one request (None resolved to the server's defaults)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int | None  # None: as many as the context allows (capped by the server default)
    n: int
    seed: int | None
    stop: tuple[str, ...]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def content_text(content: Any) -> str | None:
    """The text of a message's content: a string, or OpenAI/nanochat parts (their `text` joined); None if absent."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = [part.get("text") if isinstance(part, dict) else getattr(part, "text", None) for part in content]
        return "".join(t for t in texts if isinstance(t, str))
    return None


def check_messages(messages: Sequence[dict]) -> None:
    """nanochat's message checks, in its order: count, empty content, per-message and total length, roles.

    `messages` are dicts with "role" and "content" (a string or a list of parts); types are checked by the
    request models before this runs.
    """
    if not messages:
        raise RequestError("At least one message is required", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"Too many messages: {len(messages)} (at most {MAX_MESSAGES} per request)", "messages")
    texts = []
    for i, message in enumerate(messages):
        text = content_text(message.get("content"))
        if not text and not (message.get("role") == "assistant" and message.get("tool_calls")):
            raise RequestError(f"Message {i} has empty content", f"messages.{i}.content")
        texts.append(text or "")
    for i, text in enumerate(texts):
        if len(text) > MAX_MESSAGE_CHARS:
            raise RequestError(
                f"Message {i} is too long: {len(text)} characters (at most {MAX_MESSAGE_CHARS})", f"messages.{i}.content"
            )
    total = sum(len(t) for t in texts)
    if total > MAX_TOTAL_CHARS:
        raise RequestError(
            f"The conversation is too long: {total} characters in all messages (at most {MAX_TOTAL_CHARS})", "messages"
        )
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise RequestError(
                f"Message {i} has an invalid role {message.get('role')!r}; allowed: {', '.join(ROLES)}",
                f"messages.{i}.role",
            )


def check_prompt_text(prompt: Any, param: str = "prompt") -> str:
    """A raw text prompt (completions, TGI `inputs`): a non-empty string of at most MAX_TOTAL_CHARS characters."""
    if not isinstance(prompt, str):
        raise RequestError(f"{param} must be a string, got {type(prompt).__name__}", param)
    if not prompt:
        raise RequestError(f"{param} is empty", param)
    if len(prompt) > MAX_TOTAL_CHARS:
        raise RequestError(f"{param} is too long: {len(prompt)} characters (at most {MAX_TOTAL_CHARS})", param)
    return prompt


def check_sampling(
    *,
    temperature: Any = None,
    top_k: Any = None,
    top_p: Any = None,
    max_tokens: Any = None,
    n: Any = 1,
    seed: Any = None,
    stop: Any = None,
    default_temperature: float = 0.8,
    default_top_k: int | None = 50,
    max_tokens_param: str = "max_tokens",
) -> Sampling:
    """Range checks in nanochat's order (temperature, top_k, max_tokens), then ours (top_p, n, seed, stop).

    None means "server default" for temperature and top_k and "as much as fits" for max_tokens.
    """
    if temperature is None:
        temperature = default_temperature
    if not _is_number(temperature) or not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise RequestError(
            f"temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {temperature!r}", "temperature"
        )
    if top_k is None:
        top_k = default_top_k
    if top_k is not None and (not _is_int(top_k) or not MIN_TOP_K <= top_k <= MAX_TOP_K):
        raise RequestError(f"top_k must be an integer between {MIN_TOP_K} and {MAX_TOP_K} (0 = off), got {top_k!r}",
                           "top_k")
    if max_tokens is not None and (not _is_int(max_tokens) or not MIN_MAX_TOKENS <= max_tokens <= MAX_MAX_TOKENS):
        raise RequestError(
            f"{max_tokens_param} must be an integer between {MIN_MAX_TOKENS} and {MAX_MAX_TOKENS}, got {max_tokens!r}",
            max_tokens_param,
        )
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise RequestError(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise RequestError(f"n must be an integer between 1 and {MAX_N}, got {n!r}", "n")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise RequestError(f"seed must be an integer in [0, 2**63), got {seed!r}", "seed")
    stops = check_stop(stop)
    return Sampling(float(temperature), top_k or None, None if top_p in (None, 1.0) else float(top_p), max_tokens, n,
                    seed, stops)


def check_stop(stop: Any, param: str = "stop") -> tuple[str, ...]:
    """Stop sequences: a string or a list of at most MAX_STOP_SEQUENCES non-empty strings."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"{param} must be a string or a list of strings", param)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(f"{param} has {len(stops)} sequences (at most {MAX_STOP_SEQUENCES})", param)
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"{param} sequences must have 1 to {MAX_STOP_CHARS} characters, got {s!r}", param)
    return tuple(stops)


def token_budget(prompt_tokens: int, max_tokens: int | None, context: int, default_max_tokens: int,
                 param: str = "max_tokens") -> int:
    """The number of tokens to generate: `max_tokens`, or the default capped by what fits the context.

    An explicit `max_tokens` that does not fit (prompt + max_tokens > context) is refused, like OpenAI's
    "maximum context length" error, rather than silently shortened.
    """
    room = context - prompt_tokens
    if room < 1:
        raise RequestError(
            f"The prompt is {prompt_tokens} tokens but the model's context is {context} tokens: "
            "shorten the conversation", "messages" if param == "max_tokens" else "prompt"
        )
    if max_tokens is None:
        return min(default_max_tokens, room)
    if max_tokens > room:
        raise RequestError(
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} tokens, so "
            f"{param} can be at most {room} (got {max_tokens})", param
        )
    return max_tokens
