"""The server's request side: OpenAI/DeepSeek request models, their validation errors, and engine parameters."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from sputnik.engine.sampling import SamplingParams
from sputnik.r1 import strip_reasoning
from sputnik.serve.tool_types import JSONSchemaFormat, Tool, ToolCall, ToolChoice


class APIError(Exception):
    """An error the server answers with an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


# JSON from Python's json module may hold NaN and Infinity, which a one-sided range (repetition_penalty > 0) lets in.
_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False)

NonEmptyStr = Annotated[str, Field(min_length=1)]

MAX_STOP = 16  # stop strings per request: DeepSeek's API takes up to 16 (OpenAI's, 4)

_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where a decoded JSON value holds a lone UTF-16 surrogate (JSON's "\\ud800" escape decodes to one), as
    `messages[0].content`; None when there is none. Such a string is not text: no encoder, tokenizer or database
    takes it, so it is refused up front for every field, including ones added later."""
    if isinstance(value, str):
        return (path or "body") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = lone_surrogate(key, path) or lone_surrogate(item, f"{path}.{key}" if path else str(key))
            if where is not None:
                return where
    elif isinstance(value, list):
        for i, item in enumerate(value):
            where = lone_surrogate(item, f"{path}[{i}]")
            if where is not None:
                return where
    return None


def refuse_lone_surrogates(data: Any) -> Any:
    """A `model_validator(mode="before")` body: the raw input unchanged, or a validation error naming the field."""
    where = lone_surrogate(data)
    if where is not None:
        raise PydanticCustomError("lone_surrogate", "{where}: holds a lone UTF-16 surrogate, which is not text",
                                  {"where": where})
    return data


class TextPart(BaseModel):
    """One part of a multi-part message content; only text parts are understood."""

    model_config = _CONFIG

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message as clients send it, earlier assistant turns possibly with their reasoning."""

    model_config = _CONFIG

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # DeepSeek's name
    reasoning: str | None = None  # OpenRouter's and vLLM's name
    name: str | None = None
    prefix: bool = False  # DeepSeek's /beta chat prefix completion: the answer continues this assistant message
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # the call a tool message answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    """What a streamed response adds at its end."""

    model_config = _CONFIG

    include_usage: bool = False


class ResponseFormat(BaseModel):
    """The output format a chat request asks for."""

    model_config = _CONFIG

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _json_schema_with_its_type(cls, value: JSONSchemaFormat | None, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("type") != "json_schema":
            raise PydanticCustomError("json_schema", "only allowed when type is json_schema")
        return value


class Thinking(BaseModel):
    """DeepSeek's (and Anthropic's) thinking switch: {"type": "enabled" | "disabled"}, with Anthropic's budget."""

    model_config = _CONFIG

    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(None, ge=0)


# OpenAI's reasoning_effort values; DeepSeek maps minimal/low to low, medium/high/xhigh to high, and has max.
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# sputnik's models have no effort switch of their own: an effort is a thinking budget (None: unbounded).
EFFORT_BUDGET: dict[str, int | None] = {"low": 1024, "high": 8192, "max": None}


def effort_level(effort: str) -> str:
    """DeepSeek's mapping of a reasoning_effort onto the levels it has: low, high, max (or none: no thinking)."""
    return {"minimal": "low", "medium": "high", "xhigh": "high"}.get(effort, effort)


class _SamplingFields(BaseModel):
    """The sampling and streaming fields shared by chat and legacy completion requests."""

    model_config = _CONFIG

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 means off, as in vLLM; 0 means off, as in sputnik
    min_p: float = Field(0.0, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    # A str is wrapped into a list before validation: a `str | list[str]` union would report every failure twice.
    stop: list[NonEmptyStr] | None = Field(None, max_length=MAX_STOP)
    n: int = Field(1, ge=1)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        return refuse_lone_surrogates(data)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if value is not None and not isinstance(value, list):
            raise PydanticCustomError("stop", "Input should be a string or a list of strings")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("stream_options", "only allowed when stream is true")
        return value


class ChatCompletionRequest(_SamplingFields):
    """A request to /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    thinking: Thinking | None = None  # DeepSeek's switch (the openai client sends it through extra_body)
    reasoning_effort: Literal[EFFORTS] | None = None  # type: ignore[valid-type]
    thinking_token_budget: int | None = Field(None, ge=0)  # vLLM's name
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: enable_thinking / thinking (bool) are read
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("top_logprobs", "only allowed when logprobs is true")
        return value


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    """A request to the legacy /v1/completions: text or token ids (lm-eval sends ids), one prompt or a batch."""

    prompt: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1)]
    # OpenAI's default for this endpoint; 0 with echo scores the prompt alone (lm-eval's loglikelihood)
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's number of top log-probs per token
    echo: bool = False
    suffix: str | None = None  # fill-in-the-middle: the text after the hole (/beta/completions)


@dataclass
class Limits:
    """What one request may ask of this server."""

    max_prompt_tokens: int = 8192
    max_tokens: int = 4096
    max_n: int = 16
    default_max_tokens: int = 1024


def _models_in(annotation: Any) -> type[BaseModel] | None:
    """The first pydantic model inside an annotation such as `list[ChatMessage] | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _models_in(arg)
        if found is not None:
            return found
    return None


def _field_path(model_cls: type[BaseModel], loc: tuple) -> tuple[str | int, ...]:
    """An error location without the names of union members, which pydantic puts among the field names
    (`content`, `str`); walking the models tells the two apart."""
    path: list[str | int] = []
    current: type[BaseModel] | None = model_cls
    for item in loc:
        if isinstance(item, int):
            path.append(item)
        elif current is not None and item in current.model_fields:
            path.append(item)
            current = _models_in(current.model_fields[item].annotation)
    return tuple(path)


def _path_text(path: tuple[str | int, ...]) -> str:
    """A location as a client reads it: `messages[0].content`."""
    text = ""
    for item in path:
        if isinstance(item, int):
            text += f"[{item}]"
        else:
            text += f".{item}" if text else item
    return text


def parse_request(model_cls: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body into model_cls; any problem becomes an APIError 400 naming the parameter."""
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        errors = [(_field_path(model_cls, err["loc"]), err["msg"]) for err in e.errors()]
    # When a union field fails, pydantic reports one error per member. Among the errors under the first error's
    # field, the deepest says most (a bad part inside a list beats "should be a valid string"); ties are joined.
    root = errors[0][0]
    related = [(path, msg) for path, msg in errors if path[:len(root)] == root]
    deepest = max(related, key=lambda err: len(err[0]))[0]
    message = " or ".join(dict.fromkeys(msg for path, msg in related if path == deepest))
    param = _path_text(deepest)
    if not param:
        raise APIError(400, message)
    raise APIError(400, f"{param}: {message}", param=param)


def completion_budget(req: ChatCompletionRequest | CompletionRequest, limits: Limits) -> int:
    """The completion tokens a request asks for (max_completion_tokens, else max_tokens, else the server's default);
    more than the server allows is a 400."""
    max_completion_tokens = getattr(req, "max_completion_tokens", None)
    requested = max_completion_tokens or req.max_tokens
    if requested is not None and requested > limits.max_tokens:
        param = "max_completion_tokens" if max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param} is {requested}; this server allows at most {limits.max_tokens}", param=param)
    if requested is None:
        requested = min(limits.default_max_tokens, limits.max_tokens)
    return requested


def sampling_params(req: ChatCompletionRequest | CompletionRequest, limits: Limits, prompt_tokens: int,
                    context: int) -> SamplingParams:
    """The engine's parameters for a validated request, after the server's limits and the model's context."""
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if req.n > limits.max_n:
        raise APIError(400, f"n is {req.n}; this server allows at most {limits.max_n}", param="n")
    if prompt_tokens >= context:
        raise APIError(400, f"prompt has {prompt_tokens} tokens; this model's context is {context}",
                       param=prompt_param, code="context_length_exceeded")
    if prompt_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"prompt has {prompt_tokens} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens}", param=prompt_param, code="context_length_exceeded")

    # A long prompt leaves less room: generate up to the end of the context rather than refuse.
    max_tokens = min(completion_budget(req, limits), context - prompt_tokens)
    if max_tokens == 0:
        raise APIError(400, "max_tokens is 0: only /v1/completions with echo scores a prompt without generating",
                       param="max_tokens")

    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=max(req.top_k, 0),
            top_p=req.top_p,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            n=req.n,
            seed=req.seed,
            stop=list(req.stop or []),
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:  # the models check the same ranges, so this only guards against them drifting apart
        raise APIError(400, str(e)) from e


def prompt_messages(messages: list[ChatMessage]) -> list[dict]:
    """Plain {"role", "content"} dicts for a chat template. As DeepSeek-R1 does, the reasoning of earlier assistant
    turns stays out of the prompt."""
    out = []
    for m in messages:
        # Chat templates predate OpenAI's "developer" role, which means what "system" means to them.
        role = "system" if m.role == "developer" else m.role
        content = m.text()
        if m.role == "assistant":
            content = strip_reasoning(content)
        out.append({"role": role, "content": content})
        if m.tool_calls:
            out[-1]["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            out[-1]["tool_call_id"] = m.tool_call_id
    return out


@dataclass
class ThinkingChoice:
    """What a chat request asks of the thought: whether to think, and for how many tokens at most."""

    enabled: bool = True
    budget: int | None = None


def thinking_choice(req: ChatCompletionRequest) -> ThinkingChoice:
    """The request's thinking switch, effort and budget as one decision. Thinking is on unless switched off
    (DeepSeek's default); an effort sets a budget unless one is given; a budget with thinking off is a 400."""
    enabled = True
    kwargs = req.chat_template_kwargs or {}
    for key in ("enable_thinking", "thinking"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise APIError(400, f"chat_template_kwargs.{key} must be true or false",
                               param=f"chat_template_kwargs.{key}")
            enabled = kwargs[key]
    if req.thinking is not None:
        enabled = req.thinking.type == "enabled"
    if req.reasoning_effort == "none":
        enabled = False
    budget = req.thinking_token_budget
    if budget is None and req.thinking is not None:
        budget = req.thinking.budget_tokens
    if budget is not None and not enabled:
        raise APIError(400, "a thinking budget was given but thinking is disabled", param="thinking")
    if budget is None and req.reasoning_effort not in (None, "none"):
        budget = EFFORT_BUDGET[effort_level(req.reasoning_effort)]
    return ThinkingChoice(enabled, budget)
