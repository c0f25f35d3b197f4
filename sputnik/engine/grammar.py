"""Grammar-constrained decoding: a row's next token is masked to what its grammar still allows.

The grammar engine is llguidance (the one llama.cpp and vLLM use): Earley parsing over a lazily built lexer, so a
JSON schema compiles in about a millisecond and a mask costs ~0.1 ms, without a vocabulary-wide index built up front
(outlines-core's ~100 ms per schema on SmolLM2's vocabulary), and with no dependency (xgrammar needs triton and
transformers). Masks are computed by llguidance's thread pool, which drops the GIL, while the model runs.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from sputnik.r1 import THINK_CLOSE, THINK_OPEN

if TYPE_CHECKING:
    from sputnik.tokenizer import Tokenizer

# JSON as json.dumps writes it (", " and ": ", no other whitespace): the spacing chat templates' tojson gives tool
# calls, and no way for a weak model to pad an object with whitespace until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """What a sample's output must match: a JSON schema, or an llguidance Lark grammar (which may inline
    schemas with `%json {…}`, see `json_rule`)."""

    kind: Literal["json_schema", "lark"]
    source: str  # the schema as JSON text, or the Lark grammar

    @classmethod
    def json_schema(cls, schema: dict) -> Constraint:
        return cls("json_schema", json.dumps(with_options(schema), sort_keys=False))

    @classmethod
    def lark(cls, text: str) -> Constraint:
        return cls("lark", text)


def with_options(schema: dict) -> dict:
    """The schema with sputnik's JSON spacing as llguidance's per-schema options (`x-guidance`)."""
    return {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}


def json_rule(schema: dict) -> str:
    """A Lark rule body matching JSON valid under `schema`."""
    return "%json " + json.dumps(with_options(schema))


def literal(tokenizer: Tokenizer, text: str) -> str:
    """Lark for exactly `text`: a special token by id (llguidance matches those as tokens, never as bytes), else a
    string literal."""
    token_id = tokenizer.token_to_id(text)
    if token_id is not None and token_id in tokenizer.special_ids:
        return f"<[{token_id}]>"
    return json.dumps(text)


def after_thought(body: str, tokenizer: Tokenizer, in_reasoning: bool) -> str:
    """A Lark start rule: the body after a free thought, which the prompt opened (in_reasoning) or a thinking model
    (one whose vocabulary has a `<think>` token: Qwen3, the R1 distills) may open itself. Other models get no such
    door: a weak one would wander through it and never answer."""
    close = literal(tokenizer, THINK_CLOSE)
    if close.startswith("<["):  # a special token: the free text before it cannot swallow it
        thought = f"thought: THOUGHT {close}\nTHOUGHT: /(.|\\n)*/\n"
    else:  # lazy: the thought ends at the first `</think>`
        thought = "thought[lazy]: /(.|\\n)*<\\/think>/\n"
    if in_reasoning:
        head = "thought SPACE?"
    elif tokenizer.token_to_id(THINK_OPEN) is not None:
        head = f"({literal(tokenizer, THINK_OPEN)} thought SPACE?)?"
    else:
        return f"start: {body}\n"
    # At most two newlines after the thought, as R1 writes them: a free run of whitespace lets a model pad forever.
    return f"start: {head} {body}\n{thought}SPACE: /[ \\n]{{1,2}}/\n"


def json_answer(schema: dict, tokenizer: Tokenizer, think_opened: bool) -> Constraint:
    """JSON valid under `schema`, after the free thought of a thinking model (see after_thought)."""
    return Constraint.lark(after_thought("body", tokenizer, think_opened) + f"body: {json_rule(schema)}\n")


class Grammars:
    """Compiles constraints for one tokenizer, caches them by constraint, and gives each row its own matcher."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: set[int], cache_size: int = 256):
        import llguidance

        self._llg = llguidance
        # The EOS tokens the grammar allows once it is complete: the tokens that end generation.
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=sorted(stop_ids))
        self.vocab_size = self.tokenizer.vocab_size
        self._cache: OrderedDict[Constraint, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # servers check constraints on their event loop while the engine steps
        self._executor = llguidance.LLExecutor()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sputnik-grammar")

    def _grammar(self, c: Constraint) -> str:
        if c.kind == "json_schema":
            return self._llg.LLMatcher.grammar_from_json_schema(c.source)
        return self._llg.LLMatcher.grammar_from_lark(c.source)

    def error(self, c: Constraint) -> str | None:
        """Why the constraint does not compile (a message for the client), or None when it does."""
        try:
            matcher = self._compiled(c)
        except Exception as e:  # noqa: BLE001 — whatever the library refuses is the request's problem
            return str(e)
        return matcher.get_error() or None if matcher.is_error() else None

    def _compiled(self, c: Constraint) -> Any:
        with self._lock:
            if c in self._cache:
                self._cache.move_to_end(c)
                return self._cache[c]
        matcher = self._llg.LLMatcher(self.tokenizer, self._grammar(c), log_level=0)
        with self._lock:
            self._cache[c] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, c: Constraint) -> Any:
        """A fresh matcher at the grammar's start; ValueError when the constraint does not compile."""
        base = self._compiled(c)
        if base.is_error():
            raise ValueError(f"the output constraint does not compile: {base.get_error()}")
        return base.deep_copy()

    def masks(self, matchers: list[Any]) -> Future | None:
        """Start computing the next-token masks of the constrained rows (matchers[r] None: a free row) off this
        thread, None when every row is free; the future's result goes to `apply_masks`."""
        if all(m is None for m in matchers):
            return None
        return self._pool.submit(self._masks, matchers)

    def _masks(self, matchers: list[Any]) -> tuple[Tensor, Tensor]:
        rows = [r for r, m in enumerate(matchers) if m is not None]
        words = (self.vocab_size + 31) // 32
        bits = torch.zeros((len(rows), words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(matchers[r], i) for i, r in enumerate(rows)], bits.data_ptr(),
                                               words * 4, len(rows))
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, : self.vocab_size]
        return torch.tensor(rows, dtype=torch.long), allowed


def apply_masks(logits: Tensor, masks: tuple[Tensor, Tensor]) -> Tensor:
    """logits [B, V] with the tokens a constrained row's grammar disallows at -inf (ids past the tokenizer's
    vocabulary, in a padded head, too); free rows untouched."""
    rows, allowed = masks
    V = logits.shape[-1]
    if allowed.shape[-1] < V:
        allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], V - allowed.shape[-1])], -1)
    rows = rows.to(logits.device)
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~allowed[:, :V].to(logits.device), float("-inf"))
    return logits


def schema_error(schema: dict) -> str | None:
    """Why a JSON Schema cannot constrain output (unknown keywords, bad types …), or None when it can; no
    tokenizer needed, so a server checks a request before it queues."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(with_options(schema))
    except Exception as e:  # noqa: BLE001 — whatever the library refuses is the request's problem
        return str(e)
    return llguidance.LLMatcher.validate_grammar(grammar) or None
