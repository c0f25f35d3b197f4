"""Function calling and structured outputs on the request side: the checks across fields (each a clear 400), the
prompt (the model's own chat template with `tools`, or a documented fallback), and the grammar that forces a call or
a JSON Schema in the engine.

Fallback, for templates that know nothing of tools (SmolLM2's, R1's): the tools are described in the system message
in the Hermes format, earlier calls are written into their assistant turns as `<tool_call>` blocks, and tool results
go back as user turns wrapped in `<tool_response>`; the Hermes parser then reads the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sputnik.engine.grammar import (
    Constraint,
    after_thought,
    json_answer,
    json_rule,
    literal,
    schema_error,
)
from sputnik.serve import tool_parser as tp
from sputnik.serve.protocol import APIError, ChatCompletionRequest

if TYPE_CHECKING:
    from sputnik.tokenizer import Tokenizer


@dataclass
class ToolPlan:
    """How one request uses tools: what the template gets, what the output is parsed and constrained by."""

    tools: list[dict] = field(default_factory=list)  # OpenAI tool entries, as HF templates take them
    choice: str = "none"  # none | auto | required | named
    named: str | None = None
    parallel: bool = True
    family: str = "hermes"  # the tool-call format (sputnik.serve.tool_parser.FAMILIES)
    native: bool = False  # the chat template renders tools itself

    @property
    def parses(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def parser(self) -> tp.ToolParser | None:
        return tp.make_parser(self.family, self.parallel) if self.parses else None


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


def family_of(tokenizer: Tokenizer | None) -> str:
    """The tool-call format a model writes, from its vocabulary and chat template (Hermes when nothing says)."""
    if tokenizer is None:
        return "hermes"
    template = tokenizer.chat_template or ""
    if tokenizer.token_to_id(tp.DS_CALLS_BEGIN) is not None or tp.DS_CALLS_BEGIN in template:
        return "deepseek"
    if tp.HERMES_OPEN in template:
        return "hermes"
    if tp.PYTHON_TAG in template or '"parameters"' in template:
        return "llama3"
    return "hermes"


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


def template_messages(messages: list[dict], plan: ToolPlan) -> list[dict]:
    """The messages as the chat template takes them: for a native template, arguments as objects (HF templates
    `tojson` them); else the fallback's plain turns, with the tools described in the system message."""
    if plan.native:
        return [_with_argument_objects(m) for m in messages]
    if not plan.tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages
    out: list[dict] = []
    answers = False  # whether out[-1] is a user turn made of tool results
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if answers:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            answers = True
            continue
        turn = {"role": m["role"], "content": m["content"]}
        calls = [_hermes_call(c) for c in m.get("tool_calls") or []]
        if calls:
            turn["content"] = "\n".join(([m["content"]] if m["content"] else []) + calls)
        out.append(turn)
        answers = False
    return _with_tool_system(out, plan.tools) if plan.tools else out


def _arguments(call: dict) -> Any:
    """A call's arguments as an object when they are JSON (as templates expect), else the text as sent."""
    text = call["function"]["arguments"]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _with_argument_objects(m: dict) -> dict:
    if not m.get("tool_calls"):
        return m
    calls = [{**c, "function": {**c["function"], "arguments": _arguments(c)}} for c in m["tool_calls"]]
    return {**m, "tool_calls": calls}


def _hermes_call(call: dict) -> str:
    body = {"name": call["function"]["name"], "arguments": _arguments(call)}
    return f"{tp.HERMES_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{tp.HERMES_CLOSE}"


FALLBACK_PROMPT = (
    "You can call functions to help with the user's request. Their signatures, one JSON object per line:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments inside <tool_call></tool_call> "
    "tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <arguments-object>}}\n</tool_call>\n"
    "The results come back inside <tool_response></tool_response> tags."
)


def _with_tool_system(messages: list[dict], tools: list[dict]) -> list[dict]:
    text = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


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
