"""Resizing of patch-embedding kernels and position-embedding grids.

The patch-embedding kernel of a FlexiViT is stored once at a base size and resized for every patch
size with the *pseudo-inverse resize* (PI-resize). With ``B`` the matrix of an image-resize operator
from the base size to the new one (acting on flattened patches), the new kernel is ``pinv(B.T) @ w``.
When upsampling, ``<B x, pinv(B.T) w> = <x, w>`` for every patch ``x``: a token computed from a resized
patch with the resized kernel equals the token of the original patch. When downsampling it is the
least-squares solution of that equation.

Three operators ``B`` are offered, named for what they compute (``RESIZE_METHODS``):

- ``bilinear``: ``F.interpolate(mode="bilinear", align_corners=False)``, half-pixel centres, no
  antialiasing. What the official FlexiViT weights use, and the default.
- ``bilinear_aa``: the same with ``antialias=True``. When downsampling, torch widens the bilinear
  kernel to a tent (triangle) filter whose support scales with the ratio; it is not an area average.
- ``area``: the true box filter, see ``area_matrix_1d``.

Each operator is separable, ``B = kron(B_h, B_w)``, and the pseudo-inverse of a Kronecker product is
the Kronecker product of the pseudo-inverses, so the resize is two small matrix products per kernel:
O(p^2) memory instead of the O(p^4) of the full matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "RESIZE_METHODS", "check_method", "resize_matrix", "resize_matrix_1d", "area_matrix_1d", "pi_resize",
    "kernel_rank", "resample_posemb", "clear_cache",
]

Size2 = tuple[int, int]
RESIZE_METHODS = ("bilinear", "bilinear_aa", "area")

# Derived matrices, keyed by (old, new, method, device, dtype). A plain dict rather than module buffers:
# they are functions of the sizes alone, must never reach a state_dict, and must not be broadcast by DDP.
_PINV_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _as_size2(size: int | Size2) -> Size2:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _check_positive(name: str, size: Size2) -> None:
    if min(size) < 1:
        raise ValueError(f"{name} must be >= 1 in each dimension, got {size}")


def check_method(method: str) -> str:
    """``method`` if it names a resize operator, else a ``ValueError`` listing them."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown kernel resize {method!r}; choose one of {', '.join(RESIZE_METHODS)}")
    return method


def area_matrix_1d(old: int, new: int) -> torch.Tensor:
    """The ``(new, old)`` float64 matrix of 1-D box (area) resizing, down or up.

    Input pixel ``i`` is the interval ``[i, i+1)``; output pixel ``j`` covers ``[j*old/new, (j+1)*old/new)``
    and is the exact average of the input over it: ``M[j, i]`` is their overlap divided by ``old/new``.
    Every row sums to 1. It equals torch's ``F.interpolate(mode="area")`` (adaptive average pooling)
    when one size divides the other, down or up; in general it does not (e.g. 7->3, 3->7, 14->4): torch
    gives every input pixel a cell touches the same weight, however little of it the cell covers. It
    also equals plain ``bilinear`` at exactly 2x downsampling, whose two taps are the two covered pixels.
    """
    if old < 1 or new < 1:
        raise ValueError(f"sizes must be >= 1, got old={old}, new={new}")
    # Coordinates times `new`, so every end point is an integer: input i spans [i*new, (i+1)*new),
    # output j spans [j*old, (j+1)*old), and the weight is their overlap over the cell's width `old`.
    i = torch.arange(old, dtype=torch.int64)[None, :]  # (1, old)
    j = torch.arange(new, dtype=torch.int64)[:, None]  # (new, 1)
    overlap = torch.minimum((i + 1) * new, (j + 1) * old) - torch.maximum(i * new, j * old)  # (new, old)
    return overlap.clamp(min=0).to(torch.float64) / old


def resize_matrix_1d(old: int, new: int, method: str = "bilinear") -> torch.Tensor:
    """The ``(new, old)`` float64 matrix of 1-D resizing by ``method`` (one of ``RESIZE_METHODS``).

    ``M @ v`` resizes a vector ``v``; for ``bilinear`` / ``bilinear_aa`` exactly as
    ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=method == "bilinear_aa")``
    resizes one axis (column ``i`` is that op applied to the ``i``-th basis vector).
    """
    if check_method(method) == "area":
        return area_matrix_1d(old, new)
    if old < 1 or new < 1:
        raise ValueError(f"sizes must be >= 1, got old={old}, new={new}")
    basis = torch.eye(old, dtype=torch.float64).reshape(old, 1, 1, old)  # (old, C=1, H=1, W=old)
    resized = F.interpolate(
        basis, size=(1, new), mode="bilinear", align_corners=False, antialias=method == "bilinear_aa"
    )  # (old, 1, 1, new)
    return resized.reshape(old, new).T.contiguous()  # (new, old)


def resize_matrix(old_hw: int | Size2, new_hw: int | Size2, method: str = "bilinear") -> torch.Tensor:
    """The ``(new_h*new_w, old_h*old_w)`` matrix of 2-D resizing of row-major flattened images.

    For the bilinear methods, ``resize_matrix(old, new, m) @ x.flatten()`` equals ``F.interpolate`` of
    ``x``. Built as the Kronecker product of the two 1-D matrices; O(p^4) memory, so meant for analysis
    and tests. ``pi_resize`` never materialises it.
    """
    (oh, ow), (nh, nw) = _as_size2(old_hw), _as_size2(new_hw)
    return torch.kron(resize_matrix_1d(oh, nh, method), resize_matrix_1d(ow, nw, method))


def _pinv_factors(
    old: Size2, new: Size2, method: str, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_h, P_w)`` with ``pinv(B.T) = kron(P_h, P_w)``; each ``(new_i, old_i)``. Cached."""
    key = (old, new, method, device, dtype)
    factors = _PINV_CACHE.get(key)
    if factors is None:
        # pinv in float64 on the CPU whatever the kernel's dtype: the matrices are tiny and bf16/fp16
        # pseudo-inverses are inaccurate.
        factors = tuple(
            torch.linalg.pinv(resize_matrix_1d(o, n, method).T).to(device=device, dtype=dtype)
            for o, n in zip(old, new)
        )
        _PINV_CACHE[key] = factors
    return factors


def clear_cache() -> None:
    """Drop all cached resize matrices (they are rebuilt on demand)."""
    _PINV_CACHE.clear()


def pi_resize(kernel: torch.Tensor, new_hw: int | Size2, method: str = "bilinear") -> torch.Tensor:
    """Pseudo-inverse resize of a conv kernel ``(D, C, h, w)`` to ``(D, C, new_h, new_w)``.

    Differentiable with respect to ``kernel``; the input is never modified. ``method`` names the image
    resize the kernel is matched to (``RESIZE_METHODS``); the default, plain bilinear, is what the
    official FlexiViT weights expect.
    """
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be 4-D (D, C, h, w), got shape {tuple(kernel.shape)}")
    old = (int(kernel.shape[-2]), int(kernel.shape[-1]))
    new = _as_size2(new_hw)
    _check_positive("new kernel size", new)
    if old == new:
        return kernel
    p_h, p_w = _pinv_factors(old, new, check_method(method), kernel.device, kernel.dtype)
    # vec(P_h W P_w^T) = kron(P_h, P_w) vec(W) for row-major vec.
    return torch.einsum("nh,dchw,mw->dcnm", p_h, kernel, p_w)  # (D, C, new_h, new_w)


@torch.no_grad()
def kernel_rank(kernel: torch.Tensor, new_hw: int | Size2, method: str = "bilinear") -> int:
    """Rank of ``pi_resize(kernel, new_hw, method)`` read as a ``(D, C*new_h*new_w)`` matrix.

    Computed in float64. Upsampling keeps the kernel in the range of the resize matrix, so the rank is
    at most ``C*h*w`` of the base: a patch larger than the base kernel sees a base-sized summary of itself.
    """
    resized = pi_resize(kernel.detach().to(device="cpu", dtype=torch.float64), new_hw, method)
    return int(torch.linalg.matrix_rank(rearrange(resized, "d c h w -> d (c h w)")))


def resample_posemb(
    grid: torch.Tensor, new_hw: int | Size2, mode: str = "bilinear", antialias: bool = False
) -> torch.Tensor:
    """Resample a learned position-embedding grid to ``new_hw`` tokens.

    Accepts ``(1, H, W, D)`` or ``(1, H*W, D)`` (the latter must be square) and returns the same layout
    at the new size. ``mode`` is any ``F.interpolate`` mode for 4-D input.
    """
    flat = grid.ndim == 3
    if flat:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(
                f"a flat (1, N, D) position embedding must have a square number of tokens, got N={grid.shape[1]}; "
                "pass it as (1, H, W, D) instead"
            )
        grid = rearrange(grid, "b (h w) d -> b h w d", h=side)  # (1, H, W, D)
    elif grid.ndim != 4:
        raise ValueError(f"position embedding must be (1, H, W, D) or (1, H*W, D), got {tuple(grid.shape)}")
    new = _as_size2(new_hw)
    _check_positive("new grid size", new)
    if tuple(grid.shape[1:3]) != new:
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic", "linear", "trilinear") else {}
        if antialias:
            kwargs["antialias"] = True
        dtype = grid.dtype
        # Plain permutes on this per-step path: einops.rearrange costs ~7 us more per call in eager mode.
        nchw = grid.permute(0, 3, 1, 2)  # (1, D, H, W)
        if dtype in (torch.float16, torch.bfloat16):
            nchw = nchw.float()
        grid = F.interpolate(nchw, size=new, mode=mode, **kwargs).to(dtype).permute(0, 2, 3, 1)  # (1, h, w, D)
    return grid.flatten(1, 2) if flat else grid  # (1, h*w, D) or (1, h, w, D)
