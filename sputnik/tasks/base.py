"""Problem, Task and the pieces every task shares: prompt templates, answer extraction, train/test partitioning.

A Task is a source of problems plus a verifier. The trainer and the eval runner only ever call:
    task.problems(split, n, seed) -> list[Problem]
    task.render(problem, template)  -> messages (chat) or text (r1-zero, plain)
    task.verify(problem, completion) -> score in [0, 1], or None when the gold answer itself is unusable
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

from sputnik.r1 import answer_part, graded_part

# DeepSeek-R1-Zero's training template (R1 paper, table 1), word for word.
R1_ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
R1_ZERO_TEMPLATE = R1_ZERO_PREAMBLE + " User: {prompt}. Assistant:"
# R1's recommended suffix for math prompts (no system prompt, answer in \boxed{}).
BOXED_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
ANSWER_TAG_SUFFIX = "\nPlease reason step by step, and put your final answer within <answer> </answer> tags."
TEMPLATES = ("chat", "r1-zero", "plain")
SPLITS = ("train", "test")
EXTRACTORS = ("answer", "boxed", "number")
MAX_MISSES = 100_000  # consecutive draws without a new problem before a generated split counts as exhausted


@dataclass
class Problem:
    """One question: `prompt` is the question text only (no template), `answer` the gold answer as text."""

    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction. Each returns the LAST match: models restate and correct themselves, the final word counts.

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_answer_tag(text: str) -> str | None:
    """Content of the last closed <answer>…</answer> (the last close tag and the open tag nearest before it)."""
    end = text.rfind(_ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(_ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(_ANSWER_OPEN):end].strip()


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{…} (or \\fbox{…}) whose braces balance; truncated ones are passed over."""
    matches = list(re.finditer(r"\\(?:boxed|fbox)\s*", text))
    if not matches:
        return None
    # Match all braces in one pass: rescanning from every "{" is quadratic on degenerate completions.
    closing, stack = {}, []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
    for match in reversed(matches):
        i = match.end()
        if i < len(text) and text[i] == "{":
            if i in closing:
                return text[i + 1:closing[i]].strip()
        elif match.group(0)[-1].isspace():
            # "\boxed 5": the argument is the next run of non-space characters.
            arg = re.match(r"[^\s$]+", text[i:])
            if arg:
                return arg.group(0)
    return None


def last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed ("1,234.5" -> "1234.5")."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


_EXTRACT_FNS = {"answer": last_answer_tag, "boxed": last_boxed, "number": last_number}


def extract_answer(text: str, order: tuple[str, ...] = EXTRACTORS, after_think: bool = True) -> str | None:
    """Try the extractors in `order`; the first that finds something wins (an empty \\boxed{} does not).

    With `after_think`, only the text after the last </think> is searched when there is one: an answer written
    inside the reasoning does not count. An <answer> that holds a \\boxed{} gives the boxed content.
    """
    answer = answer_part(text) if after_think else None
    if answer is not None:
        text = answer
    for name in order:
        found = _EXTRACT_FNS[name](text)
        # An empty \boxed{} mostly echoes the instruction; an empty <answer></answer> still counts as an answer
        # given (TinyZero scores it as present but invalid).
        if found is not None and (found.strip() or name != "boxed"):
            if name == "answer":
                found = last_boxed(found) or found
            return found
    return None


# ----------------------------------------------------------------------------------------------------------------
# Train/test partition: a problem's split is a pure function of its key, so the splits are disjoint by
# construction, whatever the seeds and sizes (sha256, not hash(): the same on every run and machine).

def split_of(key: str, test_frac: float) -> str:
    """'test' for a `test_frac` share of keys, 'train' for the rest."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_frac else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------

class Task:
    """Problems plus a verifier. Subclasses set `name`, implement `problems` and `score`."""

    name: str = "task"
    extract_order: tuple[str, ...] = EXTRACTORS
    chat_suffix: str = BOXED_SUFFIX  # appended to the prompt in the chat template unless `suffix` is given
    language: str = "en"  # the prompts' language, which the reasoning should keep (rewards.SCRIPTS)
    # A JSON Schema every answer must match: eval and GRPO then sample under it (grammar-constrained decoding).
    output_schema: dict | None = None

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` problems of `split`, the same for the same seed; train and test never share a problem."""
        raise NotImplementedError

    def render(self, problem: Problem, template: str = "chat", tokenizer: Any = None, system: str | None = None,
               suffix: str | None = None) -> str | list[dict[str, str]]:
        """The model's input for `problem`.

        chat: [system?, user] messages (rendered to text by `tokenizer.apply_chat_template` when one is given);
        r1-zero: the R1-Zero template text, `system` replacing its preamble; plain: the prompt text itself.
        `suffix` defaults to the task's format instruction for chat and to nothing otherwise.
        """
        if suffix is None:
            suffix = self.chat_suffix if template == "chat" else ""
        text = problem.prompt + suffix
        if template == "chat":
            messages = ([{"role": "system", "content": system}] if system else [])
            messages.append({"role": "user", "content": text})
            if tokenizer is not None:
                return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return messages
        if template == "r1-zero":
            # The template puts its own period after the prompt; avoid "..".
            preamble = R1_ZERO_PREAMBLE if system is None else system
            return f"{preamble} User: {text.strip().removesuffix('.')}. Assistant:"
        if template == "plain":
            return f"{system}\n\n{text}" if system else text
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")

    def extract(self, completion: str, think_opened: bool = False, grading: str = "strict") -> str | None:
        """The answer a completion gives, from its graded part (r1.graded_part: strict grading never reads the
        thinking), None when there is none."""
        part = graded_part(completion, think_opened, grading)
        return None if part is None else extract_answer(part, self.extract_order, after_think=False)

    def extract_for(self, problem: Problem, completion: str, think_opened: bool = False,
                    grading: str = "strict") -> str | None:
        """extract, by the rules of the task `problem` came from (a mix holds several)."""
        return self.extract(completion, think_opened, grading)

    def language_of(self, problem: Problem) -> str:
        """The language of `problem`'s prompt (a mix holds several)."""
        return self.language

    def score(self, problem: Problem, answer: str | None) -> float | None:
        """Score an already extracted answer in [0, 1]; None when the gold answer cannot be used."""
        raise NotImplementedError

    def verify(self, problem: Problem, completion: str, think_opened: bool = False,
               grading: str = "strict") -> float | None:
        """Score a whole completion in [0, 1] on its answer (see extract); None (skip, never 1.0) when the gold
        cannot be parsed. A thought that never closes gives no answer: the score of no answer."""
        return self.score(problem, self.extract(completion, think_opened, grading))

    def correct(self, problem: Problem, completion: str, think_opened: bool = False,
                grading: str = "strict") -> bool | None:
        """Solved or not, for accuracy and pass@k: scores below 1 (countdown's 0.1 for a wrong answer, partial
        reasoning-gym credit) are not solved."""
        score = self.verify(problem, completion, think_opened, grading)
        return None if score is None else score >= 1.0

    def trace(self, problem: Problem) -> tuple[str, str]:
        """A worked solution, (reasoning, answer), for cold-start SFT; tasks without a programmatic one raise."""
        raise NotImplementedError(f"{self.name} has no programmatic traces; use teacher traces (sputnik distill)")

    def worked_result(self, problem: Problem, reasoning: str) -> str | None:
        """The result the reasoning's own steps compute, where the task can read it (its traces' form); None
        otherwise. Eval compares it with the answer: does the answer follow from the thinking?"""
        return None

    def tool_call(self, problem: Problem) -> dict:
        """The tool call that solves `problem`, {"name", "arguments"}, for cold-start traces of tool use; tasks
        without one raise."""
        raise NotImplementedError(f"{self.name} has no programmatic tool calls")

    def __repr__(self) -> str:
        options = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)] \
            if dataclasses.is_dataclass(self) else []
        return f"{type(self).__name__}({', '.join([f'name={self.name!r}', *options])})"


class GeneratedTask(Task):
    """A task that draws problems from a random generator: `sample(rng)` makes one, `key(problem)` names it.

    Keys carry what makes two problems the same (operands, number sets), not their wording, so tasks that share
    a problem space (arithmetic and korean-arithmetic) share one partition.

    Problems whose key hashes into the other split are rejected, so train and test are disjoint by construction;
    duplicates within a split are dropped.
    """

    test_frac: float = 0.1

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def key(self, problem: Problem) -> str:
        return problem.prompt

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        check_split(split)
        if n is None:
            raise ValueError(f"{self.name}: generated tasks need a number of problems n")
        # Seeding with a string is deterministic across runs (random hashes it with sha512).
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: set[str] = set()
        out: list[Problem] = []
        misses = 0
        while len(out) < n:
            problem = self.sample(rng)
            key = self.key(problem)
            if key in seen or split_of(key, self.test_frac) != split:
                misses += 1
                # Nothing new for this long: the split has (nearly) run out of distinct problems.
                if misses > MAX_MISSES:
                    raise ValueError(f"{self.name}: only {len(out)} distinct {split} problems found, {n} asked; "
                                     "the problem space is too small for this many")
                continue
            misses = 0
            seen.add(key)
            out.append(problem)
        return out

    def sized_problems(self, split: str, n: int | None, seed: int, attr: str, train: tuple[int, int],
                       test: tuple[int, int]) -> list[Problem]:
        """Problems of a task whose test split draws sizes from `test` and train from `train` (held-out problems
        harder than training), `attr` naming the size range `sample` reads. Sizes that do not overlap cannot share a
        problem, so each split keeps all of its own; where they overlap the hash partition keeps them apart."""
        check_split(split)
        own = dataclasses.replace(self)
        setattr(own, attr, test if split == "test" else train)
        if test[0] > train[1] or test[1] < train[0]:
            own.test_frac = 1.0 if split == "test" else 0.0
        return GeneratedTask.problems(own, split, n, seed)


def parse_range(value: int | str, name: str, low: int, high: int) -> tuple[int, int]:
    """A count or range of counts: 3 -> (3, 3), "1-4" -> (1, 4); each in low..high."""
    text = str(value).strip()
    lo, sep, hi = text.partition("-")
    try:
        bounds = (int(lo), int(hi) if sep else int(lo))
    except ValueError:
        raise ValueError(f"{name} must be a count like 3 or a range like 1-4, got {value!r}") from None
    if not low <= bounds[0] <= bounds[1] <= high:
        raise ValueError(f"{name} must lie in {low}..{high} with low <= high, got {value!r}")
    return bounds
