"""The optimizer and its schedule, built in one place from the run's config.

Every parameter group is made here: timm's weight-decay split (biases, norms and the names in
``model.no_weight_decay()`` get none), with ``optim.layer_decay`` timm's layer-wise decay (one group per
layer of ``model.group_matcher()``, lower layers at a smaller ``lr_scale``), and the groups options add
with their own learning-rate scale (timm's schedulers multiply a group's rate by its ``lr_scale``) or
without weight decay (``ModelOption.lr_scales`` / ``no_weight_decay``, asked of every registered option).
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from flexivit.model.options import registered
from flexivit.train.config import Config

__all__ = ["build_optimizer"]


def lr_scales(cfg: Config, model: nn.Module) -> dict[str, float]:
    """Learning-rate multipliers by parameter name that the config asks for, the options' included; a
    parameter named twice gets the product; 1 is left out."""
    scales = {"patch_embed.weight": cfg.optim.kernel_lr_scale}
    for option in registered():
        for name, scale in option.lr_scales(cfg, model).items():
            scales[name] = scales.get(name, 1.0) * scale
    return {name: scale for name, scale in scales.items() if scale != 1.0}


def _split_scaled(optimizer: torch.optim.Optimizer, model: nn.Module, scales: dict[str, float],
                  no_decay: set[str] = frozenset()) -> None:
    """Move each scaled parameter, and each in ``no_decay``, out of its group into a copy of that group
    whose ``lr_scale`` is multiplied by its scale (and whose weight decay is 0 for ``no_decay``), before
    any step, so there is no optimizer state to move."""
    names = {id(p): n for n, p in model.named_parameters()}
    unknown = sorted((set(scales) | set(no_decay)) - set(names.values()))
    if unknown:
        raise ValueError(f"learning-rate scales or decay settings for parameters the model does not have: {unknown}")
    for group in list(optimizer.param_groups):
        for param in [p for p in group["params"] if names.get(id(p)) in scales.keys() | no_decay]:
            name = names[id(param)]
            group["params"] = [p for p in group["params"] if p is not param]
            settings = {k: v for k, v in group.items() if k != "params"}
            settings["lr_scale"] = settings.get("lr_scale", 1.0) * scales.get(name, 1.0)
            if name in no_decay:
                settings["weight_decay"] = 0.0
            optimizer.add_param_group({**settings, "params": [param]})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


def build_optimizer(cfg: Config, model: nn.Module) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """The optimizer over ``model``'s parameters (the unwrapped model: timm groups them by name) and its
    warmup + cosine schedule over ``train.steps``."""
    o = cfg.optim
    optimizer = create_optimizer_v2(
        model, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay, layer_decay=o.layer_decay
    )
    no_decay = {name for option in registered() for name in option.no_weight_decay(cfg, model)}
    _split_scaled(optimizer, model, lr_scales(cfg, model), no_decay)
    # timm's scheduler is a pure function of the update count, so it needs no checkpointed state. A 0-step
    # run (a training-free `flexivit compress`) never steps; timm's scheduler wants a positive length.
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(1, cfg.train.steps), lr_min=o.min_lr, warmup_t=o.warmup_steps,
        warmup_lr_init=o.lr * 1e-3, t_in_epochs=False,
    )
    scheduler.step_update(0)  # every group's first step at its own scale, warmup or not
    return optimizer, scheduler
