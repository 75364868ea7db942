"""FlexiViT: one vision transformer that runs at any patch size.

The transformer is built from timm's ``Block``s and mirrors timm's ``VisionTransformer`` module names
(``cls_token``, ``norm_pre``, ``blocks``, ``norm``, ``fc_norm``, ``head``) so weights move between the two
by renaming two keys. What differs is the stem: one base patch-embedding kernel, PI-resized to the patch
size of each call, and one learned position-embedding grid, resampled bilinearly to the token grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .patch_embed import FlexiPatchEmbed, PatchScheme
from .resize import resample_posemb

__all__ = ["FlexiViT", "FlexiViTConfig"]

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
    kernel_antialias: bool = False  # area-like PI-resize when downsampling the kernel
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
        PatchScheme(self.patch_size, self.stride).grid_size((self.img_size, self.img_size))

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlexiViTConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FlexiViT config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)


class FlexiViT(nn.Module):
    """A ViT whose ``forward(x, patch_size, stride)`` accepts any patch scheme that tiles the image."""

    def __init__(self, config: FlexiViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = config if config is not None else FlexiViTConfig()
        if overrides:
            cfg = FlexiViTConfig.from_dict({**cfg.to_dict(), **overrides})
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = int(cfg.class_token)
        self.global_pool = cfg.global_pool
        dim = cfg.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = FlexiPatchEmbed(
            base_patch_size=cfg.base_patch_size,
            in_chans=cfg.in_chans,
            embed_dim=dim,
            bias=not cfg.pre_norm,
            antialias=cfg.kernel_antialias,
            pad=cfg.pad,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        g = cfg.base_grid
        if cfg.posemb == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, g, g, dim))  # (1, H, W, D)
        else:
            self.pos_embed_h = nn.Parameter(torch.zeros(1, g, 1, dim))  # (1, H, 1, D)
            self.pos_embed_w = nn.Parameter(torch.zeros(1, 1, g, dim))  # (1, 1, W, D)
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.norm_pre = norm_layer(dim) if cfg.pre_norm else nn.Identity()
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()  # stochastic depth per block
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=dim,
                    num_heads=cfg.num_heads,
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias,
                    qk_norm=cfg.qk_norm,
                    init_values=cfg.init_values,
                    proj_drop=cfg.drop_rate,
                    attn_drop=cfg.attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                )
                for i in range(cfg.depth)
            ]
        )
        self.norm = norm_layer(dim) if cfg.final_norm and not cfg.use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(dim) if cfg.final_norm and cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        # timm-style metadata so timm.data.resolve_data_config(model=...) works.
        self.pretrained_cfg = {
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": (0.5,) * cfg.in_chans,
            "std": (0.5,) * cfg.in_chans,
            "num_classes": cfg.num_classes,
        }
        self._posemb_cache: dict[tuple[int, int], tuple[tuple, torch.Tensor]] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        for p in self._posemb_params():
            trunc_normal_(p, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _posemb_params(self) -> list[nn.Parameter]:
        return [self.pos_embed] if self.config.posemb == "learn" else [self.pos_embed_h, self.pos_embed_w]

    # ---- schemes ---------------------------------------------------------------------------------
    def scheme(self, patch_size: int | PatchScheme | None = None, stride: int | None = None) -> PatchScheme:
        """The scheme for a call: ``None`` means the configured default."""
        if isinstance(patch_size, PatchScheme):
            if stride is not None and stride != patch_size.stride:
                raise ValueError(f"stride {stride} given with a PatchScheme of stride {patch_size.stride}")
            return patch_size
        if patch_size is None:
            patch_size = self.config.patch_size
            stride = self.config.stride if stride is None else stride
        return PatchScheme(int(patch_size), stride)

    def posemb_grid(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The position embedding resampled to ``grid_hw`` tokens: ``(1, gh, gw, D)``."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._resample_posemb(grid_hw)
        params = self._posemb_params()
        key = tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in params)
        hit = self._posemb_cache.get(grid_hw)
        if hit is None or hit[0] != key:
            hit = (key, self._resample_posemb(grid_hw))
            self._posemb_cache[grid_hw] = hit
        return hit[1]

    def _resample_posemb(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        aa = self.config.posemb_antialias
        if self.config.posemb == "learn":
            return resample_posemb(self.pos_embed, grid_hw, antialias=aa)
        gh, gw = grid_hw
        rows = resample_posemb(self.pos_embed_h, (gh, 1), antialias=aa)  # (1, gh, 1, D)
        cols = resample_posemb(self.pos_embed_w, (1, gw), antialias=aa)  # (1, 1, gw, D)
        return rows + cols  # (1, gh, gw, D)

    # ---- forward ---------------------------------------------------------------------------------
    def forward_features(
        self, x: torch.Tensor, patch_size: int | PatchScheme | None = None, stride: int | None = None
    ) -> torch.Tensor:
        """Tokens after the final norm: ``(B, prefix + gh*gw, D)``."""
        tokens = self.patch_embed(x, self.scheme(patch_size, stride))  # (B, gh, gw, D)
        b, gh, gw, d = tokens.shape
        tokens = (tokens + self.posemb_grid((gh, gw))).reshape(b, gh * gw, d)  # (B, N, D)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)  # (B, 1 + N, D)
        tokens = self.norm_pre(self.pos_drop(tokens))
        return self.norm(self.blocks(tokens))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens of ``forward_features`` and apply the classifier."""
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)  # (B, D)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(
        self, x: torch.Tensor, patch_size: int | PatchScheme | None = None, stride: int | None = None
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, patch_size, stride))

    # ---- timm-style helpers ----------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head for ``num_classes`` outputs (0 removes it), e.g. before fine-tuning."""
        self.num_classes = num_classes
        self.config = FlexiViTConfig.from_dict({**self.config.to_dict(), "num_classes": num_classes})
        self.pretrained_cfg["num_classes"] = num_classes
        old = self.head
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            if isinstance(old, nn.Linear):
                self.head.to(device=old.weight.device, dtype=old.weight.dtype)
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        names = {"cls_token", "pos_embed", "pos_embed_h", "pos_embed_w"}
        return {n for n, _ in self.named_parameters() if n in names}

    # ---- interop (implemented in flexivit.timm_interop) ----------------------------------------
    @classmethod
    def from_timm(
        cls,
        model_or_state_dict: nn.Module | dict[str, torch.Tensor],
        base_patch_size: int | None = None,
        base_grid: int | None = None,
        **overrides: Any,
    ) -> "FlexiViT":
        """A FlexiViT with the weights of a timm ``VisionTransformer`` (or its state_dict).

        By default the timm kernel and position grid become the base kernel and base grid unchanged, so
        the FlexiViT at the timm patch size reproduces the timm model's logits. ``base_patch_size`` /
        ``base_grid`` move them to another base (PI-resize / bilinear), which changes the model at its
        own size: resize round trips are lossy. ``overrides`` set other config fields (for a state_dict,
        ``num_heads`` defaults to ``embed_dim // 64`` and ``global_pool`` to what the keys suggest).
        """
        from .timm_interop import flexivit_from_timm

        return flexivit_from_timm(
            model_or_state_dict, base_patch_size=base_patch_size, base_grid=base_grid, **overrides
        )

    def to_fixed(self, patch_size: int | None = None, *, img_size: int | None = None) -> nn.Module:
        """A plain timm ``VisionTransformer`` at ``patch_size`` whose outputs equal this model's there."""
        from .timm_interop import fixed_vit_from_flexivit

        return fixed_vit_from_flexivit(self, patch_size, img_size=img_size)
