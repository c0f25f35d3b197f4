"""Any reasoning-gym dataset as a Task: "gym:leg_counting", "gym:chain_sum,min_terms=2,max_terms=3"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sputnik.tasks.base import ANSWER_TAG_SUFFIX, Problem, Task, check_split, short_hash, split_of

SEED_STRIDE = 2**20  # item i of a dataset seeded s is drawn from Random(s + i): keep each (seed, split) apart
SEED_SPACE = 2**31  # some datasets seed numpy's legacy generator, which takes seeds below 2**32
MAX_ROUNDS = 6


def gym_names() -> list[str]:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise ImportError("gym tasks need reasoning-gym: pip install reasoning-gym") from None

    return sorted(DATASETS)


@dataclass(repr=False)
class GymTask(Task):
    """reasoning-gym's `dataset` with config `kwargs`; score_answer gets the extracted answer, not the completion.

    Train and test come from different seeds and are also partitioned by a hash of the question text (half each),
    so no question is in both even when two seeds generate the same one.
    """

    dataset: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    test_frac: float = 0.5
    extract_order = ("answer", "boxed")
    chat_suffix = ANSWER_TAG_SUFFIX

    def __post_init__(self) -> None:
        names = gym_names()
        if self.dataset not in names:
            raise ValueError(f"gym: unknown dataset {self.dataset!r}; reasoning-gym has: {', '.join(names)}")
        self.name = f"gym:{self.dataset}"
        # Build one small dataset now: bad options fail at get_task time, and its score_answer serves verify.
        try:
            self._scorer = self._create(1, 0)
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(f"{self.name}: bad options {self.kwargs}: {e}") from None

    def _create(self, size: int, seed: int) -> Any:
        import reasoning_gym

        return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.kwargs)

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        check_split(split)
        if n is None:
            raise ValueError(f"{self.name}: generated tasks need a number of problems n")
        base = ((2 * seed + (split == "test")) * SEED_STRIDE) % SEED_SPACE
        size = max(16, int(2.5 * n / (self.test_frac if split == "test" else 1 - self.test_frac)))
        for _ in range(MAX_ROUNDS):
            # Some datasets precompute choices from (seed, size), so a bigger size means a fresh, still seeded draw.
            out, seen = [], set()
            for entry in self._create(size, base):
                question = entry["question"]
                if question in seen or split_of(question, self.test_frac) != split:
                    continue
                seen.add(question)
                out.append(Problem(id=f"{self.name}/{short_hash(question)}", prompt=question,
                                   answer=str(entry["answer"]), meta={"entry": entry}))
                if len(out) == n:
                    return out
            size *= 4
        raise ValueError(f"{self.name}: only {len(out)} distinct {split} problems found, {n} asked")

    def score(self, problem: Problem, answer: str | None) -> float | None:
        try:
            value = float(self._scorer.score_answer(answer, problem.meta["entry"]))
        except Exception:
            # A scorer that chokes on a model's odd answer must not stop training: the answer is wrong.
            return 0.0
        return min(1.0, max(0.0, value))

