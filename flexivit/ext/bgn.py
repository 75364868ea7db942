"""Batch-statistics norms for tokens: batch-group normalisation (``bgn``) and batch norm (``batchnorm``).

``BatchGroupNorm`` normalises tokens ``(B, N, D)`` per group, a group being one *channel group* (``groups``
blocks of ``D / groups`` consecutive channels) times one *region* of the token grid. Regions are an
``R x R`` split of the grid by token-centre position in normalised coordinates: token row ``i`` of ``gh``
lies in region row ``floor(R (i + 1/2) / gh)`` (columns alike), so there are ``R^2`` regions at every patch
size; the class token is a region of its own. In training a group's mean and (biased) variance are taken
over the batch, the region's tokens and the group's channels; ``y = gamma (x - mean) / sqrt(var + eps) + beta``
with a per-channel affine. ``batchnorm`` is the same layer with one region holding every token (class token
included) and one channel per group: ``BatchNorm1d`` over tokens.

Token statistics differ by patch size, so running statistics (mean, unbiased variance; momentum 0.1, eps
1e-5 as ``BatchNorm1d``) are kept per patch size, in buffers ``running_mean_p{P}`` / ``running_var_p{P}`` made
for the ``sizes`` given at construction (a model's ``norm_sizes``). A training forward updates only the
statistics of its own patch size and refuses a size without them. In eval a size without statistics uses
the nearest size that has them (smallest ``|P - p|``, ties to the smaller size), reported by
``norm_stats_source`` (``norm_stats_from`` in ``eval.json``); ``recalibrate`` estimates statistics for new
sizes without gradients.

The layer needs the patch size and token grid of the call, which ``N`` alone does not give (a non-square
image, an overlapping scheme): the model calls ``set_token_grid`` on its norms before the blocks run. It is
state of the forward in progress, kept in a context variable rather than on the module, so each thread (and
asyncio task) has its own: two calls at different sizes on one model from two threads never mix grids. It
is set on the process that runs the forward, so it works under DDP (whose forward calls the model's). Gradient checkpointing is refused (its recomputation would update the running
statistics twice).

Power-of-two scale (``pow2``): the inference scale of channel ``c`` in group slot ``s`` is
``sign(gamma) * 2^k`` with ``k = round(log2(|gamma| / sqrt(running_var + eps)))`` (rounded in the log
domain, clamped to ``[-64, 64]``), and eval computes ``ldexp(sign * (x - running_mean), k) + beta``, exact.
In training the running statistics are updated first, then ``gamma_hat = sign(gamma) * 2^k * sqrt(running_var
+ eps)`` with that ``k`` stands in for ``gamma`` (straight-through gradient: ``d gamma_hat / d gamma = 1``) and
the batch is normalised with it and the batch variance: ``gamma_hat (x - mean_B) / sqrt(var_B + eps) + beta``.
``k`` is not a tensor of its own in checkpoints: it is a function of ``gamma`` and the running variance of
the size, computed when the layer runs, so it can never disagree with them.

Under DDP each rank normalises with its own micro-batch's statistics (no synchronisation); the running
statistics are buffers, which DDP (as Accelerate sets it up) broadcasts from rank 0 before each forward, so
the running statistics every rank holds and saves are rank 0's.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from flexivit.model.config import FlexiViTConfig
from flexivit.model.patch_embed import check_patch_sizes

if TYPE_CHECKING:
    from flexivit.model.vit import FlexiViT

__all__ = [
    "BatchGroupNorm", "token_regions", "install_norms", "batch_norms", "set_token_grid", "norm_stats_source",
    "recalibrate", "norms_of", "CALIBRATION_BATCH", "POW2_RANGE",
]

# |k| <= 64: 2^k * x stays a normal float32 (so ldexp is exact) for every |x| between about 2e-19 and 2e19.
POW2_RANGE = 64
CALIBRATION_BATCH = 64


def token_regions(grid: tuple[int, int], *, regions: int, prefix: int, prefix_region: bool) -> torch.Tensor:
    """The region of each token ``(prefix + gh*gw,)``: ``R x R`` regions of the grid by token-centre position
    (row-major), the prefix tokens in region ``R^2`` with ``prefix_region``, else in the region of index 0."""
    gh, gw = grid
    rows = (regions * (2 * torch.arange(gh) + 1)) // (2 * gh)  # floor(R (i + 1/2) / gh), exact in integers
    cols = (regions * (2 * torch.arange(gw) + 1)) // (2 * gw)
    grid_regions = (rows[:, None] * regions + cols[None, :]).flatten()  # (gh*gw,)
    head = torch.full((prefix,), regions * regions if prefix_region else 0)
    return torch.cat([head, grid_regions])


def _region_sums(members: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-region sums ``(S, G)`` of per-token values ``(N, G)`` (members ``(S, N)``): a broadcast sum, not a
    matmul, so that autocast keeps it in float32."""
    return (members[:, :, None] * values[None]).sum(1)


def _exponents(gamma: torch.Tensor, var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``sign(gamma)`` and ``k`` with ``sign * 2^k`` the power of two nearest (in log) to ``gamma / sqrt(var + eps)``:
    gamma ``(G, C)``, var ``(S, G)`` -> two ``(S, G, C)`` tensors (float ±1, int32)."""
    ratio = gamma.abs() / torch.sqrt(var + eps)[..., None]  # (S, G, C)
    k = torch.round(torch.log2(ratio.clamp_min(2.0**-POW2_RANGE))).clamp(-POW2_RANGE, POW2_RANGE)
    return torch.where(gamma < 0, -1.0, 1.0).expand_as(ratio), k.to(torch.int32)


class BatchGroupNorm(nn.Module):
    """Batch-group normalisation of tokens ``(B, N, D)`` (or of pooled features ``(B, D)`` with ``pooled``: one
    region), with running statistics per patch size in ``sizes``; see the module docstring."""

    def __init__(self, dim: int, *, groups: int, regions: int, sizes: Sequence[int], prefix: int = 0,
                 prefix_region: bool = True, pooled: bool = False, pow2: bool = False, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        if groups < 1 or dim % groups:
            raise ValueError(f"{groups} channel groups do not divide the width {dim}; choose a divisor of {dim}")
        if regions < 1:
            raise ValueError(f"regions per side must be at least 1, got {regions}")
        if not sizes:
            raise ValueError("a batch-statistics norm needs the patch sizes it keeps statistics for (sizes)")
        self.dim, self.groups, self.pooled, self.pow2 = dim, groups, pooled, pow2
        self.regions = 1 if pooled else regions
        self.prefix = 0 if pooled else prefix
        self.prefix_region = prefix_region and self.prefix > 0
        self.slots = self.regions**2 + int(self.prefix_region)  # statistics per channel group
        self.eps, self.momentum = eps, momentum  # momentum None: cumulative average (recalibration)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.sizes: list[int] = []
        for patch in sizes:
            self.add_size(int(patch))
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # not in state_dict
        self._affines: dict[tuple, tuple[torch.Tensor, ...]] = {}  # eval's per-token affine, not in state_dict
        self._seen: dict[int, int] = {}  # batches averaged per size while momentum is None

    def add_size(self, patch: int) -> None:
        """Running statistics for ``patch`` (mean 0, variance 1 until estimated)."""
        if patch in self.sizes:
            raise ValueError(f"patch size {patch} has running statistics already")
        shape, device = (self.slots, self.groups), self.weight.device
        self.register_buffer(f"running_mean_p{patch}", torch.zeros(shape, device=device))
        self.register_buffer(f"running_var_p{patch}", torch.ones(shape, device=device))
        self.sizes = sorted([*self.sizes, patch])

    def remove_size(self, patch: int) -> None:
        """Drop ``patch``'s running statistics (eval then borrows the nearest size's)."""
        delattr(self, f"running_mean_p{patch}")
        delattr(self, f"running_var_p{patch}")
        self.sizes = [p for p in self.sizes if p != patch]
        self._affines.clear()

    def stats(self, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and variance of ``patch``: two ``(slots, groups)`` buffers."""
        return getattr(self, f"running_mean_p{patch}"), getattr(self, f"running_var_p{patch}")

    def stats_source(self, patch: int) -> int:
        """The patch size whose running statistics ``patch`` uses in eval: its own, else the nearest."""
        return patch if patch in self.sizes else min(self.sizes, key=lambda p: (abs(p - patch), p))

    def set_grid(self, patch: int, grid: tuple[int, int]) -> None:
        """The patch size and token grid ``(gh, gw)`` of the next calls in this thread (or asyncio task)."""
        _set_calls({self: (int(patch), (int(grid[0]), int(grid[1])))})

    @property
    def _patch(self) -> int | None:
        call = _CALLS.get().get(self)
        return None if call is None else call[0]

    @property
    def _grid(self) -> tuple[int, int] | None:
        call = _CALLS.get().get(self)
        return None if call is None else call[1]

    def exponents(self, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, k)``, ``(slots, groups, D / groups)`` each: the eval scale ``sign * 2^k`` at ``patch``'s
        statistics source (``pow2`` models)."""
        _, var = self.stats(self.stats_source(patch))
        return _exponents(self.weight.detach().float().view(self.groups, -1), var, self.eps)

    def _layout(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Region index per token ``(N,)``, region membership ``(S, N)`` and tokens per region ``(S,)``."""
        grid = (1, 1) if self.pooled else self._grid
        key = (n, grid, device)
        if key not in self._layouts:
            if n != self.prefix + grid[0] * grid[1]:
                raise ValueError(f"{n} tokens do not make a {grid[0]}x{grid[1]} token grid"
                                 f"{f' and {self.prefix} class token' if self.prefix else ''}; set the grid of the call "
                                 "with set_grid (FlexiViT does this before its blocks run)")
            idx = token_regions(grid, regions=self.regions, prefix=self.prefix, prefix_region=self.prefix_region)
            members = F.one_hot(idx, self.slots).T.float()  # (S, N)
            self._layouts[key] = (idx.to(device), members.to(device), members.sum(1).to(device))
        return self._layouts[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._patch is None:
            raise RuntimeError("a batch-statistics norm needs the patch size and token grid of the call: FlexiViT sets "
                               "them before its blocks run; alone, call set_grid(patch, (gh, gw)) first")
        tokens = x[:, None] if self.pooled else x  # (B, N, D)
        b, n, d = tokens.shape
        idx, members, counts = self._layout(n, x.device)
        xg = tokens.float().reshape(b, n, self.groups, d // self.groups)  # (B, N, G, C)
        out = self._normalise_batch(xg, idx, members, counts) if self.training else self._normalise_running(xg, idx)
        out = out.reshape(b, n, d).to(x.dtype)  # (B, N, D)
        return out[:, 0] if self.pooled else out

    def _normalise_batch(self, xg: torch.Tensor, idx: torch.Tensor, members: torch.Tensor,
                         counts: torch.Tensor) -> torch.Tensor:
        patch, (b, _, _, c) = self._patch, xg.shape
        if patch not in self.sizes:
            raise ValueError(f"patch size {patch} has no running statistics in this model (it has {self.sizes}): train "
                             "at those sizes, or add this one first with `flexivit recalibrate CKPT --patch-sizes "
                             f"{patch}`")
        if b < 2:
            raise ValueError("a batch-statistics norm (batchnorm, bgn) normalises over the images of a step and needs "
                             "at least 2 per forward and rank in training; raise data.batch_size, or use "
                             "model.norm=layernorm")
        if not bool((counts > 0).all()):
            raise ValueError(f"the {self._grid[0]}x{self._grid[1]} token grid has fewer rows or columns than the "
                             f"{self.regions} regions per side; use fewer regions (norm_regions) or a smaller patch")
        elems = (counts * (b * c))[:, None]  # (S, 1) values per group
        mean = _region_sums(members, xg.sum((0, 3))) / elems  # (S, G)
        centred = xg - mean[idx][None, :, :, None]  # (B, N, G, C)
        var = _region_sums(members, centred.square().sum((0, 3))) / elems  # (S, G), biased: what normalises
        self._update(patch, mean.detach(), var.detach() * elems / (elems - 1))
        normed = centred * torch.rsqrt(var + self.eps)[idx][None, :, :, None]  # (B, N, G, C)
        gamma = self.weight.float().view(self.groups, c)  # (G, C)
        bias = self.bias.float().view(self.groups, c)
        if not self.pow2:
            return normed * gamma + bias
        _, running_var = self.stats(patch)  # (S, G), updated with this batch above
        sign, k = _exponents(gamma.detach(), running_var, self.eps)  # (S, G, C)
        gamma_hat = sign * torch.exp2(k.float()) * torch.sqrt(running_var + self.eps)[..., None]
        gamma_ste = gamma + (gamma_hat - gamma).detach()  # (S, G, C): value gamma_hat, gradient to gamma
        return normed * gamma_ste[idx] + bias

    def _normalise_running(self, xg: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        mean, scale, bias = self._running_affine(idx)  # (N, G, C) each
        return (xg - mean) * scale + bias  # a power-of-two scale multiplies exactly: ldexp(x - mean, k) + bias

    def _running_affine(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token mean, scale (``sign * 2^k`` with ``pow2``) and bias, ``(N, G, C)`` each, of the current
        patch size's statistics source. Without autograd they are computed once per grid and reused while
        the weights and statistics stay as they are (checked by the tensors' in-place version counters);
        a compiled or exported graph computes them in the graph instead."""
        source = self.stats_source(self._patch)
        mean, var = self.stats(source)  # (S, G) each
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._affine(source, idx)
        key = (source, idx.shape[0], self._grid, idx.device)
        versions = tuple((id(t), t._version) for t in (self.weight, self.bias, mean, var))
        if key not in self._affines or self._affines[key][0] != versions:
            self._affines[key] = (versions, self._affine(source, idx))
        return self._affines[key][1]

    def _affine(self, source: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, var = self.stats(source)  # (S, G) each
        c = self.dim // self.groups
        if self.pow2:
            sign, k = self.exponents(source)  # (S, G, C)
            scale = torch.ldexp(sign, k)
        else:
            scale = torch.rsqrt(var + self.eps)[..., None] * self.weight.float().view(self.groups, c)  # (S, G, C)
        bias = self.bias.float().view(self.groups, c).expand(idx.shape[0], -1, -1)  # (N, G, C)
        return mean[idx][:, :, None].expand(-1, -1, c), scale[idx], bias

    def _update(self, patch: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        seen = self._seen.get(patch, 0)
        factor = self.momentum if self.momentum is not None else 1.0 / (seen + 1)
        self._seen[patch] = seen + 1
        running_mean, running_var = self.stats(patch)
        running_mean.lerp_(mean, factor)
        running_var.lerp_(var, factor)

    def extra_repr(self) -> str:
        return (f"{self.dim}, groups={self.groups}, regions={self.regions}x{self.regions}"
                f"{' + class token' if self.prefix_region else ''}, sizes={self.sizes}, pow2={self.pow2}"
                f"{', pooled' if self.pooled else ''}")


# The patch size and token grid of the call in progress, per norm. A context variable, not module state: each
# thread (and asyncio task) sees its own, so two calls at different sizes on one model (two Predictor threads)
# never mix grids. Weak keys: a norm that is gone leaves no entry behind.
_CALLS: contextvars.ContextVar[weakref.WeakKeyDictionary] = contextvars.ContextVar(
    "flexivit_bgn_calls", default=weakref.WeakKeyDictionary())


def _set_calls(calls: dict[nn.Module, tuple[int, tuple[int, int]]]) -> None:
    merged = weakref.WeakKeyDictionary(_CALLS.get())  # a copy: a context's value is never changed in place
    merged.update(calls)
    _CALLS.set(merged)


def _make_norm(cfg: FlexiViTConfig, *, pooled: bool) -> BatchGroupNorm:
    bgn = cfg.norm == "bgn"
    return BatchGroupNorm(cfg.embed_dim, groups=cfg.norm_groups if bgn else cfg.embed_dim,
                          regions=cfg.norm_regions if bgn else 1, sizes=cfg.norm_sizes, prefix=int(cfg.class_token),
                          prefix_region=bgn, pooled=pooled, pow2=cfg.pow2_scale)


def install_norms(model: nn.Module, cfg: FlexiViTConfig) -> None:
    """Replace the LayerNorms of ``model``'s timm Blocks (``norm1``, ``norm2``), its final token norm (``norm``)
    and its pooled-feature norm (``fc_norm``) by ``cfg.norm``'s batch-statistics norm; ``norm_pre`` stays."""
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        block.norm1, block.norm2 = _make_norm(cfg, pooled=False), _make_norm(cfg, pooled=False)
    if isinstance(model.norm, nn.LayerNorm):
        model.norm = _make_norm(cfg, pooled=False)
    if isinstance(model.fc_norm, nn.LayerNorm):
        model.fc_norm = _make_norm(cfg, pooled=True)


def batch_norms(model: nn.Module) -> list[BatchGroupNorm]:
    """The batch-statistics norms of ``model`` (also behind a DDP or compile wrapper)."""
    return [m for m in model.modules() if isinstance(m, BatchGroupNorm)]


def set_token_grid(model: nn.Module, patch: int, grid: tuple[int, int]) -> None:
    """Tell every batch-statistics norm of ``model`` the patch size and token grid of the forward to come."""
    call = (int(patch), (int(grid[0]), int(grid[1])))
    _set_calls(dict.fromkeys(batch_norms(model), call))


def norms_of(model: nn.Module) -> list[BatchGroupNorm]:
    norms = batch_norms(model)
    if not norms:
        raise ValueError("nothing to recalibrate: this model's norms are LayerNorms, which keep no statistics (only "
                         "models with model.norm=batchnorm or bgn have running statistics per patch size)")
    return norms


def norm_stats_source(model: nn.Module, patch: int) -> int | None:
    """The patch size whose running statistics ``model`` borrows at ``patch`` in eval; ``None`` when it has its
    own (or no batch-statistics norms)."""
    norms = batch_norms(model)
    source = norms[0].stats_source(patch) if norms else patch
    return None if source == patch else source


@torch.no_grad()
def recalibrate(model: FlexiViT, batches: Iterable[torch.Tensor], patch_sizes: Sequence[int]) -> list[int]:
    """Estimate running statistics for new ``patch_sizes`` from image ``batches`` (re-iterable; each at least 2
    images) and add the sizes to ``model.config.norm_sizes``; returns them sorted. Nothing but the new sizes'
    statistics changes: no gradients, every other module in eval mode, the norms normalising each batch with
    its own statistics as in training; a size's statistics are the average over the batches (cumulative)."""
    norms = norms_of(model)
    cfg = model.config
    new = sorted({s.patch for s in check_patch_sizes([int(p) for p in patch_sizes], cfg.img_size)})
    had = [p for p in new if p in cfg.norm_sizes]
    if had:
        raise ValueError(f"patch size{'s' * (len(had) > 1)} {', '.join(map(str, had))} already "
                         f"{'have' if len(had) > 1 else 'has'} running statistics (from training: {list(cfg.norm_sizes)}); "
                         "pass only new sizes")
    config = FlexiViTConfig.from_dict({**cfg.to_dict(), "norm_sizes": [*cfg.norm_sizes, *new]})  # checks regions
    was_training, momenta = model.training, [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        for patch in new:
            norm.add_size(patch)
        norm.momentum, norm._seen = None, {}
        norm.train()
    device = next(model.parameters()).device
    try:
        for patch in new:
            for images in batches:
                model(images.to(device), patch)
    except BaseException:
        for norm in norms:  # leave the model as it was
            for patch in new:
                norm.remove_size(patch)
        raise
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    model.config = config
    return new
