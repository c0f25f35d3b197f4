"""/anthropic/v1/messages: Anthropic's Messages API in front of the same chat path as /v1, so agent tools built for
Claude talk to sputnik (as DeepSeek's /anthropic endpoint does).

A Messages request becomes the OpenAI-shaped chat request (system → a system message, thinking blocks → reasoning,
tool_use → tool_calls, tool_result → tool messages, tools with input_schema → function tools, tool_choice
auto/any/tool/none → auto/required/function/none); it runs through serve.chat (prepare_chat, chat_whole,
chat_stream), and the answer is turned back into content blocks and Anthropic's stream events. Tools therefore
work exactly as far as /v1/chat/completions supports them; until that path takes `tools`, a request carrying
tools gets a 400 saying so, never a silent drop.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sputnik.serve import sse
from sputnik.serve.backend import EngineBackend
from sputnik.serve.chat import chat_stream, chat_whole, prepare_chat
from sputnik.serve.keys import KeyRecord
from sputnik.serve.protocol import (
    _CONFIG,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    parse_request,
)
from sputnik.serve.server import Server, event_stream

# Anthropic's error types by HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
               503: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_error(e: APIError) -> JSONResponse:
    """An APIError as Anthropic writes errors: {"type": "error", "error": {"type", "message"}}."""
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}
    headers = {"Retry-After": str(max(1, int(e.retry_after)))} if getattr(e, "retry_after", None) else None
    return JSONResponse(body, status_code=e.status, headers=headers)


class TextBlock(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]
    text: str


class ThinkingBlock(BaseModel):
    model_config = _CONFIG
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(BaseModel):
    model_config = _CONFIG
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlock(BaseModel):
    model_config = _CONFIG
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = _CONFIG
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] = ""
    is_error: bool = False


Block = Annotated[TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock,
                  Field(discriminator="type")]


class Message(BaseModel):
    model_config = _CONFIG
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(BaseModel):
    model_config = _CONFIG
    name: str = Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    model_config = _CONFIG
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(BaseModel):
    model_config = _CONFIG
    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(None, ge=1)


class CountTokensRequest(BaseModel):
    """What /anthropic/v1/messages/count_tokens takes: a Messages request without its sampling fields."""

    model_config = _CONFIG

    model: str = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    """A request to /anthropic/v1/messages."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


def _message(m: Message) -> list[dict]:
    """One Anthropic message as OpenAI-shaped chat messages (tool results become tool messages before the rest)."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    out: list[dict] = []
    text, reasoning, calls = "", "", []
    for block in m.content:
        if isinstance(block, TextBlock):
            text += block.text
        elif isinstance(block, ThinkingBlock):
            reasoning += block.thinking
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input)}})
        elif isinstance(block, ToolResultBlock):
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _text(block.content)})
    if text or reasoning or calls or not out:
        msg: dict[str, Any] = {"role": m.role, "content": text}
        if reasoning:
            msg["reasoning_content"] = reasoning
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _tool_fields(req: CountTokensRequest) -> dict[str, Any]:
    """tools and tool_choice in OpenAI's shape; a 400 while the chat path cannot take them (see the module doc)."""
    uses_tools = bool(req.tools) or any(not isinstance(m.content, str) and any(
        isinstance(b, ToolUseBlock | ToolResultBlock) for b in m.content) for m in req.messages)
    if not uses_tools:
        return {}
    if "tools" not in ChatCompletionRequest.model_fields or "tool_calls" not in ChatMessage.model_fields:
        raise APIError(400, "tools, tool_use and tool_result go through the same path as /v1/chat/completions, "
                            "which does not take tools on this server yet", param="tools", code="tools_unsupported")
    out: dict[str, Any] = {}
    if req.tools:
        out["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                          "parameters": t.input_schema}} for t in req.tools]
    c = req.tool_choice
    if c is not None:
        if c.type == "tool" and not c.name:
            raise APIError(400, "tool_choice.name: required when tool_choice.type is tool", param="tool_choice.name")
        out["tool_choice"] = ({"type": "function", "function": {"name": c.name}} if c.type == "tool" else
                              {"auto": "auto", "any": "required", "none": "none"}[c.type])
        out["parallel_tool_calls"] = not c.disable_parallel_tool_use
    return out


def openai_request(req: CountTokensRequest, stream: bool = False) -> ChatCompletionRequest:
    """The OpenAI-shaped chat request a Messages request means."""
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system)})
    for m in req.messages:
        messages += _message(m)
    body: dict[str, Any] = {"model": req.model, "messages": messages, **_tool_fields(req)}
    if req.thinking is not None:
        body["thinking"] = req.thinking.model_dump(exclude_none=True)
    if isinstance(req, MessagesRequest):
        if req.thinking and req.thinking.budget_tokens and req.thinking.budget_tokens >= req.max_tokens:
            raise APIError(400, "thinking.budget_tokens must be less than max_tokens", param="thinking.budget_tokens")
        body.update(max_tokens=req.max_tokens, temperature=req.temperature, stream=stream)
        if stream:
            body["stream_options"] = {"include_usage": True}
        for name in ("top_p", "top_k"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        if req.stop_sequences:
            body["stop"] = req.stop_sequences
    return parse_request(ChatCompletionRequest, body)


def _usage(u: dict) -> dict:
    hit = u.get("prompt_cache_hit_tokens", 0)
    return {"input_tokens": u["prompt_tokens"] - hit, "output_tokens": u["completion_tokens"],
            "cache_read_input_tokens": hit, "cache_creation_input_tokens": 0}


def _content(message: dict) -> list[dict]:
    blocks: list[dict] = []
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                       "input": _arguments(call["function"]["arguments"])})
    return blocks


def _arguments(text: str | None) -> dict:
    """A call's arguments as the object tool_use holds; {} for arguments cut off by max_tokens (the response's
    stop_reason says so) or that are not an object."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from e


def anthropic_router(server: Server) -> APIRouter:
    router = APIRouter()

    @router.post("/anthropic/v1/messages")
    async def messages(request: Request, _: KeyRecord | None = Depends(server.authorize)):
        req = parse_request(MessagesRequest, await _json(request))
        body = openai_request(req, stream=req.stream)
        b, job, reply = await prepare_chat(server, body, beta=False)
        msg_id = f"msg_{uuid.uuid4().hex}"
        if req.stream:
            events = chat_stream(server, b, job, request, reply, include_usage=True)
            return event_stream(_events(events, msg_id, reply.model, job.prompt_tokens, job.cached_tokens))
        out = await chat_whole(server, b, job, request, reply)
        choice = out["choices"][0]
        return {"id": msg_id, "type": "message", "role": "assistant", "model": out["model"],
                "content": _content(choice["message"]), "stop_reason": STOP_REASONS.get(choice["finish_reason"],
                                                                                         "end_turn"),
                "stop_sequence": None, "usage": _usage(out["usage"])}

    @router.post("/anthropic/v1/messages/count_tokens")
    async def count_tokens(request: Request, _: KeyRecord | None = Depends(server.authorize)):
        req = parse_request(CountTokensRequest, await _json(request))
        b = server.backend()
        if not isinstance(b, EngineBackend):
            raise APIError(400, "count_tokens needs the embedded engine (this server forwards to an upstream)")
        _, job, _ = await prepare_chat(server, openai_request(req), beta=False)
        return {"input_tokens": job.prompt_tokens}

    return router


class _Blocks:
    """The content blocks of a streamed answer: opens a block when the kind of delta changes, closes the last."""

    def __init__(self) -> None:
        self.index, self.kind = -1, None

    def switch(self, kind: str, start: dict) -> list[bytes]:
        out = self.close()
        self.index, self.kind = self.index + 1, kind
        out.append(sse.named_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                           "content_block": start}))
        return out

    def delta(self, delta: dict) -> bytes:
        return sse.named_event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                       "delta": delta})

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [sse.named_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]


def _chunk_events(blocks: _Blocks, delta: dict) -> list[bytes]:
    """Anthropic events for one OpenAI chunk's delta: thinking, text and tool-call pieces."""
    out: list[bytes] = []
    if delta.get("reasoning_content"):
        if blocks.kind != "thinking":
            out += blocks.switch("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        out.append(blocks.delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
    if delta.get("content"):
        if blocks.kind != "text":
            out += blocks.switch("text", {"type": "text", "text": ""})
        out.append(blocks.delta({"type": "text_delta", "text": delta["content"]}))
    for call in delta.get("tool_calls") or []:
        fn = call.get("function") or {}
        if call.get("id"):
            out += blocks.switch("tool_use", {"type": "tool_use", "id": call["id"], "name": fn.get("name", ""),
                                              "input": {}})
        if fn.get("arguments"):
            out.append(blocks.delta({"type": "input_json_delta", "partial_json": fn["arguments"]}))
    return out


async def _events(chunks: AsyncIterator[bytes], msg_id: str, model: str, prompt_tokens: int,
                  cached: int) -> AsyncIterator[bytes]:
    """The chat stream's OpenAI chunks re-framed as Anthropic's events, from message_start to message_stop."""
    start = {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
             "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": prompt_tokens - cached, "output_tokens": 0, "cache_read_input_tokens": cached,
                       "cache_creation_input_tokens": 0}}
    yield sse.named_event("message_start", {"type": "message_start", "message": start})
    blocks, stop = _Blocks(), "end_turn"
    async for raw in chunks:
        if raw == sse.KEEP_ALIVE:
            yield sse.named_event("ping", {"type": "ping"})
            continue
        data = sse.event_data(raw.decode().strip())
        if data is None or data == "[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            status = 500 if chunk["error"].get("type") == "server_error" else 400
            yield sse.named_event("error", {"type": "error", "error": {
                "type": ERROR_TYPES.get(status, "api_error"), "message": chunk["error"]["message"]}})
            return
        for c in chunk.get("choices", []):
            for event in _chunk_events(blocks, c.get("delta") or {}):
                yield event
            if c.get("finish_reason"):
                stop = STOP_REASONS.get(c["finish_reason"], "end_turn")
        if chunk.get("usage"):
            for event in blocks.close():
                yield event
            yield sse.named_event("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": stop, "stop_sequence": None}, "usage": _usage(chunk["usage"])})
    yield sse.named_event("message_stop", {"type": "message_stop"})
