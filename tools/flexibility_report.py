"""The report of ``tools/reproduce_flexibility.py``: curves (mean ± std over seeds), what every run spent, the
issue's targets, distillation vs labels, and ``flexibility.{md,json,png}``.

Every function takes the finished runs only, so a report can be made while other runs still train
(``reproduce_flexibility.py --finished-only``): a curve whose run has not finished is absent, and a target or
comparison that needs it is left out rather than guessed.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from flexibility_plan import Run

BUDGET_KEYS = ("steps", "images_seen", "train_gflops", "train_seconds")


def summarise(runs: list[Run], per_run: dict[str, dict[str, dict[str, float]]], spent: dict[str, dict[str, Any]],
              sizes: list[int], seeds: list[int]) -> dict[str, Any]:
    """Curves (top-1 mean ± std over seeds per size) and budgets (per run name: what each seed spent and
    the means); every curve carries its run's mean images seen, training GFLOPs and seconds."""
    budgets: dict[str, Any] = {}
    for run in runs:
        entry = budgets.setdefault(run.name, {
            "kind": run.kind, "train_patch_size": run.train_patch_size, "supervision": run.supervision,
            "teacher": run.teacher, "budget": run.budget, "per_seed": []})
        entry["per_seed"].append({"seed": run.seed, **spent[run.dir_name]})
    for entry in budgets.values():
        rows = entry["per_seed"]
        entry.update({k: statistics.fmean(r[k] for r in rows) for k in BUDGET_KEYS})
        entry["images_by_patch"] = {p: statistics.fmean(r["images_by_patch"].get(p, 0) for r in rows)
                                    for p in sorted({p for r in rows for p in r["images_by_patch"]}, key=int)}
    curves: dict[str, Any] = {}
    for run in runs:
        for name, top1 in per_run[run.dir_name].items():
            entry = curves.setdefault(name, {
                "kind": run.kind, "train_patch_size": run.train_patch_size,
                "resize": name.split("/")[1] if "/" in name else None, "run": run.name,
                **{k: budgets[run.name][k] for k in ("supervision", "teacher", "budget", *BUDGET_KEYS)},
                "seeds": [], "_values": {str(p): [] for p in sizes}})
            entry["seeds"].append(run.seed)  # the seeds behind this curve (fewer while runs still train)
            for p in sizes:
                entry["_values"][str(p)].append(top1[str(p)])
    for entry in curves.values():
        values = entry.pop("_values")
        entry["top1_mean"] = {p: statistics.fmean(v) for p, v in values.items()}
        # One seed has no spread: null, not a zero that reads as "no variance".
        entry["top1_std"] = {p: statistics.stdev(v) if len(v) > 1 else None for p, v in values.items()}
    return {"patch_sizes": sizes, "seeds": seeds, "curves": curves, "budgets": budgets}


def target_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two targets, for each FlexiViT against each fixed ViT trained on the same images with
    the same supervision (labels with labels, distilled with distilled), through PI-resize."""
    sizes, curves, checks = result["patch_sizes"], result["curves"], []
    for flexi_name, flexi in curves.items():
        if flexi["kind"].startswith("fixed") or flexi["budget"] != "images":
            continue
        for base_name, base in curves.items():
            if (not base["kind"].startswith("fixed") or base["resize"] != "pi"
                    or base["supervision"] != flexi["supervision"]):
                continue
            p = base["train_patch_size"]
            gap = 100 * (base["top1_mean"][str(p)] - flexi["top1_mean"][str(p)])
            checks.append({"flexi": flexi_name, "baseline": base_name, "target": f"within 1.0 point at p={p}",
                           "value": -gap, "met": gap <= 1.0})
            i = sizes.index(p)
            for j in (i - 2, i + 2):
                if 0 <= j < len(sizes):
                    q = str(sizes[j])
                    lead = 100 * (flexi["top1_mean"][q] - base["top1_mean"][q])
                    checks.append({"flexi": flexi_name, "baseline": base_name,
                                   "target": f">= 30 points above at p={q}", "value": lead, "met": lead >= 30})
    return checks


def distill_vs_labels(result: dict[str, Any], pairs: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Top-1 gain (points) of each distilled model over its label-only counterpart, with what each spent."""
    curves, rows = result["curves"], []
    for distilled, labels, equal in pairs:
        if distilled not in curves or labels not in curves:  # a run of the pair has not finished
            continue
        d, lab = curves[distilled], curves[labels]
        rows.append({"distilled": distilled, "labels": labels, "equal": equal,
                     "top1_gain": {p: 100 * (d["top1_mean"][p] - lab["top1_mean"][p]) for p in d["top1_mean"]},
                     **{f"{k}_ratio": d[k] / lab[k] for k in ("images_seen", "train_gflops", "train_seconds")}})
    return rows


def _pm(mean: float, std: float | None) -> str:
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    sizes = result["patch_sizes"]
    spread = ("Mean ± sample std over seeds" if len(result["seeds"]) > 1
              else "One seed (no spread measured; differences under ~2 points need more seeds)")
    lines = [
        "# Flexibility on Fashion-MNIST: top-1 (%) vs patch size",
        "",
        f"{spread} {result['seeds']} (`{result['command']}`); {result['eval_images']} test images. "
        f"Each FlexiViT trains {result['steps']} steps of the quickstart recipe; each fixed ViT/p (base kernel p, "
        "position grid at its own token grid) trains by the same recipe on as many images as its FlexiViT. "
        "Distilled models learn from the label-trained small ViT and start from its weights; `flexi-equal-flops` "
        "is a label-only FlexiViT given the distilled FlexiViT's training FLOPs. Images, training TFLOPs "
        "(3 × forward FLOPs per image at its size, teacher forwards included) and training-loop minutes are "
        f"means per run; all runs together trained for {result['train_minutes']:.1f} minutes (runs started "
        "with --jobs overlap and share the cores).",
        "",
    ]
    if result.get("unfinished"):
        lines += [f"**Interim report** (`--finished-only`): not finished yet, so absent from every table: "
                  f"{', '.join(result['unfinished'])}. A curve's mean is over its own finished seeds (column "
                  "`seeds`); a target or comparison that needs an absent run is left out.", ""]
    lines += ["| model | kind | trained at | resize | seeds | " + " | ".join(f"p={p}" for p in sizes)
              + " | images | TFLOPs | minutes |", "|---|---|---:|---|---:|" + "---:|" * (len(sizes) + 3)]
    for name, c in result["curves"].items():
        cells = [_pm(c["top1_mean"][str(p)], c["top1_std"][str(p)]) for p in sizes]
        lines.append(f"| {name} | {c['kind']} | {c['train_patch_size'] or 'all'} | {c['resize'] or '-'} | "
                     f"{len(c['seeds'])} | "
                     + " | ".join(cells) + f" | {c['images_seen'] / 1e3:.0f}k | {c['train_gflops'] / 1e3:.2f} | "
                     f"{c['train_seconds'] / 60:.1f} |")
    lines += ["", "Images per patch size (sampler draws; mean over seeds) and steps:", "",
              "| run | supervision | teacher | steps | " + " | ".join(f"p={p}" for p in sizes) + " |",
              "|---|---|---|---:|" + "---:|" * len(sizes)]
    for name, b in result["budgets"].items():
        cells = [f"{b['images_by_patch'][str(p)] / 1e3:.1f}k" if str(p) in b["images_by_patch"] else "-" for p in sizes]
        lines.append(f"| {name} | {b['supervision']} | {b['teacher'] or '-'} | {b['steps']:.0f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Targets (FlexiViT vs each fixed ViT of the same supervision and images, through PI-resize; "
              "value in points):", "", "| FlexiViT | baseline | target | value | met |", "|---|---|---|---:|---|"]
    for c in result["targets"]:
        lines.append(f"| {c['flexi']} | {c['baseline']} | {c['target']} | {c['value']:+.1f} | "
                     f"{'yes' if c['met'] else 'no'} |")
    lines += ["", "Distillation vs labels (top-1 gain in points; cost ratios distilled / labels; the teacher's own "
              "training is its row above):", "",
              "| distilled | labels | equal | " + " | ".join(f"p={p}" for p in sizes)
              + " | images × | FLOPs × | time × |", "|---|---|---|" + "---:|" * (len(sizes) + 3)]
    for r in result["distill_vs_labels"]:
        cells = [f"{r['top1_gain'][str(p)]:+.1f}" for p in sizes]
        lines.append(f"| {r['distilled']} | {r['labels']} | {r['equal']} | " + " | ".join(cells)
                     + f" | {r['images_seen_ratio']:.2f} | {r['train_gflops_ratio']:.2f} | "
                     f"{r['train_seconds_ratio']:.2f} |")
    lines += ["", "![accuracy vs patch size](flexibility.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["patch_sizes"]
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for name, c in result["curves"].items():
        mean = [100 * c["top1_mean"][str(p)] for p in sizes]
        std = [100 * (c["top1_std"][str(p)] or 0.0) for p in sizes]  # one seed: no error bar
        style = "--" if c["resize"] == "bilinear" else "-"
        marker = "s" if c["supervision"] == "distilled" else "o"
        ax.errorbar(sizes, mean, yerr=std, linestyle=style, marker=marker, capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(p) for p in sizes])
    ax.minorticks_off()
    ax.set_xlabel("patch size (pixels, 28 px images)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"Fashion-MNIST, FlexiViT {result['steps']} steps, fixed ViTs at equal images, "
                 f"seeds {result['seeds']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
