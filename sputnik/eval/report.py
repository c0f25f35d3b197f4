"""Evaluation reports: per-sample JSONL, summary.json, a Markdown table, a PNG of accuracy against k."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sputnik.eval.run import EvalSummary

METRICS = [("greedy_accuracy", "greedy accuracy"), ("greedy_accuracy_format_gated", "greedy, format-gated"),
           ("greedy_accuracy_lenient", "greedy, lenient"), ("pass@1", "pass@1"),
           ("pass@1_format_gated", "pass@1, format-gated"), ("pass@1_lenient", "pass@1, lenient"),
           ("pass@k", "pass@k"), ("cons@k", "cons@k"),
           ("format_rate", "format rate"), ("mean_length", "mean length (tokens)"),
           ("truncated_rate", "truncated"), ("problems", "problems"), ("skipped", "skipped")]


def _value(summary: dict[str, Any], key: str) -> Any:
    k = summary.get("k")
    return summary.get(key.replace("@k", f"@{k}") if "@k" in key and k else key)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if v <= 1 else f"{v:.1f}"
    return str(v)


def markdown_table(runs: dict[str, EvalSummary]) -> str:
    """One column per run, one row per metric."""
    names = list(runs)
    summaries = {name: s.to_json() for name, s in runs.items()}
    k = next((s.get("k") for s in summaries.values() if s.get("k")), None)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in METRICS:
        if not any(_value(s, key) is not None for s in summaries.values()):
            continue
        label = label.replace("@k", f"@{k}") if k else label
        lines.append(f"| {label} | " + " | ".join(_fmt(_value(s, key)) for s in summaries.values()) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(summary: EvalSummary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary.curve
    if not curve:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve["j"], curve["pass"], marker="o", label="pass@k")
    ax.plot(curve["j"], curve["cons"], marker="s", label="cons@k")
    if summary.greedy_accuracy is not None:
        ax.axhline(summary.greedy_accuracy, color="gray", ls="--", label="greedy")
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{summary.task}: accuracy against k")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, records: list[dict[str, Any]], summary: EvalSummary) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2, ensure_ascii=False) + "\n")
    (out / "summary.md").write_text(f"# {summary.task or 'eval'}\n\n" + markdown_table({"model": summary}))
    plot_curve(summary, out / "accuracy_vs_k.png")
