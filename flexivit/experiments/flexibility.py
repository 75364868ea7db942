"""The runs of the flexibility reproduction (``tools/reproduce_flexibility.py``) and their budgets.

Per seed: ViT/small (the teacher) and ViT/large on labels; a FlexiViT on labels and one distilled from
ViT/small (initialised from it); ViT/small and ViT/large distilled from the same teacher the same way; and
a label-only FlexiViT trained for as many FLOPs as the distilled one spent, teacher forwards included.
Each fixed ViT sees the images its FlexiViT saw (``flexivit.experiments.budget`` holds the arithmetic).
Every budget follows from the resolved configs alone, so the plan is the same before, during and after
training and the reproduction stays resumable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flexivit.experiments.budget import GFlops, equal_gflops_steps, equal_image_steps, images_by_patch, run_gflops
from flexivit.experiments.runner import RunSpec
from flexivit.train.config import Config, load_recipe

__all__ = ["Run", "plan", "comparisons"]


@dataclass(frozen=True)
class Run:
    """One training run of the reproduction; ``overrides`` resolve its whole config."""

    name: str  # run directory name without the seed, also the curve family
    kind: str  # "fixed" | "fixed-distilled" | "flexi" | "flexi-distilled"
    seed: int
    recipe: str
    overrides: tuple[str, ...]
    train_patch_size: int | None = None
    teacher: str | None = None  # name of the run it distils from (same seed), initialised from it
    budget: str = "images"  # "images": the FlexiViT's images; "flops": the distilled FlexiViT's FLOPs

    @property
    def dir_name(self) -> str:
        return f"{self.name}-seed{self.seed}"

    @property
    def supervision(self) -> str:
        return "distilled" if self.teacher else "labels"

    def config(self) -> Config:
        return load_recipe(self.recipe, list(self.overrides))

    def spec(self) -> RunSpec:
        """The run for ``flexivit.experiments.runner``: after its teacher, when it has one."""
        return RunSpec(name=self.dir_name, recipe=self.recipe, sets=self.overrides,
                       needs=(f"{self.teacher}-seed{self.seed}",) if self.teacher else ())


def plan(*, seeds: Sequence[int], small: int, large: int, sizes: list[int], extra: Sequence[str], out: Path,
         gflops: GFlops) -> list[Run]:
    """Every run: first those without a teacher, then the distilled ones (so concurrent jobs rarely wait).
    ``extra`` overrides come after the recipe's and before the steps the plan derives; teachers are read
    from ``out``."""
    uniform = ("patch.distribution=uniform", "patch.weights=none")
    # The recipe's own sampling weights hold for its own sizes only; other sizes are drawn uniformly.
    own = sizes == load_recipe("fashion_mnist").patch.sizes
    image_size = load_recipe("fashion_mnist", list(extra)).data.image_size
    labelled: list[Run] = []
    distilled: list[Run] = []
    for seed in seeds:
        teacher = f"fixed-p{small}"
        distill = (f"distill.teacher={out / f'{teacher}-seed{seed}'}",)
        flexi_set = (f"train.seed={seed}", f"patch.sizes={','.join(map(str, sizes))}",
                     *(() if own else uniform), *extra)
        flexi = Run("flexi", "flexi", seed, "fashion_mnist", flexi_set)
        flexi_d = Run("flexi-distilled", "flexi-distilled", seed, "fashion_mnist_distill", (*flexi_set, *distill),
                      teacher=teacher)
        images = sum(images_by_patch(flexi.config()).values())
        images_d = sum(images_by_patch(flexi_d.config()).values())
        fixed, fixed_d = [], []
        for p in (small, large):
            # A plain ViT/p: base kernel p, position grid at its own token grid.
            # A plain ViT's kernel is never resized while it trains, so it learns at the full rate, and its
            # zero-shot curve (and a teacher's kernel taken into its base) uses the paper's operator,
            # bilinear PI-resize, whatever operator the FlexiViT recipe picked.
            own_set = (f"train.seed={seed}", f"patch.sizes={p}", f"patch.default={p}", f"patch.eval_sizes={p}",
                       *uniform, f"model.base_patch_size={p}", f"model.base_grid={image_size // p}",
                       "optim.kernel_lr_scale=1", "model.kernel_resize=bilinear", *extra)
            # Initialised from the teacher like the FlexiViT, its kernel and grid resized into base p.
            d_set = (*own_set, *distill, "distill.keep_student_base=true")
            steps = equal_image_steps(load_recipe("fashion_mnist", list(own_set)), images)
            steps_d = equal_image_steps(load_recipe("fashion_mnist_distill", list(d_set)), images_d)
            fixed.append(Run(f"fixed-p{p}", "fixed", seed, "fashion_mnist", (*own_set, f"train.steps={steps}"), p))
            fixed_d.append(Run(f"fixed-p{p}-distilled", "fixed-distilled", seed, "fashion_mnist_distill",
                               (*d_set, f"train.steps={steps_d}"), p, teacher=teacher))
        # Distillation vs labels at equal compute: the label-only FlexiViT gets the distilled one's FLOPs.
        target = run_gflops(flexi_d.config(), gflops, fixed[0].config())  # fixed[0]: ViT/small, the teacher
        flexi_cfg = flexi.config()
        steps = equal_gflops_steps(flexi_cfg, lambda p: gflops(flexi_cfg, p), target)
        long = Run("flexi-equal-flops", "flexi", seed, "fashion_mnist", (*flexi_set, f"train.steps={steps}"),
                   budget="flops")
        labelled += [*fixed, flexi, long]
        distilled += [flexi_d, *fixed_d]
    return [*labelled, *distilled]


def comparisons(small: int, large: int) -> list[tuple[str, str, str]]:
    """(distilled curve, label-only curve, what they share): distillation vs labels, each at its budget."""
    return [("flexi-distilled", "flexi", "images"), ("flexi-distilled", "flexi-equal-flops", "FLOPs"),
            *((f"fixed-p{p}-distilled/pi", f"fixed-p{p}/pi", "images") for p in (small, large))]
