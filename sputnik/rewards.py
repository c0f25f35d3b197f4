"""Rewards for GRPO: every function is fn(problem, completion, task, **cfg) -> float | None (None = skip).

    accuracy  the task's verifier on the answer part only (R1's rule: what follows </think>; a thought that never
              closes earns 0), in [0, 1]; None when the gold answer cannot be parsed
    format    1.0 for <think> reasoning </think> followed by an answer, else 0.0
    language  share of the chain-of-thought's words in the target language (R1's language consistency)
    overlong  DAPO's soft overlong penalty, 0 down to -1, from the completion's length in tokens
    length    a small per-sample length term: shorter is better when right, never a bonus when wrong

`combine({"accuracy": 1, "format": 1})` gives the weighted sum (R1-Zero's reward: accuracy + format, equal
weights) together with each component. Functions take **cfg and ignore what they do not use, so one set of
options (think_opened, grading, require_answer_tag, language, max_length, overlong_cache) serves them all; each
option's default is the one its function's signature gives.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sputnik.r1 import THINK_CLOSE, THINK_OPEN
from sputnik.tasks.base import Problem, Task

RewardFn = Callable[..., float | None]


def accuracy_reward(problem: Problem, completion: str, task: Task, *, think_opened: bool = False,
                    grading: str = "strict", **cfg: Any) -> float | None:
    """The task's verifier on the completion's answer (r1.graded_part: strict grading never reads a number inside
    the thinking); None (skip the problem) when its gold answer cannot be parsed."""
    return task.verify(problem, completion, think_opened, grading)


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def format_reward(problem: Problem | None, completion: str, task: Task | None = None, *, think_opened: bool = False,
                  require_answer_tag: bool = False, **cfg: Any) -> float:
    """1.0 for "<think> reasoning </think> answer", else 0.0.

    The reasoning must be non-empty and the think tags appear once each. The answer is non-empty text after
    </think>; if it uses <answer> tags there must be exactly one non-empty pair (with `require_answer_tag`, the
    answer must be just that pair, as in R1-Zero). `think_opened`: the prompt already ended with "<think>", so
    the completion starts inside the reasoning.
    """
    text = completion.strip()
    if not think_opened:
        if not text.startswith(THINK_OPEN):
            return 0.0
        text = text[len(THINK_OPEN):]
    if THINK_OPEN in text or text.count(THINK_CLOSE) != 1:
        return 0.0
    reasoning, answer = text.split(THINK_CLOSE)
    if not reasoning.strip() or not answer.strip():
        return 0.0
    if require_answer_tag or "<answer>" in answer or "</answer>" in answer:
        pairs = _ANSWER.findall(answer)
        if len(pairs) != 1 or answer.count("<answer>") != 1 or answer.count("</answer>") != 1:
            return 0.0
        if not pairs[0].strip():
            return 0.0
        if require_answer_tag and not re.fullmatch(r"\s*<answer>.*?</answer>\s*", answer, re.S):
            return 0.0
    return 1.0


# ----- language consistency -----

SCRIPTS = {"ko": "hangul", "en": "latin"}


def _script(ch: str) -> str | None:
    """hangul, latin, other (letters of any other script) or None (digits, symbols, spaces: not words)."""
    o = ord(ch)
    if 0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F or 0xA960 <= o <= 0xA97F \
            or 0xD7B0 <= o <= 0xD7FF:
        return "hangul"
    if not ch.isalpha():
        return None
    if o < 0x250 or 0x1E00 <= o <= 0x1EFF:  # basic Latin, Latin-1, Latin Extended A/B, Latin Extended Additional
        return "latin"
    return "other"


def words_by_script(text: str) -> dict[str, int]:
    """Count words, a word being a maximal run of letters in one script: "Python으로" is one latin, one hangul."""
    counts = {"hangul": 0, "latin": 0, "other": 0}
    previous = None
    for ch in text:
        script = _script(ch)
        if script is not None and script != previous:
            counts[script] += 1
        previous = script
    return counts


def chain_of_thought(completion: str, think_opened: bool = False) -> str:
    """The reasoning: inside <think>…</think> (to the end when unclosed); the whole text when there is no tag."""
    if think_opened:
        return completion.split(THINK_CLOSE, 1)[0]
    if THINK_OPEN not in completion:
        return completion
    return completion.split(THINK_OPEN, 1)[1].split(THINK_CLOSE, 1)[0]


def language_reward(problem: Problem | None, completion: str, task: Task | None = None, *, language: str = "en",
                    think_opened: bool = False, **cfg: Any) -> float:
    """Share of the chain-of-thought's words written in `language` ("ko": Hangul, "en": Latin script).

    Numbers and symbols are not words. A chain of thought without any words scores 1.0: nothing in it is in the
    wrong language (format decides whether it is acceptable).
    """
    if language not in SCRIPTS:
        raise ValueError(f"language must be one of {tuple(SCRIPTS)}, got {language!r}")
    counts = words_by_script(chain_of_thought(completion, think_opened))
    total = sum(counts.values())
    return counts[SCRIPTS[language]] / total if total else 1.0


# ----- length shaping -----

def _need_length(length: int | None, name: str) -> int:
    if length is None:
        raise ValueError(f"the {name} reward needs the completion's length in tokens: pass length=")
    return length


def overlong_reward(problem: Problem | None, completion: str, task: Task | None = None, *, length: int | None = None,
                    max_length: int = 4096, overlong_cache: int = 512, **cfg: Any) -> float:
    """DAPO's soft overlong punishment with L_max = max_length and L_cache = overlong_cache:
    0 up to L_max - L_cache tokens, then falling linearly to -1 at L_max, and -1 beyond."""
    length = _need_length(length, "overlong")
    start = max_length - overlong_cache
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / overlong_cache
    return -1.0


def length_reward(problem: Problem, completion: str, task: Task, *, length: int | None = None,
                  max_length: int = 4096, accuracy: float | None = None, think_opened: bool = False,
                  grading: str = "strict", **cfg: Any) -> float | None:
    """A per-sample form of Kimi k1.5's length reward: lam = 0.5 - length / max_length (0.5 for an empty answer,
    0 at half the budget, -0.5 at all of it); right answers get lam, wrong ones min(0, lam), so being short is
    never rewarded by itself. Uses `accuracy` when given (combine passes it), else runs the verifier."""
    length = _need_length(length, "length")
    if accuracy is None:
        accuracy = task.verify(problem, completion, think_opened, grading)
        if accuracy is None:
            return None
    lam = min(0.5, max(-0.5, 0.5 - length / max_length))
    return lam if accuracy >= 1.0 else min(0.0, lam)


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language": language_reward,
    "overlong": overlong_reward,
    "length": length_reward,
}


# ----- combining -----

def parse_weights(text: str) -> dict[str, float]:
    """"accuracy=1,format=0.5" -> {"accuracy": 1.0, "format": 0.5}; a bare name weighs 1."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        weights[name.strip()] = float(value) if value else 1.0
    return weights


class Reward:
    """Weighted sum of reward functions: reward(problem, completion, task, **cfg) -> (total, {name: value}).

    The total is None (skip the sample) when accuracy is None; another component's None counts as 0.
    Accuracy runs first and its value is handed to the others as `accuracy=` (length uses it).
    """

    def __init__(self, weights: dict[str, float], **options: Any) -> None:
        unknown = sorted(set(weights) - set(REWARDS))
        if unknown:
            raise ValueError(f"unknown rewards {unknown}; rewards: {', '.join(REWARDS)}")
        self.weights = dict(weights)
        self.options = options
        # Accuracy first, so the others can reuse it.
        self.names = sorted(self.weights, key=lambda name: name != "accuracy")

    def __call__(self, problem: Problem, completion: str, task: Task,
                 **cfg: Any) -> tuple[float | None, dict[str, float | None]]:
        cfg = {**self.options, **cfg}
        values: dict[str, float | None] = {}
        for name in self.names:
            values[name] = REWARDS[name](problem, completion, task, **cfg)
            if name == "accuracy":
                if values[name] is None:
                    return None, values
                cfg["accuracy"] = values[name]
        total = sum(self.weights[name] * (values[name] or 0.0) for name in self.names)
        return total, values

    def __repr__(self) -> str:
        return f"Reward({self.weights}, {self.options})"


def combine(weights: dict[str, float] | str, **options: Any) -> Reward:
    """A Reward from weights ({"accuracy": 1, "format": 1} or "accuracy=1,format=1") and the options the reward
    functions read (think_opened, language, max_length, ...; a call's own keywords override them)."""
    if isinstance(weights, str):
        weights = parse_weights(weights)
    return Reward(weights, **options)
