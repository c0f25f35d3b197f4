"""The chat page: index.html in the reader's language (cookie, else Accept-Language), under a strict CSP."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

STATIC = Path(__file__).parent / "static"
LANGUAGES = ("en", "ko")
TITLES = {"en": "sputnik", "ko": "스푸트니크"}

# Scripts only from this origin (no inline script: the i18n strings travel as JSON data); KaTeX sets inline styles.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY"}


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
