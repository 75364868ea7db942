"""Moving weights between timm's ``VisionTransformer`` and ``FlexiViT``, as configs and state dicts.

The two share module names, so a conversion renames the stem's keys and reshapes the position
embedding; every other tensor is copied as is and loaded strictly (a mismatch is an error that lists the
keys, never a silent partial load). This module never builds a ``FlexiViT``: ``FlexiViT.from_timm`` and
``FlexiViT.to_fixed`` (in ``model.py``, which imports this one) do, from what these functions return.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from flexivit.model.config import FlexiViTConfig
from flexivit.model.resize import pi_resize, resample_posemb

__all__ = ["timm_to_flexivit", "flexivit_to_timm", "timm_vit_kwargs"]

_STEM_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token")


def _check_supported_module(model: nn.Module) -> dict[str, Any]:
    """Architecture hints that a state_dict cannot give, read off a timm model instance."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"from_timm takes a timm VisionTransformer or its state_dict, got {type(model).__name__}"
        )
    unsupported = []
    if getattr(model, "attn_pool", None) is not None:
        unsupported.append("attention pooling (global_pool='map')")
    if getattr(model, "reg_token", None) is not None:
        unsupported.append("register tokens")
    if model.global_pool not in ("token", "avg"):
        unsupported.append(f"global_pool={model.global_pool!r}")
    if not isinstance(model.blocks[0].mlp.act, nn.GELU):
        unsupported.append(f"activation {type(model.blocks[0].mlp.act).__name__}")
    if type(model.patch_embed.proj) is not nn.Conv2d:
        unsupported.append("a patch embedding that is not a single Conv2d")
    if unsupported:
        raise ValueError(f"this timm model uses features FlexiViT does not support: {', '.join(unsupported)}")
    return {
        "num_heads": model.blocks[0].attn.num_heads,
        "global_pool": model.global_pool,
        "img_size": int(model.patch_embed.img_size[0]),
    }


def _square(name: str, hw: tuple[int, int]) -> int:
    if hw[0] != hw[1]:
        raise ValueError(f"FlexiViT needs a square {name}, got {hw[0]}x{hw[1]}")
    return hw[0]


def timm_to_flexivit(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    *,
    base_patch_size: int | None = None,
    base_grid: int | None = None,
    **overrides: Any,
) -> tuple[FlexiViTConfig, dict[str, torch.Tensor]]:
    """The config and state_dict of the FlexiViT holding a timm ViT's weights (see ``FlexiViT.from_timm``).

    A kernel moved to another base is PI-resized with the config's ``kernel_resize``; the state_dict
    holds every parameter of that FlexiViT (its load is checked by the caller).
    """
    if overrides.get("posemb", "learn") != "learn":
        raise ValueError("from_timm builds a FlexiViT with posemb='learn': timm stores one full grid")
    hints: dict[str, Any] = {}
    if isinstance(model_or_state_dict, nn.Module):
        hints = _check_supported_module(model_or_state_dict)
        state = model_or_state_dict.state_dict()
    else:
        state = dict(model_or_state_dict)
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(
            "not a timm VisionTransformer state_dict: it needs 'patch_embed.proj.weight' and 'pos_embed' "
            f"(got keys like {sorted(state)[:6]})"
        )
    if "reg_token" in state:
        raise ValueError("timm ViTs with register tokens are not supported by FlexiViT")

    kernel = state["patch_embed.proj.weight"]  # (D, C, p, p)
    embed_dim, in_chans = int(kernel.shape[0]), int(kernel.shape[1])
    patch = _square("patch kernel", (int(kernel.shape[2]), int(kernel.shape[3])))
    class_token = "cls_token" in state
    pos = state["pos_embed"]  # (1, [prefix +] g*g, D)
    n_pos = int(pos.shape[1])
    grid = math.isqrt(n_pos)
    prefix_pos = None
    if grid * grid != n_pos:  # position embedding includes the class token's entry
        grid = math.isqrt(n_pos - 1)
        if not class_token or grid * grid != n_pos - 1:
            raise ValueError(f"cannot read a square token grid from pos_embed of shape {tuple(pos.shape)}")
        prefix_pos, pos = pos[:, :1], pos[:, 1:]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    has_fc_norm, has_norm = "fc_norm.weight" in state, "norm.weight" in state
    head = state.get("head.weight")

    fields: dict[str, Any] = dict(
        img_size=grid * patch,
        patch_size=patch,
        base_patch_size=base_patch_size or patch,
        base_grid=base_grid or grid,
        in_chans=in_chans,
        num_classes=int(head.shape[0]) if head is not None else 0,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(1, embed_dim // 64),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None,  # value irrelevant: gamma is loaded
        class_token=class_token,
        global_pool="token" if class_token and not has_fc_norm else "avg",
        fc_norm=has_fc_norm,
        pre_norm="norm_pre.weight" in state,
        final_norm=has_norm or has_fc_norm,
    )
    config = FlexiViTConfig.from_dict({**fields, **hints, **overrides})

    new_state = {k: v for k, v in state.items() if k not in _STEM_KEYS}
    with torch.no_grad():
        new_state["patch_embed.weight"] = pi_resize(kernel, config.base_patch_size, config.kernel_resize)
        if "patch_embed.proj.bias" in state:
            new_state["patch_embed.bias"] = state["patch_embed.proj.bias"]
        grid_bhwd = rearrange(pos, "b (h w) d -> b h w d", h=grid)  # (1, g, g, D)
        new_state["pos_embed"] = resample_posemb(grid_bhwd, config.base_grid)  # (1, base_grid, base_grid, D)
        if class_token:
            cls = state["cls_token"]
            # Fold the class token's own position embedding into it: the sum is what the blocks see.
            new_state["cls_token"] = cls + prefix_pos if prefix_pos is not None else cls
    return config, new_state


def timm_vit_kwargs(config: FlexiViTConfig, patch_size: int, img_size: int) -> dict[str, Any]:
    """``VisionTransformer(**kwargs)`` arguments of the fixed-size equivalent of a FlexiViT."""
    return dict(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        global_pool=config.global_pool,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        qk_norm=config.qk_norm,
        init_values=config.init_values,
        class_token=config.class_token,
        no_embed_class=True,  # FlexiViT's grid covers patch tokens only
        pre_norm=config.pre_norm,
        final_norm=config.final_norm,
        fc_norm=config.fc_norm,
        **({"act_layer": config.act_layer} if config.act_layer != "gelu" else {}),  # timm's GELUTanh: the same op
    )


def flexivit_to_timm(
    config: FlexiViTConfig, state: dict[str, torch.Tensor], *, kernel: torch.Tensor, pos_embed: torch.Tensor,
    img_size: int,
) -> VisionTransformer:
    """The timm ``VisionTransformer`` (see ``FlexiViT.to_fixed``) of a FlexiViT's ``state`` with its stem
    already resized to one patch size: ``kernel`` ``(D, C, p, p)`` and ``pos_embed`` ``(1, gh, gw, D)``.

    Built on ``kernel``'s device and dtype; every tensor is copied and loaded strictly.
    """
    vit = VisionTransformer(**timm_vit_kwargs(config, int(kernel.shape[-1]), img_size))
    body = {k: v for k, v in state.items() if not k.startswith(("patch_embed.", "pos_embed"))}
    body["patch_embed.proj.weight"] = kernel
    if "patch_embed.bias" in state:
        body["patch_embed.proj.bias"] = state["patch_embed.bias"]
    body["pos_embed"] = rearrange(pos_embed, "b h w d -> b (h w) d")  # (1, N, D)
    vit.to(device=kernel.device, dtype=kernel.dtype)
    vit.load_state_dict({k: v.detach().clone() for k, v in body.items()}, strict=True)
    return vit
