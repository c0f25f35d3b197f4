"""Streaming detokenization: generated ids to text one token at a time, never half a character."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sputnik.tokenizer.tokenizer import Tokenizer


class StreamDecoder:
    """Turns ids into text one token at a time; the pieces joined equal `tokenizer.decode(all_ids)`.

    Each push decodes only a short window: the tokens last emitted (as context, because decoders such as
    SentencePiece's strip a leading space from the first token they see) plus the pending ones. Text is
    held back while it ends in U+FFFD, i.e. while a multi-byte character is still incomplete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0  # ids[:_read] are emitted; ids[0:_read] is also the context window

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while a character is still incomplete)."""
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""  # decode(skip_special_tokens=True) drops these before decoding, so they affect nothing
        self._ids.append(int(token_id))
        if token_id in self.tokenizer.byte_fallback_ids:
            # A run of <0xXX> tokens decodes as one unit (one U+FFFD per byte if the run is invalid), so a
            # run is never cut: wait for the token after it.
            return ""
        context = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""
        # Keep what was just emitted as the next window's context and forget everything before it.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(context):]

    def flush(self) -> str:
        """Return whatever is still held back (incomplete bytes come out as U+FFFD, as decode() does)."""
        context = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(context):]

    def reset(self) -> None:
        self._ids.clear()
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=False) if ids else ""
