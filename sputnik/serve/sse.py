"""Server-sent events as OpenAI's streaming API frames them: one `data: {json}` event per chunk, `[DONE]` last."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
# A comment line: clients ignore it, and it keeps proxies from closing a stream that is quiet while the model thinks.
KEEP_ALIVE = b": keep-alive\n\n"


def event(obj: Any) -> bytes:
    """One event carrying obj as JSON (non-ASCII text written as is)."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def named_event(name: str, obj: Any) -> bytes:
    """An event with a type line, as Anthropic's streaming API frames them: `event: NAME` then `data: {json}`."""
    return f"event: {name}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def event_data(line: str) -> str | None:
    """The payload of a `data:` line of a stream read back (None for comments and other fields)."""
    return line[5:].strip() if line.startswith("data:") else None
