"""DeepSeek-R1's text format, in one place: the special tokens and think tags, the chat template, what a prompt and
an output look like around `<think>…</think>`, and R1's sampling settings.

Every layer reads the format from here (tokenizer, tasks, rewards, engine, eval, train, serve, web, cli), so this
module depends on nothing but the standard library.
"""

from __future__ import annotations

# The bars are FULLWIDTH VERTICAL LINE (U+FF5C) and the spaces are U+2581, exactly as in DeepSeek's vocab.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE]

# The sampling settings DeepSeek recommends for R1 and its distilled models.
TEMPERATURE = 0.6
TOP_P = 0.95

# How a reasoning field is folded into an assistant turn, as R1 writes it.
THINK_TEMPLATE = THINK_OPEN + "\n{reasoning}\n" + THINK_CLOSE + "\n\n{answer}"


# ---------------------------------------------------------------------------------------------------- chat template


def chat_template(bos: str = BOS, eos: str = EOS, user: str = USER, assistant: str = ASSISTANT,
                  think_open: str = THINK_OPEN, think_close: str = THINK_CLOSE, system: str | None = None,
                  name: str = "R1 chat template") -> str:
    """The R1 chat format as a jinja template, with these tokens (sputnik's own tokenizers use their own).

    System messages go right after BOS (after the `system` token when there is one). Earlier assistant turns keep
    only their answer (the text after the last `</think>`, leading whitespace dropped): the model never sees its old
    reasoning, as in DeepSeek-R1. The final message is rendered whole, so a finished conversation renders with its
    reasoning, for training. The generation prompt opens `<think>`. `name` is what an unsupported role's error says.
    """
    head = ("{{- '" + bos + "' + ns.system -}}" if system is None else
            "{{- '" + bos + "' -}}{%- if ns.system -%}{{- '" + system + "' + ns.system -}}{%- endif -%}")
    return (
        "{%- set ns = namespace(system='') -%}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + (message['content'] or '') -%}"
        "{%- endfor -%}"
        + head +
        "{%- for message in messages -%}"
        "{%- set content = message['content'] or '' -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- '" + user + "' + content -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- if not loop.last and '" + think_close + "' in content -%}"
        "{%- set content = content.split('" + think_close + "')[-1].lstrip() -%}"
        "{%- endif -%}"
        "{{- '" + assistant + "' + content + '" + eos + "' -}}"
        "{%- elif message['role'] != 'system' -%}"
        "{{- raise_exception('" + name + ": unsupported role ' + message['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '" + assistant + think_open + "\\n' -}}"
        "{%- endif -%}"
    )


CHAT_TEMPLATE = chat_template()


# ---------------------------------------------------------------------------------------------------- whole texts


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open `<think>` (R1's generation prompt does): the output then starts
    in the reasoning, without the tag."""
    return prompt.rstrip().endswith(THINK_OPEN)


def close_thinking(prompt: str) -> str:
    """A prompt that opened `<think>` with the thought closed at once, so the model answers directly."""
    return prompt + "\n" + THINK_CLOSE + "\n\n"


def direct_reply(answer: str) -> str:
    """An answer after an empty thought, as a thinking-closed prompt lays it out (the direct-answer arms' SFT rows)."""
    return close_thinking(open_thinking("")) + answer


def open_thinking(prompt: str) -> str:
    """A prompt that ends inside an open `<think>`, as R1's generation prompt does: unchanged when it already does;
    otherwise the tag is put after the template's own generation prompt (instruct models), or after R1-Zero's
    "Assistant:" (base models), so any model starts its output in the reasoning."""
    if opens_thinking(prompt):
        return prompt
    return prompt + (" " if prompt.endswith(":") else "") + THINK_OPEN + "\n"


# How a prompt treats the reasoning: as its template renders it; opened (the output starts inside <think>);
# closed (an empty thought, so the model answers directly: R1's "thinking disabled" and the direct-answer control).
THINK_MODES = ("auto", "open", "closed")


def think_prompt(prompt: str, think: str = "auto") -> str:
    """The prompt with its reasoning opened or closed as `think` asks (THINK_MODES)."""
    if think not in THINK_MODES:
        raise ValueError(f"think must be one of {THINK_MODES}, got {think!r}")
    if think == "auto":
        return prompt
    opened = open_thinking(prompt)
    return opened if think == "open" else close_thinking(opened)


def answer_part(text: str) -> str | None:
    """What follows the last `</think>`, as written; None when the thought never closed (or never began)."""
    at = text.rfind(THINK_CLOSE)
    return None if at < 0 else text[at + len(THINK_CLOSE):]


GRADINGS = ("strict", "lenient")


def graded_part(completion: str, think_opened: bool = False, grading: str = "strict") -> str | None:
    """The part of a completion that R1 grades: the answer, never the thinking.

    strict (R1's rule): a completion that thinks (its prompt opened `<think>`, or it opens one itself) is graded on
    what follows its `</think>`, and has no answer (None) while the thought never closed; one that does not think is
    its own answer. lenient (for models that don't follow the format): the text after `</think>` when there is
    one, else the whole completion, numbers inside an unclosed thought included."""
    if grading not in GRADINGS:
        raise ValueError(f"grading must be one of {GRADINGS}, got {grading!r}")
    answer = answer_part(completion)
    if answer is not None or grading == "lenient":
        return completion if answer is None else answer
    thinks = think_opened or completion.lstrip().startswith(THINK_OPEN)
    return None if thinks else completion


def strip_reasoning(content: str) -> str:
    """An earlier assistant turn as the next prompt shows it, as R1's own chat template does: what follows the last
    `</think>`, leading whitespace dropped. The opening tag may be missing (R1's template puts it into the prompt),
    so the tail after the closing tag is what counts; a turn without one is kept whole."""
    answer = answer_part(content)
    return content if answer is None else answer.lstrip()


# ---------------------------------------------------------------------------------------------------- streaming


def held_back(text: str, markers: list[str] | tuple[str, ...]) -> int:
    """Length of the longest tail of text that could still grow into one of the markers (a stop string, a tag):
    a streamer holds that much back until the next piece decides it."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


# Where the splitter is in the output.
_START = "start"  # nothing but whitespace yet: a start tag may still open reasoning
_REASONING = "reasoning"
_CONTENT = "content"


class ReasoningSplitter:
    """Splits streamed model output, `<think>reasoning</think>content`, into reasoning and content deltas, holding
    back text only while it could still turn out to be a tag, so no piece of a tag ever reaches either stream."""

    def __init__(self, in_reasoning: bool = False, start: str = THINK_OPEN, end: str = THINK_CLOSE,
                 continued: bool = False):
        self.start, self.end = start, end
        self._state = _REASONING if in_reasoning else _START
        self._opened = in_reasoning
        # R1 writes "<think>\n...\n</think>\n\n": the whitespace right after either tag is layout, not text. An
        # output that continues a thought already begun (a prefix) has no tag before it: its whitespace is text.
        self._strip = in_reasoning and not continued
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
            keep = held_back(self._held, (self.end,))
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


def join_deltas(reasoning: str, content: str, in_reasoning: bool) -> tuple[str, bool]:
    """The inverse of a splitter's push, for a server that already split its output: (the raw text with the tags put
    back, whether the output is now inside its reasoning). Every backend then goes through one splitter."""
    out = ""
    if reasoning and not in_reasoning:
        out, in_reasoning = THINK_OPEN, True
    out += reasoning
    if content and in_reasoning:
        out, in_reasoning = out + THINK_CLOSE, False
    return out + content, in_reasoning
