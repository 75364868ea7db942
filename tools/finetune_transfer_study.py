"""Issue 27, part 3 (claim 21, cheap transfer): fine-tune at one patch size, deploy at every size.

    python tools/finetune_transfer_study.py --pretrained runs/qs-seed0 runs/qs-seed1 runs/qs-seed2 \\
        --mnist5k data/mnist5k --keep finetune.consistency=1 finetune.consistency_share=1 --keep-scales 2 1 \\
        --jobs 2 --out runs/transfer --results docs/results/finetune_transfer

For each task (``tops``: the recipe's four upper-body garments; ``digits``: the MNIST-5k folder, all classes)
and pretrained run ``i`` (fine-tuned with ``train.seed=i``), the arms are:

- ``fixed-pP``: a plain fixed fine-tune at every trained size ``P`` (``--patch-size P``, nothing kept), at the
  learning rate docs/results/finetune.md chose for it on the validation split (``FIXED_LR``);
- ``flexible``: the default fine-tune (sizes sampled), at the recipe's lr;
- ``keep-pP``: ``--patch-size P`` with the ``--keep`` settings at ``finetune.fixed_lr_scale`` = each of
  ``--keep-scales`` (``keep-pP`` at the first, ``keep-pP-scaleS`` at the others), for each ``--keep-at`` size;
- ``cheap-p14``: ``keep-p14`` cut to the most steps whose fine-tuning GFLOPs stay within a quarter of the plain
  fixed fine-tune at 7 (the issue's cost target for the cheap transfer), at each scale as well.

Each kept arm's scale is chosen on validation (``choose_scales``, the rule in docs/LOG.md): the higher mean over
tasks of the mean over seeds of each seed's worst size; under ``TIE`` points apart, the first scale stays.

Every arm states images, fine-tuning GFLOPs (``FWD_BWD`` × forward GFLOPs per trained image, the consistency
term's second forward included) and training minutes. Test is the reported split; validation is kept beside
it. The issue's targets are checked on the test means (``targets``). Runs go through
``flexivit.experiments.runner`` (finished runs are skipped, interrupted ones resumed); the report is written
with ``flexivit.provenance.write_result``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from flexivit.eval.measure import count_gflops
from flexivit.experiments.budget import finetune_gflops
from flexivit.experiments.results import arms_over_seeds, mean_std_by_key
from flexivit.experiments.runner import Study
from flexivit.experiments.search import SearchError, run_spec, task_sets
from flexivit.model.weights import load_model
from flexivit.provenance import write_result
from flexivit.train.config import Config, load_recipe
from flexivit.train.finetune import fixed_size

RECIPE = "fashion_mnist_finetune"
TASKS = {"tops": "the recipe's 4 upper-body Fashion-MNIST classes", "digits": "MNIST-5k digits, all 10 classes"}
# Chosen on the validation split over 1e-3 / 2e-3 / 4e-3 / 8e-3 per fixed size, both tasks (docs/results/finetune.md).
FIXED_LR = {2: 2e-3, 4: 4e-3, 7: 8e-3, 14: 8e-3}
PLAIN = ("finetune.fixed_lr_scale=1", "finetune.fixed_pull=0", "finetune.fixed_others=0", "finetune.consistency=0")
CHEAP_SHARE = 0.25  # the cheap transfer may spend this share of the plain fixed fine-tune at 7's GFLOPs
CHEAP_OF = 7
KEEP_GAP, FLEX_GAP, OWN_GAP = 2.0, 3.0, 1.0  # the targets, in test points
TIE = 0.5  # validation points another lr scale must gain to replace the first (docs/LOG.md)
KEPT = ("keep-p14", "keep-p7", "cheap-p14")  # arm families whose lr scale is chosen


def scaled(family: str, scale: float, scales: Sequence[float]) -> str:
    """The arm name of a kept ``family`` at lr ``scale``: the family itself at the first scale."""
    return family if scale == scales[0] else f"{family}-scale{scale:g}"


def arm_runs(base: Sequence[str], keep: Sequence[str], keep_scales: Sequence[float], keep_at: Sequence[int],
             sizes: Sequence[int], cheap_steps: int | None) -> dict[str, tuple[list[str], int | None]]:
    """``arm -> (--set values, --patch-size or None)`` for one task and seed (``base`` holds both)."""
    arms: dict[str, tuple[list[str], int | None]] = {
        f"fixed-p{p}": ([*base, *PLAIN, f"optim.lr={FIXED_LR[p]:g}"], p) for p in sizes}
    arms["flexible"] = (list(base), None)
    for scale in keep_scales:
        kept = [*base, *keep, f"finetune.fixed_lr_scale={scale:g}"]
        arms |= {scaled(f"keep-p{p}", scale, keep_scales): (kept, p) for p in keep_at}
        if cheap_steps is not None:
            arms[scaled("cheap-p14", scale, keep_scales)] = ([*kept, *cut_to(kept, cheap_steps)], 14)
    return arms


def cut_to(sets: Sequence[str], steps: int) -> list[str]:
    """The ``--set`` values that shorten the run of ``sets`` to ``steps``, its warm-up kept at the same share of
    the steps (the recipe's 50 warm-up steps would otherwise outlast a 44-step run: it never reached its lr)."""
    cfg = load_recipe(RECIPE, list(sets))
    warmup = max(1, round(cfg.optim.warmup_steps * steps / cfg.train.steps)) if cfg.optim.warmup_steps else 0
    return [f"train.steps={steps}", f"optim.warmup_steps={warmup}"]


def choose_scales(val_worst: dict[str, dict[str, float]], scales: Sequence[float]) -> dict[str, float]:
    """Per kept family, the lr scale chosen on validation: ``val_worst[task][arm]`` is the mean over seeds of each
    seed's worst validation top-1; the scale with the higher mean over tasks, the first unless beaten by ``TIE``."""
    chosen = {}
    for family in KEPT:
        score = {s: statistics.fmean(t[scaled(family, s, scales)] for t in val_worst.values())
                 for s in scales if all(scaled(family, s, scales) in t for t in val_worst.values())}
        if not score:
            continue
        best = max(score, key=score.__getitem__)
        chosen[family] = best if score[best] > score[scales[0]] + TIE else scales[0]
    return chosen


def resolved(sets: Sequence[str], patch: int | None) -> Config:
    cfg = load_recipe(RECIPE, list(sets))
    return cfg if patch is None else fixed_size(cfg, patch)


def cheap_steps(kept: Sequence[str], fixed7: Sequence[str], forward: Callable[[int], float]) -> int:
    """The most steps of the kept fine-tune at 14 whose GFLOPs stay within ``CHEAP_SHARE`` of the plain one at 7."""
    budget = CHEAP_SHARE * finetune_gflops(resolved(fixed7, CHEAP_OF), forward)

    def cost(steps: int) -> float:
        return finetune_gflops(resolved([*kept, *cut_to(kept, steps)], 14), forward)

    low, high = 1, resolved(kept, 14).train.steps  # the cost grows with the steps: bisect for the last within budget
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= budget else (low, mid - 1)
    return low


def targets(rows: dict[str, dict[str, Any]], keep_at: Sequence[int], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """The issue's targets on one task's test means: one check per (arm, target, size)."""
    test = {arm: r["test"]["mean"] for arm, r in rows.items()}
    gflops = {arm: r["gflops"] for arm, r in rows.items()}
    checks = []

    def check(arm: str, what: str, p: int, value: float, bound: float) -> None:
        checks.append({"arm": arm, "target": what, "size": p, "value": value, "bound": bound, "met": value >= bound})

    for arm in [a for a in ("keep-p14", "cheap-p14") if a in rows]:
        for p in (7, 4):
            check(arm, "at p minus at 14", p, test[arm][str(p)] - test[arm]["14"], 0.0)
            check(arm, "minus plain fixed at p", p, test[arm][str(p)] - test[f"fixed-p{p}"][str(p)], -KEEP_GAP)
            check(arm, "1/4 minus its GFLOPs / plain fixed at p's", p, CHEAP_SHARE - gflops[arm] / gflops[f"fixed-p{p}"],
                  0.0)
    for arm in [f"keep-p{p}" for p in keep_at] + (["cheap-p14"] if "cheap-p14" in rows else []):
        for p in sizes:
            check(arm, "minus flexible default", p, test[arm][str(p)] - test["flexible"][str(p)], -FLEX_GAP)
        own = 14 if arm == "cheap-p14" else int(arm.split("-p")[1])
        check(arm, "own size minus plain fixed", own, test[arm][str(own)] - test[f"fixed-p{own}"][str(own)], -OWN_GAP)
    return checks


def _pm(s: dict[str, dict[str, float]], p: int) -> str:
    return f"{s['mean'][str(p)]:.2f} ± {s['std'][str(p)]:.2f}"


def _bold(arm: str, chosen: set[str]) -> str:
    return f"**{arm}**" if arm in chosen else arm


def markdown(payload: dict[str, Any]) -> str:
    sizes = payload["sizes"]
    heads = " | ".join(f"p={p}" for p in sizes)
    lines = ["# Fine-tune at one size, deploy at every size (issue 27, part 3)", "",
             f"Pretrained runs {payload['pretrained']} (fine-tune seed i for run i); `{RECIPE}`, "
             f"{payload['steps']} steps at the recipe's token budget unless said. Arms: " + "; ".join(
                 f"`{a}`: {d}" for a, d in payload["arms_about"].items()) + ". Top-1 (%) mean ± sample std over "
             "the seeds; GFLOPs = 3 × forward GFLOPs per trained image (the consistency term's extra forward "
             "included), mean per run; minutes = training loop, mean per run (runs shared the cores).", ""]
    scales = payload["keep_scales"]
    chosen = {scaled(f, s, scales) for f, s in payload["chosen_scales"].items()}
    lines += ["Each kept arm's lr, chosen on validation (mean over tasks of the mean over seeds of each seed's worst "
              f"size; the first scale stays unless another gains {TIE:g} point): " + ", ".join(
                  f"{f}: scale {s:g}" for f, s in payload["chosen_scales"].items()) + ". The chosen arms are in "
              "bold; the targets read them only.", ""]
    for task, t in payload["tasks"].items():
        rows = t["rows"]
        lines += [f"## {task}: {TASKS[task]}", "", "Test split:", "",
                  f"| arm | lr | {heads} | images | GFLOPs | minutes |", "|---|---:|" + "---:|" * (len(sizes) + 3)]
        lines += [f"| {_bold(arm, chosen)} | {r['lr']:g} | " + " | ".join(_pm(r["test"], p) for p in sizes)
                  + f" | {r['images']:.0f} | {r['gflops']:.0f} | {r['minutes']:.1f} |" for arm, r in rows.items()]
        lines += ["", "Validation split, mean (worst: the mean of each seed's worst size):", "",
                  f"| arm | {heads} | worst |", "|---|" + "---:|" * (len(sizes) + 1)]
        lines += [f"| {_bold(arm, chosen)} | " + " | ".join(f"{r['val']['mean'][str(p)]:.2f}" for p in sizes)
                  + f" | {r['val_worst']:.2f} |" for arm, r in rows.items()]
        lines += ["", "Targets (test means, points; met when the value is at least the bound):", "",
                  "| arm | target | p | value | bound | met |", "|---|---|---:|---:|---:|---|"]
        lines += [f"| {c['arm']} | {c['target']} | {c['size']} | {c['value']:+.2f} | {c['bound']:g} | "
                  f"{'yes' if c['met'] else '**no**'} |" for c in t["targets"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", type=Path, nargs="+", required=True, help="pretrained runs, one per seed")
    ap.add_argument("--mnist5k", type=Path, help="the digits task's image folder")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--keep", nargs="+", required=True, metavar="KEY=VALUE",
                    help="the settings of the kept fine-tune (part 2's choice), on top of --patch-size")
    ap.add_argument("--keep-scales", type=float, nargs="+", required=True,
                    help="its finetune.fixed_lr_scale values, chosen among on validation (the first: part 2's choice)")
    ap.add_argument("--keep-at", type=int, nargs="+", default=[14, 7])
    ap.add_argument("--arms", nargs="+", help="train only these arms (the report needs them all)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="another recipe override for every run (repeatable; tests use it for tiny runs)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, help="result stem: writes STEM.json and STEM.md")
    args = ap.parse_args(argv)
    try:
        tasks = {task: task_sets(task, args.mnist5k) for task in args.tasks}
    except SearchError as err:
        raise SystemExit(str(err)) from None
    recipe = load_recipe(RECIPE, args.sets)
    sizes = recipe.patch.sizes
    model, _ = load_model(args.pretrained[0])
    image = recipe.data.image_size
    x = torch.zeros(1, model.config.in_chans, image, image)  # (1, C, H, W): FLOPs do not depend on values

    @functools.cache
    def forward(patch: int) -> float:
        with torch.no_grad():
            return count_gflops(lambda t: model(t, patch_size=patch), x)

    plan: dict[str, dict[int, dict[str, tuple[list[str], int | None]]]] = {}
    specs = []
    for task, sets in tasks.items():
        plan[task] = {}
        for seed, run in enumerate(args.pretrained):
            base = [*sets, *args.sets, f"train.seed={seed}"]
            arms = arm_runs(base, args.keep, args.keep_scales, args.keep_at, sizes, None)
            steps = cheap_steps(arms["keep-p14"][0], arms[f"fixed-p{CHEAP_OF}"][0], forward)
            plan[task][seed] = arms = arm_runs(base, args.keep, args.keep_scales, args.keep_at, sizes, steps)
            specs += [run_spec(f"{task}/{arm}/seed{seed}", sets, recipe=RECIPE, init=str(run.resolve()),
                               args=["--patch-size", str(p)] if p else [])
                      for arm, (sets, p) in arms.items() if not args.arms or arm in args.arms]
    study = Study(args.out, jobs=args.jobs)
    study.run_all(specs)
    if args.arms or args.results is None:
        return
    payload: dict[str, Any] = {
        "pretrained": [str(r) for r in args.pretrained], "seeds": list(range(len(args.pretrained))),
        "split": "test (validation beside it)", "sizes": sizes, "steps": recipe.train.steps,
        "keep": args.keep, "keep_scales": args.keep_scales, "fixed_lr": FIXED_LR,
        "gflops_forward": {str(p): forward(p) for p in sizes},
        "arms_about": {"fixed-pP": "plain `--patch-size P` at its lr (FIXED_LR)", "flexible": "sizes sampled",
                       "keep-pP": f"`--patch-size P` with {' '.join(args.keep)} (`-scaleS`: at lr scale S)",
                       "cheap-p14": f"keep-p14 cut to ≤ {CHEAP_SHARE:g} × the GFLOPs of fixed-p{CHEAP_OF}, its warm-up "
                                    "cut in proportion"},
        "tasks": {}}
    for task, seeds in plan.items():
        arms = list(seeds[0])
        table = arms_over_seeds(args.out / task, arms, list(seeds))
        rows = {}
        for arm in arms:
            per_seed = table[arm]
            cfgs = {s: resolved(*seeds[s][arm]) for s in seeds}
            rows[arm] = {"lr": cfgs[0].optim.lr, "steps": cfgs[0].train.steps,
                         "test": mean_std_by_key([per_seed[str(s)]["test"] for s in seeds]),
                         "val": mean_std_by_key([per_seed[str(s)]["val"] for s in seeds]),
                         "per_seed": per_seed,
                         "images": statistics.fmean(per_seed[str(s)]["images_seen"] for s in seeds),
                         "gflops": statistics.fmean(finetune_gflops(cfgs[s], forward) for s in seeds),
                         "minutes": statistics.fmean(per_seed[str(s)]["train_seconds"] for s in seeds) / 60,
                         "val_worst": statistics.fmean(min(per_seed[str(s)]["val"].values()) for s in seeds)}
        payload["tasks"][task] = {"rows": rows}
    chosen = choose_scales({t: {a: r["val_worst"] for a, r in v["rows"].items()} for t, v in payload["tasks"].items()},
                           args.keep_scales)
    payload["chosen_scales"] = chosen
    for t in payload["tasks"].values():  # the targets read each kept family at its chosen lr
        picked = {a: r for a, r in t["rows"].items() if not a.startswith(KEPT)}
        picked |= {family: t["rows"][scaled(family, scale, args.keep_scales)] for family, scale in chosen.items()}
        t["targets"] = targets(picked, args.keep_at, sizes)
    files = write_result(args.results, payload, markdown(payload), trained_at=study.trained_at(specs))
    print(f"wrote {', '.join(map(str, files))}")


if __name__ == "__main__":
    main()
