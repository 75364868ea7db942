"""Why patch 14 trails a plain ViT/14 (issue 29): the base kernel's learning rate, at the full budget.

    python tools/patch14_study.py [--seeds 0,1,2] [--jobs 2] [--out runs/per_image] [--report-only]

The quickstart recipe trains its 14×14 base kernel at 0.02× the learning rate (``optim.kernel_lr_scale``),
so at patch 14, where the kernel is the base itself, it moves ~50× slower than a ViT/14's. This study
trains the recipe as it is and with the kernel at the full rate (scale 1), 3 seeds each at the full
budget, and reports validation (decides) and test (reported) top-1 at every size. The rule, written
before the runs (docs/LOG.md, 2026-12-06): the slow kernel is a cause of the patch-14 gap if scale 1
gains more than 1 point at patch 14 on validation over 3 seeds; scale 1 replaces 0.02 only if its
validation worst size is higher by more than the larger of the two stds.

The recipe arm's runs are the per-step arm of ``tools/per_image_study.py`` (same folder and settings:
the runner skips them when finished). Results: ``docs/results/patch14_kernel_lr.{md,json}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from flexivit.experiments.arms import COLUMNS, split_tables, study_args
from flexivit.experiments.results import arms_over_seeds
from flexivit.experiments.runner import RunSpec, Study
from flexivit.provenance import write_result

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "fashion_mnist"
COMMON = ("data.num_workers=0",)
ARMS = {"per-step": (), "kernel-lr1": ("optim.kernel_lr_scale=1",)}  # arm -> extra --set values


def specs(seeds: list[int]) -> list[RunSpec]:
    return [RunSpec(name=f"{arm}/seed{seed}", recipe=RECIPE, sets=(*COMMON, f"train.seed={seed}", *extra))
            for seed in seeds for arm, extra in ARMS.items()]


def collect(out: Path, seeds: list[int]) -> dict[str, Any]:
    """Per arm and seed: validation and test top-1 per size, images, steps and training time."""
    return arms_over_seeds(out, list(ARMS), seeds)


def markdown(arms: dict[str, Any], seeds: list[int]) -> str:
    lines = ["# Patch 14 and the base kernel's learning rate (quickstart recipe, full budget)", "",
             "`python tools/patch14_study.py`: the recipe (kernel at 0.02x the lr) against the kernel at the full "
             f"rate, seeds {', '.join(map(str, seeds))}, 3600 steps each. Top-1 (%), mean ± std; validation "
             "decides, test is reported.", "",
             *split_tables(arms, seeds, columns={"images": COLUMNS["images"]})]
    return "\n".join(lines)


def main() -> None:
    args = study_args(__doc__, ROOT / "runs" / "per_image")
    seeds = args.seeds
    study, runs = Study(args.out, jobs=args.jobs), specs(seeds)
    if not args.report_only:
        study.run_all(runs)
    arms = collect(args.out, seeds)
    write_result(ROOT / "docs" / "results" / "patch14_kernel_lr",
                 {"seeds": seeds, "split": "val (decides), test (reported)", "recipe": RECIPE, "arms": arms},
                 markdown(arms, seeds), command=" ".join(sys.argv), trained_at=study.trained_at(runs))


if __name__ == "__main__":
    main()
