"""Issue 29's check of the fixed-norm result on a task it was not tuned on: AdamW against fixed-norm
fine-tuning, each at its own step size chosen on validation, then three seeds of each winner on test.

    python tools/make_mnist5k.py data/mnist5k
    OMP_NUM_THREADS=1 python tools/fixednorm_transfer.py --base runs/quickstart --data data/mnist5k
    python tools/fixednorm_transfer.py --base runs/quickstart --data data/mnist5k --report-only

The fashion study (``tools/fixednorm_study.py``, ``docs/results/fixednorm.md``) tuned the fixed-norm recipe
on the four-garment Fashion-MNIST task. Here the same start, a quickstart model, is fine-tuned onto an image
folder with all its classes (``data.classes=null``; by default the MNIST-5k digits): AdamW is
``fashion_mnist_finetune`` over ``--lrs`` at the recipe's weight decay, fixed-norm is
``fashion_mnist_fixednorm`` over ``--elrs``: five half-decade values each. On the digits a first AdamW grid
that stopped at 1e-2 had its best there, so both grids reach half a decade above the fashion study's best.
Stages, each resumable (finished runs are skipped):

- ``search``: both grids through ``flexivit search`` (seed 0, validation only, ranked by the worst size);
- ``winners``: each method's best setting fine-tuned with ``--seeds`` and scored on the test split.

Every run is one process with one data process (``data.num_workers=0``); with ``OMP_NUM_THREADS=1`` and
``--jobs 2`` two share the two development cores. The report (``--results``, default
``docs/results/fixednorm_mnist5k.{md,json}``) goes through ``flexivit.provenance.write_result`` and holds
every trial's validation accuracy and every seed's validation and test accuracy per patch size, its images,
training seconds (inside the training loop) and CPU seconds (the whole process, start-up and evaluation
included).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from flexivit.experiments.results import read_jsonl, read_results
from flexivit.experiments.runner import RunError, Study
from flexivit.experiments.search import SearchError, run_search, run_spec
from flexivit.provenance import write_result
from flexivit.train.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent  # the checkout: default folders of runs and results

METHODS = {  # name -> (recipe, the key its grid sweeps)
    "AdamW": ("fashion_mnist_finetune", "optim.lr"),
    "fixed-norm": ("fashion_mnist_fixednorm", "optim.elr"),
}
STAGES = ("search", "winners")


def common_sets(data: str) -> list[str]:
    """The task: every class of the image folder ``data``, one data process per run."""
    return [f"data.source={data}", "data.classes=null", "data.num_workers=0"]


def folder(name: str) -> str:
    return name.lower().replace("-", "")


def stage_search(args: argparse.Namespace) -> None:
    for name, (recipe, key) in METHODS.items():
        grid = args.lrs if name == "AdamW" else args.elrs
        run_search(recipe=recipe, grid_specs=[f"{key}={grid}"], seeds=[0], steps=args.steps, metric="worst",
                   jobs=args.jobs, out=args.out / f"search_{folder(name)}", overrides=common_sets(args.data),
                   init=args.base)


def best_values(args: argparse.Namespace, name: str) -> dict[str, str]:
    """The winning setting of ``name``'s search: the best worst-size validation top-1 (on a tie the smaller
    step size; ``search.jsonl`` lists trials in the order they finished)."""
    key = METHODS[name][1]
    records = sorted(read_jsonl(args.out / f"search_{folder(name)}" / "search.jsonl"), key=lambda r: float(r["values"][key]))
    if not records:
        raise SearchError(f"no finished trial of {name} in {args.out}; run the search stage first")
    return max(records, key=lambda r: min(r["val"].values()))["values"]


def winner_specs(args: argparse.Namespace) -> list:
    specs = []
    for name, (recipe, _) in METHODS.items():
        sets = [*common_sets(args.data), *(f"{k}={v}" for k, v in best_values(args, name).items()),
                *([f"train.steps={args.steps}"] if args.steps else []), "train.test_eval=true"]
        specs += [run_spec(f"winners/{folder(name)}-seed{seed}", [*sets, f"train.seed={seed}"], recipe=recipe,
                           init=args.base) for seed in args.seeds]
    return specs


def _cpu_s(study: Study, name: str) -> float | None:
    """CPU seconds of the attempts that ran ``name`` (a resumed run: all its attempts)."""
    ran = [a["cpu_s"] for a in study.attempts(name) if a["status"] in ("finished", "failed")]
    return sum(ran) if ran else None


def _pct(top1: dict[str, float]) -> dict[str, float]:
    return {p: 100 * v for p, v in sorted(top1.items(), key=lambda kv: int(kv[0]))}


def collect(args: argparse.Namespace) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for name, (recipe, key) in METHODS.items():
        out = args.out / f"search_{folder(name)}"
        search = Study(out)
        trials = [{"value": r["values"][key], "val": _pct(r["val"]), "worst_val": 100 * min(r["val"].values()),
                   "images_seen": r["images_seen"], "train_seconds": r["train_seconds"],
                   "cpu_seconds": _cpu_s(search, f"trials/{r['trial']}")}
                  for r in read_jsonl(out / "search.jsonl")]
        trials.sort(key=lambda t: float(t["value"]))
        study = Study(args.out)
        seeds = []
        for seed in args.seeds:
            run = f"winners/{folder(name)}-seed{seed}"
            if not (args.out / run / "eval.json").is_file():
                continue
            report = read_results(args.out / run)
            test, val = report.percent("test"), report.percent("val")
            seeds.append({"seed": seed, "test": test, "val": val, "worst_test": min(test.values()),
                          "worst_val": min(val.values()), "test_images": report.images("test"),
                          "val_images": report.images("val"), "images_seen": report.images_seen,
                          "train_seconds": report.train_seconds, "cpu_seconds": _cpu_s(study, run)})
        best = max(trials, key=lambda t: t["worst_val"]) if trials else None
        methods[name] = {"recipe": recipe, "key": key, "trials": trials, "best": best and best["value"],
                         "winner_seeds": seeds}
    steps = {name: args.steps or load_recipe(recipe).train.steps for name, (recipe, _) in METHODS.items()}
    return {"base": args.base, "data": args.data, "steps": steps, "methods": methods, "note": args.note,
            "seeds": list(args.seeds), "split": "search: validation (seed 0); winners: validation and test"}


def _pm(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def markdown(result: dict[str, Any]) -> str:
    methods = result["methods"]
    lines = ["# Fixed-norm vs AdamW fine-tuning on a task neither was tuned on (MNIST-5k digits)", "",
             f"From the quickstart model `{result['base']}` onto the image folder `{result['data']}` with all its "
             "classes, sizes 2 / 4 / 7 / 14 sampled as `fashion_mnist_finetune` samples them, "
             f"{' / '.join(str(v) for v in result['steps'].values())} steps per run (AdamW / fixed-norm). AdamW: `fashion_mnist_finetune` (weight decay "
             "0.05) over the learning rate; fixed-norm: `fashion_mnist_fixednorm` over the ELR (`optim.lr` 1e-3 for "
             "the tensors outside the fixed norm, head S = 2). Step sizes chosen on the validation split by the worst "
             "size, seed 0; each winner then re-run with seeds "
             f"{', '.join(map(str, result['seeds']))} and scored on test. Runs two at a time, one thread each, on 2 "
             "shared cores under load from other jobs: seconds are a rough cost, not a timing.",
             *(["", result["note"]] if result.get("note") else []), "",
             "## Search (validation, seed 0, worst size %)", "",
             "| method | step size: worst-size val % | best | trials | images per trial | training s (sum) | CPU s (sum) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, m in methods.items():
        grid = ", ".join(f"{t['value']}: {t['worst_val']:.1f}" for t in m["trials"])
        cpu = [t["cpu_seconds"] for t in m["trials"] if t["cpu_seconds"] is not None]
        images = m["trials"][0]["images_seen"] if m["trials"] else 0
        unrecorded = f" ({len(cpu)} of {len(m['trials'])} trials recorded)" if len(cpu) < len(m["trials"]) else ""
        lines.append(f"| {name} | {grid} | {m['key']}={m['best']} | {len(m['trials'])} | {images} | "
                     f"{sum(t['train_seconds'] or 0 for t in m['trials']):.0f} | {sum(cpu):.0f}{unrecorded} |")
    sizes = next((list(s["test"]) for m in methods.values() for s in m["winner_seeds"]), [])
    for split in ("test", "val"):
        title = "Winners on the test split (reported)" if split == "test" else "Winners on the validation split"
        lines += ["", f"## {title}: mean ± std over seeds (%)", "",
                  "| method | setting | seeds | worst size | " + " | ".join(f"p={p}" for p in sizes)
                  + " | images scored | images seen | training s | CPU s |",
                  "|---|---|---:|---:|" + "---:|" * len(sizes) + "---:|---:|---:|---:|"]
        for name, m in methods.items():
            runs = m["winner_seeds"]
            if not runs:
                continue
            cells = " | ".join(_pm([r[split][p] for r in runs]) for p in sizes)
            cpu = [r["cpu_seconds"] for r in runs if r["cpu_seconds"] is not None]
            lines.append(f"| {name} | {m['key']}={m['best']} | {len(runs)} | {_pm([r[f'worst_{split}'] for r in runs])} | "
                         f"{cells} | {runs[0][f'{split}_images']} | {runs[0]['images_seen']} | "
                         f"{statistics.mean(r['train_seconds'] for r in runs):.0f} | "
                         f"{statistics.mean(cpu) if cpu else float('nan'):.0f} |")
    lines += ["", "Per seed (test, worst size %): " + "; ".join(
        f"{name} " + ", ".join(f"seed {r['seed']} {r['worst_test']:.1f}" for r in m["winner_seeds"])
        for name, m in methods.items() if m["winner_seeds"])]
    worst = {name: {r["seed"]: r["worst_test"] for r in m["winner_seeds"]} for name, m in methods.items()}
    both = sorted(set(worst["fixed-norm"]) & set(worst["AdamW"]))
    if both:  # a seed draws the held-out splits too (data.val_fraction from train.seed): pairs share them
        diffs = [worst["fixed-norm"][s] - worst["AdamW"][s] for s in both]
        lines += ["", "Paired by seed (the same train / validation / test split, drawn from the seed), fixed-norm − "
                  "AdamW at the worst test size: " + ", ".join(f"{d:+.1f}" for d in diffs) + f" (mean {statistics.mean(diffs):+.1f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the quickstart run directory to fine-tune from")
    parser.add_argument("--data", required=True, help="an image folder (tools/make_mnist5k.py writes the digits)")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2", help="AdamW learning rates (comma list)")
    parser.add_argument("--elrs", default="0.003,0.01,0.03,0.1,0.3", help="fixed-norm ELR values (comma list)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of each winner's test runs")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the recipes' 400)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fixednorm_transfer")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "fixednorm_mnist5k")
    parser.add_argument("--report-only", action="store_true", help="aggregate finished work, train nothing")
    parser.add_argument("--note", default="", help="a paragraph for the report: how the runs were made, if not "
                                                   "by one command")
    args = parser.parse_args()
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {STAGES}")
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data} is not a folder; write the digits with tools/make_mnist5k.py")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.report_only:
        try:
            if "search" in stages:
                stage_search(args)
            if "winners" in stages:
                Study(args.out, jobs=args.jobs).run_all(winner_specs(args))
        except (RunError, SearchError) as err:
            parser.exit(1, f"{parser.prog}: error: {err}\n")
    result = collect(args)
    try:  # the winners' runs (each search's trials keep theirs in their own folders)
        trained = Study(args.out).trained_at(winner_specs(args))
    except SearchError:  # no search has finished: no winner ran
        trained = None
    json_path, md_path = write_result(args.results, result, markdown(result), trained_at=trained)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
