"""The web chat's HTTP routes (docs/web-api.md): accounts, admin, and the user's own conversations.

The message stream, /stop and /api/models live with the chat itself (sputnik.web.chat); they share this module's
Auth, store functions and WebRoute so that every route answers errors the same way.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from sputnik.web import store
from sputnik.web.auth import MAX_PASSWORD, MIN_PASSWORD, Auth, WebBody, WebError, WebRoute, check_email, refuse_nul
from sputnik.web.db import Database, User
from sputnik.web.oidc import OIDC, OIDCProvider
from sputnik.web.store import NotFound


MAX_INSTRUCTIONS = 4000


class SignupBody(WebBody):
    email: str = Field(max_length=320)
    password: str
    name: str | None = Field(None, max_length=200)


class SigninBody(WebBody):
    email: str = Field(max_length=320)
    password: str = Field(max_length=MAX_PASSWORD)


class PasswordChange(WebBody):
    current_password: str = Field("", max_length=MAX_PASSWORD)
    new_password: str


class MePatch(WebBody):
    name: str | None = Field(None, max_length=200)
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS)


class UserPatch(WebBody):
    disabled: bool


class SettingsPatch(WebBody):
    signup_open: bool


class NewConversation(WebBody):
    title: str | None = Field(None, max_length=10_000)


class ConversationPatch(WebBody):
    title: str = Field(max_length=10_000)


def not_found() -> WebError:
    return WebError(404, "No such conversation.", "not_found")


def _filename(title: str, ext: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:60]
    return f"{slug or 'conversation'}.{ext}"


def web_router(db: Database, providers: list[OIDCProvider] | None = None, *, auth: Auth | None = None,
               public_url: str | None = None) -> APIRouter:
    """Every route of docs/web-api.md except the message stream, /stop, /api/models and the page itself.

    `auth` defaults to a new Auth(db); pass the one the chat routes use so both share rate limits.
    `public_url` (e.g. https://chat.example.org) fixes the OIDC redirect URI when a proxy hides the real one.
    The schema must exist: call db.migrate() first.
    """
    auth = auth or Auth(db)
    providers = list(providers or [])
    # CSRF is checked before anything else on every state-changing route here (GET, HEAD pass through).
    api = APIRouter(route_class=WebRoute, dependencies=[Depends(auth.require_csrf)])
    api.include_router(accounts_router(db, auth, providers))
    api.include_router(admin_router(db, auth))
    api.include_router(conversations_router(db, auth))
    router = APIRouter(route_class=WebRoute)
    router.include_router(oidc_router(db, auth, providers, public_url))
    router.include_router(api)
    return router


def accounts_router(db: Database, auth: Auth, providers: list[OIDCProvider]) -> APIRouter:
    """/api/me and password sign-up, sign-in and sign-out."""
    api = APIRouter(route_class=WebRoute)

    @api.get("/api/me")
    def me(request: Request, response: Response):
        with db.session() as s:
            row = auth.lookup(s, request)
            user = s.get(User, row.user_id) if row else None
            return {"user": store.user_dict(user) if user else None,
                    "csrf": auth.csrf_token(request, response, row),
                    "signup_open": store.signup_open(s),
                    "providers": [{"id": p.id, "name": p.name} for p in providers]}

    @api.post("/api/auth/signup")
    def signup(body: SignupBody, request: Request, response: Response):
        auth.check_rate(request)
        email = check_email(body.email)
        if email is None:
            raise WebError(400, "Enter a valid email address.", "signup_failed")
        if not MIN_PASSWORD <= len(body.password) <= MAX_PASSWORD:
            raise WebError(400, f"Use a password of {MIN_PASSWORD} to {MAX_PASSWORD} characters.", "signup_failed")
        # Hashed before the email is looked up, so a taken address answers no faster than a new one.
        password_hash = auth.hash_password(body.password)
        with db.session() as s:
            if not store.signup_open(s):
                raise WebError(403, "Sign-up is closed on this server.", "signup_closed")
            if store.get_by_email(s, email) is not None:
                raise WebError(400, "Could not create an account with this email and password.", "signup_failed")
            name = (body.name or "").strip() or email.split("@")[0]
            user = store.create_user(s, email, name, password_hash)
            auth.start_session(s, user, request, response)
            return {"user": store.user_dict(user)}

    @api.post("/api/auth/signin")
    def signin(body: SigninBody, request: Request, response: Response):
        auth.check_rate(request, body.email)
        with db.session() as s:
            user = auth.authenticate(s, body.email, body.password)
            auth.start_session(s, user, request, response)
            return {"user": store.user_dict(user)}

    @api.post("/api/auth/signout")
    def signout(request: Request, response: Response):
        with db.session() as s:
            auth.end_session(s, request, response)
        return {"ok": True}

    account_routes(api, db, auth)
    return api


def account_routes(api: APIRouter, db: Database, auth: Auth) -> None:
    """The account page: name and custom instructions, a new password, and signing out everywhere."""

    @api.patch("/api/me")
    def update_me(body: MePatch, user: User = Depends(auth.current_user)):
        with db.session() as s:
            row = s.get(User, user.id)
            if body.name is not None and body.name.strip():
                row.name = body.name.strip()
            if body.instructions is not None:
                store.set_instructions(s, row, body.instructions)
            return {"user": store.user_dict(row)}

    @api.post("/api/auth/password")
    def change_password(body: PasswordChange, request: Request, user: User = Depends(auth.current_user)):
        auth.check_rate(request, user.email)
        if not MIN_PASSWORD <= len(body.new_password) <= MAX_PASSWORD:
            raise WebError(400, f"Use a password of {MIN_PASSWORD} to {MAX_PASSWORD} characters.", "weak_password")
        new_hash = auth.hash_password(body.new_password)
        with db.session() as s:
            row = s.get(User, user.id)
            if row.password_hash and not auth.password_matches(row.password_hash, body.current_password):
                raise WebError(400, "The current password is wrong.", "wrong_password")
            row.password_hash = new_hash
            # Whoever knew the old password is signed out; this browser stays signed in.
            revoked = auth.end_all_sessions(s, user.id, keep=auth.lookup(s, request))
        return {"ok": True, "signed_out": revoked}

    @api.post("/api/auth/signout-all")
    def signout_all(request: Request, response: Response, user: User = Depends(auth.current_user)):
        with db.session() as s:
            revoked = auth.end_all_sessions(s, user.id)
            auth.end_session(s, request, response)
        return {"ok": True, "signed_out": revoked}


def oidc_router(db: Database, auth: Auth, providers: list[OIDCProvider], public_url: str | None) -> APIRouter:
    """"Sign in with …": the redirect to the provider and the callback that signs the user in (or up)."""
    router = APIRouter(route_class=WebRoute)

    async def secret() -> str:
        def read() -> str:
            with db.session() as s:
                return store.secret_key(s)
        return await run_in_threadpool(read)

    oidc = OIDC(providers, secret)

    def callback_url(request: Request, provider: str) -> str:
        if public_url:
            return f"{public_url.rstrip('/')}/auth/oidc/{provider}/callback"
        return str(request.url_for("oidc_callback", provider=provider))

    @router.get("/auth/oidc/{provider}/login")
    async def oidc_login(provider: str, request: Request):
        return await oidc.login(provider, request, callback_url(request, provider))

    @router.get("/auth/oidc/{provider}/callback", name="oidc_callback")
    async def oidc_callback(provider: str, request: Request):
        login = await oidc.finish(provider, request)

        def sign_in() -> Response:
            with db.session() as s:
                if store.find_oidc_user(s, login.provider, login.sub) is None and not store.signup_open(s):
                    raise WebError(403, "Sign-up is closed on this server.", "signup_closed")
                user = store.find_or_create_oidc_user(s, login.provider, login.sub, login.email,
                                                      login.email_verified, login.name)
                if user.disabled:
                    raise WebError(403, "This account is disabled.", "account_disabled")
                response = RedirectResponse("/", status_code=302)
                auth.start_session(s, user, request, response)
                return response

        response = await run_in_threadpool(sign_in)
        oidc.clear_state(request, response)
        return response

    return router


def admin_router(db: Database, auth: Auth) -> APIRouter:
    """The admin's users and the server's sign-up switch."""
    api = APIRouter(route_class=WebRoute)

    @api.get("/api/admin/users")
    def admin_users(_: User = Depends(auth.require_admin)):
        with db.session() as s:
            usage = store.usage_by_user(s)
            return [store.user_dict(u, admin_view=True, usage=usage) for u in store.list_users(s)]

    @api.patch("/api/admin/users/{user_id}")
    def admin_user(user_id: int, body: UserPatch, admin: User = Depends(auth.require_admin)):
        if user_id == admin.id and body.disabled:
            raise WebError(400, "You cannot disable your own account.", "invalid_request")
        with db.session() as s:
            try:
                user = store.set_disabled(s, user_id, body.disabled)
            except NotFound as e:
                raise WebError(404, "No such user.", "not_found") from e
            return store.user_dict(user, admin_view=True)

    @api.patch("/api/admin/settings")
    def admin_settings(body: SettingsPatch, _: User = Depends(auth.require_admin)):
        with db.session() as s:
            store.set_signup_open(s, body.signup_open)  # sign-up closed: only the admin adds people (OIDC too)
            return {"signup_open": store.signup_open(s)}

    return api


def conversations_router(db: Database, auth: Auth) -> APIRouter:
    """The signed-in user's own conversations: list, create, read, rename, delete, export."""
    api = APIRouter(route_class=WebRoute)

    @api.get("/api/conversations")
    def conversations(q: str | None = Query(None, max_length=500), user: User = Depends(auth.current_user)):
        refuse_nul(q, "q")
        with db.session() as s:
            return [store.conversation_dict(c) for c in store.list_conversations(s, user.id, q)]

    @api.post("/api/conversations")
    def new_conversation(body: NewConversation | None = None, user: User = Depends(auth.current_user)):
        with db.session() as s:
            return store.conversation_dict(store.create_conversation(s, user.id, body.title if body else None))

    @api.get("/api/conversations/{conversation_id}")
    def conversation(conversation_id: str, user: User = Depends(auth.current_user)):
        with db.session() as s:
            try:
                return store.export_json(s, user.id, conversation_id)
            except NotFound as e:
                raise not_found() from e

    @api.patch("/api/conversations/{conversation_id}")
    def rename(conversation_id: str, body: ConversationPatch, user: User = Depends(auth.current_user)):
        with db.session() as s:
            try:
                return store.conversation_dict(store.rename_conversation(s, user.id, conversation_id, body.title))
            except NotFound as e:
                raise not_found() from e

    @api.delete("/api/conversations/{conversation_id}")
    def remove(conversation_id: str, user: User = Depends(auth.current_user)):
        with db.session() as s:
            try:
                store.delete_conversation(s, user.id, conversation_id)
            except NotFound as e:
                raise not_found() from e
        return {"ok": True}

    @api.get("/api/conversations/{conversation_id}/export")
    def export(conversation_id: str, format: Literal["json", "md"] = "json",
               user: User = Depends(auth.current_user)):
        with db.session() as s:
            try:
                conv = store.get_conversation(s, user.id, conversation_id)
                if format == "json":
                    text = json.dumps(store.export_json(s, user.id, conversation_id), ensure_ascii=False, indent=2)
                    media = "application/json"
                else:
                    text = store.export_markdown(s, user.id, conversation_id)
                    media = "text/markdown; charset=utf-8"
            except NotFound as e:
                raise not_found() from e
        disposition = f'attachment; filename="{_filename(conv.title, format)}"'
        return Response(text, media_type=media, headers={"Content-Disposition": disposition})

    return api
