"""Where a served request's text comes from: the embedded engine (on its own thread) or an upstream
OpenAI-compatible server such as a vLLM cluster. Both yield the same Pieces, so the API in front is one."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sputnik.engine import Engine, SamplingParams
from sputnik.r1 import join_deltas
from sputnik.serve import sse
from sputnik.serve.protocol import APIError
from sputnik.tools.parser import HermesWriter


@dataclass
class Piece:
    """Raw output for one choice: text as the model wrote it (`<think>` tags included), and what it cost."""

    index: int
    text: str
    tokens: int = 0  # completion tokens this piece accounts for
    logprobs: list[dict] | None = None  # OpenAI-style entries: token, logprob, bytes, top_logprobs
    finish_reason: str | None = None
    queue_s: float | None = None  # set on a choice's first piece: seconds the request waited for a slot


@dataclass
class Job:
    """One request on its way through a backend."""

    prompt: list[int] | str | list[dict]  # token ids (engine), or a prompt / messages (upstream)
    params: SamplingParams
    choices: int  # pieces with a finish_reason to expect
    logprobs: bool = False  # report each token's log-prob (and params.logprobs alternatives)
    prompt_tokens: int = 0  # known up front for the engine, from the upstream's usage otherwise
    completion_tokens: int = 0  # from the upstream's usage (the engine counts Piece.tokens)
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied (the engine's, or the upstream's usage)
    upstream_body: dict[str, Any] = field(default_factory=dict)


class EngineBackend:
    """Runs the engine's step loop on a thread; requests join and leave the running batch at any step."""

    def __init__(self, engine: Engine, name: str, max_queue: int = 64):
        self.engine, self.name, self.max_queue = engine, name, max_queue
        self.tokenizer = engine.tokenizer
        self.context = engine.model.cfg.max_seq_len
        self._keys = itertools.count()
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="sputnik-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self.engine.num_waiting

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step(emit=self._dispatch)
            except Exception as e:  # noqa: BLE001 — every waiting client must hear of it, then the loop goes on
                for loop, q in list(self._queues.values()):
                    loop.call_soon_threadsafe(q.put_nowait, e)
                self._reset()

    def _dispatch(self, deltas) -> None:
        # One wake-up of each event loop per engine phase, not one per token: at 16 streams that is 16× fewer
        # cross-thread calls competing with the engine for the GIL.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for d in deltas:
            target = self._queues.get(d.prompt)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], d))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _reset(self) -> None:
        for key in list(self._queues):
            self.engine.abort(key)
        self.engine.step()  # drains the aborts, freeing every row

    async def run(self, job: Job) -> AsyncIterator[Piece]:
        """Pieces of this job as the engine makes them; leaving early (a disconnect) aborts it at once."""
        if self.engine.num_waiting >= self.max_queue:
            raise APIError(503, "the server is busy: too many queued requests", type="server_busy",
                           code="queue_full")
        key = next(self._keys)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[key] = (asyncio.get_running_loop(), queue)
        seqs = self.engine.add(key, job.prompt, job.params)
        self._wake.set()
        started = time.monotonic()
        first = [True] * job.params.n
        finished = 0
        try:
            while finished < job.choices:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise APIError(500, f"generation failed: {item}", type="server_error") from item
                d = item
                logprobs = [self._entry(d.token_id, d.logprob, d.top_logprobs)] if job.logprobs else None
                piece = Piece(d.sample, d.text, 1, logprobs, d.finish_reason)
                if first[d.sample]:
                    first[d.sample] = False
                    piece.queue_s = max(0.0, seqs[d.sample].admitted_at - started)
                    job.cached_tokens = seqs[d.sample].cached_tokens
                if d.finish_reason is not None:
                    finished += 1
                yield piece
        finally:
            del self._queues[key]
            if finished < job.choices:
                self.engine.abort(key)
                self._wake.set()

    def score(self, ids: list[int], top: int) -> list[dict]:
        """The prompt's tokens as log-prob entries (the first has none: nothing precedes it), for echo. Runs the model
        on the caller's thread, beside the engine's, through the one per-token log-prob path."""
        from sputnik.train.logprobs import scored_logprobs

        with torch.inference_mode():
            logps, alts = scored_logprobs(self.engine.model, ids, top)
        first = self.tokenizer.decode([ids[0]])
        entries = [{"token": first, "logprob": None, "bytes": list(first.encode()), "top_logprobs": None}]
        for i, t in enumerate(ids[1:]):
            entries.append(self._entry(t, logps[i], alts[i] if top else []))
        return entries

    def _entry(self, token_id: int, logprob: float, top) -> dict:
        tok = self.tokenizer.decode([token_id]) if self.tokenizer else str(token_id)
        return {"token": tok, "logprob": _finite(logprob), "bytes": list(tok.encode()),
                "top_logprobs": [{"token": (t := self.tokenizer.decode([i])), "logprob": _finite(lp),
                                  "bytes": list(t.encode())} for i, lp in (top or [])]}


def _finite(logprob: float) -> float:
    # JSON has no -inf: OpenAI reports impossible tokens as -9999.
    return logprob if logprob > -9999.0 else -9999.0


def _cached(u: dict) -> int:
    """Cached prompt tokens from an upstream's usage: DeepSeek's field, else OpenAI's."""
    details = u.get("prompt_tokens_details") or {}
    return int(u.get("prompt_cache_hit_tokens") or details.get("cached_tokens") or 0)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class UpstreamBackend:
    """Forwards to an OpenAI-compatible server (vLLM, another sputnik …) and turns its stream back into Pieces, so the
    reasoning split, limits and auth in front stay sputnik's."""

    def __init__(self, url: str, api_key: str | None, name: str | None = None, max_queue: int = 64,
                 timeout_s: float = 600):
        import httpx

        self.url, self.name, self.max_queue = url.rstrip("/"), name, max_queue
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10))
        self.tokenizer = None
        self.context = 1 << 30  # the upstream enforces its own context
        self._inflight = 0

    @property
    def queued(self) -> int:
        return 0

    async def model_names(self) -> list[str]:
        r = await self.client.get(f"{self.url}/models")
        r.raise_for_status()
        return [m["id"] for m in r.json()["data"]]

    def close(self) -> None:
        pass

    async def run(self, job: Job) -> AsyncIterator[Piece]:
        if self._inflight >= self.max_queue:
            raise APIError(503, "the server is busy: too many requests in flight", type="server_busy",
                           code="queue_full")
        body = dict(job.upstream_body, stream=True, stream_options={"include_usage": True})
        chat = "messages" in body
        in_reasoning: dict[int, bool] = {}
        calls: dict[int, HermesWriter] = {}
        self._inflight += 1
        try:
            async with self.client.stream("POST", f"{self.url}/{'chat/completions' if chat else 'completions'}",
                                          json=body) as r:
                if r.status_code != 200:
                    raw = (await r.aread()).decode(errors="replace")
                    try:
                        err = json.loads(raw)["error"]
                        message = err.get("message", raw)
                    except (ValueError, KeyError, TypeError):
                        message = raw
                    status = r.status_code if 400 <= r.status_code < 500 else 502
                    raise APIError(status, f"upstream: {message}", type="upstream_error")
                async for line in r.aiter_lines():
                    data = sse.event_data(line)
                    if data is None:
                        continue
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise APIError(502, f"upstream: {chunk['error'].get('message')}", type="upstream_error")
                    if chunk.get("usage"):
                        job.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                        job.completion_tokens = chunk["usage"].get("completion_tokens", 0)
                        job.cached_tokens = _cached(chunk["usage"])
                    for c in chunk.get("choices", []):
                        i = c.get("index", 0)
                        if chat:
                            delta = c.get("delta") or {}
                            thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
                            text = delta.get("content") or ""
                            # Re-wrap a split the upstream made, so one splitter in front handles every backend.
                            out, in_reasoning[i] = join_deltas(thought, text, in_reasoning.get(i, False))
                            writer = calls.setdefault(i, HermesWriter())
                            out += writer.push(delta.get("tool_calls") or [])
                            if c.get("finish_reason"):
                                out += writer.close()
                            logprobs = (c.get("logprobs") or {}).get("content")
                        else:
                            out, logprobs = c.get("text") or "", None
                        yield Piece(i, out, 0, logprobs, c.get("finish_reason"))
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 — a broken upstream is a 502 to our client, with the reason
            raise APIError(502, f"upstream {self.url} failed: {e}", type="upstream_error") from e
        finally:
            self._inflight -= 1
