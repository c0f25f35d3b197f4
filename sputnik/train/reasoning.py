"""A reasoning recipe end to end, reported as the R1 paper reports it: does the thinking pay?

    optional cold start (R1): SFT on programmatic traces of the GRPO task (tasks.traces)
    GRPO with thinking (format + accuracy, strict grading), held-out accuracy and thinking length against the step
    the same checkpoint with its thinking closed in the prompt (accuracy_closed)
    the control: GRPO of the same start, recipe and budget, trained to answer directly (accuracy_direct); after a
    cold start, from its twin: SFT on the same problems answered directly
    Korean held-out problems: accuracy and language consistency of the reasoning

`sputnik recipe --config recipes/r1-zero.yaml` runs it; the figures go to OUT_DIR/reasoning.json and are merged
into docs/reasoning.json under the recipe's name (see `figure` for the fields).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sputnik.settings import option

FIELDS = ("format_rate", "accuracy_think", "accuracy_direct", "accuracy_closed", "accuracy_start",
          "think_tokens_start", "think_tokens_end", "language_consistency_ko", "accuracy_ko", "accuracy_en", "minutes",
          "eval_problems", "command", "machine", "date")


@dataclass
class RecipeConfig:
    """What a recipe runs beside its GRPO settings (which the same YAML gives) and where its figures go."""

    recipe: str = option("r1-zero", "the recipe's name in the report")
    cold_start: int = option(0, "programmatic traces of the task's train split for SFT before GRPO (R1's cold start; "
                                "0: straight to GRPO, R1-Zero)")
    cold_start_task: str | None = option(None, "the task whose train split the cold-start traces solve (default: the "
                                               "GRPO task); R1's cold start and its RL prompts need not be the same")
    sft_steps: int = option(40, "cold-start SFT steps")
    sft_lr: float = option(5e-5, "cold-start SFT learning rate")
    sft_batch_size: int = option(16, "cold-start SFT conversations per step")
    direct: bool = option(True, "also run the direct-answer control: the same start and budget, thinking closed "
                                "(after a cold start, from SFT on the same problems answered directly)")
    direct_max_tokens: int = option(24, "tokens a direct answer may take, in the control's GRPO and in the thinking "
                                        "model's thinking-closed eval: room for the answer, not for a worked "
                                        "solution (a cold-started model otherwise writes its trace after the "
                                        "closed thought, and the control would think)")
    korean_task: str | None = option(None, "Korean held-out problems for accuracy_ko and language consistency")
    english_task: str | None = option(None, "English held-out problems of korean_task's kind (digits, operations) "
                                            "for accuracy_en, which accuracy_ko is held to")
    report: str | None = option(None, "a JSON file whose RECIPE entry gets the figures, e.g. docs/reasoning.json "
                                      "(always: OUT_DIR/reasoning.json)")


def write_traces(task_spec: str, n: int, path: Path, seed: int = 0, direct: bool = False) -> Path:
    """Chat rows of `n` train-split problems with their worked solution as the reasoning (cold-start SFT data), or,
    `direct`, the same problems answered after an empty thought, as the direct-answer control's prompts close it."""
    from sputnik.r1 import direct_reply
    from sputnik.tasks import get_task

    task = get_task(task_spec)
    rows = []
    for p in task.problems("train", n, seed=seed):
        reasoning, answer = task.trace(p)
        prompt = task.render(p, "chat")[-1]["content"]
        reply = ({"content": direct_reply(answer)} if direct
                 else {"content": answer, "reasoning_content": reasoning})
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", **reply}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


TOOL_ANSWERS = {"en": "{expression} = {result}. The answer is \\boxed{{{result}}}.",
                "ko": "{expression} = {result}이므로 답은 \\boxed{{{result}}}입니다."}


def write_tool_traces(grpo, n: int, path: Path, tokenizer, seed: int = 0) -> Path:
    """Chat rows of `n` train-split problems solved by one real tool call (the task's `tool_call`, run by the
    configured environment) and an answer from its result, in the form multi-turn rollouts see: the tools offered
    in the prompt, the call in the model's tool-call format, the result as the template writes tool messages."""
    from sputnik.tasks import get_task
    from sputnik.tools.env import environment_maker
    from sputnik.tools.render import plan_of, template_messages

    task = get_task(grpo.task)
    make_env = environment_maker(grpo.tools, grpo.environment_factory)
    rows = []
    for p in task.problems("train", n, seed=seed):
        env, call = make_env(p), task.tool_call(p)
        plan = plan_of(env.specs(), tokenizer)
        if plan.native:
            raise ValueError("cold-start tool traces are written for templates without native tools (the Hermes "
                             "fallback); this model's template renders tools itself")
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        result = env.call({"function": {"name": call["name"], "arguments": arguments}})
        if result.error:
            raise ValueError(f"the tool call for {p.id} failed: {result.content}")
        answer = TOOL_ANSWERS[task.language].format(expression=call["arguments"].get("expression", ""),
                                                    result=result.content)
        messages = [*task.render(p, "chat", None, grpo.system, grpo.suffix),
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call_0", "type": "function", "function": {"name": call["name"],
                                                                          "arguments": arguments}}]},
                    {"role": "tool", "tool_call_id": "call_0", "content": result.content},
                    {"role": "assistant", "content": answer}]
        rows.append({"messages": template_messages(messages, plan)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def cold_start(model: str, recipe: RecipeConfig, grpo, out: Path, seed: int, direct: bool = False) -> str:
    """SFT of `model` on programmatic traces (of tool use when the GRPO config has tools; of direct answers for the
    direct-answer control, in sft-direct/); returns the checkpoint GRPO starts from."""
    from sputnik.checkpoint import load_pretrained
    from sputnik.train.loop import TrainConfig
    from sputnik.train.sft import SFTConfig, train_sft

    folder = out / ("sft-direct" if direct else "sft")
    ckpt = folder / "checkpoints" / f"step_{recipe.sft_steps:06d}"
    task = recipe.cold_start_task or grpo.task
    key = {"model": model, "task": task, "tools": [str(t) for t in grpo.tools],
           "environment_factory": str(grpo.environment_factory), "system": grpo.system, "suffix": grpo.suffix,
           "seed": seed, **{k: getattr(recipe, k) for k in ("cold_start", "sft_steps", "sft_lr", "sft_batch_size")},
           **({"direct": True} if direct else {})}
    if ckpt.is_dir() and _done(folder, key):
        print(f"cold start: reusing {ckpt} (same settings)", flush=True)
        return str(ckpt)
    net, tok = load_pretrained(model)
    if grpo.tools or grpo.environment_factory:
        data = write_tool_traces(replace(grpo, task=task), recipe.cold_start, out / "traces.jsonl", tok, seed)
    else:
        data = write_traces(task, recipe.cold_start, folder / "traces.jsonl" if direct else out / "traces.jsonl",
                            seed, direct)
    train_sft(net, tok, SFTConfig(data=str(data), seq_len=512, batch_size=recipe.sft_batch_size,
                                   micro_batch=min(8, recipe.sft_batch_size), seed=seed),
              TrainConfig(out_dir=str(folder), max_steps=recipe.sft_steps, lr=recipe.sft_lr, warmup_steps=3,
                          seed=seed, plot_every=10))
    _mark_done(folder, key)
    return str(ckpt)


def _sft_minutes(folder: Path) -> float:
    """The minutes a cold start's SFT steps took (0 where there was none)."""
    from sputnik.train.plots import read_rows

    return sum(r.get("seconds", 0.0) for r in read_rows(folder / "metrics.jsonl")) / 60


def _done(folder: Path, key: dict[str, Any]) -> bool:
    """Whether a stage finished in `folder` with exactly these settings (a rerun of the recipe skips it)."""
    mark = folder / "stage.json"
    return mark.is_file() and json.loads(mark.read_text()) == json.loads(json.dumps(key, default=str))


def _mark_done(folder: Path, key: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage.json").write_text(json.dumps(key, default=str, indent=1) + "\n")


def held_out(model: str, grpo, task: str, think: str, out: Path) -> dict[str, Any]:
    """Greedy figures of a checkpoint on held-out problems, as GRPO's own evaluation takes them (read back from
    `out` when the same model was evaluated there with the same settings)."""
    from dataclasses import asdict

    from sputnik.checkpoint import load_pretrained
    from sputnik.eval.run import EvalConfig, evaluate, load_summary

    cfg = EvalConfig(task=task, n=grpo.eval_n, k=0, template=grpo.template, system=grpo.system, suffix=grpo.suffix,
                     max_tokens=grpo.max_completion_length, think=think, grading=grpo.grading,
                     tools=list(grpo.tools), environment_factory=grpo.environment_factory, max_turns=grpo.max_turns,
                     tool_timeout=grpo.tool_timeout)
    key = {"model": model, "config": asdict(cfg)}
    if _done(out, key):
        print(f"held-out eval: reusing {out} (same model and settings)", flush=True)
        return load_summary(out).to_json()
    net, tok = load_pretrained(model)
    figures = evaluate(net, tok, cfg, out_dir=out, progress=False).to_json()
    _mark_done(out, key)
    return figures


def figure(start: dict, end: dict, closed: dict | None, direct: dict | None, korean: dict | None, minutes: float,
           eval_problems: int, english: dict | None = None) -> dict[str, Any]:
    """The report's entry for one recipe (None where a figure does not apply)."""
    from sputnik.machine import describe

    m = describe()
    return {
        "format_rate": end.get("format_rate"), "accuracy_think": end.get("accuracy"),
        "accuracy_direct": direct.get("accuracy") if direct else None,
        "accuracy_closed": closed.get("greedy_accuracy") if closed else None,
        "accuracy_start": start.get("accuracy"), "think_tokens_start": start.get("think_tokens"),
        "think_tokens_end": end.get("think_tokens"),
        "language_consistency_ko": korean.get("greedy_language") if korean else None,
        "accuracy_ko": korean.get("greedy_accuracy") if korean else None,
        "accuracy_en": english.get("greedy_accuracy") if english else None,
        "minutes": round(minutes, 1), "eval_problems": eval_problems,
        "command": "sputnik " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None,
        "machine": f"{m['cpu']} ({' '.join(m['flags'])}), {m['cpus']} cpus", "date": m["date"],
    }


def merge_report(path: Path, recipe: str, entry: dict[str, Any]) -> None:
    """Put `entry` under `recipe` in the JSON report at `path`, keeping the other recipes' entries."""
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[recipe] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def run_recipe(model: str, recipe: RecipeConfig, grpo, train) -> dict[str, Any]:
    """Every run of the recipe in train.out_dir (think/, direct/, eval-*); returns its report entry."""
    from sputnik.train.grpo import train_grpo

    if grpo.tools or grpo.environment_factory:
        return run_tools_recipe(model, recipe, grpo, train)
    out = Path(train.out_dir)
    start = cold_start(model, recipe, grpo, out, train.seed) if recipe.cold_start else model
    think_train = replace(train, out_dir=str(out / "think"))
    think = train_grpo(start, grpo, think_train)
    final = str(out / "think" / "checkpoints" / f"step_{train.max_steps:06d}")
    answer_only = replace(grpo, max_completion_length=min(grpo.max_completion_length, recipe.direct_max_tokens))
    closed = held_out(final, answer_only, grpo.task, "closed", out / "eval-closed")
    direct = direct_run = None
    if recipe.direct:
        plain = replace(answer_only, think="closed", rewards={"accuracy": 1.0})
        # R1's cold start has its direct-answer twin: the same problems and SFT budget, answered without a thought
        # (from the traces' checkpoint the control writes a worked solution into 24 tokens and never scores).
        plain_start = cold_start(model, recipe, grpo, out, train.seed, direct=True) if recipe.cold_start else start
        direct_run = train_grpo(plain_start, plain, replace(train, out_dir=str(out / "direct")))
        direct = direct_run.after
    korean = held_out(final, grpo, recipe.korean_task, grpo.think, out / "eval-ko") if recipe.korean_task else None
    english = held_out(final, grpo, recipe.english_task, grpo.think, out / "eval-en") if recipe.english_task else None
    # What the recipe costs from nothing, stage by stage: a rerun that reuses finished stages still reports them.
    minutes = (sum(_sft_minutes(out / d) for d in ("sft", "sft-direct")) + think.minutes +
               (direct_run.minutes if direct_run else 0) +
               sum(f.get("seconds", 0) / 60 for f in (closed, korean, english) if f))
    entry = figure(think.before, think.after, closed, direct, korean, minutes, grpo.eval_n, english)
    (out / "reasoning.json").write_text(json.dumps({recipe.recipe: entry}, indent=2, ensure_ascii=False) + "\n")
    if recipe.report:
        merge_report(Path(recipe.report), recipe.recipe, entry)
    print(f"[{recipe.recipe}] held-out accuracy {entry['accuracy_start']} -> {entry['accuracy_think']} thinking, "
          f"{entry['accuracy_closed']} thinking closed, {entry['accuracy_direct']} trained to answer directly; "
          f"format {entry['format_rate']}; Korean {entry['accuracy_ko']}, English {entry['accuracy_en']}; "
          f"{out}/reasoning.json", flush=True)
    return entry


def run_tools_recipe(model: str, recipe: RecipeConfig, grpo, train) -> dict[str, Any]:
    """Agentic GRPO reported as docs/agentic.json holds it: tool-call rate and held-out accuracy of the start model,
    after the cold start (if any) and after GRPO with tools, beside the start model thinking without tools."""
    from sputnik.machine import describe
    from sputnik.train.grpo import train_grpo

    t0 = time.perf_counter()
    out = Path(train.out_dir)
    base = held_out(model, grpo, grpo.task, grpo.think, out / "eval-start")
    thinking = held_out(model, replace(grpo, tools=[], environment_factory=None, grading="strict"), grpo.task, "open",
                        out / "eval-thinking-only")
    start = cold_start(model, recipe, grpo, out, train.seed) if recipe.cold_start else model
    run = train_grpo(start, grpo, replace(train, out_dir=str(out / "tools")))
    m = describe()
    entry = {
        "tool_call_rate_start": base.get("greedy_tool_call_rate"), "tool_call_rate_end": run.after.get("tool_call_rate"),
        "accuracy_start": base.get("greedy_accuracy"), "accuracy_end": run.after.get("accuracy"),
        "accuracy_thinking_only": thinking.get("greedy_accuracy"),
        "tool_call_rate_cold_start": run.before.get("tool_call_rate") if recipe.cold_start else None,
        "accuracy_cold_start": run.before.get("accuracy") if recipe.cold_start else None,
        "tool_error_rate_end": run.after.get("tool_error_rate"), "calls_end": run.after.get("calls"),
        "minutes": round((time.perf_counter() - t0) / 60, 1), "eval_problems": grpo.eval_n,
        "command": "sputnik " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None,
        "machine": f"{m['cpu']} ({' '.join(m['flags'])}), {m['cpus']} cpus", "date": m["date"],
    }
    (out / "agentic.json").write_text(json.dumps(entry, indent=2, ensure_ascii=False) + "\n")
    if recipe.report:
        Path(recipe.report).parent.mkdir(parents=True, exist_ok=True)
        Path(recipe.report).write_text(json.dumps(entry, indent=2, ensure_ascii=False) + "\n")
    print(f"[{recipe.recipe}] tool-call rate {entry['tool_call_rate_start']} -> {entry['tool_call_rate_end']}, "
          f"held-out accuracy {entry['accuracy_start']} -> {entry['accuracy_end']} (thinking only: "
          f"{entry['accuracy_thinking_only']}); {out}/agentic.json", flush=True)
    return entry


def nano_entry(summary) -> dict[str, Any]:
    """The report's entry for a nano-r1 run (NanoR1Summary): greedy held-out accuracy, as the recipes report it."""
    def greedy(figures: dict) -> dict[str, Any]:
        return {"accuracy": figures.get("greedy_accuracy"), "think_tokens": figures.get("greedy_think_tokens"),
                "format_rate": figures.get("greedy_format_rate")}

    closed = {"greedy_accuracy": summary.closed.get("greedy_accuracy")} if summary.closed else None
    direct = greedy(summary.direct) if summary.direct else None
    return figure(greedy(summary.sft), greedy(summary.grpo), closed, direct, None, summary.minutes,
                  summary.config["eval_n"])
