"""Answer versions (regenerate and edit keep what they replace), continuing a cut-off answer, and the effort choice:
the web API against a real server with the tiny think model, and the schema migration on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import text

from live import ANSWER, THOUGHT, Live
from sputnik.serve.config import ServeConfig
from sputnik.serve.keys import RateLimiter
from sputnik.serve.protocol import EFFORT_BUDGET, ChatCompletionRequest, parse_request, thinking_choice
from sputnik.web import store
from sputnik.web.chat import MessageIn, api_request, plan_turn
from sputnik.web.db import Base, Database

PASSWORD = "long enough pw"


@pytest.fixture(scope="module")
def live(think_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("web") / "w.db"
    cfg = ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True,
                      database_url=f"sqlite:///{db}", rate_limit=0)
    with Live(cfg) as server:
        server.app.state.auth.per_ip = RateLimiter(1000)  # every test signs up from 127.0.0.1
        yield server.wait_ready()


def signed_in(live: Live, email: str) -> tuple[httpx.Client, dict]:
    client = httpx.Client(base_url=live.url, timeout=60)
    csrf = {"X-CSRF-Token": client.get("/api/me").json()["csrf"]}
    client.post("/api/auth/signup", json={"email": email, "password": PASSWORD}, headers=csrf).raise_for_status()
    return client, {"X-CSRF-Token": client.get("/api/me").json()["csrf"]}


def send(client: httpx.Client, csrf: dict, conv: str, **body) -> list[dict]:
    with client.stream("POST", f"/api/conversations/{conv}/messages", json={"temperature": 0, **body},
                       headers=csrf) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def shown(client: httpx.Client, conv: str) -> list[dict]:
    return client.get(f"/api/conversations/{conv}").json()["messages"]


def test_regenerate_and_edit_keep_every_version_and_the_choice_survives_a_reload(live):
    client, csrf = signed_in(live, "versions@example.com")
    conv = client.post("/api/conversations", json={}, headers=csrf).json()["id"]
    send(client, csrf, conv, content="Hi")
    [q1, a1] = shown(client, conv)
    assert q1["versions"] == [q1["id"]] and a1["versions"] == [a1["id"]] and a1["parent_id"] == q1["id"]
    assert a1["finish_reason"] == "stop"

    events = send(client, csrf, conv, regenerate=True)
    a2 = events[0]["assistant_message_id"]
    assert events[0]["versions"] == {str(q1["id"]): [q1["id"]], str(a2): [a1["id"], a2]}
    assert [m["id"] for m in shown(client, conv)] == [q1["id"], a2]  # the new version is on show
    assert shown(client, conv)[1]["versions"] == [a1["id"], a2]  # and the first one is kept

    r = client.post(f"/api/conversations/{conv}/version", json={"message_id": a1["id"]}, headers=csrf)
    assert r.status_code == 200 and [m["id"] for m in r.json()["messages"]] == [q1["id"], a1["id"]]
    assert [m["id"] for m in shown(client, conv)] == [q1["id"], a1["id"]]  # a reload shows the chosen one

    # The model reads the branch on show: the chosen first answer, not the later one.
    user_id = client.get("/api/me").json()["user"]["id"]
    with live.app.state.db.session() as s:
        store.update_message(s, user_id, a1["id"], content="first version")
        store.update_message(s, user_id, a2, content="second version")
        history = plan_turn(s, user_id, conv, MessageIn(content="What is 2 + 2?")).history
    assert [m["content"] for m in history] == ["Hi", "first version", "What is 2 + 2?"]
    send(client, csrf, conv, content="What is 2 + 2?")
    assert [m["content"] for m in shown(client, conv)] == ["Hi", "first version", "What is 2 + 2?", ANSWER]

    # An edit is a new version of the question, with its own answer; the old question and its answers stay.
    events = send(client, csrf, conv, content="Tell me something.", edit_of=q1["id"])
    q2 = events[0]["user_message_id"]
    assert q2 != q1["id"] and events[0]["versions"][str(q2)] == [q1["id"], q2]
    assert [m["content"] for m in shown(client, conv)] == ["Tell me something.", ANSWER]
    back = client.post(f"/api/conversations/{conv}/version", json={"message_id": q1["id"]}, headers=csrf).json()
    # Back on the first question: the answers chosen under it come back with it.
    assert [m["content"] for m in back["messages"]] == ["Hi", "first version", "What is 2 + 2?", ANSWER]
    assert back["messages"][0]["versions"] == [q1["id"], q2]

    other, other_csrf = signed_in(live, "snoop@example.com")
    assert other.post(f"/api/conversations/{conv}/version", json={"message_id": q2},
                      headers=other_csrf).status_code == 404
    mine = client.post("/api/conversations", json={}, headers=csrf).json()["id"]
    r = client.post(f"/api/conversations/{mine}/version", json={"message_id": q2}, headers=csrf)
    assert r.status_code == 404  # a message of another conversation
    r = client.post(f"/api/conversations/{conv}/version", json={"message_id": "x"}, headers=csrf)
    assert r.status_code == 400


def test_continue_goes_on_from_an_answer_cut_at_max_tokens(live):
    client, csrf = signed_in(live, "continue@example.com")
    conv = client.post("/api/conversations", json={}, headers=csrf).json()["id"]
    r = client.post(f"/api/conversations/{conv}/messages", json={"continue": True}, headers=csrf)
    assert r.status_code == 400  # nothing to continue yet
    events = send(client, csrf, conv, content="What is 2 + 2?", max_tokens=6)
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "length"
    [_, cut] = shown(client, conv)
    assert cut["finish_reason"] == "length" and cut["finished"] and not cut["content"]
    assert cut["reasoning"] and THOUGHT.startswith(cut["reasoning"])  # cut inside the thought

    events = send(client, csrf, conv, **{"continue": True, "max_tokens": 4})
    assert events[0]["assistant_message_id"] == cut["id"]
    assert events[0]["continued"] == {"content": "", "reasoning": cut["reasoning"]}
    assert events[-1]["finish_reason"] == "length"
    events = send(client, csrf, conv, **{"continue": True})  # twice cut, continued to the end
    assert events[-1]["finish_reason"] == "stop"
    [_, whole] = shown(client, conv)
    assert whole["id"] == cut["id"] and whole["versions"] == [cut["id"]]  # the same answer, grown
    assert whole["reasoning"].strip() == THOUGHT.strip() and whole["content"] == ANSWER
    assert whole["finish_reason"] == "stop" and whole["finished"]
    r = client.post(f"/api/conversations/{conv}/messages", json={"continue": True}, headers=csrf)
    assert r.status_code == 400 and "complete" in r.json()["error"]["message"]


def test_the_effort_is_the_apis_reasoning_effort():
    history = [{"role": "user", "content": "Hi"}]
    for effort, level in (("low", "low"), ("medium", "high"), ("high", "high")):  # DeepSeek's mapping
        web = thinking_choice(api_request(MessageIn(content="Hi", effort=effort), "think", history))
        api = thinking_choice(parse_request(ChatCompletionRequest, {"messages": history, "reasoning_effort": effort}))
        assert web == api and web.enabled and web.budget == EFFORT_BUDGET[level]
    off = thinking_choice(api_request(MessageIn(content="Hi", thinking=False, effort="low"), "think", history))
    assert not off.enabled
    assert thinking_choice(api_request(MessageIn(content="Hi"), "think", history)).budget is None


def test_an_effort_is_sent_through_and_a_bad_one_refused(live):
    client, csrf = signed_in(live, "effort@example.com")
    conv = client.post("/api/conversations", json={}, headers=csrf).json()["id"]
    r = client.post(f"/api/conversations/{conv}/messages", json={"content": "Hi", "effort": "max"}, headers=csrf)
    assert r.status_code == 400 and shown(client, conv) == []
    events = send(client, csrf, conv, content="Hi", effort="low")
    assert "".join(e["text"] for e in events if e["type"] == "content") == ANSWER


def test_a_database_from_before_versions_keeps_its_chats(database_url):
    db = Database(database_url)
    try:
        with db.engine.begin() as conn:
            Base.metadata.drop_all(conn)
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        db.migrate("0002")  # the schema as it was: no parent_id, current_id or finish_reason
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO users (id, email, name, is_admin, disabled, created_at)"
                              " VALUES (1, 'old@example.org', 'Old', true, false, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO conversations (id, user_id, title, created_at, updated_at)"
                              " VALUES ('0123456789abcdef0123456789abcdef', 1, 'old chat', CURRENT_TIMESTAMP,"
                              " CURRENT_TIMESTAMP)"))
            for i, (role, content) in enumerate([("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"),
                                                 ("assistant", "6")], start=1):
                conn.execute(text("INSERT INTO messages (id, conversation_id, position, role, content, finished,"
                                  " created_at) VALUES (:id, '0123456789abcdef0123456789abcdef', :pos, :role,"
                                  " :content, true, CURRENT_TIMESTAMP)"),
                             {"id": 10 + i, "pos": i, "role": role, "content": content})
        db.migrate()
        with db.session() as s:
            conv = "0123456789abcdef0123456789abcdef"
            messages = store.list_messages(s, 1, conv)
            assert [m.content for m in messages] == ["2+2?", "4", "3+3?", "6"]
            assert [m.parent_id for m in messages] == [None, 11, 12, 13]
            assert set(map(len, store.versions(s, 1, conv).values())) == {1}
            again = store.add_message(s, 1, conv, "assistant", "six", version_of=14)
            assert store.versions(s, 1, conv)[again.id] == [14, again.id]
    finally:
        db.close()
