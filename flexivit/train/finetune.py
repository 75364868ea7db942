"""Fine-tuning a pretrained FlexiViT on a new task, keeping the patch size a deployment choice.

By default patch schemes are sampled while fine-tuning, as in pretraining. ``patch_size`` fine-tunes at one
size instead, with the recipe's ``finetune.fixed_*`` adjustments (learning-rate scale, L2-SP pull) and the
settings of ``flexivit.train.finetune_modes`` that keep the other sizes: by default the consistency term on every
step, without which a fine-tune at one size loses the others (docs/flexible_finetune.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexivit.model.config import CORE_FIELDS
from flexivit.model.patch_embed import check_patch_sizes
from flexivit.model.vit import FlexiViT, FlexiViTConfig
from flexivit.model.weights import load_model
from flexivit.train.builders import task_support
from flexivit.train.config import Config
from flexivit.train.finetune_modes import HEAD_PROBE_PER_CLASS, keep_other_sizes, probe_head
from flexivit.train.loop import RunResult, train

__all__ = ["finetune", "fixed_size", "from_pretrained"]


def fixed_size(cfg: Config, patch_size: int) -> Config:
    """Fine-tune at one patch size (with ``cfg.finetune``'s adjustments) and still evaluate at every
    size the recipe lists; with ``finetune.fixed_others`` the recipe's other sizes keep that share of the steps."""
    check_patch_sizes([patch_size], cfg.data.image_size)
    others = [s for s in cfg.patch.sizes if s != patch_size]
    cfg.patch.eval_sizes = sorted(set(cfg.patch.eval_sizes or cfg.patch.sizes) | {patch_size})
    cfg.patch.sizes, cfg.patch.strides, cfg.patch.default = [patch_size], None, patch_size
    cfg.patch.distribution, cfg.patch.weights, cfg.patch.curriculum = "uniform", None, []
    cfg.patch.per_image = False  # one size per step (a pack of one size is a batch), as the consistency term needs
    cfg.optim.lr *= cfg.finetune.fixed_lr_scale
    cfg.optim.pull = cfg.finetune.fixed_pull
    cfg.finetune.fixed_at = patch_size
    return keep_other_sizes(cfg, patch_size, others) if cfg.finetune.fixed_others else cfg


def from_pretrained(pretrained: FlexiViT, fresh: FlexiViT, *,
                    support: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None, seed: int = 0,
                    sizes: list[int] | None = None) -> FlexiViT:
    """The pretrained network with ``fresh``'s image size, default patch and a new head for its classes.

    Model options follow their registration (``flexivit.model.options``): one that ``folds`` (e.g. a
    reparametrisation, tied weights) is folded into the plain weights it computes with, so every pretrained layer keeps its
    function; one taken ``from_recipe`` (e.g. the head's kind) comes from ``fresh`` and is
    applied after the weights are loaded (``prepare_finetune``: e.g. a head initialised from
    ``support`` = (images, labels, patch sizes) of the new task, seeded with ``seed``); the others stay as
    the checkpoint has them, told the patch ``sizes`` the fine-tune trains (``finetune_sizes``: e.g. state
    measured at other sizes goes stale)."""
    if pretrained.config.in_chans != fresh.config.in_chans:
        raise ValueError(
            f"the checkpoint takes {pretrained.config.in_chans}-channel images but the data gives "
            f"{fresh.config.in_chans}; set data.channels={pretrained.config.in_chans}"
        )
    kept = [(o.name, v) for o, v in pretrained.config.active() if not (o.folds or o.from_recipe)]
    taken = [(o.name, v) for o, v in fresh.config.active() if o.from_recipe and not o.folds]
    core = {k: v for k, v in pretrained.config.to_dict().items() if k in CORE_FIELDS}
    core.update(img_size=fresh.config.img_size, patch_size=fresh.config.patch_size, stride=fresh.config.stride,
                num_classes=fresh.config.num_classes)
    model = FlexiViT(FlexiViTConfig(**core, options=tuple(kept + taken)))
    body = {k: v for k, v in pretrained.plain_state_dict().items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"the checkpoint's weights do not fit its own config: missing {missing}, unexpected {unexpected}")
    for option, values in model.config.active():
        if not option.from_recipe and sizes is not None:
            option.finetune_sizes(values, model, sizes)
    for option, values in fresh.config.active():
        if option.from_recipe:
            option.prepare_finetune(values, model, support, seed=seed)
    return model


def finetune(checkpoint: str | Path, cfg: Config, *, out_dir: str | Path, resume: bool = False,
             overwrite: bool = False) -> RunResult:
    """Train ``cfg`` starting from the FlexiViT in ``checkpoint`` (a run directory or model file).

    The architecture comes from the checkpoint (of the recipe's ``model`` section only the options a
    fine-tune takes from the recipe are used, ``ModelOption.from_recipe``); the head is
    replaced for the classes of ``cfg``'s data, and an option that needs examples of the new task gets some
    training images of each class (``flexivit.train.builders.task_support``).
    """
    pretrained, _ = load_model(checkpoint)

    def init(fresh: FlexiViT) -> FlexiViT:
        needs = any(o.from_recipe and o.needs_support for o, _ in fresh.config.active())
        support = (*task_support(cfg), list(cfg.patch.sizes)) if needs else None
        model = from_pretrained(pretrained, fresh, support=support, seed=cfg.train.seed, sizes=list(cfg.patch.sizes))
        if cfg.finetune.head_init == "probe":
            model = probe_head(model, *task_support(cfg, HEAD_PROBE_PER_CLASS), cfg.patch.eval_sizes or cfg.patch.sizes)
        return model

    return train(cfg, out_dir=out_dir, resume=resume, overwrite=overwrite, init=init)
