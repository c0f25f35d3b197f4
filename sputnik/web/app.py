"""The whole of `sputnik serve`: the API (sputnik.serve) with, unless --no-web, the chat page, its accounts and its
saved conversations. This is the one place the two are put together; serve knows nothing of web."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from sputnik.serve.app import ServeConfig, create_app, load_backend
from sputnik.serve.server import Backend, Server
from sputnik.web.auth import Auth
from sputnik.web.chat import chat_router
from sputnik.web.db import Database, database_url
from sputnik.web.oidc import providers_from_env
from sputnik.web.page import STATIC, HTMLHeaders, Static, page_router
from sputnik.web.routes import web_router


def build_app(cfg: ServeConfig | None = None, loader: Callable[[ServeConfig], Backend] = load_backend) -> FastAPI:
    """The API app, and unless cfg.no_web the chat's routes and static files on the same origin (app.state.db)."""
    cfg = cfg or ServeConfig()
    app = create_app(cfg, loader=loader)
    if not cfg.no_web:
        add_web(app, cfg, app.state.server)
    app.add_middleware(HTMLHeaders)  # every HTML answer, /docs too, carries a CSP
    return app


def add_web(app: FastAPI, cfg: ServeConfig, server: Server) -> None:
    db = Database(cfg.database_url or database_url())
    db.migrate()
    auth = Auth(db)
    providers = cfg.oidc if cfg.oidc is not None else providers_from_env()
    app.include_router(web_router(db, providers, auth=auth, public_url=cfg.public_url))
    app.include_router(chat_router(db, server, auth))
    app.include_router(page_router())
    app.mount("/static", Static(directory=STATIC), name="static")
    app.state.db, app.state.auth = db, auth
