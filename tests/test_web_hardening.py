"""The web chat and the API against bad text, racing sends, over-long chats and limits: 4xx, never a 5xx."""

from __future__ import annotations

import asyncio
import copy
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from live import ANSWER, Live
from sputnik.serve.config import ServeConfig
from sputnik.serve.keys import KeyStore, RateLimiter
from sputnik.web import store
from sputnik.web.app import build_app

PASSWORD = "long enough pw"
# Bad text, as a JSON body can carry it: JSON escapes that decode to lone surrogates, a NUL, bidi overrides that
# make text read backwards, a megabyte; OVERLONG is raw bytes (an overlong "/"), which no JSON string can hold.
BAD = {"lone high surrogate": "\ud800", "lone low surrogate": "a\udfffb", "NUL": "a\x00b",
       "RTL override": "\u202egnp.exe\u202c", "1 MB": "x" * (1 << 20)}
OVERLONG = b"\xc0\xaf"
MARK = "@@BAD@@"
# What must be refused whatever the field: the rest is valid text some fields take (a 2xx) and others refuse.
MUST_REFUSE = {"lone high surrogate", "lone low surrogate", "1 MB", "overlong UTF-8"}


def leaves(body, path=()):
    """Every value's path in a JSON body, and the body itself with a key added."""
    if isinstance(body, dict):
        for k, v in body.items():
            yield from leaves(v, (*path, k))
    elif isinstance(body, list):
        for i, v in enumerate(body):
            yield from leaves(v, (*path, i))
    yield path


def with_value(body, path, value):
    out = copy.deepcopy(body)
    if not path:
        return {**out, value: 1} if isinstance(out, dict) else value  # a bad key
    target = out
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return out


def bodies(base):
    """(what, encoded body) for every bad text in every field of base (and as a key)."""
    for path in leaves(base):
        for name, value in BAD.items():
            yield f"{'.'.join(map(str, path)) or 'key'} = {name}", name, json.dumps(with_value(base, path, value))
        raw = json.dumps(with_value(base, path, MARK)).encode().replace(MARK.encode(), OVERLONG)
        yield f"{'.'.join(map(str, path)) or 'key'} = overlong", "overlong UTF-8", raw


def check(r, what, name, refused):
    assert r.status_code < 500, (what, r.status_code, r.text[:300])
    if name in refused:
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "error" in r.json(), (what, r.text[:300])


@pytest.fixture
def fuzz_app(think_model, database_url):
    from sqlalchemy import text

    from sputnik.web.db import Base, Database

    db = Database(database_url)  # a clean schema on this backend, for the app to migrate
    with db.engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    db.close()
    cfg = ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True,
                      database_url=database_url, rate_limit=0)
    with TestClient(build_app(cfg), raise_server_exceptions=False) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        yield client


API_CHAT = {"model": "think", "messages": [{"role": "system", "content": "You are helpful.", "name": "s"},
                                           {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 2, "temperature": 0, "top_p": 1, "top_k": 0, "min_p": 0, "stop": ["zz"], "n": 1, "seed": 1,
            "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "stream": False,
            "user": "u", "response_format": {"type": "text"}, "logprobs": False}
API_COMPLETION = {"model": "think", "prompt": ["Hi"], "max_tokens": 2, "temperature": 0, "stop": "zz", "echo": False,
                  "logprobs": 1, "stream": True, "stream_options": {"include_usage": True}}


def test_fuzz_the_api_and_the_web_api_with_bad_text(fuzz_app):
    client = fuzz_app
    for path, base in (("/v1/chat/completions", API_CHAT), ("/v1/completions", API_COMPLETION)):
        for what, name, data in bodies(base):
            r = client.post(path, content=data, headers={"Content-Type": "application/json"})
            check(r, f"{path} {what}", name, MUST_REFUSE)

    csrf = {"X-CSRF-Token": client.get("/api/me").json()["csrf"]}
    assert client.post("/api/auth/signup", json={"email": "fuzz@example.com", "password": PASSWORD, "name": "F"},
                       headers=csrf).status_code == 200
    csrf = {"X-CSRF-Token": client.get("/api/me").json()["csrf"]}
    conv = client.post("/api/conversations", json={}, headers=csrf).json()["id"]
    client.post(f"/api/conversations/{conv}/messages", json={"content": "Hi", "max_tokens": 2}, headers=csrf)
    first = client.get(f"/api/conversations/{conv}").json()["messages"][0]["id"]
    web_refuses = MUST_REFUSE | {"NUL"}  # a database cannot keep a NUL (PostgreSQL refuses one)
    routes = [
        ("POST", "/api/auth/signup", {"email": "new@example.com", "password": PASSWORD, "name": "N"}),
        ("POST", "/api/auth/signin", {"email": "nobody@example.com", "password": "wrong password"}),
        ("PATCH", "/api/me", {"name": "F", "instructions": "Be brief."}),
        ("POST", "/api/auth/password", {"current_password": "wrong password", "new_password": "short"}),
        ("PATCH", "/api/admin/settings", {"signup_open": True}),
        ("PATCH", "/api/admin/users/1", {"disabled": False}),
        ("POST", "/api/conversations", {"title": "T"}),
        ("PATCH", f"/api/conversations/{conv}", {"title": "T"}),
        ("POST", f"/api/conversations/{conv}/messages",
         {"content": "Hi", "model": "think", "temperature": 0, "max_tokens": 2, "thinking": True, "effort": "low",
          "edit_of": first, "regenerate": False, "continue": False}),
        ("POST", f"/api/conversations/{conv}/version", {"message_id": first}),
    ]
    for method, path, base in routes:
        for what, name, data in bodies(base):
            r = client.request(method, path, content=data, headers={"Content-Type": "application/json", **csrf})
            check(r, f"{method} {path} {what}", name, web_refuses)
    for bad in ("%00", "%ED%A0%80", "%C0%AF", "x" * 5000, "%E2%80%AE"):
        check(client.get(f"/api/conversations?q={bad}"), f"q={bad}", "q", {"q"} if bad == "%00" else set())
        for method, tail in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("GET", "/export"), ("POST", "/stop"),
                             ("GET", "/stream"), ("POST", "/messages"), ("POST", "/version")):
            r = client.request(method, f"/api/conversations/{bad}{tail}", json={"title": "t", "content": "Hi"},
                               headers=csrf)
            check(r, f"{method} /api/conversations/{bad}{tail}", "id", {"id"})
    assert client.get("/api/me").status_code == 200 and client.get("/health").status_code == 200  # still serving


def test_html_responses_carry_the_csp(tmp_path):
    cfg = ServeConfig(no_auth=True, database_url=f"sqlite:///{tmp_path}/w.db")
    client = TestClient(build_app(cfg))  # no lifespan: nothing here needs the model
    page = client.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    raw = client.get("/static/index.html")  # the page's template, which once ran the chat with no CSP at all
    assert raw.status_code == 404 and raw.headers["x-frame-options"] == "DENY"
    assert client.get("/static/INDEX.HTML").status_code == 404
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "frame-ancestors 'none'" in js.headers["content-security-policy"]
    docs = client.get("/docs")
    assert docs.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in docs.headers["content-security-policy"]
    assert "connect-src 'self'" in docs.headers["content-security-policy"]


def test_metrics_need_the_api_key(tmp_path):
    keys = tmp_path / "keys.db"
    _, key = KeyStore(keys).create("prometheus")
    client = TestClient(build_app(ServeConfig(host="0.0.0.0", keys=keys, no_web=True)))
    assert client.get("/metrics").status_code == 401
    r = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and "sputnik_requests" in r.text


def signed_in(live: Live, email: str) -> tuple[httpx.Client, dict]:
    client = httpx.Client(base_url=live.url, timeout=60)
    csrf = {"X-CSRF-Token": client.get("/api/me").json()["csrf"]}
    client.post("/api/auth/signup", json={"email": email, "password": PASSWORD}, headers=csrf).raise_for_status()
    return client, {"X-CSRF-Token": client.get("/api/me").json()["csrf"]}


def events_of(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def small_context(think_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("web") / "w.db"
    cfg = ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True,
                      database_url=f"sqlite:///{db}", max_prompt_tokens=200, rate_limit=5)
    with Live(cfg) as live:
        live.app.state.auth.per_ip = RateLimiter(1000)  # every test signs up from 127.0.0.1
        yield live.wait_ready()


def test_two_sends_to_one_chat_one_answers_and_the_other_is_busy(small_context):
    live = small_context
    client, csrf = signed_in(live, "racer@example.com")
    other, other_csrf = signed_in(live, "other@example.com")
    conv = client.post("/api/conversations", json={}, headers=csrf).json()["id"]

    async def post(c: httpx.Client, headers: dict) -> int:
        async with httpx.AsyncClient(base_url=live.url, cookies=c.cookies, timeout=60) as a:
            r = await a.post(f"/api/conversations/{conv}/messages", json={"content": "Hi", "temperature": 0},
                             headers=headers)
            return r.status_code

    async def race():
        return await asyncio.gather(post(client, csrf), post(client, csrf), post(other, other_csrf))

    mine1, mine2, theirs = asyncio.run(race())
    assert sorted([mine1, mine2]) == [200, 409]
    assert theirs == 404  # another user learns nothing, busy or not
    messages = client.get(f"/api/conversations/{conv}").json()["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", "Hi"), ("assistant", ANSWER)]


def test_an_over_long_message_is_refused_unsaved_and_a_long_history_is_cut_to_fit(small_context):
    live = small_context
    client, csrf = signed_in(live, "long@example.com")
    conv = client.post("/api/conversations", json={}, headers=csrf).json()["id"]
    r = client.post(f"/api/conversations/{conv}/messages", json={"content": "word " * 400}, headers=csrf)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert client.get(f"/api/conversations/{conv}").json()["messages"] == []  # nothing saved
    with client.stream("POST", f"/api/conversations/{conv}/messages", json={"content": "Hi", "temperature": 0},
                       headers=csrf) as r:
        events = events_of(r)
    assert r.status_code == 200 and events[0]["left_out"] == 0 and events[-1]["type"] == "done"
    assert events[0]["title"] == "Hi"  # the first message names the chat

    user_id = client.get("/api/me").json()["user"]["id"]
    with live.app.state.db.session() as s:  # a long chat: any earlier turn with the question is over the limit
        for i in range(6):
            store.add_message(s, user_id, conv, "user", f"question {i} " + "word " * 120)
            store.add_message(s, user_id, conv, "assistant", "answer " * 120)
    with client.stream("POST", f"/api/conversations/{conv}/messages", json={"content": "Hi", "temperature": 0},
                       headers=csrf) as r:
        events = events_of(r)
    assert r.status_code == 200 and events[0]["left_out"] == 14  # the first "Hi" and its answer too
    assert "".join(e["text"] for e in events if e["type"] == "content") == ANSWER
    assert client.get(f"/api/conversations/{conv}").json()["title"] == "Hi"


def test_the_web_chat_has_the_apis_rate_limit_per_user(small_context):
    live = small_context
    client, csrf = signed_in(live, "rate@example.com")
    conv = client.post("/api/conversations", json={}, headers=csrf).json()["id"]
    statuses = []
    for _ in range(6):  # --rate-limit 5: five a minute
        r = client.post(f"/api/conversations/{conv}/messages", json={"content": "Hi", "temperature": 0},
                        headers=csrf)
        statuses.append(r.status_code)
    assert statuses == [200] * 5 + [429]
    assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
    other, other_csrf = signed_in(live, "rate2@example.com")  # per user: someone else still may
    conv2 = other.post("/api/conversations", json={}, headers=other_csrf).json()["id"]
    assert other.post(f"/api/conversations/{conv2}/messages", json={"content": "Hi"},
                      headers=other_csrf).status_code == 200


def test_an_answer_goes_on_after_the_client_leaves_and_can_be_reattached(small_context):
    live = small_context
    client, csrf = signed_in(live, "leaver@example.com")
    conv = client.post("/api/conversations", json={}, headers=csrf).json()["id"]
    with client.stream("POST", f"/api/conversations/{conv}/messages", json={"content": "Hi", "temperature": 0},
                       headers=csrf) as r:
        next(r.iter_lines())  # the start, then hang up
    for _ in range(200):
        messages = client.get(f"/api/conversations/{conv}").json()["messages"]
        if messages[-1]["finished"]:
            break
        time.sleep(0.05)
    assert messages[-1]["content"] == ANSWER and messages[-1]["finished"]  # written to the end, unwatched
    assert client.get(f"/api/conversations/{conv}/stream").status_code == 404  # over: nothing to reattach to

    other, _ = signed_in(live, "peeker@example.com")
    assert other.get(f"/api/conversations/{conv}/stream").status_code == 404


def test_account_instructions_password_and_sign_out_everywhere(small_context):
    live = small_context
    laptop, csrf = signed_in(live, "acct@example.com")
    phone = httpx.Client(base_url=live.url, timeout=60)
    phone_csrf = {"X-CSRF-Token": phone.get("/api/me").json()["csrf"]}
    phone.post("/api/auth/signin", json={"email": "acct@example.com", "password": PASSWORD},
               headers=phone_csrf).raise_for_status()
    me = laptop.patch("/api/me", json={"instructions": "You are helpful."}, headers=csrf).json()["user"]
    assert me["instructions"] == "You are helpful."
    assert laptop.patch("/api/me", json={"instructions": "x" * 4001}, headers=csrf).status_code == 400

    r = laptop.post("/api/auth/password", json={"current_password": "wrong", "new_password": "a new password"},
                    headers=csrf)
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_password"
    r = laptop.post("/api/auth/password", json={"current_password": PASSWORD, "new_password": "a new password"},
                    headers=csrf)
    assert r.status_code == 200 and r.json()["signed_out"] == 1
    assert phone.get("/api/me").json()["user"] is None  # the other device is out
    assert laptop.get("/api/me").json()["user"]["email"] == "acct@example.com"  # this one stays in

    phone_csrf = {"X-CSRF-Token": phone.get("/api/me").json()["csrf"]}
    phone.post("/api/auth/signin", json={"email": "acct@example.com", "password": "a new password"},
               headers=phone_csrf).raise_for_status()
    assert laptop.post("/api/auth/signout-all", headers=csrf).status_code == 200
    assert phone.get("/api/me").json()["user"] is None and laptop.get("/api/me").json()["user"] is None


def test_titles_from_the_first_message():
    assert store.title_from("What is 2 + 2?") == "What is 2 + 2?"
    assert store.title_from("\n\n## 파이썬으로 웹 서버를 만드는 방법을 단계별로 자세히 알려 주세요. 초보자입니다\nmore") \
        == "파이썬으로 웹 서버를 만드는 방법을 단계별로 자세히 알려 주세요. 초보자입니다"
    long = store.title_from("Please explain, in great detail and with examples, how the transformer attention works")
    assert long.endswith("…") and len(long) <= store.AUTO_TITLE_CHARS + 1 and " " not in long[-2:]
    assert store.title_from("这是一个没有空格的很长的句子" * 5).endswith("…")
