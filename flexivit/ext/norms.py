"""The batch-statistics norms option (``model.norm``: ``batchnorm`` or ``bgn``): its fields, their checks, and
how it plugs into the core (``flexivit.model.options``). The norms themselves are in ``flexivit.ext.bgn``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from flexivit.ext.bgn import batch_norms, install_norms, norm_stats_source, set_token_grid
from flexivit.model.config import FlexiViTConfig
from flexivit.model.options import ModelOption, register
from flexivit.model.patch_embed import check_patch_sizes

__all__ = ["NORMS", "NormFields", "NormOption"]

NORMS = ("layernorm", "batchnorm", "bgn")
_BGN_DEFAULTS = (8, 2)  # norm_groups (8 divides every registered width), norm_regions (a 2x2 split)


@dataclass(frozen=True)
class NormFields:
    # "batchnorm" (per channel) or "bgn" (norm_groups channel groups x norm_regions^2 regions of the token grid,
    # the class token a region of its own) in place of the blocks' norm1/norm2 and the final norm, with running
    # statistics per patch size in norm_sizes (the training sizes); pow2_scale: the inference scale of every
    # norm is a power of two. "layernorm" is the plain ViT.
    norm: str = "layernorm"
    norm_groups: int = _BGN_DEFAULTS[0]
    norm_regions: int = _BGN_DEFAULTS[1]
    norm_sizes: tuple[int, ...] = ()
    pow2_scale: bool = False


@register
class NormOption(ModelOption):
    """Batch-statistics norms (``model.norm``: batchnorm or bgn), running statistics per patch size."""

    name = "norms"
    fields = NormFields
    order = 50
    eval_columns = (("norm stats from", "norm_stats_from"),)

    def normalize(self, values: NormFields, config: Any) -> NormFields:
        if isinstance(values.norm_sizes, (str, int)):
            raise ValueError(f"norm_sizes must be a list of patch sizes such as [4, 7], got {values.norm_sizes!r}")
        return dataclasses.replace(values, norm_sizes=tuple(sorted(int(p) for p in values.norm_sizes)))

    def check(self, values: NormFields, config: Any) -> None:
        norm, sizes = values.norm, values.norm_sizes
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        if norm == "layernorm":
            raise ValueError("norm_groups, norm_regions, norm_sizes and pow2_scale apply to batch-statistics norms "
                             "only; set norm to 'batchnorm' or 'bgn' as well, or leave them unset")
        if norm == "batchnorm" and (values.norm_groups, values.norm_regions) != _BGN_DEFAULTS:
            raise ValueError("norm_groups and norm_regions apply to norm='bgn' only (batchnorm keeps one statistic "
                             "per channel over every token); set norm='bgn' or leave them unset")
        if not sizes:
            raise ValueError(f"norm={norm!r} keeps running statistics per patch size: set norm_sizes to the "
                             "training patch sizes (a recipe's builder fills them from patch.sizes)")
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"norm_sizes {list(sizes)} repeat a size")
        if not config.pad:
            check_patch_sizes(sizes, config.img_size, hint=" (norm_sizes)")
        if norm == "bgn":
            dim = config.embed_dim
            if values.norm_groups < 1 or dim % values.norm_groups:
                divisors = [g for g in range(1, dim + 1) if dim % g == 0]
                raise ValueError(f"norm_groups={values.norm_groups} does not divide embed_dim={dim}; choose one of "
                                 f"{', '.join(map(str, divisors))}")
            smallest = -(-config.img_size // max(sizes))  # token rows (= columns) of the largest trained patch
            if not 1 <= values.norm_regions <= smallest:
                raise ValueError(f"norm_regions={values.norm_regions} (regions per side of the token grid) must be "
                                 f"between 1 and {smallest}, the grid side at the largest patch in norm_sizes "
                                 f"({max(sizes)} on {config.img_size} px): every region needs tokens in training")

    def from_run(self, fields: dict[str, Any], run: Any) -> dict[str, Any]:
        if fields.get("norm", "layernorm") != "layernorm":  # batch statistics are kept per training patch size
            return {"norm_sizes": tuple(run.patch.sizes), **fields}
        return fields

    def stored(self, values: NormFields) -> dict[str, Any]:
        stored = super().stored(values)
        if values.norm == "batchnorm":  # one statistic per channel: groups and regions do not apply
            del stored["norm_groups"], stored["norm_regions"]
        return stored

    def build(self, values: NormFields, model: nn.Module) -> None:
        install_norms(model, model.config)

    def on_grid(self, values: NormFields, model: nn.Module, patch: int, grid: tuple[int, int]) -> None:
        set_token_grid(model, patch, grid)

    def finetune_sizes(self, values: NormFields, model: nn.Module, sizes: Sequence[int]) -> None:
        # Statistics of the sizes a fine-tune does not train were measured on the pretrained network: stale once
        # its weights move. They go, so evaluation there borrows a fine-tuned size's and says so in its rows
        # (norm_stats_from); `flexivit recalibrate` estimates them anew.
        keep = [p for p in values.norm_sizes if p in sizes]
        drop = [p for p in values.norm_sizes if p not in sizes]
        if not keep or not drop:  # nothing stale, or a size without statistics that training itself refuses
            return
        for norm in batch_norms(model):
            for patch in drop:
                norm.remove_size(patch)
        model.config = FlexiViTConfig.from_dict({**model.config.to_dict(), "norm_sizes": keep})

    def refuses_packing(self, values: NormFields) -> str | None:
        return f"norm={values.norm!r}: its batch statistics pool tokens across images"

    def refuses_grad_checkpointing(self, values: NormFields) -> str | None:
        return ("gradient checkpointing recomputes each block in the backward pass, which would update the running "
                f"statistics of the {values.norm} norms twice per step; set train.grad_checkpointing=false, or use "
                "model.norm=layernorm")

    def non_plain(self, values: NormFields) -> list[str]:
        return [f"batch-statistics norms ({values.norm})"]

    def eval_notes(self, values: NormFields, model: nn.Module, scheme: Any, image_hw: tuple[int, int]) -> dict[str, Any]:
        borrowed = norm_stats_source(model, scheme.patch)  # no statistics of this size: another size's are used
        return {} if borrowed is None else {"norm_stats_from": borrowed}
