"""The web chat's store and conversation routes, on SQLite and PostgreSQL: migrations, ownership, search, export."""

import json
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from sputnik.web import store
from sputnik.web.db import Base, Database, Message, alembic_config, database_url
from sputnik.web.store import NotFound


def signup(make, email: str, ip: str = "10.0.0.1"):
    client = make(ip=ip)
    r = client.post("/api/auth/signup", json={"email": email, "password": "correct horse"})
    assert r.status_code == 200, r.text
    return client


def test_migrations_create_the_schema_the_models_describe(web_db):
    tables = set(inspect(web_db.engine).get_table_names())
    assert {"users", "identities", "sessions", "settings", "conversations", "messages", "alembic_version"} <= tables
    with web_db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert compare_metadata(ctx, Base.metadata) == []
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert ctx.get_current_revision() == head
    web_db.migrate()  # again: a no-op at every later start
    uniques = {tuple(u["column_names"]) for u in inspect(web_db.engine).get_unique_constraints("identities")}
    assert ("provider", "subject") in uniques


def test_users_first_is_admin_and_oidc_identities_never_merge_by_email(web_db):
    with web_db.session() as s:
        first = store.create_user(s, "Ann@Example.org", "Ann", "hash")
        second = store.create_user(s, "bob@example.org", "Bob", "hash")
        assert first.is_admin and not second.is_admin
        assert store.get_by_email(s, "ANN@example.org").id == first.id
        oidc = store.find_or_create_oidc_user(s, "google", "sub-1", "ann@example.org", True, "Ann G")
        again = store.find_or_create_oidc_user(s, "google", "sub-1", "new@example.org", False, "Ann G")
        other = store.find_or_create_oidc_user(s, "google", "sub-2", "ann@example.org", True, "Ann 2")
        elsewhere = store.find_or_create_oidc_user(s, "github", "sub-1", None, False, None)
        assert oidc.id == again.id
        assert len({first.id, oidc.id, other.id, elsewhere.id}) == 4
        assert not oidc.is_admin and oidc.email is None and oidc.password_hash is None
        assert store.user_dict(again)["email"] == "new@example.org"  # the provider's latest word
        assert [u.id for u in store.list_users(s)] == sorted(u.id for u in (first, second, oidc, other, elsewhere))
        assert store.set_disabled(s, second.id, True).disabled
        with pytest.raises(NotFound):
            store.set_disabled(s, 10_000, True)


def test_settings_default_and_change(web_db):
    with web_db.session() as s:
        assert store.signup_open(s) is True
        store.set_signup_open(s, False)
    with web_db.session() as s:
        assert store.signup_open(s) is False
        key = store.secret_key(s)
    with web_db.session() as s:
        assert store.secret_key(s) == key and len(key) >= 32


def test_store_never_hands_out_another_users_conversation_or_messages(web_db):
    with web_db.session() as s:
        a = store.create_user(s, "a@example.org", "A", "h").id
        b = store.create_user(s, "b@example.org", "B", "h").id
        conv = store.create_conversation(s, a, "  private   plans ").id
        msg = store.add_message(s, a, conv, "user", "hello").id
    with web_db.session() as s:
        assert store.get_conversation(s, a, conv).title == "private plans"
        for call in (lambda: store.get_conversation(s, b, conv), lambda: store.list_messages(s, b, conv),
                     lambda: store.rename_conversation(s, b, conv, "mine"),
                     lambda: store.delete_conversation(s, b, conv),
                     lambda: store.add_message(s, b, conv, "user", "intrusion"),
                     lambda: store.update_message(s, b, msg, content="changed"),
                     lambda: store.add_message(s, b, conv, "user", "other", version_of=msg),
                     lambda: store.show_version(s, b, conv, msg), lambda: store.versions(s, b, conv),
                     lambda: store.last_assistant(s, b, conv), lambda: store.export_json(s, b, conv),
                     lambda: store.export_markdown(s, b, conv), lambda: store.get_conversation(s, a, "nope")):
            with pytest.raises(NotFound):
                call()
        assert store.list_conversations(s, b) == []
        assert [m.content for m in store.list_messages(s, a, conv)] == ["hello"]


def test_messages_versions_and_the_branch_on_show(web_db):
    with web_db.session() as s:
        user = store.create_user(s, "a@example.org", "A", "h").id
        conv = store.create_conversation(s, user).id
        q1 = store.add_message(s, user, conv, "user", "2+2?")
        a1 = store.add_message(s, user, conv, "assistant", "4", reasoning="add", reasoning_seconds=0.5)
        q2 = store.add_message(s, user, conv, "user", "and 3+3?")
        a2 = store.add_message(s, user, conv, "assistant", "6")
        assert store.last_assistant(s, user, conv).id == a2.id
        with pytest.raises(ValueError):
            store.add_message(s, user, conv, "robot", "beep")
        with pytest.raises(NotFound):  # a version of a question must be a question
            store.add_message(s, user, conv, "assistant", "x", version_of=q1.id)
    with web_db.session() as s:
        again = store.add_message(s, user, conv, "assistant", "four", version_of=a1.id)  # regenerate
        assert [m.content for m in store.list_messages(s, user, conv)] == ["2+2?", "four"]
        assert store.versions(s, user, conv) == {q1.id: [q1.id], again.id: [a1.id, again.id]}
        assert again.position > a2.position
        store.show_version(s, user, conv, a1.id)  # back to the first answer: the turns after it come back
        assert [m.id for m in store.list_messages(s, user, conv)] == [q1.id, a1.id, q2.id, a2.id]
        edited = store.add_message(s, user, conv, "user", "2+3?", version_of=q1.id)
        assert [m.id for m in store.list_messages(s, user, conv)] == [edited.id]
        assert store.versions(s, user, conv) == {edited.id: [q1.id, edited.id]}
        store.show_version(s, user, conv, q1.id)  # the version of each later turn shown there last
        assert [m.id for m in store.list_messages(s, user, conv)] == [q1.id, a1.id, q2.id, a2.id]
        store.show_version(s, user, conv, again.id)
        store.show_version(s, user, conv, edited.id)
        store.show_version(s, user, conv, q1.id)
        assert [m.id for m in store.list_messages(s, user, conv)] == [q1.id, again.id]
        with pytest.raises(NotFound):
            store.show_version(s, user, conv, 10_000)
        assert len(store.export_json(s, user, conv)["messages"]) == 2


def test_unfinished_answer_survives_a_restart(database_url, web_db):
    with web_db.session() as s:
        user = store.create_user(s, "a@example.org", "A", "h").id
        conv = store.create_conversation(s, user, "long answer").id
        store.add_message(s, user, conv, "user", "write an essay")
        answer = store.add_message(s, user, conv, "assistant", "", finished=False).id
    for grown in ("Once", "Once upon", "Once upon a time"):
        with web_db.session() as s:
            store.update_message(s, user, answer, content=grown, reasoning="thinking…")
    web_db.close()  # the server stops mid-answer

    reopened = Database(database_url)
    try:
        with reopened.session() as s:
            messages = store.list_messages(s, user, conv)
            assert [(m.role, m.content, m.finished) for m in messages] == [
                ("user", "write an essay", True), ("assistant", "Once upon a time", False)]
            assert messages[1].reasoning == "thinking…"
            store.update_message(s, user, answer, finished=True, reasoning_seconds=2.5)
        with reopened.session() as s:
            done = store.get_message(s, user, answer)
            assert done.finished and done.reasoning_seconds == 2.5 and done.content == "Once upon a time"
    finally:
        reopened.close()


def test_routes_keep_conversations_private(web_client):
    alice, bob = signup(web_client, "alice@example.org"), signup(web_client, "bob@example.org", ip="10.0.0.2")
    mine = alice.post("/api/conversations", json={"title": "Alice's secret"}).json()
    bobs = bob.post("/api/conversations").json()
    assert bobs["title"] == ""  # untitled: the page says "New chat" in the reader's language

    for method, path, body in (("GET", "", None), ("PATCH", "", {"title": "pwned"}), ("DELETE", "", None),
                               ("GET", "/export?format=json", None), ("GET", "/export?format=md", None)):
        r = bob.request(method, f"/api/conversations/{mine['id']}{path}", json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    assert [c["id"] for c in bob.get("/api/conversations").json()] == [bobs["id"]]
    assert [c["id"] for c in bob.get("/api/conversations", params={"q": "secret"}).json()] == []
    assert alice.get(f"/api/conversations/{mine['id']}").json()["title"] == "Alice's secret"

    signed_out = web_client(ip="10.0.0.3")
    assert signed_out.get("/api/conversations").status_code == 401


def test_routes_crud_search_and_export(web_client, web_db):
    client = signup(web_client, "alice@example.org")
    user_id = client.get("/api/me").json()["user"]["id"]
    trip = client.post("/api/conversations", json={"title": "Trip to Rome"}).json()
    maths = client.post("/api/conversations", json={"title": "Homework"}).json()
    empty = client.post("/api/conversations", json={"title": "100% sure_thing"}).json()
    with web_db.session() as s:
        store.add_message(s, user_id, maths["id"], "user", "What is the Pythagorean theorem?")
        store.add_message(s, user_id, maths["id"], "assistant", "a² + b² = c²", reasoning="Recall geometry.",
                          reasoning_seconds=1.25)

    listed = client.get("/api/conversations").json()
    assert [c["id"] for c in listed] == [maths["id"], empty["id"], trip["id"]]  # most recently active first
    assert set(listed[0]) == {"id", "title", "created_at", "updated_at"}

    def search(q):
        return [c["id"] for c in client.get("/api/conversations", params={"q": q}).json()]

    assert search("rome") == [trip["id"]]  # titles, any case
    assert search("PYTHAGOREAN") == [maths["id"]]  # message text
    assert search("geometry") == []  # reasoning is not searched
    assert search("%") == [empty["id"]] and search("_") == [empty["id"]]  # wildcards are plain text
    assert search("nothing like it") == []

    renamed = client.patch(f"/api/conversations/{trip['id']}", json={"title": "Trip to Florence"}).json()
    assert renamed["title"] == "Trip to Florence"
    assert search("florence") == [trip["id"]]

    full = client.get(f"/api/conversations/{maths['id']}").json()
    assert [m["role"] for m in full["messages"]] == ["user", "assistant"]
    assert set(full["messages"][1]) == {"id", "role", "content", "reasoning", "reasoning_seconds", "finished",
                                        "finish_reason", "parent_id", "versions", "created_at"}
    assert full["messages"][1]["reasoning_seconds"] == 1.25

    r = client.get(f"/api/conversations/{maths['id']}/export", params={"format": "json"})
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="homework.json"'
    exported = json.loads(r.content)
    assert exported["title"] == "Homework" and exported["messages"] == full["messages"]

    r = client.get(f"/api/conversations/{maths['id']}/export", params={"format": "md"})
    assert r.headers["content-disposition"] == 'attachment; filename="homework.md"'
    assert r.headers["content-type"].startswith("text/markdown")
    md = r.text
    assert md.startswith("# Homework\n")
    assert md.index("**User**") < md.index("What is the Pythagorean") < md.index("**Assistant**")
    assert "<details>" in md and "Recall geometry." in md and md.index("</details>") < md.index("a² + b² = c²")
    assert client.get(f"/api/conversations/{maths['id']}/export", params={"format": "pdf"}).status_code == 400

    assert client.delete(f"/api/conversations/{maths['id']}").status_code == 200
    assert client.get(f"/api/conversations/{maths['id']}").status_code == 404
    with web_db.session() as s:  # its messages went with it
        assert s.query(Message).count() == 0


def test_database_url_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db.example/sputnik")
    assert database_url() == "postgresql://u@db.example/sputnik"
    assert Database("postgresql://u@db.example/sputnik").url.startswith("postgresql+psycopg://")  # no connection yet
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("SPUTNIK_DATA_DIR", str(tmp_path / "data"))
    assert database_url() == f"sqlite:///{tmp_path / 'data' / 'sputnik.db'}"
    assert Path(tmp_path / "data").is_dir()


def test_many_threads_write_at_once(web_db):
    with web_db.session() as s:
        user = store.create_user(s, "a@example.org", "A", "h").id
        convs = [store.create_conversation(s, user, f"thread {i}").id for i in range(4)]
    errors = []

    def stream(conv):
        # What a streaming answer does: one row, rewritten many times, each in its own short transaction.
        try:
            with web_db.session() as s:
                answer = store.add_message(s, user, conv, "assistant", "", finished=False).id
            for n in range(25):
                with web_db.session() as s:
                    store.update_message(s, user, answer, content="x" * (n + 1))
                with web_db.session() as s:
                    store.list_conversations(s, user)
            with web_db.session() as s:
                store.update_message(s, user, answer, finished=True)
        except Exception as e:  # noqa: BLE001 — reported below, with the thread's conversation
            errors.append((conv, e))

    threads = [threading.Thread(target=stream, args=(c,)) for c in convs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with web_db.session() as s:
        for conv in convs:
            [answer] = store.list_messages(s, user, conv)
            assert answer.content == "x" * 25 and answer.finished
