"""Function calling and structured outputs over real HTTP: the official openai client (stream and not), raw HTTP for
every malformed request, and the OpenAI Agents SDK running a tool loop against the server.

Forced calls and json_schema run on the real SmolLM2-135M (the grammar makes even it write valid calls); `auto`, which
nothing forces, runs on a tiny model trained here to call a tool when it has one.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from live import Live, memorize

from sputnik.serve.config import ServeConfig
from sputnik.serve.protocol import ChatCompletionRequest, parse_request, prompt_messages
from sputnik.serve.tools import tool_plan
from sputnik.tools.render import template_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 30},
                                                   "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
                   "required": ["query", "limit"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
RESULT_TURN = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
FINAL = "It is sunny in Paris."
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"], "additionalProperties": False,
}


@pytest.fixture(scope="module")
def smol(default_gguf):
    with Live(ServeConfig(model=str(default_gguf), dtype="float32", no_auth=True, served_name="smol", rate_limit=0,
                          keepalive_s=0.2)) as live:
        yield live.wait_ready()


def prompt_ids(tok, body: dict) -> list[int]:
    """The prompt the server builds for this request body (the same functions it calls)."""
    req = parse_request(ChatCompletionRequest, body)
    messages = template_messages(prompt_messages(req.messages), tool_plan(req, tok))
    return tok.apply_chat_template(messages, tokenize=True)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, default_tokenizer):
    """A tiny model trained here to call get_weather when it has tools, and to answer from the tool's result."""
    from sputnik.checkpoint import save_model

    tok = default_tokenizer
    end = tok.token_to_id("<|im_end|>")
    rows = [(prompt_ids(tok, {"messages": ASK, "tools": TOOLS}), CALL),
            (prompt_ids(tok, {"messages": RESULT_TURN, "tools": TOOLS}), FINAL),
            (prompt_ids(tok, {"messages": ASK}), "I cannot look that up.")]
    rows = [(p, tok.encode(r) + [end]) for p, r in rows]
    model, loss = memorize(rows, tok.vocab_size, max_seq_len=1024, steps=80)
    assert loss.item() < 0.05, f"the tool model did not learn its replies (loss {loss.item():.3f})"
    path = tmp_path_factory.mktemp("tool-model")
    save_model(model, path, tokenizer=tok)
    with Live(ServeConfig(model=str(path), dtype="float32", no_auth=True, served_name="tool", rate_limit=0)) as live:
        yield live.wait_ready()


def streamed(chunks) -> tuple[str, list[dict], str, int]:
    """(content, calls, finish_reason, argument pieces) assembled from a stream as the openai client does."""
    content, calls, finish, pieces = "", {}, None, 0
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
                pieces += 1
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, pieces


def schema_of(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


# ---------------------------------------------------------------- forced calls on the real model


@pytest.mark.parametrize("choice, name", [
    ("required", None), ({"type": "function", "function": {"name": "search"}}, "search")])
def test_forced_call_is_schema_valid_stream_and_not(smol, choice, name):
    client = smol.client()
    kw = {"model": "smol", "messages": ASK, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False,
          "temperature": 0, "max_tokens": 120}
    r = client.chat.completions.create(**kw)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.id.startswith("call_") and call.type == "function" and (name is None or call.function.name == name)
    jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))

    content, calls, finish, pieces = streamed(client.chat.completions.create(**kw, stream=True))
    assert (content, finish) == ("", "tool_calls") and pieces > 3
    assert [(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)]


def test_required_with_parallel_calls_gives_one_or_more(smol):
    r = smol.client().chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="required",
                                              temperature=0, max_tokens=200)
    calls = r.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    finished = calls if r.choices[0].finish_reason == "tool_calls" else calls[:-1]  # the last may be cut short
    for c in finished:
        jsonschema.validate(json.loads(c.function.arguments), schema_of(c.function.name))


def test_tool_choice_none_answers_in_text(smol):
    r = smol.client().chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="none",
                                              temperature=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_result_turn_reaches_the_prompt(smol):
    client = smol.client()
    base = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, max_tokens=1)
    r = client.chat.completions.create(model="smol", messages=RESULT_TURN, tools=TOOLS, max_tokens=20, temperature=0)
    assert r.usage.prompt_tokens > base.usage.prompt_tokens + 20  # the call and its result are in the prompt
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_strict_nested(smol, stream):
    kw = {"model": "smol", "messages": [{"role": "user", "content": "Describe a person as JSON."}], "temperature": 0,
          "max_tokens": 200, "response_format": {"type": "json_schema", "json_schema": {
              "name": "person", "schema": PERSON, "strict": True}}}
    if stream:
        content, _, finish, _ = streamed(smol.client().chat.completions.create(**kw, stream=True))
    else:
        r = smol.client().chat.completions.create(**kw)
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(content), PERSON)


def test_json_object_is_an_object(smol):
    r = smol.client().chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                              response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


# ---------------------------------------------------------------- auto, on a model that calls by itself


def test_auto_call_and_final_answer(tool_server):
    client = tool_server.client()
    r = client.chat.completions.create(model="tool", messages=ASK, tools=TOOLS, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather",
                                                                         {"city": "Paris", "unit": "celsius"})
    content, calls, finish, pieces = streamed(client.chat.completions.create(model="tool", messages=ASK, tools=TOOLS,
                                                                             temperature=0, stream=True))
    assert (content, finish, pieces > 3) == ("", "tool_calls", True)
    assert calls[0]["arguments"] == call.function.arguments

    final = client.chat.completions.create(model="tool", messages=RESULT_TURN, tools=TOOLS, temperature=0)
    assert final.choices[0].message.content == FINAL and final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None


def test_auto_without_tools_and_none_leave_text_alone(tool_server):
    client = tool_server.client()
    r = client.chat.completions.create(model="tool", messages=ASK, temperature=0)
    assert r.choices[0].message.content == "I cannot look that up."
    r = client.chat.completions.create(model="tool", messages=ASK, tools=TOOLS, tool_choice="none", temperature=0)
    assert r.choices[0].message.content == CALL and r.choices[0].message.tool_calls is None


def test_upstream_forwards_tools_and_returns_its_calls(tool_server):
    with Live(ServeConfig(upstream=f"{tool_server.url}/v1", no_auth=True)) as front:
        client = front.wait_ready().client()
        r = client.chat.completions.create(model="tool", messages=ASK, tools=TOOLS, temperature=0)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather",
                                                                             {"city": "Paris", "unit": "celsius"})
        content, calls, finish, _ = streamed(client.chat.completions.create(model="tool", messages=ASK, tools=TOOLS,
                                                                            temperature=0, stream=True))
        assert (content, finish, calls[0]["arguments"]) == ("", "tool_calls", call.function.arguments)
        final = client.chat.completions.create(model="tool", messages=RESULT_TURN, tools=TOOLS, temperature=0)
        assert final.choices[0].message.content == FINAL


# ---------------------------------------------------------------- malformed requests


def _body(**kw):
    return {"messages": ASK, "max_tokens": 2, **kw}


def _fn(name="f", **kw):
    return {"type": "function", "function": {"name": name, **kw}}


BAD_PARAMS = {"type": "object", "properties": {"a": {"type": "strin"}}}


@pytest.mark.parametrize("body, param", [
    (_body(tools=[{"type": "function", "function": {}}]), "tools[0].function.name"),
    (_body(tools=[_fn("my tool")]), "tools[0].function.name"),
    (_body(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools[0].type"),
    (_body(tools=[_fn(), _fn()]), "tools[1].function.name"),
    (_body(tools=[_fn(parameters=BAD_PARAMS)]), "tools[0].function.parameters"),
    (_body(tools=[_fn(parameters={"type": "array"})]), "tools[0].function.parameters"),
    (_body(tools=[_fn(parameters={"$ref": "#/$defs/nowhere"})]), "tools[0].function.parameters"),
    (_body(tools=[_fn()], tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice.function.name"),
    (_body(tools=[_fn()], tool_choice="sometimes"), "tool_choice"),
    (_body(tool_choice="auto"), "tool_choice"),
    (_body(parallel_tool_calls=False), "parallel_tool_calls"),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": RESULT_TURN[:1] + RESULT_TURN[2:]}, "messages[1].tool_call_id"),
    ({"messages": [{**ASK[0], "tool_calls": RESULT_TURN[1]["tool_calls"]}]}, "messages[0].tool_calls"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": {"a": 1}}}]}]}, "messages[1].tool_calls[0].function.arguments"),
    ({"messages": RESULT_TURN[:2] * 2}, "messages[3].tool_calls[0].id"),
    ({"messages": [{**ASK[0], "tool_call_id": "x"}]}, "messages[0].tool_call_id"),
    (_body(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (_body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
    (_body(response_format={"type": "json_schema", "json_schema": {"schema": PERSON}}),
     "response_format.json_schema.name"),
    (_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_PARAMS}}),
     "response_format.json_schema.schema"),
    (_body(response_format={"type": "json_object", "json_schema": {"name": "x", "schema": PERSON}}),
     "response_format.json_schema"),
    (_body(response_format={"type": "xml"}), "response_format.type"),
])
def test_malformed_requests_get_400_naming_the_parameter(smol, body, param):
    r = httpx.post(f"{smol.url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"].startswith(param)


def test_openai_client_raises_bad_request(smol):
    with pytest.raises(openai.BadRequestError, match="no function named 'nope'"):
        smol.client().chat.completions.create(model="smol", messages=ASK, tools=TOOLS,
                                              tool_choice={"type": "function", "function": {"name": "nope"}})


# ---------------------------------------------------------------- an agent framework's tool loop


def test_openai_agents_sdk_runs_a_tool_loop(smol):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        seen.append(city)
        return f"The weather in {city} is sunny, 21 degrees."

    client = openai.AsyncOpenAI(base_url=f"{smol.url}/v1", api_key="none", max_retries=0)
    agent = Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                  model=OpenAIChatCompletionsModel(model="smol", openai_client=client),
                  model_settings=ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=60,
                                               parallel_tool_calls=False))
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert len(seen) == 1 and seen[0]  # the forced call ran the tool with a city the model chose
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert isinstance(result.final_output, str) and result.final_output
