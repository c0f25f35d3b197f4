"""Worked solutions for arithmetic, in English and Korean: the programmatic reasoning of R1's cold start.

A trace restates the problem, then works column by column from the ones (carries and borrows said out loud) or
digit by digit of the multiplier, and ends on the result; the answer is the result in \\boxed{}. Each step only
needs digits written just above it, which is what makes thinking pay for a small model: the direct answer needs
every digit at once. With `places`, a sum or difference first writes each operand's digits under their places'
names ("916: Hundreds 9, Tens 1, Ones 6."), so a column finds its digits by name rather than by counting from the
right.
"""

from __future__ import annotations

import re

PLACES = {
    "en": ("Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands", "Millions",
           "Ten-millions", "Hundred-millions"),
    "ko": ("일의 자리", "십의 자리", "백의 자리", "천의 자리", "만의 자리", "십만의 자리", "백만의 자리",
           "천만의 자리", "억의 자리"),
}
# The places as the operands' digits are named (`places`): Korean's column names cost SmolLM2 ~8 tokens each.
DIGIT_PLACES = {"en": PLACES["en"], "ko": ("일", "십", "백", "천", "만", "십만", "백만", "천만", "억")}
# The phrases of a trace, per language.
WORDS = {
    "en": {"write": "write {d}", "carry": "carry 1", "last_carry": "Write the carry 1.", "borrow": "borrow 1",
           "so": "So {a} {op} {b} = {r}.", "times": "{a} × {d} = {p}", "shift": "× {t} = {p}",
           "sum": "Add the partial products: {terms} = {r}."},
    "ko": {"write": "{d} 적기", "carry": "1 올림", "last_carry": "올린 1 적기.", "borrow": "1 빌림",
           "so": "따라서 {a} {op} {b} = {r}.", "times": "{a} × {d} = {p}", "shift": "× {t} = {p}",
           "sum": "부분 곱을 더하면 {terms} = {r}."},
}


def _place(i: int, language: str, names: dict[str, tuple[str, ...]] = PLACES) -> str:
    table = names[language]
    return table[i] if i < len(table) else f"10^{i}"


def _digits(n: int, width: int) -> list[int]:
    """The digits of n from the ones, padded with zeros to `width`."""
    return [int(c) for c in str(n)[::-1].ljust(width, "0")]


def add_steps(a: int, b: int, language: str = "en") -> list[str]:
    w = WORDS[language]
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        s = x + y + carry
        step = f"{_place(i, language)}: {x} + {y}" + (f" + {carry}" if carry else "") + f" = {s}, "
        step += w["write"].format(d=s % 10) + (", " + w["carry"] if s >= 10 else "") + "."
        steps.append(step)
        carry = s // 10
    if carry:
        steps.append(w["last_carry"])
    return steps


def sub_steps(a: int, b: int, language: str = "en") -> list[str]:
    """Column subtraction of b from a (a >= b), borrowing from the next column."""
    w = WORDS[language]
    width = len(str(a))
    steps, borrow = [], 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        s = x - y - borrow
        step = f"{_place(i, language)}: {x} - {y}" + (f" - {borrow}" if borrow else "") + f" = {s}"
        if s < 0:
            s += 10
            step += f", {w['borrow']}: {s}"
        steps.append(step + ", " + w["write"].format(d=s) + ".")
        borrow = int(x - y - borrow < 0)
    return steps


def mul_steps(a: int, b: int, language: str = "en") -> list[str]:
    """Long multiplication: a times each digit of b from the ones, each partial product shifted, then their sum."""
    w = WORDS[language]
    steps, partials = [], []
    for i, d in enumerate(_digits(b, len(str(b)))):
        p = a * d
        step = w["times"].format(a=a, d=d, p=p)
        if i:
            step += ", " + w["shift"].format(t=10**i, p=p * 10**i)
        steps.append(step + ".")
        partials.append(p * 10**i)
    if len(partials) > 1:
        steps.append(w["sum"].format(terms=" + ".join(map(str, partials)), r=sum(partials)))
    return steps


STEPS = {"+": add_steps, "-": sub_steps, "*": mul_steps}


def place_steps(a: int, b: int, language: str = "en") -> list[str]:
    """Each operand's digits from the highest place, each after its place's name, padded to a common width."""
    width = max(len(str(a)), len(str(b)))

    def named(n: int) -> str:
        digits = _digits(n, width)
        return f"{n}: " + ", ".join(f"{_place(i, language, DIGIT_PLACES)} {digits[i]}" for i in reversed(range(width)))

    return [named(a) + ".", named(b) + "."]


def arithmetic_trace(a: int, op: str, b: int, language: str = "en", places: bool = False) -> tuple[str, str]:
    """(reasoning, answer) for a op b: the problem restated, its steps, the result; the answer in \\boxed{}.
    `places` writes the operands' digits by place before the columns of a sum or difference."""
    if language not in PLACES:
        raise ValueError(f"traces are written in {tuple(PLACES)}, not {language!r}")
    result = a + b if op == "+" else a - b if op == "-" else a * b
    shown = "×" if op == "*" else op
    so = WORDS[language]["so"].format(a=a, op=shown, b=b, r=result)
    named = place_steps(a, b, language) if places and op in "+-" else []
    lines = [f"{a} {shown} {b}.", *named, *STEPS[op](a, b, language), so]
    return "\n".join(lines), f"\\boxed{{{result}}}"


# What a trace's own work arrives at, read back from a completion's reasoning: the digits its columns write (ones
# first; the last carry too, written or left in the last column), or for multiplication the last number its last
# step computes.
_WRITTEN = {"en": re.compile(r"write (\d)\b|Write the carry (\d)"), "ko": re.compile(r"(\d) 적기")}
_SO = ("So ", "따라서")


def trace_result(reasoning: str, op: str, language: str = "en") -> str | None:
    """The result the reasoning's steps compute, in the form `arithmetic_trace` writes them (None where it wrote no
    such steps) — to tell an answer that follows from the thinking from one that does not."""
    if op in "+-":
        w, digits, carried = WORDS[language], [], False
        for line in reasoning.splitlines():
            written = ["".join(m) for m in _WRITTEN[language].findall(line)]  # a tuple of groups, or one group
            if written:
                digits += written
                carried = w["carry"] in line and w["last_carry"].rstrip(".") not in line
        if carried:  # the last column's carry, not written out on a line of its own, is still the first digit
            digits.append("1")
        return str(int("".join(reversed(digits)))) if digits else None
    steps = [line for line in reasoning.splitlines() if "=" in line and not line.lstrip().startswith(_SO)]
    numbers = re.findall(r"\d+", steps[-1].rsplit("=", 1)[-1]) if steps else []
    return str(int(numbers[0])) if numbers else None
