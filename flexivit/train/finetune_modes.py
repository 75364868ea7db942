"""Ways a fine-tune at one patch size may keep the other sizes (issue 27, part 2; docs/flexible_finetune.md).

Three settings of ``flexivit finetune CKPT RECIPE --patch-size P``; the consistency term is on by default (weight 1,
every step: chosen over three pretrained seeds, docs/results/finetune_keep_round4.md), the others are off:

- **mostly P** (``finetune.fixed_others = s``): the fine-tune keeps the recipe's sizes and draws the other
  sizes on a share ``s`` of the steps (split evenly), patch ``P`` on the rest (``keep_other_sizes``).
- **consistency** (``finetune.consistency = w``, ``finetune.consistency_share = f``): on a share ``f`` of the
  steps at ``P``, some of the step's images also go through the model at another trained size, and
  ``w × KL(softmax(logits at P, stop-gradient) ‖ softmax(logits at the other size))`` joins the loss
  (``ConsistencyTerm``). The other size and the steps are a function of ``(seed, step)``, so a resumed run
  draws the same ones. The second forward takes as many images as fit in the step's token budget.
- **probe head** (``finetune.head_init = "probe"``): the new head starts as a linear probe fitted on the
  frozen pretrained features of training images at every trained size at once (``probe_head``), instead of
  a random head that the first steps fit to ``P``'s features alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from flexivit.eval.probe import fit_probe
from flexivit.model.packing import tokens_per_image
from flexivit.model.patch_embed import PatchScheme
from flexivit.rng import mix
from flexivit.train.builders import build_sampler
from flexivit.train.config import Config
from flexivit.train.distill import distill_loss
from flexivit.train.step_batches import loader_batches

__all__ = ["keep_other_sizes", "ConsistencyTerm", "consistency_term", "consistency_images_by_patch",
           "head_features", "probe_head", "HEAD_PROBE_PER_CLASS"]

CONSISTENCY_STREAM = 27  # mixed with (seed, step): which steps add the consistency term, and at which size
HEAD_PROBE_PER_CLASS = 500  # training images of each class the probe head is fitted on


def keep_other_sizes(cfg: Config, patch_size: int, others: Sequence[int]) -> Config:
    """Sample ``others`` on a ``cfg.finetune.fixed_others`` share of the steps (evenly) and ``patch_size`` on
    the rest; the sizes' order and the default size ``patch_size`` as ``fixed_size`` leaves them."""
    share = cfg.finetune.fixed_others
    if not others:
        raise ValueError(f"finetune.fixed_others={share:g} keeps the recipe's other patch sizes, but the recipe "
                         f"trains only patch {patch_size}; set finetune.fixed_others=0")
    sizes = sorted({*others, patch_size})
    cfg.patch.sizes, cfg.patch.distribution = sizes, "weighted"
    cfg.patch.weights = [1.0 - share if s == patch_size else share / len(others) for s in sizes]
    return cfg


class ConsistencyTerm:
    """``weight × KL(p_P ‖ p_q)`` on a ``share`` of the steps at the anchor size ``P``: ``p_P`` the softmax of the
    step's own logits (stop-gradient), ``p_q`` that of the first images of the batch at another size ``q``."""

    def __init__(self, *, weight: float, share: float, anchor: int, others: Sequence[int], seed: int,
                 image_size: int, token_budget: int) -> None:
        if not others:
            raise ValueError(f"finetune.consistency needs another trained size than patch {anchor}: list the others "
                             "in patch.eval_sizes (--patch-size keeps the recipe's), or set finetune.consistency=0")
        self.weight, self.share, self.anchor, self.others = weight, share, anchor, sorted(others)
        self.seed, self.image_size, self.token_budget = seed, image_size, token_budget

    def size_at(self, step: int) -> int | None:
        """The other size the anchor-size step ``step`` (0-based) adds, or ``None`` on a step without the term."""
        g = torch.Generator().manual_seed(mix(self.seed, step, CONSISTENCY_STREAM))
        if float(torch.rand((), generator=g)) >= self.share:
            return None
        return self.others[int(torch.randint(len(self.others), (), generator=g))]

    def images(self, batch: int, size: int) -> int:
        """Images of a ``batch``-image step at the anchor size that the second forward at ``size`` takes: as many
        as the step's tokens allow (the token budget, or the batch's own tokens without one)."""
        budget = self.token_budget or batch * tokens_per_image(self.image_size, self.anchor)
        return max(1, min(batch, budget // tokens_per_image(self.image_size, size)))

    def __call__(self, model: nn.Module, images: torch.Tensor, logits: torch.Tensor, scheme: PatchScheme,
                 step: int) -> torch.Tensor | None:
        """The term for one micro-batch (``images`` ``(B, C, H, W)``, its ``logits`` ``(B, K)`` at ``scheme``), or
        ``None`` when step ``step`` adds none."""
        size = self.size_at(step) if scheme.patch == self.anchor else None
        if size is None:
            return None
        n = self.images(images.shape[0], size)
        other = model(images[:n], size)  # (n, K)
        return self.weight * distill_loss(other, logits[:n].detach())


def consistency_term(cfg: Config) -> ConsistencyTerm | None:
    """The run's consistency term: anchored at the size ``--patch-size`` fixed (``finetune.fixed_at``), toward the
    other sizes the run evaluates. ``None`` when ``finetune.consistency`` is 0, in a run not fixed at one size
    (pretraining, the sampled fine-tune) and when the run evaluates no other size (nothing to keep)."""
    f = cfg.finetune
    anchor = f.fixed_at
    others = [s for s in (cfg.patch.eval_sizes or cfg.patch.sizes) if s != anchor]
    if not f.consistency or anchor is None or not others:
        return None
    if cfg.patch.per_image:
        raise ValueError("finetune.consistency works with one patch size per step: unset patch.per_image, or set "
                         "finetune.consistency=0")
    return ConsistencyTerm(weight=f.consistency, share=f.consistency_share, anchor=anchor, others=others,
                           seed=cfg.train.seed, image_size=cfg.data.image_size, token_budget=cfg.train.token_budget)


def consistency_images_by_patch(cfg: Config) -> dict[int, int]:
    """Images the consistency term sends through the model at each other size over the run's ``train.steps``
    (one process, full loader batches; ``{}`` without the term): the extra compute a study reports."""
    term = consistency_term(cfg)
    if term is None:
        return {}
    sampler, d, t = build_sampler(cfg), cfg.data, cfg.train
    seen: dict[int, int] = {}
    for step in range(t.steps):
        scheme = sampler.at(step)
        size = term.size_at(step) if scheme.patch == term.anchor else None
        if size is not None:
            batch = d.batch_size * loader_batches(scheme, (d.image_size, d.image_size), d.batch_size, t.token_budget)
            seen[size] = seen.get(size, 0) + t.grad_accum * term.images(batch, size)
    return dict(sorted(seen.items()))


@torch.no_grad()
def head_features(model: nn.Module, images: torch.Tensor, sizes: Sequence[int], *,
                  batch_size: int = 256) -> torch.Tensor:
    """What the head reads (``forward_head(pre_logits=True)``) for ``images`` ``(n, C, H, W)`` at each of
    ``sizes``, stacked size after size: ``(len(sizes) * n, D)``."""
    was_training = model.training
    model.eval()
    out = [model.forward_head(model.forward_features(chunk, size), pre_logits=True).float()  # (b, D)
           for size in sizes for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(out)


def probe_head(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int]) -> nn.Module:
    """Set ``model``'s linear head to a probe (``flexivit.eval.probe.fit_probe``) fitted on its frozen features of
    ``images`` ``(n, C, H, W)`` / ``labels`` ``(n,)`` at every one of ``sizes`` at once; returns ``model``."""
    head = model.head
    if not isinstance(head, nn.Linear):
        raise ValueError(f"finetune.head_init=probe fits a linear head; this model's head is a {type(head).__name__}: "
                         "set finetune.head_init=fresh")
    features = head_features(model, images, sizes)  # (len(sizes) * n, D)
    probe = fit_probe(features, labels.repeat(len(sizes)), num_classes=head.out_features)
    # The probe standardises its input; folded into one affine map on the raw features:
    # W (x - mean) / std + b = (W / std) x + (b - (W / std) mean).
    weight = probe.linear.weight / probe.std  # (K, D)
    bias = probe.linear.bias - weight @ probe.mean  # (K,)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
        head.bias.copy_(bias.to(head.bias.dtype))
    return model
