"""Tool prompts: how tools, tool calls and tool results become chat-template messages, the model's tool-call
format (its family), and a request's ToolPlan. Shared by the server and by multi-turn rollouts (training, eval).

Fallback, for templates that know nothing of tools (SmolLM2's, R1's): the tools are described in the system message
in the Hermes format, earlier calls are written into their assistant turns as `<tool_call>` blocks, and tool results
go back as user turns wrapped in `<tool_response>`; the Hermes parser then reads the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sputnik.tools import parser as tp

if TYPE_CHECKING:
    from sputnik.tokenizer import Tokenizer


@dataclass
class ToolPlan:
    """How one request uses tools: what the template gets, what the output is parsed and constrained by."""

    tools: list[dict] = field(default_factory=list)  # OpenAI tool entries, as HF templates take them
    choice: str = "none"  # none | auto | required | named
    named: str | None = None
    parallel: bool = True
    family: str = "hermes"  # the tool-call format (sputnik.tools.parser.FAMILIES)
    native: bool = False  # the chat template renders tools itself

    @property
    def parses(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def parser(self) -> tp.ToolParser | None:
        return tp.make_parser(self.family, self.parallel) if self.parses else None


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


PLAIN_RESPONSE = "\n<tool_response>\n{content}\n</tool_response>\n"
_SENTINEL = "SPUTNIK_TOOL_TURN"


def tool_glue(results: list[str], tokenizer: Tokenizer | None = None, plan: ToolPlan | None = None,
              system: str | None = None) -> str:
    """The text between a model's tool-call turn and its next turn: the end of its turn, the tool results as the
    chat template writes tool messages, and the next assistant header. Without a chat template (plain prompts) the
    results are `<tool_response>` blocks.

    Rendered on a stand-in conversation and cut out by difference, so it does not depend on what the model wrote
    (templates that rewrite earlier assistant turns, such as R1's, which drops their thoughts, render it alike)."""
    if tokenizer is None or plan is None or not tokenizer.chat_template:
        return "".join(PLAIN_RESPONSE.format(content=r) for r in results)
    head = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "x"}]
    turn = {"role": "assistant", "content": _SENTINEL}
    answers = [{"role": "tool", "content": r, "tool_call_id": f"call_{i}"} for i, r in enumerate(results)]
    extra = {"tools": plan.tools} if plan.native else {}
    before = tokenizer.apply_chat_template(template_messages(head + [turn], plan), add_generation_prompt=False,
                                           tokenize=False, **extra)
    after = tokenizer.apply_chat_template(template_messages(head + [turn] + answers, plan),
                                          add_generation_prompt=True, tokenize=False, **extra)
    at = before.rfind(_SENTINEL)
    if at < 0 or not after.startswith(before):
        raise ValueError("this chat template renders tool results in a way sputnik cannot cut out of the history")
    return before[at + len(_SENTINEL):] + after[len(before):]


def tool_prompt(messages: list[dict], tokenizer: Tokenizer, plan: ToolPlan) -> str:
    """A conversation's prompt text with the plan's tools offered (natively, or by the fallback's system message)."""
    extra = {"tools": plan.tools} if plan.native else {}
    return tokenizer.apply_chat_template(template_messages(messages, plan), add_generation_prompt=True,
                                         tokenize=False, **extra)


def plan_of(tools: list[dict], tokenizer: Tokenizer | None) -> ToolPlan:
    """The plan for offering `tools` (OpenAI entries) with tool_choice auto: native when the template takes tools."""
    template = (tokenizer.chat_template or "") if tokenizer is not None else ""
    native = "tools" in template
    return ToolPlan(list(tools), "auto" if tools else "none", None, True,
                    family_of(tokenizer) if native else "hermes", native)
