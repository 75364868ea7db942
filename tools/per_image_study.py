"""A patch size per image against one per step (issue 31, part 3), at equal images, on the validation split.

    python tools/per_image_study.py [--seeds 0,1,2] [--jobs 2] [--out runs/per_image] [--report-only]

Two arms of the quickstart recipe (``recipes/fashion_mnist.py``) per seed:

- ``per-step``: the recipe as it is (one patch size per step, the token budget joining loader batches);
- ``per-image``: ``patch.per_image=true``: every image draws its own size, packed into the same token
  budget's rows (16 rows of 196 tokens), each size's share of the images being the one it gets per step.

Equal images: the per-image arm's step count is the first at which its rows have taken as many images as
the per-step arm takes in the recipe's 3600 steps (both counts are functions of the seed alone, computed
here before anything trains). Both arms report validation top-1 at every size (the comparison) and test
top-1 (reported only), the images and tokens they trained on, and their training wall time (two runs
share the 2 cores, one torch thread each: the wall-time ratio is indicative; ``tools/bench_train.py``
measures speed side by side). Results: ``docs/results/per_image.{md,json}`` through
``flexivit.provenance.write_result``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from flexivit.experiments.arms import COLUMNS, split_tables, study_args
from flexivit.experiments.results import arms_over_seeds
from flexivit.experiments.runner import RunSpec, Study
from flexivit.provenance import write_result
from flexivit.train.builders import build_model, build_sampler, build_step_batches
from flexivit.train.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "fashion_mnist"
COMMON = ("data.num_workers=0",)
ARMS = ("per-step", "per-image")


def equal_image_steps(seed: int) -> tuple[int, int, int]:
    """``(per-step images, per-image steps, per-image images)``: the per-image arm's first step count whose
    images reach the per-step arm's at the recipe's steps."""
    base = load_recipe(RECIPE, [*COMMON, f"train.seed={seed}"])
    packed = load_recipe(RECIPE, [*COMMON, f"train.seed={seed}", "patch.per_image=true"])
    model = build_model(packed, channels=1, num_classes=10)
    per_step = build_step_batches(base, build_sampler(base), model, rank=0, ranks=1)
    target = per_step.consumed(base.train.steps) * base.data.batch_size
    per_image = build_step_batches(packed, build_sampler(packed), model, rank=0, ranks=1)
    images = steps = 0
    while images < target:
        images += per_image.plan(steps, 0).num_images
        steps += 1
    return target, steps, images


def specs(seeds: list[int]) -> list[RunSpec]:
    out = []
    for seed in seeds:
        _, steps, _ = equal_image_steps(seed)
        out.append(RunSpec(name=f"per-step/seed{seed}", recipe=RECIPE, sets=(*COMMON, f"train.seed={seed}")))
        out.append(RunSpec(name=f"per-image/seed{seed}", recipe=RECIPE,
                           sets=(*COMMON, f"train.seed={seed}", "patch.per_image=true", f"train.steps={steps}")))
    return out


def collect(out: Path, seeds: list[int]) -> dict[str, Any]:
    """Per arm and seed: validation and test top-1 per size, images, steps and training time."""
    return arms_over_seeds(out, list(ARMS), seeds)


def markdown(arms: dict[str, Any], seeds: list[int]) -> str:
    lines = [
        "# A patch size per image vs one per step (quickstart recipe, equal images)", "",
        "`python tools/per_image_study.py`: the quickstart recipe per step (as it is) and with `patch.per_image=true`, "
        "the per-image arm run for as many steps as take the per-step arm's images. Top-1 (%), mean ± std over "
        f"seeds {', '.join(map(str, seeds))}; validation decides, test is reported. Two runs at a time on 2 shared "
        "cores, one torch thread each.", "",
        *split_tables(arms, seeds, columns={k: COLUMNS[k] for k in ("steps", "images", "train min")}),
        "Per-seed values are in the json.", "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = study_args(__doc__, ROOT / "runs" / "per_image")
    seeds = args.seeds
    study, runs = Study(args.out, jobs=args.jobs), specs(seeds)
    if not args.report_only:
        study.run_all(runs)
    arms = collect(args.out, seeds)
    write_result(ROOT / "docs" / "results" / "per_image",
                 {"seeds": seeds, "split": "val (decides), test (reported)", "recipe": RECIPE, "arms": arms},
                 markdown(arms, seeds), command=" ".join(sys.argv), trained_at=study.trained_at(runs))


if __name__ == "__main__":
    main()
