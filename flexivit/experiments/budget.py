"""What a run spends, from its resolved config alone: images per patch size, equal-image and equal-FLOP
step counts, and training FLOPs. The same before, during and after training, so a study can plan runs of
equal budget and stay resumable.

- **Images.** The loader drops its last partial batch and the arithmetic assumes one process, so a step of
  scheme ``s`` takes ``batch_size × grad_accum × loader_batches(s)`` images
  (``flexivit.train.step_batches``), and the scheme of every step is the sampler's draw, a pure function
  of ``(seed, step)``.
- **Equal images.** A one-size run takes the same images every step, so the steps that match ``N`` images
  are ``round(N / images per step)``: the two differ by at most half a step.
- **Training FLOPs.** Forward + backward ≈ ``FWD_BWD`` × the forward FLOPs of an image at the patch size it
  was trained at (``flexivit.eval.measure.count_gflops`` on the model the config builds), summed over the
  images each size saw; a distilled run adds one teacher forward per image. The kernel PI-resize and
  position-grid resample, once per step rather than per image, are left out.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from flexivit.eval.measure import count_gflops
from flexivit.model.patch_embed import PatchScheme
from flexivit.train.builders import build_model, build_sampler, default_patch
from flexivit.train.config import Config, config_from_dict
from flexivit.train.finetune_modes import consistency_images_by_patch
from flexivit.train.step_batches import loader_batches

__all__ = ["FWD_BWD", "GFlops", "images_per_step", "step_images", "images_by_patch", "equal_image_steps",
           "train_gflops", "equal_gflops_steps", "ForwardCounter", "teacher_gflops", "run_gflops", "trained_gflops",
           "finetune_gflops"]

FWD_BWD = 3  # a backward pass costs about twice its forward
GFlops = Callable[[Config, int], float]  # (config, patch size) -> forward GFLOPs per image


# ---- images ----------------------------------------------------------------------------------------
def images_per_step(cfg: Config, scheme: PatchScheme) -> int:
    """Training images one step of ``scheme`` takes (one process, full loader batches)."""
    d, t = cfg.data, cfg.train
    return d.batch_size * t.grad_accum * loader_batches(scheme, (d.image_size, d.image_size), d.batch_size,
                                                        t.token_budget)


def step_images(cfg: Config) -> Iterator[tuple[int, int]]:
    """``(patch size, images)`` of every step from step 0 on (without end), from the sampler's draws."""
    if cfg.patch.strides:
        raise ValueError("the budget arithmetic counts non-overlapping patches only; drop patch.strides")
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


def finetune_gflops(cfg: Config, forward: Callable[[int], float]) -> float:
    """Training GFLOPs of a fine-tune of ``cfg``: its trained images, plus the images the consistency term
    (``finetune.consistency``, ``flexivit.train.finetune_modes``) sends through a second forward and backward."""
    return train_gflops(images_by_patch(cfg), forward) + train_gflops(consistency_images_by_patch(cfg), forward)


def trained_gflops(run: str | Path) -> float:
    """Training GFLOPs of the finished run in ``run`` (no teacher): ``FWD_BWD`` × the forward GFLOPs of its
    own saved model at each image's patch size, over the images its config's sampler gave each size."""
    from flexivit.model.weights import load_model

    cfg = config_from_dict(Config, json.loads((Path(run) / "config.json").read_text()))
    model, _ = load_model(run)
    x = torch.zeros(1, model.config.in_chans, cfg.data.image_size, cfg.data.image_size)  # (1, C, H, W)

    @functools.cache
    def forward(patch: int) -> float:
        with torch.no_grad():
            return count_gflops(lambda t: model(t, patch_size=patch), x)

    return train_gflops(images_by_patch(cfg), forward)
