"""Studies of a few arms over seeds, one run folder ``ARM/seedS`` each: the command line and the tables the
study tools share (``tools/per_image_study.py``, ``tools/patch14_study.py``, ``tools/distill_base_study.py``).
The arms' values come from ``flexivit.experiments.results.arms_over_seeds``."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "mean_std", "split_tables", "study_args"]

Rows = list[dict[str, Any]]  # one arm's per-seed values, in seed order
Column = Callable[[Rows, str], str]  # (rows, split) -> a table cell


def mean_std(values: Sequence[float]) -> str:
    """``"mean ± std"`` over seeds, two decimals (std 0 for one seed)."""
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


COLUMNS: dict[str, Column] = {  # the usual columns after the sizes, by heading
    "steps": lambda rows, split: f"{statistics.mean(r['steps'] for r in rows):.0f}",
    "images": lambda rows, split: f"{statistics.mean(r['images_seen'] for r in rows):,.0f}",
    "train min": lambda rows, split: f"{statistics.mean(r['train_seconds'] for r in rows) / 60:.1f}",
}


def split_tables(arms: Mapping[str, Mapping[str, dict[str, Any]]], seeds: Sequence[int], *,
                 columns: Mapping[str, Column] | None = None) -> list[str]:
    """Markdown lines: a validation and a test table with, per arm, the worst size and every size (mean ± std of
    top-1 % over ``seeds``), then ``columns`` (heading -> cell). An arm without values for a split is left out."""
    columns = columns or {}
    first = next(iter(next(iter(arms.values())).values()))
    sizes = sorted(first["val"], key=int)
    lines: list[str] = []
    for split in ("val", "test"):
        lines += [f"## {'Validation' if split == 'val' else 'Test'}", "",
                  "| arm | worst size | " + " | ".join([*(f"p={p}" for p in sizes), *columns]) + " |",
                  "|---|---:|" + "---:|" * (len(sizes) + len(columns))]
        for arm, per_seed in arms.items():
            rows = [per_seed[str(s)] for s in seeds]
            if not rows[0][split]:
                continue
            cells = [mean_std([min(r[split].values()) for r in rows]),
                     *(mean_std([r[split][p] for r in rows]) for p in sizes),
                     *(cell(rows, split) for cell in columns.values())]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def study_args(doc: str, default_out: Path) -> argparse.Namespace:
    """``--seeds 0,1,2 --jobs 2 --out DIR --report-only``, with ``seeds`` parsed into a list of ints."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--report-only", action="store_true", help="aggregate finished runs, train nothing")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args
