"""A reasoning recipe end to end, reported as the R1 paper reports it: does the thinking pay?

    optional cold start (R1): SFT on programmatic traces of the GRPO task (tasks.traces)
    GRPO with thinking (format + accuracy, strict grading), held-out accuracy and thinking length against the step
    the same checkpoint with its thinking closed in the prompt (accuracy_closed)
    the control: GRPO of the same start, recipe and budget, trained to answer directly (accuracy_direct)
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
          "think_tokens_start", "think_tokens_end", "language_consistency_ko", "accuracy_ko", "minutes",
          "eval_problems", "command", "machine", "date")


@dataclass
class RecipeConfig:
    """What a recipe runs beside its GRPO settings (which the same YAML gives) and where its figures go."""

    recipe: str = option("r1-zero", "the recipe's name in the report")
    cold_start: int = option(0, "programmatic traces of the task's train split for SFT before GRPO (R1's cold start; "
                                "0: straight to GRPO, R1-Zero)")
    sft_steps: int = option(40, "cold-start SFT steps")
    sft_lr: float = option(5e-5, "cold-start SFT learning rate")
    direct: bool = option(True, "also run the direct-answer control: the same start and budget, thinking closed")
    korean_task: str | None = option(None, "Korean held-out problems for accuracy_ko and language consistency")
    report: str | None = option(None, "a JSON file whose RECIPE entry gets the figures, e.g. docs/reasoning.json "
                                      "(always: OUT_DIR/reasoning.json)")


def write_traces(task_spec: str, n: int, path: Path, seed: int = 0) -> Path:
    """Chat rows of `n` train-split problems with their worked solution as the reasoning (cold-start SFT data)."""
    from sputnik.tasks import get_task

    task = get_task(task_spec)
    rows = []
    for p in task.problems("train", n, seed=seed):
        reasoning, answer = task.trace(p)
        prompt = task.render(p, "chat")[-1]["content"]
        rows.append({"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": answer, "reasoning_content": reasoning}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def cold_start(model: str, recipe: RecipeConfig, task_spec: str, out: Path, seed: int) -> str:
    """SFT of `model` on programmatic traces; returns the checkpoint GRPO starts from."""
    from sputnik.checkpoint import load_pretrained
    from sputnik.train.loop import TrainConfig
    from sputnik.train.sft import SFTConfig, train_sft

    data = write_traces(task_spec, recipe.cold_start, out / "traces.jsonl", seed)
    net, tok = load_pretrained(model)
    train_sft(net, tok, SFTConfig(data=str(data), seq_len=512, batch_size=16, micro_batch=8, seed=seed),
              TrainConfig(out_dir=str(out / "sft"), max_steps=recipe.sft_steps, lr=recipe.sft_lr, warmup_steps=3,
                          seed=seed, plot_every=10))
    return str(out / "sft" / "checkpoints" / f"step_{recipe.sft_steps:06d}")


def held_out(model: str, grpo, task: str, think: str, out: Path) -> dict[str, Any]:
    """Greedy figures of a checkpoint on held-out problems, as GRPO's own evaluation takes them."""
    from sputnik.checkpoint import load_pretrained
    from sputnik.eval.run import EvalConfig, evaluate

    net, tok = load_pretrained(model)
    cfg = EvalConfig(task=task, n=grpo.eval_n, k=0, template=grpo.template, system=grpo.system, suffix=grpo.suffix,
                     max_tokens=grpo.max_completion_length, think=think, grading=grpo.grading)
    return evaluate(net, tok, cfg, out_dir=out, progress=False).to_json()


def figure(start: dict, end: dict, closed: dict | None, direct: dict | None, korean: dict | None, minutes: float,
           eval_problems: int) -> dict[str, Any]:
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

    t0 = time.perf_counter()
    out = Path(train.out_dir)
    start = cold_start(model, recipe, grpo.task, out, train.seed) if recipe.cold_start else model
    think_train = replace(train, out_dir=str(out / "think"))
    think = train_grpo(start, grpo, think_train)
    final = str(out / "think" / "checkpoints" / f"step_{train.max_steps:06d}")
    closed = held_out(final, grpo, grpo.task, "closed", out / "eval-closed")
    direct = None
    if recipe.direct:
        plain = replace(grpo, think="closed", rewards={"accuracy": 1.0})
        direct = train_grpo(start, plain, replace(train, out_dir=str(out / "direct"))).after
    korean = held_out(final, grpo, recipe.korean_task, grpo.think, out / "eval-ko") if recipe.korean_task else None
    entry = figure(think.before, think.after, closed, direct, korean, (time.perf_counter() - t0) / 60, grpo.eval_n)
    (out / "reasoning.json").write_text(json.dumps({recipe.recipe: entry}, indent=2, ensure_ascii=False) + "\n")
    if recipe.report:
        merge_report(Path(recipe.report), recipe.recipe, entry)
    print(f"[{recipe.recipe}] held-out accuracy {entry['accuracy_start']} -> {entry['accuracy_think']} thinking, "
          f"{entry['accuracy_closed']} thinking closed, {entry['accuracy_direct']} trained to answer directly; "
          f"format {entry['format_rate']}; {out}/reasoning.json", flush=True)
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
