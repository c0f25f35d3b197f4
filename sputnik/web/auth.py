"""Passwords, sign-in limits, cookie sessions and CSRF for the web chat, as FastAPI dependencies.

A session is a random token in the HttpOnly cookie `sputnik_session`; the database keeps only its sha256, so a
leaked database signs nobody in. CSRF is a double submit: every POST/PATCH/PUT/DELETE must send the header
`X-CSRF-Token` equal to the (script-readable) cookie `sputnik_csrf`, and, when signed in, equal to the token the
session was started with. A cross-site page can make the browser send cookies but cannot set that header.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, model_validator
from pydantic_core import PydanticCustomError
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session as DBSession

from sputnik.serve.keys import RateLimiter
from sputnik.serve.protocol import refuse_lone_surrogates
from sputnik.web.db import Database, Session, User, utcnow
from sputnik.web.store import get_by_email, normalize_email

SESSION_COOKIE = "sputnik_session"
CSRF_COOKIE = "sputnik_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL = timedelta(days=30)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # argon2 takes any length; a cap keeps one request from making it hash megabytes
_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,128}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class WebError(Exception):
    """An error the web API answers as {"error": {"message", "code"}} with a 4xx status."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "code": self.code}}, status_code=self.status,
                            headers=self.headers)


def refuse_nul(value: Any, where: str = "text") -> Any:
    """Text with a NUL is refused: PostgreSQL cannot store one, and no one types it."""
    if isinstance(value, str) and "\x00" in value:
        raise WebError(400, f"{where}: holds a NUL character", "invalid_request")
    return value


class WebBody(BaseModel):
    """A web API request body: only text that a database can keep (no lone surrogates, no NUL) in any field."""

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        data = refuse_lone_surrogates(data)
        if _has_nul(data):
            raise PydanticCustomError("nul", "a field holds a NUL character, which cannot be stored")
        return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return isinstance(value, list) and any(_has_nul(v) for v in value)


class WebRoute(APIRoute):
    """A route that answers WebError and body-validation errors in the web API's error shape.

    Done per route rather than with app-wide exception handlers, because the app this router joins (`sputnik
    serve`) already answers those errors in the OpenAI shape for its own routes.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except WebError as e:
                return e.response()
            except RequestValidationError as e:
                return WebError(400, _validation_message(e), "invalid_request").response()
            except HTTPException as e:  # a body that is not JSON in UTF-8 never reaches validation
                return WebError(e.status_code, str(e.detail), "invalid_request").response()

        return guarded


def _validation_message(e: RequestValidationError) -> str:
    errors = e.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))


def token_hash(token: str) -> str:
    # Session tokens are 256 random bits: a fast hash suffices, there is no small space of likely tokens to search.
    return hashlib.sha256(token.encode()).hexdigest()


def client_ip(request: Request) -> str:
    # The peer address; behind a proxy, run uvicorn with --proxy-headers so that it is the real client's.
    return request.client.host if request.client else "unknown"


def check_email(email: str) -> str | None:
    """The email normalized, or None when it does not look like an address."""
    email = normalize_email(email)
    return email if len(email) <= 254 and _EMAIL.fullmatch(email) else None


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and secrets.compare_digest(a.encode(), b.encode())


class Auth:
    """Sign-in, sessions and CSRF over one Database; current_user, require_admin, require_csrf are dependencies."""

    def __init__(self, db: Database, *, signin_per_minute: float = 10, session_ttl: timedelta = SESSION_TTL,
                 hasher: PasswordHasher | None = None):
        self.db = db
        self.hasher = hasher or PasswordHasher()
        self.session_ttl = session_ttl
        self.per_account = RateLimiter(signin_per_minute)
        self.per_ip = RateLimiter(signin_per_minute)
        # Unknown emails are checked against this, so a sign-in takes as long whether the account exists or not.
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))

    # ---- passwords and sign-in

    def hash_password(self, password: str) -> str:
        return self.hasher.hash(password)

    def password_matches(self, stored: str, password: str) -> bool:
        try:
            return self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def check_rate(self, request: Request, email: str | None = None) -> None:
        """429 with Retry-After once this client address, or this account, has tried too often."""
        keys = [(self.per_ip, f"ip:{client_ip(request)}")]
        if email:
            keys.append((self.per_account, f"email:{normalize_email(email)}"))
        for limiter, key in keys:
            wait = limiter.check(key)
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                raise WebError(429, f"Too many attempts: try again in {seconds} s.", "rate_limited",
                               {"Retry-After": str(seconds)})

    def authenticate(self, s: DBSession, email: str, password: str) -> User:
        """The account these credentials open, else one 401 for every cause (unknown, wrong, disabled)."""
        user = get_by_email(s, email) if email else None
        stored = user.password_hash if user is not None and user.password_hash else self._dummy_hash
        ok = self.password_matches(stored, password)
        if not ok or user is None or not user.password_hash or user.disabled:
            raise WebError(401, "Wrong email or password.", "invalid_credentials")
        if self.hasher.check_needs_rehash(stored):  # the hasher's cost went up since this hash was made
            user.password_hash = self.hasher.hash(password)
        return user

    # ---- sessions

    def start_session(self, s: DBSession, user: User, request: Request, response: Response) -> Session:
        """A new session for `user`, its cookies set on `response`."""
        now = utcnow()
        # Sessions of this user that can never work again are dropped here, so the table does not only grow.
        s.execute(delete(Session).where(Session.user_id == user.id,
                                        or_(Session.expires_at < now, Session.revoked_at.is_not(None))))
        token = secrets.token_urlsafe(32)
        # The page already holds the CSRF token it read from /api/me; keeping it spares the page a second read.
        csrf = self._cookie_csrf(request) or secrets.token_urlsafe(32)
        row = Session(user_id=user.id, token_hash=token_hash(token), csrf=csrf, created_at=now,
                      expires_at=now + self.session_ttl)
        s.add(row)
        s.flush()
        secure = request.url.scheme == "https"
        max_age = int(self.session_ttl.total_seconds())
        response.set_cookie(SESSION_COOKIE, token, max_age=max_age, path="/", httponly=True, samesite="lax",
                            secure=secure)
        self._set_csrf_cookie(request, response, csrf)
        return row

    def end_session(self, s: DBSession, request: Request, response: Response) -> None:
        """Revoke this browser's session in the database (the cookie alone no longer opens it) and drop the cookie."""
        row = self.lookup(s, request)
        if row is not None:
            row.revoked_at = utcnow()
            s.flush()
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                               secure=request.url.scheme == "https")

    def end_all_sessions(self, s: DBSession, user_id: int, keep: Session | None = None) -> int:
        """Revoke every live session of this user (but `keep`): sign out everywhere, or after a password change."""
        stmt = update(Session).where(Session.user_id == user_id, Session.revoked_at.is_(None))
        if keep is not None:
            stmt = stmt.where(Session.id != keep.id)
        return s.execute(stmt.values(revoked_at=utcnow())).rowcount or 0

    def lookup(self, s: DBSession, request: Request) -> Session | None:
        """The live session of this request's cookie (not expired, not revoked, user not disabled), or None."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token or not _TOKEN.fullmatch(token):
            return None
        row = s.scalar(select(Session).where(Session.token_hash == token_hash(token)))
        if row is None or row.revoked_at is not None or row.expires_at <= utcnow():
            return None
        user = s.get(User, row.user_id)
        if user is None or user.disabled:
            return None
        return row

    # ---- CSRF

    def _cookie_csrf(self, request: Request) -> str | None:
        value = request.cookies.get(CSRF_COOKIE)
        return value if value and _TOKEN.fullmatch(value) else None

    def _set_csrf_cookie(self, request: Request, response: Response, csrf: str) -> None:
        response.set_cookie(CSRF_COOKIE, csrf, max_age=int(self.session_ttl.total_seconds()), path="/",
                            httponly=False, samesite="lax", secure=request.url.scheme == "https")

    def csrf_token(self, request: Request, response: Response, session: Session | None = None) -> str:
        """The CSRF token the page must echo: the session's when signed in, else the cookie's (set if missing)."""
        current = self._cookie_csrf(request)
        wanted = session.csrf if session is not None else current or secrets.token_urlsafe(32)
        if wanted != current:
            self._set_csrf_cookie(request, response, wanted)
        return wanted

    # ---- dependencies

    def require_csrf(self, request: Request) -> None:
        """403 unless a state-changing request's X-CSRF-Token header equals its sputnik_csrf cookie."""
        if request.method not in UNSAFE_METHODS:
            return
        if not _same(request.headers.get(CSRF_HEADER), request.cookies.get(CSRF_COOKIE)):
            raise WebError(403, "Missing or wrong CSRF token: reload the page.", "csrf_failed")

    def optional_user(self, request: Request) -> User | None:
        """The signed-in user, or None."""
        with self.db.session() as s:
            row = self.lookup(s, request)
            if row is None:
                return None
            if request.method in UNSAFE_METHODS and not _same(request.headers.get(CSRF_HEADER), row.csrf):
                raise WebError(403, "Missing or wrong CSRF token: reload the page.", "csrf_failed")
            return s.get(User, row.user_id)

    def current_user(self, request: Request) -> User:
        """The signed-in user; 401 when signed out, the session is revoked or expired, or the user is disabled."""
        user = self.optional_user(request)
        if user is None:
            raise WebError(401, "Sign in first.", "not_signed_in")
        return user

    def require_admin(self, request: Request) -> User:
        """The signed-in user if an admin, else 403 (401 when signed out)."""
        user = self.current_user(request)
        if not user.is_admin:
            raise WebError(403, "Only an admin may do this.", "forbidden")
        return user
