"""The legacy /v1/completions: raw text in, text out, one job per prompt of a batch."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from sputnik.serve.backend import EngineBackend, Job
from sputnik.serve.keys import KeyRecord
from sputnik.serve.protocol import APIError, CompletionRequest, Limits, sampling_params
from sputnik.serve import sse
from sputnik.serve.server import Backend, Server, event_stream, upstream_body, usage


def completion_jobs(b: Backend, body: CompletionRequest, texts: list[str], limits: Limits, model: str) -> list[Job]:
    jobs = []
    for text in texts:
        if isinstance(b, EngineBackend):
            ids = b.tokenizer.encode(text, add_special_tokens=True)
            params = sampling_params(body, limits, len(ids), b.context)
            params.logprobs = body.logprobs or 0
            jobs.append(Job(ids, params, params.n, logprobs=body.logprobs is not None, prompt_tokens=len(ids)))
        else:
            params = sampling_params(body, limits, 0, b.context)
            jobs.append(Job(text, params, params.n, upstream_body=upstream_body(body, model, prompt=text)))
    return jobs


def completions_router(server: Server) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions")
    @router.post("/completions", include_in_schema=False)
    async def completions(body: CompletionRequest, request: Request, _: KeyRecord | None = Depends(server.authorize)):
        b = server.backend()
        name = await server.check_model(b, body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        jobs = completion_jobs(b, body, texts, server.limits, name)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        echo = [t if body.echo else "" for t in texts]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(_stream(server, b, jobs, request, body, head, echo, include_usage))
        return await _whole(server, b, jobs, request, body, head, echo)

    return router


async def _whole(server: Server, b: Backend, jobs: list[Job], request: Request, body: CompletionRequest, head: dict,
                 echo: list[str]) -> dict:
    n = jobs[0].params.n
    out = [""] * (len(jobs) * n)
    logprobs: list[list[dict]] = [[] for _ in out]
    finish: list[str | None] = [None] * len(out)
    tokens = 0
    async for piece in server.pieces(b, jobs, request, stream=False):
        if piece is None:
            continue
        tokens += piece.tokens
        out[piece.index] += piece.text
        logprobs[piece.index] += piece.logprobs or []
        finish[piece.index] = piece.finish_reason or finish[piece.index]
    choices = [{"index": i, "text": echo[i // n] + out[i],
                "logprobs": _legacy_logprobs(logprobs[i], body.logprobs), "finish_reason": finish[i]}
               for i in range(len(out))]
    done = usage(sum(j.prompt_tokens for j in jobs), max(tokens, sum(j.completion_tokens for j in jobs)), 0)
    return {**head, "choices": choices, "usage": done}


async def _stream(server: Server, b: Backend, jobs: list[Job], request: Request, body: CompletionRequest, head: dict,
                  echo: list[str], include_usage: bool) -> AsyncIterator[bytes]:
    n = jobs[0].params.n
    sent = set()
    tokens = 0
    try:
        async for piece in server.pieces(b, jobs, request, stream=True):
            if piece is None:
                yield sse.KEEP_ALIVE
                continue
            tokens += piece.tokens
            text = piece.text
            if piece.index not in sent:  # the echoed prompt goes before a choice's first text
                sent.add(piece.index)
                text = echo[piece.index // n] + text
            if text or piece.finish_reason:
                yield sse.event({**head, "choices": [{"index": piece.index, "text": text,
                                                "logprobs": _legacy_logprobs(piece.logprobs, body.logprobs),
                                                "finish_reason": piece.finish_reason}]})
        if include_usage:
            prompt_tokens = sum(j.prompt_tokens for j in jobs)
            done = max(tokens, sum(j.completion_tokens for j in jobs))
            yield sse.event({**head, "choices": [], "usage": usage(prompt_tokens, done, 0)})
    except APIError as e:
        yield sse.event(e.body())
    yield sse.DONE


def _legacy_logprobs(entries: list[dict] | None, wanted: int | None) -> dict | None:
    if wanted is None or entries is None:
        return None
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}
