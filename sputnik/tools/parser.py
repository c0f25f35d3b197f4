"""Tool calls out of streamed model text, per model family, as OpenAI's `delta.tool_calls`.

Each parser takes the content (reasoning already split off) a piece at a time and gives back the text that is plain
content and the tool-call deltas: a call's `id`, `type` and `function.name` once, in its first delta, then
`function.arguments` in pieces, which the openai client concatenates. Text is held back only while it could still
become a marker, so no piece of a marker ever reaches the content.

Formats (REFERENCES.md §7): Hermes / Qwen2.5 / Qwen3 `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`;
Llama 3.x JSON `{"name": …, "parameters": {…}}` (after `<|python_tag|>` or bare, `;` between calls); DeepSeek-V3/R1
`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{…}\\n```<｜tool▁call▁end｜>…` and V3.1's
`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{…}<｜tool▁call▁end｜>`.
"""

from __future__ import annotations

import json
import uuid

from sputnik.r1 import held_back

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DS_FENCE_OPEN, DS_FENCE_CLOSE = "```json\n", "\n```"

FAMILIES = ("hermes", "llama3", "deepseek")


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallObject:
    """One JSON object `{"name": …, "arguments": …}` read a character at a time: the name once its string closes,
    the arguments' text as it arrives (an object or array streams as written; a string or other value when it
    ends, a string's contents being the arguments' JSON text)."""

    def __init__(self, arg_keys: tuple[str, ...] = ("arguments", "parameters")):
        self.arg_keys = arg_keys
        self.depth = 0
        self.in_string = self.escape = False
        self.raw = ""  # the top-level string or primitive being read
        self.key: str | None = None
        self.after_colon = False
        self.name: str | None = None
        self.args = ""  # the arguments' text so far
        self.streaming = False  # an object/array argument being read
        self.closed = self.broken = False

    def feed(self, text: str) -> None:
        for ch in text:
            if self.closed or self.broken:
                return
            self._char(ch)

    def _char(self, ch: str) -> None:
        if self.depth >= 2 or self.in_string:
            self._nested(ch)
        elif self.depth == 0:
            if ch == "{":
                self.depth = 1
            elif not ch.isspace():
                self.broken = True
        elif self.raw:  # a primitive value at the top level
            if ch in ",}" or ch.isspace():
                self._value(self.raw)
                self.raw = ""
                self._char(ch)
            else:
                self.raw += ch
        elif ch == '"':
            self.in_string = True
        elif ch == ":":
            self.after_colon = True
        elif ch == ",":
            self.after_colon, self.key = False, None
        elif ch == "}":
            self.depth, self.closed = 0, True
        elif ch in "{[" and self.after_colon:
            self.depth = 2
            self.streaming = self.key in self.arg_keys
            if self.streaming:
                self.args += ch
        elif self.after_colon and not ch.isspace():
            self.raw = ch
        elif not ch.isspace():
            self.broken = True

    def _nested(self, ch: str) -> None:
        top_string = self.depth == 1
        if self.streaming:
            self.args += ch
        elif top_string:
            self.raw += ch
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if top_string:
                    self._string(self.raw[:-1])
                    self.raw = ""
            return
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 1:
                self.streaming = False

    def _string(self, raw: str) -> None:
        try:
            value = json.loads(f'"{raw}"')
        except ValueError:
            self.broken = True
            return
        if not self.after_colon:
            self.key = value
        else:
            self._value(value, is_string=True)

    def _value(self, value: str, is_string: bool = False) -> None:
        if self.key == "name" and is_string:
            self.name = value
        elif self.key in self.arg_keys:
            self.args = value  # a string holds the JSON text; a primitive is its own text


class ToolParser:
    """The base of the per-family parsers: call bookkeeping, and the deltas as the OpenAI client assembles them.
    `parallel=False` keeps only the first call."""

    def __init__(self, parallel: bool = True):
        self.parallel = parallel
        self.calls: list[dict] = []  # finished and open calls, as message.tool_calls entries
        self._sent_name: list[bool] = []
        self._sent_args: list[int] = []
        self._held = ""

    def push(self, text: str) -> tuple[str, list[dict]]:
        """The next piece of content; gives back (plain content, tool-call deltas)."""
        self._held += text
        content, deltas = self._scan(final=False)
        return content, deltas

    def finish(self) -> tuple[str, list[dict]]:
        """The output has ended: what was held back, as (content, deltas)."""
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, list[dict]]:
        raise NotImplementedError

    # ---- calls
    def _open(self) -> None:
        self.calls.append({"id": call_id(), "type": "function", "function": {"name": "", "arguments": ""}})
        self._sent_name.append(False)
        self._sent_args.append(0)

    def _update(self, name: str | None, args: str, deltas: list[dict]) -> None:
        """The open call now has this name (None: not yet known) and these arguments so far."""
        i = len(self.calls) - 1
        if i >= 1 and not self.parallel:
            return
        fn = self.calls[i]["function"]
        if name is not None:
            fn["name"] = name
        fn["arguments"] = args
        if not self._sent_name[i]:
            if name is None:
                return  # a call is announced once its name is known
            self._sent_name[i] = True
            deltas.append({"index": i, "id": self.calls[i]["id"], "type": "function",
                           "function": {"name": name, "arguments": ""}})
        if len(args) > self._sent_args[i]:
            deltas.append({"index": i, "function": {"arguments": args[self._sent_args[i]:]}})
            self._sent_args[i] = len(args)

    def tool_calls(self) -> list[dict]:
        """The calls made, for a whole (non-streamed) message: only those with a name."""
        kept = [c for c, sent in zip(self.calls, self._sent_name) if sent]
        return kept if self.parallel else kept[:1]

    def _until(self, marker: str, final: bool) -> tuple[str, bool]:
        """Take held text up to the marker (True: found and dropped) or as much as cannot start it."""
        at = self._held.find(marker)
        if at >= 0:
            out, self._held = self._held[:at], self._held[at + len(marker):]
            return out, True
        keep = 0 if final else held_back(self._held, (marker,))
        out, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        return out, False


class HermesParser(ToolParser):
    """`<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`, any number, text between them kept."""

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self._obj: CallObject | None = None

    def _scan(self, final: bool) -> tuple[str, list[dict]]:
        content, deltas = "", []
        while self._held:
            if self._obj is None:
                text, found = self._until(HERMES_OPEN, final)
                content += text
                if not found:
                    break
                self._obj = CallObject()
                self._open()
            elif not self._body(final, deltas):
                break
        return content, deltas

    def _body(self, final: bool, deltas: list[dict]) -> bool:
        """Feed the open call's JSON up to its closing marker, which can only start outside a JSON string (one
        inside the arguments is text); True when the call ended."""
        obj, held = self._obj, self._held
        for i, ch in enumerate(held):
            if ch == "<" and not obj.in_string:
                rest = held[i:]
                if rest.startswith(HERMES_CLOSE):
                    self._held, self._obj = rest[len(HERMES_CLOSE):], None
                    self._update(obj.name, obj.args, deltas)
                    return True
                if HERMES_CLOSE.startswith(rest) and not final:
                    self._held = rest
                    self._update(obj.name, obj.args, deltas)
                    return False
            obj.feed(ch)  # after the object closes, what is left before the marker is ignored
        self._held = ""
        self._update(obj.name, obj.args, deltas)
        return False


class Llama3Parser(ToolParser):
    """Llama 3.x JSON calls: the output opens with `<|python_tag|>` or `{`, then `{"name", "parameters"}` objects
    separated by `;`. An output that opens otherwise is plain content."""

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self._mode = "start"  # start | calls | content
        self._obj: CallObject | None = None

    def _scan(self, final: bool) -> tuple[str, list[dict]]:
        content, deltas = "", []
        while self._held:
            if self._mode == "start":
                head = self._held.lstrip()
                if head.startswith(PYTHON_TAG):
                    self._held, self._mode = head[len(PYTHON_TAG):], "calls"
                elif head.startswith("{"):
                    self._held, self._mode = head, "calls"
                elif not final and (not head or PYTHON_TAG.startswith(head)):
                    break
                else:
                    self._mode = "content"
            elif self._mode == "content":
                content, self._held = content + self._held, ""
            elif self._obj is None:
                head = self._held.lstrip().lstrip(";").lstrip()
                if not head:
                    self._held = ""
                    break
                if not head.startswith("{"):
                    self._held, self._mode = head, "content"
                    continue
                self._held, self._obj = head, CallObject()
                self._open()
            else:
                obj = self._obj
                for n, ch in enumerate(self._held):
                    obj.feed(ch)
                    if obj.closed or obj.broken:
                        self._held = self._held[n + 1:]
                        break
                else:
                    self._held = ""
                self._update(obj.name, obj.args, deltas)
                if obj.closed or obj.broken:
                    self._obj = None
        return content, deltas


class DeepSeekParser(ToolParser):
    """DeepSeek-V3/R1 tool-call tokens (and V3.1's shorter form without `function` and the json fence)."""

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self._mode = "text"  # text | calls | header | fence | args | tail
        self._name: str | None = None
        self._args = ""
        self._end = DS_CALL_END

    def _scan(self, final: bool) -> tuple[str, list[dict]]:
        content, deltas = "", []
        while self._held:
            mode = self._mode
            if mode == "text":
                text, found = self._until(DS_CALLS_BEGIN, final)
                content += text
                if not found:
                    break
                self._mode = "calls"
            elif mode == "calls":
                head = self._held.lstrip()
                if head.startswith(DS_CALL_BEGIN):
                    self._held, self._mode = head[len(DS_CALL_BEGIN):], "header"
                    self._open()
                elif head.startswith(DS_CALLS_END):
                    self._held, self._mode = head[len(DS_CALLS_END):], "text"
                elif final or not (DS_CALL_BEGIN.startswith(head) or DS_CALLS_END.startswith(head)):
                    self._mode = "text"
                else:
                    break
            elif mode == "header":
                if not self._header(final):
                    break
            elif mode == "fence":
                if self._held.startswith(DS_FENCE_OPEN) or not DS_FENCE_OPEN.startswith(self._held) or final:
                    self._held = self._held.removeprefix(DS_FENCE_OPEN)
                    self._mode = "args"
                else:
                    break
            elif mode == "args":
                text, found = self._until(self._end, final)
                self._args += text
                self._update(self._name, self._args, deltas)
                if not found:
                    break
                self._mode = "tail" if self._end != DS_CALL_END else "calls"
            else:  # after V3's closing fence, up to the call's end token
                _, found = self._until(DS_CALL_END, final)
                if not found:
                    break
                self._mode = "calls"
        return content, deltas

    def _header(self, final: bool) -> bool:
        """Read `function<｜tool▁sep｜>NAME\\n` (V3) or `NAME<｜tool▁sep｜>` (V3.1); False while incomplete."""
        at = self._held.find(DS_SEP)
        if at < 0:
            return False if not final else self._give_up()
        kind, rest = self._held[:at].strip(), self._held[at + len(DS_SEP):]
        if kind != "function":  # V3.1: the name comes first and the arguments follow the separator
            self._name, self._args, self._end, self._held, self._mode = kind, "", DS_CALL_END, rest, "args"
            return True
        line = rest.find("\n")
        if line < 0:
            return False if not final else self._give_up()
        self._name, self._args, self._end = rest[:line].strip(), "", DS_FENCE_CLOSE
        self._held, self._mode = rest[line + 1:], "fence"
        return True

    def _give_up(self) -> bool:
        self._held = ""
        return False


PARSERS = {"hermes": HermesParser, "llama3": Llama3Parser, "deepseek": DeepSeekParser}


def make_parser(family: str, parallel: bool = True) -> ToolParser:
    return PARSERS[family](parallel)


class HermesWriter:
    """An upstream's `delta.tool_calls` written back as Hermes text, so the one parser in front reads every
    backend's calls (as join_deltas does for reasoning)."""

    def __init__(self) -> None:
        self.open: int | None = None

    def push(self, deltas: list[dict]) -> str:
        out = ""
        for d in deltas:
            fn = d.get("function") or {}
            if d.get("index", 0) != self.open:
                out += self.close()
                self.open = d.get("index", 0)
                out += f'{HERMES_OPEN}\n{{"name": {json.dumps(fn.get("name") or "")}, "arguments": '
            out += fn.get("arguments") or ""
        return out

    def close(self) -> str:
        if self.open is None:
            return ""
        self.open = None
        return f"}}\n{HERMES_CLOSE}"
