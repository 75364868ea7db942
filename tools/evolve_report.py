"""The report of tools/evolve_study.py: ``docs/results/evolve.{md,json,png}`` and ``evolve_heatmap.png`` from the
dict its ``collect`` gathers (kept apart so the study's runner stays short)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexivit.ext.graph import HEAD

__all__ = ["write"]


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for k, (name, s) in enumerate(sorted(result["search"].items(), key=lambda x: x[0][-1])):
        style = dict(where="post", color=f"C{k // 2}", linestyle="-" if name.startswith("guided") else "--", label=name)
        for ax, x in zip(axes, ("candidates", "train_minutes")):
            ax.step(s["curve"][x], s["curve"]["best"], **style)
    axes[0].axvline(result["plan"]["population"] + 0.5, color="grey", lw=0.8)  # children start after it
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    for ax, label in zip(axes, ("candidates trained (grey: end of the initial population)",
                                "training minutes (one thread each, cumulative)")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best so far: worst-size validation top-1 (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Guided vs unguided evolution (solid: guided, dashed: unguided at its keep-rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_heatmap(h: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    depth = h["depth"]
    grid = np.full((depth + 1, depth + 1), np.nan)  # (sources 0..depth, targets 1..h)
    fig, ax = plt.subplots(figsize=(6, 5))
    for edge, w in h["weights"].items():
        i, j = edge.split("-")
        col = depth if j == HEAD else int(j) - 1
        grid[int(i), col] = w
        ax.text(col, int(i), f"{w:.2f}" + ("\n(fixed)" if edge in h["fixed"] else ""), ha="center", va="center",
                fontsize=8, color="white" if w < 0.6 else "black")
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(depth + 1), [*map(str, range(1, depth + 1)), HEAD])
    ax.set_yticks(range(depth + 1), [str(i) for i in range(depth + 1)])
    ax.set(xlabel="target node (h: head)", ylabel="source node (0: stem)",
           title="Learned connection weights, all-edges graph")
    fig.colorbar(image, label="sigmoid(edge logit)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def _search_md(result: dict[str, Any]) -> list[str]:
    plan = result["plan"]
    p, i = plan["population"], plan["iterations"]
    ks = sorted({p, p + (i + 1) // 2, p + i})
    lines = ["", "## Guided vs unguided (validation split, worst size; `evolve.png`)", "",
             f"Candidates train {plan['steps']} steps and are scored on the first {plan['val_limit'] or 'all'} "
             "validation images. The unguided search of a seed shares the guided one's initial population (the same "
             "graphs from the same seed; its records are copied, not retrained) and keeps each parent edge with the "
             "guided search's mean keep-rate. Two search seeds: evidence, not proof.", "",
             "| search | keep-rate | children guided / coin | " + " | ".join(f"best after {k}" for k in ks)
             + " | best graph | training min | process CPU min | wall min |",
             "|---|---|---:|" + "---:|" * len(ks) + "---|---:|---:|---:|"]
    for name, s in result["search"].items():
        cells = " | ".join(f"{s['curve']['best'][k - 1]:.2f}" if k <= s["candidates"] else "–" for k in ks)
        lines.append(f"| {name} | {s['keep_rate']:.3f} ({s['keep_rate_from']}) | {s['guided_children']} / "
                     f"{s['coin_children']} | {cells} | `{s['best']['graph']}` | {s['curve']['train_minutes'][-1]:.1f} "
                     f"| {s['process_cpu_min']:.1f} | {s['process_wall_min']:.1f} |")
    return lines + ["", "A guided search's keep-rate is the mean, over its guided children, of the share of the "
                    "parent's edges kept; its coin children are those of a chain parent (weights 1.0: the threshold "
                    "keeps everything) or of eight redraws that gave only trained graphs. Training minutes are the "
                    "training loops' wall time; process CPU minutes add start-up, validation and evolve's own work, "
                    "over the invocations of this tool that ran the search (an unguided search's: its children only)."]


def _retrain_md(r: dict[str, Any], plan: dict[str, Any], recipe_steps: int) -> list[str]:
    lines = ["", "## Best found vs the chain (test split)", "",
             f"Best non-chain candidate over the four searches: `{r['graph']}` ({r['source']}, validation "
             f"{r['val_score']:.2f} % vs the chain's {r['chain_val_score']:.2f} %"
             + ("; the best candidate overall was the chain itself" if r["best_overall_is_chain"] else "") + "). "
             "GFLOPs per image (best / chain) recorded by evolve: "
             + ", ".join(f"p={p} {a:.4g} / {b:.4g}" for p, (a, b) in r["gflops"].items())
             + f"; largest ratio **{r['gflops_ratio']:.4f}** (≤ 1.01 required). The counter leaves out the weighted "
             f"sums; counted by hand (2k FLOPs per element of a k-input node) they make it {r['ratio_with_sums']:.4f}."]
    if "test" in r:
        t, v = r["test"], r["verdict"]
        sizes = sorted(t["best"]["mean"], key=int)
        budget = "the recipe's budget" if plan["train_steps"] == recipe_steps else \
            f"below the recipe's {recipe_steps} steps to fit the time"
        lines += ["", f"Retrained {plan['train_steps']} steps ({budget}) with train seeds {plan['train_seeds']}; top-1 "
                  f"(%) on {t['best']['n']} {t['best']['split']} images, mean ± std over seeds:", "",
                  "| graph | worst size | " + " | ".join(f"p={p}" for p in sizes) + " | training min |",
                  "|---|---:|" + "---:|" * len(sizes) + "---:|"]
        for arm in ("best", "chain"):
            s = t[arm]
            cells = " | ".join(_pm(s["mean"][p], s["std"][p]) for p in sizes)
            lines.append(f"| {arm} | {_pm(s['worst_mean'], s['worst_std'])} | {cells} | {s['train_minutes']:.1f} |")
        lines += ["", f"Worst-size gap (best − chain) {v['gap']:+.2f} points against 2 × {v['std']:.2f} (the larger "
                  f"std): the best graph found **{v['text']}**."]
    return lines


def write(result: dict[str, Any], results: Path, *, recipe: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plan, walls, h = result["plan"], result["parts_wall_minutes"], result.get("heatmap")
    lines = ["# Block-graph evolution: guided vs unguided, best found vs the chain", "",
             f"`python tools/evolve_study.py` on `{recipe}`, every run one thread and one data process, two at a time "
             f"on the 2 development cores. Plan: `{json.dumps(plan)}`. Wall minutes per part: "
             + (", ".join(f"{k} {v:.1f}" for k, v in walls.items()) or "none recorded") + "."]
    lines += _search_md(result) if result["search"] else []
    lines += _retrain_md(result["retrain"], plan, result["recipe_steps"]) if "retrain" in result else []
    if h:
        lines += ["", "## Learned connection weights of the all-edges graph (`evolve_heatmap.png`)", "",
                  f"Every allowed edge of depth {h['depth']}, trained {plan['train_steps']} steps (seed 0); validation "
                  f"top-1 on {h['val_images']} images: " + ", ".join(f"p={p} {a:.2f}" for p, a in h["val"].items())
                  + ". Fixed at 1.0 (its node's only input, no parameter): " + ", ".join(h["fixed"]) + ". Weights: "
                  + ", ".join(f"{e} {w:.3f}" for e, w in h["weights"].items()) + "."]
        _plot_heatmap(h, results.with_name(results.name + "_heatmap.png"))
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if result["search"]:
        _plot(result, results.with_suffix(".png"))
