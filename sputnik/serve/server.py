"""What the routes of one server share: the backend once it has loaded, limits, keys, the rate limiter and metrics.

The API's routes (serve/chat.py, serve/completions.py, serve/status.py) and the web chat (sputnik.web.chat) take a
`Server`; this is serve's public face for everything that runs a request through the backend.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sputnik.serve.backend import EngineBackend, Job, Piece, UpstreamBackend
from sputnik.serve.keys import KeyRecord, KeyStore, RateLimiter
from sputnik.serve.metrics import Metrics
from sputnik.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, Limits

Backend = EngineBackend | UpstreamBackend


class RetryLater(APIError):
    """An APIError that also tells the client when to retry (a Retry-After header)."""

    def __init__(self, status: int, message: str, retry_after: float, type: str, code: str):
        super().__init__(status, message, type=type, code=code)
        self.retry_after = retry_after


def error_response(e: APIError) -> JSONResponse:
    retry_after = getattr(e, "retry_after", None)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@dataclass
class Server:
    """One app's shared state; `loaded` is None until the backend has loaded (or `error` says why it did not)."""

    limits: Limits
    limiter: RateLimiter
    keys: KeyStore | None = None  # None: no authentication (loopback only)
    keepalive_s: float = 10.0  # an SSE comment this often while a stream waits
    metrics: Metrics = field(default_factory=Metrics)
    loaded: Backend | None = None
    error: str | None = None

    def load(self, loader: Callable[[], Backend]) -> None:
        try:
            backend = loader()
            if isinstance(backend, EngineBackend):
                eng = backend.engine
                self.metrics.watch(lambda: eng.num_running, lambda: eng.num_waiting, lambda: eng.num_cache_rows)
            self.loaded = backend
        except Exception as e:  # noqa: BLE001 — /health reports it; the process stays up to say why
            self.error = f"{type(e).__name__}: {e}"

    def backend(self) -> Backend:
        """The loaded backend, else a 503 (with Retry-After while it is still loading)."""
        if self.loaded is None:
            if self.error:
                raise APIError(503, f"the model failed to load: {self.error}", type="server_error")
            raise RetryLater(503, "the model is loading", 5, "server_busy", "loading")
        return self.loaded

    def authorize(self, request: Request) -> KeyRecord | None:
        """A FastAPI dependency: the request's API key (when keys are on), then its rate limit."""
        record = None
        if self.keys is not None:
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            token = token or request.headers.get("x-api-key", "").strip()  # Anthropic's header, the same keys
            record = self.keys.verify(token) if token else None
            if record is None:
                raise APIError(401, "invalid or missing API key: send `Authorization: Bearer sk-…`",
                               type="authentication_error", code="invalid_api_key")
        who = f"key:{record.id}" if record else f"ip:{request.client.host if request.client else '?'}"
        wait = self.limiter.check(who)
        if wait > 0:
            raise RetryLater(429, f"rate limit of {self.limiter.per_minute:g} requests per minute reached", wait,
                             "rate_limit_error", "rate_limit_exceeded")
        return record

    async def served_names(self, b: Backend) -> list[str]:
        if isinstance(b, UpstreamBackend):
            return [b.name] if b.name else await b.model_names()
        return [b.name]

    async def check_model(self, b: Backend, name: str | None) -> str:
        """The model a request names (or the first served one); 404 when this server has no such model."""
        names = await self.served_names(b)
        if name is None or name in names:
            return name or names[0]
        raise APIError(404, f"model {name!r} does not exist here; this server has: {', '.join(names)}",
                       param="model", code="model_not_found")

    async def pieces(self, b: Backend, jobs: list[Job], request: Request, stream: bool) -> AsyncIterator[Piece | None]:
        """Every job's pieces in arrival order (choice indices offset per job), None when keepalive_s passes quietly.
        Leaving early cancels the jobs, which frees their rows in the engine at once."""
        queue: asyncio.Queue = asyncio.Queue()
        start = time.monotonic()
        last: dict[int, float] = {}
        tasks, offset = [], 0
        for job in jobs:
            tasks.append(asyncio.create_task(_pump(b, job, offset, queue)))
            offset += job.choices
        live, outcome = len(jobs), "error"
        try:
            while live:
                try:
                    item = await asyncio.wait_for(queue.get(), self.keepalive_s if stream else 0.5)
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
                self._observe(item, start, last)
                yield item
            outcome = "ok"
            self.metrics.prompt_tokens.inc(sum(j.prompt_tokens for j in jobs))
            self.metrics.cache_hit_tokens.inc(sum(j.cached_tokens for j in jobs))
            self.metrics.cache_miss_tokens.inc(sum(j.prompt_tokens - j.cached_tokens for j in jobs))
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            for t in tasks:
                t.cancel()
            self.metrics.requests.labels(outcome).inc()
            self.metrics.e2e.observe(time.monotonic() - start)

    def _observe(self, piece: Piece, start: float, last: dict[int, float]) -> None:
        now = time.monotonic()
        if piece.queue_s is not None:
            self.metrics.queue.observe(piece.queue_s)
        if piece.index in last:
            self.metrics.itl.observe(now - last[piece.index])
        elif piece.tokens or piece.text:
            self.metrics.ttft.observe(now - start)
        last[piece.index] = now
        self.metrics.generation_tokens.inc(piece.tokens)


async def _pump(b: Backend, job: Job, offset: int, queue: asyncio.Queue) -> None:
    # Pieces, then an APIError if one ends the job, then the job itself to say it is done.
    try:
        async for piece in b.run(job):
            piece.index += offset
            await queue.put(piece)
    except APIError as e:
        await queue.put(e)
    finally:
        await queue.put(job)


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def usage(prompt: int, completion: int, reasoning: int, cached: int = 0) -> dict:
    """OpenAI's usage with DeepSeek's context-cache fields: hit + miss = prompt tokens, hit = OpenAI's cached."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt - cached,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def upstream_body(body: ChatCompletionRequest | CompletionRequest, model: str, **fields: Any) -> dict:
    """The body to forward upstream: the request's fields that have a value, for the model the upstream serves."""
    sent = body.model_dump(exclude_none=True, by_alias=True, exclude={"messages", "prompt", "stream", "stream_options", "model",
                                                        "user"})
    return {"model": model, **sent, **fields}
