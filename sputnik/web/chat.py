"""The web chat's answering routes: a message in, an answer streamed out and saved as it grows.

A message becomes the API's own chat request (serve.chat.chat_job), so the web chat samples with the API's defaults
and is held to the same limits (`--max-tokens-limit`, `--max-prompt-tokens`) as any API client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session as DBSession
from starlette.concurrency import run_in_threadpool

from sputnik.serve.backend import Job
from sputnik.serve.chat import chat_job, split_piece
from sputnik.serve.protocol import APIError, ChatCompletionRequest, completion_budget, parse_request
from sputnik.r1 import TEMPERATURE, ReasoningSplitter
from sputnik.serve import sse
from sputnik.serve.server import Backend, Server, event_stream
from sputnik.web import store
from sputnik.web.auth import Auth, WebError, WebRoute
from sputnik.web.db import Database

SAVE_EVERY_S = 0.5  # how often a growing answer is written: a restart loses at most this much of it


class MessageIn(BaseModel):
    """A new user message (or an edit of one, or a request to answer again)."""

    content: str = Field("", max_length=100_000)
    model: str | None = None
    temperature: float = Field(TEMPERATURE, ge=0, le=2)  # R1's; every other sampling setting is the API's default
    max_tokens: int | None = Field(None, ge=1)  # None: the server's default; over the server's limit is a 400
    thinking: bool = True
    edit_of: int | None = None
    regenerate: bool = False


@dataclass
class Turn:
    """One answer on its way: the saved question, the placeholder answer it fills, and the job that writes it."""

    user_id: int
    conversation_id: str
    asked_id: int
    answer_id: int
    title: str
    job: Job
    in_reasoning: bool
    stop: asyncio.Event


def api_request(body: MessageIn, model: str, history: list[dict]) -> ChatCompletionRequest:
    """The web's message as the API's chat request over the conversation so far."""
    return parse_request(ChatCompletionRequest, {"model": model, "messages": history, "stream": True,
                                                 "temperature": body.temperature, "max_tokens": body.max_tokens})


def web_error(e: APIError) -> WebError:
    message = e.message + ("; start a new chat" if e.code == "context_length_exceeded" else "")
    return WebError(e.status, message, e.code or "bad_request")


def prepare(s: DBSession, user_id: int, conversation_id: str, body: MessageIn) -> tuple[int, int, str, list[dict]]:
    """Saves the question (new, edited, or the last one again) and an empty unfinished answer; returns (question id,
    answer id, the conversation's title before, the history to answer). Another user's ids are NotFound."""
    conv = store.get_conversation(s, user_id, conversation_id)
    if body.regenerate:
        last = store.last_assistant(s, user_id, conversation_id)
        if last is not None:
            store.delete_message(s, user_id, last.id)
        messages = store.list_messages(s, user_id, conversation_id)
        if not messages or messages[-1].role != "user":
            raise ValueError("nothing to answer again")
        asked = messages[-1]
    elif body.edit_of is not None:
        asked = store.get_message(s, user_id, body.edit_of)
        if asked.conversation_id != conversation_id or asked.role != "user":
            raise store.NotFound("no such user message in this conversation")
        store.update_message(s, user_id, asked.id, content=body.content)
        store.truncate_after(s, user_id, asked.id)
    else:
        asked = store.add_message(s, user_id, conversation_id, "user", body.content)
    if not conv.title:
        store.rename_conversation(s, user_id, conversation_id, asked.content.strip().splitlines()[0][:60])
    history = [{"role": m.role, "content": m.content} for m in store.list_messages(s, user_id, conversation_id)]
    answer = store.add_message(s, user_id, conversation_id, "assistant", "", finished=False)
    return asked.id, answer.id, conv.title, history


class WebChat:
    """The chat's answering side over one database and one API server: at most one running answer per
    conversation, each with a stop switch."""

    def __init__(self, db: Database, server: Server):
        self.db, self.server = db, server
        self.stops: dict[str, asyncio.Event] = {}  # conversation id -> its running answer's stop switch

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any):
        def job():
            with self.db.session() as s:
                return fn(s, *args, **kw)
        return run_in_threadpool(job)

    async def ready(self, conversation_id: str, body: MessageIn) -> tuple[Backend, str]:
        """(the backend, the model to answer with), or a WebError before anything is saved."""
        try:
            b = self.server.backend()
        except APIError as e:
            raise WebError(e.status, e.message, e.code or "unavailable") from e
        names = await self.server.served_names(b)
        if body.model is not None and body.model not in names:
            raise WebError(400, f"no model {body.model!r} here", "model_not_found")
        if conversation_id in self.stops:
            raise WebError(409, "this conversation is already answering; stop it first", "busy")
        if not body.regenerate and not body.content.strip():
            raise WebError(400, "the message is empty", "empty_message")
        model = body.model or names[0]
        try:  # checked before anything is saved: a refused edit must not have dropped the messages after it
            completion_budget(api_request(body, model, [{"role": "user", "content": body.content}]),
                              self.server.limits)
        except APIError as e:
            raise web_error(e) from e
        return b, model

    async def start(self, user_id: int, conversation_id: str, body: MessageIn, b: Backend, model: str) -> Turn:
        """Saves the question and a placeholder answer, then turns the history into the backend's job."""
        try:
            asked_id, answer_id, title, history = await self.run(prepare, user_id, conversation_id, body)
        except store.NotFound as e:
            raise WebError(404, str(e) or "no such conversation", "not_found") from e
        except ValueError as e:
            raise WebError(400, str(e), "bad_request") from e
        try:
            job, in_reasoning = chat_job(b, api_request(body, model, history), self.server.limits, model,
                                         thinking=body.thinking)
        except APIError as e:
            await self.run(store.delete_message, user_id, answer_id)
            raise web_error(e) from e
        if job.upstream_body:  # the web chat always names its budget, so the upstream's default never applies
            job.upstream_body["max_tokens"] = job.params.max_tokens
        title = title or history[0]["content"].strip().splitlines()[0][:60]
        stop = self.stops[conversation_id] = asyncio.Event()
        return Turn(user_id, conversation_id, asked_id, answer_id, title, job, in_reasoning, stop)

    async def answer(self, b: Backend, turn: Turn, request: Request) -> AsyncIterator[bytes]:
        """The answer's events while it streams; it is saved every SAVE_EVERY_S and once more at the end."""
        splitter = ReasoningSplitter(turn.in_reasoning)
        reasoning, content = "", ""
        started = last_save = time.monotonic()
        thought_s: float | None = None
        finish = "stopped"
        yield sse.event({"type": "start", "user_message_id": turn.asked_id, "assistant_message_id": turn.answer_id,
                   "title": turn.title})
        try:
            async with aclosing(self.server.pieces(b, [turn.job], request, stream=True)) as pieces:
                async for piece in pieces:
                    if turn.stop.is_set():
                        break
                    if piece is None:
                        yield sse.KEEP_ALIVE
                        continue
                    r, c, _ = split_piece(splitter, piece)
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
                        await self.run(store.update_message, turn.user_id, turn.answer_id, content=content,
                                       reasoning=reasoning if splitter.had_reasoning else None)
            if splitter.had_reasoning and thought_s is None:
                thought_s = round(time.monotonic() - started, 1)
            yield sse.event({"type": "done", "finish_reason": finish, "reasoning_seconds": thought_s})
        except APIError as e:
            finish = "error"
            yield sse.event({"type": "error", "message": e.message})
        finally:
            self.stops.pop(turn.conversation_id, None)
            # Shielded: a client that hangs up cancels this generator, and the answer must still be saved.
            await asyncio.shield(self.run(store.update_message, turn.user_id, turn.answer_id, content=content,
                                          reasoning=reasoning if splitter.had_reasoning else None,
                                          reasoning_seconds=thought_s, finished=finish in ("stop", "length")))


def chat_router(db: Database, server: Server, auth: Auth) -> APIRouter:
    """The message stream, /stop and /api/models; errors in the web API's shape, not the OpenAI one."""
    router = APIRouter(route_class=WebRoute)
    chat = WebChat(db, server)

    @router.get("/api/models")
    async def models(user=Depends(auth.current_user)):
        return {"data": [{"id": n} for n in await server.served_names(server.backend())]}

    @router.post("/api/conversations/{conversation_id}/stop", dependencies=[Depends(auth.require_csrf)])
    async def stop(conversation_id: str, user=Depends(auth.current_user)):
        try:
            await chat.run(store.get_conversation, user.id, conversation_id)
        except store.NotFound as e:
            raise WebError(404, "no such conversation", "not_found") from e
        event = chat.stops.get(conversation_id)
        if event is not None:
            event.set()
        return {"stopped": event is not None}

    @router.post("/api/conversations/{conversation_id}/messages", dependencies=[Depends(auth.require_csrf)])
    async def send(conversation_id: str, body: MessageIn, request: Request, user=Depends(auth.current_user)):
        b, model = await chat.ready(conversation_id, body)
        turn = await chat.start(user.id, conversation_id, body, b, model)
        return event_stream(chat.answer(b, turn, request))

    return router
