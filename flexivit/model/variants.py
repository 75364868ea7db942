"""FlexiViT variants registered with timm and built the way timm builds its own models.

``timm.create_model("flexi_vit_small")`` goes through ``timm.models.build_model_with_cfg`` with a
registered ``pretrained_cfg`` per variant, so timm's options work as for its ViTs: ``features_only=True``
(per-block feature maps, at any patch scheme: ``features(x, patch_size=..., stride=...)``),
``pretrained=True, pretrained_cfg_overlay=dict(file=...)`` (a flexivit ``model.safetensors`` or a state_dict
file, read by ``flexivit.model.timm_weights``), ``checkpoint_path=...`` and ``timm.models.load_checkpoint``.

timm already registers ``flexivit_small/base/large`` (fixed-/16 ports of the official weights) and a
second registration of a name silently replaces the first, so ours live under ``flexi_vit_*`` and
registration refuses any name timm already has.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import torch
from timm.models import (PretrainedCfg, build_model_with_cfg, generate_default_cfgs, is_model, register_model,
                         resolve_pretrained_cfg)
from timm.models._features import FeatureGetterNet  # not re-exported by timm.models; build_model_with_cfg's own

from flexivit.model.options import option_for_key
from flexivit.model.patch_embed import PatchScheme
from flexivit.model.timm_weights import WeightsFile, checkpoint_filter_fn, read_weights_file
from flexivit.model.vit import FlexiViT, FlexiViTConfig

__all__ = ["VARIANTS", "create_variant", "FlexiFeatureGetter", "default_cfgs"]

# The paper's setting: 240 px images, a 32x32 base kernel, a 7x7 base grid, patch sizes 8..48.
_PAPER = dict(img_size=240, patch_size=16, base_patch_size=32, base_grid=7)
VARIANTS: dict[str, dict[str, Any]] = {
    # A CPU-sized model for 28-32 px data (Fashion-MNIST): 64 wide, 4 deep, ~0.2 M parameters.
    "flexi_vit_micro": dict(
        img_size=28, patch_size=7, base_patch_size=14, base_grid=7,
        embed_dim=64, depth=4, num_heads=2, class_token=False, global_pool="avg",
    ),
    "flexi_vit_tiny": dict(_PAPER, embed_dim=192, depth=12, num_heads=3),
    "flexi_vit_small": dict(_PAPER, embed_dim=384, depth=12, num_heads=6),
    "flexi_vit_base": dict(_PAPER, embed_dim=768, depth=12, num_heads=12),
}
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(FlexiViTConfig))
_OUT_INDICES = 3  # features_only's default: the last three blocks, as timm's ViTs


def _model_cfg(config: FlexiViTConfig) -> dict[str, Any]:
    """The ``pretrained_cfg`` input fields of a model without source weights: those of ``FlexiViT.pretrained_cfg``."""
    c = config.in_chans
    return dict(input_size=(c, config.img_size, config.img_size), mean=(0.5,) * c, std=(0.5,) * c,
                num_classes=config.num_classes)


# One pretrained_cfg per variant (no weights to download): what timm's data helpers and loaders read.
default_cfgs = generate_default_cfgs({
    name: dict(**_model_cfg(FlexiViTConfig(**fields)), interpolation="bicubic", crop_pct=1.0,
               first_conv="patch_embed", classifier="head", paper_ids="arXiv:2212.08013",
               paper_name="FlexiViT: One Model for All Patch Sizes")
    for name, fields in VARIANTS.items()
})


class FlexiFeatureGetter(FeatureGetterNet):
    """timm's ``FeatureGetterNet`` whose forward also takes the patch scheme: ``features(x, patch_size, stride)``.

    timm's class calls ``forward_intermediates(x, ...)`` with no way to pass it more; this adds the two
    arguments and otherwise is timm's (``out_indices``, ``norm``, ``output_fmt``, ``feature_info``).
    ``feature_info``'s reductions are the default scheme's stride; at another scheme the maps have that one's grid.
    """

    def forward(self, x: torch.Tensor, patch_size: int | PatchScheme | None = None,
                stride: int | None = None) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True,
                                                patch_size=patch_size, stride=stride)


def _weights_file(cfg: PretrainedCfg) -> WeightsFile | None:
    """The local file timm will load weights from, read now; ``None`` for other sources (state_dict, url, hub)."""
    return read_weights_file(cfg.file) if cfg.file and cfg.state_dict is None else None


def create_variant(
    name: str,
    pretrained: bool = False,
    *,
    pretrained_cfg: str | dict[str, Any] | PretrainedCfg | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    **kwargs: Any,
) -> FlexiViT | FlexiFeatureGetter:
    """Build a registered variant through timm's ``build_model_with_cfg``; ``kwargs`` override its config
    (e.g. ``num_classes=10, in_chans=1``) or are timm's (``features_only``, ``out_indices``, ``feature_cls``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown FlexiViT variant {name!r}; known: {sorted(VARIANTS)}")
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    source = _weights_file(cfg) if pretrained else None
    if pretrained and source is None and not cfg.has_weights and cfg.state_dict is None:
        raise ValueError(
            f"{name} has no downloadable weights; pass a flexivit model file with "
            "pretrained_cfg_overlay=dict(file=PATH), or start from timm weights with "
            "FlexiViT.from_timm(timm.create_model('flexivit_small', pretrained=True))"
        )
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS or option_for_key(k) is not None}
    config = FlexiViTConfig.from_dict({**VARIANTS[name], **(source.model_defaults() if source else {}), **fields})
    # The pretrained_cfg describes the source weights (timm compares the model with it to replace the head or
    # adapt the input channels), or this model where there are none; the caller's overlay has the last word.
    cfg = dataclasses.replace(cfg, **_model_cfg(config))
    head_replaced = chans_adapted = False
    if source is not None:
        source.check_fits(config, name)
        cfg = dataclasses.replace(cfg, **source.pretrained_cfg(config))
        head_replaced = source.num_classes is not None and source.num_classes != config.num_classes
        chans_adapted = source.in_chans is not None and source.in_chans != config.in_chans
    overlay = {**(pretrained_cfg_overlay or {}), **({"file": str(source.path)} if source is not None else {})}
    cfg = dataclasses.replace(cfg, **overlay)
    origin = str(source.path) if source is not None else f"the pretrained weights of {name}"
    return build_model_with_cfg(
        FlexiViT,
        name,
        pretrained,
        pretrained_cfg=cfg,
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", min(_OUT_INDICES, config.depth)),
                         feature_cls=FlexiFeatureGetter),
        pretrained_filter_fn=partial(checkpoint_filter_fn, origin=origin, head_replaced=head_replaced,
                                     chans_adapted=chans_adapted),
        cache_dir=cache_dir,
        **config.to_dict(),  # every field explicit: timm's defaults from the pretrained_cfg do not apply
        **kwargs,
    )


def _entrypoint(name: str) -> Callable[..., FlexiViT]:
    def build(pretrained: bool = False, **kwargs: Any) -> FlexiViT:
        return create_variant(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"FlexiViT variant {name}: {VARIANTS[name]}"
    return build


def _register_all() -> None:
    for name in VARIANTS:
        if is_model(name):
            if _is_ours(name):
                continue  # registered by an earlier import of this module (e.g. after a reload)
            raise RuntimeError(f"timm already registers {name!r}; refusing to overwrite it")
        register_model(_entrypoint(name))


def _is_ours(name: str) -> bool:
    from timm.models import model_entrypoint

    return getattr(model_entrypoint(name), "__module__", None) == __name__


_register_all()
