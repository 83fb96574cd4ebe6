"""`nanochat serve FOLDER`: one process serving the OpenAI and TGI APIs, nanochat's routes and the Gradio chat UI.

    nanochat serve runs/d20/sft --port 8000                     # UI at http://127.0.0.1:8000/
    curl -N localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "nanochat", "messages": [{"role": "user", "content": "hi"}], "stream": true}'

    from openai import OpenAI;  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(...)
    from text_generation import Client;  Client("http://127.0.0.1:8000").generate("Once upon", max_new_tokens=20)
    from huggingface_hub import InferenceClient;  InferenceClient(base_url="http://127.0.0.1:8000").chat_completion(...)

Routes (see `app.routes`): `POST /v1/chat/completions`, `/v1/completions`, `GET /v1/models` (OpenAI);
`POST /generate`, `/generate_stream`, `/` and `GET /info` (TGI); `POST /chat/completions` (nanochat's own,
alias of the OpenAI route) and `GET /` (the Gradio chat UI, mounted in this process); `GET /health`,
`/stats`, `/metrics` (Prometheus).

Behind the routes: `app.scheduler` (continuous batching, one worker thread per model replica, bounded queue
-> 429), `app.limits` (nanochat's limits), `app.protocol` (wire formats). Security defaults: listen on
127.0.0.1, CORS off, no conversation text in logs, request bodies capped at 1 MB; `--api-key` (or
`NANOCHAT_API_KEY`) protects the API routes (Bearer token or `X-API-Key`, compared in constant time) and
puts the UI behind a login whose password is the key.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from .limits import RequestError
from .routes import ServerSettings, ServerState, error_response, openai_router, ops_router, tgi_router
from .scheduler import QueueFull, Scheduler

logger = logging.getLogger("nanochat.server")

API_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/chat/completions", "/generate",
             "/generate_stream", "/info", "/stats", "/metrics"}
OPEN_PATHS = {"/health"}


def dialect_of(path: str, method: str) -> str:
    """Which API a request speaks, for its error shape: "openai", "tgi" or "plain" (FastAPI's `{"detail"}`)."""
    if path.startswith("/v1/") or path == "/chat/completions":
        return "openai"
    if path in ("/generate", "/generate_stream", "/info") or (path == "/" and method == "POST"):
        return "tgi"
    return "plain"


def _is_api(path: str, method: str) -> bool:
    return path in API_PATHS or path.startswith("/v1/") or (path == "/" and method == "POST")


class _Guard:
    """ASGI middleware for the API routes: API key, body size cap (413), per-route request counts."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _is_api(scope["path"], scope["method"]):
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        dialect = dialect_of(path, method)
        route = path if path in API_PATHS or path == "/" else "other"  # bounded label set for /metrics
        status_holder = {}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        async def reply(response):
            await response(scope, receive, send_counted)

        try:
            key = self.state.settings.api_key
            if key and path not in OPEN_PATHS and not self._authorized(scope, key):
                return await reply(error_response(dialect, 401, "Incorrect or missing API key: send it as "
                                                  "'Authorization: Bearer <key>' or 'X-API-Key: <key>'"))
            if method in ("POST", "PUT", "PATCH"):
                body, too_big = await self._read_body(receive)
                if too_big:
                    limit = self.state.settings.max_body_bytes
                    return await reply(error_response(dialect, 413, f"Request body too large (limit {limit} bytes)"))
                receive = self._replay(body, receive)
            await self.app(scope, receive, send_counted)
        finally:
            self.state.scheduler.metrics.observe_request(route, status_holder.get("status", 0))

    @staticmethod
    def _authorized(scope, key: str) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), key.encode())

    async def _read_body(self, receive) -> tuple[bytes, bool]:
        limit = self.state.settings.max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"Malformed JSON body: {detail}".rstrip(": "), None
    param = ".".join(loc) or None
    if param is None and first.get("type") == "model_attributes_type":
        return "The request body must be a JSON object", None
    extra = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}{extra}", param


def _dialect(request: Request) -> str:
    return getattr(request.state, "dialect", None) or dialect_of(request.url.path, request.method)


def create_app(scheduler: Scheduler, settings: ServerSettings | None = None, ui: bool = True) -> FastAPI:
    """The FastAPI app: routes, error shapes, API-key guard, optional CORS and the mounted Gradio UI.

    The scheduler's workers are started when the app starts (lifespan) and stopped when it stops.
    """
    settings = settings or ServerSettings()
    state = ServerState(scheduler, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        logger.info("serving %s: %d worker(s), max batch %d, queue %d", settings.model_id, len(scheduler.workers),
                    scheduler.workers[0].max_batch, scheduler.max_queue)
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="nanochat-hf server", version="0.1.0", lifespan=lifespan,
                  description="OpenAI- and TGI-compatible API for NanoChat models, with continuous batching.")
    app.state.nanochat = state

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        dialect = _dialect(request)
        return error_response(dialect, {"openai": 400, "tgi": 422}.get(dialect, 422), message, param)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):  # e.g. a body that is not UTF-8, a 404
        dialect = _dialect(request)
        if dialect == "plain":
            return await http_exception_handler(request, exc)
        return error_response(dialect, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        dialect = _dialect(request)
        status = 422 if dialect == "tgi" and exc.status == 400 else exc.status
        return error_response(dialect, status, exc.message, exc.param)

    @app.exception_handler(QueueFull)
    async def on_queue_full(request: Request, exc: QueueFull):
        return error_response(_dialect(request), 429, str(exc))

    @app.exception_handler(RuntimeError)
    async def on_generation_error(request: Request, exc: RuntimeError):
        logger.error("generation failed: %s", exc)
        dialect = _dialect(request)
        return error_response(dialect, 424 if dialect == "tgi" else 500, f"generation failed: {exc}")

    app.include_router(openai_router)
    app.include_router(tgi_router)
    app.include_router(ops_router)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(_Guard, state=state)
    if ui:
        import gradio as gr

        from .gradio_app import LocalBackend, build_chat_ui

        demo = build_chat_ui(LocalBackend(scheduler), title=f"nanochat · {settings.model_id}",
                             concurrency_limit=scheduler.capacity + scheduler.max_queue,
                             temperature=settings.temperature, top_k=settings.top_k or 0,
                             max_tokens=settings.max_tokens)
        auth = None
        if settings.api_key:
            key = settings.api_key

            def auth(username: str, password: str) -> bool:
                return hmac.compare_digest(password.encode(), key.encode())

        app = gr.mount_gradio_app(app, demo, path="/", auth=auth, footer_links=["api"])
    return app


def build_parser() -> argparse.ArgumentParser:
    """The options of `nanochat serve`."""
    p = argparse.ArgumentParser(prog="nanochat serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a saved NanoChat folder (model + tokenizer), e.g. runs/d20/sft")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--workers", type=int, default=None,
                   help="model replicas, one decode loop each (default: one per GPU, 1 on CPU); requests go to the "
                        "least busy")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences decoded together per replica (continuous batching; 1 = one request at a time)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for a batch slot before requests get 429")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"),
                   help="require this key on the API (and as the UI password); default: $NANOCHAT_API_KEY, none")
    p.add_argument("--model-id", default=None, help="model name reported by the API (default: the folder's name)")
    p.add_argument("--temperature", type=float, default=0.8, help="default temperature when a request sets none")
    p.add_argument("--top-k", type=int, default=50, help="default top-k when a request sets none (0 = off)")
    p.add_argument("--max-tokens", type=int, default=512, help="default max new tokens when a request sets none")
    p.add_argument("--device", default=None, help="put every replica on this device (default: cuda:i, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--no-calculator", action="store_true", help="do not run the calculator tool")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow browser calls from this origin (repeatable); CORS is off by default")
    p.add_argument("--no-ui", action="store_true", help="do not mount the Gradio chat UI at /")
    p.add_argument("--log-conversations", action="store_true",
                   help="log prompts and replies (off by default: logs hold no conversation text)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    return p


def main(argv: list[str] | None = None) -> int:
    """`nanochat serve FOLDER`: serve until interrupted; 2 for bad options or a folder that cannot be served."""
    args = build_parser().parse_args(argv)
    import uvicorn

    from . import limits

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problems = []
    if not 0.0 <= args.temperature <= limits.MAX_TEMPERATURE:
        problems.append(f"--temperature must be in [0, {limits.MAX_TEMPERATURE}], got {args.temperature}")
    if not limits.MIN_TOP_K <= args.top_k <= limits.MAX_TOP_K:
        problems.append(f"--top-k must be in [{limits.MIN_TOP_K}, {limits.MAX_TOP_K}], got {args.top_k}")
    if not limits.MIN_MAX_TOKENS <= args.max_tokens <= limits.MAX_MAX_TOKENS:
        problems.append(f"--max-tokens must be in [1, {limits.MAX_MAX_TOKENS}], got {args.max_tokens}")
    if not 0 < args.port < 65536:
        problems.append(f"--port must be in 1..65535, got {args.port}")
    if problems:
        print("nanochat serve: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        scheduler = Scheduler.from_folder(args.folder, workers=args.workers, max_batch=args.max_batch,
                                          max_queue=args.max_queue, device=args.device, dtype=args.dtype,
                                          use_calculator=not args.no_calculator)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"nanochat serve: {e}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        model_id=args.model_id or Path(args.folder).resolve().name, temperature=args.temperature,
        top_k=args.top_k or None, max_tokens=args.max_tokens, api_key=args.api_key or None,
        cors_origins=tuple(args.cors_origin), log_conversations=args.log_conversations,
    )
    # The decode loops (worker threads) and the event loop share the GIL: a 1 ms switch interval (default 5)
    # lets the event loop hand tokens out and take new requests while a decode step runs.
    sys.setswitchinterval(0.001)
    app = create_app(scheduler, settings, ui=not args.no_ui)
    print(f"nanochat serve: http://{args.host}:{args.port}/ (UI{'' if not args.no_ui else ' off'}), "
          f"OpenAI base_url http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
