"""`sputnik serve`: the DeepSeek/OpenAI-compatible HTTP API in front of the engine (or an upstream server)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from sputnik.serve.anthropic import anthropic_error, anthropic_router
from sputnik.serve.backend import EngineBackend, UpstreamBackend
from sputnik.serve.beta import beta_router
from sputnik.serve.chat import chat_router
from sputnik.serve.completions import completions_router
from sputnik.serve.config import ServeConfig
from sputnik.serve.keys import KeyStore, RateLimiter
from sputnik.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from sputnik.serve.server import Backend, Server, error_response
from sputnik.serve.status import status_router
from sputnik.serve.tokens import DetokenizeRequest, TokenizeRequest, tokens_router


def load_backend(cfg: ServeConfig) -> Backend:
    if cfg.upstream:
        return UpstreamBackend(cfg.upstream, cfg.upstream_key, cfg.served_name, cfg.max_queue)
    from sputnik.engine import Engine

    model, tok = cfg.load()
    engine = Engine(model, tok, max_batch=cfg.max_batch, prefix_cache_mb=cfg.prefix_cache_mb, compile=cfg.compile,
                    kv_dtype=cfg.cache_dtype(model, cfg.compile))
    if cfg.compile:
        engine.warm_up()  # compile before /health says ready, not at the first requests
    name = cfg.served_name or Path(cfg.model.rstrip("/")).name.removesuffix(".gguf")
    return EngineBackend(engine, name, cfg.max_queue)


class _BodyLimit:
    """Refuses request bodies over a size with 413 before reading them whole (Content-Length or chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(self.max_bytes, scope["path"])(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _too_large(self.max_bytes, scope["path"])(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int, path: str) -> JSONResponse:
    return _error(path, APIError(413, f"request body is larger than {limit} bytes"))


def _error(path: str, e: APIError) -> JSONResponse:
    """The error in the shape of the API its path belongs to: Anthropic's under /anthropic, OpenAI's elsewhere."""
    return anthropic_error(e) if path == "/anthropic" or path.startswith("/anthropic/") else error_response(e)


def create_app(cfg: ServeConfig | None = None, loader: Callable[[ServeConfig], Backend] = load_backend) -> FastAPI:
    """The API alone (sputnik.web.app.build_app adds the chat page); the backend loads on a thread at startup, and
    /health answers 503 until it is ready."""
    cfg = cfg or ServeConfig()
    keys = None if cfg.no_auth else KeyStore(cfg.keys_path)
    server = Server(cfg.limits, RateLimiter(cfg.rate_limit), keys, cfg.keepalive_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = threading.Thread(target=server.load, args=(lambda: loader(cfg),), name="sputnik-load", daemon=True)
        loading.start()
        yield
        loading.join(timeout=60)
        if server.loaded is not None:
            server.loaded.close()

    app = FastAPI(title="sputnik", version="0.1.0", lifespan=lifespan,
                  description="DeepSeek/OpenAI-compatible chat and completions")
    app.state.server = server
    if cfg.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origin, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"], allow_credentials=False)
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.include_router(status_router(server))
    app.include_router(chat_router(server))
    app.include_router(completions_router(server))
    app.include_router(beta_router(server))
    app.include_router(tokens_router(server))
    app.include_router(anthropic_router(server))
    return app


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return _error(request.url.path, e)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    # Starlette's own refusals (an unknown route, a method the route does not take) in the path's API shape.
    response = _error(request.url.path, APIError(e.status_code, str(e.detail), type="invalid_request_error"))
    response.headers.update(e.headers or {})
    return response


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    # One validation path: re-run ours on the raw body for an OpenAI-style message naming the parameter.
    path = request.url.path
    model = (ChatCompletionRequest if path.endswith("chat/completions") else TokenizeRequest
             if path.endswith("/tokenize") else DetokenizeRequest if path.endswith("/detokenize") else CompletionRequest)
    try:
        parse_request(model, e.body)
    except APIError as err:
        return error_response(err)
    raw = (await request.body()).decode(errors="replace")[:200]
    return error_response(APIError(400, f"request body is not valid JSON: {raw!r}"))
