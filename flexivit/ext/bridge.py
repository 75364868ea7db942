"""Least-squares layer bridges: one token-wise linear map in place of a run of transformer blocks.

A bridge ``a:b`` replaces blocks ``a .. b-1`` (0-based) of a trained FlexiViT by ``y = x W + b``, applied to
every token (the class token included). Its weights start from a ridge least-squares fit to what the base
network computes there: the tokens entering block ``a`` and leaving block ``b-1`` are recorded on
calibration images at each patch size and ``W, b`` solve the fit in float64 (``flexivit.ext.bridge_fit``:
``record_segment``, ``fit_bridge``, ``insert_bridges``); then the derived network trains as usual.
``identity`` (the blocks dropped) and ``random`` (timm's trunc-normal, std 0.02) starts are there for the
ablation.

Token statistics differ by patch size, so a bridge may hold, besides its pooled map, one map per patch size
it was fitted at (``FlexiViTConfig.bridge_sizes``). ``model.blocks`` stays an ``nn.Sequential``, which
passes tokens only, so the bridge picks its map from the token count ``N`` of its input: each trained size
has its own ``N`` at the configured image size (its token grid plus the class token); any other ``N`` gets
the pooled map. An overlapping scheme whose token count equals a trained size's gets that size's map.
``bridge_fallback`` says when a scheme ran without a map of its own (flagged in ``eval.json``). During
training the pooled map gets gradients only at sizes without a map of their own.

State-dict keys: the bridge takes the index of its first block and later blocks move down. Depth 6 with
``1:3``: ``blocks.0`` is base block 0, ``blocks.1`` the bridge (``blocks.1.pooled.{weight,bias}``,
``blocks.1.per_size.{p}.{weight,bias}``), ``blocks.2..4`` are base blocks 3..5 (``block_origins`` gives this
map, ``derived_state_dict`` renames a base state dict along it). ``FlexiViTConfig.depth`` stays the base's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from flexivit.model.options import ModelOption, register
from flexivit.model.patch_embed import PatchScheme, check_patch_sizes

if TYPE_CHECKING:
    from flexivit.model.config import FlexiViTConfig

__all__ = ["Bridge", "parse_spans", "format_span", "block_origins", "derived_state_dict", "token_table", "bridges_of",
           "bridge_fallback", "bridge_blocks"]

Span = tuple[int, int]
_SPEC = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


# ---- specs and the block map ---------------------------------------------------------------------------
def format_span(span: Span) -> str:
    return f"{span[0]}:{span[1]}"


def parse_spans(specs: Sequence[str], depth: int) -> list[Span]:
    """``"a:b"`` specs (replace blocks ``a .. b-1``, 0-based) as sorted ``(a, b)`` spans of a ``depth``-block
    model; raises a ``ValueError`` naming the bad spec for malformed, out-of-range, empty, overlapping specs
    and for bridges that would leave no transformer block."""
    if isinstance(specs, str):
        raise ValueError(f"bridges must be a list of 'a:b' specs such as ['1:3'], got the string {specs!r}")
    spans = []
    for spec in specs:
        match = _SPEC.match(str(spec))
        if match is None:
            raise ValueError(f"bridge spec {spec!r} is not 'a:b' (replace blocks a..b-1, 0-based), e.g. '2:4'")
        a, b = int(match[1]), int(match[2])
        if a >= b:
            raise ValueError(f"bridge {a}:{b} replaces no block: it needs a < b ('{a}:{a + 1}' replaces block {a})")
        if a < 0 or b > depth:
            raise ValueError(f"bridge {a}:{b} is out of range: the model has {depth} blocks, so 0 <= a < b <= {depth}")
        spans.append((a, b))
    spans.sort()
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise ValueError(f"bridges {a0}:{b0} and {a1}:{b1} overlap (block {a1}); merge them into "
                             f"{a0}:{max(b0, b1)} or make them disjoint")
    if spans and sum(b - a for a, b in spans) == depth:
        raise ValueError(f"bridges {', '.join(map(format_span, spans))} replace all {depth} blocks; keep at "
                         "least one transformer block")
    return spans


def block_origins(depth: int, spans: Sequence[Span]) -> list[int | Span]:
    """What each block of the derived model is: the base block index it keeps (``int``) or the span a bridge
    replaces (``(a, b)``). ``block_origins(6, [(1, 3)]) == [0, (1, 3), 3, 4, 5]``."""
    starts = dict(spans)
    origins: list[int | Span] = []
    i = 0
    while i < depth:
        if i in starts:
            origins.append((i, starts[i]))
            i = starts[i]
        else:
            origins.append(i)
            i += 1
    return origins


def derived_state_dict(base: dict[str, torch.Tensor], *, depth: int, spans: Sequence[Span]) -> dict[str, torch.Tensor]:
    """A base model's state dict with its kept blocks renamed to their derived index and bridged blocks
    left out; the bridges' own keys are not in it."""
    new_index = {o: i for i, o in enumerate(block_origins(depth, spans)) if isinstance(o, int)}
    out = {}
    for key, value in base.items():
        match = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        if match is None:
            out[key] = value
        elif int(match[1]) in new_index:
            out[f"blocks.{new_index[int(match[1])]}.{match[2]}"] = value
    return out


def token_table(*, img_size: int, prefix: int, sizes: Sequence[int]) -> dict[int, int]:
    """Token count entering the blocks → patch size, for the non-overlapping ``sizes`` at ``img_size``."""
    table = {}
    for patch in sizes:
        gh, gw = PatchScheme(int(patch)).grid_size((img_size, img_size))
        table[prefix + gh * gw] = int(patch)
    return table


# ---- the module ----------------------------------------------------------------------------------------
class Bridge(nn.Module):
    """``y = x W + b`` per token in place of blocks ``span[0] .. span[1]-1``: a pooled map and one map per
    patch size in ``sizes_by_tokens`` (token count → patch size), chosen by the input's token count.
    ``prefix``: the class tokens among them (for ``bridge_fallback``)."""

    def __init__(self, *, dim: int, span: Span, sizes_by_tokens: dict[int, int], prefix: int) -> None:
        super().__init__()
        self.span = span
        self.prefix = prefix
        self.pooled = nn.Linear(dim, dim)
        self.per_size = nn.ModuleDict({str(p): nn.Linear(dim, dim) for p in sorted(sizes_by_tokens.values())})
        self.sizes_by_tokens = dict(sizes_by_tokens)  # a plain dict: never in state_dict

    def size_at(self, tokens: int) -> int | None:
        """The patch size whose map runs on ``tokens`` tokens; ``None``: the pooled map."""
        return self.sizes_by_tokens.get(tokens)

    def maps(self) -> dict[int | None, nn.Module]:
        """Every map by the patch size it belongs to (``None``: the pooled one)."""
        return {None: self.pooled, **{int(p): m for p, m in self.per_size.items()}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        size = self.size_at(x.shape[1])
        return (self.pooled if size is None else self.per_size[str(size)])(x)

    def extra_repr(self) -> str:
        return f"blocks {format_span(self.span)}, own maps at patch sizes {sorted(self.sizes_by_tokens.values())}"


def bridge_blocks(blocks: Sequence[nn.Module], config: FlexiViTConfig) -> list[nn.Module]:
    """The base's ``blocks`` with each span of ``config.bridges`` replaced by one (fresh) ``Bridge``."""
    prefix = int(config.class_token)
    table = token_table(img_size=config.img_size, prefix=prefix, sizes=config.bridge_sizes)
    origins = block_origins(config.depth, parse_spans(config.bridges, config.depth))
    return [blocks[o] if isinstance(o, int) else Bridge(dim=config.embed_dim, span=o, sizes_by_tokens=table,
                                                         prefix=prefix) for o in origins]


def bridges_of(model: nn.Module) -> list[Bridge]:
    return [m for m in model.modules() if isinstance(m, Bridge)]


def bridge_fallback(model: nn.Module, scheme: PatchScheme, image_hw: tuple[int, int]) -> bool:
    """Whether a bridge of ``model`` that has maps per patch size runs ``scheme`` on ``image_hw`` images
    without the map fitted at that size (the pooled map, or another size's map at an equal token count). A
    bridge with a pooled map only is no fallback anywhere: that map is meant for every size."""
    gh, gw = scheme.grid_size(image_hw)
    for bridge in bridges_of(model):
        if bridge.sizes_by_tokens and (scheme.overlapping or bridge.size_at(bridge.prefix + gh * gw) != scheme.patch):
            return True
    return False


@dataclass(frozen=True)
class BridgeFields:
    # "a:b" replaces blocks a..b-1 (0-based, of `depth`) by one token-wise linear map; bridge_sizes: the patch
    # sizes with a map of their own (others use the pooled one).
    bridges: tuple[str, ...] = ()
    bridge_sizes: tuple[int, ...] = ()


@dataclass
class CompressConfig:
    """How `flexivit compress` derives a compact model from a trained one (docs/compress.md)."""

    bridges: list[str] = field(default_factory=list)  # "a:b" replaces blocks a..b-1 by one linear map
    bridge_per_size: bool = True  # one map per training patch size (the pooled one elsewhere)
    bridge_init: str = "lstsq"  # "lstsq" (fitted to the base's signals) | "identity" | "random"
    bridge_ridge: float = 1e-6  # relative ridge of the least-squares fit
    calib_images: int = 512  # training images the bridges are fitted on
    lutq_k: int | None = None  # values per tied tensor (LUT-Q); unset: float weights
    lutq_scope: str = "blocks"  # "blocks" | "blocks+head"
    lutq_pow2: bool = False  # dictionary of powers of two (multiplier-less)
    targets: str = "base"  # "base": the base's outputs (quantised by distill.quantize) | "labels": the labels


@register
class BridgeOption(ModelOption):
    """Least-squares bridges in place of block spans (``model.bridges``; set by ``flexivit compress``, whose
    settings are the run config's ``compress`` section)."""

    name = "bridges"
    fields = BridgeFields
    order = 40
    run_sections = {"compress": CompressConfig}

    def normalize(self, values: BridgeFields, config: Any) -> BridgeFields:
        if isinstance(values.bridge_sizes, (str, int)):
            raise ValueError(f"bridge_sizes must be a list of patch sizes such as [4, 7], got {values.bridge_sizes!r}")
        spans = parse_spans(values.bridges, config.depth)  # raises naming the bad spec
        # One spelling, sorted; lists from JSON.
        return BridgeFields(tuple(map(format_span, spans)), tuple(sorted(int(p) for p in values.bridge_sizes)))

    def check(self, values: BridgeFields, config: Any) -> None:
        if values.bridge_sizes and not values.bridges:
            raise ValueError("bridge_sizes apply to bridges only; set bridges (e.g. ['2:4']) as well, or leave it empty")
        if len(set(values.bridge_sizes)) != len(values.bridge_sizes):
            raise ValueError(f"bridge_sizes {list(values.bridge_sizes)} repeat a size")
        if values.bridge_sizes:
            check_patch_sizes(values.bridge_sizes, config.img_size, hint=" (bridge_sizes)")
        if values.bridges and config.option("graph") is not None:
            raise ValueError("bridges and a block graph do not combine; set one of bridges and graph")

    def build_blocks(self, values: BridgeFields, config: Any, blocks: list[nn.Module]) -> list[nn.Module]:
        return bridge_blocks(blocks, config)

    def refuses_packing(self, values: BridgeFields) -> str | None:
        return f"bridges={list(values.bridges)}: bridges are not run packed"

    def non_plain(self, values: BridgeFields) -> list[str]:
        return [f"bridges {', '.join(values.bridges)}"]

    def eval_notes(self, values: BridgeFields, model: nn.Module, scheme: PatchScheme,
                   image_hw: tuple[int, int]) -> dict[str, Any]:
        return {"bridge_fallback": True} if bridge_fallback(model, scheme, image_hw) else {}
