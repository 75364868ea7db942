"""Accuracy vs patch size of finished runs side by side: a Markdown table, JSON and a plot.

    python tools/compare_runs.py runs/fashion_mnist runs/fashion_mnist_distill \\
        --labels label-only distilled --out docs/results/distillation --title "..."

Reads each run's eval.json (written at the end of `flexivit train`/`finetune`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_curves(runs: list[Path], labels: list[str]) -> dict[str, dict[int, float]]:
    curves = {}
    for run, label in zip(runs, labels):
        report = json.loads((run / "eval.json").read_text())
        curves[label] = {r["patch_size"]: 100 * r["top1"] for r in report["results"]}
    return curves


def write(curves: dict[str, dict[int, float]], out: Path, title: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes = sorted({p for c in curves.values() for p in c})
    out.with_suffix(".json").write_text(json.dumps({"patch_sizes": sizes, "top1": curves}, indent=2) + "\n")
    lines = [f"| run | {' | '.join(f'p={p}' for p in sizes)} |", "|---|" + "---:|" * len(sizes)]
    for label, c in curves.items():
        lines.append(f"| {label} | " + " | ".join(f"{c[p]:.1f}" if p in c else "–" for p in sizes) + " |")
    out.with_suffix(".md").write_text(f"# {title}\n\n" + "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        ps = sorted(c)
        ax.plot(ps, [c[p] for p in ps], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(p) for p in sizes])
    ax.set_xlabel("patch size")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+", help="one per run (default: the folder names)")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix; .md/.json/.png are written")
    parser.add_argument("--title", default="top-1 vs patch size")
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    write(load_curves(args.runs, labels), args.out, args.title)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
