"""Training curves: metrics.jsonl to one PNG, a grid of small line plots with a moving average."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Panels people look at first come first; any other key follows in the order it first appears.
PRIORITY = ("reward", "acc", "eval/", "len", "kl", "clip", "entropy", "loss", "grad_norm", "lr")


def read_rows(jsonl_path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, one dict per logged step ([] when the file is missing); blank lines and a last
    line cut short by a kill are skipped."""
    path = Path(jsonl_path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics(jsonl_path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """{key: (steps, values)} of every numeric metric (a key may be missing from some rows, e.g. eval/)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in read_rows(jsonl_path):
        step = row.get("step")
        for k, v in row.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(step)
            ys.append(float(v))
    return series


def moving_average(ys: list[float], window: int) -> list[float]:
    """Centred mean over `window` points (narrower at the ends), so the smoothed curve does not lag the raw one."""
    csum = [0.0]
    for y in ys:
        csum.append(csum[-1] + y)
    half = window // 2
    out = []
    for i in range(len(ys)):
        lo, hi = max(0, i - half), min(len(ys), i + half + 1)
        out.append((csum[hi] - csum[lo]) / (hi - lo))
    return out


def _order(keys: list[str]) -> list[str]:
    def rank(k: str) -> int:
        return next((i for i, p in enumerate(PRIORITY) if p in k), len(PRIORITY))

    return sorted(keys, key=rank)  # stable: ties keep first-appearance order


def plot_metrics(jsonl_path: str | Path, out_png: str | Path, keys: list[str] | None = None, cols: int = 4) -> Path:
    """Draw every metric (or `keys`) of a metrics.jsonl into a grid of panels, raw and smoothed; returns out_png."""
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend, nothing leaks across redraws.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = read_metrics(jsonl_path)
    names = [k for k in keys if k in series] if keys is not None else _order(list(series))
    cols = max(1, min(cols, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    width, height = 3.2 * cols, 2.2 * rows
    fig = Figure(figsize=(width, height), dpi=80)
    # Fixed margins in inches: a constrained layout would double the drawing time.
    fig.subplots_adjust(left=0.55 / width, right=1 - 0.15 / width, bottom=0.3 / height, top=1 - 0.3 / height,
                        wspace=0.3, hspace=0.5)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs, ys = series[name]
        is_lr = name == "lr" or name.endswith("/lr")
        window = 1 if is_lr else max(1, min(50, len(ys) // 10))  # the schedule is exact: nothing to smooth
        ax.plot(xs, ys, lw=0.8, alpha=0.35 if window > 1 else 1.0, color="tab:blue",
                marker="o" if len(ys) <= 30 else None, ms=2.5)  # sparse series (eval/) show their points
        if window > 1:
            ax.plot(xs, moving_average(ys, window), lw=1.4, color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        lo, hi = min(ys), max(ys)
        if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # flat: do not let rounding noise of the average set the scale
            pad = 0.05 * abs(hi) or 1.0
            ax.set_ylim(lo - pad, hi + pad)
        if is_lr:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # a flat series reads 1.2, not 1e-12+1.2
    if not names:
        fig.text(0.5, 0.5, "no metrics yet", ha="center", va="center")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(out_png)  # a viewer never sees a half-written PNG
    return out_png
