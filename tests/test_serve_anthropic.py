"""/anthropic/v1/messages over real HTTP with the official anthropic client: text, thinking blocks, system, streaming
events, usage, x-api-key auth, Anthropic-style errors, count_tokens, and tools validated on their way to /v1's path."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from live import ANSWER, THOUGHT, Live

from sputnik.serve.config import ServeConfig
from sputnik.serve.keys import KeyStore
from sputnik.serve.protocol import ChatCompletionRequest

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
GREEDY = {"temperature": 0}  # (this client no longer takes temperature as an argument; the API still does)


@pytest.fixture(scope="module")
def server(think_model, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.db"
    key = KeyStore(keys).create("claude-code")[1]
    with Live(ServeConfig(model=str(think_model), dtype="float32", served_name="think", keys=keys,
                          rate_limit=0)) as live:
        live.wait_ready()
        live.key = key
        yield live


def client(live, key=None):
    return anthropic.Anthropic(base_url=f"{live.url}/anthropic", api_key=key or live.key, max_retries=0)


def test_message_with_thinking_and_text_blocks(server):
    r = client(server).messages.create(model="think", max_tokens=64, messages=QUESTION, extra_body=GREEDY)
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == THOUGHT and r.content[1].text == ANSWER
    assert r.stop_reason == "end_turn" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0) > 0 and r.usage.output_tokens > 0
    short = client(server).messages.create(model="think", max_tokens=3, messages=QUESTION, extra_body=GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_system_and_history_blocks(server):
    history = QUESTION + [{"role": "assistant", "content": [{"type": "thinking", "thinking": "long " * 40,
                                                              "signature": ""},
                                                             {"type": "text", "text": ANSWER}]},
                          {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    c = client(server)
    r = c.messages.create(model="think", max_tokens=64, system="You are helpful.", messages=history,
                          extra_body=GREEDY)
    assert r.content[-1].text == ANSWER
    # Earlier thinking stays out of the prompt, as on /v1; the system prompt goes in.
    counted = c.messages.count_tokens(model="think", system="You are helpful.", messages=history).input_tokens
    plain = [QUESTION[0], {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "Hi"}]
    assert counted == c.messages.count_tokens(model="think", system="You are helpful.", messages=plain).input_tokens
    longer = c.messages.count_tokens(model="think", system="You are helpful. " * 5, messages=plain).input_tokens
    assert longer > counted


def test_streaming_events(server):
    c = client(server)
    with c.messages.stream(model="think", max_tokens=64, messages=QUESTION, extra_body=GREEDY) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].thinking == THOUGHT and final.content[1].text == ANSWER
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    raw = [e for e in events if e in ("message_start", "content_block_start", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop")]
    assert raw[0] == "message_start" and raw[-2:] == ["message_delta", "message_stop"]
    assert raw.count("content_block_start") == raw.count("content_block_stop") == 2
    with httpx.stream("POST", f"{server.url}/anthropic/v1/messages", headers={"x-api-key": server.key},
                      json={"model": "think", "max_tokens": 64, "messages": QUESTION, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == "event: message_start" and lines[-2] == "event: message_stop"
    deltas = [line for line in lines if '"thinking_delta"' in line or '"text_delta"' in line]
    assert deltas and all(line.startswith("data: ") for line in deltas)


def test_thinking_disabled(server):
    r = client(server).messages.create(model="think", max_tokens=30, messages=QUESTION, extra_body=GREEDY,
                                       thinking={"type": "disabled"})
    assert all(b.type != "thinking" for b in r.content)


def test_auth_and_errors_are_anthropic_style(server):
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(server, key="sk-wrong").messages.create(model="think", max_tokens=8, messages=QUESTION)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    url, headers = f"{server.url}/anthropic/v1/messages", {"x-api-key": server.key}
    for body, status in (({"model": "think", "messages": QUESTION}, 400),  # max_tokens is required
                         ({"model": "think", "max_tokens": 8, "messages": []}, 400),
                         ({"model": "think", "max_tokens": 8, "messages": QUESTION, "temperature": 1.5}, 400),
                         ({"model": "think", "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, 400),
                         ({"model": "think", "max_tokens": 8, "messages": [{"role": "user", "content": [
                             {"type": "image", "source": {}}]}]}, 400),
                         ({"model": "think", "max_tokens": 8, "messages": QUESTION,
                           "thinking": {"type": "enabled", "budget_tokens": 8}}, 400),
                         ({"model": "gpt-9", "max_tokens": 8, "messages": QUESTION}, 404),
                         ([1], 400)):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == status, (body, r.text)
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] and err["error"]["message"], r.text
    r = httpx.post(url, content=b"{nope", headers={**headers, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_every_error_path_answers_anthropic_style(server):
    """Under /anthropic every refusal has Anthropic's body, Starlette's (unknown route, wrong method) and the body
    limit's (by Content-Length and chunked) included; /v1 keeps OpenAI's."""
    base, headers = f"{server.url}/anthropic/v1", {"x-api-key": server.key}
    small = {"model": "think", "max_tokens": 8, "messages": QUESTION}
    big = {**small, "messages": [{"role": "user", "content": "a" * (2 << 20)}]}

    def chunked():  # no Content-Length: the limit trips while the body is read
        yield b'{"model": "think", "max_tokens": 8, "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}]}'

    as_json = {**headers, "content-type": "application/json"}
    cases = [(httpx.post(f"{base}/nope", headers=headers, json=small), 404, "not_found_error"),
             (httpx.get(f"{base}/messages", headers=headers), 405, "invalid_request_error"),
             (httpx.post(f"{base}/messages", headers=headers, json=big), 413, "request_too_large"),
             (httpx.post(f"{base}/messages/count_tokens", headers=headers, json=big), 413, "request_too_large"),
             (httpx.post(f"{base}/messages", headers=as_json, content=chunked()), 413, "request_too_large"),
             (httpx.post(f"{base}/messages", headers={"x-api-key": "sk-wrong"}, json=small), 401,
              "authentication_error"),
             (httpx.post(f"{base}/messages", json=small), 401, "authentication_error"),
             (httpx.post(f"{base}/messages", headers=as_json, content=b'{"model": "think",'), 400,
              "invalid_request_error")]
    for r, status, kind in cases:
        assert r.status_code == status, (r.request.method, r.request.url, r.text)
        body = r.json()
        assert set(body) == {"type", "error"} and body["type"] == "error", r.text
        assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, r.text
        assert body["error"]["message"], r.text
    assert "allow" in {k.lower() for k in cases[1][0].headers}  # the 405 still says which methods the route takes
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": big["messages"]}, headers=headers)
    assert r.status_code == 413 and set(r.json()) == {"error"}  # OpenAI's shape outside /anthropic

    c = client(server)
    with pytest.raises(anthropic.RequestTooLargeError) as e:
        c.messages.create(**big)
    assert e.value.status_code == 413 and e.value.body["error"]["type"] == "request_too_large"
    with pytest.raises(anthropic.NotFoundError) as e:
        c.post("/v1/nope", cast_to=object, body=small)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.APIStatusError) as e:
        c.get("/v1/messages", cast_to=object)
    assert e.value.status_code == 405 and e.value.body["error"]["type"] == "invalid_request_error"


TOOLS = [{"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}]


def test_tools_are_validated_and_go_to_the_chat_path(server):
    url, headers = f"{server.url}/anthropic/v1/messages", {"x-api-key": server.key}
    bad = httpx.post(url, headers=headers, json={"model": "think", "max_tokens": 8, "messages": QUESTION,
                                                 "tools": [{"name": "bad name!", "input_schema": {}}]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    forced = {"model": "think", "max_tokens": 8, "messages": QUESTION, "tools": TOOLS,
              "tool_choice": {"type": "tool"}}
    r = httpx.post(url, headers=headers, json=forced)
    assert r.status_code == 400  # a forced tool needs its name
    if "tools" not in ChatCompletionRequest.model_fields:
        # /v1 does not take tools yet: refused with a reason, never silently dropped.
        for choice in ({"type": "tool", "name": "get_weather"}, {"type": "auto"}):
            r = httpx.post(url, headers=headers, json={**forced, "tool_choice": choice})
            assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
        return
    c = client(server)
    cut = c.messages.create(model="think", max_tokens=8, messages=QUESTION, tools=TOOLS,
                            tool_choice={"type": "tool", "name": "get_weather"})
    assert cut.stop_reason == "max_tokens"  # a call cut off mid-arguments is still a well-formed response
    # The test model knows one reply: with its thought closed and the city bounded, the grammar makes the call.
    r = c.messages.create(model="think", max_tokens=256, messages=QUESTION, tools=TOOLS,
                          tool_choice={"type": "tool", "name": "get_weather"}, thinking={"type": "disabled"},
                          extra_body={"temperature": 0})  # greedy: a sampled tiny model may pad JSON with spaces
    use = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and use and use[0].name == "get_weather" and "city" in use[0].input
    free = c.messages.create(model="think", max_tokens=64, messages=QUESTION, tools=TOOLS)
    assert free.content
