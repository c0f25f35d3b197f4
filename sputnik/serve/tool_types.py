"""The request shapes of function calling and structured outputs (OpenAI's): tools, tool_choice, the tool calls of
earlier assistant turns, and response_format json_schema. Checks across fields live in sputnik.serve.tools."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False)

# OpenAI's rule for function and response-format names.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    """A function the model may call: its name, what it does, and its parameters as a JSON Schema."""

    model_config = _CONFIG

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """One entry of `tools`."""

    model_config = _CONFIG

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = _CONFIG

    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """tool_choice naming the function the model must call."""

    model_config = _CONFIG

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    model_config = _CONFIG

    name: str = Field(min_length=1)
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    """A call an earlier assistant turn made, as clients send it back."""

    model_config = _CONFIG

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class JSONSchemaFormat(BaseModel):
    """response_format json_schema's schema and its name."""

    model_config = _CONFIG

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    # `schema` would shadow a BaseModel attribute: the field goes by an alias.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
