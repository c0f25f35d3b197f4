"""The chat page: index.html in the reader's language (cookie, else Accept-Language), under a strict CSP; its static
files under the same headers; and a CSP on every other HTML response of the app (the API's /docs)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).parent / "static"
LANGUAGES = ("en", "ko")
TITLES = {"en": "sputnik", "ko": "스푸트니크"}

# Scripts only from this origin (no inline script: the i18n strings travel as JSON data); KaTeX sets inline styles.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY"}
# FastAPI's /docs and /redoc load their scripts from a CDN and boot them inline; they show no user data, but may
# still not be framed nor send anything anywhere but here.
DOCS_CSP = ("default-src 'none'; script-src https://cdn.jsdelivr.net 'unsafe-inline'; "
            "style-src https://cdn.jsdelivr.net https://fonts.googleapis.com 'unsafe-inline'; "
            "font-src https://fonts.gstatic.com; img-src https://fastapi.tiangolo.com https://cdn.redoc.ly data:; "
            "worker-src blob:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


class Static(StaticFiles):
    """The page's scripts, styles and fonts, under the page's headers. The raw page (index.html, a template) is
    served only at `/`: from here it would run the chat without them."""

    async def get_response(self, path: str, scope: Scope):
        if path.lower().endswith((".html", ".htm")):
            response = JSONResponse({"error": {"message": "Not found.", "code": "not_found"}}, status_code=404)
        else:
            response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


class HTMLHeaders:
    """ASGI middleware: any HTML response without a CSP of its own gets one (the page's, or DOCS_CSP under /docs
    and /redoc), with nosniff and no framing."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        docs = scope["path"].startswith(("/docs", "/redoc"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                kind = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if kind.startswith(b"text/html") and b"content-security-policy" not in names:
                    extra = {**SECURITY_HEADERS, "Content-Security-Policy": DOCS_CSP if docs else CSP}
                    headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()
                                if k.lower().encode() not in names]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def pick_language(cookie: str | None, accept_language: str | None) -> str:
    """The cookie's choice, else the highest-weighted supported language of Accept-Language, else English."""
    if cookie in LANGUAGES:
        return cookie
    best, best_q = "en", 0.0
    for i, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            key, _, value = p.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        lang = tag.strip().lower().split("-")[0]
        # Earlier entries win ties, as the header's order is the reader's preference.
        if lang in LANGUAGES and (q > best_q):
            best, best_q = lang, q
    return best


@lru_cache(maxsize=None)
def _strings(lang: str) -> str:
    return json.dumps(json.loads((STATIC / "i18n" / f"{lang}.json").read_text(encoding="utf-8")),
                      ensure_ascii=False).replace("</", "<\\/")


@lru_cache(maxsize=None)
def _template() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


def render(lang: str) -> str:
    return (_template().replace("{{lang}}", lang).replace("{{title}}", TITLES[lang])
            .replace("{{i18n_json}}", _strings(lang)))


def page_router() -> APIRouter:
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(request: Request, lang: str | None = None):
        if lang in LANGUAGES:  # ?lang=ko: remember the choice, then show the page without the parameter
            response = RedirectResponse("/", status_code=303)
            response.set_cookie("sputnik_lang", lang, max_age=365 * 86400, samesite="lax")
            return response
        chosen = pick_language(request.cookies.get("sputnik_lang"), request.headers.get("accept-language"))
        return HTMLResponse(render(chosen), headers={**SECURITY_HEADERS, "Content-Language": chosen,
                                                     "Vary": "Accept-Language, Cookie"})

    return router
