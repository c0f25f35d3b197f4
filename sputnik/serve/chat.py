"""/v1/chat/completions, and the one path from a chat request to a backend job that the web chat shares."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request

from sputnik.serve.backend import EngineBackend, Job, Piece, UpstreamBackend
from sputnik.serve.keys import KeyRecord
from sputnik.serve.protocol import (APIError, ChatCompletionRequest, ChatMessage, Limits, prompt_messages,
                                    sampling_params, thinking_choice)
from sputnik.r1 import THINK_OPEN, ReasoningSplitter, close_thinking, opens_thinking
from sputnik.serve import sse
from sputnik.serve.server import Backend, Server, event_stream, upstream_body, usage
from sputnik.serve.tools import output_constraint, tool_plan
from sputnik.tools.parser import ToolParser
from sputnik.tools.render import ToolPlan, template_messages


def chat_prompt(b: Backend, messages: list[dict], thinking: bool = True, prefix: ChatMessage | None = None,
                tools: list[dict] | None = None) -> tuple[Any, int, bool]:
    """(what the backend takes, its prompt tokens, whether the output starts inside a thought) for chat messages.

    The engine renders the model's template; R1's opens `<think>` in the prompt, and thinking=False closes it at
    once so the model answers directly. A prefix (DeepSeek's /beta prefix completion) is the start of the answer:
    its reasoning continues the thought, its content the answer after it. An upstream server renders its own
    template."""
    if not isinstance(b, EngineBackend):
        if prefix is not None:
            messages = [*messages, {"role": "assistant", "content": prefix.text(), "prefix": True}]
        return messages, 0, False
    try:
        text = b.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **({"tools": tools} if tools
                                                                                      else {}))
    except Exception as e:  # noqa: BLE001 — a template that refuses these messages is the client's 400
        raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from e
    in_reasoning = opens_thinking(text)
    if prefix is not None:
        text, in_reasoning = _continue(text, in_reasoning, prefix)
    if in_reasoning and not thinking:
        text, in_reasoning = close_thinking(text), False
    ids = b.tokenizer.encode(text, add_special_tokens=False)
    return ids, len(ids), in_reasoning


def _continue(text: str, in_reasoning: bool, prefix: ChatMessage) -> tuple[str, bool]:
    """The prompt followed by the prefix's reasoning and content, laid out as R1 writes them."""
    reasoning, content = prefix.reasoning_content or prefix.reasoning, prefix.text()
    if reasoning:
        if not in_reasoning:
            text, in_reasoning = text + THINK_OPEN + "\n", True
        text += reasoning
    if content:
        if in_reasoning:
            text, in_reasoning = close_thinking(text), False
        text += content
    return text, in_reasoning


def chat_job(b: Backend, req: ChatCompletionRequest, limits: Limits, model: str,
             plan: ToolPlan | None = None) -> tuple[Job, bool]:
    """(the backend's job, whether its output starts inside a thought) for a validated chat request, after the
    server's limits: the API and the web chat (whose switch and effort are the request's `thinking` and
    `reasoning_effort`) both go through here to SamplingParams."""
    plan = plan or tool_plan(req, b.tokenizer)
    choice = thinking_choice(req)
    prefix = req.messages[-1] if req.messages[-1].prefix else None
    messages = prompt_messages(req.messages[:-1] if prefix else req.messages)
    if isinstance(b, EngineBackend):
        messages = template_messages(messages, plan)
    prompt, n_prompt, in_reasoning = chat_prompt(b, messages, choice.enabled, prefix,
                                                 plan.tools if plan.native else None)
    params = sampling_params(req, limits, n_prompt, b.context)
    params.logprobs = req.top_logprobs or 0
    # Thinking off where the prompt cannot close the thought (the model opens <think> itself): a budget of 0
    # makes the engine close it the moment it opens.
    params.thinking_token_budget = choice.budget if choice.enabled else 0
    params.in_thinking = in_reasoning
    if isinstance(b, EngineBackend):
        params.constraint = output_constraint(req, plan, b.tokenizer, in_reasoning)
        error = params.constraint and b.engine.grammars.error(params.constraint)
        if error:
            raise APIError(400, f"the output constraint does not compile: {error}", param="response_format")
    job = Job(prompt, params, params.n, logprobs=req.logprobs, prompt_tokens=n_prompt)
    if isinstance(b, UpstreamBackend):
        job.upstream_body = upstream_body(req, model, messages=prompt)
    return job, in_reasoning


def check_prefix(req: ChatCompletionRequest, beta: bool) -> None:
    """DeepSeek's rules for prefix completion: /beta only, on the last message, which is the assistant's."""
    for i, m in enumerate(req.messages):
        if not m.prefix:
            continue
        if not beta:
            raise APIError(400, "prefix completion is a beta feature: send it to /beta/chat/completions",
                           param=f"messages[{i}].prefix")
        if i != len(req.messages) - 1 or m.role != "assistant":
            raise APIError(400, "prefix is allowed only on the last message, and only when its role is assistant",
                           param=f"messages[{i}].prefix")


@dataclass
class ChatReply:
    """The fixed parts of one chat response: its id and model, and a reasoning splitter per choice."""

    id: str
    created: int
    model: str
    splitters: list[ReasoningSplitter]
    json_mode: bool  # check that the output is JSON (an upstream's; the engine's is held to a grammar)
    parsers: list[ToolParser | None]
    thinking: bool = True  # False: an (empty) thought the engine closed at once is not reported

    def head(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": "sputnik"}


def chat_router(server: Server) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    @router.post("/chat/completions", include_in_schema=False)
    async def chat(body: ChatCompletionRequest, request: Request, _: KeyRecord | None = Depends(server.authorize)):
        return await chat_response(server, body, request, beta=False)

    return router


async def prepare_chat(server: Server, body: ChatCompletionRequest, beta: bool) -> tuple[Backend, Job, ChatReply]:
    """(backend, job, reply) for a validated chat request: what answering it whole or streamed needs (the
    Anthropic endpoint answers through the same two)."""
    check_prefix(body, beta)
    b = server.backend()
    name = await server.check_model(b, body.model)
    plan = tool_plan(body, b.tokenizer)
    job, in_reasoning = chat_job(b, body, server.limits, name, plan=plan)
    json_mode = (body.response_format is not None and body.response_format.type != "text"
                 and job.params.constraint is None)
    n = job.params.n
    reply = ChatReply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), name,
                      [ReasoningSplitter(in_reasoning, continued=body.messages[-1].prefix) for _ in range(n)],
                      json_mode, [plan.parser() for _ in range(n)], thinking=job.params.thinking_token_budget != 0)
    return b, job, reply


async def chat_response(server: Server, body: ChatCompletionRequest, request: Request, beta: bool):
    """One chat request answered, whole or streamed (/v1 and /beta share it)."""
    b, job, reply = await prepare_chat(server, body, beta)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(chat_stream(server, b, job, request, reply, include_usage))
    return await chat_whole(server, b, job, request, reply)


async def chat_whole(server: Server, b: Backend, job: Job, request: Request, reply: ChatReply) -> dict:
    n = len(reply.splitters)
    logprobs: list[list[dict]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    thoughts, contents = [""] * n, [""] * n
    reasoning_tokens, tokens = 0, 0
    async for piece in server.pieces(b, [job], request, stream=False):
        if piece is None:
            continue
        thought, text, thinking = split_piece(reply.splitters[piece.index], piece)
        reasoning_tokens += thinking
        tokens += piece.tokens
        thoughts[piece.index] += thought
        contents[piece.index] += text
        logprobs[piece.index] += piece.logprobs or []
        if piece.finish_reason:
            finish[piece.index] = piece.finish_reason
    choices = []
    for i, sp in enumerate(reply.splitters):
        parser = reply.parsers[i]
        message: dict[str, Any] = {"role": "assistant", "content": contents[i]}
        if parser is not None:
            text, _ = parser.push(contents[i])
            message["content"] = text + parser.finish()[0]
            calls = parser.tool_calls()
            if calls:
                message["tool_calls"] = calls
                message["content"] = message["content"].strip() or None
        if reply.json_mode:
            _require_json(message["content"] or "")
        if sp.had_reasoning and (reply.thinking or thoughts[i]):
            message["reasoning_content"] = message["reasoning"] = thoughts[i]  # DeepSeek's name, vLLM's
        choices.append({"index": i, "message": message, "logprobs": {"content": logprobs[i]} if job.logprobs
                        else None, "finish_reason": finish_reason(finish[i], parser)})
    head = reply.head("chat.completion")
    return {**head, "choices": choices, "usage": usage(job.prompt_tokens, max(tokens, job.completion_tokens),
                                                         reasoning_tokens, job.cached_tokens)}


async def chat_stream(server: Server, b: Backend, job: Job, request: Request, reply: ChatReply,
                       include_usage: bool) -> AsyncIterator[bytes]:
    head = reply.head("chat.completion.chunk")
    content_so_far = [""] * len(reply.splitters)
    for i in range(len(reply.splitters)):
        yield sse.event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    reasoning_tokens, tokens = 0, 0
    try:
        async for piece in server.pieces(b, [job], request, stream=True):
            if piece is None:
                yield sse.KEEP_ALIVE
                continue
            thought, text, thinking = split_piece(reply.splitters[piece.index], piece)
            reasoning_tokens += thinking
            tokens += piece.tokens
            text, calls = parse_piece(reply.parsers[piece.index], text, piece.finish_reason)
            content_so_far[piece.index] += text
            if piece.finish_reason and reply.json_mode:
                _require_json(content_so_far[piece.index])
            delta: dict[str, Any] = {}
            if thought:
                delta["reasoning_content"] = delta["reasoning"] = thought
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            if delta or piece.finish_reason or piece.logprobs:
                yield sse.event({**head, "choices": [{
                    "index": piece.index, "delta": delta,
                    "logprobs": {"content": piece.logprobs} if piece.logprobs else None,
                    "finish_reason": finish_reason(piece.finish_reason, reply.parsers[piece.index])}]})
        if include_usage:
            done = usage(job.prompt_tokens, max(tokens, job.completion_tokens), reasoning_tokens, job.cached_tokens)
            yield sse.event({**head, "choices": [], "usage": done})
    except APIError as e:  # the 200 is already out: the error travels inside the stream
        yield sse.event(e.body())
    yield sse.DONE


def split_piece(sp: ReasoningSplitter, piece: Piece) -> tuple[str, str, int]:
    """(reasoning, content, reasoning tokens) of one piece: its tokens count as thinking when the splitter was in the
    thought before or after it (the tags themselves included)."""
    before = sp.in_reasoning
    thought, text = sp.push(piece.text)
    thinking = piece.tokens if before or sp.in_reasoning else 0
    if piece.finish_reason:
        t2, c2 = sp.finish()
        thought, text = thought + t2, text + c2
    return thought, text, thinking


def parse_piece(parser: ToolParser | None, text: str, finished: str | None) -> tuple[str, list[dict]]:
    """(content, tool-call deltas) of one piece's content."""
    if parser is None:
        return text, []
    text, calls = parser.push(text)
    if finished:
        t2, c2 = parser.finish()
        text, calls = text + t2, calls + c2
    return text, calls


def finish_reason(reason: str | None, parser: ToolParser | None) -> str | None:
    """A choice that stopped after calling tools finished with "tool_calls", as OpenAI's do."""
    if reason == "stop" and parser is not None and parser.tool_calls():
        return "tool_calls"
    return reason


def _require_json(content: str) -> None:
    try:
        json.loads(content)
    except ValueError as e:
        raise APIError(422, f"response_format json_object: the model's output is not valid JSON ({e}); "
                            "ask for JSON in the prompt, or retry", type="invalid_response_error",
                       param="response_format", code="invalid_json_output") from e
