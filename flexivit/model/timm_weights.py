"""Weight files through timm's own loaders: ``pretrained_cfg_overlay=dict(file=...)`` and ``load_checkpoint``.

timm reads the file itself (``safetensors``, or ``torch.load`` with ``weights_only=True``) and hands the
state_dict to the model's filter. What timm cannot know is what a file holds before it is read, so the
variants (``flexivit.model.variants``) read that here first and build the model to fit it:

- a flexivit ``model.safetensors`` (``flexivit.model.weights.save_model``) carries its config, class names
  and preprocessing in its metadata: the model takes the file's image size, default patch scheme, channels,
  classes and kernel resize unless the caller sets them, and every other field must match the variant;
- a plain state_dict in safetensors (``save_file(model.state_dict(), ...)``) tells its classes and channels
  by the shapes of ``head.weight`` and ``patch_embed.weight``, read without loading the tensors;
- any other file (``.pth``/``.bin``) is taken as a state_dict for the model the caller describes.

``checkpoint_filter_fn`` then refuses, in one line naming the misfits, a state_dict that does not fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import nn

from flexivit.model.config import FlexiViTConfig
from flexivit.model.weights import MODEL_FILE, CheckpointError, read_model_meta

__all__ = ["FROM_FILE", "WeightsFile", "checkpoint_filter_fn", "read_weights_file"]

# Fields a model loaded from a flexivit file takes from it unless the caller sets them: none changes which
# tensors the model holds in a way timm cannot adapt (the head is replaced, the input channels adapted).
FROM_FILE = ("img_size", "patch_size", "stride", "in_chans", "num_classes", "kernel_resize", "posemb_antialias",
             "pad")
_TRAINING_ONLY = ("drop_rate", "pos_drop_rate", "attn_drop_rate", "drop_path_rate")
_HEAD_KEYS = ("head.weight", "head.bias")  # what timm drops when the classes differ (pretrained_cfg "classifier")
_KERNEL = "patch_embed.weight"  # what timm adapts when the channels differ (pretrained_cfg "first_conv")
_SHOWN = 4  # misfits named per kind in an error


@dataclass(frozen=True)
class WeightsFile:
    """What a weights file holds, read before timm loads it. ``None``: not known before loading."""

    path: Path
    config: dict[str, Any] | None = None  # a flexivit model file's config
    preprocess: dict[str, Any] | None = None
    class_names: tuple[str, ...] | None = None
    num_classes: int | None = None  # 0: no head
    in_chans: int | None = None

    def model_defaults(self) -> dict[str, Any]:
        """Config fields the model takes from the file unless the caller sets them."""
        if self.config is not None:
            return {k: self.config[k] for k in FROM_FILE if k in self.config}
        known = {"num_classes": self.num_classes, "in_chans": self.in_chans}
        return {k: v for k, v in known.items() if v is not None}

    def check_fits(self, config: FlexiViTConfig, variant: str) -> None:
        """Refuse, in one line, a flexivit file whose architecture differs from ``config`` (built as ``variant``)."""
        if self.config is None:
            return
        try:
            saved = asdict(FlexiViTConfig.from_dict(self.config))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{self.path} holds a config this flexivit cannot build ({err})") from None
        built = asdict(config)
        free = set(FROM_FILE) | set(_TRAINING_ONLY)
        differ = [k for k in saved if k not in free and saved[k] != built[k]]
        if differ:
            got = ", ".join(f"{k}={saved[k]!r} (the model: {built[k]!r})" for k in differ)
            raise CheckpointError(
                f"{self.path} holds a FlexiViT with {got}, which {variant} does not build: pass those fields to "
                "timm.create_model, or load the file with flexivit.model.weights.load_model"
            )

    def pretrained_cfg(self, config: FlexiViTConfig) -> dict[str, Any]:
        """timm ``pretrained_cfg`` fields that describe the file's model (``config``'s where the file does not say)."""
        pre = self.preprocess or {}
        chans = int(pre.get("channels", self.in_chans or config.in_chans))
        size = int(pre.get("image_size", (self.config or {}).get("img_size", config.img_size)))
        fields: dict[str, Any] = dict(input_size=(chans, size, size))
        if self.num_classes is not None:
            fields["num_classes"] = self.num_classes
        fields.update({k: tuple(pre.get(k, (0.5,) * chans)) for k in ("mean", "std")})  # flexivit's default scaling
        fields.update({k: pre[k] for k in ("crop_pct", "interpolation") if k in pre})
        if self.class_names:
            fields["label_names"] = self.class_names
        return fields


def _safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """The metadata and the shapes of the head and kernel tensors, without reading any tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in (*_HEAD_KEYS[:1], _KERNEL) if k in f.keys()}
            return dict(f.metadata() or {}), shapes
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); pass a model.safetensors or a "
                              "state_dict saved with safetensors.torch.save_file") from None


def read_weights_file(path: str | Path) -> WeightsFile:
    """What ``path`` (a weights file, or a run directory holding ``model.safetensors``) holds."""
    path = Path(path)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; pass a model.safetensors, a run directory or a "
                              "state_dict file")
    if path.suffix != ".safetensors":
        return WeightsFile(path)  # timm reads it with torch.load(weights_only=True): nothing to peek at
    metadata, shapes = _safetensors_header(path)
    if "flexivit" in metadata:
        meta = read_model_meta(path)  # checks the format version
        config = meta["config"]
        return WeightsFile(path, config=config, preprocess=meta.get("preprocess"),
                           class_names=tuple(meta.get("class_names") or ()) or None,
                           num_classes=int(config.get("num_classes", 0)), in_chans=int(config.get("in_chans", 3)))
    head, kernel = shapes.get("head.weight"), shapes.get(_KERNEL)
    in_chans = kernel[1] if kernel and len(kernel) == 4 else None  # (D, C, p, p)
    return WeightsFile(path, num_classes=head[0] if head else 0, in_chans=in_chans)


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    origin: str = "the checkpoint",
    head_replaced: bool = False,
    chans_adapted: bool = False,
) -> dict[str, torch.Tensor]:
    """timm's filter hook (``load_pretrained``'s ``filter_fn``, ``load_checkpoint(..., filter_fn=...)``):
    ``state_dict`` unchanged when it fits ``model``, else a ``CheckpointError`` naming what does not fit.

    ``head_replaced``: timm drops the head's weights after this filter (the classes differ), so their shapes
    are not compared; ``chans_adapted``: timm adapts the kernel's input channels, so that dimension is not.
    """
    if "patch_embed.proj.weight" in state_dict:
        raise CheckpointError(f"{origin} is a timm VisionTransformer state_dict, not a FlexiViT one: convert it with "
                              "FlexiViT.from_timm(state_dict, ...)")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    skip = set(_HEAD_KEYS) if head_replaced else set()
    missing = sorted(k for k in want.keys() - have.keys() if k not in skip)
    unexpected = sorted(k for k in have.keys() - want.keys() if k not in skip)

    def fits(key: str) -> bool:
        if key in skip:
            return True
        if key == _KERNEL and chans_adapted and len(have[key]) == 4:
            return have[key][:1] + have[key][2:] == want[key][:1] + want[key][2:]
        return have[key] == want[key]

    shapes = [f"{k} {list(have[k])} (the model: {list(want[k])})" for k in sorted(want.keys() & have.keys())
              if not fits(k)]
    if missing or unexpected or shapes:
        parts = [f"{label} {_names(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shapes differ:", shapes)) if keys]
        raise CheckpointError(f"{origin} does not fit this {type(model).__name__}: {'; '.join(parts)}. Build the model "
                              "with the config the weights were trained with (a flexivit model file can be loaded with "
                              "flexivit.model.weights.load_model)")
    return state_dict
