"""Reproduce FlexiViT's flexibility claim on Fashion-MNIST: accuracy vs patch size, one curve per model.

    python tools/reproduce_flexibility.py                       # 3 seeds, recipe budget (hours on 2 CPU cores)
    python tools/reproduce_flexibility.py --steps 1800          # FlexiViTs at half the recipe's steps
    python tools/reproduce_flexibility.py --jobs 2              # two runs at a time (one per core)
    python tools/reproduce_flexibility.py --smoke --out /tmp/r --results /tmp/r   # CI: 1 seed, tiny budget
    python tools/reproduce_flexibility.py --finished-only       # interim report of the runs done so far

For every seed it trains (``flexivit.experiments.flexibility`` holds the plan, ``flexivit.experiments.budget``
its arithmetic):

- a FlexiViT over all sizes (``recipes/fashion_mnist.py``, ``--steps`` steps);
- plain fixed ViTs at a small and a large size: base kernel = the patch size and position grid at its own
  token grid, the same recipe, trained on the same number of images as the FlexiViT (its steps derived
  from the FlexiViT's images, not equal to its steps);
- the same three distilled from the small ViT and initialised from it (``recipes/fashion_mnist_distill.py``):
  the distilled FlexiViT is compared with fixed ViTs distilled from the same teacher;
- a label-only FlexiViT trained for as many FLOPs as the distilled one spent (teacher forwards
  included), so that distillation and labels are compared at equal compute as well as at equal steps.

Each model is then evaluated at every patch size; a fixed ViT is reduced to what it is, its kernel and
grid at its own size (``to_fixed``), and taken to the other sizes through PI-resize and, for comparison,
plain bilinear resizing of the kernel. Every row reports its images seen, training FLOPs and
training-loop wall time. Results: ``flexibility.{md,json,png}`` under ``--results``. ``--finished-only``
trains nothing and reports the runs that have finished, naming the others (JSON ``unfinished``; each
curve lists its ``seeds``).

Every row records what it was derived from: each seed's recipe and overrides (they resolve the run's whole
config), the base it trained (kernel size, position grid, resize operator, kernel learning-rate scale),
what it spent, and its top-1 per seed. ``--rederive`` trains and evaluates nothing: it re-plans every run
from the command recorded in ``flexibility.json``, checks each seed's steps, images per size and GFLOPs
against the plan, rebuilds every mean, target and comparison from the per-seed records, rewrites the
report and exits 1 naming any value that differs.

``--rerun ROW ...`` retrains only those rows (run names such as ``flexi-distilled``, every seed) and the
teachers they distil from, into ``--out``, and puts them into the stored ``flexibility.json`` in place of
their old values; targets and comparisons are recomputed, every other row stays as first measured, and the
rerun's command, code revision and machine are listed under ``reruns``. It must plan as the stored report
was planned (same seeds, sizes, steps, ``--set`` and ``--out``: the teachers' paths are part of the students'
configs), so ``--rederive`` still applies; the rows' old run folders must be gone or moved.

Resumable (``flexivit.experiments.runner``): a finished run is not trained again, an interrupted one
continues from its last checkpoint, and evaluations are cached per run (``flexibility_eval.json``). A run
directory made with other settings (other ``--set`` values, a recipe changed since) is refused before
anything trains. Each run's output goes to ``OUT/<run>.log``, each attempt to ``OUT/runs.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from flexivit.eval.evaluate import evaluate_schemes
from flexivit.provenance import provenance
from flexivit.experiments.budget import ForwardCounter, GFlops
from flexivit.experiments.flexibility import Run, comparisons, plan
from flexivit.experiments.flexibility_files import write_report
from flexivit.experiments.flexibility_report import (distill_vs_labels, merge_rerun, planned_budget, rederive, run_record,
                                                     summarise, target_checks)
from flexivit.experiments.results import maybe_results, read_results
from flexivit.experiments.runner import RunError, Study
from flexivit.model.patch_embed import PatchScheme
from flexivit.model.vit import FlexiViT
from flexivit.model.weights import load_model
from flexivit.train.builders import build_data, eval_loader
from flexivit.train.config import Config, config_from_dict, load_recipe

ROOT = Path(__file__).resolve().parent.parent  # the checkout: default folders of runs and results
SMOKE = ["train.steps=30", "train.log_every=10", "train.checkpoint_every=15", "optim.warmup_steps=5",
         "data.batch_size=64", "train.token_budget=3136"]


def run_budget(run: Run, runs: dict[str, Run], out: Path, gflops: GFlops) -> dict[str, Any]:
    """What ``run`` spent (the plan's budget; images seen and training-loop seconds from its ``eval.json``)
    and what it was made from (``run_record``)."""
    report = read_results(out / run.dir_name)
    return {**planned_budget(run, runs, gflops), "images_seen": report.images_seen,
            "train_seconds": report.train_seconds, **run_record(run)}


# ---- evaluation -------------------------------------------------------------------------------------
def bilinear_kernel(model: FlexiViT) -> Callable[[int], torch.Tensor]:
    """``patch_embed.kernel`` replaced by plain bilinear interpolation of the base kernel (no PI)."""
    weight = model.patch_embed.weight

    def kernel(patch: int) -> torch.Tensor:
        if patch == weight.shape[-1]:
            return weight
        return F.interpolate(weight, size=(patch, patch), mode="bilinear", align_corners=False)

    return kernel


def fixed_model(model: FlexiViT, patch: int, resize: str) -> FlexiViT:
    """The fixed-size ViT that ``model`` is at ``patch`` (its kernel and grid at that size become the
    base), taken to other sizes by PI-resize (``"pi"``) or by bilinear resizing of the kernel."""
    fixed = FlexiViT.from_timm(model.to_fixed(patch), kernel_resize=model.config.kernel_resize)
    if resize == "bilinear":
        fixed.patch_embed.kernel = bilinear_kernel(fixed)
    elif resize != "pi":
        raise ValueError(f"resize must be 'pi' or 'bilinear', got {resize!r}")
    return fixed.eval()


def evaluate_run(run: Run, out: Path, sizes: list[int]) -> dict[str, dict[str, float]]:
    """Top-1 per patch size of each curve of ``run`` (one for FlexiViTs, pi + bilinear for baselines)."""
    run_dir = out / run.dir_name
    cache = run_dir / "flexibility_eval.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("patch_sizes") == sizes:
            return saved["curves"]
    cfg = config_from_dict(Config, json.loads((run_dir / "config.json").read_text()))
    model, _ = load_model(run_dir)
    data = build_data(cfg)
    batches = list(eval_loader(cfg, data, "test"))  # the reported split; decoded once, reused for every curve
    schemes = [PatchScheme(p) for p in sizes]
    hw = (cfg.data.image_size, cfg.data.image_size)
    subjects = {"": model.eval()} if not run.kind.startswith("fixed") else {
        f"/{r}": fixed_model(model, run.train_patch_size, r) for r in ("pi", "bilinear")}
    curves = {}
    for suffix, subject in subjects.items():
        rows = evaluate_schemes(subject, batches, schemes, image_hw=hw)
        curves[run.name + suffix] = {str(r["patch_size"]): r["top1"] for r in rows}
    cache.write_text(json.dumps({"patch_sizes": sizes, "curves": curves}, indent=2) + "\n")
    return curves


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce_flexibility", help="run directories")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results", help="where flexibility.* go")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--sizes", default="2,4,7,14", help="patch sizes of the FlexiViTs and of the evaluation")
    p.add_argument("--small", type=int, default=4, help="the small fixed ViT (and distillation teacher)")
    p.add_argument("--large", type=int, default=14, help="the large fixed ViT")
    p.add_argument("--steps", type=int, help="training steps of the FlexiViTs (default: the recipe's); the fixed "
                                              "ViTs and flexi-equal-flops get theirs from them")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N test images (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override applied to every run")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once (one torch thread each unless OMP_NUM_THREADS is set); "
                        "2 uses both cores of a 2-core machine")
    p.add_argument("--smoke", action="store_true", help="tiny budget for CI: 1 seed, FlexiViTs 30 steps, "
                                                        "300 test images")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: report the runs that have finished, name the others (an interim report)")
    p.add_argument("--rerun", nargs="+", metavar="ROW",
                   help="retrain only these rows (run names, e.g. flexi-distilled) and their teachers, and put them "
                        "into --results/flexibility.json in place of their old values")
    p.add_argument("--rederive", action="store_true",
                   help="train and evaluate nothing: rebuild --results/flexibility.{json,md} from the per-run "
                        "records it holds and the plan of its recorded command; exit 1 naming what differs")
    return p


def planned_runs(args: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[list[Run], list[int], GFlops]:
    """The runs ``args`` ask for, their patch sizes and the forward-FLOP counter their budgets use."""
    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",") if s.strip()]
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if args.small not in sizes or args.large not in sizes or args.small == args.large:
        p.error(f"--small {args.small} and --large {args.large} must be two different sizes among --sizes {sizes}")
    out = args.out.resolve()  # absolute: the teachers' paths go into configs
    extra = list(SMOKE) if args.smoke else []
    eval_limit = 300 if args.smoke and args.eval_limit is None else args.eval_limit
    if args.steps is not None:
        extra.append(f"train.steps={args.steps}")
    if eval_limit is not None:
        extra.append(f"data.eval_limit={eval_limit}")
    extra += args.overrides
    data = build_data(load_recipe("fashion_mnist", extra))
    gflops = ForwardCounter(channels=data.channels, num_classes=data.num_classes)
    try:  # a config the recipe refuses
        return plan(seeds=seeds, small=args.small, large=args.large, sizes=sizes, extra=extra, out=out,
                    gflops=gflops), sizes, gflops
    except ValueError as e:
        p.error(str(e))


def stored_report(results: Path, p: argparse.ArgumentParser,
                  missing: str) -> tuple[Path, dict[str, Any], argparse.Namespace]:
    """``results/flexibility.json``, what it holds and the arguments of the command recorded in it;
    ``missing`` (with ``{path}``) is the error when there is none."""
    path = results / "flexibility.json"
    if not path.exists():
        p.error(missing.format(path=path))
    stored = json.loads(path.read_text())
    return path, stored, p.parse_args(shlex.split(stored["command"])[2:])  # "python tools/reproduce_flexibility.py ARGS"


def rederive_files(results: Path, p: argparse.ArgumentParser) -> int:
    """``--rederive``: check ``results/flexibility.json`` against its own records, then rewrite it and its
    markdown (the records the plan adds included); nothing is written when a value differs."""
    path, stored, recorded = stored_report(
        results, p, "{path} does not exist; point --results at the folder holding flexibility.json")
    runs, _, gflops = planned_runs(recorded, p)
    try:
        result, diffs = rederive(stored, runs, gflops, recorded.small, recorded.large)
    except ValueError as e:
        p.error(str(e))
    if diffs:
        print(f"{path}: {len(diffs)} values differ from what its records re-derive:", *diffs, sep="\n  ")
        return 1
    write_report(result, results)
    print(f"{path}: every value re-derived from its per-run records ({len(runs)} runs re-planned); "
          f"{results / 'flexibility.md'} and its plot rewritten")
    return 0


def evaluate_all(runs: list[Run], by_dir: dict[str, Run], out: Path, sizes: list[int],
                 gflops: GFlops) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each run's top-1 per curve and size, and what it spent."""
    per_run, spent = {}, {}
    for i, run in enumerate(runs, 1):
        print(f"[eval {i}/{len(runs)}] {run.dir_name} at patch sizes {sizes}", flush=True)
        per_run[run.dir_name] = evaluate_run(run, out, sizes)
        spent[run.dir_name] = run_budget(run, by_dir, out, gflops)
    return per_run, spent


PLAN_ARGS = ("seeds", "sizes", "small", "large", "steps", "eval_limit", "overrides", "smoke")


def rerun_rows(args: argparse.Namespace, p: argparse.ArgumentParser, runs: list[Run], sizes: list[int],
               gflops: GFlops, command: str) -> int:
    """``--rerun``: train the named rows and their teachers, then merge them into the stored report."""
    results, out = args.results.resolve(), args.out.resolve()
    path, stored, recorded = stored_report(
        results, p, "--rerun replaces rows of {path}, which does not exist; point --results at its folder")
    differ = [f"--{k.replace('_', '-')}" for k in PLAN_ARGS if getattr(recorded, k) != getattr(args, k)]
    differ += ["--out"] * (recorded.out.resolve() != out)  # the teachers' paths are in the students' configs
    if differ:
        p.error(f"--rerun must plan as {path.name} was planned (`{stored['command']}`); {', '.join(differ)} differ")
    names = list(dict.fromkeys(args.rerun))
    rows = list(dict.fromkeys(run.name for run in runs))
    unknown = [n for n in names if n not in rows]
    if unknown:
        p.error(f"--rerun {' '.join(unknown)}: not a row of the plan ({', '.join(rows)})")
    by_dir = {run.dir_name: run for run in runs}
    chosen = [run for run in runs if run.name in names]
    teachers = [by_dir[f"{run.teacher}-seed{run.seed}"] for run in chosen if run.teacher]
    todo = list({run.dir_name: run for run in [*teachers, *chosen]}.values())  # teachers first, once each
    specs = [run.spec() for run in todo]
    out.mkdir(parents=True, exist_ok=True)
    study = Study(out, jobs=args.jobs)
    try:  # run_all checks every folder's settings before anything trains
        study.run_all(specs)
    except ValueError as e:  # RunError too
        raise SystemExit(f"reproduce_flexibility: {e}") from None
    per_run, spent = evaluate_all(chosen, by_dir, out, sizes, gflops)
    seeds = list(dict.fromkeys(run.seed for run in runs))
    fresh = summarise(chosen, per_run, spent, sizes, seeds)
    record = {**provenance(command=command, root=ROOT), "trained_at": study.trained_at(specs)}
    merged = merge_rerun(stored, fresh, names, record, comparisons(args.small, args.large))
    write_report(merged, results)
    print((results / "flexibility.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    results = args.results.resolve()
    if args.rederive:
        return rederive_files(results, p)
    runs, sizes, gflops = planned_runs(args, p)
    if args.jobs > 1:  # concurrent runs share the cores: one torch thread each unless the caller chose otherwise
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    command = " ".join(["python tools/reproduce_flexibility.py", *(sys.argv[1:] if argv is None else argv)])
    if args.rerun:
        return rerun_rows(args, p, runs, sizes, gflops, command)
    seeds, out = list(dict.fromkeys(run.seed for run in runs)), args.out.resolve()  # in --seeds order
    try:  # run directories made with other settings
        study = Study(out, jobs=args.jobs)
        study.check([run.spec() for run in runs])
    except ValueError as e:  # RunError too
        p.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)

    by_dir = {run.dir_name: run for run in runs}
    if not args.finished_only:
        try:  # a distilled run starts once its teacher has finished
            study.run_all([run.spec() for run in runs])
        except RunError as e:
            raise SystemExit(f"reproduce_flexibility: {e}") from None
    finished = [run for run in runs if maybe_results(out / run.dir_name) is not None]
    if not finished:
        p.error(f"no run under {out} has finished yet; run without --finished-only to train them")
    per_run, spent = evaluate_all(finished, by_dir, out, sizes, gflops)

    result = summarise(finished, per_run, spent, sizes, seeds)
    flexi = next(run for run in runs if run.name == "flexi")  # the FlexiViTs' steps, from the plan
    eval_images = read_results(out / finished[0].dir_name).images("scored")
    result.update(steps=flexi.config().train.steps, eval_images=eval_images,
                  train_minutes=sum(b["train_seconds"] for b in spent.values()) / 60, command=command,
                  unfinished=[run.dir_name for run in runs if run not in finished])
    result["targets"] = target_checks(result)
    result["distill_vs_labels"] = distill_vs_labels(result, comparisons(args.small, args.large))
    write_report(result, results)
    print((results / "flexibility.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
