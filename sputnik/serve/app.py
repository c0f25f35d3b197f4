"""`sputnik serve`: the DeepSeek/OpenAI-compatible HTTP API in front of the engine (or an upstream server)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sputnik.device import pick_device, pick_dtype
from sputnik.serve.backend import EngineBackend, Job, Piece, UpstreamBackend
from sputnik.serve.config import ServeConfig
from sputnik.serve.keys import KeyRecord, KeyStore, RateLimiter
from sputnik.serve.metrics import Metrics
from sputnik.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, parse_request,
                                    prompt_messages, sampling_params)
from sputnik.serve.reasoning import ReasoningSplitter

Backend = EngineBackend | UpstreamBackend


def load_backend(cfg: ServeConfig) -> Backend:
    if cfg.upstream:
        return UpstreamBackend(cfg.upstream, cfg.upstream_key, cfg.served_name, cfg.max_queue)
    from sputnik.checkpoint import load_pretrained
    from sputnik.engine import Engine

    device = pick_device(cfg.device)
    model, tok = load_pretrained(cfg.model, dtype=pick_dtype(cfg.dtype, device), device=device)
    engine = Engine(model, tok, max_batch=cfg.max_batch, prefix_cache_mb=cfg.prefix_cache_mb, compile=cfg.compile)
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
            return await _too_large(self.max_bytes)(scope, receive, send)
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
            await _too_large(self.max_bytes)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(APIError(413, f"request body is larger than {limit} bytes").body(), status_code=413)


def _error(e: APIError, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class _Retry(APIError):
    def __init__(self, status: int, message: str, retry_after: float, type: str, code: str):
        super().__init__(status, message, type=type, code=code)
        self.retry_after = retry_after


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def create_app(cfg: ServeConfig | None = None, loader: Callable[[ServeConfig], Backend] = load_backend) -> FastAPI:
    """The app; the backend loads on a thread at startup, and /health answers 503 until it is ready."""
    cfg = cfg or ServeConfig()
    state: dict[str, Any] = {"backend": None, "error": None}
    metrics = Metrics()
    keys = KeyStore(cfg.keys_path) if cfg.auth else None
    limiter = RateLimiter(cfg.rate_per_minute)

    def load() -> None:
        try:
            backend = loader(cfg)
            if isinstance(backend, EngineBackend):
                eng = backend.engine
                metrics.watch(lambda: eng.num_running, lambda: eng.num_waiting, lambda: eng.num_cache_rows)
            state["backend"] = backend
        except Exception as e:  # noqa: BLE001 — /health reports it; the process stays up to say why
            state["error"] = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = threading.Thread(target=load, name="sputnik-load", daemon=True)
        loading.start()
        yield
        loading.join(timeout=60)
        if state["backend"] is not None:
            state["backend"].close()

    app = FastAPI(title="sputnik", version="0.1.0", lifespan=lifespan,
                  description="DeepSeek/OpenAI-compatible chat and completions")
    app.state.metrics, app.state.serve = metrics, state
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e, getattr(e, "retry_after", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        # One validation path: re-run ours on the raw body for an OpenAI-style message naming the parameter.
        model = ChatCompletionRequest if request.url.path.endswith("chat/completions") else CompletionRequest
        try:
            parse_request(model, e.body)
        except APIError as err:
            return _error(err)
        raw = (await request.body()).decode(errors="replace")[:200]
        return _error(APIError(400, f"request body is not valid JSON: {raw!r}"))

    def backend() -> Backend:
        if state["backend"] is None:
            if state["error"]:
                raise APIError(503, f"the model failed to load: {state['error']}", type="server_error")
            raise _Retry(503, "the model is loading", 5, "server_busy", "loading")
        return state["backend"]

    def authorize(request: Request) -> KeyRecord | None:
        record = None
        if keys is not None:
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            record = keys.verify(token) if token else None
            if record is None:
                raise APIError(401, "invalid or missing API key: send `Authorization: Bearer sk-…`",
                               type="authentication_error", code="invalid_api_key")
        who = f"key:{record.id}" if record else f"ip:{request.client.host if request.client else '?'}"
        wait = limiter.check(who)
        if wait > 0:
            raise _Retry(429, f"rate limit of {cfg.rate_per_minute:g} requests per minute reached", wait,
                         "rate_limit_error", "rate_limit_exceeded")
        return record

    @app.get("/health")
    async def health():
        if state["backend"] is not None:
            return {"status": "ok"}
        status = "error" if state["error"] else "loading"
        return JSONResponse({"status": status, "error": state["error"]}, status_code=503)

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def served_names(b: Backend) -> list[str]:
        if isinstance(b, UpstreamBackend):
            return [b.name] if b.name else await b.model_names()
        return [b.name]

    @app.get("/v1/models")
    async def models(_: KeyRecord | None = Depends(authorize)):
        b = backend()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "sputnik"}
                                           for n in await served_names(b)]}

    async def check_model(b: Backend, name: str | None) -> str:
        names = await served_names(b)
        if name is None or name in names:
            return name or names[0]
        raise APIError(404, f"model {name!r} does not exist here; this server has: {', '.join(names)}",
                       param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions", include_in_schema=False)
    async def chat(body: ChatCompletionRequest, request: Request, _: KeyRecord | None = Depends(authorize)):
        b = backend()
        name = await check_model(b, body.model)
        messages = prompt_messages(body.messages)
        prompt, n_prompt, in_reasoning = chat_prompt(b, messages)
        params = sampling_params(body, cfg.limits, n_prompt, b.context)
        params.logprobs = body.top_logprobs or 0
        job = Job(prompt, params, params.n, logprobs=body.logprobs, prompt_tokens=n_prompt)
        if isinstance(b, UpstreamBackend):
            job.upstream_body = _upstream_body(body, name, messages=messages)
        json_mode = body.response_format is not None and body.response_format.type == "json_object"
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        splitters = [ReasoningSplitter(in_reasoning) for _ in range(params.n)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(_chat_stream(b, [job], request, rid, created, name, splitters, include_usage, json_mode))
        return await _chat_whole(b, job, request, rid, created, name, splitters, json_mode)

    async def _chat_whole(b, job, request, rid, created, name, splitters, json_mode):
        n = len(splitters)
        logprobs: list[list[dict]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        thoughts, contents = [""] * n, [""] * n
        reasoning_tokens, tokens = 0, 0
        async for piece in pieces(b, [job], request, cfg.keepalive_s, metrics, stream=False):
            if piece is None:
                continue
            thought, text, thinking = _split(splitters[piece.index], piece)
            reasoning_tokens += thinking
            tokens += piece.tokens
            thoughts[piece.index] += thought
            contents[piece.index] += text
            logprobs[piece.index] += piece.logprobs or []
            if piece.finish_reason:
                finish[piece.index] = piece.finish_reason
        choices = []
        for i, sp in enumerate(splitters):
            if json_mode:
                _require_json(contents[i])
            message = {"role": "assistant", "content": contents[i]}
            if sp.had_reasoning:
                message["reasoning_content"] = thoughts[i]
            choices.append({"index": i, "message": message, "logprobs": {"content": logprobs[i]} if job.logprobs
                            else None, "finish_reason": finish[i]})
        usage = _usage(job.prompt_tokens, max(tokens, job.completion_tokens), reasoning_tokens)
        return {"id": rid, "object": "chat.completion", "created": created, "model": name, "choices": choices,
                "usage": usage, "system_fingerprint": "sputnik"}

    async def _chat_stream(b, jobs, request, rid, created, name, splitters, include_usage, json_mode):
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                "system_fingerprint": "sputnik"}
        job = jobs[0]
        content_so_far = [""] * len(splitters)
        for i in range(len(splitters)):
            yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        reasoning_tokens, tokens = 0, 0
        try:
            async for piece in pieces(b, jobs, request, cfg.keepalive_s, metrics, stream=True):
                if piece is None:
                    yield b": keep-alive\n\n"
                    continue
                thought, text, thinking = _split(splitters[piece.index], piece)
                reasoning_tokens += thinking
                tokens += piece.tokens
                content_so_far[piece.index] += text
                if piece.finish_reason and json_mode:
                    _require_json(content_so_far[piece.index])
                delta: dict[str, Any] = {}
                if thought:
                    delta["reasoning_content"] = thought
                if text:
                    delta["content"] = text
                if delta or piece.finish_reason or piece.logprobs:
                    yield _sse({**head, "choices": [{
                        "index": piece.index, "delta": delta,
                        "logprobs": {"content": piece.logprobs} if piece.logprobs else None,
                        "finish_reason": piece.finish_reason}]})
            if include_usage:
                usage = _usage(job.prompt_tokens, max(tokens, job.completion_tokens), reasoning_tokens)
                yield _sse({**head, "choices": [], "usage": usage})
        except APIError as e:  # the 200 is already out: the error travels inside the stream
            yield _sse(e.body())
        yield b"data: [DONE]\n\n"

    @app.post("/v1/completions")
    @app.post("/completions", include_in_schema=False)
    async def completions(body: CompletionRequest, request: Request, _: KeyRecord | None = Depends(authorize)):
        b = backend()
        name = await check_model(b, body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        jobs = []
        for text in texts:
            if isinstance(b, EngineBackend):
                ids = b.tokenizer.encode(text, add_special_tokens=True)
                params = sampling_params(body, cfg.limits, len(ids), b.context)
                params.logprobs = body.logprobs or 0
                jobs.append(Job(ids, params, params.n, logprobs=body.logprobs is not None, prompt_tokens=len(ids)))
            else:
                params = sampling_params(body, cfg.limits, 0, b.context)
                jobs.append(Job(text, params, params.n, upstream_body=_upstream_body(body, name, prompt=text)))
        n = jobs[0].params.n
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": name}
        echo = [t if body.echo else "" for t in texts]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                sent = set()
                tokens = 0
                try:
                    async for piece in pieces(b, jobs, request, cfg.keepalive_s, metrics, stream=True):
                        if piece is None:
                            yield b": keep-alive\n\n"
                            continue
                        tokens += piece.tokens
                        text = piece.text
                        if piece.index not in sent:
                            sent.add(piece.index)
                            text = echo[piece.index // n] + text
                        if text or piece.finish_reason:
                            yield _sse({**head, "choices": [{"index": piece.index, "text": text,
                                                             "logprobs": _legacy_logprobs(piece.logprobs, body.logprobs),
                                                             "finish_reason": piece.finish_reason}]})
                    if include_usage:
                        prompt_tokens = sum(j.prompt_tokens for j in jobs)
                        done = max(tokens, sum(j.completion_tokens for j in jobs))
                        yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, done, 0)})
                except APIError as e:
                    yield _sse(e.body())
                yield b"data: [DONE]\n\n"

            return _stream(events())
        out = [""] * (len(jobs) * n)
        logprobs: list[list[dict]] = [[] for _ in out]
        finish: list[str | None] = [None] * len(out)
        tokens = 0
        async for piece in pieces(b, jobs, request, cfg.keepalive_s, metrics, stream=False):
            if piece is None:
                continue
            tokens += piece.tokens
            out[piece.index] += piece.text
            logprobs[piece.index] += piece.logprobs or []
            finish[piece.index] = piece.finish_reason or finish[piece.index]
        choices = [{"index": i, "text": echo[i // n] + out[i],
                    "logprobs": _legacy_logprobs(logprobs[i], body.logprobs), "finish_reason": finish[i]}
                   for i in range(len(out))]
        usage = _usage(sum(j.prompt_tokens for j in jobs), max(tokens, sum(j.completion_tokens for j in jobs)), 0)
        return {**head, "choices": choices, "usage": usage}

    if cfg.web:
        _add_web(app, cfg, backend, served_names, metrics)
    return app


def _add_web(app: FastAPI, cfg: ServeConfig, backend, served_names, metrics: Metrics) -> None:
    from fastapi.staticfiles import StaticFiles

    from sputnik.web.auth import Auth
    from sputnik.web.chat import Hooks, chat_router
    from sputnik.web.db import Database, database_url
    from sputnik.web.oidc import providers_from_env
    from sputnik.web.page import STATIC, page_router
    from sputnik.web.routes import web_router

    db = Database(cfg.database_url or database_url())
    db.migrate()
    auth = Auth(db)
    providers = cfg.oidc if cfg.oidc is not None else providers_from_env()
    hooks = Hooks(backend, served_names, pieces, chat_prompt, metrics, cfg.keepalive_s, cfg.limits.max_prompt_tokens)
    app.include_router(web_router(db, providers, auth=auth, public_url=cfg.public_url))
    app.include_router(chat_router(db, hooks, auth.current_user, auth.require_csrf))
    app.include_router(page_router())
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.db = db


def chat_prompt(b: Backend, messages: list[dict], thinking: bool = True) -> tuple[Any, int, bool]:
    """(what the backend takes, its prompt tokens, whether the output starts inside a thought) for chat messages.

    The engine renders the model's template; R1's opens `<think>` in the prompt, and thinking=False closes it at
    once so the model answers directly. An upstream server renders its own template."""
    if not isinstance(b, EngineBackend):
        return messages, 0, False
    try:
        text = b.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 — a template that refuses these messages is the client's 400
        raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from e
    in_reasoning = text.rstrip().endswith("<think>")
    if in_reasoning and not thinking:
        text, in_reasoning = text + "\n</think>\n\n", False
    ids = b.tokenizer.encode(text, add_special_tokens=False)
    return ids, len(ids), in_reasoning


def _stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def pieces(b: Backend, jobs: list[Job], request: Request, keepalive_s: float, metrics: Metrics,
                  stream: bool) -> AsyncIterator[Piece | None]:
    """Every job's pieces in arrival order (choice indices offset per job), None when keepalive_s passes quietly.
    Leaving early cancels the jobs, which frees their rows in the engine at once."""
    queue: asyncio.Queue = asyncio.Queue()
    start = time.monotonic()
    last: dict[int, float] = {}

    async def pump(job: Job, offset: int) -> None:
        try:
            async for piece in b.run(job):
                piece.index += offset
                await queue.put(piece)
        except APIError as e:
            await queue.put(e)
        finally:
            await queue.put(job)

    tasks = []
    offset = 0
    for job in jobs:
        tasks.append(asyncio.create_task(pump(job, offset)))
        offset += job.choices
    live, outcome = len(jobs), "error"
    try:
        while live:
            try:
                item = await asyncio.wait_for(queue.get(), keepalive_s if stream else 0.5)
            except asyncio.TimeoutError:
                if not stream and await request.is_disconnected():
                    outcome = "cancelled"
                    return
                if stream:
                    yield None
                continue
            if isinstance(item, Job):
                live -= 1
                continue
            if isinstance(item, APIError):
                raise item
            now = time.monotonic()
            if item.queue_s is not None:
                metrics.queue.observe(item.queue_s)
            if item.index in last:
                metrics.itl.observe(now - last[item.index])
            elif item.tokens or item.text:
                metrics.ttft.observe(now - start)
            last[item.index] = now
            metrics.generation_tokens.inc(item.tokens)
            yield item
        outcome = "ok"
        metrics.prompt_tokens.inc(sum(j.prompt_tokens for j in jobs))
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "cancelled"
        raise
    finally:
        for t in tasks:
            t.cancel()
        metrics.requests.labels(outcome).inc()
        metrics.e2e.observe(time.monotonic() - start)


def _split(sp: ReasoningSplitter, piece: Piece) -> tuple[str, str, int]:
    """(reasoning, content, reasoning tokens) of one piece: its tokens count as thinking when the splitter was in the
    thought before or after it (the tags themselves included)."""
    before = sp.in_reasoning
    thought, text = sp.push(piece.text)
    thinking = piece.tokens if before or sp.in_reasoning else 0
    if piece.finish_reason:
        t2, c2 = sp.finish()
        thought, text = thought + t2, text + c2
    return thought, text, thinking


def _require_json(content: str) -> None:
    try:
        json.loads(content)
    except ValueError as e:
        raise APIError(422, f"response_format json_object: the model's output is not valid JSON ({e}); "
                            "ask for JSON in the prompt, or retry", type="invalid_response_error",
                       param="response_format", code="invalid_json_output") from e


def _usage(prompt: int, completion: int, reasoning: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def _legacy_logprobs(entries: list[dict] | None, wanted: int | None) -> dict | None:
    if wanted is None or entries is None:
        return None
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}


def _upstream_body(body: ChatCompletionRequest | CompletionRequest, model: str, **fields: Any) -> dict:
    sent = body.model_dump(exclude_none=True, exclude={"messages", "prompt", "stream", "stream_options", "model",
                                                        "user"})
    return {"model": model, **sent, **fields}
