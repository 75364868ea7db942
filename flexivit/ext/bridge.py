"""Least-squares layer bridges: one token-wise linear map in place of a run of transformer blocks.

A bridge ``a:b`` replaces blocks ``a .. b-1`` (0-based) of a trained FlexiViT by ``y = x W + b``, applied to
every token (the class token included). Its weights start from a ridge least-squares fit to what the base
network computes there: the tokens entering block ``a`` and leaving block ``b-1`` are recorded on
calibration images at each patch size (``record_segment``) and ``W, b`` solve the fit in float64
(``fit_bridge``); then the derived network trains as usual. ``identity`` (the blocks dropped) and
``random`` (timm's trunc-normal, std 0.02) starts are there for the ablation.

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

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from flexivit.model.options import ModelOption, register
from flexivit.model.patch_embed import PatchScheme, check_patch_sizes

if TYPE_CHECKING:
    from flexivit.model.config import FlexiViTConfig
    from flexivit.model.vit import FlexiViT

__all__ = [
    "BRIDGE_INITS", "DEFAULT_RIDGE", "Bridge", "BridgeFit", "Recording", "parse_spans", "format_span",
    "block_origins", "derived_state_dict", "token_table", "bridges_of", "bridge_fallback", "record_segment",
    "fit_bridge", "fit_segment", "insert_bridges", "bridge_blocks",
]

BRIDGE_INITS = ("lstsq", "identity", "random")
DEFAULT_RIDGE = 1e-6  # times the mean squared input (scale-free); enough to keep a rank-deficient fit stable
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


# ---- recording and fitting -----------------------------------------------------------------------------
@dataclass
class Recording:
    """Tokens entering and leaving a segment at one patch size, one row per token: ``(R, D)`` float64."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    tokens_per_image: int


@dataclass
class BridgeFit:
    """``y = x @ weight + bias`` (``weight``: ``(D_in, D_out)``, float64) and its relative residual: the RMS
    error over the RMS deviation of the targets from their mean (0 exact, 1 no better than the mean)."""

    weight: torch.Tensor
    bias: torch.Tensor
    residual: float


def _batches(data: torch.Tensor | Iterable[Any], chunk: int = 64) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield from data.split(chunk)  # (b, C, H, W) each
        return
    if iter(data) is data:
        raise ValueError("calibration data is read once per patch size: pass a tensor, a list of batches or a "
                         "DataLoader, not a one-shot iterator")
    for batch in data:
        images = batch["image"] if isinstance(batch, dict) else batch
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("calibration batches must be (B, C, H, W) image tensors or dicts with an 'image' one")
        yield images


@torch.no_grad()
def record_segment(model: FlexiViT, data: torch.Tensor | Iterable[Any], *, start: int, end: int,
                   patch_sizes: Sequence[int]) -> dict[int, Recording]:
    """Per patch size, the tokens entering ``model.blocks[start]`` and leaving ``model.blocks[end - 1]`` on
    every image of ``data`` (a ``(B, C, H, W)`` tensor, or re-iterable batches: tensors or dicts with an
    ``'image'``), as ``(B*N, D)`` float64 rows on the CPU; the model runs in eval mode without gradients."""
    if not 0 <= start < end <= len(model.blocks):
        raise ValueError(f"segment {start}:{end} is out of range for {len(model.blocks)} blocks")
    sizes = [s.patch for s in check_patch_sizes([int(p) for p in patch_sizes], model.config.img_size)]
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    recordings = {}
    try:
        for patch in sizes:
            inputs, outputs = [], []
            for images in _batches(data):
                tokens, _ = model._embed(images.to(device=param.device, dtype=param.dtype), model.scheme(patch))
                for i in range(end):
                    if i == start:
                        inputs.append(tokens.flatten(0, 1).to("cpu", torch.float64))  # (B*N, D)
                    tokens = model.blocks[i](tokens)  # (B, N, D)
                outputs.append(tokens.flatten(0, 1).to("cpu", torch.float64))  # (B*N, D)
            if not inputs:
                raise ValueError("no calibration images were given")
            recordings[patch] = Recording(torch.cat(inputs), torch.cat(outputs), tokens.shape[1])
    finally:
        model.train(was_training)
    return recordings


def _residual(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    err = x @ weight + bias - y  # (R, D)
    centred = y - (w[:, None] * y).sum(0)  # (R, D)
    return math.sqrt(float((w * err.square().sum(1)).sum() / (w * centred.square().sum(1)).sum().clamp_min(1e-300)))


def fit_bridge(inputs: torch.Tensor, outputs: torch.Tensor, *, ridge: float = DEFAULT_RIDGE,
               weights: torch.Tensor | None = None, tokens_per_image: int | None = None,
               what: str = "the bridge fit") -> BridgeFit:
    """Ridge least squares in float64 with a bias column: ``W, b`` minimising ``sum_r w_r ||x_r W + b - y_r||^2
    + ridge * mean(x^2) * ||W||^2`` over the rows of ``inputs`` / ``outputs`` ``(R, D)``. ``weights`` (per
    row, default equal) are normalised to sum 1. Fewer than ``D + 1`` rows raise a ``ValueError`` that, with
    ``tokens_per_image``, says how many images are needed."""
    x, y = inputs.to("cpu", torch.float64), outputs.to("cpu", torch.float64)
    rows, dim = x.shape
    if rows < dim + 1:
        need = f"; give at least {math.ceil((dim + 1) / tokens_per_image)} calibration images ({tokens_per_image} " \
               "tokens each)" if tokens_per_image else ""
        raise ValueError(f"{what} has {rows} token rows but a {dim}-wide map needs at least {dim + 1} "
                         f"(embed_dim + 1 for W and b){need}")
    w = torch.ones(rows, dtype=torch.float64) if weights is None else weights.to("cpu", torch.float64)
    w = w / w.sum()
    xa = torch.cat([x, x.new_ones(rows, 1)], dim=1)  # (R, D + 1): the bias column
    gram = xa.T @ (xa * w[:, None])  # (D + 1, D + 1)
    cross = xa.T @ (y * w[:, None])  # (D + 1, D)
    gram[:dim, :dim] += ridge * gram.diagonal()[:dim].mean() * torch.eye(dim, dtype=torch.float64)
    solution = torch.linalg.lstsq(gram, cross, driver="gelsd").solution  # (D + 1, D); gelsd: rank-deficient OK
    weight, bias = solution[:dim], solution[dim]
    return BridgeFit(weight, bias, _residual(weight, bias, x, y, w))


def _equal_weights(recordings: Sequence[Recording]) -> torch.Tensor:
    """Row weights under which each recording (patch size) weighs the same, summing to 1: ``(R,)``."""
    return torch.cat([torch.full((len(r.inputs),), 1.0 / (len(r.inputs) * len(recordings)), dtype=torch.float64)
                      for r in recordings])


def fit_segment(recordings: dict[int, Recording], *, per_size: bool,
                ridge: float = DEFAULT_RIDGE) -> dict[int | None, BridgeFit]:
    """The pooled fit (key ``None``; each patch size weighs the same, whatever its token count) and, with
    ``per_size``, one fit per patch size of ``recordings``."""
    sizes = sorted(recordings)
    fits: dict[int | None, BridgeFit] = {}
    if per_size:
        for p in sizes:
            r = recordings[p]
            fits[p] = fit_bridge(r.inputs, r.outputs, ridge=ridge, tokens_per_image=r.tokens_per_image,
                                 what=f"the fit at patch size {p}")
    rs = [recordings[p] for p in sizes]
    fits[None] = fit_bridge(
        torch.cat([r.inputs for r in rs]), torch.cat([r.outputs for r in rs]), ridge=ridge, weights=_equal_weights(rs),
        tokens_per_image=sum(r.tokens_per_image for r in rs),
        what=f"the pooled fit over patch sizes {', '.join(map(str, sizes))}")
    return fits


# ---- the derived model ---------------------------------------------------------------------------------
@torch.no_grad()
def _set_map(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    linear.weight.copy_(weight.T)  # nn.Linear stores (D_out, D_in)
    linear.bias.copy_(bias)


def _map_weights(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return linear.weight.detach().to("cpu", torch.float64).T, linear.bias.detach().to("cpu", torch.float64)


def _residuals(bridge: Bridge, recordings: dict[int, Recording]) -> dict[str, Any]:
    """The relative residual of the pooled map over every size (sizes weighing the same) and of the map
    that runs at each size."""
    per_size = {}
    for p, r in sorted(recordings.items()):
        linear = bridge.per_size[str(p)] if str(p) in bridge.per_size else bridge.pooled
        per_size[str(p)] = _residual(*_map_weights(linear), r.inputs, r.outputs, _equal_weights([r]))
    rs = [r for _, r in sorted(recordings.items())]
    pooled = _residual(*_map_weights(bridge.pooled), torch.cat([r.inputs for r in rs]),
                       torch.cat([r.outputs for r in rs]), _equal_weights(rs))
    return {"pooled": pooled, "per_size": per_size}


def insert_bridges(
    model: FlexiViT, specs: Sequence[str], *, per_size: bool, patch_sizes: Sequence[int] = (),
    init: str = "lstsq", data: torch.Tensor | Iterable[Any] | None = None, ridge: float = DEFAULT_RIDGE, seed: int = 0,
) -> tuple[FlexiViT, dict[str, dict[str, Any]]]:
    """A new model: ``model`` with each ``"a:b"`` of ``specs`` replaced by a ``Bridge``, every other weight
    copied; ``model`` is unchanged. ``patch_sizes``: the sizes recorded and pooled over, and, with
    ``per_size``, those that get a map of their own. ``init``: ``lstsq`` (fitted on ``data``, the calibration
    images, from the base's own signals), ``identity`` (W = I, b = 0: the blocks dropped) or ``random``
    (trunc-normal std 0.02 from ``seed``, b = 0). Returns the model and, when ``data`` is given, each
    bridge's residuals on it (``{"1:3": {"pooled": r, "per_size": {"4": r, ...}}}``, see ``BridgeFit``)."""
    cfg = model.config
    if cfg.bridges:
        raise ValueError(f"the model has bridges already ({', '.join(cfg.bridges)}); bridge its plain base instead")
    if cfg.lutq_k is not None:
        raise ValueError("bridges need an untied model: insert the bridges first, then tie the weights (make_lutq)")
    if cfg.scale_invariant != "none":
        raise ValueError("bridges need a plain model; fold the scale-invariant one first "
                         "(FlexiViT with scale_invariant='none' + load_state_dict(fold_state_dict(model)))")
    if init not in BRIDGE_INITS:
        raise ValueError(f"unknown bridge init {init!r}; choose one of {', '.join(BRIDGE_INITS)}")
    sizes = [s.patch for s in check_patch_sizes([int(p) for p in patch_sizes], cfg.img_size)] if patch_sizes else []
    if (per_size or data is not None) and not sizes:
        raise ValueError("give patch_sizes: the sizes to record the calibration images at (and, per size, to fit)")
    if init == "lstsq" and data is None:
        raise ValueError("init='lstsq' fits the bridges on calibration images: pass data (a (B, C, H, W) tensor "
                         "or batches)")
    spans = parse_spans(specs, cfg.depth)
    config = dataclasses.replace(cfg, bridges=tuple(map(format_span, spans)),
                                 bridge_sizes=tuple(sizes) if per_size else ())
    param = next(model.parameters())
    derived = type(model)(config).to(device=param.device, dtype=param.dtype)
    result = derived.load_state_dict(derived_state_dict(model.state_dict(), depth=cfg.depth, spans=spans), strict=False)
    bridge_keys = {f"blocks.{i}.{key}" for i, m in enumerate(derived.blocks) if isinstance(m, Bridge)
                   for key in m.state_dict()}
    if result.unexpected_keys or set(result.missing_keys) != bridge_keys:
        raise ValueError(f"the base's weights do not fit the bridged model: missing "
                         f"{sorted(set(result.missing_keys) - bridge_keys)}, unexpected {result.unexpected_keys}")
    generator = torch.Generator().manual_seed(seed)
    residuals = {}
    for bridge in bridges_of(derived):
        recordings = record_segment(model, data, start=bridge.span[0], end=bridge.span[1],
                                    patch_sizes=sizes) if data is not None else {}
        fits = fit_segment(recordings, per_size=per_size, ridge=ridge) if init == "lstsq" else {}
        for size, linear in bridge.maps().items():
            dim = linear.weight.shape[1]
            if init == "lstsq":
                weight, bias = fits[size].weight, fits[size].bias
            elif init == "identity":
                weight, bias = torch.eye(dim), torch.zeros(dim)
            else:
                weight = nn.init.trunc_normal_(torch.empty(dim, dim), std=0.02, generator=generator)
                bias = torch.zeros(dim)
            _set_map(linear, weight, bias)
        if recordings:
            residuals[format_span(bridge.span)] = _residuals(bridge, recordings)
    return derived.train(model.training), residuals


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
