"""The web chat answers through the API's own request path: the API's sampling defaults and the server's limits."""

from __future__ import annotations

import json

import httpx

from live import ANSWER, Live
from sputnik.serve.config import ServeConfig
from sputnik.serve.protocol import ChatCompletionRequest, Limits, parse_request, sampling_params
from sputnik.web.chat import MessageIn, api_request


def signed_in(live: Live) -> tuple[httpx.Client, dict]:
    client = httpx.Client(base_url=live.url, timeout=60)
    csrf = {"X-CSRF-Token": client.get("/api/me").json()["csrf"]}
    client.post("/api/auth/signup", json={"email": "cap@example.com", "password": "long enough pw"},
                headers=csrf).raise_for_status()
    return client, {"X-CSRF-Token": client.get("/api/me").json()["csrf"]}


def test_web_chat_max_tokens_is_capped_by_the_api_limit(think_model, tmp_path):
    cfg = ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True,
                      database_url=f"sqlite:///{tmp_path}/w.db", max_tokens_limit=64)
    with Live(cfg) as live:
        live.wait_ready()
        client, csrf = signed_in(live)
        conv = client.post("/api/conversations", json={}, headers=csrf).json()["id"]
        over = {"content": "What is 2 + 2?", "max_tokens": 65, "temperature": 0}
        r = client.post(f"/api/conversations/{conv}/messages", json=over, headers=csrf)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "max_tokens is 65; this server allows at most 64"
        assert client.get(f"/api/conversations/{conv}").json()["messages"] == []  # refused before anything was saved
        api = httpx.post(f"{live.url}/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 65})
        assert api.status_code == 400 and api.json()["error"]["param"] == "max_tokens"  # the API says the same

        events = []
        with client.stream("POST", f"/api/conversations/{conv}/messages", json={**over, "max_tokens": 64},
                           headers=csrf) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"
        assert "".join(e["text"] for e in events if e["type"] == "content") == ANSWER


def test_web_message_samples_as_the_same_api_request():
    history = [{"role": "user", "content": "Hi"}]
    web = sampling_params(api_request(MessageIn(content="Hi"), "think", history), Limits(), 10, 4096)
    api = sampling_params(parse_request(ChatCompletionRequest, {"messages": history, "temperature": 0.6}), Limits(),
                          10, 4096)
    assert web == api  # R1's temperature, and the API's own top_p and max_tokens defaults
    assert web.top_p == 1.0 and web.max_tokens == Limits().default_max_tokens
