"""What ``flexivit eval`` and the deployment tools evaluate: a FlexiViT checkpoint or a timm export folder
(``EvalSubject``), with the patch sizes it runs at and those swept by default."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from flexivit.model.weights import load_model, run_dir
from flexivit.eval.export import default_preprocess, is_export_dir, load_export
from flexivit.eval.measure import param_count
from flexivit.model.vit import FlexiViT
from flexivit.model.patch_embed import check_patch_sizes, valid_patch_sizes

__all__ = ["EvalSubject", "FixedSizeViT", "load_subject", "run_config_of", "resolve_patch_sizes", "parse_baseline",
           "MAX_AUTO_TOKENS"]

MAX_AUTO_TOKENS = 1024  # default sweep without a run config: the sizes giving at most this many tokens


class FixedSizeViT(nn.Module):
    """A timm ``VisionTransformer`` behind FlexiViT's ``forward(x, patch_size, stride)`` (its one size)."""

    def __init__(self, vit: nn.Module, patch_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor, patch_size: int | None = None, stride: int | None = None) -> torch.Tensor:
        if patch_size not in (None, self.patch_size) or stride not in (None, self.patch_size):
            raise ValueError(f"this exported model runs at patch size {self.patch_size} only, not {patch_size}")
        return self.vit(x)


@dataclass
class EvalSubject:
    """A model to sweep, with what is needed to feed it and to label its results."""

    checkpoint: str
    label: str
    model: nn.Module  # forward(x, patch_size, stride)
    meta: dict[str, Any]  # class_names, preprocess
    valid_sizes: list[int]
    default_sizes: list[int]
    run_config: dict[str, Any] | None = None

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.meta["preprocess"]


def run_config_of(checkpoint: str | Path) -> dict[str, Any] | None:
    """The resolved recipe (``config.json``) of the run a checkpoint belongs to, if there is one."""
    file = run_dir(checkpoint) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) and "data" in config and "patch" in config else None


def fixed_param_count(model: FlexiViT, patch: int) -> int:
    """Parameters of the timm ViT that ``model.to_fixed(patch)`` (and ``flexivit export``) gives."""
    cfg = model.config
    flexible_stem = model.patch_embed.weight.numel() + sum(p.numel() for p in model._posemb_params())
    tokens = (cfg.img_size // patch) ** 2
    return param_count(model) - flexible_stem + cfg.embed_dim * (cfg.in_chans * patch * patch + tokens)


def load_subject(checkpoint: str | Path, patch_size: int | None = None, *, single: bool = False) -> EvalSubject:
    """A FlexiViT run directory / model file, or a timm export folder (which runs at its one size).

    ``patch_size`` (or, with ``single``, the model's configured size) makes it a one-size subject.
    """
    path = str(checkpoint)
    if is_export_dir(checkpoint):
        vit, config = load_export(checkpoint)
        patch = int(config["patch_size"])
        if patch_size not in (None, patch):
            raise ValueError(f"{path} is an export at patch size {patch}; it cannot run at {patch_size}")
        meta = {"class_names": config["class_names"], "preprocess": config["preprocess"]}
        return EvalSubject(path, f"{Path(path).name} (timm, p{patch})", FixedSizeViT(vit, patch), meta,
                           [patch], [patch])
    model, meta = load_model(checkpoint)
    meta = {**meta, "preprocess": meta.get("preprocess") or default_preprocess(model)}
    valid = valid_patch_sizes(model.config.img_size)
    run_config = run_config_of(checkpoint)
    patch_cfg = (run_config or {}).get("patch") or {}
    trained = patch_cfg.get("eval_sizes") or patch_cfg.get("sizes")
    if trained:
        default = sorted({int(p) for p in trained})
    else:
        default = [p for p in valid if (model.config.img_size // p) ** 2 <= MAX_AUTO_TOKENS]
    label = run_dir(path).name or Path(path).name
    if patch_size is None and single:
        patch_size = model.config.patch_size
    if patch_size is not None:
        default = resolve_patch_sizes([patch_size], valid, image_size=model.config.img_size)
        label = f"{label} (p{patch_size})"
    return EvalSubject(path, label, model, meta, valid, default, run_config)


def resolve_patch_sizes(spec: str | Sequence[int] | None, valid: Sequence[int],
                        default: Sequence[int] | None = None, *, image_size: int) -> list[int]:
    """``None`` → ``default``; ``"all"`` → every valid size; ``"4,7,14"`` or ints → sizes checked by
    ``check_patch_sizes`` against ``image_size`` and ``valid`` (what the model runs at)."""
    if spec is None:
        return list(default if default is not None else valid)
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(valid)
        try:
            spec = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"patch sizes must look like 4,7,14 or 'all', got {spec!r}") from None
    return sorted({s.patch for s in check_patch_sizes([int(p) for p in spec], image_size, only=valid)})


def parse_baseline(spec: str) -> tuple[str, int | None]:
    """``CKPT[:PATCH]`` → (checkpoint, patch size or None)."""
    path, sep, patch = spec.rpartition(":")
    if sep and patch.isdigit() and path:
        return path, int(patch)
    return spec, None
