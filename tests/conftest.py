"""Shared fixtures: the default model's GGUF (pulled by `make test` before pytest runs)."""

import os
import tempfile
from pathlib import Path

import pytest

from sputnik.checkpoint.registry import sputnik_home

pytest_plugins = ["live"]  # its think_model fixture serves the server and browser tests

# The web chat's database (created by every server a test starts) goes to a throwaway folder, never the user's.
os.environ.setdefault("SPUTNIK_DATA_DIR", tempfile.mkdtemp(prefix="sputnik-test-data-"))

DEFAULT_GGUF = Path("models") / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_sessionstart(session) -> None:
    """Without a compiler the kernels' tests skip; `make test` (SPUTNIK_REQUIRE_KERNELS=1) fails instead, as for
    the model, PostgreSQL and the browser."""
    if os.environ.get("SPUTNIK_REQUIRE_KERNELS") == "1":
        from sputnik import kernels

        if not kernels.available():
            pytest.exit(f"the CPU kernels are required (SPUTNIK_REQUIRE_KERNELS=1) but unavailable: "
                        f"{kernels._ext_error}", returncode=1)


def find_default_gguf() -> Path | None:
    if os.environ.get("SPUTNIK_TEST_GGUF"):
        return Path(os.environ["SPUTNIK_TEST_GGUF"])
    path = sputnik_home() / DEFAULT_GGUF
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real default model. `make test` sets SPUTNIK_REQUIRE_MODEL=1, so there its absence fails, never skips."""
    path = find_default_gguf()
    if path is None:
        if os.environ.get("SPUTNIK_REQUIRE_MODEL") == "1":
            pytest.fail("the default model is not installed: run `sputnik pull smollm2-135m-instruct`")
        pytest.skip("default model not installed (run `make model`)")
    return path


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf):
    from sputnik.tokenizer import Tokenizer

    return Tokenizer.load(default_gguf)


# ---- the web chat's database: SQLite and a throwaway PostgreSQL, and apps over it


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    """One database per backend for the whole run: a SQLite file, and a database on a fresh PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'sputnik.db'}"
        return
    from pg import postgres

    with postgres() as url:
        yield url


@pytest.fixture
def web_db(database_url):
    """A Database on `database_url`, emptied and migrated afresh for each test."""
    from sqlalchemy import text

    from sputnik.web.db import Base, Database

    db = Database(database_url)
    with db.engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    db.migrate()
    yield db
    db.close()


@pytest.fixture
def web_client(web_db):
    """make(ip=..., **Auth options) -> a signed-out TestClient (CSRF header set) over an app with the web router."""
    from argon2 import PasswordHasher
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sputnik.web.auth import Auth
    from sputnik.web.routes import web_router

    apps = {}

    def make(ip: str = "10.0.0.1", providers=(), base_url: str = "http://testserver", **auth_options):
        key = (tuple(p.id for p in providers), tuple(sorted(auth_options.items())))
        if key not in apps:
            # Cheap argon2 parameters: the tests hash hundreds of passwords on two cores.
            auth_options.setdefault("hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
            auth_options.setdefault("signin_per_minute", 1000)
            app = FastAPI()
            app.include_router(web_router(web_db, list(providers), auth=Auth(web_db, **auth_options)))
            apps[key] = app
        client = TestClient(apps[key], base_url=base_url, client=(ip, 50000))
        client.headers["X-CSRF-Token"] = client.get("/api/me").json()["csrf"]
        return client

    return make
