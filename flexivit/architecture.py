"""``FlexiViTConfig``: everything that defines a FlexiViT's architecture, stored next to its weights.

A module of its own so that ``model.py`` and ``timm_interop.py`` can both use it without importing
each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .patch_embed import PatchScheme, check_patch_sizes
from .resize import check_method

__all__ = ["FlexiViTConfig", "GLOBAL_POOLS"]

GLOBAL_POOLS = ("token", "avg")


@dataclass(frozen=True)
class FlexiViTConfig:
    """Everything that defines a FlexiViT's architecture; stored next to its weights."""

    img_size: int = 224
    patch_size: int = 16  # the default for forward(); any size that tiles the image works
    stride: int | None = None  # default stride (None = patch_size, non-overlapping)
    base_patch_size: int = 32  # stored kernel size
    base_grid: int = 7  # stored position-embedding grid (base_grid x base_grid)
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # layer scale
    class_token: bool = True
    global_pool: str = "token"  # "token" (class token) or "avg" (mean of patch tokens)
    fc_norm: bool | None = None  # None: as timm, norm after pooling iff global_pool == "avg"
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP-style; disables the patch bias)
    final_norm: bool = True
    posemb: str = "learn"  # "learn" (one H x W grid) or "factorized" (one row + one column)
    posemb_antialias: bool = False
    # The image resize the kernel's PI-resize is matched to: "bilinear" (the official weights),
    # "bilinear_aa" (antialiased bilinear, a tent filter when downsampling) or "area" (box filter).
    kernel_resize: str = "bilinear"
    pad: bool = False  # pad images whose size the patch does not tile (instead of an error)
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without it")
        if self.posemb not in ("learn", "factorized"):
            raise ValueError(f"posemb must be 'learn' or 'factorized', got {self.posemb!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        check_method(self.kernel_resize)
        check_patch_sizes([PatchScheme(self.patch_size, self.stride)], self.img_size)

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlexiViTConfig":
        """From ``to_dict``'s output, also as saved by older versions (``kernel_antialias`` is read as
        ``kernel_resize``: true → ``bilinear_aa``, false → ``bilinear``)."""
        values = dict(values)
        if "kernel_antialias" in values:
            antialias = values.pop("kernel_antialias")
            values.setdefault("kernel_resize", "bilinear_aa" if antialias else "bilinear")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FlexiViT config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)
