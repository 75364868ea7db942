"""Accuracy vs patch size of finished runs side by side: a Markdown table, JSON and a plot.

    python tools/compare_runs.py runs/fashion_mnist runs/fashion_mnist_distill \\
        --labels label-only distilled --out docs/results/distillation --title "..."
    python tools/compare_runs.py runs/qs-seed0 runs/qs-seed1 runs/qs-seed2 --labels default default default \\
        --out docs/results/quickstart_seeds --title "..."     # one label thrice: mean ± std over the seeds

Reads each run's eval.json (written at the end of `flexivit train`/`finetune`). Runs that share a label are
seeds of one setting: their row is the mean ± sample std over them, of the scored split (test) and, where
every run has one, of the validation split, with the mean images seen and training minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

from flexivit.experiments.results import RunResults, read_results, summarise

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_groups(runs: list[Path], labels: list[str]) -> dict[str, list[RunResults]]:
    """The results of ``runs`` grouped by label, in first-seen label order."""
    groups: dict[str, list[RunResults]] = {}
    for run, label in zip(runs, labels):
        groups.setdefault(label, []).append(read_results(run))
    return groups


def _cell(s: dict[str, dict[int, float]], p: int, seeds: int) -> str:
    if p not in s["mean"]:
        return "–"
    return f"{s['mean'][p]:.1f}" if seeds == 1 else f"{s['mean'][p]:.2f} ± {s['std'][p]:.2f}"


def _table(summaries: dict[str, dict[str, dict[int, float]] | None], runs: dict[str, int],
           sizes: list[int]) -> list[str]:
    """One row per label with a summary; ``runs`` is each label's run count."""
    lines = [f"| run | {' | '.join(f'p={p}' for p in sizes)} |", "|---|" + "---:|" * len(sizes)]
    for label, s in summaries.items():
        if s is not None:
            seeds = f" ({runs[label]} runs)" if runs[label] > 1 else ""
            lines.append(f"| {label}{seeds} | " + " | ".join(_cell(s, p, runs[label]) for p in sizes) + " |")
    return lines


def write(groups: dict[str, list[RunResults]], out: Path, title: str, note: str | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tests = {label: summarise(reports, "scored") for label, reports in groups.items()}
    sizes = sorted({p for s in tests.values() for p in s["mean"]})
    record: dict[str, Any] = {"patch_sizes": sizes, "top1": {k: s["mean"] for k, s in tests.items()},
                              "std": {k: s["std"] for k, s in tests.items()},
                              "runs": {k: len(v) for k, v in groups.items()}}
    vals = {label: summarise(reports, "val") for label, reports in groups.items()}
    record["val_top1"] = {k: s["mean"] for k, s in vals.items() if s}
    record["val_std"] = {k: s["std"] for k, s in vals.items() if s}
    record["images_seen"] = {k: statistics.mean(r.images_seen or 0 for r in v) for k, v in groups.items()}
    record["train_minutes"] = {k: statistics.mean(r.train_seconds or 0 for r in v) / 60 for k, v in groups.items()}
    if note:
        record["note"] = note
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    split = next(iter(groups.values()))[0].split
    md = [f"# {title}", "", *([note, ""] if note else []),
          f"Top-1 (%) on the {split} split; runs sharing a label: mean ± sample std.", "",
          *_table(tests, record["runs"], sizes)]
    if record["val_top1"]:
        md += ["", "Validation split (what settings are chosen on):", "", *_table(vals, record["runs"], sizes)]
    md += ["", "| run | images seen (mean) | training minutes (mean) |", "|---|---:|---:|"]
    md += [f"| {k} | {record['images_seen'][k]:.0f} | {record['train_minutes'][k]:.1f} |" for k in groups]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, s in tests.items():
        ps = sorted(s["mean"])
        ax.errorbar(ps, [s["mean"][p] for p in ps], yerr=[s["std"][p] for p in ps], marker="o", capsize=3,
                    label=label)
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
    parser.add_argument("--note", help="a paragraph under the title: how the runs were made (e.g. what shared the "
                                       "cores, which bears on their training minutes)")
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    write(load_groups(args.runs, labels), args.out, args.title, args.note)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
