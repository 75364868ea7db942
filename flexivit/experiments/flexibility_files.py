"""The flexibility reproduction's result files (``tools/reproduce_flexibility.py``): ``flexibility.json`` as the
report holds it, ``flexibility.md`` (its tables) and ``flexibility.png`` (its curves). The arithmetic behind
them is ``flexivit.experiments.flexibility_report``'s."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from flexivit.files import atomic_write_bytes, atomic_write_text

__all__ = ["report_markdown", "write_plot", "write_report"]


def write_report(result: dict[str, Any], results: Path) -> None:
    """``flexibility.{json,md,png}`` under ``results``, each written whole."""
    atomic_write_text(results / "flexibility.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(results / "flexibility.md", report_markdown(result))
    write_plot(result, results / "flexibility.png")


def _pm(mean: float, std: float | None) -> str:
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _teacher_cells(row: dict[str, Any]) -> str:
    if row.get("teacher_train_gflops") is None:  # the teacher has not finished (or an older report)
        return "- | -"
    return f"{row['teacher_train_gflops'] / 1e3:.2f} | {row['train_gflops_ratio_with_teacher']:.2f}"


def report_markdown(result: dict[str, Any]) -> str:
    """``flexibility.md``: the curves, budgets, targets and distillation comparisons of ``result``."""
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
    if result.get("records_note"):
        lines += [f"Records: {result['records_note']}", ""]
    for rerun in result.get("reruns", []):
        git, where = rerun["git"], rerun["machine"]
        state = {True: "clean", False: "uncommitted changes"}.get(git["clean"], "state unknown")
        lines += [f"Rerun: {', '.join(rerun['rows'])} (every seed, with the teachers they distil from) retrained by "
                  f"`{rerun['command']}` at {git['commit']} ({state}) on {where['cpu']}, torch {where['torch']}; "
                  "the other rows are as first measured. The rerun rows' training minutes come from that machine and the "
                  "other rows' from the first, so minutes and time × are not comparable between the two.", ""]
    if result.get("unfinished"):
        lines += [f"**Interim report** (`--finished-only`): not finished yet, so absent from every table: "
                  f"{', '.join(result['unfinished'])}. A curve's mean is over its own finished seeds (column "
                  "`seeds`); a target or comparison that needs an absent run is left out.", ""]
    lines += ["Base: the kernel size, position grid, the operator resizing the kernel while it trains and the "
              "kernel's learning-rate scale (`flexibility.json` has each seed's recipe and overrides).", "",
              "| model | kind | trained at | base | resize | seeds | " + " | ".join(f"p={p}" for p in sizes)
              + " | images | TFLOPs | minutes |", "|---|---|---:|---|---|---:|" + "---:|" * (len(sizes) + 3)]
    for name, c in result["curves"].items():
        cells = [_pm(c["top1_mean"][str(p)], c["top1_std"][str(p)]) for p in sizes]
        base = (f"{c['base_patch_size']}×{c['base_patch_size']}, grid {c['base_grid']}, {c['kernel_resize']}, "
                f"lr ×{c['kernel_lr_scale']:g}" if c.get("base_patch_size") else "not recorded")
        lines.append(f"| {name} | {c['kind']} | {c['train_patch_size'] or 'all'} | {base} | {c['resize'] or '-'} | "
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
    lines += ["", "Distillation vs labels (top-1 gain in points; cost ratios distilled / labels). FLOPs × counts "
              "the teacher's forwards only; the last two columns count the teacher's own training too (its row "
              "above), under which no pair below is at equal compute:", "",
              "| distilled | labels | equal | " + " | ".join(f"p={p}" for p in sizes)
              + " | images × | FLOPs × | time × | teacher's training TFLOPs | FLOPs × with it |",
              "|---|---|---|" + "---:|" * (len(sizes) + 5)]
    for r in result["distill_vs_labels"]:
        cells = [f"{r['top1_gain'][str(p)]:+.1f}" for p in sizes]
        lines.append(f"| {r['distilled']} | {r['labels']} | {r['equal']} | " + " | ".join(cells)
                     + f" | {r['images_seen_ratio']:.2f} | {r['train_gflops_ratio']:.2f} | "
                     f"{r['train_seconds_ratio']:.2f} | " + _teacher_cells(r) + " |")
    lines += ["", "![accuracy vs patch size](flexibility.png)", ""]
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> None:
    """``flexibility.png``: top-1 against patch size, one curve per model (error bars: std over seeds)."""
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
