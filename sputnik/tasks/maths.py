"""Math word problems with free-form answers, checked for equivalence by math-verify (0.5 = 1/2 = \\frac{1}{2}).

Reads GSM8K-style rows ({"question", "answer": "... #### 42"}), MATH-style rows ({"problem", "solution" with a
\\boxed{} answer, optional "answer"}) and plain {"prompt", "answer"} rows.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sputnik.tasks.base import BOXED_SUFFIX, Problem, last_boxed, short_hash
from sputnik.tasks.files import FileTask, TaskDataError, field_of

SAMPLE = Path(__file__).parent / "data" / "math_sample.jsonl"
MAX_PRED_CHARS = 1000  # math-verify has no timeout off the main thread; keep what it parses short
TIMEOUT_S = 5


def _timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works on the main thread; elsewhere (eval thread pools,
    # reward workers) it must be switched off or every call raises.
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _as_latex(text: str) -> str:
    """Wrap bare answers in $…$: math-verify reads "\\sqrt{2}/2" or "2\\pi" right only inside math mode."""
    text = text.strip()
    return text if "$" in text or "\\boxed" in text else f"${text}$"


@functools.lru_cache(maxsize=8192)
def _parse_gold(gold: str) -> tuple:
    from math_verify import parse

    return tuple(parse(_as_latex(gold), parsing_timeout=_timeout()))


def math_equal(gold: str, pred: str | None) -> float | None:
    """1.0 when `pred` equals `gold` mathematically, 0.0 when not; None when the gold does not parse.

    Gold first: math-verify's verify(gold, pred) is asymmetric.
    """
    from math_verify import parse, verify

    try:
        gold_parsed = list(_parse_gold(gold))
    except Exception:
        return None
    # parse() falls back to the raw string when it finds no expression; a gold that is only that is unusable.
    if not any(not isinstance(x, str) for x in gold_parsed):
        return None
    if pred is None or not pred.strip() or len(pred) > MAX_PRED_CHARS:
        return 0.0
    try:
        pred_parsed = parse(_as_latex(pred), parsing_timeout=_timeout())
        return float(bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))
    except Exception:
        return 0.0


def gold_answer(row: dict[str, Any], where: str) -> str:
    """The gold answer of a GSM8K, MATH or plain row."""
    answer = row.get("answer")
    if answer is not None and str(answer).strip():
        answer = str(answer)
        # GSM8K: the worked solution, then "#### 42".
        return answer.rsplit("####", 1)[1].strip().replace(",", "") if "####" in answer else answer.strip()
    solution = row.get("solution")
    if solution is not None:
        boxed = last_boxed(str(solution))
        if boxed:
            return boxed
        raise TaskDataError(f"{where}: 'solution' has no \\boxed{{}} answer and there is no 'answer' field")
    raise TaskDataError(f"{where}: missing field 'answer' (or a 'solution' with \\boxed{{}})")


@dataclass(repr=False)
class MathTask(FileTask):
    """Math problems from a JSONL file (default: our small sample), verified with math-verify."""

    name = "math"
    chat_suffix = BOXED_SUFFIX

    def __post_init__(self) -> None:
        if self.path is None and self.train is None and self.test is None:
            self.path = str(SAMPLE)
        super().__post_init__()

    def make_problem(self, row: dict[str, Any], where: str) -> Problem:
        prompt = field_of(row, ("prompt", "problem", "question"), where)
        meta = {k: row[k] for k in ("level", "type", "subject", "source") if k in row}
        return Problem(id=str(row.get("id") or f"math/{short_hash(prompt)}"), prompt=prompt,
                       answer=gold_answer(row, where), meta=meta)

    def score(self, problem: Problem, answer: str | None) -> float | None:
        return math_equal(problem.answer, answer)
