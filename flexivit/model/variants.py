"""FlexiViT variants registered with timm, so ``timm.create_model("flexi_vit_small")`` builds them.

timm already registers ``flexivit_small/base/large`` (fixed-/16 ports of the official weights) and a
second registration of a name silently replaces the first, so ours live under ``flexi_vit_*`` and
registration refuses any name timm already has.
"""

from __future__ import annotations

from typing import Any, Callable

from timm.models import is_model, register_model

from flexivit.model.vit import FlexiViT, FlexiViTConfig

__all__ = ["VARIANTS", "create_variant"]

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

# Keys timm's create_model passes to every entrypoint; FlexiViT has no hub weights to use them with.
_TIMM_CALL_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def create_variant(name: str, pretrained: bool = False, **kwargs: Any) -> FlexiViT:
    """Build a registered variant; ``kwargs`` override its config (e.g. ``num_classes=10, in_chans=1``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown FlexiViT variant {name!r}; known: {sorted(VARIANTS)}")
    if pretrained:
        raise ValueError(
            f"{name} has no downloadable weights; load a flexivit checkpoint, or start from timm weights "
            "with FlexiViT.from_timm(timm.create_model('flexivit_small', pretrained=True))"
        )
    for key in _TIMM_CALL_KEYS:
        kwargs.pop(key, None)
    return FlexiViT(FlexiViTConfig(**{**VARIANTS[name], **kwargs}))


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
