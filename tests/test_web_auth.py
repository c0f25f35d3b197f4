"""Web accounts over HTTP, on SQLite and PostgreSQL: sign-up/in/out, sessions, admin, rate limits, CSRF, OIDC."""

import base64
import hashlib
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import select

from sputnik.web import store
from sputnik.web.auth import CSRF_COOKIE, SESSION_COOKIE
from sputnik.web.db import Identity, Session, User
from sputnik.web.oidc import STATE_COOKIE, STATE_SALT, STATE_TTL_S, OIDCProvider, providers_from_env

PASSWORD = "correct horse"

# oidc-provider-mock's own server code uses an authlib API that authlib now deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:get_jwt_config:DeprecationWarning")


def replace_cookie(client, name: str, value: str, path: str = "/") -> None:
    # Setting alone would add a second cookie of that name beside the server's, and the server reads only one.
    client.cookies.delete(name)
    client.cookies.set(name, value, domain="testserver.local", path=path)


def signup(client, email, password=PASSWORD, **extra):
    return client.post("/api/auth/signup", json={"email": email, "password": password, **extra})


def signin(client, email, password=PASSWORD):
    return client.post("/api/auth/signin", json={"email": email, "password": password})


def test_me_signed_out_sets_the_csrf_cookie(web_client):
    client = web_client()
    me = client.get("/api/me").json()
    assert me["user"] is None and me["signup_open"] is True and me["providers"] == []
    assert me["csrf"] == client.cookies[CSRF_COOKIE]
    assert client.get("/api/me").json()["csrf"] == me["csrf"]  # stable until the cookie goes


def test_signup_signin_signout(web_client, web_db):
    client = web_client()
    r = signup(client, "Ann@Example.org", name="Ann")
    assert r.status_code == 200
    assert r.json()["user"] == {"id": 1, "email": "ann@example.org", "name": "Ann", "is_admin": True,
                                "instructions": "", "has_password": True}
    cookie = r.headers.get_list("set-cookie")
    session_cookie = next(c for c in cookie if c.startswith(SESSION_COOKIE + "="))
    assert "HttpOnly" in session_cookie and "samesite=lax" in session_cookie.lower()
    assert "Secure" not in session_cookie  # plain http here; see the https test
    token = client.cookies[SESSION_COOKIE]
    with web_db.session() as s:  # only the token's sha256 is kept
        row = s.scalar(select(Session))
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert token not in {row.token_hash, row.csrf}
        assert (row.expires_at - row.created_at).days == 30
        assert s.scalar(select(User)).password_hash.startswith("$argon2id$")
    assert client.get("/api/me").json()["user"]["email"] == "ann@example.org"

    assert client.post("/api/auth/signout").status_code == 200
    assert client.get("/api/me").json()["user"] is None
    # The old cookie, replayed, opens nothing: the session is revoked server-side.
    replay = web_client()
    replace_cookie(replay, SESSION_COOKIE, token)
    assert replay.get("/api/conversations").status_code == 401
    assert replay.get("/api/me").json()["user"] is None

    again = web_client()
    r = signin(again, "ANN@example.org")
    assert r.status_code == 200 and r.json()["user"]["id"] == 1
    assert again.get("/api/conversations").status_code == 200


def test_signup_refusals(web_client):
    client = web_client()
    assert signup(client, "ann@example.org").status_code == 200
    other = web_client()
    for email, password in (("not-an-email", PASSWORD), ("x@y", PASSWORD), ("bob@example.org", "short")):
        r = signup(other, email, password)
        assert r.status_code == 400 and r.json()["error"]["code"] == "signup_failed", r.text
    taken = signup(other, "ANN@example.org")
    assert taken.status_code == 400 and taken.json()["error"]["code"] == "signup_failed"
    assert "exist" not in taken.json()["error"]["message"].lower()
    assert other.post("/api/auth/signup", json={"email": "bob@example.org"}).status_code == 400
    assert other.get("/api/me").json()["user"] is None


def test_wrong_password_and_unknown_account_look_the_same(web_client, monkeypatch):
    client = web_client()
    signup(client, "ann@example.org")
    anon = web_client()
    wrong, unknown = signin(anon, "ann@example.org", "wrong password"), signin(anon, "nobody@example.org")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"error": {"message": "Wrong email or password.",
                                                       "code": "invalid_credentials"}}
    # Both paths cost one argon2 verification: the unknown email is checked against a dummy hash.
    from argon2 import PasswordHasher
    calls = []
    real = PasswordHasher.verify
    monkeypatch.setattr(PasswordHasher, "verify", lambda self, h, p: calls.append(h) or real(self, h, p))
    signin(anon, "ann@example.org", "wrong password")
    signin(anon, "nobody@example.org")
    assert len(calls) == 2 and all(h.startswith("$argon2") for h in calls)


def test_https_cookies_are_secure(web_client):
    client = web_client(base_url="https://testserver")
    r = signup(client, "ann@example.org")
    cookies = r.headers.get_list("set-cookie")
    assert all("Secure" in c for c in cookies) and len(cookies) == 2
    assert "HttpOnly" not in next(c for c in cookies if c.startswith(CSRF_COOKIE + "="))


def test_csrf_header_is_required_on_every_state_change(web_client):
    client = web_client()
    assert signup(client, "ann@example.org").status_code == 200
    conv = client.post("/api/conversations").json()
    good = client.headers.pop("X-CSRF-Token")
    for method, path, body in (("POST", "/api/conversations", {}),
                               ("PATCH", f"/api/conversations/{conv['id']}", {"title": "x"}),
                               ("DELETE", f"/api/conversations/{conv['id']}", None),
                               ("POST", "/api/auth/signout", None),
                               ("POST", "/api/auth/signin", {"email": "ann@example.org", "password": PASSWORD}),
                               ("PATCH", "/api/admin/settings", {"signup_open": False})):
        for header in ({}, {"X-CSRF-Token": "wrong" + good}):
            r = client.request(method, path, json=body, headers=header)
            assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed", (method, path, header)
    # A planted cookie that matches a forged header is still not the session's token.
    forged = "f" * 43
    replace_cookie(client, CSRF_COOKIE, forged)
    assert client.post("/api/conversations", headers={"X-CSRF-Token": forged}).status_code == 403
    replace_cookie(client, CSRF_COOKIE, good)
    assert client.post("/api/conversations", headers={"X-CSRF-Token": good}).status_code == 200
    assert client.get("/api/conversations").status_code == 200  # reads need no token


def test_first_user_is_admin_closes_signup_and_disables_users(web_client):
    admin, bob = web_client(ip="10.0.0.1"), web_client(ip="10.0.0.2")
    assert signup(admin, "admin@example.org").json()["user"]["is_admin"] is True
    bob_id = signup(bob, "bob@example.org").json()["user"]["id"]
    assert bob.get("/api/me").json()["user"]["is_admin"] is False

    for method, path, body in (("GET", "/api/admin/users", None), ("PATCH", "/api/admin/settings",
                                                                  {"signup_open": False}),
                               ("PATCH", f"/api/admin/users/{bob_id}", {"disabled": False})):
        assert bob.request(method, path, json=body).status_code == 403
        assert web_client(ip="10.0.0.9").request(method, path, json=body).status_code == 401

    users = admin.get("/api/admin/users").json()
    assert [(u["email"], u["is_admin"], u["disabled"]) for u in users] == [
        ("admin@example.org", True, False), ("bob@example.org", False, False)]
    assert set(users[0]) == {"id", "email", "name", "is_admin", "instructions", "has_password", "disabled",
                             "created_at", "usage"}
    assert users[1]["usage"] == {"conversations": 0, "messages": 0, "tokens": 0}

    assert admin.patch("/api/admin/settings", json={"signup_open": False}).json() == {"signup_open": False}
    newcomer = web_client(ip="10.0.0.3")
    assert newcomer.get("/api/me").json()["signup_open"] is False
    r = signup(newcomer, "carol@example.org")
    assert r.status_code == 403 and r.json()["error"]["code"] == "signup_closed"

    assert bob.get("/api/conversations").status_code == 200
    r = admin.patch(f"/api/admin/users/{bob_id}", json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True
    assert bob.get("/api/conversations").status_code == 401  # the open session stops at once
    assert bob.get("/api/me").json()["user"] is None
    refused = signin(web_client(ip="10.0.0.4"), "bob@example.org")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_credentials"
    assert admin.patch("/api/admin/users/9999", json={"disabled": True}).status_code == 404
    me = admin.get("/api/me").json()["user"]["id"]
    assert admin.patch(f"/api/admin/users/{me}", json={"disabled": True}).status_code == 400

    admin.patch(f"/api/admin/users/{bob_id}", json={"disabled": False})
    assert signin(web_client(ip="10.0.0.5"), "bob@example.org").status_code == 200


def test_signin_flood_is_rate_limited_per_account_and_per_ip(web_client):
    signup(web_client(ip="10.1.0.1", signin_per_minute=5), "ann@example.org")
    # Per account: five tries from five addresses, the sixth is refused whatever address it comes from.
    for i in range(5):
        assert signin(web_client(ip=f"10.2.0.{i}", signin_per_minute=5), "ann@example.org", "guess").status_code \
            == 401
    r = signin(web_client(ip="10.2.0.99", signin_per_minute=5), "ann@example.org", "guess")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    assert signin(web_client(ip="10.2.0.98", signin_per_minute=5), "ann@example.org").status_code == 429

    # Per address: one address trying many accounts is stopped too.
    sprayer = web_client(ip="10.3.0.1", signin_per_minute=5)
    codes = [signin(sprayer, f"user{i}@example.org", "guess").status_code for i in range(7)]
    assert codes == [401] * 5 + [429] * 2
    assert signin(web_client(ip="10.3.0.2", signin_per_minute=5), "other@example.org").status_code == 401


def test_providers_from_env():
    assert providers_from_env({}) == []
    [google] = providers_from_env({"SPUTNIK_OIDC_GOOGLE_CLIENT_ID": "id", "SPUTNIK_OIDC_GOOGLE_CLIENT_SECRET": "s"})
    assert (google.id, google.name, google.issuer, google.client_id) == ("google", "Google",
                                                                         "https://accounts.google.com", "id")
    assert google.discovery_url == "https://accounts.google.com/.well-known/openid-configuration"
    [custom] = providers_from_env({"SPUTNIK_OIDC_GOOGLE_CLIENT_ID": "id", "SPUTNIK_OIDC_GOOGLE_CLIENT_SECRET": "s",
                                   "SPUTNIK_OIDC_GOOGLE_ISSUER": "http://localhost:9999"})
    assert custom.issuer == "http://localhost:9999"


# ---- OIDC against a local provider (oidc-provider-mock)


@pytest.fixture(scope="module")
def oidc_server():
    oidc_provider_mock = pytest.importorskip("oidc_provider_mock")
    with oidc_provider_mock.run_server_in_thread(require_nonce=True) as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture
def mock_provider(oidc_server):
    return OIDCProvider(id="mock", name="Mock", issuer=oidc_server, client_id="sputnik-test",
                        client_secret="not-a-secret")


def oidc_sign_in(client, issuer: str, sub: str, claims: dict | None = None) -> httpx.Response:
    """The whole browser round trip: our login, the provider's form (submitting `sub`), our callback."""
    if claims is not None:
        httpx.put(f"{issuer}/users/{sub}", json=claims).raise_for_status()
    start = client.get("/auth/oidc/mock/login", follow_redirects=False)
    assert start.status_code == 302, start.text
    authorize = start.headers["location"]
    query = parse_qs(urlparse(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert query["state"][0] and query["nonce"][0] and "openid" in query["scope"][0].split()
    assert httpx.get(authorize).status_code == 200  # the provider's sign-in form
    back = httpx.post(authorize, data={"sub": sub}, follow_redirects=False)
    assert back.status_code == 302, back.text
    callback = back.headers["location"]
    assert callback.startswith("http://testserver/auth/oidc/mock/callback?")
    done = client.get(callback, follow_redirects=False)
    done.request.extensions["authorize"] = authorize  # for tests that look at what the provider was sent
    return done


def test_oidc_sign_in_keys_users_by_provider_and_sub(web_client, web_db, mock_provider, oidc_server, monkeypatch):
    # The token request carries the PKCE verifier whose S256 challenge went to the authorization page.
    verifiers = []
    real_fetch = AsyncOAuth2Client.fetch_token

    async def fetch_token(self, url=None, **kwargs):
        verifiers.append(kwargs.get("code_verifier"))
        return await real_fetch(self, url, **kwargs)

    monkeypatch.setattr(AsyncOAuth2Client, "fetch_token", fetch_token)
    password_user = web_client(providers=[mock_provider])
    assert signup(password_user, "ann@example.org").status_code == 200
    assert password_user.get("/api/me").json()["providers"] == [{"id": "mock", "name": "Mock"}]

    browser = web_client(providers=[mock_provider])
    done = oidc_sign_in(browser, oidc_server, "ann-sub",
                        {"email": "ann@example.org", "email_verified": True, "name": "Ann at Mock"})
    assert done.status_code == 302 and done.headers["location"] == "/"
    assert "sputnik_oidc=" in ";".join(done.headers.get_list("set-cookie"))  # the one-use state cookie is cleared
    challenge = parse_qs(urlparse(done.request.extensions["authorize"]).query)["code_challenge"][0]
    [verifier] = verifiers
    assert base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode() == challenge
    me = browser.get("/api/me").json()["user"]
    assert me["name"] == "Ann at Mock" and me["email"] == "ann@example.org" and me["is_admin"] is False
    password_id = password_user.get("/api/me").json()["user"]["id"]
    assert me["id"] != password_id  # same verified email, still a separate account
    assert browser.post("/api/conversations").status_code == 200

    second = web_client(providers=[mock_provider])
    assert oidc_sign_in(second, oidc_server, "ann-sub").status_code == 302
    assert second.get("/api/me").json()["user"]["id"] == me["id"]

    third = web_client(providers=[mock_provider])
    assert oidc_sign_in(third, oidc_server, "someone-else", {"email": "ann@example.org"}).status_code == 302
    assert third.get("/api/me").json()["user"]["id"] not in (me["id"], password_id)

    with web_db.session() as s:
        identities = s.scalars(select(Identity).order_by(Identity.id)).all()
        assert [(i.provider, i.subject, i.user_id) for i in identities] == [
            ("mock", "ann-sub", me["id"]), ("mock", "someone-else", identities[1].user_id)]
        assert identities[0].email_verified is True and identities[1].email_verified is False
        assert store.find_oidc_user(s, "mock", "ann-sub").id == me["id"]


def test_oidc_refuses_forged_or_missing_state(web_client, mock_provider, oidc_server):
    browser = web_client(providers=[mock_provider])
    start = browser.get("/auth/oidc/mock/login", follow_redirects=False)
    authorize = start.headers["location"]
    back = httpx.post(authorize, data={"sub": "mallory"}, follow_redirects=False)
    params = parse_qs(urlparse(back.headers["location"]).query)
    code, state = params["code"][0], params["state"][0]

    forged = browser.get("/auth/oidc/mock/callback", params={"code": code, "state": "forged" + state},
                         follow_redirects=False)
    assert forged.status_code == 400 and forged.json()["error"]["code"] == "invalid_state"
    # Another browser (no state cookie) cannot use a callback link meant for this one.
    stranger = web_client(providers=[mock_provider])
    r = stranger.get("/auth/oidc/mock/callback", params={"code": code, "state": state}, follow_redirects=False)
    assert r.status_code == 400
    # A tampered state cookie fails its signature.
    tampered = web_client(providers=[mock_provider])
    replace_cookie(tampered, STATE_COOKIE, browser.cookies[STATE_COOKIE][:-2] + "xx", path="/auth/oidc/")
    r = tampered.get("/auth/oidc/mock/callback", params={"code": code, "state": state}, follow_redirects=False)
    assert r.status_code == 400
    assert browser.get("/api/me").json()["user"] is None and stranger.get("/api/me").json()["user"] is None

    refused = browser.get("/auth/oidc/mock/callback", params={"error": "access_denied", "state": state},
                          follow_redirects=False)
    assert refused.status_code == 400
    assert browser.get("/auth/oidc/nope/login", follow_redirects=False).status_code == 404


def test_oidc_new_accounts_follow_signup_closed(web_client, mock_provider, oidc_server):
    admin = web_client(providers=[mock_provider])
    assert oidc_sign_in(admin, oidc_server, "first-sub", {"email": "boss@example.org"}).status_code == 302
    assert admin.get("/api/me").json()["user"]["is_admin"] is True  # an OIDC user can be the first, too
    admin.patch("/api/admin/settings", json={"signup_open": False})
    newcomer = web_client(providers=[mock_provider])
    r = oidc_sign_in(newcomer, oidc_server, "new-sub", {"email": "new@example.org"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "signup_closed"
    back = web_client(providers=[mock_provider])
    assert oidc_sign_in(back, oidc_server, "first-sub").status_code == 302  # existing identities still sign in


def test_oidc_refuses_an_expired_state_and_a_wrong_nonce(web_client, web_db, mock_provider, oidc_server,
                                                        monkeypatch):
    def provider_round_trip(browser):
        start = browser.get("/auth/oidc/mock/login", follow_redirects=False)
        back = httpx.post(start.headers["location"], data={"sub": "late"}, follow_redirects=False)
        return back.headers["location"]

    browser = web_client(providers=[mock_provider])
    callback = provider_round_trip(browser)
    with monkeypatch.context() as later:  # the user comes back after the state's lifetime
        later.setattr(TimestampSigner, "get_timestamp", lambda self: int(time.time()) + STATE_TTL_S + 5)
        r = browser.get(callback, follow_redirects=False)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_state"

    # A state cookie signed with the server's own key but a different nonce: the ID token's nonce must not match.
    browser = web_client(providers=[mock_provider])
    callback = provider_round_trip(browser)
    with web_db.session() as s:
        signer = URLSafeTimedSerializer(store.secret_key(s), salt=STATE_SALT)
    saved = signer.loads(browser.cookies[STATE_COOKIE])
    replace_cookie(browser, STATE_COOKIE, signer.dumps({**saved, "n": "another-nonce"}), path="/auth/oidc/")
    r = browser.get(callback, follow_redirects=False)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_id_token", r.text
    assert browser.get("/api/me").json()["user"] is None
