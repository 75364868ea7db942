"""Fitting least-squares layer bridges (``flexivit.ext.bridge`` holds the module and the option): record the
tokens entering and leaving a run of blocks at each patch size on calibration images (``record_segment``),
solve ``y = x W + b`` by ridge least squares in float64 (``fit_bridge``, ``fit_segment``), and build the
bridged model from a trained base (``insert_bridges``), its bridges fitted, set to the identity or random.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from flexivit.ext.bridge import Bridge, bridges_of, derived_state_dict, format_span, parse_spans
from flexivit.model.patch_embed import check_patch_sizes

if TYPE_CHECKING:
    from flexivit.model.vit import FlexiViT

__all__ = ["BRIDGE_INITS", "DEFAULT_RIDGE", "BridgeFit", "Recording", "record_segment", "fit_bridge", "fit_segment",
           "insert_bridges"]

BRIDGE_INITS = ("lstsq", "identity", "random")
DEFAULT_RIDGE = 1e-6  # times the mean squared input (scale-free); enough to keep a rank-deficient fit stable


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
