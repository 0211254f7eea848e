"""The HTTP side: FastAPI routes over an :class:`~gptlab.serving.engine.Engine`, served by uvicorn.

    GET  /                      the chat page (gptlab/assets/chat.html)
    GET  /health                status, queue and batch occupancy (no API key needed)
    GET  /v1/models             the served model
    POST /v1/completions        text in, text out (``stream: true``: server-sent events)
    POST /v1/chat/completions   messages in the model's prompt style

FastAPI and uvicorn are the ``serve`` extra (``pip install "gptlab[serve]"``); they are imported when
an app is built, so the rest of gptlab never needs them. Why FastAPI + uvicorn and not LitServe:
experiments/serve_load/README.md (measured). (No ``from __future__ import annotations`` here: FastAPI
reads the route functions' annotations, whose types are imported inside :func:`create_app`.)
"""

import asyncio
import hmac
import importlib.util
import json
import signal
import socket
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from gptlab.data.prompt_styles import get_prompt_style
from gptlab.errors import InvalidInput
from gptlab.inference import LoadedModel
from gptlab.serving.engine import Closed, Engine, QueueFull, Update
from gptlab.serving.protocol import (APIError, GenerationRequest, ModelCard, chunk_body, parse_chat,
                                     parse_completion, response_body, usage)
from gptlab.tokenizer import ASSETS

CHAT_PAGE = ASSETS / "chat.html"
SERVER_LIBRARIES = ("fastapi", "uvicorn")
INSTALL_HINT = 'pip install "gptlab[serve]"'


class ServerLibrariesMissing(InvalidInput):
    """FastAPI or uvicorn is not installed."""


def require_server_libraries() -> None:
    """Raise :class:`ServerLibrariesMissing` with the install command when the ``serve`` extra is absent."""
    missing = [m for m in SERVER_LIBRARIES if importlib.util.find_spec(m) is None]
    if missing:
        raise ServerLibrariesMissing(f"the server needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                                     f"not installed: {INSTALL_HINT}")


def create_app(engine: Engine, card: ModelCard, api_key: str | None = None, max_body_bytes: int = 1_000_000,
               retry_after: int = 1, poll_interval: float = 0.25) -> Any:
    """The FastAPI app serving ``card``'s model through ``engine`` (started and stopped with the app).

    ``api_key``: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (compared in constant
    time). ``max_body_bytes``: larger request bodies get 413. ``retry_after``: seconds a client is told
    to wait when the queue is full (429). ``poll_interval``: how often a request that does not stream
    checks whether its client is still there.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    page = CHAT_PAGE.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="gptlab-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, e: Exception) -> JSONResponse:
        return error_response(APIError(500, f"{type(e).__name__}: {e}", type="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the request body is {declared} bytes; at most {max_body_bytes}", code="too_large")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"the request body is {len(raw)} bytes; at most {max_body_bytes}", code="too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def submit(req: GenerationRequest) -> tuple[Any, asyncio.Queue[Update]]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def sink(update: Update) -> None:  # called on the engine's thread
            loop.call_soon_threadsafe(queue.put_nowait, update)
        try:
            return engine.submit(req, sink), queue
        except QueueFull:
            raise APIError(429, f"the server is busy: {engine.max_queue} requests are already waiting; retry after "
                                f"{retry_after} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry_after)}) from None
        except Closed:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None

    async def answer(request: Request, req: GenerationRequest) -> Any:
        job, queue = submit(req)
        if req.stream:
            return StreamingResponse(stream(req, job, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        k = req.choices
        texts, reasons, tokens, done = [""] * k, [""] * k, [0] * k, 0
        try:
            while done < k:
                try:
                    update = await asyncio.wait_for(queue.get(), poll_interval)
                except asyncio.TimeoutError:  # (TimeoutError itself only from Python 3.11 on)
                    if await request.is_disconnected():
                        return None  # nobody to answer; ``finally`` frees the rows
                    continue
                if update.error is not None:
                    raise update.error
                texts[update.choice] += update.text
                if update.finish_reason:
                    reasons[update.choice], tokens[update.choice] = update.finish_reason, update.tokens
                    done += 1
        finally:
            if done < k:
                engine.cancel(job)
        return response_body(req, card, texts, reasons, sum(tokens))

    async def stream(req: GenerationRequest, job: Any, queue: asyncio.Queue[Update]) -> AsyncIterator[str]:
        """Server-sent events; a client that disconnects cancels this generator, which frees its rows."""
        k, done, started, tokens = req.choices, 0, set(), 0
        try:
            while done < k:
                update = await queue.get()
                if update.error is not None:
                    yield f"data: {json.dumps(update.error.body())}\n\n"
                    break
                first = update.choice not in started
                started.add(update.choice)
                chunk = chunk_body(req, card, update.choice, update.text, update.finish_reason, first)
                if update.finish_reason:
                    done, tokens = done + 1, tokens + update.tokens
                    if done == k and not req.include_usage:  # usage in every answer: on the last chunk
                        chunk["usage"] = usage(req.prompt_tokens, tokens)
                yield f"data: {json.dumps(chunk)}\n\n"
            if done == k and req.include_usage:  # OpenAI's stream_options.include_usage form
                last = {**chunk_body(req, card, 0, None, None), "choices": [], "usage": usage(req.prompt_tokens, tokens)}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if done < k:
                engine.cancel(job)

    @app.get("/")
    async def chat_page() -> Any:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> Any:
        stats = engine.stats()
        return {"status": "ok" if stats["accepting"] else "draining", "model": card.name, **stats}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        authorize(request)
        return {"object": "list", "data": [card.listing()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> Any:
        authorize(request)
        if name != card.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {card.name!r}",
                           param="model", code="model_not_found")
        return card.listing()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request)
        return await answer(request, parse_completion(await read_json(request), card))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        return await answer(request, parse_chat(await read_json(request), card))

    return app


class Server:
    """uvicorn serving ``app`` on ``host:port`` (port 0: a free one, see :attr:`port`), bound at
    construction. :meth:`run` blocks until SIGTERM/SIGINT (or :meth:`stop`): the engine stops taking
    requests, those in flight finish (up to ``drain_timeout`` seconds), then the app shuts down."""

    def __init__(self, app: Any, engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                 drain_timeout: float = 30.0, log_level: str = "warning"):
        import uvicorn

        class DrainingServer(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                engine.close()  # new requests get 503 while the running ones finish
                super().handle_exit(sig, frame)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family)
        except OSError as e:
            raise InvalidInput(f"cannot listen on host={host} port={port}: {e.strerror or e}") from None
        self.host, self.port = host, self.socket.getsockname()[1]
        self.engine = engine
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                                access_log=log_level in ("info", "debug", "trace"))
        self.server = DrainingServer(config)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until stopped. In the main thread, SIGTERM/SIGINT end it with a drain and a normal
        return (uvicorn raises the signal again after its shutdown; the handlers set here take it, so
        the process is not killed by it after a clean stop)."""
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._signalled) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            self.server.run(sockets=[self.socket])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _signalled(self, sig: int, frame: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """What SIGTERM does, from any thread."""
        self.engine.close()
        self.server.should_exit = True


def build_server(lm: LoadedModel, name: str, prompt_style: str | None = None, host: str = "127.0.0.1",
                 port: int = 8000, api_key: str | None = None, max_batch_size: int = 16, batch_window: float = 0.01,
                 max_queue: int = 64, max_tokens: int = 256, max_body_bytes: int = 1_000_000,
                 drain_timeout: float = 30.0, seed: int = 123, log_level: str = "warning") -> Server:
    """A :class:`Server` (bound, not yet running) for a model from :func:`gptlab.inference.load_model`:
    ``name`` is what clients call it; chat messages use ``prompt_style`` (default: the one the
    model was trained with, else alpaca); see :class:`~gptlab.serving.engine.Engine` and
    :func:`create_app` for the rest."""
    require_server_libraries()
    style = get_prompt_style(prompt_style or lm.prompt_style or "alpaca")
    card = ModelCard(name, lm.model.config.context_length, style, lm.tokenizer, max_tokens, max_batch_size)
    engine = Engine(lm.model, lm.tokenizer, lm.tokenizer.eot_token, max_batch_size, batch_window, max_queue, seed, lm.autocast)
    app = create_app(engine, card, api_key, max_body_bytes)
    return Server(app, engine, host, port, drain_timeout, log_level)


__all__ = ["create_app", "build_server", "Server", "require_server_libraries", "ServerLibrariesMissing", "INSTALL_HINT", "CHAT_PAGE"]
