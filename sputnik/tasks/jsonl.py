"""The user's own problems: a JSONL file of {"prompt", "answer", optional "verifier", "id", "split"} rows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from sputnik.r1 import graded_part
from sputnik.tasks.base import ANSWER_TAG_SUFFIX, Problem, extract_answer, short_hash
from sputnik.tasks.files import FileTask, TaskDataError, field_of
from sputnik.tasks.maths import math_equal

VERIFIERS = ("exact", "number", "math")
MAX_NUMBER_CHARS = 100
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def parse_number(text: str | None) -> Fraction | None:
    """The one number an answer states ("1,234.5", "-3", "1/2", "x = 0.25"), exactly; None if not exactly one."""
    if text is None or len(text) > MAX_NUMBER_CHARS:
        return None
    found = _NUMBER.findall(text.rsplit("=", 1)[-1].replace("$", ""))
    if len(found) != 1:
        return None
    try:
        return Fraction(found[0].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def exact_equal(gold: str, pred: str | None) -> float | None:
    """Equal after trimming and collapsing whitespace (case counts)."""
    gold = " ".join(gold.split())
    if not gold:
        return None
    return float(pred is not None and " ".join(pred.split()) == gold)


def number_equal(gold: str, pred: str | None) -> float | None:
    gold_value = parse_number(gold)
    if gold_value is None:
        return None
    return float(parse_number(pred) == gold_value)


SCORERS = {"exact": exact_equal, "number": number_equal, "math": math_equal}


@dataclass(repr=False)
class JsonlTask(FileTask):
    """Rows name their verifier ("exact", "number" or "math"); rows without one use the task's `verifier`."""

    verifier: str = "exact"
    test_frac: float | None = None  # the whole file by default; test_frac=0.2 holds out a hash-chosen fifth
    name = "jsonl"
    chat_suffix = ANSWER_TAG_SUFFIX

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.verifier not in VERIFIERS:
            raise ValueError(f"jsonl: verifier must be one of {VERIFIERS}, got {self.verifier!r}")

    def make_problem(self, row: dict[str, Any], where: str) -> Problem:
        prompt = field_of(row, ("prompt",), where)
        answer = field_of(row, ("answer",), where)
        verifier = row.get("verifier", self.verifier)
        if verifier not in VERIFIERS:
            raise TaskDataError(f"{where}: verifier must be one of {VERIFIERS}, got {verifier!r}")
        return Problem(id=str(row.get("id") or f"jsonl/{short_hash(prompt)}"), prompt=prompt, answer=answer,
                       meta={"verifier": verifier})

    def _order(self, problem: Problem) -> tuple[str, ...]:
        # Falling back to the last number only makes sense when a number is what we expect.
        return ("answer", "boxed") if problem.meta["verifier"] == "exact" else ("answer", "boxed", "number")

    def extract(self, completion: str, think_opened: bool = False, grading: str = "strict",
                problem: Problem | None = None) -> str | None:
        part = graded_part(completion, think_opened, grading)
        order = self.extract_order if problem is None else self._order(problem)
        return None if part is None else extract_answer(part, order, after_think=False)

    def verify(self, problem: Problem, completion: str, think_opened: bool = False,
               grading: str = "strict") -> float | None:
        return self.score(problem, self.extract(completion, think_opened, grading, problem))

    def score(self, problem: Problem, answer: str | None) -> float | None:
        return SCORERS[problem.meta["verifier"]](problem.answer, answer)
