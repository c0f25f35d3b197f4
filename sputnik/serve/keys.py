"""API keys kept as hashes in SQLite, and a per-key token-bucket rate limiter."""

from __future__ import annotations

import hashlib
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

PREFIX_CHARS = 10  # "sk-" and 7 more: enough to tell keys apart in a list, far too little to guess the rest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL
)
"""
_COLUMNS = "id, name, prefix, created_at, revoked_at"


@dataclass
class KeyRecord:
    """One API key as stored: never the key itself. Times are Unix seconds."""

    id: int
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _hash(key: str) -> str:
    # The keys are 256 random bits, so a fast unsalted hash is enough: there is no small space of likely keys to
    # search, unlike passwords, and a lookup by hash keeps each request's check to one indexed query.
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The server's API keys in one SQLite file; safe to use from many threads (one connection per call)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.execute(_SCHEMA)
        self.path.chmod(0o600)  # hashes are not keys, but nobody else needs to read the list of them

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def create(self, name: str) -> tuple[KeyRecord, str]:
        """A new key: its record, and the key itself, which is shown this once and never stored."""
        key = "sk-" + secrets.token_urlsafe(32)
        created_at = time.time()
        with closing(self._connect()) as conn, conn:
            cur = conn.execute("INSERT INTO api_keys (name, prefix, hash, created_at) VALUES (?, ?, ?, ?)",
                               (name, key[:PREFIX_CHARS], _hash(key), created_at))
            key_id = cur.lastrowid
        return KeyRecord(key_id, name, key[:PREFIX_CHARS], created_at), key

    def list(self) -> list[KeyRecord]:
        """Every key, revoked ones included, oldest first."""
        with closing(self._connect()) as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY id").fetchall()
        return [KeyRecord(*row) for row in rows]

    def revoke(self, id_or_prefix: str) -> KeyRecord:
        """Revoke the one active key with this id, listed prefix, or full key; KeyError if none or several match."""
        wanted = str(id_or_prefix).strip()
        with closing(self._connect()) as conn, conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE revoked_at IS NULL "
                "AND (CAST(id AS TEXT) = ? OR prefix = ? OR hash = ?)",
                (wanted, wanted, _hash(wanted))).fetchall()
            if not rows:
                raise KeyError(f"no active API key has the id or prefix {wanted!r}")
            if len(rows) > 1:
                ids = ", ".join(str(row[0]) for row in rows)
                raise KeyError(f"{wanted!r} matches several active API keys (ids {ids}); revoke by id")
            record = KeyRecord(*rows[0])
            record.revoked_at = time.time()
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (record.revoked_at, record.id))
        return record

    def verify(self, key: str) -> KeyRecord | None:
        """The record of an active key, or None for an unknown or revoked one."""
        # Looking up by hash leaks nothing through timing: an attacker cannot steer which hash they probe for.
        with closing(self._connect()) as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE hash = ? AND revoked_at IS NULL",
                               (_hash(key),)).fetchone()
        return KeyRecord(*row) if row else None


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `per_minute`; per_minute <= 0 means no limit."""

    # Past this many buckets, full ones are dropped: a full bucket behaves exactly like a missing one.
    PRUNE_AT = 10_000

    def __init__(self, per_minute: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        # By default a client may spend a minute's allowance at once; the average rate is the same either way.
        self.burst = burst if burst is not None else max(1, math.ceil(per_minute))
        if self.burst < 1:
            raise ValueError("burst must be >= 1")
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when they were counted)
        self._lock = threading.Lock()

    def _refilled(self, tokens: float, since: float, now: float) -> float:
        return min(float(self.burst), tokens + (now - since) * self.per_minute / 60)

    def check(self, key: str) -> float:
        """0 when the request may go ahead (a token is spent), else the seconds to wait before retrying."""
        if self.per_minute <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            tokens, since = self._buckets.get(key, (float(self.burst), now))
            tokens = self._refilled(tokens, since, now)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1 - tokens) * 60 / self.per_minute
            if len(self._buckets) > self.PRUNE_AT:
                self._buckets = {k: (t, s) for k, (t, s) in self._buckets.items()
                                 if self._refilled(t, s, now) < self.burst}
        return wait
