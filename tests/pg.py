"""A throwaway PostgreSQL server for tests: initdb into a temp folder, start it on a free loopback port, remove it.

As root (CI, containers) the server runs as the `postgres` user, since PostgreSQL refuses to run as root.
Without the binaries the tests that need it skip, or fail under SPUTNIK_REQUIRE_PG=1 (as `make test` runs).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                      if Path(p).parent.name.isdigit() else 0)
    for folder in reversed(versions):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL will not run as root; as anyone else we run it as ourselves.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(_as_postgres(cmd), cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def _unavailable(reason: str) -> None:
    if os.environ.get("SPUTNIK_REQUIRE_PG") == "1":
        pytest.fail(f"PostgreSQL is required (SPUTNIK_REQUIRE_PG=1) but {reason}")
    pytest.skip(f"PostgreSQL not available: {reason}")


@contextmanager
def postgres(dbname: str = "sputnik") -> Iterator[str]:
    """Yield the SQLAlchemy URL of a new database `dbname` on a fresh server; stop and delete it afterwards."""
    bindir = find_bindir()
    if bindir is None:
        _unavailable("initdb/pg_ctl are not on PATH nor in /usr/lib/postgresql/*/bin")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _unavailable("running as root needs `runuser` to start the server as the postgres user")
    root = Path(tempfile.mkdtemp(prefix="sputnik-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    started = False
    try:
        # No fsync anywhere: the data lives for one test run.
        _run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
              "--no-sync", "--no-instructions"], root)
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        _run([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w",
              "-t", "60", "start"], root)
        started = True
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{dbname}"
    finally:
        if started:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], root)
        shutil.rmtree(root, ignore_errors=True)
