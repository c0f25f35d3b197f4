"""Function calling and structured outputs on the request side: the checks across fields (each a clear 400), the
request's ToolPlan, and the grammar that forces a call or a JSON Schema in the engine. The prompt side (templates,
the Hermes fallback) and the parsers live in sputnik.tools, which training shares.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from sputnik.engine.grammar import (
    Constraint,
    after_thought,
    json_answer,
    json_rule,
    literal,
    schema_error,
)
from sputnik.serve.protocol import APIError, ChatCompletionRequest
from sputnik.tools import parser as tp
from sputnik.tools.render import ToolPlan, family_of

if TYPE_CHECKING:
    from sputnik.tokenizer import Tokenizer


def _fail(message: str, param: str) -> None:
    raise APIError(400, f"{param}: {message}", param=param)


def check_tools(req: ChatCompletionRequest) -> None:
    """The checks pydantic's field types cannot make; each failure is a 400 naming the parameter."""
    if not req.tools:
        for name in ("tool_choice", "parallel_tool_calls"):
            if getattr(req, name) is not None:
                _fail("only allowed when tools are specified", name)
    names: list[str] = []
    for i, tool in enumerate(req.tools or []):
        fn = tool.function
        if fn.name in names:
            _fail(f"duplicate function name {fn.name!r}", f"tools[{i}].function.name")
        names.append(fn.name)
        if fn.parameters is not None:
            _check_schema(fn.parameters, f"tools[{i}].function.parameters")
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
        _fail(f"no function named {choice.function.name!r} in tools (they are: {', '.join(names)})",
              "tool_choice.function.name")
    rf = req.response_format
    if rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            _fail("required when type is json_schema", "response_format.json_schema")
        if rf.json_schema.schema_ is None:
            _fail("required", "response_format.json_schema.schema")
        _check_schema(rf.json_schema.schema_, "response_format.json_schema.schema")
    _check_messages(req)


def _check_schema(schema: dict, param: str) -> None:
    if param.startswith("tools") and schema.get("type", "object") != "object":
        _fail("a function's parameters must be a JSON Schema of type 'object'", param)
    error = schema_error(schema)
    if error:
        _fail(f"not a JSON Schema this server can enforce: {error}", param)


def _check_messages(req: ChatCompletionRequest) -> None:
    """Calls only on assistant turns, ids unique; every tool message answers a call made before it."""
    calls: set[str] = set()
    for i, m in enumerate(req.messages):
        if m.tool_calls and m.role != "assistant":
            _fail("only assistant messages carry tool_calls", f"messages[{i}].tool_calls")
        for j, c in enumerate(m.tool_calls or []):
            if c.id in calls:
                _fail(f"duplicate tool call id {c.id!r}", f"messages[{i}].tool_calls[{j}].id")
            calls.add(c.id)
        if m.role == "tool":
            if m.tool_call_id is None:
                _fail("required for a tool message", f"messages[{i}].tool_call_id")
            if m.tool_call_id not in calls:
                _fail(f"{m.tool_call_id!r} answers no tool call of an earlier assistant message",
                      f"messages[{i}].tool_call_id")
        elif m.tool_call_id is not None:
            _fail("only allowed on a tool message", f"messages[{i}].tool_call_id")


def plan_for(req: ChatCompletionRequest, tokenizer: Tokenizer | None) -> ToolPlan:
    """The request's tool plan (after check_tools has passed)."""
    if not req.tools:
        return ToolPlan()
    choice = req.tool_choice or "auto"
    named = None if isinstance(choice, str) else choice.function.name
    template = tokenizer.chat_template or "" if tokenizer is not None else ""
    native = "tools" in template
    return ToolPlan([t.model_dump(exclude_none=True) for t in req.tools], choice if named is None else "named",
                    named, req.parallel_tool_calls is not False, family_of(tokenizer) if native else "hermes",
                    native)


# ---------------------------------------------------------------------------------------------------- grammars


def _call_schema(tool: dict, args_key: str) -> dict:
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                             args_key: fn.get("parameters") or {"type": "object"}},
            "required": ["name", args_key], "additionalProperties": False}


def _calls_rule(plan: ToolPlan, tokenizer: Tokenizer) -> str:
    """Lark rules for `calls`: one forced call (or one or more, when parallel), in the plan's format."""
    tools = [t for t in plan.tools if plan.named in (None, t["function"]["name"])]
    many = plan.parallel and plan.choice == "required"
    lit = lambda text: literal(tokenizer, text)
    if plan.family == "deepseek":
        heads = [f'{json.dumps(t["function"]["name"] + chr(10) + tp.DS_FENCE_OPEN)} '
                 f'{json_rule(t["function"].get("parameters") or {"type": "object"})} {json.dumps(tp.DS_FENCE_CLOSE)}'
                 for t in tools]
        return (f"calls: {lit(tp.DS_CALLS_BEGIN)} call{'+' if many else ''} {lit(tp.DS_CALLS_END)}\n"
                f"call: {lit(tp.DS_CALL_BEGIN)} \"function\" {lit(tp.DS_SEP)} ({' | '.join(heads)}) "
                f"{lit(tp.DS_CALL_END)}\n")
    key = "parameters" if plan.family == "llama3" else "arguments"
    schemas = [_call_schema(t, key) for t in tools]
    body = json_rule({"anyOf": schemas} if len(schemas) > 1 else schemas[0])
    if plan.family == "llama3":
        more = ' ("; " body)*' if many else ""
        return f"calls: body{more}\nbody: {body}\n"
    more = ' ("\\n" call)*' if many else ""
    return (f"calls: call{more}\n"
            f'call: {lit(tp.HERMES_OPEN)} "\\n" body "\\n" {lit(tp.HERMES_CLOSE)}\nbody: {body}\n')


def output_constraint(req: ChatCompletionRequest, plan: ToolPlan, tokenizer: Tokenizer,
                      in_reasoning: bool) -> Constraint | None:
    """The grammar the engine holds this request's output to: a forced call (tool_choice required or named), else
    response_format json_schema / json_object, else none."""
    if plan.tools and plan.choice in ("required", "named"):
        return Constraint.lark(after_thought("calls", tokenizer, in_reasoning) + _calls_rule(plan, tokenizer))
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    schema = rf.json_schema.schema_ if rf.type == "json_schema" else {"type": "object"}
    return json_answer(schema, tokenizer, in_reasoning)


def tool_plan(req: ChatCompletionRequest, tokenizer: Tokenizer | None) -> ToolPlan:
    """check_tools, then the request's plan."""
    check_tools(req)
    return plan_for(req, tokenizer)
