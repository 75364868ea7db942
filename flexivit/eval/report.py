"""The files of a sweep: ``eval.json``, ``eval.md`` and ``eval.png`` (accuracy vs GFLOPs and vs latency).

Plots are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas directly, so nothing depends on (or
changes) the global backend and no display is needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from flexivit.model.weights import atomic_write_text
from flexivit.eval.evaluate import format_table

__all__ = ["COSTS", "Series", "pareto_front", "plot_series", "save_plot", "markdown_report", "sweep_stem",
           "write_report"]

COSTS = {"gflops": "GFLOPs per image", "latency_ms": "latency, batch 1 (ms)"}
Point = tuple[float, float, int]  # (cost, top-1 in %, patch size)


@dataclass(frozen=True)
class Series:
    """One model's points on one cost axis, and which of them form its Pareto front."""

    label: str
    cost: str  # a key of COSTS
    points: list[Point]
    front: list[Point]  # by increasing cost
    baseline: bool


def pareto_front(rows: Sequence[dict[str, Any]], cost: str, accuracy: str = "top1") -> list[int]:
    """Patch sizes of the rows that no other row beats (no more cost and no less accuracy, one strictly),
    ordered by increasing cost. Rows without both numbers are left out."""
    pts = [(r[cost], r[accuracy], r["patch_size"]) for r in rows
           if r.get(cost) is not None and r.get(accuracy) is not None]

    def beaten(c: float, a: float) -> bool:
        return any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2, _ in pts)

    return [p for c, a, p in sorted(pts) if not beaten(c, a)]


def _series(label: str, rows: Sequence[dict[str, Any]], cost: str, baseline: bool) -> Series:
    points = [(float(r[cost]), 100 * float(r["top1"]), int(r["patch_size"])) for r in rows
              if r.get(cost) is not None]
    on_front = set(pareto_front(rows, cost))
    return Series(label, cost, points, sorted(p for p in points if p[2] in on_front), baseline)


def plot_series(report: dict[str, Any]) -> list[Series]:
    """What ``save_plot`` draws: per cost axis, the model's series then one per baseline."""
    main = Path(report["checkpoint"]).name or report["checkpoint"]
    series = []
    for cost in COSTS:
        series.append(_series(main, report["results"], cost, baseline=False))
        for b in report.get("baselines", []):
            series.append(_series(b["label"], b["results"], cost, baseline=True))
    return series


_BASELINE_MARKERS = ("s", "^", "D", "v", "P", "X")


def save_plot(report: dict[str, Any], path: str | Path) -> dict[str, list[Any]]:
    """Write the two-panel PNG; returns the scatter artists per cost axis (one collection per series)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = dict(zip(COSTS, fig.subplots(1, len(COSTS))))
    artists: dict[str, list[Any]] = {cost: [] for cost in COSTS}
    styles = {b["label"]: (_BASELINE_MARKERS[i % len(_BASELINE_MARKERS)], f"C{1 + i % 9}")
              for i, b in enumerate(report.get("baselines", []))}
    for s in plot_series(report):
        ax = axes[s.cost]
        if not s.points:
            continue
        xs, ys, ps = zip(*s.points)
        if s.baseline:
            marker, color = styles[s.label]
            artists[s.cost].append(ax.scatter(xs, ys, marker=marker, color=color, s=50, label=s.label, zorder=3))
        else:
            artists[s.cost].append(ax.scatter(xs, ys, s=40, color="C0", label=f"{s.label} (one point per patch size)",
                                              zorder=3))
            fx, fy, _ = zip(*s.front)
            ax.plot(fx, fy, "-", color="C0", alpha=0.5, zorder=2)
            ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="C3", linewidths=1.5, label="Pareto front",
                       zorder=4)
        for x, y, p in s.points:
            ax.annotate(f"p{p}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for cost, ax in axes.items():
        _style_axis(ax, COSTS[cost])
    fig.suptitle(f"{report['checkpoint']} on {report['data']} ({report.get('device_name', report.get('device'))})",
                 fontsize=10)
    fig.savefig(str(path), dpi=110)
    return artists


def _style_axis(ax: Any, xlabel: str) -> None:
    """Log cost axis in plain numbers: decades, plus 2x and 5x ticks when it spans under two decades."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)  # room for the patch-size labels
    low, high = ax.get_xlim()
    narrow = high / low < 100

    def minor(value: float, _: int) -> str:
        mantissa = value / 10 ** math.floor(math.log10(value))
        return f"{value:g}" if narrow and min(abs(mantissa - 2), abs(mantissa - 5)) < 1e-6 else ""

    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def markdown_report(report: dict[str, Any]) -> str:
    """``eval.md``: the settings, the results table and one table per baseline."""
    lines = [
        f"# {report['checkpoint']} on {report['data']} ({report['split']} split, {report['n']} images)",
        "",
        f"Measured on {report.get('device_name')} ({report['device']}, {report.get('torch_threads')} torch "
        f"threads, torch {report.get('torch')}): img/s at batch {report['batch_size']}, latency = median of "
        f"{report['repeats']} batch-1 calls after {report['warmup']} warm-up calls, peak memory = "
        f"{report['peak_mem_kind']} at batch {report['batch_size']}.",
        "",
        format_table(report["results"]),
    ]
    for cost in COSTS:
        front = pareto_front(report["results"], cost)
        lines.append(f"\nPareto front (top-1 vs {COSTS[cost]}): patch sizes {', '.join(map(str, front))}")
    for b in report.get("baselines", []):
        lines += ["", f"## Baseline {b['label']}", "", format_table(b["results"])]
    if "choice" in report:
        lines += ["", f"Choice: {report['choice']['reason']}"]
    return "\n".join(lines) + "\n"


def sweep_stem(out_dir: str | Path) -> str:
    """``eval``, or ``eval_sweep`` where ``out_dir/eval.json`` is a training's record (it holds ``images_seen``,
    which the study tools read) or is not a report at all: a sweep never replaces either."""
    file = Path(out_dir) / "eval.json"
    if not file.exists():
        return "eval"
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError):
        return "eval_sweep"
    return "eval_sweep" if not isinstance(saved, dict) or "images_seen" in saved else "eval"


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``eval.json`` (the report plus its Pareto fronts), ``eval.md`` and ``eval.png``; named
    ``eval_sweep.*`` instead beside a training's ``eval.json`` (``sweep_stem``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "pareto": {cost: pareto_front(report["results"], cost) for cost in COSTS}}
    stem = sweep_stem(out)
    files = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    atomic_write_text(files["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(files["md"], markdown_report(report))
    save_plot(report, files["png"])
    return files
