"""The web chat's answering routes: a message in, an answer streamed out and saved as it grows."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from sputnik.engine import SamplingParams
from sputnik.r1 import TEMPERATURE, TOP_P, ReasoningSplitter
from sputnik.serve import sse
from sputnik.serve.backend import Job, UpstreamBackend
from sputnik.serve.protocol import APIError
from sputnik.web import store
from sputnik.web.auth import WebRoute
from sputnik.web.db import Database

SAVE_EVERY_S = 0.5  # how often a growing answer is written: a restart loses at most this much of it


class MessageIn(BaseModel):
    """A new user message (or an edit of one, or a request to answer again)."""

    content: str = Field("", max_length=100_000)
    model: str | None = None
    temperature: float = Field(TEMPERATURE, ge=0, le=2)
    max_tokens: int = Field(1024, ge=1, le=32768)
    thinking: bool = True
    edit_of: int | None = None
    regenerate: bool = False


@dataclass
class Hooks:
    """What the chat borrows from the API server: its backend, model names, limits and metrics."""

    backend: Callable[[], Any]
    served_names: Callable[[Any], Awaitable[list[str]]]
    pieces: Callable[..., Any]
    chat_prompt: Callable[..., tuple[Any, int, bool]]
    metrics: Any
    keepalive_s: float
    max_prompt_tokens: int


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status_code=status)


def chat_router(db: Database, hooks: Hooks, current_user: Callable, require_csrf: Callable) -> APIRouter:
    router = APIRouter(route_class=WebRoute)  # errors in the web API's shape, not the OpenAI one
    stops: dict[str, asyncio.Event] = {}  # conversation id -> its running answer's stop switch

    def run(fn, *args, **kw):
        def job():
            with db.session() as s:
                return fn(s, *args, **kw)
        return run_in_threadpool(job)

    @router.get("/api/models")
    async def models(user=Depends(current_user)):
        return {"data": [{"id": n} for n in await hooks.served_names(hooks.backend())]}

    @router.post("/api/conversations/{conversation_id}/stop", dependencies=[Depends(require_csrf)])
    async def stop(conversation_id: str, user=Depends(current_user)):
        try:
            await run(store.get_conversation, user.id, conversation_id)
        except store.NotFound:
            return _error(404, "no such conversation", "not_found")
        event = stops.get(conversation_id)
        if event is not None:
            event.set()
        return {"stopped": event is not None}

    @router.post("/api/conversations/{conversation_id}/messages", dependencies=[Depends(require_csrf)])
    async def send(conversation_id: str, body: MessageIn, request: Request, user=Depends(current_user)):
        try:
            b = hooks.backend()
        except APIError as e:
            return _error(e.status, e.message, e.code or "unavailable")
        names = await hooks.served_names(b)
        if body.model is not None and body.model not in names:
            return _error(400, f"no model {body.model!r} here", "model_not_found")
        if conversation_id in stops:
            return _error(409, "this conversation is already answering; stop it first", "busy")
        if not body.regenerate and not body.content.strip():
            return _error(400, "the message is empty", "empty_message")

        def prepare(s):
            conv = store.get_conversation(s, user.id, conversation_id)
            if body.regenerate:
                last = store.last_assistant(s, user.id, conversation_id)
                if last is not None:
                    store.delete_message(s, user.id, last.id)
                messages = store.list_messages(s, user.id, conversation_id)
                if not messages or messages[-1].role != "user":
                    raise ValueError("nothing to answer again")
                asked = messages[-1]
            elif body.edit_of is not None:
                asked = store.get_message(s, user.id, body.edit_of)
                if asked.conversation_id != conversation_id or asked.role != "user":
                    raise store.NotFound("no such user message in this conversation")
                store.update_message(s, user.id, asked.id, content=body.content)
                store.truncate_after(s, user.id, asked.id)
            else:
                asked = store.add_message(s, user.id, conversation_id, "user", body.content)
            if not conv.title:
                store.rename_conversation(s, user.id, conversation_id, asked.content.strip().splitlines()[0][:60])
            history = [{"role": m.role, "content": m.content} for m in store.list_messages(s, user.id, conversation_id)]
            answer = store.add_message(s, user.id, conversation_id, "assistant", "", finished=False)
            return asked.id, answer.id, conv.title, history

        try:
            asked_id, answer_id, title, history = await run(prepare)
        except store.NotFound as e:
            return _error(404, str(e) or "no such conversation", "not_found")
        except ValueError as e:
            return _error(400, str(e), "bad_request")
        try:
            prompt, n_prompt, in_reasoning = hooks.chat_prompt(b, history, thinking=body.thinking)
            if n_prompt > hooks.max_prompt_tokens:
                raise APIError(400, f"the conversation is {n_prompt} tokens long; the limit is "
                                    f"{hooks.max_prompt_tokens}: start a new chat", code="context_length_exceeded")
        except APIError as e:
            await run(store.delete_message, user.id, answer_id)
            return _error(e.status, e.message, e.code or "bad_request")
        context = getattr(b, "context", 1 << 30)
        params = SamplingParams(max_tokens=max(1, min(body.max_tokens, context - n_prompt)),
                                temperature=body.temperature, top_p=TOP_P if body.temperature > 0 else 1.0)
        job = Job(prompt, params, 1, prompt_tokens=n_prompt)
        if isinstance(b, UpstreamBackend):
            job.upstream_body = {"model": body.model or names[0], "messages": history,
                                 "max_tokens": params.max_tokens, "temperature": params.temperature}
        stop_event = stops[conversation_id] = asyncio.Event()

        async def events():
            splitter = ReasoningSplitter(in_reasoning)
            reasoning, content = "", ""
            started = time.monotonic()
            thought_s: float | None = None
            last_save = started
            finish = "stopped"
            yield sse.event({"type": "start", "user_message_id": asked_id, "assistant_message_id": answer_id,
                             "title": title or history[0]["content"].strip().splitlines()[0][:60]})
            try:
                async with aclosing(hooks.pieces(b, [job], request, hooks.keepalive_s, hooks.metrics, True)) as it:
                    async for piece in it:
                        if stop_event.is_set():
                            break
                        if piece is None:
                            yield sse.KEEP_ALIVE
                            continue
                        r, c = splitter.push(piece.text)
                        if piece.finish_reason:
                            r2, c2 = splitter.finish()
                            r, c = r + r2, c + c2
                        if splitter.had_reasoning and thought_s is None and (c or not splitter.in_reasoning):
                            thought_s = round(time.monotonic() - started, 1)
                        reasoning, content = reasoning + r, content + c
                        if r:
                            yield sse.event({"type": "reasoning", "text": r})
                        if c:
                            yield sse.event({"type": "content", "text": c})
                        if piece.finish_reason:
                            finish = piece.finish_reason
                        now = time.monotonic()
                        if now - last_save >= SAVE_EVERY_S:
                            last_save = now
                            await run(store.update_message, user.id, answer_id, content=content,
                                      reasoning=reasoning if splitter.had_reasoning else None)
                if splitter.had_reasoning and thought_s is None:
                    thought_s = round(time.monotonic() - started, 1)
                yield sse.event({"type": "done", "finish_reason": finish, "reasoning_seconds": thought_s})
            except APIError as e:
                finish = "error"
                yield sse.event({"type": "error", "message": e.message})
            finally:
                stops.pop(conversation_id, None)
                # Shielded: a client that hangs up cancels this generator, and the answer must still be saved.
                await asyncio.shield(run(store.update_message, user.id, answer_id, content=content,
                                         reasoning=reasoning if splitter.had_reasoning else None,
                                         reasoning_seconds=thought_s, finished=finish in ("stop", "length")))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router
