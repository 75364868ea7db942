"""``FlexiViTConfig``: everything that defines a FlexiViT's architecture, stored next to its weights.

A module of its own so that ``model.py`` and ``timm_interop.py`` can both use it without importing
each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .patch_embed import PatchScheme, check_patch_sizes
from .resize import check_method

__all__ = ["FlexiViTConfig", "GLOBAL_POOLS", "SI_SCOPES", "SI_NORMS"]

GLOBAL_POOLS = ("token", "avg")
SI_SCOPES = ("none", "head", "linears", "all")  # see flexivit.scale_invariant
SI_NORMS = ("matrix", "row")
_SI_FIELDS = ("scale_invariant", "si_norm", "si_head_scale")


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
    # Scale-invariant layers (flexivit.scale_invariant): "head", every Linear ("linears"), or every Linear
    # and the base patch kernel ("all") compute S*W/||W|| with a constant S; "none" is the plain ViT.
    scale_invariant: str = "none"
    si_norm: str = "matrix"  # ||W|| over the whole matrix or per output row ("row")
    si_head_scale: float | None = None  # the head's S (a logit scale); None: ||W|| when made scale-invariant

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
        self._check_scale_invariance()
        check_patch_sizes([PatchScheme(self.patch_size, self.stride)], self.img_size)

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def _check_scale_invariance(self) -> None:
        if self.scale_invariant not in SI_SCOPES:
            raise ValueError(f"unknown scale_invariant scope {self.scale_invariant!r}; choose one of {', '.join(SI_SCOPES)}")
        if self.si_norm not in SI_NORMS:
            raise ValueError(f"unknown si_norm {self.si_norm!r}; choose one of {', '.join(SI_NORMS)}")
        if self.scale_invariant == "none" and (self.si_norm != "matrix" or self.si_head_scale is not None):
            raise ValueError("si_norm and si_head_scale apply to scale-invariant layers only; set scale_invariant "
                             f"to one of {', '.join(SI_SCOPES[1:])} as well, or leave them unset")
        if self.si_head_scale is not None and not self.si_head_scale > 0:
            raise ValueError(f"si_head_scale must be positive (a logit scale), got {self.si_head_scale}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; those of scale-invariant layers only when they are on, so a plain model's
        config (and every file that stores it) is what it was before the option existed."""
        values = asdict(self)
        if self.scale_invariant == "none":
            for key in _SI_FIELDS:
                del values[key]
        return values

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
