"""Several tasks as one: the problems of each in turn, every problem rendered and graded by its own task.

R1's GRPO mixes prompt sources (English and Korean, say); a mix keeps each problem's wording, format instruction,
verifier, trace and language (for the language-consistency reward), so a run over two languages is one task.
"""

from __future__ import annotations

from typing import Any

from sputnik.tasks.base import Problem, Task


class MixTask(Task):
    """Problems of `tasks` interleaved: A, B, A, B, ... (each task's own split, so the splits stay disjoint)."""

    name = "mix"

    def __init__(self, tasks: list[Task], specs: list[str]) -> None:
        if len(tasks) < 2:
            raise ValueError("a mix needs two tasks or more")
        self.tasks, self.specs = tasks, specs

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        parts = [t.problems(split, None if n is None else -(-n // len(self.tasks)), seed) for t in self.tasks]
        out = []
        for i in range(max(len(p) for p in parts)):
            for which, part in enumerate(parts):
                if i < len(part):
                    p = part[i]
                    out.append(Problem(p.id, p.prompt, p.answer, {**p.meta, "mix": which}))
        return out if n is None else out[:n]

    def of(self, problem: Problem) -> Task:
        """The task a problem came from."""
        return self.tasks[problem.meta["mix"]]

    def render(self, problem: Problem, *args: Any, **kwargs: Any):
        return self.of(problem).render(problem, *args, **kwargs)

    def verify(self, problem: Problem, completion: str, think_opened: bool = False,
               grading: str = "strict") -> float | None:
        return self.of(problem).verify(problem, completion, think_opened, grading)

    def extract_for(self, problem: Problem, completion: str, think_opened: bool = False,
                    grading: str = "strict") -> str | None:
        return self.of(problem).extract(completion, think_opened, grading)

    def score(self, problem: Problem, answer: str | None) -> float | None:
        return self.of(problem).score(problem, answer)

    def trace(self, problem: Problem) -> tuple[str, str]:
        return self.of(problem).trace(problem)

    def language_of(self, problem: Problem) -> str:
        return self.of(problem).language

    def worked_result(self, problem: Problem, reasoning: str) -> str | None:
        return self.of(problem).worked_result(problem, reasoning)

    def __repr__(self) -> str:
        return f"MixTask({' + '.join(self.specs)})"
