"""The legacy /v1/completions: raw text (or token ids) in, text out, one job per prompt of a batch; FIM with a
`suffix`, and the prompt's own log-probs with `echo` (what lm-eval's loglikelihood tasks read)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request

from sputnik.serve.backend import EngineBackend, Job
from sputnik.serve.fim import fim_prompt
from sputnik.serve.keys import KeyRecord
from sputnik.serve.protocol import APIError, CompletionRequest, Limits, sampling_params
from sputnik.serve import sse
from sputnik.serve.server import Backend, Server, event_stream, upstream_body, usage


@dataclass
class Prompt:
    """One prompt of a completion request: its token ids (engine), its text, and what echo puts before the
    output."""

    ids: list[int] | None
    text: str
    echo: str = ""


def prompts_of(b: Backend, body: CompletionRequest) -> list[Prompt]:
    """The request's prompts (text or token ids, one or a batch), tokenized for the engine; with a suffix, each is
    the FIM prompt around it."""
    p = body.prompt
    raw = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    engine = isinstance(b, EngineBackend)
    if body.suffix is not None and any(not isinstance(r, str) for r in raw):
        raise APIError(400, "suffix (fill-in-the-middle) needs a text prompt, not token ids", param="prompt")
    out = []
    for r in raw:
        if not engine:
            if not isinstance(r, str):
                raise APIError(400, "this server forwards to an upstream: send the prompt as text", param="prompt")
            out.append(Prompt(None, r, r if body.echo else ""))
            continue
        tok = b.tokenizer
        if isinstance(r, str):
            text = fim_prompt(tok, r, body.suffix) if body.suffix is not None else r
            ids = tok.encode(text, add_special_tokens=True)
        else:
            bad = [t for t in r if t >= tok.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside this model's vocabulary of {tok.vocab_size}",
                               param="prompt")
            ids, text = list(r), tok.decode(r)
        out.append(Prompt(ids, text, (r if isinstance(r, str) else text) if body.echo else ""))
    return out


def completion_jobs(b: Backend, body: CompletionRequest, prompts: list[Prompt], limits: Limits,
                    model: str) -> list[Job]:
    jobs = []
    for p in prompts:
        if p.ids is not None:
            params = sampling_params(body, limits, len(p.ids), b.context)
            params.logprobs = body.logprobs or 0
            jobs.append(Job(p.ids, params, params.n, logprobs=body.logprobs is not None, prompt_tokens=len(p.ids)))
        else:
            params = sampling_params(body, limits, 0, b.context)
            jobs.append(Job(p.text, params, params.n, upstream_body=upstream_body(body, model, prompt=p.text)))
    return jobs


def completions_router(server: Server, prefix: str = "/v1") -> APIRouter:
    router = APIRouter()

    @router.post(f"{prefix}/completions")
    async def completions(body: CompletionRequest, request: Request, _: KeyRecord | None = Depends(server.authorize)):
        b = server.backend()
        name = await server.check_model(b, body.model)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        prompts = prompts_of(b, body)
        if body.max_tokens == 0:
            return await _scored_only(b, body, prompts, head)
        jobs = completion_jobs(b, body, prompts, server.limits, name)
        scored = await _prompt_logprobs(b, body, prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(_stream(server, b, jobs, request, body, head, prompts, scored, include_usage))
        return await _whole(server, b, jobs, request, body, head, prompts, scored)

    if prefix == "/v1":
        router.add_api_route("/completions", completions, methods=["POST"], include_in_schema=False)
    return router


async def _prompt_logprobs(b: Backend, body: CompletionRequest, prompts: list[Prompt]) -> list[list[dict]]:
    """With echo and logprobs: each prompt's tokens with their log-probs (the first has none), else nothing."""
    if not (body.echo and body.logprobs is not None):
        return [[] for _ in prompts]
    if not isinstance(b, EngineBackend):
        raise APIError(400, "echo with logprobs needs the embedded engine (this server forwards to an upstream)",
                       param="echo")
    return [await asyncio.to_thread(b.score, p.ids, body.logprobs) for p in prompts]


async def _scored_only(b: Backend, body: CompletionRequest, prompts: list[Prompt], head: dict) -> dict:
    """max_tokens 0: nothing generated, the prompt echoed (and scored) alone, as vLLM does for lm-eval."""
    if not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: it needs echo (to score the prompt)",
                       param="max_tokens")
    if body.stream:
        raise APIError(400, "max_tokens 0 cannot stream", param="stream")
    scored = await _prompt_logprobs(b, body, prompts)
    choices = [{"index": i * body.n + j, "text": p.echo, "logprobs": _legacy_logprobs(scored[i], body.logprobs),
                "finish_reason": "length"} for i, p in enumerate(prompts) for j in range(body.n)]
    n_prompt = sum(len(p.ids or []) for p in prompts)
    return {**head, "choices": choices, "usage": usage(n_prompt, 0, 0)}


async def _whole(server: Server, b: Backend, jobs: list[Job], request: Request, body: CompletionRequest, head: dict,
                 prompts: list[Prompt], scored: list[list[dict]]) -> dict:
    n = jobs[0].params.n
    out = [""] * (len(jobs) * n)
    logprobs: list[list[dict]] = [list(scored[i // n]) for i in range(len(out))]
    finish: list[str | None] = [None] * len(out)
    tokens = 0
    async for piece in server.pieces(b, jobs, request, stream=False):
        if piece is None:
            continue
        tokens += piece.tokens
        out[piece.index] += piece.text
        logprobs[piece.index] += piece.logprobs or []
        finish[piece.index] = piece.finish_reason or finish[piece.index]
    choices = [{"index": i, "text": prompts[i // n].echo + out[i],
                "logprobs": _legacy_logprobs(logprobs[i], body.logprobs), "finish_reason": finish[i]}
               for i in range(len(out))]
    done = usage(sum(j.prompt_tokens for j in jobs), max(tokens, sum(j.completion_tokens for j in jobs)), 0,
                 sum(j.cached_tokens for j in jobs))
    return {**head, "choices": choices, "usage": done}


async def _stream(server: Server, b: Backend, jobs: list[Job], request: Request, body: CompletionRequest, head: dict,
                  prompts: list[Prompt], scored: list[list[dict]], include_usage: bool) -> AsyncIterator[bytes]:
    n = jobs[0].params.n
    sent = set()
    tokens = 0
    try:
        async for piece in server.pieces(b, jobs, request, stream=True):
            if piece is None:
                yield sse.KEEP_ALIVE
                continue
            tokens += piece.tokens
            text, entries = piece.text, piece.logprobs
            if piece.index not in sent:  # the echoed prompt (and its log-probs) go before a choice's first text
                sent.add(piece.index)
                text = prompts[piece.index // n].echo + text
                entries = scored[piece.index // n] + (entries or [])
            if text or piece.finish_reason:
                yield sse.event({**head, "choices": [{"index": piece.index, "text": text,
                                                "logprobs": _legacy_logprobs(entries, body.logprobs),
                                                "finish_reason": piece.finish_reason}]})
        if include_usage:
            prompt_tokens = sum(j.prompt_tokens for j in jobs)
            done = max(tokens, sum(j.completion_tokens for j in jobs))
            yield sse.event({**head, "choices": [], "usage": usage(prompt_tokens, done, 0,
                                                                   sum(j.cached_tokens for j in jobs))})
    except APIError as e:
        yield sse.event(e.body())
    yield sse.DONE


def _legacy_logprobs(entries: list[dict] | None, wanted: int | None) -> dict | None:
    """The legacy API's logprobs object; a prompt's first token has no log-prob (null) and no alternatives."""
    if wanted is None or entries is None:
        return None
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top_logprobs"] is None else {t["token"]: t["logprob"]
                                                                      for t in e["top_logprobs"]} for e in entries]}
