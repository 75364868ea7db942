"""Fine-tuning a pretrained FlexiViT on a new task, keeping the patch size a deployment choice.

By default patch schemes are sampled while fine-tuning, as in pretraining: measured here, a FlexiViT
fine-tuned at one size loses the others (see docs/distillation.md). ``patch_size`` selects the
fixed-size fine-tuning of the FlexiViT patent instead, with the recipe's ``finetune.fixed_*``
adjustments (lower learning rate and an L2-SP pull toward the pretrained weights), which keep the other
sizes usable for longer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_model
from .lutq import fold_lutq
from .config import Config
from .fewshot import task_support
from .model import FlexiViT, FlexiViTConfig
from .patch_embed import check_patch_sizes
from .proxies import init_from_support
from .scale_invariant import fold_state_dict
from .train import RunResult, train

__all__ = ["finetune", "fixed_size", "from_pretrained", "HEAD_FIELDS"]

HEAD_FIELDS = ("head", "proxy_local", "proxy_mix", "proxy_scale")  # taken from the recipe, like the SI fields


def fixed_size(cfg: Config, patch_size: int) -> Config:
    """Fine-tune at one patch size (with ``cfg.finetune``'s adjustments) and still evaluate at every
    size the recipe lists."""
    check_patch_sizes([patch_size], cfg.data.image_size)
    cfg.patch.eval_sizes = sorted(set(cfg.patch.eval_sizes or cfg.patch.sizes) | {patch_size})
    cfg.patch.sizes, cfg.patch.strides, cfg.patch.default = [patch_size], None, patch_size
    cfg.patch.distribution, cfg.patch.weights, cfg.patch.curriculum = "uniform", None, []
    cfg.optim.lr *= cfg.finetune.fixed_lr_scale
    cfg.optim.pull = cfg.finetune.fixed_pull
    return cfg


def from_pretrained(pretrained: FlexiViT, fresh: FlexiViT, *,
                    support: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None, seed: int = 0) -> FlexiViT:
    """The pretrained network with ``fresh``'s image size, default patch and a new head for its classes,
    and ``fresh``'s scale-invariant layers (the recipe's ``model.scale_invariant``, ``si_norm`` and
    ``si_head_scale``): the checkpoint is folded into plain weights and reparametrised, which keeps the
    function of every pretrained layer. A LUT-Q checkpoint fine-tunes as the dense weights it computes
    with (float; compress the result again to tie it). The head's kind is ``fresh``'s too (``HEAD_FIELDS``);
    a proxy head is initialised from ``support`` = (images, labels, patch sizes) of the new task
    (``flexivit.proxies.init_from_support``, k-means seeded with ``seed``)."""
    if pretrained.config.in_chans != fresh.config.in_chans:
        raise ValueError(
            f"the checkpoint takes {pretrained.config.in_chans}-channel images but the data gives "
            f"{fresh.config.in_chans}; set data.channels={pretrained.config.in_chans}"
        )
    fields = {**pretrained.config.to_dict(), "img_size": fresh.config.img_size,
              "patch_size": fresh.config.patch_size, "stride": fresh.config.stride,
              "num_classes": fresh.config.num_classes, "scale_invariant": "none", "si_norm": "matrix",
              "si_head_scale": None, "lutq_k": None, "lutq_scope": "blocks", "lutq_pow2": False,
              **{key: getattr(fresh.config, key) for key in HEAD_FIELDS}}
    model = FlexiViT(FlexiViTConfig.from_dict(fields))
    dense = fold_lutq(pretrained, fold_state_dict(pretrained))  # LUT-Q layers fine-tune as their dense weights
    body = {k: v for k, v in dense.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"the checkpoint's weights do not fit its own config: missing {missing}, unexpected {unexpected}")
    si = fresh.config
    if si.scale_invariant != "none":
        model.make_scale_invariant(si.scale_invariant, norm=si.si_norm, head_scale=si.si_head_scale)
    if si.head == "proxies" and support is not None:
        images, labels, sizes = support
        init_from_support(model, images, labels, sizes, seed=seed)
    return model


def finetune(checkpoint: str | Path, cfg: Config, *, out_dir: str | Path, resume: bool = False,
             overwrite: bool = False) -> RunResult:
    """Train ``cfg`` starting from the FlexiViT in ``checkpoint`` (a run directory or model file).

    The architecture comes from the checkpoint (of the recipe's ``model`` section only the scale-invariant
    reparametrisation and the head's kind are used); the head is replaced for the classes of ``cfg``'s data, a
    proxy head initialised from training images of each class (``flexivit.fewshot.task_support``).
    """
    pretrained, _ = load_model(checkpoint)
    support = (*task_support(cfg), list(cfg.patch.sizes)) if cfg.model.head == "proxies" else None
    return train(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite,
                 init=lambda fresh: from_pretrained(pretrained, fresh, support=support, seed=cfg.train.seed))
