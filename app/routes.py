"""HTTP routes: thin adapters from the OpenAI, TGI and nanochat dialects to the scheduler.

Each route: parse (the request models in `app.protocol`), validate (`app.limits`, in nanochat's order),
build the prompt, `submit` to the scheduler, and stream or collect the events in its dialect. A client that
disconnects cancels its generation (the worker frees the slot before its next step); a full queue is a 429.
Errors raised here are `RequestError`/`QueueFull`; `app.server` renders them in the route's dialect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from . import limits, protocol
from .limits import RequestError
from .scheduler import Event, Generation, SamplingParams, Scheduler

logger = logging.getLogger("nanochat.server")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.2


@dataclass
class ServerSettings:
    """Server-wide settings: the served model's name and the defaults for unset sampling parameters."""

    model_id: str = "nanochat"
    temperature: float = 0.8  # nanochat's chat_web defaults
    top_k: int | None = 50
    max_tokens: int = 512
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_conversations: bool = False
    max_body_bytes: int = 1_000_000


@dataclass
class ServerState:
    scheduler: Scheduler
    settings: ServerSettings


def _state(request: Request) -> ServerState:
    return request.app.state.nanochat


# --------------------------------------------------------------------------- shared plumbing
async def _watch_disconnect(request: Request, generation: Generation) -> None:
    while not generation.done:
        if await request.is_disconnected():
            logger.info("client disconnected: cancelling generation %d", generation.id)
            generation.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _events(request: Request, generation: Generation) -> AsyncIterator[Event]:
    """The generation's events; it is cancelled when the client goes away or the consumer stops early."""
    watcher = asyncio.create_task(_watch_disconnect(request, generation))
    started = time.monotonic()
    try:
        async for event in generation:
            yield event
    finally:
        watcher.cancel()
        generation.cancel()
        state = _state(request)
        state.scheduler.metrics.duration.observe(time.monotonic() - started)
        logger.info("generation %d: %d prompt tokens, %s completion tokens, finish %s, %.2fs", generation.id,
                    generation.prompt_tokens, generation.completion_tokens, generation.finishes,
                    time.monotonic() - started)
        if state.settings.log_conversations:
            logger.info("generation %d output: %r", generation.id, generation.texts)


async def _collect(request: Request, generation: Generation) -> Generation:
    async for _ in _events(request, generation):
        pass
    if generation.errors:
        raise RuntimeError("; ".join(generation.errors))
    return generation


def _sampling_params(sampling: limits.Sampling, max_tokens: int, temperature: float | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature if temperature is None else temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed, stop=sampling.stop)


def _log_request(state: ServerState, what: str, payload) -> None:
    if state.settings.log_conversations:
        logger.info("%s: %r", what, payload)


# --------------------------------------------------------------------------- OpenAI
openai_router = APIRouter(tags=["OpenAI"])


@openai_router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The served model (OpenAI's list shape)."""
    state = _state(request)
    return {"object": "list", "data": [{
        "id": state.settings.model_id, "object": "model", "created": 0, "owned_by": "nanochat-hf",
        "max_model_len": state.scheduler.context,
    }]}


@openai_router.post("/v1/chat/completions")
async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
    """OpenAI chat completions, streamed (SSE ending with `data: [DONE]`) or not."""
    return await _chat(body, request, original_form=False)


@openai_router.post("/chat/completions")
async def chat_completions_alias(body: protocol.ChatCompletionRequest, request: Request):
    """Alias of `/v1/chat/completions`; a body without `model` and `stream` is nanochat's own request and gets
    nanochat's stream (`data: {"token", "gpu"}` ... `data: {"done": true}`)."""
    original = body.model is None and "stream" not in body.model_fields_set
    if original:
        request.state.dialect = "nanochat"  # errors in nanochat's shape too ({"detail": ...})
    return await _chat(body, request, original_form=original)


async def _chat(body: protocol.ChatCompletionRequest, request: Request, original_form: bool):
    state = _state(request)
    settings = state.settings
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    limits.check_messages(messages)
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    sampling = limits.check_sampling(
        temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        n=body.n, seed=body.seed, stop=body.stop, default_temperature=settings.temperature,
        default_top_k=settings.top_k, max_tokens_param=max_param,
    )
    if original_form and sampling.n != 1:
        raise RequestError("n must be 1 in nanochat's request form", "n")
    prompt = protocol.chat_prompt_ids(state.scheduler.tokenizer, messages)
    max_tokens = limits.token_budget(len(prompt), sampling.max_tokens, state.scheduler.context, settings.max_tokens,
                                     max_param)
    _log_request(state, "chat request", messages)
    generation = state.scheduler.submit(prompt, _sampling_params(sampling, max_tokens), sampling.n)
    if original_form:
        return StreamingResponse(_nanochat_stream(request, generation), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    rid, model = protocol.new_id("chatcmpl"), body.model or settings.model_id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chat_stream(request, generation, rid, model, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    await _collect(request, generation)
    return protocol.chat_completion(rid, model, generation.texts, generation.finishes, generation.prompt_tokens,
                                    sum(generation.completion_tokens))


async def _chat_stream(request: Request, generation: Generation, rid: str, model: str, include_usage: bool):
    created = int(time.time())
    for i in range(generation.n):
        yield protocol.sse(protocol.chat_chunk(rid, model, created, i, {"role": "assistant", "content": ""}))
    async for event in _events(request, generation):
        if event.finish == "error":
            yield protocol.sse(protocol.openai_error(event.error or "generation failed", kind="server_error"))
            break
        if event.text:
            yield protocol.sse(protocol.chat_chunk(rid, model, created, event.index, {"content": event.text}))
        if event.finish and event.finish != "cancelled":
            yield protocol.sse(protocol.chat_chunk(rid, model, created, event.index, {}, event.finish))
    if include_usage:
        yield protocol.sse(protocol.usage_chunk(rid, model, created, "chat.completion.chunk",
                                                generation.prompt_tokens, sum(generation.completion_tokens)))
    yield protocol.sse("[DONE]")


async def _nanochat_stream(request: Request, generation: Generation):
    gpu = int(getattr(generation.worker, "name", "worker-0").rsplit("-", 1)[-1])
    async for event in _events(request, generation):
        if event.finish == "error":
            yield protocol.sse({"error": event.error or "generation failed"})
            break
        if event.text:
            yield protocol.sse({"token": event.text, "gpu": gpu})
    yield protocol.sse({"done": True})


@openai_router.post("/v1/completions")
async def completions(body: protocol.CompletionRequest, request: Request):
    """OpenAI (legacy) text completions; `prompt` may be a list of strings (one choice group per prompt)."""
    state = _state(request)
    settings = state.settings
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) > limits.MAX_PROMPTS:
        raise RequestError(f"prompt must be a string or a list of 1 to {limits.MAX_PROMPTS} strings", "prompt")
    for i, text in enumerate(prompts):
        limits.check_prompt_text(text, "prompt" if isinstance(body.prompt, str) else f"prompt.{i}")
    sampling = limits.check_sampling(
        temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, max_tokens=body.max_tokens, n=body.n,
        seed=body.seed, stop=body.stop, default_temperature=settings.temperature, default_top_k=settings.top_k,
    )
    if sampling.n * len(prompts) > limits.MAX_N:
        raise RequestError(f"n x prompts must be at most {limits.MAX_N}", "n")
    tokenizer, context = state.scheduler.tokenizer, state.scheduler.context
    prompt_ids = [protocol.text_prompt_ids(tokenizer, text) for text in prompts]
    budgets = [limits.token_budget(len(ids), sampling.max_tokens, context, settings.max_tokens) for ids in prompt_ids]
    _log_request(state, "completion request", prompts)
    generations = []
    try:
        for ids, budget in zip(prompt_ids, budgets):
            generations.append(state.scheduler.submit(ids, _sampling_params(sampling, budget), sampling.n))
    except Exception:
        for generation in generations:
            generation.cancel()
        raise
    rid, model = protocol.new_id("cmpl"), body.model or settings.model_id
    echo = [text if body.echo else "" for text in prompts]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_completion_stream(request, generations, echo, rid, model, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    for generation in generations:
        await _collect(request, generation)
    texts = [e + t for generation, e in zip(generations, echo) for t in generation.texts]
    finishes = [f for generation in generations for f in generation.finishes]
    return protocol.completion(rid, model, texts, finishes, sum(g.prompt_tokens for g in generations),
                               sum(sum(g.completion_tokens) for g in generations))


async def _completion_stream(request: Request, generations: list[Generation], echo: list[str], rid: str, model: str,
                             include_usage: bool):
    created = int(time.time())
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(offset: int, generation: Generation):
        try:
            async for event in _events(request, generation):
                await queue.put((offset, event))
        finally:
            await queue.put(None)

    n = generations[0].n
    tasks = [asyncio.create_task(pump(g_i * n, g)) for g_i, g in enumerate(generations)]
    try:
        for g_i in range(len(generations)):
            for i in range(n):
                if echo[g_i]:
                    yield protocol.sse(protocol.completion_chunk(rid, model, created, g_i * n + i, echo[g_i]))
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
                continue
            offset, event = item
            if event.finish == "error":
                yield protocol.sse(protocol.openai_error(event.error or "generation failed", kind="server_error"))
                break
            if event.text or (event.finish and event.finish != "cancelled"):
                finish = event.finish if event.finish != "cancelled" else None
                yield protocol.sse(protocol.completion_chunk(rid, model, created, offset + event.index, event.text,
                                                             finish))
        if include_usage:
            yield protocol.sse(protocol.usage_chunk(rid, model, created, "text_completion",
                                                    sum(g.prompt_tokens for g in generations),
                                                    sum(sum(g.completion_tokens) for g in generations)))
        yield protocol.sse("[DONE]")
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:
            generation.cancel()


# --------------------------------------------------------------------------- TGI
tgi_router = APIRouter(tags=["TGI"])
_TGI_NEUTRAL = {  # parameters we accept only at their neutral value: name -> allowed values
    "repetition_penalty": (None, 1.0), "frequency_penalty": (None, 0.0), "typical_p": (None, 1.0),
    "best_of": (None, 1), "watermark": (None, False), "top_n_tokens": (None, 0), "grammar": (None,),
}


def _tgi_prepare(body: protocol.GenerateRequest, state: ServerState) -> tuple[list[int], SamplingParams, bool, bool]:
    params = body.parameters or protocol.GenerateParameters()
    settings = state.settings
    limits.check_prompt_text(body.inputs, "inputs")
    for name, allowed in _TGI_NEUTRAL.items():
        if getattr(params, name) not in allowed:
            raise RequestError(f"parameters.{name}={getattr(params, name)!r} is not supported by this server",
                               f"parameters.{name}")
    sampling = limits.check_sampling(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, max_tokens=params.max_new_tokens,
        seed=params.seed, stop=params.stop, default_temperature=1.0, default_top_k=None,
        max_tokens_param="max_new_tokens",
    )
    if params.truncate is not None and params.truncate < 1:
        raise RequestError(f"parameters.truncate must be a positive integer, got {params.truncate}", "parameters.truncate")
    # TGI: greedy unless do_sample or a sampling parameter is given
    sample = bool(params.do_sample) or any(v is not None for v in (params.temperature, params.top_k, params.top_p))
    prompt = protocol.text_prompt_ids(state.scheduler.tokenizer, body.inputs)
    if params.truncate is not None:
        prompt = prompt[-params.truncate:]
    max_tokens = limits.token_budget(len(prompt), sampling.max_tokens, state.scheduler.context, settings.max_tokens,
                                     "max_new_tokens")
    sp = _sampling_params(sampling, max_tokens, temperature=None if sample else 0.0)
    return prompt, sp, bool(params.details), bool(params.return_full_text)


def _tgi_token(tokenizer, event: Event, stop_ids: frozenset[int]) -> dict:
    special = event.token in stop_ids  # the only tokens that are not part of the text
    text = tokenizer.convert_ids_to_tokens(event.token) if special else event.text
    return protocol.tgi_token(event.token, text, event.logprob, special)


async def _tgi_generate(body: protocol.GenerateRequest, request: Request) -> dict:
    state = _state(request)
    prompt, params, details, full_text = _tgi_prepare(body, state)
    _log_request(state, "generate request", body.inputs)
    generation = state.scheduler.submit(prompt, params)
    tokenizer = state.scheduler.tokenizer
    stop_ids = state.scheduler.workers[0].engine.special.stop_ids
    tokens = []
    async for event in _events(request, generation):
        if event.token is not None:
            tokens.append(_tgi_token(tokenizer, event, stop_ids))
    if generation.errors:
        raise RuntimeError("; ".join(generation.errors))
    out = {"generated_text": (body.inputs if full_text else "") + generation.texts[0]}
    if details:
        params_in = body.parameters or protocol.GenerateParameters()
        prefill = ([protocol.tgi_token(t, tokenizer.convert_ids_to_tokens(t), None, False) for t in prompt]
                   if params_in.decoder_input_details else [])
        seed = generation.seeds[0] if params.temperature > 0 else None
        out["details"] = protocol.tgi_details(generation.finishes[0], tokens, seed, prefill)
    return out


async def _tgi_stream(request: Request, body: protocol.GenerateRequest):
    state = _state(request)
    prompt, params, details, full_text = _tgi_prepare(body, state)
    generation = state.scheduler.submit(prompt, params)
    tokenizer = state.scheduler.tokenizer
    stop_ids = state.scheduler.workers[0].engine.special.stop_ids
    seed = generation.seeds[0] if params.temperature > 0 else None

    async def stream():
        index = 0
        async for event in _events(request, generation):
            if event.finish == "error":
                yield protocol.sse(protocol.tgi_error(event.error or "generation failed", 500))
                return
            if event.token is None:
                continue
            index += 1
            payload = {"index": index, "token": _tgi_token(tokenizer, event, stop_ids), "top_tokens": None,
                       "generated_text": None, "details": None}
            if event.finish and event.finish != "cancelled":
                payload["generated_text"] = (body.inputs if full_text else "") + generation.texts[0]
                payload["details"] = {"finish_reason": protocol.TGI_FINISH.get(event.finish, event.finish),
                                      "generated_tokens": generation.completion_tokens[0], "seed": seed}
            yield protocol.sse(payload)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


@tgi_router.post("/generate")
async def tgi_generate(body: protocol.GenerateRequest, request: Request) -> dict:
    """TGI `/generate`: one object with `generated_text` (and `details` when asked)."""
    return await _tgi_generate(body, request)


@tgi_router.post("/generate_stream")
async def tgi_generate_stream(body: protocol.GenerateRequest, request: Request):
    """TGI `/generate_stream`: one SSE event per token; the last carries `generated_text` and `details`."""
    return await _tgi_stream(request, body)


@tgi_router.post("/")
async def tgi_root(body: protocol.GenerateRequest, request: Request):
    """TGI's root form (what `text_generation.Client` posts to): a list with one result, or a stream."""
    if body.stream:
        return await _tgi_stream(request, body)
    return [await _tgi_generate(body, request)]


@tgi_router.get("/info")
async def tgi_info(request: Request) -> dict:
    """TGI's `/info`: the model and the server's limits."""
    state = _state(request)
    scheduler = state.scheduler
    model = scheduler.workers[0].engine.model
    context = scheduler.context
    return {
        "model_id": state.settings.model_id, "model_sha": None,
        "model_dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
        "model_device_type": torch.device(scheduler.workers[0].device).type, "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": scheduler.capacity + scheduler.max_queue, "max_best_of": 1,
        "max_stop_sequences": limits.MAX_STOP_SEQUENCES, "max_input_tokens": context - 1,
        "max_input_length": context - 1, "max_total_tokens": context, "waiting_served_ratio": 0.0,
        "max_batch_total_tokens": scheduler.capacity * context, "max_waiting_tokens": 0,
        "max_batch_size": scheduler.workers[0].max_batch, "validation_workers": 1, "max_client_batch_size": 1,
        "router": "nanochat-hf", "version": "0.1.0", "sha": None, "docker_label": None,
    }


# --------------------------------------------------------------------------- operations
ops_router = APIRouter(tags=["operations"])


@ops_router.get("/health")
async def health(request: Request) -> dict:
    """Liveness/readiness (nanochat's shape)."""
    scheduler = _state(request).scheduler
    stats = scheduler.stats()
    return {"status": "ok", "ready": all(w._thread.is_alive() for w in scheduler.workers),
            "num_gpus": torch.cuda.device_count(), "available_workers": stats["available_workers"]}


@ops_router.get("/stats")
async def stats(request: Request) -> dict:
    """Workers, queue and batch occupancy."""
    return _state(request).scheduler.stats()


@ops_router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus metrics (text exposition format 0.0.4)."""
    scheduler = _state(request).scheduler
    return PlainTextResponse(scheduler.metrics.render(scheduler), media_type="text/plain; version=0.0.4")


def error_response(dialect: str, status: int, message: str, param: str | None = None) -> JSONResponse:
    """An error in the dialect's own shape: OpenAI `{"error": {...}}`, TGI `{"error", "error_type"}`,
    nanochat/FastAPI `{"detail"}`."""
    if dialect == "openai":
        kind = {401: "invalid_request_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
        if status >= 500:
            kind = "server_error"
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded", 413: "request_too_large"}.get(status)
        return JSONResponse(protocol.openai_error(message, param, kind, code), status_code=status)
    if dialect == "tgi":
        return JSONResponse(protocol.tgi_error(message, status), status_code=status)
    return JSONResponse({"detail": message}, status_code=status)
