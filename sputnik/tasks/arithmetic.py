"""Integer arithmetic: the R1-Zero demo task (2-digit addition by default), digit counts and ranges as the
difficulty knob, and Korean word problems."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from sputnik.tasks.base import BOXED_SUFFIX, GeneratedTask, Problem, parse_range
from sputnik.tasks.traces import arithmetic_trace, trace_result

OPS = "+-*"
MAX_ANSWER_CHARS = 200  # longer "answers" are rambling, not a number; also keeps int() far from huge inputs
_INT = re.compile(r"[+-]?\d+(?:[ ,]\d{3})*(?:\.0+)?")
_CLUTTER = re.compile(r"\\boxed|\\text|\\mathrm|[${}]")


def parse_integer(text: str | None) -> int | None:
    """The integer an answer states, or None: "85", "1,234", "1 234", "85.", "= 85", "47 + 38 = 85", "85개".

    After the last "=", the text must hold exactly one integer (so hedges like "85 or 86" fail).
    """
    if text is None or len(text) > MAX_ANSWER_CHARS:
        return None
    text = _CLUTTER.sub(" ", text).rsplit("=", 1)[-1].strip().rstrip(".").strip()
    numbers = _INT.findall(text)
    # Words around the number are fine ("85 apples", "85개"); a non-zero decimal part ("85.5") is no integer.
    if len(numbers) != 1 or re.search(r"\d\.\d*[1-9]", text):
        return None
    digits = re.sub(r"[ ,]|\.0+$", "", numbers[0])
    return int(digits)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def parse_digits(value: int | str, name: str = "digits") -> tuple[int, int]:
    """A digit count or range: 3 -> (3, 3), "1-4" -> (1, 4); each in 1..18."""
    return parse_range(value, name, 1, 18)


def _operands(rng: random.Random, digits: tuple[int, int], op: str) -> tuple[int, int]:
    """Two operands, each with a digit count drawn from the range on its own."""
    def draw() -> int:
        d = rng.randint(*digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)

    a, b = draw(), draw()
    if op == "-" and a < b:
        a, b = b, a  # keep differences non-negative
    return a, b


def _operand_key(a: int, op: str, b: int) -> str:
    """Same key for a + b and b + a: swapping the operands of + or * makes no new problem."""
    if op in "+*" and a > b:
        a, b = b, a
    return f"{a}{op}{b}"


@dataclass(repr=False)
class ArithmeticTask(GeneratedTask):
    """What is a op b? with operands of `digits` digits (a count, 3, or a range, "1-4") and ops drawn from `ops`
    (a subset of "+-*").

    With `test_digits`, the test split asks problems of that size while train keeps `digits`: held-out problems
    harder than training (length generalisation). Splits stay disjoint: sizes that do not overlap cannot share a
    problem, and where they overlap the hash partition keeps them apart. `places` makes the worked solutions
    (`trace`) name each operand's digits by place before the columns."""

    digits: int | str = 2
    ops: str = "+"
    test_digits: int | str | None = None
    places: bool = False
    name = "arithmetic"
    chat_suffix = BOXED_SUFFIX

    def __post_init__(self) -> None:
        self._train = parse_digits(self.digits, f"{self.name}: digits")
        self._test = self._train if self.test_digits is None else parse_digits(self.test_digits,
                                                                              f"{self.name}: test_digits")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"{self.name}: ops must be characters of {OPS!r}, got {self.ops!r}")
        self._range = self._train

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        if self._test == self._train:
            return super().problems(split, n, seed)
        return self.sized_problems(split, n, seed, "_range", self._train, self._test)

    def question(self, rng: random.Random, a: int, op: str, b: int) -> str:
        return f"What is {a} {op} {b}?"

    def sample(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        a, b = _operands(rng, self._range, op)
        key = _operand_key(a, op, b)
        return Problem(id=f"{self.name}/{key}", prompt=self.question(rng, a, op, b), answer=str(_apply(a, op, b)),
                       meta={"a": a, "b": b, "op": op, "key": key})

    def key(self, problem: Problem) -> str:
        return problem.meta["key"]

    def score(self, problem: Problem, answer: str | None) -> float | None:
        value = parse_integer(answer)
        return float(value is not None and value == int(problem.answer))

    def trace(self, problem: Problem) -> tuple[str, str]:
        """(reasoning, answer): the worked solution in the prompts' language (tasks.traces)."""
        m = problem.meta
        return arithmetic_trace(m["a"], m["op"], m["b"], self.language, self.places)

    def worked_result(self, problem: Problem, reasoning: str) -> str | None:
        """What the reasoning's columns (or partial products) compute, written as tasks.traces writes them."""
        return trace_result(reasoning, problem.meta["op"], self.language)

    def tool_call(self, problem: Problem) -> dict:
        """The calculator call that computes the problem (sputnik.tools.calculator)."""
        m = problem.meta
        return {"name": "calculator", "arguments": {"expression": f"{m['a']} {m['op']} {m['b']}"}}


# Word problems by operator: {a} and {b} are the operands; counters (개, 명, 권…) fix the particles after numbers.
KOREAN_TEMPLATES = {
    "+": [
        "사과가 {a}개 있고 {b}개를 더 샀습니다. 사과는 모두 몇 개입니까?",
        "민수는 구슬을 {a}개, 지영이는 {b}개 가지고 있습니다. 두 사람이 가진 구슬은 모두 몇 개입니까?",
        "도서관에 책이 {a}권 있었는데 {b}권이 새로 들어왔습니다. 도서관의 책은 모두 몇 권입니까?",
    ],
    "-": [
        "사탕이 {a}개 있었는데 {b}개를 먹었습니다. 남은 사탕은 몇 개입니까?",
        "버스에 {a}명이 타고 있었는데 {b}명이 내렸습니다. 버스에 남은 사람은 몇 명입니까?",
        "연필 {a}자루 중에서 {b}자루를 친구에게 주었습니다. 남은 연필은 몇 자루입니까?",
    ],
    "*": [
        "한 상자에 귤이 {a}개씩 들어 있습니다. {b}상자에 들어 있는 귤은 모두 몇 개입니까?",
        "한 줄에 의자가 {a}개씩 {b}줄 놓여 있습니다. 의자는 모두 몇 개입니까?",
        "공책 한 권의 값은 {a}원입니다. 공책 {b}권의 값은 모두 얼마입니까?",
    ],
}
KOREAN_BOXED_SUFFIX = "\n단계별로 풀이하고, 최종 답은 \\boxed{} 안에 숫자로 쓰세요."


@dataclass(repr=False)
class KoreanArithmeticTask(ArithmeticTask):
    """Arithmetic as Korean word problems; same operands, keys and verifier as `arithmetic`."""

    name = "korean-arithmetic"
    chat_suffix = KOREAN_BOXED_SUFFIX
    language = "ko"

    def question(self, rng: random.Random, a: int, op: str, b: int) -> str:
        return rng.choice(KOREAN_TEMPLATES[op]).format(a=a, b=b)
