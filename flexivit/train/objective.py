"""The training objective, built once per run: what a micro-batch's loss is and what is logged about it.

Labels (cross-entropy, or soft targets under timm's Mixup/CutMix), distillation from a frozen teacher,
and any number of extra terms that options add (the L2-SP pull toward the starting weights is one), each
a weighted function of the model. The trainer calls ``objective(model, batch, scheme)`` and nothing in
its loop knows which of these are on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from flexivit.train.config import Config
from flexivit.train.distill import Teacher, ViewSpec, distill_loss
from flexivit.train.finetune_modes import ConsistencyTerm, consistency_term
from flexivit.model.patch_embed import PatchScheme

__all__ = ["Objective", "LossTerm", "build_objective", "l2_sp_term"]

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossTerm:
    """An extra loss ``weight * fn(model)`` added to every micro-batch's loss and logged as ``name``."""

    name: str
    weight: float
    fn: Callable[[nn.Module], torch.Tensor]


@dataclass
class Objective:
    criterion: nn.Module
    mixup: Mixup | None = None
    teacher: Teacher | None = None
    view: ViewSpec | None = None  # the student's input view, which the teacher re-expresses for itself
    temperature: float = 1.0
    quantize: str = "none"
    label_weight: float = 0.0
    terms: list[LossTerm] = field(default_factory=list)
    consistency: ConsistencyTerm | None = None  # a second size's logits pulled toward this step's (finetune_modes)

    def __call__(self, model: nn.Module, batch: dict, scheme: PatchScheme | None,
                 step: int = 0) -> tuple[torch.Tensor, Metrics]:
        """The loss of one micro-batch of step ``step`` (0-based) at ``scheme`` (``None``: a patch size per image,
        the batch's ``plan``) and its metrics (detached, on the device)."""
        images, labels = batch["image"], batch["label"]
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits = model(images, scheme.patch, scheme.stride) if scheme is not None else model(images, batch["plan"])
        metrics: Metrics = {}
        if targets.shape == labels.shape:  # hard labels (no mixup): training accuracy is meaningful
            metrics["acc"] = (logits.argmax(dim=1) == labels).float().mean().detach()
        if self.teacher is None:
            loss = self.criterion(logits, targets)
        else:
            teacher_logits = self.teacher(images, self.view)
            kd = distill_loss(logits, teacher_logits, temperature=self.temperature, quantize=self.quantize)
            metrics["distill"] = kd.detach()
            metrics["agree"] = (logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean().detach()
            loss = kd + self.label_weight * self.criterion(logits, targets) if self.label_weight else kd
        if self.consistency is not None:
            value = self.consistency(model, images, logits, scheme, step) if scheme is not None else None
            metrics["consistency"] = logits.new_zeros(()) if value is None else value.detach()
            loss = loss if value is None else loss + value
        for term in self.terms:
            value = term.fn(model)
            metrics[term.name] = value.detach()
            loss = loss + term.weight * value
        return loss, metrics


def l2_sp_term(model: nn.Module, weight: float) -> LossTerm:
    """L2-SP: ``weight * ||theta - theta_start||^2`` over every parameter but the (new) head's.

    The anchor is taken from ``model`` as it is now, so build it before the model is wrapped or sharded.
    """
    anchor = [(p, p.detach().clone()) for n, p in model.named_parameters() if not n.startswith("head.")]

    def pull(_: nn.Module) -> torch.Tensor:
        return sum(((p - p0) ** 2).sum() for p, p0 in anchor)

    return LossTerm("pull", weight, pull)


def build_objective(cfg: Config, *, num_classes: int, teacher: Teacher | None, view: ViewSpec,
                    terms: list[LossTerm]) -> Objective:
    d, k = cfg.data, cfg.distill
    mixup = (
        Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=d.label_smoothing, num_classes=num_classes)
        if d.mixup > 0 or d.cutmix > 0 else None
    )
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=d.label_smoothing)
    return Objective(criterion=criterion, mixup=mixup, teacher=teacher, view=view, temperature=k.temperature,
                     quantize=k.quantize, label_weight=k.label_weight, terms=terms, consistency=consistency_term(cfg))
