"""The web chat's answering side: a message in, an answer written on the server and streamed to whoever watches.

A message becomes the API's own chat request (serve.chat.chat_job), so the web chat samples with the API's defaults
and is held to the same policy as any API client: `--max-tokens-limit`, `--max-prompt-tokens`, and the same
`--rate-limit` per minute, counted per user here as it is per key there.

An answer runs as a task of its own: closing the tab, reloading or opening another chat leaves it running, and a page
that comes back reattaches (GET .../stream) and is sent the whole answer so far, then the rest. Only /stop stops it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field
from sqlalchemy.orm import Session as DBSession
from starlette.concurrency import run_in_threadpool

from sputnik.r1 import TEMPERATURE, ReasoningSplitter, opens_thinking
from sputnik.serve import sse
from sputnik.serve.backend import EngineBackend, Job
from sputnik.serve.chat import chat_job, split_piece
from sputnik.serve.protocol import APIError, ChatCompletionRequest, Limits, completion_budget, parse_request
from sputnik.serve.server import Backend, Server, event_stream
from sputnik.web import store
from sputnik.web.auth import Auth, WebBody, WebError, WebRoute
from sputnik.web.db import Database, Message, User

SAVE_EVERY_S = 0.5  # how often a growing answer is written: a restart loses at most this much of it
ANSWER_ROOM = 256  # an earlier turn is left out rather than leave the answer less room than this (or its budget)


class MessageIn(WebBody):
    """A new user message (or an edit of one, a request to answer again, or to continue the last answer)."""

    content: str = Field("", max_length=100_000)
    model: str | None = Field(None, max_length=200)
    temperature: float = Field(TEMPERATURE, ge=0, le=2)  # R1's; every other sampling setting is the API's default
    max_tokens: int | None = Field(None, ge=1)  # None: the server's default; over the server's limit is a 400
    thinking: bool = True
    effort: Literal["low", "medium", "high"] | None = None  # the API's reasoning_effort (DeepSeek's mapping)
    edit_of: int | None = None
    regenerate: bool = False
    continue_: bool = Field(False, alias="continue")


class VersionIn(WebBody):
    """Which version of a turn to show: the id of one of the versions a message lists."""

    message_id: int


@dataclass
class Plan:
    """What a send will write, worked out before anything is: a new question (ask) or one already saved (asked_id),
    the message the new one is another version of (the question edited, the answer regenerated), the answer to
    continue, and the history the model is to answer."""

    ask: str | None  # a new user message's text (None: asked_id is the question)
    asked_id: int | None
    version_of: int | None
    continued: Message | None  # the answer that goes on from its text (history ends with it as a prefix)
    history: list[dict]
    title: str | None  # a title to give the conversation (None: it has one)


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
    left_out: int  # earlier messages left out of the prompt so that it fits the model's context
    stop: asyncio.Event
    continued: Message | None = None  # the answer this one goes on from (its text so far)
    versions: dict[int, list[int]] = field(default_factory=dict)  # the question's and the answer's versions


@dataclass
class Running:
    """An answer being written on the server, watched or not: every event so far (a page that reattaches is sent
    them all again) and its stop switch."""

    user_id: int
    events: list[bytes] = field(default_factory=list)
    grew: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False

    def add(self, event: bytes) -> None:
        self.events.append(event)
        self.grew.set()

    def finish(self) -> None:
        self.done = True
        self.grew.set()

    async def follow(self, keepalive_s: float) -> AsyncIterator[bytes]:
        """The events from the first, then each new one as it comes, until the answer is over."""
        seen = 0
        while True:
            while seen < len(self.events):
                yield self.events[seen]
                seen += 1
            if self.done:
                return
            self.grew.clear()  # no await since the length was read: nothing can have slipped in between
            try:
                await asyncio.wait_for(self.grew.wait(), keepalive_s)
            except asyncio.TimeoutError:
                yield sse.KEEP_ALIVE


def api_request(body: MessageIn, model: str, history: list[dict]) -> ChatCompletionRequest:
    """The web's message as the API's chat request over the conversation so far: its thinking switch and effort
    are the API's `thinking` and `reasoning_effort`, and a continued answer is /beta's prefix completion."""
    request: dict[str, Any] = {"model": model, "messages": history, "stream": True, "temperature": body.temperature,
                               "max_tokens": body.max_tokens,
                               "thinking": {"type": "enabled" if body.thinking else "disabled"}}
    if body.effort is not None:
        request["reasoning_effort"] = body.effort
    return parse_request(ChatCompletionRequest, request)


def web_error(e: APIError) -> WebError:
    return WebError(e.status, e.message, e.code or "bad_request")


def plan_turn(s: DBSession, user_id: int, conversation_id: str, body: MessageIn) -> Plan:
    """Reads the branch on show and works out the send (new question, edit, answer again, or continue); writes
    nothing, so a send refused later (too long, over a limit) leaves the chat as it was. Another user's ids are
    NotFound."""
    conv = store.get_conversation(s, user_id, conversation_id)
    messages = store.list_messages(s, user_id, conversation_id)
    continued = None
    if body.continue_:
        if not messages or messages[-1].role != "assistant":
            raise ValueError("there is no answer to continue")
        if messages[-1].finish_reason == "stop":
            raise ValueError("this answer is complete: there is nothing to continue")
        if len(messages) < 2:
            raise ValueError("there is no question before this answer")
        continued = messages[-1]
        ask, asked_id, version_of, before = None, messages[-2].id, None, messages[:-1]
    elif body.regenerate:
        answer = messages[-1] if messages and messages[-1].role == "assistant" else None
        if answer is not None:
            messages = messages[:-1]
        if not messages or messages[-1].role != "user":
            raise ValueError("nothing to answer again")
        ask, asked_id, version_of, before = None, messages[-1].id, answer and answer.id, messages
    elif body.edit_of is not None:
        at = next((i for i, m in enumerate(messages) if m.id == body.edit_of and m.role == "user"), None)
        if at is None:
            raise store.NotFound("no such user message in this conversation")
        ask, asked_id, version_of, before = body.content, None, body.edit_of, messages[:at]
    else:
        ask, asked_id, version_of, before = body.content, None, None, messages
    # An answer that failed before its first word says nothing the model should read.
    history = [{"role": m.role, "content": m.content} for m in before if m.role == "user" or m.content.strip()]
    if ask is not None:
        history.append({"role": "user", "content": ask})
    if continued is not None:  # the answer so far, which the model goes on from (the API's /beta prefix)
        history.append({"role": "assistant", "content": continued.content, "prefix": True,
                        "reasoning_content": continued.reasoning or None})
    instructions = s.get(User, user_id).instructions
    if instructions:
        history.insert(0, {"role": "system", "content": instructions})
    first_question = next(m["content"] for m in history if m["role"] == "user")
    title = None if conv.title else store.title_from(first_question)
    return Plan(ask, asked_id, version_of, continued, history, title)


def save_turn(s: DBSession, user_id: int, conversation_id: str, plan: Plan) -> tuple[int, int, str]:
    """Writes the planned question and an empty unfinished answer (or marks a continued answer unfinished again);
    (question id, answer id, title). Earlier versions stay: an edit or a regenerate adds one beside them."""
    if plan.ask is not None:
        asked_id = store.add_message(s, user_id, conversation_id, "user", plan.ask, version_of=plan.version_of).id
        answer_of = None
    else:
        asked_id, answer_of = plan.asked_id, plan.version_of
    if plan.title is not None:
        store.rename_conversation(s, user_id, conversation_id, plan.title)
    conv = store.get_conversation(s, user_id, conversation_id)
    if plan.continued is not None:
        answer = store.update_message(s, user_id, plan.continued.id, finished=False)
    elif answer_of is not None and not _said_anything(store.get_message(s, user_id, answer_of)):
        # An answer that failed before its first word is not worth keeping as a version: it is written again.
        answer = store.update_message(s, user_id, answer_of, finished=False)
    else:
        answer = store.add_message(s, user_id, conversation_id, "assistant", "", finished=False,
                                   version_of=answer_of)
    return asked_id, answer.id, conv.title


def _said_anything(answer: Message) -> bool:
    return bool(answer.content.strip() or (answer.reasoning or "").strip())


def fit(b: Backend, body: MessageIn, model: str, limits: Limits, history: list[dict]) -> tuple[Job, bool, int]:
    """(the job, whether it starts in a thought, messages left out) for the longest recent part of the history that
    fits the model's context and leaves the answer room: earlier turns go first, the system prompt and the question
    never. A question too long on its own is the 400 the API would answer."""
    system = history[:1] if history[0]["role"] == "system" else []
    turns = history[len(system):]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]  # a kept part begins with a question
    room = min(completion_budget(api_request(body, model, history), limits), ANSWER_ROOM)

    def attempt(start: int) -> tuple[Job, bool] | APIError:
        try:
            job, in_reasoning = chat_job(b, api_request(body, model, system + turns[start:]), limits, model)
        except APIError as e:
            if e.code != "context_length_exceeded":
                raise
            return e
        if job.params.max_tokens < room and start != starts[-1]:
            return APIError(400, "no room to answer", code="context_length_exceeded")
        return job, in_reasoning

    found = attempt(starts[0])
    if not isinstance(found, APIError):
        return *found, 0
    lo, hi, best = 1, len(starts) - 1, None  # fewer turns, fewer tokens: the first start that fits, by halving
    while lo <= hi:
        mid = (lo + hi) // 2
        got = attempt(starts[mid])
        if isinstance(got, APIError):
            found, lo = got, mid + 1
        else:
            best, hi = (got, starts[mid]), mid - 1
    if best is None:
        raise WebError(400, f"This message is too long for the model: {found.message}.", "context_length_exceeded")
    (job, in_reasoning), start = best
    return job, in_reasoning, start


def show_version(s: DBSession, user_id: int, conversation_id: str, message_id: int) -> dict:
    """Shows the branch through this message (kept across reloads) and answers the conversation as GET does."""
    store.show_version(s, user_id, conversation_id, message_id)
    return store.export_json(s, user_id, conversation_id)


def thinks(b: Backend) -> bool:
    """Whether the model's chat template opens a thought, so that the thinking switch can close it."""
    if not isinstance(b, EngineBackend):
        return False  # an upstream renders its own template; the switch could not reach it
    try:
        text = b.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    except Exception:  # noqa: BLE001 — a template that cannot render a plain chat has no switch to offer
        return False
    return opens_thinking(text)


class WebChat:
    """The chat's answering side over one database and one API server: at most one running answer per
    conversation, each a task that outlives the request that started it."""

    def __init__(self, db: Database, server: Server):
        self.db, self.server = db, server
        self.running: dict[str, Running | None] = {}  # conversation id -> its answer (None: being prepared)
        self.tasks: set[asyncio.Task] = set()  # held, or the event loop could drop a running answer

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any):
        def job():
            with self.db.session() as s:
                return fn(s, *args, **kw)
        return run_in_threadpool(job)

    def check_rate(self, user: User) -> None:
        """The API's per-minute limit (`--rate-limit`), per user: a 429 with Retry-After once it is spent."""
        wait = self.server.limiter.check(f"user:{user.id}")
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise WebError(429, f"Too many messages: try again in {seconds} s.", "rate_limited",
                           {"Retry-After": str(seconds)})

    async def ready(self, body: MessageIn) -> tuple[Backend, str]:
        """(the backend, the model to answer with), or a WebError before anything is read or saved."""
        try:
            b = self.server.backend()
        except APIError as e:
            raise WebError(e.status, e.message, e.code or "unavailable") from e
        names = await self.server.served_names(b)
        if body.model is not None and body.model not in names:
            raise WebError(400, f"no model {body.model!r} here", "model_not_found")
        if not (body.regenerate or body.continue_) and not body.content.strip():
            raise WebError(400, "the message is empty", "empty_message")
        model = body.model or names[0]
        try:
            completion_budget(api_request(body, model, [{"role": "user", "content": "x"}]), self.server.limits)
        except APIError as e:
            raise web_error(e) from e
        return b, model

    async def claim(self, user_id: int, conversation_id: str) -> None:
        """Holds the conversation for one answer: 404 for another user's id (before saying whether it is busy),
        409 while it answers. Check and claim happen with no await between, so two sends cannot both pass."""
        try:
            await self.run(store.get_conversation, user_id, conversation_id)
        except store.NotFound as e:
            raise WebError(404, "no such conversation", "not_found") from e
        if conversation_id in self.running:
            raise WebError(409, "This chat is still answering: stop it first.", "busy")
        self.running[conversation_id] = None

    async def start(self, user_id: int, conversation_id: str, body: MessageIn, b: Backend, model: str) -> Turn:
        """Works out the history, fits it to the context, and only then saves the question and a placeholder."""
        try:
            plan = await self.run(plan_turn, user_id, conversation_id, body)
            job, in_reasoning, left_out = await run_in_threadpool(fit, b, body, model, self.server.limits,
                                                                  plan.history)
            asked_id, answer_id, title = await self.run(save_turn, user_id, conversation_id, plan)
            versions = await self.run(store.versions, user_id, conversation_id)
        except store.NotFound as e:
            raise WebError(404, str(e) or "no such conversation", "not_found") from e
        except ValueError as e:
            raise WebError(400, str(e), "bad_request") from e
        except APIError as e:
            raise web_error(e) from e
        if job.upstream_body:  # the web chat always names its budget, so the upstream's default never applies
            job.upstream_body["max_tokens"] = job.params.max_tokens
        return Turn(user_id, conversation_id, asked_id, answer_id, title, job, in_reasoning, left_out,
                    asyncio.Event(), plan.continued,
                    {i: versions[i] for i in (asked_id, answer_id) if i in versions})

    def launch(self, b: Backend, turn: Turn, request: Request) -> Running:
        """Runs the answer as a task of its own, which a client hanging up does not cancel."""
        running = Running(turn.user_id, stop=turn.stop)
        self.running[turn.conversation_id] = running

        async def produce() -> None:
            try:
                async for event in self.answer(b, turn, request):
                    if event != sse.KEEP_ALIVE:
                        running.add(event)
            except store.NotFound:  # the chat was deleted while it answered: nothing left to save it in
                pass
            finally:
                running.finish()
                self.running.pop(turn.conversation_id, None)

        task = asyncio.create_task(produce())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return running

    async def answer(self, b: Backend, turn: Turn, request: Request) -> AsyncIterator[bytes]:
        """The answer's events as it is written; it is saved every SAVE_EVERY_S and once more at the end."""
        was = turn.continued  # a continued answer grows from its text so far
        splitter = ReasoningSplitter(turn.in_reasoning, continued=was is not None)
        reasoning, content = (was.reasoning or "", was.content) if was else ("", "")
        tokens = (was.tokens or 0) if was else 0
        had_reasoning = bool(reasoning)
        # A thought cut off goes on: its seconds so far count, and it is timed again until it ends.
        thought_before = (was.reasoning_seconds or 0.0) if was and turn.in_reasoning else 0.0
        thought_s: float | None = was.reasoning_seconds if was and not turn.in_reasoning else None
        started = time.monotonic()
        last_save: float | None = None  # the first words are saved at once, then every SAVE_EVERY_S
        finish = "stopped"
        start = {"type": "start", "user_message_id": turn.asked_id, "assistant_message_id": turn.answer_id,
                 "title": turn.title, "left_out": turn.left_out,
                 "versions": {str(k): v for k, v in turn.versions.items()}}
        if was is not None:  # a page that attaches to it later starts from the same text
            start["continued"] = {"content": content, "reasoning": reasoning}
        yield sse.event(start)
        try:
            async with aclosing(self.server.pieces(b, [turn.job], request, stream=True)) as pieces:
                async for piece in pieces:
                    if turn.stop.is_set():
                        break
                    if piece is None:
                        continue
                    r, c, _ = split_piece(splitter, piece)
                    tokens += piece.tokens
                    thinking = had_reasoning or splitter.had_reasoning
                    if thinking and thought_s is None and (c or not splitter.in_reasoning):
                        thought_s = round(thought_before + time.monotonic() - started, 1)
                    reasoning, content = reasoning + r, content + c
                    if r:
                        yield sse.event({"type": "reasoning", "text": r})
                    if c:
                        yield sse.event({"type": "content", "text": c})
                    if piece.finish_reason:
                        finish = piece.finish_reason
                    now = time.monotonic()
                    if (r or c) and (last_save is None or now - last_save >= SAVE_EVERY_S):
                        last_save = now
                        await self.run(store.update_message, turn.user_id, turn.answer_id, content=content,
                                       reasoning=reasoning if thinking else None)
            if (had_reasoning or splitter.had_reasoning) and thought_s is None:
                thought_s = round(thought_before + time.monotonic() - started, 1)
            yield sse.event({"type": "done", "finish_reason": finish, "reasoning_seconds": thought_s})
        except APIError as e:
            finish = "error"
            yield sse.event({"type": "error", "message": e.message})
        finally:
            # Shielded: a server shutting down cancels this task, and the answer must still be saved.
            thinking = had_reasoning or splitter.had_reasoning
            await asyncio.shield(self.run(store.update_message, turn.user_id, turn.answer_id, content=content,
                                          reasoning=reasoning if thinking else None,
                                          reasoning_seconds=thought_s, finished=finish in ("stop", "length"),
                                          finish_reason=finish, tokens=max(tokens, turn.job.completion_tokens)))


def chat_router(db: Database, server: Server, auth: Auth) -> APIRouter:
    """The message stream, reattaching to it, /stop and /api/models; errors in the web API's shape."""
    router = APIRouter(route_class=WebRoute)
    chat = WebChat(db, server)

    @router.get("/api/models")
    async def models(user=Depends(auth.current_user)):
        try:
            b = server.backend()
        except APIError as e:
            raise WebError(e.status, e.message, e.code or "unavailable") from e
        return {"data": [{"id": n, "thinking": thinks(b)} for n in await server.served_names(b)]}

    async def owned(user: User, conversation_id: str) -> Running | None:
        try:
            await chat.run(store.get_conversation, user.id, conversation_id)
        except store.NotFound as e:
            raise WebError(404, "no such conversation", "not_found") from e
        return chat.running.get(conversation_id)

    @router.post("/api/conversations/{conversation_id}/stop", dependencies=[Depends(auth.require_csrf)])
    async def stop(conversation_id: str, user=Depends(auth.current_user)):
        running = await owned(user, conversation_id)
        if running is not None:
            running.stop.set()
        return {"stopped": running is not None}

    @router.post("/api/conversations/{conversation_id}/version", dependencies=[Depends(auth.require_csrf)])
    async def version(conversation_id: str, body: VersionIn, user=Depends(auth.current_user)):
        await owned(user, conversation_id)
        if conversation_id in chat.running:  # the answer being written belongs to the branch on show
            raise WebError(409, "This chat is still answering: stop it first.", "busy")
        try:
            return await chat.run(show_version, user.id, conversation_id, body.message_id)
        except store.NotFound as e:
            raise WebError(404, "no such message in this conversation", "not_found") from e

    @router.get("/api/conversations/{conversation_id}/stream")
    async def reattach(conversation_id: str, user=Depends(auth.current_user)):
        running = await owned(user, conversation_id)
        if running is None:
            raise WebError(404, "This chat is not answering now.", "not_answering")
        return event_stream(running.follow(server.keepalive_s))

    @router.post("/api/conversations/{conversation_id}/messages", dependencies=[Depends(auth.require_csrf)])
    async def send(conversation_id: str, body: MessageIn, request: Request, user=Depends(auth.current_user)):
        chat.check_rate(user)
        b, model = await chat.ready(body)
        await chat.claim(user.id, conversation_id)
        try:
            turn = await chat.start(user.id, conversation_id, body, b, model)
        except BaseException:
            chat.running.pop(conversation_id, None)
            raise
        return event_stream(chat.launch(b, turn, request).follow(server.keepalive_s))

    return router
