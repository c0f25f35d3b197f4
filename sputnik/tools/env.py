"""Environments for multi-turn rollouts: a tool is a Python function with JSON-Schema parameters.

Names follow TRL's GRPOTrainer: `tools` (functions, or names: calculator, python, or a `module:function` path) and
`environment_factory` (a `module:function` path to a callable returning an object whose public methods are the
tools, one object per rollout, so a tool can hold state or know its problem: it gets `reset(problem)` if it has one).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sputnik.tools.calculator import calculator
from sputnik.tools.sandbox import python

_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
BUILTIN: dict[str, Callable[..., Any]] = {"calculator": calculator, "python": python}


@dataclass
class Tool:
    """A callable the model may call, with the OpenAI function entry the prompt describes it by."""

    name: str
    fn: Callable[..., Any]
    description: str
    parameters: dict

    def spec(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _arg_docs(doc: str) -> dict[str, str]:
    """Google-style `Args:` lines of a docstring: name -> text."""
    out, inside = {}, False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            inside = True
        elif inside and (m := re.match(r"\s+(\w+)(?: \([^)]*\))?: (.*)", line)):
            out[m.group(1)] = m.group(2).strip()
        elif inside and line.strip() and not line.startswith(" "):
            inside = False
    return out


def as_tool(fn: Callable[..., Any], name: str | None = None) -> Tool:
    """A function as a tool: its parameters' annotations give the JSON Schema, its docstring the descriptions."""
    doc = inspect.getdoc(fn) or ""
    hints = inspect.get_annotations(fn, eval_str=True) if inspect.isfunction(fn) or inspect.ismethod(fn) else {}
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        prop = {"type": _TYPES.get(hints.get(p.name), "string")}
        if (text := _arg_docs(doc).get(p.name)):
            prop["description"] = text
        props[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    summary = doc.split("\n\n")[0].replace("\n", " ")
    return Tool(name or fn.__name__, fn, summary, {"type": "object", "properties": props, "required": required})


def load_path(path: str) -> Any:
    """The object a `module:attribute` path names (a clear ValueError otherwise)."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"{path!r}: expected module:function")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{path!r}: {e}") from None
    return obj


def resolve(tools: list) -> list[Tool]:
    """Tools from names (calculator, python), `module:function` paths or functions."""
    out = []
    for t in tools:
        if isinstance(t, Tool):
            out.append(t)
        elif callable(t):
            out.append(as_tool(t))
        elif t in BUILTIN:
            out.append(as_tool(BUILTIN[t]))
        elif isinstance(t, str) and ":" in t:
            fn = load_path(t)
            if not callable(fn):
                raise TypeError(f"{t!r} is not callable")
            out.append(as_tool(fn))
        else:
            raise ValueError(f"unknown tool {t!r}: use {', '.join(BUILTIN)} or a module:function path")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names repeat: {names}")
    return out


@dataclass
class ToolResult:
    """One call's outcome: the text the model reads, and whether it failed (unknown tool, bad arguments, error)."""

    content: str
    error: bool


class Environment:
    """The tools of one rollout. From a factory's object its public methods are the tools; `reset(problem)` (if it
    exists) is called with the rollout's problem first."""

    def __init__(self, tools: list[Tool], state: Any = None):
        self.tools = {t.name: t for t in tools}
        self.state = state

    @classmethod
    def from_object(cls, obj: Any, problem: Any = None) -> Environment:
        if hasattr(obj, "reset"):
            obj.reset(problem)
        methods = [as_tool(getattr(obj, n), n) for n in dir(obj)
                   if not n.startswith("_") and n != "reset" and callable(getattr(obj, n))]
        return cls(methods, obj)

    def specs(self) -> list[dict]:
        return [t.spec() for t in self.tools.values()]

    def call(self, call: dict) -> ToolResult:
        """Run one parsed call ({"function": {"name", "arguments"}}); any failure is a result the model reads."""
        fn = call.get("function", {})
        tool = self.tools.get(fn.get("name"))
        if tool is None:
            return ToolResult(f"error: no tool named {fn.get('name')!r}", True)
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            return ToolResult("error: the arguments are not JSON", True)
        if not isinstance(args, dict):
            return ToolResult("error: the arguments must be a JSON object", True)
        try:
            value = tool.fn(**args)
        except Exception as e:  # noqa: BLE001 — the tool's own failure is what the model reads, not a crash of the rollout
            return ToolResult(f"error: {e}", True)
        return ToolResult(value if isinstance(value, str) else json.dumps(value), False)


def environment_maker(tools: list | None = None, environment_factory: str | Callable | None = None
                      ) -> Callable[[Any], Environment] | None:
    """A function problem -> Environment for the configured tools (None when there are none)."""
    if environment_factory is not None:
        factory = load_path(environment_factory) if isinstance(environment_factory, str) else environment_factory
        return lambda problem: Environment.from_object(factory(), problem)
    if not tools:
        return None
    resolved = resolve(tools)
    return lambda problem: Environment(resolved)
