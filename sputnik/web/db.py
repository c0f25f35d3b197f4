"""The web chat's tables (SQLAlchemy 2), the Database that opens them, and Alembic migrations run from code."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import platformdirs
from sqlalchemy import (Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text, TypeDecorator,
                        UniqueConstraint, create_engine, event, orm)
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).parent / "migrations"

# Named constraints let later migrations (SQLite's batch mode above all) find and change them by name.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A moment in UTC, aware on the way out: SQLite drops the zone, so naive values read back are taken as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """The web chat's tables."""

    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    """An account: a password one (email and hash) or one made by an OIDC sign-in (no password)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str | None] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str | None] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    instructions: Mapped[str | None] = mapped_column(Text)  # the user's own system prompt, sent with every chat

    # Loaded with the user, so a user read in one database session can still be shown after it closes.
    identities: Mapped[list[Identity]] = relationship(back_populates="user", lazy="selectin",
                                                      cascade="all, delete-orphan", passive_deletes=True)


class Identity(Base):
    """A user's account at an OIDC provider, known by (provider, subject) alone: emails can change hands."""

    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("provider", "subject"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    email_verified: Mapped[bool] = mapped_column(Boolean, default=False)

    user: Mapped[User] = relationship(back_populates="identities")


class Session(Base):
    """A signed-in browser: only the sha256 of its cookie's token is kept, so a database leak signs nobody in."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Setting(Base):
    """One server-wide setting, its value as JSON text."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Conversation(Base):
    """One chat of one user."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The last message of the branch on show (None: no messages yet); its parents back to the first are the chat.
    # No foreign key: messages already point at conversations, and a cycle would complicate every migration.
    current_id: Mapped[int | None] = mapped_column(Integer)

    messages: Mapped[list[Message]] = relationship(back_populates="conversation", order_by="Message.position",
                                                   cascade="all, delete-orphan", passive_deletes=True)


class Message(Base):
    """One turn of a conversation; an answer still streaming (or cut by a restart) has finished=False.

    Messages form a tree: each points at the one it follows (`parent_id`, None for a first message), and messages
    with the same parent are versions of one turn (an answer regenerated, a question edited); `position` is the
    order they were written in."""

    __tablename__ = "messages"
    __table_args__ = (Index(None, "conversation_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    reasoning: Mapped[str | None] = mapped_column(Text)
    reasoning_seconds: Mapped[float | None] = mapped_column(Float)
    finished: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    tokens: Mapped[int | None] = mapped_column(Integer)  # an answer's completion tokens: the user's usage
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16))  # an answer's: stop, length, stopped, error
    # Of this message's replies (versions of the next turn), the one shown last: coming back to this message shows
    # it again. None: the latest one.
    chosen_id: Mapped[int | None] = mapped_column(Integer)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


def data_dir() -> Path:
    return Path(os.environ.get("SPUTNIK_DATA_DIR") or platformdirs.user_data_dir("sputnik"))


def database_url() -> str:
    """DATABASE_URL when set, else a SQLite file in the data folder (made if missing)."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    folder = data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'sputnik.db'}"


def normalize_url(url: str) -> str:
    # psycopg 3 is the driver we ship; plain postgresql:// would make SQLAlchemy look for psycopg2.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def alembic_config(url: str | None = None):
    """An Alembic Config for our migrations, built in code: no alembic.ini is needed."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # the ini parser reads % as interpolation
    return cfg


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers go on while one thread writes a streaming answer; the timeout makes writers queue, not fail.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")  # safe under WAL: a power cut loses at most the last commits
    cur.close()


class Database:
    """An engine and a session factory over one database URL (SQLite or PostgreSQL); safe to share across threads."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        kwargs: dict = {}
        if parsed.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if parsed.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared connection, or every thread sees its own empty db
            else:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True  # a server restart leaves dead connections in the pool
        self.engine: Engine = create_engine(self.url, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        # Objects stay readable after commit, so callers may return what they loaded once the session is closed.
        self._sessions = orm.sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[orm.Session]:
        """A session that commits when the block ends and rolls back when it raises."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema up to `revision` with Alembic (safe to run at every start)."""
        from alembic import command

        cfg = alembic_config()
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def close(self) -> None:
        self.engine.dispose()
