"""R1-style evaluation: greedy accuracy, pass@1 over k samples, cons@k, format rate, length — through the engine."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from sputnik.engine import Engine, SamplingParams
from sputnik.engine.generate import PREFILL_BLOCK, Completion
from sputnik.engine.grammar import json_answer
from sputnik.engine.multiturn import RESUME_BLOCK, AgentConfig, MultiTurn, tool_rollouts
from sputnik.r1 import GRADINGS, TEMPERATURE, THINK_MODES, THINK_OPEN, TOP_P, opens_thinking, think_prompt
from sputnik.rewards import chain_of_thought, format_reward, language_reward
from sputnik.settings import option
from sputnik.tasks import TEMPLATES, Problem, Task, get_task
from sputnik.tools.env import Environment, environment_maker
from sputnik.tools.render import plan_of, tool_prompt

if TYPE_CHECKING:
    import torch


@dataclass
class EvalConfig:
    """What to evaluate and how to sample (R1's defaults: T 0.6, top-p 0.95)."""

    task: str = option("arithmetic", "arithmetic, countdown, math[:FILE], gym:NAME, jsonl:FILE, korean-arithmetic, "
                                     "korean-countdown "
                                     "(options after ':', e.g. arithmetic:digits=3)")
    n: int = option(200, "problems from the split")
    k: int = option(4, "samples per problem for pass@1 and cons@k (0: greedy only)")
    split: str = option("test", "the task's split", choices=["train", "test"])
    seed: int = option(0, "sampling seed")
    temperature: float = option(TEMPERATURE, "sampling temperature of the k samples")
    top_p: float = option(TOP_P, "nucleus sampling of the k samples")
    max_tokens: int = option(512, "tokens per completion")
    template: str = option("chat", "how a problem becomes a prompt", choices=list(TEMPLATES))
    system: str | None = option(None, "system message of the chat template")
    suffix: str | None = option(None, "text after the problem (default: the task's format instruction)")
    greedy: bool = option(True, "run the greedy pass too")
    batch: int = option(64, "sequences per engine batch")
    think: str = option("auto", "the prompt's reasoning: auto (as the template renders it), open (the output starts "
                                "inside <think>: any model thinks first), closed (an empty thought: the model answers "
                                "directly, the direct-answer control)", choices=list(THINK_MODES))
    tools: list[str] = option([], "tools the model may call, as in GRPO: calculator, python, or module:function "
                                  "(multi-turn rollouts; reports calls per problem and the tool error rate)")
    environment_factory: str | None = option(None, "module:function returning an object whose public methods are "
                                                   "the tools, one per problem (as in GRPO)")
    max_turns: int = option(4, "model turns per problem with tools")
    tool_timeout: float = option(10.0, "seconds a tool call may take")
    grading: str = option("strict", "strict: R1's rule, only the answer after </think> counts and an unclosed thought "
                                    "scores 0; lenient: the last answer anywhere (models that do not think)",
                          choices=list(GRADINGS))


@dataclass
class EvalSummary:
    """An evaluation's figures, as summary.json holds them (to_json: "pass@1", "pass@{k}", "cons@{k}" keys).

    Greedy figures are None without a greedy run, sampled ones None without samples (k = 0)."""

    task: str = ""
    problems: int = 0  # problems scored
    skipped: int = 0  # problems whose gold answer could not be verified
    greedy_accuracy: float | None = None  # graded as the config says (strict by default)
    greedy_accuracy_lenient: float | None = None  # the last answer anywhere, thinking included
    greedy_accuracy_format_gated: float | None = None  # correct and in R1's format
    greedy_format_rate: float | None = None
    greedy_mean_length: float | None = None
    greedy_think_tokens: float | None = None  # mean tokens of reasoning (0 for a completion that does not think)
    greedy_language: float | None = None  # R1's language consistency of the reasoning, in the task's language
    # Of the completions whose reasoning's own result the task can read (Task.worked_result), the share whose answer
    # is that result: an answer that follows from the thinking, not one the thinking did not produce.
    greedy_follows_reasoning: float | None = None
    greedy_tool_call_rate: float | None = None  # with tools: the share of problems whose rollout called one
    greedy_calls: float | None = None  # with tools: calls per problem
    greedy_tool_error_rate: float | None = None  # with tools: failed calls / calls
    k: int | None = None  # samples per problem
    pass_at_1: float | None = None  # mean over the k samples
    pass_at_1_lenient: float | None = None
    pass_at_1_format_gated: float | None = None
    pass_at_k: float | None = None
    cons_at_k: float | None = None  # majority vote of the k samples
    format_rate: float | None = None
    mean_length: float | None = None
    truncated_rate: float | None = None
    think_tokens: float | None = None
    language: float | None = None
    tool_call_rate: float | None = None
    calls: float | None = None
    tool_error_rate: float | None = None
    curve: dict[str, list] | None = None  # {"j": [1..k], "pass": pass@j, "cons": cons@j}
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)  # the EvalConfig

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "problems": self.problems, "skipped": self.skipped}
        if self.greedy_accuracy is not None:
            out.update(greedy_accuracy=self.greedy_accuracy, greedy_accuracy_lenient=self.greedy_accuracy_lenient,
                       greedy_accuracy_format_gated=self.greedy_accuracy_format_gated,
                       greedy_format_rate=self.greedy_format_rate, greedy_mean_length=self.greedy_mean_length,
                       greedy_think_tokens=self.greedy_think_tokens, greedy_language=self.greedy_language,
                       greedy_follows_reasoning=self.greedy_follows_reasoning)
            if self.greedy_calls is not None:
                out.update(greedy_tool_call_rate=self.greedy_tool_call_rate, greedy_calls=self.greedy_calls,
                           greedy_tool_error_rate=self.greedy_tool_error_rate)
        if self.k is not None:
            out.update({"k": self.k, "pass@1": self.pass_at_1, "pass@1_lenient": self.pass_at_1_lenient,
                        "pass@1_format_gated": self.pass_at_1_format_gated, f"pass@{self.k}": self.pass_at_k,
                        f"cons@{self.k}": self.cons_at_k, "format_rate": self.format_rate,
                        "mean_length": self.mean_length, "truncated_rate": self.truncated_rate,
                        "think_tokens": self.think_tokens, "language": self.language, "curve": self.curve})
            if self.calls is not None:
                out.update(tool_call_rate=self.tool_call_rate, calls=self.calls, tool_error_rate=self.tool_error_rate)
        out.update(seconds=self.seconds, config=self.config)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalSummary:
        k = d.get("k")
        return cls(task=d.get("task", ""), problems=d.get("problems", 0), skipped=d.get("skipped", 0),
                   greedy_accuracy=d.get("greedy_accuracy"), greedy_accuracy_lenient=d.get("greedy_accuracy_lenient"),
                   greedy_accuracy_format_gated=d.get("greedy_accuracy_format_gated"),
                   greedy_format_rate=d.get("greedy_format_rate"),
                   greedy_mean_length=d.get("greedy_mean_length"), greedy_think_tokens=d.get("greedy_think_tokens"),
                   greedy_language=d.get("greedy_language"), greedy_tool_call_rate=d.get("greedy_tool_call_rate"),
                   greedy_follows_reasoning=d.get("greedy_follows_reasoning"),
                   greedy_calls=d.get("greedy_calls"), greedy_tool_error_rate=d.get("greedy_tool_error_rate"),
                   tool_call_rate=d.get("tool_call_rate"), calls=d.get("calls"),
                   tool_error_rate=d.get("tool_error_rate"), think_tokens=d.get("think_tokens"),
                   language=d.get("language"), k=k, pass_at_1=d.get("pass@1"),
                   pass_at_1_lenient=d.get("pass@1_lenient"), pass_at_1_format_gated=d.get("pass@1_format_gated"),
                   pass_at_k=d.get(f"pass@{k}"), cons_at_k=d.get(f"cons@{k}"), format_rate=d.get("format_rate"),
                   mean_length=d.get("mean_length"), truncated_rate=d.get("truncated_rate"), curve=d.get("curve"),
                   seconds=d.get("seconds", 0.0), config=d.get("config", {}))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: list[str | None]) -> str | None:
    """The most common extracted answer (ties: the one seen first); None answers do not vote."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == top)


def prompt_ids(task: Task, problem: Problem, tokenizer, cfg: EvalConfig, env: Environment | None = None
               ) -> tuple[list[int], bool]:
    """Token ids of the rendered prompt, and whether it already opened <think> (R1-style chat templates). With an
    environment, a chat prompt offers its tools (natively, or by the Hermes fallback's system message)."""
    if cfg.template == "chat" and env is not None and tokenizer.chat_template:
        messages = task.render(problem, "chat", None, cfg.system, cfg.suffix)
        text = tool_prompt(messages, tokenizer, plan_of(env.specs(), tokenizer))
    elif cfg.template == "chat":
        text = task.render(problem, "chat", tokenizer, cfg.system, cfg.suffix)
    else:
        text = task.render(problem, cfg.template, None, cfg.system, cfg.suffix)
        text = text if isinstance(text, str) else ""
    text = think_prompt(text, cfg.think)
    ids = tokenizer.encode(text, add_special_tokens=cfg.template != "chat")
    return ids, opens_thinking(text)


def thinking(text: str, think_opened: bool) -> str:
    """The reasoning a completion wrote ("" when it did not think): inside <think>…</think>, to the end when the
    thought never closed."""
    if not (think_opened or text.lstrip().startswith(THINK_OPEN)):
        return ""
    return chain_of_thought(text, think_opened)


def _record(task: Task, problem: Problem, kind: str, index: int, completion, think_opened: bool,
            grading: str = "strict", tokenizer=None) -> dict[str, Any]:
    reasoning = thinking(completion.text, think_opened)
    think_tokens = len(tokenizer.encode(reasoning, add_special_tokens=False)) if tokenizer and reasoning else 0
    answer = task.extract_for(problem, completion.text, think_opened, grading)
    score = task.score(problem, answer)
    lenient = task.score(problem, task.extract_for(problem, completion.text, think_opened, "lenient"))
    form = format_reward(problem, completion.text, task, think_opened=think_opened)
    correct = None if score is None else score >= 1.0
    worked = task.worked_result(problem, reasoning) if reasoning and answer is not None else None
    return {
        "id": problem.id, "kind": kind, "sample": index, "completion": completion.text, "extracted": answer,
        "gold": problem.answer, "score": score, "correct": correct,
        "correct_lenient": None if lenient is None else lenient >= 1.0,
        "correct_format_gated": None if correct is None else correct and form == 1.0, "format": form,
        "length": len(completion.token_ids), "finish_reason": completion.finish_reason, "think_tokens": think_tokens,
        # R1's language consistency: the share of the reasoning's words in the prompt's language.
        "language": language_reward(problem, completion.text, task, language=task.language_of(problem),
                                    think_opened=think_opened),
        "follows_reasoning": None if worked is None else task.score(Problem(problem.id, problem.prompt, worked,
                                                                            problem.meta), answer) == 1.0,
    }


def summarize(records: list[dict[str, Any]], k: int) -> EvalSummary:
    """Aggregate per-sample records: greedy accuracy, pass@1 (mean over k samples), pass@k, cons@k, format, length.

    Problems whose gold answer cannot be verified (score None) are skipped and counted."""
    by_problem: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        by_problem.setdefault(r["id"], {"greedy": [], "sample": []})[r["kind"]].append(r)
    skipped = [pid for pid, g in by_problem.items() if any(r["score"] is None for r in g["greedy"] + g["sample"])]
    kept = {pid: g for pid, g in by_problem.items() if pid not in skipped}
    out = EvalSummary(problems=len(kept), skipped=len(skipped))
    greedy = [g["greedy"][0] for g in kept.values() if g["greedy"]]
    if greedy:
        out.greedy_accuracy = sum(r["correct"] for r in greedy) / len(greedy)
        out.greedy_accuracy_lenient = _share(greedy, "correct_lenient")
        out.greedy_accuracy_format_gated = _share(greedy, "correct_format_gated")
        out.greedy_format_rate = sum(r["format"] for r in greedy) / len(greedy)
        out.greedy_mean_length = sum(r["length"] for r in greedy) / len(greedy)
        out.greedy_think_tokens = _mean(greedy, "think_tokens")
        out.greedy_language = _mean(greedy, "language")
        out.greedy_follows_reasoning = _mean(greedy, "follows_reasoning")
        out.greedy_tool_call_rate, out.greedy_calls, out.greedy_tool_error_rate = _tool_figures(greedy)
    samples = [g["sample"] for g in kept.values() if g["sample"]]
    if samples:
        flat = [r for s in samples for r in s]
        out.k = k
        out.pass_at_1 = sum(sum(r["correct"] for r in s) / len(s) for s in samples) / len(samples)
        out.pass_at_1_lenient = sum(_share(s, "correct_lenient") for s in samples) / len(samples)
        out.pass_at_1_format_gated = sum(_share(s, "correct_format_gated") for s in samples) / len(samples)
        out.pass_at_k = sum(any(r["correct"] for r in s) for s in samples) / len(samples)
        out.cons_at_k = sum(_cons_correct(s) for s in samples) / len(samples)
        out.format_rate = sum(r["format"] for r in flat) / len(flat)
        out.mean_length = sum(r["length"] for r in flat) / len(flat)
        out.truncated_rate = sum(r["finish_reason"] == "length" for r in flat) / len(flat)
        out.think_tokens = _mean(flat, "think_tokens")
        out.language = _mean(flat, "language")
        out.tool_call_rate, out.calls, out.tool_error_rate = _tool_figures(flat)
        # Accuracy against the number of samples j: unbiased pass@j, and cons@j over the first j samples.
        out.curve = {
            "j": list(range(1, k + 1)),
            "pass": [sum(pass_at_k(len(s), sum(r["correct"] for r in s), j) for s in samples) / len(samples)
                     for j in range(1, k + 1)],
            "cons": [sum(_cons_correct(s[:j]) for s in samples) / len(samples) for j in range(1, k + 1)],
        }
    return out


def _share(records: list[dict], key: str) -> float:
    """The share of records whose `key` is true (records written before that key existed count as false)."""
    return sum(bool(r.get(key)) for r in records) / len(records)


def _mean(records: list[dict], key: str) -> float | None:
    """The mean of `key` over the records that have it (older records lack the newer keys)."""
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _tool_figures(records: list[dict]) -> tuple[float | None, float | None, float | None]:
    """Call rate, calls per problem and failed calls per call, over records of rollouts with tools (else Nones)."""
    rows = [r for r in records if r.get("calls") is not None]
    if not rows:
        return None, None, None
    calls = sum(r["calls"] for r in rows)
    return (sum(r["calls"] > 0 for r in rows) / len(rows), calls / len(rows),
            sum(r["tool_errors"] for r in rows) / calls if calls else 0.0)


def _tool_record(task: Task, problem: Problem, kind: str, index: int, turn: MultiTurn, think_opened: bool,
                 grading: str, tokenizer) -> dict[str, Any]:
    """A rollout with tools as a record: its last turn is graded (as an answer when an earlier turn closed the
    thought), its length counts the model's own tokens, and the whole transcript is kept."""
    own = [t for t, o in zip(turn.tokens, turn.own) if o]
    final = Completion(turn.final_text, own, [], turn.finish_reason, len(turn.prompt))
    r = _record(task, problem, kind, index, final, think_opened and not turn.thought_closed_before(), grading,
                tokenizer)
    r.update(transcript=tokenizer.decode(turn.tokens), turns=len(turn.turns), calls=turn.calls,
             tool_errors=turn.tool_errors, malformed=turn.malformed, tool_tokens=turn.tool_tokens)
    return r


def _cons_correct(samples: list[dict]) -> bool:
    vote = majority_vote([r["extracted"] for r in samples])
    return any(r["extracted"] == vote and r["correct"] for r in samples) if vote is not None else False


def evaluate(model, tokenizer, cfg: EvalConfig, out_dir: str | Path | None = None, progress: bool = True,
             engine: Engine | None = None, kv_dtype: torch.dtype | None = None) -> EvalSummary:
    """Run the evaluation; with out_dir write samples.jsonl, summary.json, summary.md and accuracy_vs_k.png.
    kv_dtype: the engine's KV cache dtype (None: the model's)."""
    task = get_task(cfg.task)
    problems = task.problems(cfg.split, cfg.n, seed=cfg.seed)
    make_env = environment_maker(cfg.tools, cfg.environment_factory)
    envs = [make_env(p) for p in problems] if make_env else None
    engine = engine or Engine(model, tokenizer, max_batch=cfg.batch, prefix_cache_mb=64 if envs else 0,
                              prefill_block=RESUME_BLOCK if envs else PREFILL_BLOCK, kv_dtype=kv_dtype)
    prompts = [prompt_ids(task, p, tokenizer, cfg, envs[i] if envs else None) for i, p in enumerate(problems)]
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    runs = []
    if cfg.greedy:
        runs.append(("greedy", SamplingParams(max_tokens=cfg.max_tokens, temperature=0)))
    if cfg.k > 0:
        runs.append(("sample", SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                              top_p=cfg.top_p, n=cfg.k, seed=cfg.seed)))
    total = sum(len(problems) * p.n for _, p in runs)
    bar = tqdm(total=total, desc=f"eval {cfg.task}", unit="seq", disable=not progress)
    if task.output_schema is not None:  # every prompt is rendered alike, so the first says whether it thinks
        for _, params in runs:
            params.constraint = json_answer(task.output_schema, tokenizer, prompts[0][1])
    for kind, params in runs:
        per_batch = max(1, cfg.batch // params.n)
        for s in range(0, len(problems), per_batch):
            chunk = problems[s : s + per_batch]
            if envs is None:
                outs = engine.generate([prompts[s + i][0] for i in range(len(chunk))], params)
                for i, (problem, comps) in enumerate(zip(chunk, outs)):
                    for j, c in enumerate(comps):
                        records.append(_record(task, problem, kind, j, c, prompts[s + i][1], cfg.grading, tokenizer))
            else:
                records += _tool_records(engine, task, chunk, prompts[s : s + len(chunk)], s, kind, params, cfg,
                                         make_env, tokenizer)
            bar.update(len(chunk) * params.n)
            done = [r for r in records if r["kind"] == kind and r["correct"] is not None]
            if done:
                bar.set_postfix(acc=f"{sum(r['correct'] for r in done) / len(done):.3f}")
    bar.close()
    summary = replace(summarize(records, cfg.k), task=cfg.task, seconds=round(time.perf_counter() - start, 1),
                      config=asdict(cfg))
    if out_dir is not None:
        from sputnik.eval.report import write_report

        write_report(Path(out_dir), records, summary)
    return summary


def _tool_records(engine: Engine, task: Task, chunk: list[Problem], prompts: list[tuple[list[int], bool]],
                  start: int, kind: str, params: SamplingParams, cfg: EvalConfig, make_env, tokenizer
                  ) -> list[dict[str, Any]]:
    """n multi-turn rollouts per problem of the chunk, each with a fresh environment, as records."""
    rows = [(i, j) for i in range(len(chunk)) for j in range(params.n)]
    row_envs = [make_env(chunk[i]) for i, _ in rows]
    agent = AgentConfig(max_turns=cfg.max_turns, max_total_tokens=cfg.max_tokens, tool_timeout_s=cfg.tool_timeout)
    turns = tool_rollouts(engine, [prompts[i][0] for i, _ in rows], replace(params, n=1), row_envs, agent,
                          chat=cfg.template == "chat", system=cfg.system,
                          seed_indices=[(start + i) * params.n + j for i, j in rows])
    return [_tool_record(task, chunk[i], kind, j, t, prompts[i][1], cfg.grading, tokenizer)
            for (i, j), t in zip(rows, turns)]


def load_summary(path: str | Path) -> EvalSummary:
    """A summary.json, given the file or the folder holding it."""
    p = Path(path)
    p = p / "summary.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no summary.json at {path}")
    return EvalSummary.from_json(json.loads(p.read_text()))
