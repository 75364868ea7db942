"""Issue #12's study: fixed-norm training at one equivalent learning rate (ELR) against AdamW's
learning rate x weight decay grid, chosen on validation and reported on test.

    python tools/fixednorm_study.py --base runs/fashion_mnist [--jobs 2] [--out runs/fixednorm_study]
    python tools/fixednorm_study.py --base runs/fashion_mnist --report-only

Stages (each a resumable `flexivit search`, or plain runs for the test seeds; finished work is skipped):

- ``finetune``: from the quickstart model ``--base`` onto ``fashion_mnist_finetune``'s task, AdamW at
  5 learning rates over 100x times weight decay {0, 0.05, 0.3} (15 trials) against
  ``fashion_mnist_fixednorm`` at its 5 ELR values (5 trials), seed 0, validation only.
- ``winners``: each method's best setting (worst-size validation accuracy) fine-tuned again with seeds
  0, 1, 2 and evaluated on the test split.
- ``sensitivity``: the ELR grid again at weight decay 0.3 (fixed-norm tensors ignore it) and the head
  scale S in {1, 4, 16} at the best ELR (S = 2 is the recipe's).
- ``scratch``: the quickstart recipe from scratch at ``--scratch-steps`` steps, AdamW at 3 learning
  rates against fixed-norm at 3 ELR values for each scope (head, linears, all), constant S.
- ``overhead``: step time of the same scale-invariant fine-tune with and without the fixed-norm
  projection, alternated three times in one process tree (ratio of medians).

Every trial runs with one data process (``data.num_workers=0``); run it with ``OMP_NUM_THREADS=1`` so
two trials share the two development cores. Results: ``docs/results/fixednorm.{md,json,png}``, measured
2026-11-29 (54123b8) from the seed-0 run of a74ec28's recipe and with the recipes of then: base 14 ``area`` at
0.02x kernel lr, 10 % of train held out as validation as now, but flips 0.5 (no flips since df79d0f), so a
rerun today gives other numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from flexivit.experiments.results import read_jsonl, read_results
from flexivit.experiments.runner import RunError, RunSpec, Study
from flexivit.experiments.search import SearchError, run_search, run_spec

ROOT = Path(__file__).resolve().parent.parent  # the checkout: default folders of runs and results

COMMON = ["data.num_workers=0"]
LRS = "1e-4,3e-4,1e-3,3e-3,1e-2"
ELRS = "0.001,0.003,0.01,0.03,0.1"
SEEDS = (0, 1, 2)
SCRATCH_LRS = "1e-3,3e-3,1e-2"
SCRATCH_ELRS = "0.003,0.01,0.03"
SCRATCH_ARMS = {  # name -> fixed overrides of the quickstart recipe
    "head": ["model.scale_invariant=head", "optim.fixed_norm=true"],
    "linears": ["model.scale_invariant=linears", "optim.fixed_norm=true"],
    "all": ["model.scale_invariant=all", "optim.fixed_norm=true"],
}
STAGES = ("finetune", "winners", "sensitivity", "scratch", "overhead")


def _search(out: Path, recipe: str, grid: list[str], *, base: str | None, jobs: int, steps: int | None = None,
            fixed: list[str] | None = None) -> dict[str, Any]:
    return run_search(recipe=recipe, grid_specs=grid, seeds=[0], steps=steps, metric="worst", jobs=jobs, out=out,
                      overrides=[*COMMON, *(fixed or [])], init=base)


def _best(out: Path) -> dict[str, Any]:
    return json.loads((out / "best.json").read_text())


def _finetune(name: str, *, base: str, recipe: str, sets: list[str], test: bool = True) -> RunSpec:
    """One plain fine-tune, ``OUT/<name>``."""
    return run_spec(name, [*COMMON, *sets, f"train.test_eval={str(test).lower()}"], recipe=recipe, init=base)


def stage_finetune(out: Path, base: str, jobs: int) -> None:
    _search(out / "ft_adamw", "fashion_mnist_finetune", [f"optim.lr={LRS}", "optim.weight_decay=0,0.05,0.3"],
            base=base, jobs=jobs)
    _search(out / "ft_elr", "fashion_mnist_fixednorm", [f"optim.elr={ELRS}"], base=base, jobs=jobs)


def _winner_sets(out: Path) -> dict[str, tuple[str, list[str]]]:
    return {
        "AdamW (lr x wd)": ("fashion_mnist_finetune", [f"{k}={v}" for k, v in _best(out / "ft_adamw")["values"].items()]),
        "fixed-norm (ELR)": ("fashion_mnist_fixednorm", [f"{k}={v}" for k, v in _best(out / "ft_elr")["values"].items()]),
    }


def stage_winners(out: Path, base: str, jobs: int) -> None:
    Study(out, jobs=jobs).run_all([_finetune(f"winners/{name.split()[0]}-seed{seed}", base=base, recipe=recipe,
                                             sets=[*sets, f"train.seed={seed}"])
                                   for name, (recipe, sets) in _winner_sets(out).items() for seed in SEEDS])


def stage_sensitivity(out: Path, base: str, jobs: int) -> None:
    _search(out / "ft_elr_wd03", "fashion_mnist_fixednorm", [f"optim.elr={ELRS}"], base=base, jobs=jobs,
            fixed=["optim.weight_decay=0.3"])
    elr = _best(out / "ft_elr")["values"]["optim.elr"]
    _search(out / "ft_head", "fashion_mnist_fixednorm", ["model.si_head_scale=1,4,16"], base=base, jobs=jobs,
            fixed=[f"optim.elr={elr}"])


def stage_scratch(out: Path, steps: int, jobs: int) -> None:
    _search(out / "scratch_adamw", "fashion_mnist", [f"optim.lr={SCRATCH_LRS}"], base=None, jobs=jobs, steps=steps)
    for name, fixed in SCRATCH_ARMS.items():
        _search(out / f"scratch_{name.split()[0]}", "fashion_mnist", [f"optim.elr={SCRATCH_ELRS}"], base=None,
                jobs=jobs, steps=steps, fixed=fixed)


def stage_overhead(out: Path, base: str, steps: int = 100, repeats: int = 3) -> None:
    """Alternate the two arms so machine load hits both alike; one trial at a time."""
    arms = {"projection": ("fashion_mnist_fixednorm", []),
            "no projection": ("fashion_mnist_finetune", ["model.scale_invariant=all"])}
    Study(out).run_all([_finetune(f"overhead/{name.replace(' ', '_')}-{i}", base=base, recipe=recipe,
                                  sets=[*sets, f"train.steps={steps}", "train.checkpoint_every=1000"], test=False)
                        for i in range(repeats) for name, (recipe, sets) in arms.items()])


def _records(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path / "search.jsonl")


def _worst(val: dict[str, float]) -> float:
    return 100 * min(val.values())


def _curve(records: list[dict[str, Any]], key: str, where: dict[str, str] | None = None) -> list[tuple[float, float]]:
    """(swept value, worst-size validation %) sorted by value, for the records matching ``where``."""
    rows = [r for r in records if all(r["values"].get(k) == v for k, v in (where or {}).items())]
    return sorted((float(r["values"][key]), _worst(r["val"])) for r in rows)


def _drops(curve: list[tuple[float, float]]) -> dict[str, Any]:
    """Worst-size loss from the best grid point within a 10x window (one half-decade step either side) and
    within the two 31.6x windows (four half-decade points) that hold the best inside, the worse of them."""
    scores = [s for _, s in curve]
    i = max(range(len(scores)), key=scores.__getitem__)
    ten = scores[max(0, i - 1): i + 2]
    thirty = [scores[j: j + 4] for j in (i - 2, i - 1) if j >= 0 and j + 4 <= len(scores)]
    return {"best_value": curve[i][0], "best": scores[i], "drop_10x": scores[i] - min(ten),
            "drop_30x": max(scores[i] - min(w) for w in thirty) if thirty else None,
            "at_edge": i in (0, len(scores) - 1)}


def _test_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for name in ("AdamW (lr x wd)", "fixed-norm (ELR)"):
        reports = [read_results(p.parent) for p in sorted((out / "winners").glob(f"{name.split()[0]}-seed*/eval.json"))]
        if not reports:
            continue
        per = {}
        for report in reports:
            for p, top1 in report.percent("scored").items():
                per.setdefault(p, []).append(top1)
        worst = [min(report.percent("scored").values()) for report in reports]
        rows.append({"method": name, "seeds": len(reports),
                     "test_mean": {p: statistics.mean(v) for p, v in per.items()},
                     "test_std": {p: statistics.stdev(v) if len(v) > 1 else None for p, v in per.items()},
                     "worst_mean": statistics.mean(worst), "worst_std": statistics.stdev(worst) if len(worst) > 1 else None,
                     "images_seen": reports[0].images_seen,
                     "train_minutes": statistics.mean(r.train_seconds for r in reports) / 60})
    return rows


def collect(out: Path, base: str) -> dict[str, Any]:
    adamw, elr = _records(out / "ft_adamw"), _records(out / "ft_elr")
    result: dict[str, Any] = {"base": base, "search": {}, "test": _test_rows(out), "curves": {}, "scratch": {}}
    for name, records in (("AdamW (lr x wd)", adamw), ("fixed-norm (ELR)", elr)):
        if records:
            best = max(records, key=lambda r: _worst(r["val"]))
            result["search"][name] = {"trials": len(records), "best": best["values"], "best_val": best["val"],
                                      "train_minutes": sum(r["train_seconds"] for r in records) / 60,
                                      "images_seen": sum(r["images_seen"] for r in records)}
    if adamw:
        wd = max(adamw, key=lambda r: _worst(r["val"]))["values"]["optim.weight_decay"]
        for d in ("0", "0.05", "0.3"):
            result["curves"][f"AdamW lr, wd {d}"] = _curve(adamw, "optim.lr", {"optim.weight_decay": d})
        result["sensitivity"] = {"AdamW lr (best wd)": _drops(result["curves"][f"AdamW lr, wd {wd}"])}
    if elr:
        result["curves"]["ELR, wd 0"] = _curve(elr, "optim.elr")
        result.setdefault("sensitivity", {})["ELR"] = _drops(result["curves"]["ELR, wd 0"])
    wd03 = _records(out / "ft_elr_wd03")
    if wd03:
        result["curves"]["ELR, wd 0.3"] = _curve(wd03, "optim.elr")
    head = _records(out / "ft_head")
    if head and elr:
        best_elr = max(elr, key=lambda r: _worst(r["val"]))
        points = [(2.0, best_elr["val"])] + [(float(r["values"]["model.si_head_scale"]), r["val"]) for r in head]
        result["head_scale"] = [{"S": s, "val": {p: 100 * a for p, a in v.items()}, "worst": _worst(v)}
                                for s, v in sorted(points)]
    for name in ("adamw", *SCRATCH_ARMS):
        records = _records(out / f"scratch_{name.split()[0]}")
        if records:
            key = "optim.lr" if name == "adamw" else "optim.elr"
            best = max(records, key=lambda r: _worst(r["val"]))
            result["scratch"][name] = {"curve": _curve(records, key), "best": best["values"],
                                       "best_val": {p: 100 * a for p, a in best["val"].items()},
                                       "train_minutes": sum(r["train_seconds"] for r in records) / 60,
                                       "images_seen_per_trial": best["images_seen"]}
    times: dict[str, list[float]] = {}
    for run in sorted(p.parent for p in (out / "overhead").glob("*/eval.json")):
        arm = run.name.rsplit("-", 1)[0].replace("_", " ")
        times.setdefault(arm, []).append(read_results(run).train_seconds)
    if len(times) == 2:
        result["overhead"] = {"seconds": times,
                              "ratio": statistics.median(times["projection"]) / statistics.median(times["no projection"])}
    return result


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)  # one scale: flatness compares by eye
    for name, curve in result["curves"].items():
        ax = axes[0] if name.startswith("AdamW") else axes[1]
        ax.plot([v for v, _ in curve], [s for _, s in curve], marker="o", label=name)
    for ax, label in zip(axes, ("AdamW learning rate", "equivalent learning rate (ELR)")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("worst-size validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Fine-tuning sensitivity (seed 0, validation split)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any], results: Path) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if result["curves"]:
        _plot(result, results.with_suffix(".png"))
    lines = ["# Fixed-norm training at one equivalent learning rate vs AdamW's two knobs", "",
             f"`python tools/fixednorm_study.py --base {result['base']}`. Fine-tuning the quickstart model onto "
             "`fashion_mnist_finetune`'s task (4 classes, 400 steps, sizes 2/4/7/14 sampled). Searches: seed 0, "
             "validation split, ranked by the worst size; the winners re-run with seeds 0/1/2 on the test split. "
             "Minutes are training wall time of trials run two at a time, one thread each, on the 2 development cores.",
             "", "## Search cost and winners (validation)", "",
             "| method | trials | training min | images seen | best setting | worst-size val % |",
             "|---|---:|---:|---:|---|---:|"]
    for name, s in result["search"].items():
        setting = " ".join(f"{k}={v}" for k, v in s["best"].items())
        lines.append(f"| {name} | {s['trials']} | {s['train_minutes']:.1f} | {s['images_seen']} | {setting} | "
                     f"{_worst(s['best_val']):.1f} |")
    if result["test"]:
        sizes = sorted(result["test"][0]["test_mean"], key=int)
        lines += ["", "## Winners on the test split (mean ± std over seeds)", "",
                  "| method | seeds | worst size | " + " | ".join(f"p={p}" for p in sizes) + " | images seen | training min |",
                  "|---|---:|---:|" + "---:|" * len(sizes) + "---:|---:|"]
        for r in result["test"]:
            cells = " | ".join(_pm(r["test_mean"][p], r["test_std"][p]) for p in sizes)
            lines.append(f"| {r['method']} | {r['seeds']} | {_pm(r['worst_mean'], r['worst_std'])} | {cells} | "
                         f"{r['images_seen']} | {r['train_minutes']:.1f} |")
    if result["curves"]:
        values = sorted({v for c in result["curves"].values() for v, _ in c})
        lines += ["", "## Sensitivity (worst-size validation %, seed 0; `fixednorm.png`)", "",
                  "| curve | " + " | ".join(f"{v:g}" for v in values) + " |", "|---|" + "---:|" * len(values)]
        for name, curve in result["curves"].items():
            got = dict(curve)
            lines.append(f"| {name} | " + " | ".join(f"{got[v]:.1f}" if v in got else "–" for v in values) + " |")
        lines += ["", "Loss from the best grid point: within 10x = one half-decade step either side; within 31.6x = "
                  "the worse of the two four-point windows that hold the best inside (none when it is at an edge).", "",
                  "| method | best value | best % | drop within 10x | drop within 31.6x |", "|---|---:|---:|---:|---:|"]
        for name, d in result.get("sensitivity", {}).items():
            thirty = f"{d['drop_30x']:.1f}" if d["drop_30x"] is not None else "–"
            lines.append(f"| {name} | {d['best_value']:g}{' (edge)' if d['at_edge'] else ''} | {d['best']:.1f} | "
                         f"{d['drop_10x']:.1f} | {thirty} |")
    if result.get("head_scale"):
        sizes = sorted(result["head_scale"][0]["val"], key=int)
        lines += ["", "## Head scale S at the best ELR (validation %, seed 0)", "",
                  "| S | worst | " + " | ".join(f"p={p}" for p in sizes) + " |", "|---:|---:|" + "---:|" * len(sizes)]
        for h in result["head_scale"]:
            lines.append(f"| {h['S']:g} | {h['worst']:.1f} | " + " | ".join(f"{h['val'][p]:.1f}" for p in sizes) + " |")
    if result["scratch"]:
        sizes = sorted(next(iter(result["scratch"].values()))["best_val"], key=int)
        lines += ["", "## From scratch (quickstart recipe at reduced budget, validation %, seed 0)", "",
                  "| arm | grid: worst-size % | best | " + " | ".join(f"p={p}" for p in sizes)
                  + " | images per trial | training min |", "|---|---|---|" + "---:|" * len(sizes) + "---:|---:|"]
        for name, s in result["scratch"].items():
            grid = ", ".join(f"{v:g}: {w:.1f}" for v, w in s["curve"])
            best = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in s["best"].items())
            lines.append(f"| {name} | {grid} | {best} | " + " | ".join(f"{s['best_val'][p]:.1f}" for p in sizes)
                         + f" | {s['images_seen_per_trial']} | {s['train_minutes']:.1f} |")
    if result.get("overhead"):
        o = result["overhead"]
        lines += ["", "## Overhead of the projection", "",
                  f"Training seconds of the same 100-step scale-invariant fine-tune, arms alternated: with the "
                  f"projection {', '.join(f'{s:.1f}' for s in o['seconds']['projection'])}; without "
                  f"{', '.join(f'{s:.1f}' for s in o['seconds']['no projection'])}; ratio of medians "
                  f"**{o['ratio']:.3f}x**."]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the quickstart run directory to fine-tune from")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scratch-steps", type=int, default=400)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fixednorm_study")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "fixednorm")
    parser.add_argument("--report-only", action="store_true", help="aggregate finished work, train nothing")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {STAGES}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.report_only:
        for stage in stages:
            try:
                if stage == "finetune":
                    stage_finetune(args.out, args.base, args.jobs)
                elif stage == "winners":
                    stage_winners(args.out, args.base, args.jobs)
                elif stage == "sensitivity":
                    stage_sensitivity(args.out, args.base, args.jobs)
                elif stage == "scratch":
                    stage_scratch(args.out, args.scratch_steps, args.jobs)
                else:
                    stage_overhead(args.out, args.base)
            except (RunError, SearchError) as err:
                parser.exit(1, f"{parser.prog}: error: {err}\n")
            write(collect(args.out, args.base), args.results)
    write(collect(args.out, args.base), args.results)


if __name__ == "__main__":
    main()
