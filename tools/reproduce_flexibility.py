"""Reproduce FlexiViT's flexibility claim on Fashion-MNIST: accuracy vs patch size, one curve per model.

    python tools/reproduce_flexibility.py                       # 3 seeds, recipe budget (hours on 2 CPU cores)
    python tools/reproduce_flexibility.py --steps 400           # the reduced budget of docs/ablation.md
    python tools/reproduce_flexibility.py --jobs 2              # two runs at a time (one per core)
    python tools/reproduce_flexibility.py --smoke --out /tmp/r --results /tmp/r   # CI: 1 seed x 30 steps

For every seed it trains, with the same recipe and number of steps (``recipes/fashion_mnist.py``):
a fixed-patch ViT at a small size and one at a large size (``patch.sizes=[p]``), a FlexiViT over all
sizes, and a FlexiViT distilled from the small-size baseline and initialised from it
(``recipes/fashion_mnist_distill.py``). Each model is then evaluated at every patch size; a fixed
baseline is first reduced to what it really is, its kernel and position grid at its own size
(``to_fixed``), and taken to the other sizes through PI-resize and, for comparison, plain bilinear
resizing of the kernel. Results: ``flexibility.{md,json,png}`` under ``--results``.

Resumable: a run whose ``eval.json`` exists is not trained again, an interrupted one continues from
its last checkpoint, and evaluations are cached per run (``flexibility_eval.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flexivit.builders import build_data, eval_loader  # noqa: E402
from flexivit.checkpoint import find_states, load_model  # noqa: E402
from flexivit.config import Config, config_from_dict, load_recipe  # noqa: E402
from flexivit.evaluate import evaluate_schemes  # noqa: E402
from flexivit.model import FlexiViT  # noqa: E402
from flexivit.patch_embed import PatchScheme  # noqa: E402

SMOKE = ["train.steps=30", "train.log_every=10", "train.checkpoint_every=15", "optim.warmup_steps=5",
         "data.batch_size=64", "train.token_budget=3136"]


@dataclass(frozen=True)
class Run:
    """One training run of the reproduction."""

    name: str  # run directory name, also the curve family
    kind: str  # "fixed" | "flexi" | "flexi-distilled"
    seed: int
    recipe: str
    overrides: tuple[str, ...]
    train_patch_size: int | None = None
    teacher: str | None = None  # name of the run it distils from (same seed)

    @property
    def dir_name(self) -> str:
        return f"{self.name}-seed{self.seed}"


def plan(seeds: list[int], small: int, large: int, sizes: list[int]) -> list[Run]:
    """Every run, in dependency order (the small baseline before the student distilled from it)."""
    runs = []
    uniform = ("patch.distribution=uniform", "patch.weights=none")
    # The recipe's own sampling weights hold for its own sizes only; other sizes are drawn uniformly.
    own = sizes == load_recipe("fashion_mnist").patch.sizes
    for seed in seeds:
        for p in (small, large):
            fixed = (f"train.seed={seed}", f"patch.sizes={p}", f"patch.default={p}", f"patch.eval_sizes={p}",
                     *uniform)
            runs.append(Run(f"fixed-p{p}", "fixed", seed, "fashion_mnist", fixed, p))
        flexi = (f"train.seed={seed}", f"patch.sizes={','.join(map(str, sizes))}", *(() if own else uniform))
        runs.append(Run("flexi", "flexi", seed, "fashion_mnist", flexi))
        runs.append(Run("flexi-distilled", "flexi-distilled", seed, "fashion_mnist_distill", flexi,
                        teacher=f"fixed-p{small}"))
    return runs


def _say(line: str) -> None:
    """One whole line per write, so that concurrent runs' messages do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_run(run: Run, out: Path, extra: list[str], index: int, total: int, *, quiet: bool = False) -> float:
    """Train ``run`` into ``out/run.dir_name`` unless it is done; returns the wall time spent (s).

    ``quiet`` sends the run's own output to ``train.log`` in its directory (for concurrent runs).
    """
    run_dir = out / run.dir_name
    if (run_dir / "eval.json").exists():
        _say(f"[{index}/{total}] {run.dir_name}: done already, skipped")
        return 0.0
    overrides = [*run.overrides, *extra]
    if run.teacher:
        overrides.append(f"distill.teacher={out / f'{run.teacher}-seed{run.seed}'}")
    cmd = [sys.executable, "-m", "flexivit", "train", run.recipe, "--out", str(run_dir)]
    cmd += [a for o in overrides for a in ("--set", o)]
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
    seconds = time.perf_counter() - t0
    (run_dir / "wall_time.json").write_text(json.dumps({"train_seconds": seconds}) + "\n")
    _say(f"[{index}/{total}] {run.dir_name}: trained in {seconds / 60:.1f} min")
    return seconds


def train_all(runs: list[Run], out: Path, extra: list[str], jobs: int) -> None:
    """Train every run, ``jobs`` at a time; a distilled run starts once its teacher has finished."""
    if jobs <= 1:
        for i, run in enumerate(runs, 1):
            train_run(run, out, extra, i, len(runs))
        return
    # Concurrent runs share the cores: one torch thread each unless the caller chose otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    done: dict[str, Future] = {}

    def job(i: int, run: Run) -> float:
        if run.teacher:
            done[f"{run.teacher}-seed{run.seed}"].result()  # submitted earlier, so running or finished
        return train_run(run, out, extra, i, len(runs), quiet=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, run in enumerate(runs, 1):
            done[run.dir_name] = pool.submit(job, i, run)
        for future in done.values():
            future.result()  # re-raise the first failure


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
    subjects = {"": model.eval()} if run.kind != "fixed" else {
        f"/{r}": fixed_model(model, run.train_patch_size, r) for r in ("pi", "bilinear")}
    curves = {}
    for suffix, subject in subjects.items():
        rows = evaluate_schemes(subject, batches, schemes, image_hw=hw)
        curves[run.name + suffix] = {str(r["patch_size"]): r["top1"] for r in rows}
    cache.write_text(json.dumps({"patch_sizes": sizes, "curves": curves}, indent=2) + "\n")
    return curves


# ---- report -----------------------------------------------------------------------------------------
def summarise(runs: list[Run], per_run: dict[str, dict[str, dict[str, float]]], sizes: list[int],
              seeds: list[int]) -> dict[str, Any]:
    curves: dict[str, Any] = {}
    for run in runs:
        for name, top1 in per_run[run.dir_name].items():
            entry = curves.setdefault(name, {
                "kind": run.kind, "train_patch_size": run.train_patch_size,
                "resize": name.split("/")[1] if "/" in name else None, "_values": {str(p): [] for p in sizes}})
            for p in sizes:
                entry["_values"][str(p)].append(top1[str(p)])
    for entry in curves.values():
        values = entry.pop("_values")
        entry["top1_mean"] = {p: statistics.fmean(v) for p, v in values.items()}
        entry["top1_std"] = {p: statistics.stdev(v) if len(v) > 1 else 0.0 for p, v in values.items()}
    return {"patch_sizes": sizes, "seeds": seeds, "curves": curves}


def target_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two targets, for each FlexiViT against each baseline (through PI-resize)."""
    sizes, curves, checks = result["patch_sizes"], result["curves"], []
    for flexi_name, flexi in curves.items():
        if flexi["kind"] == "fixed":
            continue
        for base_name, base in curves.items():
            if base["kind"] != "fixed" or base["resize"] != "pi":
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


def write_markdown(result: dict[str, Any], path: Path) -> None:
    sizes = result["patch_sizes"]
    lines = [
        "# Flexibility on Fashion-MNIST: top-1 (%) vs patch size",
        "",
        f"Mean ± std over seeds {result['seeds']}; {result['steps']} training steps per model, same recipe "
        f"(`{result['command']}`); {result['eval_images']} test images; {result['train_minutes']:.1f} minutes "
        "of training, the sum of every run's wall time (runs started with --jobs overlap).",
        "",
        "| model | kind | trained at | resize | " + " | ".join(f"p={p}" for p in sizes) + " |",
        "|---|---|---:|---|" + "---:|" * len(sizes),
    ]
    for name, c in result["curves"].items():
        cells = [f"{100 * c['top1_mean'][str(p)]:.1f} ± {100 * c['top1_std'][str(p)]:.1f}" for p in sizes]
        lines.append(f"| {name} | {c['kind']} | {c['train_patch_size'] or 'all'} | {c['resize'] or '-'} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Targets (FlexiViT vs each baseline through PI-resize; value in points):", "",
              "| FlexiViT | baseline | target | value | met |", "|---|---|---|---:|---|"]
    for c in result["targets"]:
        lines.append(f"| {c['flexi']} | {c['baseline']} | {c['target']} | {c['value']:+.1f} | "
                     f"{'yes' if c['met'] else 'no'} |")
    lines += ["", "![accuracy vs patch size](flexibility.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["patch_sizes"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, c in result["curves"].items():
        mean = [100 * c["top1_mean"][str(p)] for p in sizes]
        std = [100 * c["top1_std"][str(p)] for p in sizes]
        style = "--" if c["resize"] == "bilinear" else "-"
        ax.errorbar(sizes, mean, yerr=std, linestyle=style, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(p) for p in sizes])
    ax.minorticks_off()
    ax.set_xlabel("patch size (pixels, 28 px images)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"Fashion-MNIST, {result['steps']} steps, seeds {result['seeds']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce_flexibility", help="run directories")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results", help="where flexibility.* go")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--sizes", default="2,4,7,14", help="patch sizes of the FlexiViTs and of the evaluation")
    p.add_argument("--small", type=int, default=4, help="the small-patch baseline (and distillation teacher)")
    p.add_argument("--large", type=int, default=14, help="the large-patch baseline")
    p.add_argument("--steps", type=int, help="training steps of every model (default: the recipe's)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N test images (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override applied to every run")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once (one torch thread each unless OMP_NUM_THREADS is set); "
                        "2 uses both cores of a 2-core machine")
    p.add_argument("--smoke", action="store_true", help="tiny budget for CI: 1 seed x 30 steps, 300 test images")
    args = p.parse_args(argv)

    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",") if s.strip()]
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if args.small not in sizes or args.large not in sizes:
        p.error(f"--small {args.small} and --large {args.large} must be among --sizes {sizes}")
    extra = list(SMOKE) if args.smoke else []
    eval_limit = 300 if args.smoke and args.eval_limit is None else args.eval_limit
    if args.steps is not None:
        extra.append(f"train.steps={args.steps}")
    if eval_limit is not None:
        extra.append(f"data.eval_limit={eval_limit}")
    extra += args.overrides
    runs = plan(seeds, args.small, args.large, sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)

    train_all(runs, args.out, extra, args.jobs)
    per_run = {}
    for i, run in enumerate(runs, 1):
        print(f"[eval {i}/{len(runs)}] {run.dir_name} at patch sizes {sizes}", flush=True)
        per_run[run.dir_name] = evaluate_run(run, args.out, sizes)

    first = json.loads((args.out / runs[0].dir_name / "config.json").read_text())
    minutes = sum(json.loads(f.read_text())["train_seconds"] for f in args.out.glob("*/wall_time.json")) / 60
    result = summarise(runs, per_run, sizes, seeds)
    command = " ".join(["python tools/reproduce_flexibility.py", *(sys.argv[1:] if argv is None else argv)])
    result.update(steps=first["train"]["steps"], eval_images=_eval_count(args.out, runs[0]),
                  train_minutes=minutes, command=command)
    result["targets"] = target_checks(result)
    (args.results / "flexibility.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.results / "flexibility.md")
    write_plot(result, args.results / "flexibility.png")
    print((args.results / "flexibility.md").read_text())
    return 0


def _eval_count(out: Path, run: Run) -> int:
    report = json.loads((out / run.dir_name / "eval.json").read_text())
    return int(report["results"][0]["n"])


if __name__ == "__main__":
    sys.exit(main())
