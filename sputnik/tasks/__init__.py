"""Tasks: problems plus verifiers, looked up by a spec string.

    get_task("arithmetic")                     2-digit addition, the R1-Zero demo task
    get_task("arithmetic:digits=3,ops=+-*")    options after ':' as key=value, comma separated
    get_task("arithmetic:digits=4,test_digits=6") train on 4-digit problems, hold out 6-digit ones
    get_task("arithmetic:digits=1-4,test_digits=5-6,ops=+-") digit ranges: each operand's size drawn from it
    get_task("countdown")                      TinyZero's countdown
    get_task("countdown:test_numbers=5-6")     train on 3-4 numbers, hold out problems with 5-6
    get_task("math") / get_task("math:f.jsonl") math-verify on our sample or your file (GSM8K or MATH rows)
    get_task("math:train=a.jsonl,test=b.jsonl") separate files per split
    get_task("gym:leg_counting,min_animals=2") any reasoning-gym dataset, options passed to its config
    get_task("jsonl:mine.jsonl,verifier=number") your own {"prompt", "answer", "verifier"?} rows, the whole file
                                               (test_frac=0.2: a hash-chosen fifth held out as test)
    get_task("korean-arithmetic")              arithmetic word problems in Korean
    get_task("korean-countdown")               countdown asked in Korean
    get_task("arithmetic + korean-arithmetic") a mix: each task's problems in turn, each graded by its own task

A bare value after ':' (no '=') is the file of math/jsonl or the dataset of gym. Paths may not contain commas.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sputnik.tasks.arithmetic import ArithmeticTask, KoreanArithmeticTask, parse_integer
from sputnik.tasks.base import (R1_ZERO_TEMPLATE, TEMPLATES, GeneratedTask, Problem, Task, extract_answer,
                                last_answer_tag, last_boxed, last_number, split_of)
from sputnik.tasks.countdown import CountdownTask, KoreanCountdownTask
from sputnik.tasks.files import FileTask, TaskDataError
from sputnik.tasks.gym import GymTask
from sputnik.tasks.jsonl import JsonlTask
from sputnik.tasks.maths import MathTask, math_equal
from sputnik.tasks.mix import MixTask

# name -> (class, what a bare value after ':' sets)
_REGISTRY: dict[str, tuple[type[Task], str | None]] = {
    "arithmetic": (ArithmeticTask, None),
    "countdown": (CountdownTask, None),
    "math": (MathTask, "path"),
    "gym": (GymTask, "dataset"),
    "jsonl": (JsonlTask, "path"),
    "korean-arithmetic": (KoreanArithmeticTask, None),
    "korean-countdown": (KoreanCountdownTask, None),
}
TASKS = tuple(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """"name:value,k=v,k=v" -> (name, value, {k: v}); the value and options are optional."""
    name, _, rest = spec.strip().partition(":")
    value, options = None, {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        if "=" in part:
            key, _, val = part.partition("=")
            options[key.strip()] = val.strip()
        elif value is None:
            value = part
        else:
            raise ValueError(f"task spec {spec!r}: more than one value without '=' ({value!r}, {part!r})")
    return name, value, options


def _coerce(text: str, kind: str) -> Any:
    """A spec option as the type its dataclass field declares (annotations are strings here)."""
    if kind.startswith("bool"):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if kind.startswith("int"):
        # "int | str" (a count or a range like 1-4): the task parses the text itself.
        return int(text) if "str" not in kind or text.strip().lstrip("-").isdigit() else text
    if kind.startswith("float"):
        return float(text)
    return text


def _literal(text: str) -> Any:
    """A reasoning-gym option: int, float, bool or text, whichever it reads as."""
    for kind in ("int", "float"):
        try:
            return _coerce(text, kind)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def get_task(spec: str) -> Task:
    """The task a spec names (see the module docstring); specs joined by " + " make a mix of those tasks."""
    if " + " in spec:
        specs = [part.strip() for part in spec.split(" + ")]
        return MixTask([get_task(part) for part in specs], specs)
    name, value, options = parse_spec(spec)
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    cls, value_field = _REGISTRY[name]
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    if value is not None:
        if value_field is None:
            raise ValueError(f"task spec {spec!r}: {name} takes key=value options only, got {value!r}")
        kwargs[value_field] = value
    elif name == "gym":
        raise ValueError("gym needs a dataset name, e.g. 'gym:leg_counting'")
    extra: dict[str, Any] = {}
    for key, text in options.items():
        if key in fields and key != "kwargs":
            try:
                kwargs[key] = _coerce(text, fields[key])
            except ValueError as e:
                raise ValueError(f"task spec {spec!r}: option {key}: {e}") from None
        elif name == "gym":
            extra[key] = _literal(text)
        else:
            known = ", ".join(k for k in fields if k != "kwargs")
            raise ValueError(f"task spec {spec!r}: unknown option {key!r} for {name} (options: {known})")
    if name == "gym":
        kwargs["kwargs"] = extra
    return cls(**kwargs)


__all__ = [
    "TASKS", "TEMPLATES", "R1_ZERO_TEMPLATE", "Problem", "Task", "GeneratedTask", "FileTask", "TaskDataError",
    "ArithmeticTask", "KoreanArithmeticTask", "MixTask", "CountdownTask", "MathTask", "GymTask", "JsonlTask",
    "get_task", "parse_spec", "extract_answer", "last_answer_tag", "last_boxed", "last_number", "parse_integer",
    "math_equal", "split_of",
]
