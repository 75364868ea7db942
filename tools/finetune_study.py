"""Issue 10's fine-tuning target: the default (sampled sizes) fine-tune against a plain fixed-size
fine-tune at every trained size, at the same steps and token budget, on two tasks.

    python tools/finetune_study.py --pretrained runs/qs-seed0 runs/qs-seed1 runs/qs-seed2 \\
        --mnist5k data/mnist5k --lr 1e-3 2e-3 4e-3 8e-3 --jobs 2   # writes docs/results/finetune.{md,json}
    python tools/finetune_study.py --pretrained runs/s --tasks tops --smoke --out /tmp/f --results /tmp/f/finetune

Tasks: ``tops`` is ``recipes/fashion_mnist_finetune.py`` as it is (four upper-body Fashion-MNIST classes);
``digits`` is the same recipe on an image folder of MNIST digits (``tools/make_mnist5k.py``) with all its
classes (``data.classes=null`` lifts the recipe's class list). For every task and pretrained run ``i`` (the
fine-tune's ``train.seed`` is ``i``): one default fine-tune (patch sizes sampled as the recipe samples
them) and, at each size the recipe trains, one plain fixed-size fine-tune (``--patch-size p`` with
``finetune.fixed_lr_scale=1`` and ``finetune.fixed_pull=0``, the best fixed-size setting of
docs/distillation.md). Every run reports its images seen, training GFLOPs and minutes, so that equal
compute is shown rather than assumed.

Targets, per task, on the test split (mean over seeds): at ``--size`` the default within 2 points of
the fixed fine-tune at that size, at every other size within 5 points of the fixed fine-tune at that size.

``--lr A B ...`` trains the whole study at each learning rate (under ``OUT/lrA``, ...) and lets each side
choose its own on the validation split (``choose``): every fixed size the lr best at that size, the
default the lr with the largest worst margin to those fixed fine-tunes; the report holds the chosen runs.

Resumable (``flexivit.experiments.runner``): a finished run is skipped, an interrupted one resumes from its
last checkpoint, and a run directory made with other settings or from another pretrained run (each records
both in ``study_run.json``) is refused before anything trains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from flexivit.experiments.budget import trained_gflops
from flexivit.experiments.results import RunResults, read_results, summarise
from flexivit.experiments.runner import RunError, RunSpec, Study
from flexivit.experiments.search import SearchError, check_data, check_init, run_spec, task_sets
from flexivit.train.config import Config, load_recipe
from flexivit.train.finetune import fixed_size

ROOT = Path(__file__).resolve().parent.parent  # the checkout: default folders of runs and results

RECIPE = "fashion_mnist_finetune"
TASKS = {"tops": "the recipe's task, 4 upper-body Fashion-MNIST classes",
         "digits": "the same recipe on the MNIST-5k image folder, all 10 digit classes"}
PLAIN = ("finetune.fixed_lr_scale=1", "finetune.fixed_pull=0", "finetune.consistency=0")  # no adjustments
CHOSEN_GAP, OTHER_GAP = 2.0, 5.0  # points the default may trail the fixed fine-tune: at --size, elsewhere
KEEP = 0.3  # validation points another learning rate must gain over the incumbent's margin to replace it
SMOKE = ["train.steps=20", "train.log_every=10", "train.checkpoint_every=10", "optim.warmup_steps=5",
         "data.batch_size=4", "train.token_budget=784", "data.eval_limit=200", "data.num_workers=0"]


@dataclass(frozen=True)
class FineTune:
    """One fine-tune of the study; ``sets`` resolve its config with ``RECIPE`` (and ``patch``)."""

    task: str
    seed: int
    pretrained: Path
    patch: int | None  # None: the default fine-tune, sizes sampled
    sets: tuple[str, ...]
    variant: str = ""  # a searched setting's own directory under --out ("lr2e-3"); "" without a search

    @property
    def label(self) -> str:
        return "default" if self.patch is None else fixed_label(self.patch)

    @property
    def path(self) -> Path:
        kind = "default" if self.patch is None else f"fixed-p{self.patch}"
        return Path(self.variant, self.task, f"{kind}-seed{self.seed}")

    def args(self) -> list[str]:
        return [] if self.patch is None else ["--patch-size", str(self.patch)]

    def config(self) -> Config:
        cfg = load_recipe(RECIPE, list(self.sets))
        return cfg if self.patch is None else fixed_size(cfg, self.patch)

    def spec(self) -> RunSpec:
        """The run for ``flexivit.experiments.runner``: ``flexivit finetune PRETRAINED RECIPE ...``."""
        return run_spec(str(self.path), self.sets, recipe=RECIPE, init=str(self.pretrained), args=self.args())


def fixed_label(patch: int) -> str:
    return f"fixed p={patch}"


def plan(pretrained: Sequence[Path], tasks: dict[str, list[str]], sizes: Sequence[int],
         extra: Sequence[str], variant: str = "") -> list[FineTune]:
    """Per task and pretrained run ``i`` (seed ``i``): the default fine-tune, then a plain fixed one per size."""
    return [FineTune(task, seed, run, patch, (*sets, *extra, f"train.seed={seed}", *(PLAIN if patch else ())),
                     variant)
            for task, sets in tasks.items() for seed, run in enumerate(pretrained)
            for patch in (None, *sizes)]


def train_all(fts: list[FineTune], out: Path, jobs: int) -> None:
    """Train every unfinished fine-tune, ``jobs`` at a time; fail after all ran if any failed."""
    if jobs > 1:  # concurrent runs share the cores: one torch thread each unless the caller chose otherwise
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    Study(out, jobs=jobs).run_all([ft.spec() for ft in fts])


def row(reports: list[RunResults], gflops: list[float]) -> dict[str, Any]:
    """Test and validation top-1 (%) mean ± std over seeds, and what a run spent (means)."""
    return {"test": summarise(reports, "scored"), "val": summarise(reports, "val"), "seeds": len(reports),
            "images_seen": statistics.fmean(r.images_seen for r in reports),
            "train_gflops": statistics.fmean(gflops),
            "train_minutes": statistics.fmean(r.train_seconds for r in reports) / 60,
            "test_images": reports[0].images("scored")}


def bound(p: int, size: int) -> float:
    """The most points the default may trail the fixed fine-tune at size ``p``."""
    return -(CHOSEN_GAP if p == size else OTHER_GAP)


def targets(rows: dict[str, dict[str, Any]], sizes: Sequence[int], size: int) -> list[dict[str, Any]]:
    """Per size p: default(p) - fixed p(p) in test points, met if >= -2 at ``size`` and >= -5 elsewhere."""
    checks = []
    for p in sizes:
        default, fixed = rows["default"]["test"]["mean"][p], rows[fixed_label(p)]["test"]["mean"][p]
        checks.append({"size": p, "default": default, "fixed": fixed, "gap": default - fixed,
                       "bound": bound(p, size), "met": default - fixed >= bound(p, size)})
    return checks


def choose(found: dict[str, dict[str, Any]], sizes: Sequence[int], size: int) -> dict[str, Any]:
    """The learning rate of each side, on the validation split; ``found[lr]`` is ``collect``'s per-task result.

    Fixed p=P: the lr with the best validation top-1 at P, averaged over the tasks (per size, which can only
    favour the baseline). Default: the lr with the largest worst margin over tasks and sizes,
    ``default_val(p) - fixed_val(p) - bound(p)`` against the fixed fine-tunes just chosen; the first lr given
    (the incumbent) stays unless another beats its margin by more than ``KEEP`` points."""
    lrs, tasks = list(found), list(next(iter(found.values())))

    def val(lr: str, task: str, label: str, p: int) -> float:
        return found[lr][task]["rows"][label]["val"]["mean"][p]

    fixed_val = {p: {lr: statistics.fmean(val(lr, t, fixed_label(p), p) for t in tasks) for lr in lrs} for p in sizes}
    fixed = {p: max(lrs, key=fixed_val[p].__getitem__) for p in sizes}  # ties: the first, the incumbent
    margins = {lr: min(val(lr, t, "default", p) - val(fixed[p], t, fixed_label(p), p) - bound(p, size)
                       for t in tasks for p in sizes) for lr in lrs}
    best = max(lrs, key=margins.__getitem__)
    default = best if margins[best] > margins[lrs[0]] + KEEP else lrs[0]
    return {"fixed": fixed, "default": default, "fixed_val": fixed_val, "default_margin": margins}


def chosen_tasks(found: dict[str, dict[str, Any]], picked: dict[str, Any], sizes: Sequence[int],
                 size: int) -> dict[str, Any]:
    """Per task: the chosen lr's row of each side (marked with its lr) and the target checks on them."""
    tasks = {}
    for task, t in next(iter(found.values())).items():
        lr_of = {"default": picked["default"], **{fixed_label(p): picked["fixed"][p] for p in sizes}}
        rows = {label: {**found[lr][task]["rows"][label], "lr": lr} for label, lr in lr_of.items()}
        tasks[task] = {"about": t["about"], "rows": rows, "targets": targets(rows, sizes, size)}
    return tasks


def collect(fts: list[FineTune], out: Path, sizes: Sequence[int], size: int) -> dict[str, Any]:
    """Per task: one row per label (default, fixed p=...) and the target checks."""
    tasks = {}
    for task in dict.fromkeys(ft.task for ft in fts):
        mine = [ft for ft in fts if ft.task == task]
        groups: dict[str, list[RunResults]] = {}
        for ft in mine:
            groups.setdefault(ft.label, []).append(read_results(out / ft.path))
        flops = {ft: trained_gflops(out / ft.path) for ft in mine}
        rows = {label: row(reports, [flops[ft] for ft in mine if ft.label == label])
                for label, reports in groups.items()}
        tasks[task] = {"about": TASKS[task], "rows": rows, "targets": targets(rows, sizes, size)}
    return tasks


def _pm(s: dict[str, dict[int, float]], p: int) -> str:
    return f"{s['mean'][p]:.2f} ± {s['std'][p]:.2f}"


def _search_intro(result: dict[str, Any]) -> str:
    lrs = result["search"]["lrs"]
    return (f"Each side's learning rate was chosen on the validation split from {', '.join(lrs)} (every run "
            "trained at each; the first is the incumbent): a fixed fine-tune at p takes the lr with the best "
            "validation top-1 at p, averaged over the tasks; the default takes the lr with the largest worst "
            "margin over tasks and sizes, default − fixed − bound, against those fixed fine-tunes, and keeps the "
            f"incumbent unless another gains more than {KEEP:g} points. Test is reported only for the chosen runs. ")


def _label(label: str, r: dict[str, Any]) -> str:
    return f"{label} (lr {r['lr']})" if "lr" in r else label


def markdown(result: dict[str, Any]) -> str:
    sizes, size, search = result["sizes"], result["size"], result.get("search")
    heads = " | ".join(f"p={p}" for p in sizes)
    lines = ["# Fine-tuning: the default (sampled sizes) vs plain fixed-size fine-tunes (issue 10)", "",
             f"`{result['command']}`", "",
             f"Pretrained runs {result['pretrained']}, fine-tune seeds {result['seeds']} (run i is fine-tuned with "
             f"train.seed=i). Every run fine-tunes `{RECIPE}` for {result['steps']} steps at the recipe's token "
             "budget; `fixed p=P` is `--patch-size P` with " + ", ".join(f"`{s}`" for s in PLAIN) + ". Top-1 (%) "
             "is the mean ± sample std over seeds; images seen, training GFLOPs (3 × the forward FLOPs of each "
             "image at its patch size) and training-loop minutes are means per run (runs started with --jobs "
             "share the cores). " + (_search_intro(result) if search else
                                     "This study tunes nothing: every run uses the recipe as it is (how the "
                                     "recipe's settings were chosen: docs/LOG.md). ")
             + ("The fixed fine-tunes are plain (no lr scale, no pull), docs/distillation.md's best fixed-size "
                "setting at its own size." if search else
                "The plain fixed setting is docs/distillation.md's best fixed-size one, chosen there on test (one "
                "seed, an older pretrained model), which can only favour the fixed baseline."), ""]
    if search:
        lrs = search["lrs"]
        lines += ["## Learning rate, chosen per side on the validation split", "",
                  "| side: validation score | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen |",
                  "|---|" + "---:|" * len(lrs) + "---|"]
        lines += [f"| fixed p={p}: top-1 at p={p}, mean over tasks | "
                  + " | ".join(f"{search['fixed_val'][p][lr]:.2f}" for lr in lrs) + f" | {search['fixed'][p]} |"
                  for p in sizes]
        lines += ["| default: worst margin over tasks and sizes | "
                  + " | ".join(f"{search['default_margin'][lr]:+.2f}" for lr in lrs) + f" | {search['default']} |", ""]
    for task, t in result["tasks"].items():
        rows = t["rows"]
        first = next(iter(rows.values()))
        lines += [f"## {task}: {t['about']}", "", f"Test split ({first['test_images']} images):", "",
                  f"| fine-tune | {heads} | images seen | GFLOPs | minutes |", "|---|" + "---:|" * (len(sizes) + 3)]
        lines += [f"| {_label(label, r)} | " + " | ".join(_pm(r["test"], p) for p in sizes)
                  + f" | {r['images_seen']:.0f} | {r['train_gflops']:.4g} | {r['train_minutes']:.1f} |"
                  for label, r in rows.items()]
        lines += ["", "Validation split, mean:", "", f"| fine-tune | {heads} |", "|---|" + "---:|" * len(sizes)]
        lines += [f"| {_label(label, r)} | " + " | ".join(f"{r['val']['mean'][p]:.2f}" for p in sizes) + " |"
                  for label, r in rows.items() if r["val"]]
        lines += ["", f"Targets (test, points): default − fixed p=P at P, ≥ −{CHOSEN_GAP:g} at p={size}, "
                  f"≥ −{OTHER_GAP:g} at every other size:", "",
                  "| size | default | fixed at that size | default − fixed | bound | met |",
                  "|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {c['size']} | {c['default']:.2f} | {c['fixed']:.2f} | {c['gap']:+.2f} | {c['bound']:g} | "
                  f"{'yes' if c['met'] else 'no'} |" for c in t["targets"]]
        lines += ["", f"All met: {'yes' if all(c['met'] for c in t['targets']) else 'no'}.", ""]
    return "\n".join(lines)


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", type=Path, nargs="+", required=True, help="FlexiViT run dirs, one per seed")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune_study", help="run directories")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "finetune",
                   help="path without suffix: .md and .json are written")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--mnist5k", type=Path, help="the digits task's image folder (tools/make_mnist5k.py)")
    p.add_argument("--size", type=int, default=7, help="the deployment size held to the 2-point target")
    p.add_argument("--steps", type=int, help="fine-tuning steps of every run (default: the recipe's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override applied to every run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one torch thread each unless "
                                                       "OMP_NUM_THREADS is set)")
    p.add_argument("--lr", nargs="+", default=[], metavar="LR",
                   help="learning rates each side chooses from on the validation split (the first is the "
                        "incumbent; each one's runs go to OUT/lr<LR>); one value: every run's lr, nothing chosen")
    p.add_argument("--smoke", action="store_true", help="tiny budget for tests: 20 steps, 200 evaluation images")
    args = p.parse_args(argv)
    extra = [*(SMOKE if args.smoke else []), *([f"train.steps={args.steps}"] if args.steps else []), *args.overrides]
    lrs = list(args.lr)
    if len(lrs) == 1:
        extra.append(f"optim.lr={lrs.pop()}")
    out, results = args.out.resolve(), args.results.resolve()  # resolved: the runs' subprocesses may start elsewhere
    try:
        sizes = load_recipe(RECIPE, extra).patch.sizes
        if args.size not in sizes:
            raise SearchError(f"--size {args.size} is not a size the recipe trains ({sizes})")
        if args.jobs < 1:
            raise SearchError("--jobs must be at least 1")
        if len(set(lrs)) < len(lrs) or not all(_positive(lr) for lr in lrs):
            raise SearchError(f"--lr takes distinct positive numbers, got {' '.join(args.lr)}")
        for run in args.pretrained:
            check_init(str(run))
        tasks = {task: task_sets(task, args.mnist5k) for task in args.tasks}
        for sets in tasks.values():
            if sets:  # a folder: one clear error for a missing or too small one, before any run
                check_data(RECIPE, [*sets, *extra])
        pretrained = [r.resolve() for r in args.pretrained]
        variants = ({lr: plan(pretrained, tasks, sizes, [*extra, f"optim.lr={lr}"], f"lr{lr}") for lr in lrs}
                    or {"": plan(pretrained, tasks, sizes, extra)})
        fts = [ft for group in variants.values() for ft in group]
        Study(out).check([ft.spec() for ft in fts])
    except (ValueError, FileNotFoundError) as err:  # a bad argument, folder or run directory (SearchError too)
        p.error(str(err))
    try:
        train_all(fts, out, args.jobs)
    except RunError as err:
        p.exit(1, f"{p.prog}: error: {err}\n")
    command = " ".join(["python tools/finetune_study.py", *(sys.argv[1:] if argv is None else argv)])
    found = {lr: collect(group, out, sizes, args.size) for lr, group in variants.items()}
    result = {"command": command, "recipe": RECIPE, "pretrained": [str(r) for r in args.pretrained],
              "seeds": list(range(len(args.pretrained))), "sizes": sizes, "size": args.size,
              "steps": fts[0].config().train.steps, "overrides": extra}
    if lrs:
        picked = choose(found, sizes, args.size)
        result |= {"search": {"lrs": lrs, **picked}, "tasks": chosen_tasks(found, picked, sizes, args.size)}
    else:
        result["tasks"] = found[""]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_name(results.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    results.with_name(results.name + ".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
