"""Tool prompts: a template that takes `tools` renders them itself; one that does not gets the Hermes fallback."""

import json

import pytest

from sputnik.serve.protocol import ChatCompletionRequest, parse_request, prompt_messages
from sputnik.serve.tools import tool_plan
from sputnik.tools.render import family_of, template_messages
from sputnik.tokenizer import Tokenizer

# A ChatML template with tools in the Hermes/Qwen2.5 manner, as HF templates write it.
NATIVE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TURNS = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "a", "content": "sunny"},
    {"role": "tool", "tool_call_id": "b", "content": "rain"},
]


def render(tok, body):
    req = parse_request(ChatCompletionRequest, body)
    plan = tool_plan(req, tok)
    messages = template_messages(prompt_messages(req.messages), plan)
    return plan, tok.apply_chat_template(messages, **({"tools": plan.tools} if plan.native else {}))


def with_template(tok: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token, chat_template=template)


def test_native_template_renders_tools_and_calls(default_tokenizer):
    plan, text = render(with_template(default_tokenizer, NATIVE), {"messages": TURNS, "tools": [TOOL]})
    assert plan.native and plan.family == "hermes"
    assert json.dumps(TOOL) in text
    # arguments reach the template as objects, so its tojson writes them once, not as a quoted string
    assert '"arguments": {"city": "Paris"}}' in text and "<tool_response>\nrain\n</tool_response>" in text


def test_fallback_describes_tools_and_writes_turns_as_text(default_tokenizer):
    assert "tools" not in default_tokenizer.chat_template  # SmolLM2's template knows nothing of tools
    plan, text = render(default_tokenizer, {"messages": TURNS, "tools": [TOOL]})
    assert not plan.native and plan.family == "hermes"
    system = text.split("<|im_end|>")[0]
    assert "<tools>\n" + json.dumps(TOOL) + "\n</tools>" in system and "<tool_call>" in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>') in text
    # the two results are one user turn, as Hermes models were trained
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>" \
           "<|im_end|>" in text


def test_no_tools_leaves_the_prompt_as_it_was(default_tokenizer):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    _, text = render(default_tokenizer, body)
    assert text == default_tokenizer.apply_chat_template(body["messages"])


@pytest.mark.parametrize("template, family", [
    (NATIVE, "hermes"),
    ("{{ '<|python_tag|>' }}{% for t in tools %}{{ t | tojson }}{% endfor %}", "llama3"),
    ("{% for t in tools %}<｜tool▁calls▁begin｜>{% endfor %}", "deepseek"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes"),
])
def test_family_from_the_template(default_tokenizer, template, family):
    assert family_of(with_template(default_tokenizer, template)) == family
