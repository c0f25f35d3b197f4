"""`sputnik serve` over real HTTP: the official openai client, SSE, errors, auth, limits, continuous batching."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from live import ANSWER, REPLY, THOUGHT, Live, free_port
from sputnik.serve.config import ServeConfig
from sputnik.serve.keys import KeyStore



@pytest.fixture(scope="module")
def think_server(think_model):
    with Live(ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True, keepalive_s=0.2)) as live:
        yield live.wait_ready()


@pytest.fixture(scope="module")
def smol_server(default_gguf):
    with Live(ServeConfig(model=str(default_gguf), dtype="float32", no_auth=True, max_batch=32, keepalive_s=0.2,
                          rate_limit=0)) as live:
        yield live.wait_ready()


def ask(client, **kw):
    kw.setdefault("model", "think")
    kw.setdefault("messages", [{"role": "user", "content": "What is 2 + 2?"}])
    return client.chat.completions.create(**{k: v for k, v in kw.items() if v is not None})


# ---------------------------------------------------------------- the openai client, content and reasoning


def test_openai_client_reads_content_and_reasoning(think_server):
    r = ask(think_server.client(), temperature=0)
    msg = r.choices[0].message
    assert msg.content == ANSWER
    assert msg.model_extra["reasoning_content"] == THOUGHT
    assert r.choices[0].finish_reason == "stop"
    details = r.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < r.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in think_server.client().models.list().data] == [r.model]


def test_streaming_sends_reasoning_first_then_content_then_usage(think_server):
    chunks = list(ask(think_server.client(), temperature=0, stream=True, stream_options={"include_usage": True}))
    kinds, thought, content = [], "", ""
    for c in chunks[:-1]:
        delta = c.choices[0].delta
        r = (delta.model_extra or {}).get("reasoning_content")
        if r:
            kinds.append("r")
            thought += r
        if delta.content:
            kinds.append("c")
            content += delta.content
    assert (thought, content) == (THOUGHT, ANSWER)
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds  # every reasoning delta first
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_raw_sse_ends_with_done(think_server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{think_server.url}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_earlier_reasoning_stays_out_of_the_prompt(think_server):
    client = think_server.client()
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER},
             {"role": "user", "content": "x"}]
    with_thoughts = [plain[0], {"role": "assistant", "content": ANSWER, "reasoning_content": "long " * 50},
                     plain[2]]
    inline = [plain[0], {"role": "assistant", "content": REPLY}, plain[2]]
    counts = {ask(client, messages=m, max_tokens=1).usage.prompt_tokens for m in (plain, with_thoughts, inline)}
    assert len(counts) == 1


def test_logprobs_and_top_logprobs(think_server):
    r = ask(think_server.client(), temperature=0, logprobs=True, top_logprobs=3, max_tokens=5)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob <= 0 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob


def test_legacy_completions_with_n_echo_and_logprobs(think_server):
    client = think_server.client()
    r = client.completions.create(model="think", prompt=["Hello", "World"], max_tokens=4, n=2, temperature=1.0, seed=3,
                                  logprobs=2, echo=True)
    assert len(r.choices) == 4 and sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("Hello") and r.choices[3].text.startswith("World")
    # With echo the log-probs cover the prompt too (its first token has none), then the 4 generated tokens.
    assert all(len(c.logprobs.tokens) > 4 and c.logprobs.token_logprobs[0] is None for c in r.choices)
    assert all(len(top) == 2 for c in r.choices for top in c.logprobs.top_logprobs[-4:])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="think", prompt="Hello", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == client.completions.create(model="think", prompt="Hello", max_tokens=4, temperature=0
                                                 ).choices[0].text


def test_json_mode_holds_the_answer_to_json(think_server):
    # The model was trained to answer in prose after a thought; its vocabulary has no think token, so the grammar
    # gives it no thought and holds it to JSON from the first token.
    r = ask(think_server.client(), response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    msg = r.choices[0].message
    assert "reasoning_content" not in msg.model_extra and msg.content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(msg.content), dict)


# ---------------------------------------------------------------- error paths


@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ([1, 2], 400, None),
])
def test_invalid_requests_get_openai_style_errors(think_server, body, status, param):
    r = httpx.post(f"{think_server.url}/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_sixteen_stop_strings_as_deepseek_takes(think_server):
    c = think_server.client()
    stops = [f"never {i}" for i in range(15)] + ["is 4"]
    r = ask(c, temperature=0, stop=stops)
    assert r.choices[0].message.content == ANSWER[: ANSWER.index("is 4")] and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, temperature=0, stop=stops + ["one more"])
    assert e.value.body["param"] == "stop" and "at most 16" in e.value.body["message"]


def test_not_json_and_too_large_bodies(think_server):
    r = httpx.post(f"{think_server.url}/v1/chat/completions", content=b"{nope", headers={"content-type":
                                                                                          "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    big = {"messages": [{"role": "user", "content": "a" * (2 << 20)}]}
    r = httpx.post(f"{think_server.url}/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_health_is_503_while_loading(think_model):
    release = threading.Event()

    def slow(cfg):
        from sputnik.serve.app import load_backend

        release.wait(30)
        return load_backend(cfg)

    with Live(ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True), loader=slow) as live:
        assert httpx.get(f"{live.url}/health").status_code == 503
        r = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "Retry-After" in r.headers
        release.set()
        live.wait_ready()
        assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}


def test_no_auth_only_on_loopback():
    with pytest.raises(ValueError, match="loopback"):
        ServeConfig(host="0.0.0.0", no_auth=True)
    assert ServeConfig(host="::1", no_auth=True).no_auth is True


# ---------------------------------------------------------------- keys, rate limits, CORS


def test_keys_cli_and_auth(think_model, tmp_path):
    keys = tmp_path / "keys.db"
    run = lambda *a: subprocess.run([sys.executable, "-m", "sputnik.cli", "keys", *a, "--keys", str(keys)],  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    key = run("create", "alice").strip().splitlines()[-1]
    assert key.startswith("sk-") and key.encode() not in keys.read_bytes()
    other = KeyStore(keys).create("bob")[1]
    with Live(ServeConfig(model=str(think_model), dtype="float32", served_name="think", keys=keys, rate_limit=3,
                          cors_origin=["http://chat.example"])) as live:
        live.wait_ready()
        with pytest.raises(openai.AuthenticationError):
            ask(live.client("sk-wrong"), max_tokens=1)
        r = httpx.get(f"{live.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert ask(live.client(key), max_tokens=1).choices
        # A flood: 3 per minute per key, so the fourth request is refused with Retry-After; another key still works.
        codes = [httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {key}"}) for _ in range(3)]
        assert [c.status_code for c in codes] == [200, 200, 429]
        assert int(codes[-1].headers["Retry-After"]) >= 1 and codes[-1].json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {other}"}).status_code == 200
        # Revoked: refused from then on.
        assert "revoked" in run("revoke", key[:10])
        assert "revoked" in run("list")
        assert httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
        # CORS: only the allowlisted origin is told it may read.
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = httpx.options(f"{live.url}/v1/chat/completions", headers={"Origin": "http://chat.example", **pre})
        bad = httpx.options(f"{live.url}/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
        assert ok.headers.get("access-control-allow-origin") == "http://chat.example"
        assert "access-control-allow-origin" not in bad.headers


# ---------------------------------------------------------------- continuous batching under load


def test_32_streams_with_disconnects_finish_free_their_slots_and_match_alone(smol_server):
    url = f"{smol_server.url}/v1/chat/completions"

    def body(i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 24, "temperature": 0.9,
                "seed": i, "stream": True}

    def run(i: int, drop_after: int | None = None) -> str | None:
        text, seen = "", 0
        with httpx.stream("POST", url, json=body(i), timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
                seen += 1
                if drop_after is not None and seen >= drop_after:
                    return None  # leaves the with-block: the connection closes mid-stream
        return text

    drops = {i: 3 for i in range(0, 32, 4)}  # every fourth client hangs up after a few chunks
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda i: run(i, drops.get(i)), range(32)))
    for i, text in enumerate(together):
        assert (text is None) == (i in drops)
    deadline = time.monotonic() + 30
    while True:  # the server frees a dropped stream's row at its next step
        m = smol_server.metrics()
        if m["sputnik_kv_cache_rows_used"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert m["sputnik_kv_cache_rows_used"] == 0
    assert m["sputnik_requests_running"] == 0 and m["sputnik_requests_waiting"] == 0
    assert m['sputnik_requests_total{outcome="cancelled"}'] >= len(drops)
    for i in (1, 2, 7, 30):  # seeded requests sample the same alone as in a crowd
        assert run(i) == together[i]


def test_keepalive_comments_while_queued(think_model):
    cfg = ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True, max_batch=1, keepalive_s=0.05)
    with Live(cfg) as live:
        live.wait_ready()
        long = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "ignore_eos": True,
                "temperature": 1.0, "stream": True}
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=long, timeout=60) as first:
            lines_of_first = first.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines_of_first)  # the first stream is running and holds the only row
            second = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
            with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=second, timeout=60) as r:
                lines = [line for line in r.iter_lines() if line]
        assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"


def test_upstream_backend_serves_the_same_api(think_server):
    cfg = ServeConfig(upstream=f"{think_server.url}/v1", no_auth=True)
    with Live(cfg) as front:
        front.wait_ready()
        client = front.client()
        r = ask(client, temperature=0)
        assert r.choices[0].message.content == ANSWER
        assert r.choices[0].message.model_extra["reasoning_content"] == THOUGHT
        assert r.usage.prompt_tokens > 0
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, temperature=0, stream=True)
                           if c.choices)
        assert streamed == ANSWER
        with pytest.raises(openai.NotFoundError):
            ask(client, model="nope")


def test_schemathesis_finds_no_server_errors(think_server):
    import schemathesis
    from hypothesis import HealthCheck, settings

    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{think_server.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def check(case):
            if isinstance(case.body, dict):
                case.body["max_tokens"] = 2  # keep generation short; validation still sees everything else
                case.body.pop("max_completion_tokens", None)
            response = case.call()
            assert response.status_code < 500, (case.path, case.body, response.text)

        check()


def test_serve_command_starts_and_answers(think_model, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sputnik.cli", "serve", "--model", str(think_model), "--port",
                             str(port), "--no-auth", "--served-name", "think", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        live = Live.__new__(Live)
        live.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{live.url}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        assert ask(live.client(), temperature=0).choices[0].message.content == ANSWER
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_does_not_import_web():
    import ast
    from pathlib import Path

    import sputnik.serve

    for path in Path(sputnik.serve.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            assert not any(f"{n}.".startswith("sputnik.web.") for n in names), path.name  # the web builds on serve


def test_no_web_serves_the_api_alone(tmp_path):
    from fastapi.testclient import TestClient

    from sputnik.serve.app import create_app
    from sputnik.web.app import build_app

    web = TestClient(build_app(ServeConfig(no_auth=True, database_url=f"sqlite:///{tmp_path}/w.db")))
    assert web.get("/").status_code == 200 and web.get("/api/me").status_code == 200
    for app in (build_app(ServeConfig(no_auth=True, no_web=True)), create_app(ServeConfig(no_auth=True))):
        api = TestClient(app)  # not started: the backend never loads
        assert api.get("/").status_code == 404 and api.get("/api/me").status_code == 404
        assert api.get("/health").status_code == 503 and api.get("/metrics").status_code == 200


def test_serve_quantize_int8_loads_and_answers(think_model):
    """--quantize reaches serve through the same ModelArgs load step as generate, chat and eval."""
    from sputnik.cli import parse
    from sputnik.kernels import QuantLinear, available

    assert parse(["serve", "--quantize", "int8", "--no-auth"]).config(ServeConfig).quantize == "int8"
    if not available():
        pytest.skip("no C++ compiler for the kernels")
    cfg = ServeConfig(model=str(think_model), dtype="float32", quantize="int8", served_name="think", no_auth=True)
    with Live(cfg) as live:
        live.wait_ready()
        down = live.app.state.server.loaded.engine.model.model.layers[0].mlp.down_proj
        assert isinstance(down, QuantLinear) and down.qtype == 8  # Q8_0 blocks
        r = ask(live.client(), temperature=0)
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].message.model_extra["reasoning_content"] == THOUGHT
