"""Exact arithmetic over a parsed expression (never eval): integers, + - * / // % **, parentheses and unary minus.

`/` is exact (a Fraction, written as an integer when it divides, else as p/q); every intermediate value and exponent
is bounded, so no expression can take the process's time or memory.
"""

from __future__ import annotations

import ast
from fractions import Fraction

MAX_CHARS = 256
MAX_NODES = 64
MAX_BITS = 4096  # any intermediate numerator or denominator (about 1233 decimal digits)
MAX_EXPONENT = 4096

_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: Fraction(a // b), ast.Mod: lambda a, b: a % b}


class CalculatorError(ValueError):
    """An expression the calculator refuses, with the reason a model can read."""


def _bounded(x: Fraction) -> Fraction:
    if max(x.numerator.bit_length(), x.denominator.bit_length()) > MAX_BITS:
        raise CalculatorError(f"a value exceeds {MAX_BITS} bits")
    return x


def _power(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1:
        raise CalculatorError("exponents must be integers")
    if abs(exp) > MAX_EXPONENT:
        raise CalculatorError(f"exponents are limited to {MAX_EXPONENT}")
    if base == 0 and exp < 0:
        raise CalculatorError("division by zero")
    # The result's size is known before computing it: bits(base) * |exp|.
    bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    if abs(base) not in (0, 1) and bits * abs(int(exp)) > MAX_BITS + bits:
        raise CalculatorError(f"a value exceeds {MAX_BITS} bits")
    return base ** int(exp)


def _walk(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return _bounded(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _walk(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        a, b = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(a, b))
        op = _BINARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
        if b == 0 and not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            raise CalculatorError("division by zero")
        return _bounded(op(a, b))
    raise CalculatorError(f"{type(node).__name__} is not allowed: only integers, + - * / // % ** and parentheses")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; CalculatorError says why one is refused."""
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be a string")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").replace(",", "").strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"expressions are limited to {MAX_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalculatorError(f"not an arithmetic expression: {e.msg if isinstance(e, SyntaxError) else e}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expressions are limited to {MAX_NODES} parts")
    return _walk(tree.body)


def format_value(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (integers, + - * / // % **, parentheses).

    Args:
        expression: the expression, e.g. "(1234 + 5678) * 3"
    """
    return format_value(evaluate(expression))
