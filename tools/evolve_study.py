"""Issue #15's study: block-graph evolution guided by learned connection weights against the unguided
control, the best graph found against the chain, and the learned weights of an all-edges model.

    python tools/evolve_study.py [--jobs 2] [--out runs/evolve_study] [--results docs/results/evolve]
    python tools/evolve_study.py --report-only
    python tools/evolve_study.py --smoke        # every knob shrunk, output under /tmp/evolve_study_smoke

Parts, each resumable (evolve skips finished candidates; ``flexivit.experiments.runner`` skips a finished run,
resumes an interrupted one and refuses one made with other settings):

- ``search``: `flexivit evolve fashion_mnist` with search seeds 0 and 1 (both at once), then the unguided
  control of each (both at once) at that guided search's measured mean keep-rate (evolve's
  ``guided_keep_rate``). Both searches of a seed draw the same initial population (iteration 0, same
  seed), so the unguided one starts from the guided one's records of it (copied into its evolve.jsonl,
  which evolve skips): each pair trains as many candidates and differs only in its children.
- ``retrain``: the best non-chain graph over the four searches (worst-size validation top-1) and the chain,
  ``--train-steps`` steps with train seeds 0/1/2, on the full test split.
- ``heatmap``: the graph with every allowed edge, ``--train-steps`` steps; its learned connection weights.
  With ``retrain``, its run shares the pool with the retrain runs, so no core idles between the parts.

``--chain-runs A,B,C``: finished runs of the recipe itself (the chain) at ``--train-steps`` with train seeds
``--train-seeds`` in that order (e.g. the three seeds of ``make quickstart`` at the recipe's 3600 steps) serve
as the chain arm instead of retraining it; each is checked (no graph, the steps, its seed, the whole test
split) and linked as ``retrain/chain-seedS``.

Every run has one data process and one thread (OMP_NUM_THREADS=1), two at a time on the two cores; each
run's output goes to ``OUT/<run>.log`` and each attempt, with its wall and CPU seconds, to ``OUT/runs.jsonl``.
Results: ``docs/results/evolve.{md,json,png}`` and ``docs/results/evolve_heatmap.png``, measured 2026-11-30
(111e2a1) with the recipe of then: base 14 ``area`` at 0.02x kernel lr and 54k/6k train/val, as now, and flips
0.5, which this study pins (``HFLIP``) since the recipe dropped them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from flexivit.experiments.results import read_jsonl, read_results
from flexivit.experiments.runner import RunError, RunSpec, Study
from flexivit.ext.graph import HEAD, BlockGraph, allowed_edges, chain
from flexivit.model.variants import VARIANTS
from flexivit.train.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent  # the checkout: default folders of runs and results

RECIPE = "fashion_mnist"
SEARCH_SEEDS = (0, 1)
PARTS = ("search", "retrain", "heatmap")
NO_GUIDED_CHILD_RATE = 0.5  # evolve's --keep-rate default, used only if a guided search made no guided child


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The study's knobs. Costs of one run on one core (CPU seconds measured 2026-11-29, cores shared):
    ~34 s fixed (start-up, data, first steps, checkpoints), ~0.24 s per training step, ~7.7 s per 1000
    validation or test images (all sizes; patch 2 is 80 % of it). On two free cores: search ~32 min,
    retrain ~22 min, heatmap ~6 min."""

    population: int = 6
    iterations: int = 8
    tournament: int = 3
    steps: int = 150  # per candidate ~34 + 36 + 15 s (+2 s in evolve): 14 + 8 candidates per core ~ 32 min
    val_limit: int | None = 2000  # validation images per candidate and for the heatmap run (all 6000: ~46 s)
    train_steps: int = 1200  # retrain (~7.4 min each, 6 runs in 3 rounds) and heatmap (~5.6 min); recipe: 3600
    train_seeds: tuple[int, ...] = (0, 1, 2)
    test_limit: int | None = None  # retrain runs' validation and test images (None: all; smoke only)


SMOKE = Plan(population=2, iterations=1, tournament=2, steps=3, val_limit=64, train_steps=4, train_seeds=(0, 1),
             test_limit=64)


# The study ran with the recipe's horizontal flips of the time; pinned so that a rerun measures the same
# thing now that the recipe has none.
HFLIP = 0.5


def _data(n: int | None) -> list[str]:
    return ["data.num_workers=0", f"data.hflip={HFLIP}", *([f"data.eval_limit={n}"] if n else [])]


def _costs(out: Path, name: str) -> list[dict[str, float]]:
    """The wall and CPU seconds of every invocation of run ``name`` that finished (the runner's
    ``runs.jsonl``; ``costs/<name>.json`` where an earlier version of this tool kept them)."""
    legacy = out / "costs" / f"{name.replace('/', '_')}.json"
    old = json.loads(legacy.read_text()) if legacy.exists() else []
    return [*old, *({"wall_s": a["wall_s"], "cpu_s": a["cpu_s"]} for a in Study(out).attempts(name)
                    if a["status"] == "finished")]


def _records(run: Path) -> list[dict[str, Any]]:
    return read_jsonl(run / "evolve.jsonl")


def _evolve(out: Path, plan: Plan, seed: int, keep_rate: float | None) -> RunSpec:
    """The guided search of ``seed`` (``keep_rate`` None), or its unguided control at ``keep_rate``."""
    name = f"{'guided' if keep_rate is None else 'unguided'}-seed{seed}"
    args = ["--population", str(plan.population), "--iterations", str(plan.iterations), "--tournament",
            str(plan.tournament), "--steps", str(plan.steps), "--seed", str(seed)]
    if keep_rate is not None:
        args += ["--unguided", "--keep-rate", repr(keep_rate)]
        run = out / name
        if not (run / "evolve.jsonl").exists():  # the same initial population: reuse the guided records of it
            run.mkdir(parents=True, exist_ok=True)
            guided = (out / f"guided-seed{seed}" / "evolve.jsonl").read_text().splitlines(keepends=True)
            (run / "evolve.jsonl").write_text("".join(guided[: plan.population]))
    return RunSpec(name=name, command="evolve", recipe=RECIPE, sets=tuple(_data(plan.val_limit)), args=tuple(args),
                   done=("best_graph.json",))


def keep_rate(records: list[dict[str, Any]]) -> tuple[float, str]:
    """The unguided control's coin: a guided search's mean keep-rate over its guided children (evolve's
    ``guided_keep_rate``; coin children of a chain parent do not count)."""
    rates = [r["keep_rate"] for r in records if r["operator"] == "guided"]
    return (statistics.mean(rates), "measured") if rates else (NO_GUIDED_CHILD_RATE, "default: no guided child")


def part_search(out: Path, plan: Plan, jobs: int) -> None:
    study = Study(out, jobs=jobs)
    study.run_all([_evolve(out, plan, s, None) for s in SEARCH_SEEDS])
    rates = [keep_rate(_records(out / f"guided-seed{s}"))[0] for s in SEARCH_SEEDS]
    study.run_all([_evolve(out, plan, s, r) for s, r in zip(SEARCH_SEEDS, rates)])


def _searches(out: Path) -> dict[str, list[dict[str, Any]]]:
    names = [f"{m}-seed{s}" for m in ("guided", "unguided") for s in SEARCH_SEEDS]
    return {n: r for n in names if (r := _records(out / n))}


def _arch() -> tuple[int, int, bool, int]:
    """The recipe's depth, width, class token and image size."""
    cfg = load_recipe(RECIPE, [])
    v = VARIANTS[cfg.model.variant]
    token = v["class_token"] if cfg.model.class_token is None else cfg.model.class_token
    return cfg.model.depth or v["depth"], cfg.model.embed_dim or v["embed_dim"], token, cfg.data.image_size


def pick(searches: dict[str, list[dict[str, Any]]], chain_text: str) -> dict[str, Any]:
    """The best non-chain candidate over all searches (earliest on ties) and the chain's record."""
    rows = [(r, name) for name, records in searches.items() for r in records]
    top, _ = max(rows, key=lambda x: x[0]["score"])
    best, source = max((x for x in rows if x[0]["graph"] != chain_text), key=lambda x: x[0]["score"])
    return {"best": best, "source": source, "chain": next(r for r, _ in rows if r["graph"] == chain_text),
            "best_overall_is_chain": top["graph"] == chain_text}


def link_chain_runs(out: Path, plan: Plan, runs: list[Path]) -> None:
    """Link finished chain runs (one per train seed, in order) as the retrain's chain arm, after checking
    they are what the retrain would have trained."""
    if len(runs) != len(plan.train_seeds):
        raise SystemExit(f"--chain-runs needs one run per train seed {plan.train_seeds}, got {len(runs)}")
    name = load_recipe(RECIPE, []).name
    for seed, run in zip(plan.train_seeds, runs):
        cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else None
        if cfg is None or not (run / "eval.json").exists():
            raise SystemExit(f"--chain-runs: {run} is not a finished run (config.json and eval.json)")
        found = {"model.graph": cfg["model"].get("graph"), "train.steps": cfg["train"]["steps"],
                 "train.seed": cfg["train"]["seed"], "data.eval_limit": cfg["data"]["eval_limit"],
                 "train.test_eval": cfg["train"]["test_eval"], "data.hflip": cfg["data"]["hflip"]}
        expected = {"model.graph": None, "train.steps": plan.train_steps, "train.seed": seed,
                    "data.eval_limit": plan.test_limit, "train.test_eval": True, "data.hflip": HFLIP}
        wrong = {k: v for k, v in found.items() if v != expected[k]}
        if cfg["name"] != name or wrong:
            raise SystemExit(f"--chain-runs: {run} is not the {RECIPE} chain at {plan.train_steps} steps with train "
                             f"seed {seed} on the whole test split: {cfg['name']}, {wrong}")
        link = out / "retrain" / f"chain-seed{seed}"
        if link.is_symlink() and link.resolve() == run.resolve():
            continue
        if link.exists() or link.is_symlink():
            raise SystemExit(f"{link} exists already; remove it to use {run} as the chain arm")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(run.resolve(), target_is_directory=True)


def _retrain_runs(out: Path, plan: Plan) -> list[RunSpec]:
    searches = _searches(out)
    if len(searches) < 4 or any(len(r) < plan.population + plan.iterations for r in searches.values()):
        raise SystemExit(f"the retrain part picks from the four searches, unfinished in {out}: run the search part")
    chosen = pick(searches, chain(_arch()[0]).format())["best"]["graph"]
    base = [*_data(plan.test_limit), f"train.steps={plan.train_steps}", "train.test_eval=true"]
    return [RunSpec(name=f"retrain/{arm}-seed{s}", recipe=RECIPE, sets=(*base, *graph, f"train.seed={s}"))
            for s in plan.train_seeds for arm, graph in (("best", [f"model.graph={chosen}"]), ("chain", []))]


def best_so_far(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per candidate in training order: candidates trained, cumulative training minutes, best score so far (%)."""
    best, minutes, curve = -math.inf, 0.0, {"candidates": [], "train_minutes": [], "best": []}
    for k, r in enumerate(records, 1):
        best, minutes = max(best, 100 * r["score"]), minutes + r["train_seconds"] / 60
        for key, value in (("candidates", k), ("train_minutes", minutes), ("best", best)):
            curve[key].append(value)
    return curve


def verdict(best: list[float], chain_: list[float]) -> dict[str, Any]:
    """'beats the chain' iff the mean worst-size gap exceeds twice the larger of the two standard deviations."""
    gap, spread = statistics.mean(best) - statistics.mean(chain_), max(statistics.stdev(best), statistics.stdev(chain_))
    beats = gap > 2 * spread
    return {"gap": gap, "std": spread, "beats": beats,
            "text": "beats the chain" if beats else "does not beat the chain at this scale"}


def _sum_gflops(graph: str, size: int) -> float:
    """The weighted sums the FLOP counter leaves out: 2 k FLOPs per element of a k-input node's (N, D) input."""
    depth, dim, token, image = _arch()
    tokens = (image // size) ** 2 + int(token)
    g = BlockGraph.parse(graph, depth)
    return sum(2 * len(g.inputs(j)) * tokens * dim for j in range(1, depth + 2) if len(g.inputs(j)) > 1) / 1e9


def _test_stats(runs: list[Path]) -> dict[str, Any]:
    reports = [read_results(r) for r in runs]
    per: dict[str, list[float]] = {}
    for report in reports:
        for p, top1 in report.percent("scored").items():
            per.setdefault(p, []).append(top1)
    worst = [min(report.percent("scored").values()) for report in reports]
    return {"seeds": len(reports), "mean": {p: statistics.mean(v) for p, v in per.items()},
            "std": {p: statistics.stdev(v) for p, v in per.items()}, "worst": worst,
            "worst_mean": statistics.mean(worst), "worst_std": statistics.stdev(worst),
            "split": reports[0].split, "n": reports[0].images("scored"),
            "train_minutes": statistics.mean(r.train_seconds for r in reports) / 60}


def _heatmap(run: Path) -> dict[str, Any]:
    from flexivit.model.weights import load_model

    blocks = load_model(run)[0].blocks
    depth = blocks.graph.depth
    text = {e: f"{e[0]}-{HEAD if e[1] == depth + 1 else e[1]}" for e in blocks.graph.edges}
    report = read_results(run)  # validation only: test_eval is off
    return {"depth": depth, "weights": {text[e]: w for e, w in blocks.connection_weights().items()},
            "fixed": [text[e] for e in blocks.graph.edges if e not in blocks.weighted_edges],
            "val": report.percent("val"), "val_images": report.images("val")}


def collect(out: Path, plan: Plan) -> dict[str, Any]:
    walls = json.loads((out / "parts.json").read_text()) if (out / "parts.json").exists() else {}
    result: dict[str, Any] = {"plan": asdict(plan), "recipe_steps": load_recipe(RECIPE, []).train.steps,
                              "parts_wall_minutes": {k: v / 60 for k, v in walls.items()}, "search": {}}
    searches = _searches(out)
    for name, records in searches.items():
        rate = keep_rate(records) if name.startswith("guided") else \
            (json.loads((out / name / "settings.json").read_text())["keep_rate"], "the coin's")
        cost = {f"process_{k[:-2]}_min": sum(c[k] for c in _costs(out, name)) / 60 for k in ("cpu_s", "wall_s")}
        result["search"][name] = {
            "candidates": len(records), "curve": best_so_far(records), "keep_rate": rate[0], "keep_rate_from": rate[1],
            "best": {k: v for k, v in max(records, key=lambda r: r["score"]).items() if k != "weights"},
            "guided_children": sum(r["operator"] == "guided" for r in records),
            "coin_children": sum(r["operator"] == "unguided" for r in records), **cost}
    if not searches:
        return result
    chosen = pick(searches, chain(_arch()[0]).format())
    best, base = chosen["best"], chosen["chain"]
    sizes = sorted(best["gflops"], key=int)
    result["retrain"] = {"graph": best["graph"], "source": f"{chosen['source']} candidate {best['id']}",
                         "val_score": 100 * best["score"], "chain_val_score": 100 * base["score"],
                         "best_overall_is_chain": chosen["best_overall_is_chain"],
                         "gflops": {p: [best["gflops"][p], base["gflops"][p]] for p in sizes},
                         "gflops_ratio": max(best["gflops"][p] / base["gflops"][p] for p in sizes),
                         "ratio_with_sums": max((best["gflops"][p] + _sum_gflops(best["graph"], int(p)))
                                                / base["gflops"][p] for p in sizes)}
    arms = {arm: sorted((out / "retrain").glob(f"{arm}-seed*/eval.json")) for arm in ("best", "chain")}
    if all(len(a) >= 2 for a in arms.values()):
        stats = {arm: _test_stats([p.parent for p in paths]) for arm, paths in arms.items()}
        result["retrain"] |= {"test": stats, "verdict": verdict(stats["best"]["worst"], stats["chain"]["worst"])}
    if (out / "heatmap" / "eval.json").exists():
        result["heatmap"] = _heatmap(out / "heatmap")
    return result


def _check_plan(out: Path, plan: Plan) -> None:
    path = out / "plan.json"
    if path.exists() and json.loads(path.read_text()) != json.loads(json.dumps(asdict(plan))):
        raise SystemExit(f"{out} holds a study with the plan {path.read_text().strip()}; pass the same knobs to "
                         "continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(plan)) + "\n")


# ---- the report: docs/results/evolve.{md,json,png} and evolve_heatmap.png from what collect gathers
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    knobs = [f.name for f in fields(Plan) if f.type in ("int", "int | None")]
    for k in knobs:
        parser.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {getattr(Plan(), k)}")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--out", type=Path, help="default runs/evolve_study (smoke: /tmp/evolve_study_smoke/runs)")
    parser.add_argument("--results", type=Path, help="default docs/results/evolve (smoke: under /tmp)")
    parser.add_argument("--chain-runs", help="comma list of finished chain runs, one per train seed, used as the "
                        "retrain's chain arm instead of retraining it")
    parser.add_argument("--smoke", action="store_true", help="shrink every knob: checks the tool, measures nothing")
    parser.add_argument("--report-only", action="store_true", help="aggregate finished work, train nothing")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    given = {k: getattr(args, k) for k in knobs if getattr(args, k) is not None}
    smoke = Path("/tmp/evolve_study_smoke")
    out = args.out or (smoke / "runs" if args.smoke else ROOT / "runs" / "evolve_study")
    results = args.results or (smoke / "evolve" if args.smoke else ROOT / "docs" / "results" / "evolve")
    plan = replace(SMOKE if args.smoke else Plan(), **given)
    if args.report_only and (out / "plan.json").exists():
        if given:
            parser.error(f"--report-only reads the plan from {out / 'plan.json'}: drop the knobs")
        saved = json.loads((out / "plan.json").read_text())
        plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    os.environ["OMP_NUM_THREADS"] = "1"
    if not args.report_only:
        _check_plan(out, plan)
        if args.chain_runs and "retrain" in parts:
            link_chain_runs(out, plan, [Path(r) for r in args.chain_runs.split(",") if r])
        # The search, then the retrain and heatmap runs in one pool (a part's wall time is then theirs together).
        for group in ([p for p in parts if p == "search"], [p for p in parts if p != "search"]):
            if not group:
                continue
            start = time.perf_counter()
            try:
                if group == ["search"]:
                    part_search(out, plan, args.jobs)
                else:
                    runs = _retrain_runs(out, plan) if "retrain" in group else []
                    if "heatmap" in group:
                        graph = BlockGraph(depth := _arch()[0], tuple(allowed_edges(depth))).format()  # every edge
                        runs.append(RunSpec(name="heatmap", recipe=RECIPE, sets=(
                            *_data(plan.val_limit), f"model.graph={graph}", f"train.steps={plan.train_steps}",
                            "train.test_eval=false")))
                    Study(out, jobs=args.jobs).run_all(runs)
            except RunError as err:
                parser.exit(1, f"{parser.prog}: error: {err}\n")
            walls = json.loads((out / "parts.json").read_text()) if (out / "parts.json").exists() else {}
            name = "+".join(group)
            walls[name] = walls.get(name, 0.0) + time.perf_counter() - start
            (out / "parts.json").write_text(json.dumps(walls) + "\n")
            write(collect(out, plan), results, recipe=RECIPE)
    write(collect(out, plan), results, recipe=RECIPE)


if __name__ == "__main__":
    main()
