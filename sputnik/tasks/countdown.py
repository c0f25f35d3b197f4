"""Countdown (TinyZero's task): reach the target with each given number used exactly once and + - * / ( ).

Answers are parsed by a small tokenizer and recursive-descent parser over exact fractions; nothing is ever
passed to eval. Limits on length, nesting, literal size and intermediate magnitude keep adversarial answers cheap.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction

from sputnik.tasks.base import ANSWER_TAG_SUFFIX, GeneratedTask, Problem, parse_range

MAX_CHARS = 200  # longest expression we parse at all
MAX_DEPTH = 32  # parenthesis nesting
MAX_LITERAL_DIGITS = 6  # the given numbers have at most a few digits; longer literals cannot be valid anyway
MAX_MAGNITUDE = 10**15  # bound on numerators and denominators of intermediate values

# Unicode and LaTeX spellings of the four operators and of parentheses, mapped to ASCII.
_SPELLINGS = [(r"\left", ""), (r"\right", ""), (r"\times", "*"), (r"\cdot", "*"), (r"\div", "/"), ("×", "*"),
              ("·", "*"), ("÷", "/"), ("−", "-"), ("–", "-"), ("\\(", "("), ("\\)", ")"), ("$", "")]
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")


class InvalidExpression(ValueError):
    pass


def tokenize(text: str) -> list[str]:
    """Numbers and the six symbols + - * / ( ); anything else (letters, '.', '_', '**', ...) is invalid."""
    if "**" in text:
        raise InvalidExpression("'**' is not allowed")
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise InvalidExpression(f"unexpected character {text[pos:].lstrip()[:1]!r}")
        if match.group(1) and len(match.group(1)) > MAX_LITERAL_DIGITS:
            raise InvalidExpression("number too long")
        tokens.append(match.group(1) or match.group(2))
        pos = match.end()
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := atom (('*'|'/') atom)* ; atom := NUMBER | '(' expr ')'.

    No unary minus: the rules allow only binary operations on the given numbers.
    """

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.pos, self.numbers = tokens, 0, []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise InvalidExpression("unexpected end")
        self.pos += 1
        return token

    def parse(self) -> Fraction:
        value = self.expr(0)
        if self.peek() is not None:
            raise InvalidExpression(f"unexpected {self.peek()!r}")
        return value

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            value = _checked(value + self.term(depth) if self.take() == "+" else value - self.term(depth))
        return value

    def term(self, depth: int) -> Fraction:
        value = self.atom(depth)
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value = _checked(value * self.atom(depth))
            else:
                divisor = self.atom(depth)
                if divisor == 0:
                    raise InvalidExpression("division by zero")
                value = _checked(value / divisor)
        return value

    def atom(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise InvalidExpression("too deeply nested")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise InvalidExpression("unbalanced parentheses")
            return value
        if token.isdigit():
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise InvalidExpression(f"unexpected {token!r}")


def _checked(value: Fraction) -> Fraction:
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise InvalidExpression("intermediate value too large")
    return value


def normalize(text: str) -> str:
    """ASCII operators, and "lhs = 65" reduced to lhs (the model may write the whole equation)."""
    for spelling, ascii_ in _SPELLINGS:
        text = text.replace(spelling, ascii_)
    if text.count("=") == 1:
        lhs, rhs = text.split("=")
        if re.fullmatch(r"\s*\d+\s*\.?\s*", rhs):
            text = lhs
    return text.strip()


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an expression and the numbers it uses; raises InvalidExpression."""
    if len(expression) > MAX_CHARS:
        raise InvalidExpression("expression too long")
    parser = _Parser(tokenize(normalize(expression)))
    return parser.parse(), parser.numbers


def check(expression: str, numbers: list[int], target: int) -> bool:
    """True when the expression uses each of `numbers` exactly once and equals `target`."""
    try:
        value, used = evaluate(expression)
    except InvalidExpression:
        return False
    return sorted(used) == sorted(numbers) and value == target


@dataclass(repr=False)
class CountdownTask(GeneratedTask):
    """min_numbers..max_numbers numbers in 1..max_number, an integer target in 1..max_target.

    With `test_numbers` (a count, 5, or a range, "5-6"), the test split gives that many numbers while train keeps
    min_numbers..max_numbers: held-out problems harder than training, the splits still disjoint.
    Score (TinyZero): 1.0 correct, `format_score` for an answer that is present but wrong or invalid, 0.0 none.
    """

    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 99
    max_target: int = 100
    format_score: float = 0.1
    test_numbers: int | str | None = None
    name = "countdown"
    extract_order = ("answer", "boxed")
    chat_suffix = ANSWER_TAG_SUFFIX

    def __post_init__(self) -> None:
        if not 2 <= self.min_numbers <= self.max_numbers <= 6:
            raise ValueError(f"{self.name}: need 2 <= min_numbers <= max_numbers <= 6, got "
                             f"{self.min_numbers}..{self.max_numbers}")
        self._train = (self.min_numbers, self.max_numbers)
        self._test = self._train if self.test_numbers is None else parse_range(self.test_numbers,
                                                                               f"{self.name}: test_numbers", 2, 6)
        self._counts = self._train

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        if self._test == self._train:
            return super().problems(split, n, seed)
        return self.sized_problems(split, n, seed, "_counts", self._train, self._test)

    def question(self, numbers: list[int], target: int) -> str:
        return (f"Using the numbers {numbers}, write an expression that equals {target}. You may use +, -, * and / "
                "and parentheses, and each number must be used exactly once.")

    def sample(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(*self._counts))]
            for _ in range(50):
                value, expression = _random_expression(rng, numbers)
                # The target is the value of an expression built from the numbers, so a solution exists.
                if value.denominator == 1 and 1 <= value <= self.max_target:
                    target = int(value)
                    return Problem(
                        id=f"{self.name}/{','.join(map(str, sorted(numbers)))}->{target}",
                        prompt=self.question(numbers, target),
                        answer=expression,
                        meta={"numbers": numbers, "target": target},
                    )

    def key(self, problem: Problem) -> str:
        # Partition by the multiset of numbers: no test number set ever appears in train, whatever the target.
        return "countdown:" + ",".join(map(str, sorted(problem.meta["numbers"])))

    def score(self, problem: Problem, answer: str | None) -> float | None:
        if answer is None:
            return 0.0
        ok = check(answer, problem.meta["numbers"], problem.meta["target"])
        return 1.0 if ok else self.format_score


KOREAN_ANSWER_TAG_SUFFIX = "\n단계별로 풀이하고, 최종 답의 식은 <answer> </answer> 태그 안에 쓰세요."


@dataclass(repr=False)
class KoreanCountdownTask(CountdownTask):
    """Countdown asked in Korean; same number sets, keys and verifier as `countdown`."""

    name = "korean-countdown"
    chat_suffix = KOREAN_ANSWER_TAG_SUFFIX
    language = "ko"

    def question(self, numbers: list[int], target: int) -> str:
        return (f"숫자 {numbers}을(를) 사용해서 {target}이(가) 되는 식을 쓰세요. +, -, *, /와 괄호를 쓸 수 있고, "
                "각 숫자는 정확히 한 번씩 써야 합니다.")


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[Fraction, str]:
    """Join random pairs with random operators until one expression is left (every tree shape can come out)."""
    items = [(Fraction(x), str(x)) for x in numbers]
    while len(items) > 1:
        (a, ea), (b, eb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
        op = rng.choice("+-*/" if b != 0 else "+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
        items.append((value, f"({ea} {op} {eb})"))
    value, expression = items[0]
    return value, expression[1:-1] if expression.startswith("(") else expression
