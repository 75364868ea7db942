"""Reproduce FlexiViT's flexibility claim on Fashion-MNIST: accuracy vs patch size, one curve per model.

    python tools/reproduce_flexibility.py                       # 3 seeds, recipe budget (hours on 2 CPU cores)
    python tools/reproduce_flexibility.py --steps 1800          # FlexiViTs at half the recipe's steps
    python tools/reproduce_flexibility.py --jobs 2              # two runs at a time (one per core)
    python tools/reproduce_flexibility.py --smoke --out /tmp/r --results /tmp/r   # CI: 1 seed, tiny budget
    python tools/reproduce_flexibility.py --finished-only       # interim report of the runs done so far

For every seed it trains (``tools/flexibility_plan.py`` holds the plan and its arithmetic):

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
training-loop wall time. Results: ``flexibility.{md,json,png}`` under ``--results``
(``tools/flexibility_report.py`` writes them). ``--finished-only`` trains nothing and reports the runs that
have finished, naming the others (JSON ``unfinished``; each curve lists its ``seeds``).

Resumable: a run whose ``eval.json`` exists is not trained again, an interrupted one continues from its
last checkpoint, and evaluations are cached per run (``flexibility_eval.json``). A run directory made
with other settings (an earlier protocol, other ``--set`` values) is refused before anything trains.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The sibling module: a script's own directory is on sys.path.
from flexibility_plan import (  # noqa: E402
    ForwardCounter, GFlops, Run, check_settings, comparisons, images_by_patch, plan, run_gflops)
from flexibility_report import distill_vs_labels, summarise, target_checks, write_markdown, write_plot  # noqa: E402
from flexivit.train.builders import build_data, eval_loader  # noqa: E402
from flexivit.model.weights import load_model  # noqa: E402
from flexivit.train.state import find_states  # noqa: E402
from flexivit.train.config import Config, config_from_dict, load_recipe  # noqa: E402
from flexivit.eval.evaluate import evaluate_schemes  # noqa: E402
from flexivit.model.vit import FlexiViT  # noqa: E402
from flexivit.model.patch_embed import PatchScheme  # noqa: E402

SMOKE = ["train.steps=30", "train.log_every=10", "train.checkpoint_every=15", "optim.warmup_steps=5",
         "data.batch_size=64", "train.token_budget=3136"]


def _say(line: str) -> None:
    """One whole line per write, so that concurrent runs' messages do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_run(run: Run, out: Path, index: int, total: int, *, quiet: bool = False) -> None:
    """Train ``run`` into ``out/run.dir_name`` unless it is done.

    ``quiet`` sends the run's own output to ``train.log`` in its directory (for concurrent runs).
    """
    run_dir = out / run.dir_name
    if (run_dir / "eval.json").exists():
        _say(f"[{index}/{total}] {run.dir_name}: done already, skipped")
        return
    cmd = [sys.executable, "-m", "flexivit", "train", run.recipe, "--out", str(run_dir)]
    cmd += [a for o in run.overrides for a in ("--set", o)]
    if find_states(run_dir / "state"):
        cmd.append("--resume")
    _say(f"[{index}/{total}] {run.dir_name}: {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if quiet:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "a") as log:
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    else:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    _say(f"[{index}/{total}] {run.dir_name}: trained in {(time.perf_counter() - t0) / 60:.1f} min")


def train_all(runs: list[Run], out: Path, jobs: int) -> None:
    """Train every run, ``jobs`` at a time; a distilled run starts once its teacher has finished."""
    if jobs <= 1:
        for i, run in enumerate(runs, 1):
            train_run(run, out, i, len(runs))
        return
    # Concurrent runs share the cores: one torch thread each unless the caller chose otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    done: dict[str, Future] = {}

    def job(i: int, run: Run) -> None:
        if run.teacher:
            done[f"{run.teacher}-seed{run.seed}"].result()  # submitted earlier, so running or finished
        train_run(run, out, i, len(runs), quiet=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, run in enumerate(runs, 1):
            done[run.dir_name] = pool.submit(job, i, run)
        for future in done.values():
            future.result()  # re-raise the first failure


def run_budget(run: Run, runs: dict[str, Run], out: Path, gflops: GFlops) -> dict[str, Any]:
    """What ``run`` spent: steps, images per size (sampler draws), images seen and training-loop seconds
    (the trainer's ``eval.json``), training GFLOPs (``flexibility_plan.run_gflops``)."""
    cfg = run.config()
    teacher = runs[f"{run.teacher}-seed{run.seed}"].config() if run.teacher else None
    report = json.loads((out / run.dir_name / "eval.json").read_text())
    return {"steps": cfg.train.steps, "images_by_patch": {str(p): n for p, n in images_by_patch(cfg).items()},
            "images_seen": report["images_seen"], "train_gflops": run_gflops(cfg, gflops, teacher),
            "train_seconds": report["train_seconds"]}


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


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)

    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",") if s.strip()]
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if args.small not in sizes or args.large not in sizes or args.small == args.large:
        p.error(f"--small {args.small} and --large {args.large} must be two different sizes among --sizes {sizes}")
    out, results = args.out.resolve(), args.results.resolve()  # the runs' subprocesses start in the repo root
    extra = list(SMOKE) if args.smoke else []
    eval_limit = 300 if args.smoke and args.eval_limit is None else args.eval_limit
    if args.steps is not None:
        extra.append(f"train.steps={args.steps}")
    if eval_limit is not None:
        extra.append(f"data.eval_limit={eval_limit}")
    extra += args.overrides
    data = build_data(load_recipe("fashion_mnist", extra))
    gflops = ForwardCounter(channels=data.channels, num_classes=data.num_classes)
    try:  # a config the recipe refuses, or run directories made with other settings
        runs = plan(seeds=seeds, small=args.small, large=args.large, sizes=sizes, extra=extra, out=out, gflops=gflops)
        for run in runs:
            check_settings(run, out)
    except ValueError as e:
        p.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)

    by_dir = {run.dir_name: run for run in runs}
    if not args.finished_only:
        train_all(runs, out, args.jobs)
    finished = [run for run in runs if (out / run.dir_name / "eval.json").exists()]
    if not finished:
        p.error(f"no run under {out} has finished yet; run without --finished-only to train them")
    per_run, spent = {}, {}
    for i, run in enumerate(finished, 1):
        print(f"[eval {i}/{len(finished)}] {run.dir_name} at patch sizes {sizes}", flush=True)
        per_run[run.dir_name] = evaluate_run(run, out, sizes)
        spent[run.dir_name] = run_budget(run, by_dir, out, gflops)

    result = summarise(finished, per_run, spent, sizes, seeds)
    flexi = next(run for run in runs if run.name == "flexi")  # the FlexiViTs' steps, from the plan
    command = " ".join(["python tools/reproduce_flexibility.py", *(sys.argv[1:] if argv is None else argv)])
    result.update(steps=flexi.config().train.steps, eval_images=_eval_count(out, finished[0]),
                  train_minutes=sum(b["train_seconds"] for b in spent.values()) / 60, command=command,
                  unfinished=[run.dir_name for run in runs if run not in finished])
    result["targets"] = target_checks(result)
    result["distill_vs_labels"] = distill_vs_labels(result, comparisons(args.small, args.large))
    (results / "flexibility.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, results / "flexibility.md")
    write_plot(result, results / "flexibility.png")
    print((results / "flexibility.md").read_text())
    return 0


def _eval_count(out: Path, run: Run) -> int:
    report = json.loads((out / run.dir_name / "eval.json").read_text())
    return int(report["results"][0]["n"])


if __name__ == "__main__":
    sys.exit(main())
