"""The values a run cannot work with, checked after a recipe and its overrides are applied (and again by the
trainer for a config built in Python), and the error every config problem raises. Re-exported by
``flexivit.train.config``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from flexivit.model.options import registered

if TYPE_CHECKING:  # the config imports this module: the type only for annotations
    from flexivit.train.config import Config

__all__ = ["ConfigError", "check_config"]


class ConfigError(ValueError):
    """A recipe, config file or ``--set`` override that cannot be used; the message names the key."""


_POSITIVE = (lambda v: v >= 1, "a positive integer")
_NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")  # NaN fails every comparison, so it is refused too
# Checked after a recipe and its overrides are applied (and by the trainer), so a value that would fail
# deep inside a run (a modulo by zero, torch's "Invalid learning rate") stops first, naming its key.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.batch_size": _POSITIVE,
    "data.eval_batch_size": _POSITIVE,
    "data.image_size": _POSITIVE,
    "data.num_workers": _NOT_NEGATIVE,
    "data.val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "data.hflip": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "data.mixup": _NOT_NEGATIVE,
    "data.cutmix": _NOT_NEGATIVE,
    "data.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.on_corrupt": (lambda v: v in ("error", "skip"), "'error' or 'skip'"),
    "data.eval_limit": (lambda v: v is None or v >= 1, "unset (none) or a positive integer"),
    "patch.row_tokens": (lambda v: v is None or v >= 1, "unset (none: the longest image) or a positive integer"),
    "patch.pack_patience": _NOT_NEGATIVE,
    "train.steps": _NOT_NEGATIVE,  # 0: no training step (compress's training-free mode)
    "train.grad_accum": _POSITIVE,
    "train.token_budget": (lambda v: v >= 0, "0 (off) or a positive token count"),
    "finetune.fixed_others": (lambda v: 0 <= v < 1, "a share in [0, 1)"),
    "finetune.consistency": (lambda v: v >= 0, "0 (off) or a positive weight"),
    "finetune.consistency_share": (lambda v: 0 < v <= 1, "a share in (0, 1]"),
    "finetune.head_init": (lambda v: v in ("fresh", "probe"), "'fresh' or 'probe'"),
    "finetune.fixed_at": (lambda v: v is None or v >= 1, "unset (set by --patch-size) or a patch size"),
    "train.log_every": _POSITIVE,
    "train.checkpoint_every": _POSITIVE,
    "train.eval_every": (lambda v: v >= 0, "0 (at the end only) or a positive integer"),
    "train.mixed_precision": (lambda v: v in ("no", "bf16", "fp16"), "'no', 'bf16' or 'fp16'"),
    "optim.lr": _NOT_NEGATIVE,
    "optim.weight_decay": _NOT_NEGATIVE,
    "optim.warmup_steps": _NOT_NEGATIVE,
    "optim.min_lr": _NOT_NEGATIVE,
    "optim.clip_grad": (lambda v: v is None or v > 0, "unset (none) or positive"),
    "optim.kernel_lr_scale": _NOT_NEGATIVE,
    "distill.temperature": (lambda v: v > 0, "positive"),
    "distill.label_weight": _NOT_NEGATIVE,
}


def check_config(config: Config) -> Config:
    """Raise ``ConfigError`` naming the first field whose value cannot work (``train.log_every=0: must be a
    positive integer``); returns ``config``."""
    for key, (ok, requirement) in _RULES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not ok(value):
            raise ConfigError(f"{key}={value!r}: must be {requirement}")
    for option in registered():  # the keys options add (flexivit.model.options)
        try:
            option.check_run(config)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return config
