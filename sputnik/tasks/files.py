"""Tasks whose problems come from JSONL files: reading with file:line errors, and the train/test split."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sputnik.tasks.base import SPLITS, Problem, Task, check_split, split_of


class TaskDataError(ValueError):
    """A problem file that cannot be used; the message names the file and line."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; bad JSON or a non-object raises TaskDataError."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def field_of(row: dict[str, Any], names: tuple[str, ...], where: str) -> str:
    """The first of `names` present in the row, as text; TaskDataError naming `where` (file:line) if none is."""
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip() != "":
            return str(value)
    raise TaskDataError(f"{where}: missing field {' or '.join(repr(n) for n in names)}")


@dataclass(repr=False)
class FileTask(Task):
    """Problems from `path` (split by a hash of the prompt, `test_frac` of them to test, or by a row's "split"
    field) or from separate `train` and `test` files. Test problems whose prompt is also in train are dropped.
    With test_frac None, rows of `path` that name no split belong to both splits: the whole file is the eval set
    (and the training set), as a user who brings one file expects. Subclasses turn a row into a Problem with
    `make_problem`.
    """

    path: str | None = None
    train: str | None = None
    test: str | None = None
    test_frac: float | None = 0.2

    def __post_init__(self) -> None:
        if self.path is None and self.train is None and self.test is None:
            raise ValueError(f"{self.name}: give a file (\"{self.name}:path.jsonl\") or train=/test= files")
        self._splits: dict[str, list[Problem]] | None = None

    def make_problem(self, row: dict[str, Any], where: str) -> Problem:
        raise NotImplementedError

    def _load(self) -> dict[str, list[Problem]]:
        if self._splits is not None:
            return self._splits
        splits: dict[str, list[Problem]] = {"train": [], "test": []}
        both: list[Problem] = []  # rows in every split (test_frac None)
        sources = [(self.path, None), (self.train, "train"), (self.test, "test")]
        for path, fixed in sources:
            if path is None:
                continue
            for lineno, row in read_jsonl(path):
                where = f"{path}:{lineno}"
                problem = self.make_problem(row, where)
                split = fixed or row.get("split")
                if split is None and self.test_frac is None:
                    both.append(problem)
                    continue
                split = split or split_of(problem.prompt, self.test_frac)
                if split not in SPLITS:
                    raise TaskDataError(f"{where}: split must be one of {SPLITS}, got {split!r}")
                splits[split].append(problem)
        train_prompts = {p.prompt for p in splits["train"]}
        splits["test"] = [p for p in splits["test"] if p.prompt not in train_prompts]
        for name in SPLITS:
            splits[name] += both
        self._splits = splits
        return splits

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """A seeded shuffle of the split, at most `n` problems (all of them when n is None)."""
        check_split(split)
        pool = list(self._load()[split])
        random.Random(f"{self.name}:{split}:{seed}").shuffle(pool)
        return pool if n is None else pool[:n]
