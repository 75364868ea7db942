"""The runs of ``tools/reproduce_flexibility.py`` and their budgets: equal images, training FLOPs.

Every budget here follows from the resolved configs (recipe + overrides) alone, so the plan is the same
before, during and after training, and the reproduction stays resumable:

- **Images.** The loader drops its last partial batch and the tool trains on one process, so a step of
  scheme ``s`` takes ``batch_size × grad_accum × loader_batches(s)`` images (``flexivit.train.step_batches``), and the
  scheme of every step is the sampler's draw, a pure function of ``(seed, step)``.
- **Equal images.** A fixed ViT/p takes the same images every step, so its ``train.steps`` is
  ``round(FlexiViT images / images per ViT/p step)``: the two differ by at most half a ViT/p step.
- **Training FLOPs.** Forward + backward ≈ 3 × the forward FLOPs of an image at the patch size it was
  trained at (``flexivit.eval.measure.count_gflops`` on a model built from the run's config), summed over the
  images each size saw; a distilled run adds one teacher forward per image. The kernel PI-resize and
  position-grid resample, once per step rather than per image, are left out.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flexivit.train.builders import build_model, build_sampler, default_patch  # noqa: E402
from flexivit.train.config import Config, config_from_dict, load_recipe  # noqa: E402
from flexivit.eval.measure import count_gflops  # noqa: E402
from flexivit.model.patch_embed import PatchScheme  # noqa: E402
from flexivit.train.assemble import config_changes  # noqa: E402
from flexivit.train.step_batches import loader_batches  # noqa: E402

FWD_BWD = 3  # a backward pass costs about twice its forward
GFlops = Callable[[Config, int], float]  # (config, patch size) -> forward GFLOPs per image


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


# ---- images ----------------------------------------------------------------------------------------
def images_per_step(cfg: Config, scheme: PatchScheme) -> int:
    """Training images one step of ``scheme`` takes (one process, full loader batches)."""
    d, t = cfg.data, cfg.train
    return d.batch_size * t.grad_accum * loader_batches(scheme, (d.image_size, d.image_size), d.batch_size,
                                                        t.token_budget)


def step_images(cfg: Config) -> Iterator[tuple[int, int]]:
    """``(patch size, images)`` of every step from step 0 on (without end), from the sampler's draws."""
    if cfg.patch.strides:
        raise ValueError("the reproduction counts non-overlapping patches only; drop patch.strides")
    sampler = build_sampler(cfg)
    for scheme in map(sampler.at, itertools.count()):
        yield scheme.patch, images_per_step(cfg, scheme)


def images_by_patch(cfg: Config) -> dict[int, int]:
    """Images each patch size saw over the run's ``train.steps`` (sizes never drawn are left out)."""
    seen: dict[int, int] = {}
    for patch, images in itertools.islice(step_images(cfg), cfg.train.steps):
        seen[patch] = seen.get(patch, 0) + images
    return dict(sorted(seen.items()))


def equal_image_steps(fixed: Config, images: int) -> int:
    """Steps of a one-size run (``fixed``) whose images come closest to ``images`` (at least one step)."""
    (scheme,) = build_sampler(fixed).schemes
    return max(1, round(images / images_per_step(fixed, scheme)))


# ---- FLOPs -----------------------------------------------------------------------------------------
def train_gflops(images: Mapping[int, int], forward: Callable[[int], float], teacher_forward: float = 0.0) -> float:
    """Training GFLOPs: ``FWD_BWD × forward(p)`` per image of patch ``p``, plus one teacher forward
    (``teacher_forward`` GFLOPs) per image when distilling."""
    return sum(n * (FWD_BWD * forward(p) + teacher_forward) for p, n in images.items())


def equal_gflops_steps(cfg: Config, forward: Callable[[int], float], target: float) -> int:
    """The fewest steps (at least one) of label-only ``cfg`` whose training GFLOPs reach ``target``."""
    costs = (FWD_BWD * forward(patch) * images for patch, images in step_images(cfg))
    return next(steps for steps, done in enumerate(itertools.accumulate(costs), 1) if done >= target)


class ForwardCounter:
    """Forward GFLOPs per image of the model a config builds, counted once per (architecture, patch)."""

    def __init__(self, *, channels: int, num_classes: int) -> None:
        self.channels, self.num_classes = channels, num_classes
        self._counted: dict[tuple[str, int, int], float] = {}

    def __call__(self, cfg: Config, patch: int) -> float:
        size = cfg.data.image_size
        key = (json.dumps(cfg.to_dict()["model"], sort_keys=True), size, patch)
        if key not in self._counted:
            model = build_model(cfg, channels=self.channels, num_classes=self.num_classes).eval()
            with torch.no_grad():
                x = torch.zeros(1, self.channels, size, size)  # (1, C, H, W): FLOPs do not depend on values
                self._counted[key] = count_gflops(lambda t: model(t, patch_size=patch), x)
        return self._counted[key]


def teacher_gflops(student: Config, teacher: Config, gflops: GFlops) -> float:
    """Forward GFLOPs of ``teacher`` per image at the patch size ``student`` distils from."""
    return gflops(teacher, student.distill.teacher_patch_size or default_patch(teacher.patch))


def run_gflops(cfg: Config, gflops: GFlops, teacher: Config | None = None) -> float:
    """Training GFLOPs of a run of ``cfg`` (distilled from a run of ``teacher``, when given)."""
    extra = teacher_gflops(cfg, teacher, gflops) if teacher is not None else 0.0
    return train_gflops(images_by_patch(cfg), lambda p: gflops(cfg, p), extra)


# ---- the plan --------------------------------------------------------------------------------------
def plan(*, seeds: Sequence[int], small: int, large: int, sizes: list[int], extra: Sequence[str], out: Path,
         gflops: GFlops) -> list[Run]:
    """Every run: first those without a teacher, then the distilled ones (so concurrent jobs rarely wait).

    Per seed: ViT/small (the teacher) and ViT/large on labels; the FlexiViT on labels and distilled from
    ViT/small (initialised from it); ViT/small and ViT/large distilled from the same teacher the same way;
    and a label-only FlexiViT trained for as many FLOPs as the distilled one spent, teacher forwards
    included. Each fixed ViT sees the images its FlexiViT saw. ``extra`` overrides come after the recipe's
    and before the steps the plan derives.
    """
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


def saved_changes(saved_file: Path, cfg: Config, also: Sequence[str] = ("train.steps",)) -> dict[str, tuple]:
    """Fields where the run config saved in ``saved_file`` differs from ``cfg``: those a resume refuses
    (``flexivit.train.assemble.config_changes``) and the ``also`` fields ("section.key"). Fields added to the config
    since the run was made take their defaults there."""
    saved = json.loads(json.dumps(config_from_dict(Config, json.loads(saved_file.read_text())).to_dict()))
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as saved
    changed = config_changes(saved, now)
    for field in also:
        section, key = field.split(".")
        if saved[section][key] != now[section][key]:
            changed[field] = (saved[section][key], now[section][key])
    return changed


def check_settings(run: Run, out: Path) -> None:
    """Refuse a run directory whose saved config is not the plan's (steps included)."""
    saved_file = out / run.dir_name / "config.json"
    if not saved_file.exists():
        return
    changed = saved_changes(saved_file, run.config())
    if changed:
        fields = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
        raise ValueError(f"{saved_file.parent} was trained with other settings ({fields}); pass a new --out, "
                         "or delete that directory to train it again")


def comparisons(small: int, large: int) -> list[tuple[str, str, str]]:
    """(distilled curve, label-only curve, what they share): distillation vs labels, each at its budget."""
    return [("flexi-distilled", "flexi", "images"), ("flexi-distilled", "flexi-equal-flops", "FLOPs"),
            *((f"fixed-p{p}-distilled/pi", f"fixed-p{p}/pi", "images") for p in (small, large))]
