"""Splitting an R1-style output, `<think>reasoning</think>answer`, into reasoning and content, streamed or whole."""

from __future__ import annotations

# Where the splitter is in the output.
_START = "start"  # nothing but whitespace yet: a start tag may still open reasoning
_REASONING = "reasoning"
_CONTENT = "content"


def _tag_prefix_at_end(text: str, tag: str) -> int:
    """Length of the longest tail of text that could still grow into tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Splits streamed model output into reasoning and content deltas, holding back text only while it could still
    turn out to be a tag, so no piece of a tag ever reaches either stream."""

    def __init__(self, in_reasoning: bool = False, start: str = "<think>", end: str = "</think>"):
        self.start, self.end = start, end
        self._state = _REASONING if in_reasoning else _START
        self._opened = in_reasoning
        # R1 writes "<think>\n...\n</think>\n\n": the whitespace right after either tag is layout, not text.
        self._strip = in_reasoning
        self._held = ""

    @property
    def had_reasoning(self) -> bool:
        """Whether the output had a reasoning section (possibly empty)."""
        return self._opened

    @property
    def in_reasoning(self) -> bool:
        """Whether the output is inside its reasoning section now."""
        return self._state == _REASONING

    def push(self, text: str) -> tuple[str, str]:
        """Take the next piece of output; give back (reasoning delta, content delta)."""
        self._held += text
        reasoning, content = "", ""
        while self._held:
            if self._state == _START:
                stripped = self._held.lstrip()
                if stripped.startswith(self.start):
                    self._held = stripped[len(self.start):]
                    self._state, self._opened, self._strip = _REASONING, True, True
                elif not stripped or self.start.startswith(stripped):
                    break  # still undecided
                else:
                    self._state = _CONTENT  # the whitespace read so far is content, kept as written
                continue
            if self._strip:
                self._held = self._held.lstrip()
                if not self._held:
                    break
                self._strip = False
            if self._state == _CONTENT:
                # Once reasoning is over (or never began), tags are plain text.
                content += self._held
                self._held = ""
                break
            at = self._held.find(self.end)
            if at >= 0:
                reasoning += self._held[:at]
                self._held = self._held[at + len(self.end):]
                self._state, self._strip = _CONTENT, True
                continue
            keep = _tag_prefix_at_end(self._held, self.end)
            reasoning += self._held[:len(self._held) - keep]
            self._held = self._held[len(self._held) - keep:]
            break
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The output has ended: give back what was held as (reasoning, content)."""
        held, self._held = self._held, ""
        if self._state == _REASONING:
            return held, ""
        if self._state == _START:
            return "", held
        return "", ""  # only whitespace after the end tag is ever held here, and that is stripped


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """Split a whole output into (reasoning, content); reasoning is None when the output had no reasoning section."""
    splitter = ReasoningSplitter(in_reasoning=in_reasoning)
    reasoning, content = splitter.push(text)
    tail_reasoning, tail_content = splitter.finish()
    if not splitter.had_reasoning:
        return None, content + tail_content
    return reasoning + tail_reasoning, content + tail_content
