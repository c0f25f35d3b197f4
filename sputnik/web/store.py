"""The web chat's data as plain functions over a SQLAlchemy session.

Every conversation and message function takes the signed-in `user_id` and answers `NotFound` for anything that
user does not own, exactly as for an id that does not exist, so ids from other accounts reveal nothing.
The caller owns the session (`with db.session() as s:`) and so the transaction; functions only flush.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session as DBSession

from sputnik.web.db import Conversation, Identity, Message, Setting, User, utcnow

DEFAULT_TITLE = ""  # untitled: the page shows "New chat" in the reader's language until the first message names it
TITLE_CHARS = 200
AUTO_TITLE_CHARS = 50
_CONVERSATION_ID = re.compile(r"[0-9a-f]{32}")
ROLES = ("system", "user", "assistant")


class NotFound(Exception):
    """No such row for this user (it may exist, owned by someone else)."""


# ---- users and identities


def user_count(s: DBSession) -> int:
    return s.scalar(select(func.count()).select_from(User)) or 0


def create_user(s: DBSession, email: str | None, name: str = "", password_hash: str | None = None) -> User:
    """A new account; the first one ever made is the admin. Emails are kept lower-cased."""
    # Two first sign-ups racing could both become admin; a one-person server's first minute is not worth a lock.
    user = User(email=normalize_email(email) if email else None, name=(name or "").strip()[:200],
                password_hash=password_hash, is_admin=user_count(s) == 0, disabled=False)
    s.add(user)
    s.flush()
    return user


def normalize_email(email: str) -> str:
    return email.strip().lower()


def get_by_email(s: DBSession, email: str) -> User | None:
    return s.scalar(select(User).where(User.email == normalize_email(email)))


def list_users(s: DBSession) -> list[User]:
    return list(s.scalars(select(User).order_by(User.id)))


def set_disabled(s: DBSession, user_id: int, disabled: bool) -> User:
    """Disable or re-enable an account; a disabled user's sessions stop working at once."""
    user = s.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    user.disabled = disabled
    s.flush()
    return user


def find_oidc_user(s: DBSession, provider: str, sub: str) -> User | None:
    identity = s.scalar(select(Identity).where(Identity.provider == provider, Identity.subject == sub))
    return identity.user if identity else None


def find_or_create_oidc_user(s: DBSession, provider: str, sub: str, email: str | None, email_verified: bool,
                             name: str | None) -> User:
    """The user behind (provider, sub), made on first sign-in.

    Never joined to an existing account by email: whoever controls an address at some provider would otherwise
    take over the password account that uses it. The identity's email is refreshed at every sign-in.
    """
    identity = s.scalar(select(Identity).where(Identity.provider == provider, Identity.subject == sub))
    if identity is None:
        user = create_user(s, None, name or email or sub)
        identity = Identity(provider=provider, subject=sub)
        user.identities.append(identity)
    identity.email = normalize_email(email) if email else None
    identity.email_verified = bool(email_verified)
    s.flush()
    return identity.user


def display_email(user: User) -> str | None:
    """The account's own email, or for an OIDC account the email its provider gave."""
    if user.email:
        return user.email
    return next((i.email for i in user.identities if i.email), None)


def user_dict(user: User, admin_view: bool = False, usage: dict | None = None) -> dict:
    out = {"id": user.id, "email": display_email(user), "name": user.name, "is_admin": user.is_admin,
           "instructions": user.instructions or "", "has_password": bool(user.password_hash)}
    if admin_view:
        out |= {"disabled": user.disabled, "created_at": _time(user.created_at),
                "usage": (usage or {}).get(user.id, {"conversations": 0, "messages": 0, "tokens": 0})}
    return out


def usage_by_user(s: DBSession) -> dict[int, dict]:
    """Per user: conversations, messages sent, and completion tokens of the answers they got (for the admin)."""
    out: dict[int, dict] = {}
    rows = s.execute(select(Conversation.user_id, func.count(func.distinct(Conversation.id)),
                            func.count(Message.id).filter(Message.role == "user"),
                            func.coalesce(func.sum(Message.tokens), 0))
                     .join(Message, Message.conversation_id == Conversation.id, isouter=True)
                     .group_by(Conversation.user_id))
    for user_id, conversations, messages, tokens in rows:
        out[user_id] = {"conversations": conversations, "messages": messages, "tokens": int(tokens)}
    return out


def set_instructions(s: DBSession, user: User, instructions: str) -> None:
    user.instructions = instructions.strip() or None
    s.flush()


# ---- settings


def get_setting(s: DBSession, key: str, default=None):
    row = s.get(Setting, key)
    return json.loads(row.value) if row else default


def set_setting(s: DBSession, key: str, value) -> None:
    row = s.get(Setting, key)
    if row is None:
        s.add(Setting(key=key, value=json.dumps(value)))
    else:
        row.value = json.dumps(value)
    s.flush()


def signup_open(s: DBSession) -> bool:
    return bool(get_setting(s, "signup_open", True))


def set_signup_open(s: DBSession, is_open: bool) -> None:
    set_setting(s, "signup_open", bool(is_open))


def secret_key(s: DBSession) -> str:
    """A random server secret kept in the database, so every worker process signs with the same one."""
    key = get_setting(s, "secret_key")
    if key is None:
        key = secrets.token_urlsafe(32)
        set_setting(s, "secret_key", key)
    return key


# ---- conversations


def create_conversation(s: DBSession, user_id: int, title: str | None = None) -> Conversation:
    now = utcnow()
    conv = Conversation(user_id=user_id, title=clean_title(title) or DEFAULT_TITLE, created_at=now, updated_at=now)
    s.add(conv)
    s.flush()
    return conv


def clean_title(title: str | None) -> str:
    return " ".join((title or "").split())[:TITLE_CHARS]


def title_from(text: str) -> str:
    """A chat's title from its first message, in the words (and so the language) the user wrote it in: the first
    line that says something, without markdown's leading marks, cut at a word when long."""
    line = next((ln for ln in text.splitlines() if ln.strip(" #>*-`")), "")
    title = clean_title(line.strip().lstrip("#>*- ").strip())
    if len(title) <= AUTO_TITLE_CHARS:
        return title
    cut = title[:AUTO_TITLE_CHARS]
    if " " in cut[AUTO_TITLE_CHARS // 2:]:  # text without spaces (Chinese, Japanese) is cut where it reaches the limit
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,.;:") + "…"


def _like(q: str) -> str:
    # The user's own % and _ are text to find, not wildcards.
    return "%" + re.sub(r"([\\%_])", r"\\\1", q) + "%"


def list_conversations(s: DBSession, user_id: int, q: str | None = None, limit: int | None = None
                       ) -> list[Conversation]:
    """The user's conversations, most recently active first; `q` finds text in titles or messages, any case."""
    stmt = select(Conversation).where(Conversation.user_id == user_id)
    if q and q.strip():
        pattern = _like(q.strip())
        in_messages = select(Message.id).where(Message.conversation_id == Conversation.id,
                                               Message.content.ilike(pattern, escape="\\"))
        stmt = stmt.where(or_(Conversation.title.ilike(pattern, escape="\\"), in_messages.exists()))
    stmt = stmt.order_by(Conversation.updated_at.desc(), Conversation.created_at.desc(), Conversation.id)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(s.scalars(stmt))


def get_conversation(s: DBSession, user_id: int, conversation_id: str) -> Conversation:
    # Ids are uuid4 hex; anything else (a NUL, a megabyte) is not looked up at all.
    valid = isinstance(conversation_id, str) and _CONVERSATION_ID.fullmatch(conversation_id)
    conv = s.get(Conversation, conversation_id) if valid else None
    if conv is None or conv.user_id != user_id:
        raise NotFound("no such conversation")
    return conv


def rename_conversation(s: DBSession, user_id: int, conversation_id: str, title: str) -> Conversation:
    conv = get_conversation(s, user_id, conversation_id)
    conv.title = clean_title(title) or DEFAULT_TITLE
    conv.updated_at = utcnow()
    s.flush()
    return conv


def delete_conversation(s: DBSession, user_id: int, conversation_id: str) -> None:
    conv = get_conversation(s, user_id, conversation_id)
    s.delete(conv)
    s.flush()


def conversation_dict(conv: Conversation, messages: list[Message] | None = None,
                      versions: dict[int, list[int]] | None = None) -> dict:
    out = {"id": conv.id, "title": conv.title, "created_at": _time(conv.created_at),
           "updated_at": _time(conv.updated_at)}
    if messages is not None:
        out["messages"] = [message_dict(m, (versions or {}).get(m.id)) for m in messages]
    return out


# ---- messages: a tree per conversation, one branch of it on show


def _all_messages(s: DBSession, conversation_id: str) -> list[Message]:
    return list(s.scalars(select(Message).where(Message.conversation_id == conversation_id)
                          .order_by(Message.position)))


def _branch(messages: list[Message], leaf_id: int | None) -> list[Message]:
    """The messages from the first to `leaf_id`, each the parent of the next."""
    by_id = {m.id: m for m in messages}
    out: list[Message] = []
    at = by_id.get(leaf_id)
    while at is not None:
        out.append(at)
        at = by_id.get(at.parent_id)
    return out[::-1]


def list_messages(s: DBSession, user_id: int, conversation_id: str) -> list[Message]:
    """The branch on show, first message first: the chat as the user sees it and as the model is to read it."""
    conv = get_conversation(s, user_id, conversation_id)
    return _branch(_all_messages(s, conv.id), conv.current_id)


def versions(s: DBSession, user_id: int, conversation_id: str) -> dict[int, list[int]]:
    """For each message on show, the ids of its versions (itself and the others with its parent), oldest first."""
    conv = get_conversation(s, user_id, conversation_id)
    messages = _all_messages(s, conv.id)
    siblings: dict[int | None, list[int]] = {}
    for m in messages:
        siblings.setdefault(m.parent_id, []).append(m.id)
    return {m.id: siblings[m.parent_id] for m in _branch(messages, conv.current_id)}


def add_message(s: DBSession, user_id: int, conversation_id: str, role: str, content: str, *,
                reasoning: str | None = None, reasoning_seconds: float | None = None,
                finished: bool = True, version_of: int | None = None) -> Message:
    """Append a message to the branch on show, or (version_of) add a new version of one of its messages, which
    then ends the branch on show; either way the conversation is marked as just active."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    conv = get_conversation(s, user_id, conversation_id)
    parent_id = conv.current_id
    if version_of is not None:
        other = get_message(s, user_id, version_of)
        if other.conversation_id != conv.id or other.role != role:
            raise NotFound("no such message in this conversation")
        parent_id = other.parent_id
    last = s.scalar(select(func.max(Message.position)).where(Message.conversation_id == conv.id))
    msg = Message(conversation_id=conv.id, position=(last or 0) + 1, role=role, content=content,
                  reasoning=reasoning, reasoning_seconds=reasoning_seconds, finished=finished, parent_id=parent_id)
    conv.updated_at = msg.created_at = utcnow()
    s.add(msg)
    s.flush()
    _show(s, conv, msg)
    return msg


def show_version(s: DBSession, user_id: int, conversation_id: str, message_id: int) -> Conversation:
    """Show the branch through this message: down from it, the version of each later turn shown there last (the
    latest one where none was chosen)."""
    conv = get_conversation(s, user_id, conversation_id)
    messages = _all_messages(s, conv.id)
    chosen = next((m for m in messages if m.id == message_id), None)
    if chosen is None:
        raise NotFound("no such message in this conversation")
    replies: dict[int | None, dict[int, Message]] = {}
    for m in messages:  # in position order, so a dict's last reply is the latest
        replies.setdefault(m.parent_id, {})[m.id] = m
    leaf = chosen
    while leaf.id in replies:
        below = replies[leaf.id]
        leaf = below.get(leaf.chosen_id) or list(below.values())[-1]
    _show(s, conv, chosen, leaf)
    return conv


def _show(s: DBSession, conv: Conversation, msg: Message, leaf: Message | None = None) -> None:
    """Put the branch through `msg`, down to `leaf` (default: msg itself), on show; msg's parent remembers it."""
    if msg.parent_id is not None:
        s.get(Message, msg.parent_id).chosen_id = msg.id
    conv.current_id = (leaf or msg).id
    s.flush()


def get_message(s: DBSession, user_id: int, message_id: int) -> Message:
    msg = s.get(Message, message_id) if isinstance(message_id, int) else None
    if msg is None or msg.conversation.user_id != user_id:
        raise NotFound("no such message")
    return msg


def update_message(s: DBSession, user_id: int, message_id: int, *, content: str | None = None,
                   reasoning: str | None = None, reasoning_seconds: float | None = None,
                   finished: bool | None = None, tokens: int | None = None,
                   finish_reason: str | None = None) -> Message:
    """Change the fields given (None leaves a field as it is): how a streaming answer is saved as it grows. An
    answer marked unfinished (written again, or continued) has no finish reason until one is given."""
    msg = get_message(s, user_id, message_id)
    if finished is False and finish_reason is None:
        msg.finish_reason = None
    for name, value in (("tokens", tokens), ("content", content), ("reasoning", reasoning),
                        ("reasoning_seconds", reasoning_seconds), ("finished", finished),
                        ("finish_reason", finish_reason)):
        if value is not None:
            setattr(msg, name, value)
    msg.conversation.updated_at = utcnow()
    s.flush()
    return msg


def last_assistant(s: DBSession, user_id: int, conversation_id: str) -> Message | None:
    """The last message on show if it is an answer, else None."""
    messages = list_messages(s, user_id, conversation_id)
    return messages[-1] if messages and messages[-1].role == "assistant" else None


def message_dict(msg: Message, versions: list[int] | None = None) -> dict:
    return {"id": msg.id, "role": msg.role, "content": msg.content, "reasoning": msg.reasoning,
            "reasoning_seconds": msg.reasoning_seconds, "finished": msg.finished,
            "finish_reason": msg.finish_reason, "parent_id": msg.parent_id, "versions": versions or [msg.id],
            "created_at": _time(msg.created_at)}


# ---- export


def export_json(s: DBSession, user_id: int, conversation_id: str) -> dict:
    """The conversation and the branch of it on show, each message with its versions' ids, as
    `GET /api/conversations/{id}` shows them."""
    conv = get_conversation(s, user_id, conversation_id)
    return conversation_dict(conv, list_messages(s, user_id, conversation_id),
                             versions(s, user_id, conversation_id))


def export_markdown(s: DBSession, user_id: int, conversation_id: str) -> str:
    """The title, then a **User** / **Assistant** section per message, the reasoning folded in <details>."""
    conv = get_conversation(s, user_id, conversation_id)
    parts = [f"# {conv.title or 'Untitled'}"]
    for msg in list_messages(s, user_id, conversation_id):
        parts.append(f"**{msg.role.capitalize()}**")
        if msg.reasoning:
            took = f" ({msg.reasoning_seconds:.1f} s)" if msg.reasoning_seconds is not None else ""
            reasoning = msg.reasoning.strip("\n")
            parts.append(f"<details>\n<summary>Reasoning{took}</summary>\n\n{reasoning}\n\n</details>")
        parts.append(msg.content.strip("\n") + ("" if msg.finished else "\n\n*(unfinished)*"))
    return "\n\n".join(parts) + "\n"


def _time(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
