"""Resizing of patch-embedding kernels and position-embedding grids.

The patch-embedding kernel of a FlexiViT is stored once at a base size and resized for every patch
size with the *pseudo-inverse resize* (PI-resize). With ``B`` the matrix of bilinear resizing from the
base size to the new one (acting on flattened patches), the new kernel is ``pinv(B.T) @ w``. When
upsampling, ``<B x, pinv(B.T) w> = <x, w>`` for every patch ``x``: a token computed from a resized
patch with the resized kernel equals the token of the original patch. When downsampling it is the
least-squares solution of that equation.

Bilinear resizing is separable, ``B = kron(B_h, B_w)``, and the pseudo-inverse of a Kronecker product is
the Kronecker product of the pseudo-inverses, so the resize is two small matrix products per kernel:
O(p^2) memory instead of the O(p^4) of the full matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["resize_matrix", "resize_matrix_1d", "pi_resize", "resample_posemb", "clear_cache"]

Size2 = tuple[int, int]

# Derived matrices, keyed by (old, new, antialias, device, dtype). A plain dict rather than module
# buffers: they are functions of the sizes alone, must never reach a state_dict, and must not be
# broadcast by DDP.
_PINV_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _as_size2(size: int | Size2) -> Size2:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _check_positive(name: str, size: Size2) -> None:
    if min(size) < 1:
        raise ValueError(f"{name} must be >= 1 in each dimension, got {size}")


def resize_matrix_1d(old: int, new: int, antialias: bool = False) -> torch.Tensor:
    """The ``(new, old)`` float64 matrix of 1-D bilinear resizing with half-pixel centres.

    Column ``i`` is the resized ``i``-th basis vector, so ``M @ v`` resizes a vector ``v`` exactly as
    ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=antialias)`` resizes one axis.
    """
    if old < 1 or new < 1:
        raise ValueError(f"sizes must be >= 1, got old={old}, new={new}")
    basis = torch.eye(old, dtype=torch.float64).reshape(old, 1, 1, old)  # (old, C=1, H=1, W=old)
    resized = F.interpolate(
        basis, size=(1, new), mode="bilinear", align_corners=False, antialias=antialias
    )  # (old, 1, 1, new)
    return resized.reshape(old, new).T.contiguous()  # (new, old)


def resize_matrix(old_hw: int | Size2, new_hw: int | Size2, antialias: bool = False) -> torch.Tensor:
    """The ``(new_h*new_w, old_h*old_w)`` matrix of 2-D bilinear resizing of row-major flattened images.

    ``resize_matrix(old, new) @ x.flatten()`` equals
    ``F.interpolate(x[None, None], new, mode="bilinear", align_corners=False, antialias=antialias)``.
    Built as the Kronecker product of the two 1-D matrices; O(p^4) memory, so meant for analysis and
    tests. ``pi_resize`` never materialises it.
    """
    (oh, ow), (nh, nw) = _as_size2(old_hw), _as_size2(new_hw)
    return torch.kron(resize_matrix_1d(oh, nh, antialias), resize_matrix_1d(ow, nw, antialias))


def _pinv_factors(
    old: Size2, new: Size2, antialias: bool, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_h, P_w)`` with ``pinv(B.T) = kron(P_h, P_w)``; each ``(new_i, old_i)``. Cached."""
    key = (old, new, antialias, device, dtype)
    factors = _PINV_CACHE.get(key)
    if factors is None:
        # pinv in float64 on the CPU whatever the kernel's dtype: the matrices are tiny and bf16/fp16
        # pseudo-inverses are inaccurate.
        factors = tuple(
            torch.linalg.pinv(resize_matrix_1d(o, n, antialias).T).to(device=device, dtype=dtype)
            for o, n in zip(old, new)
        )
        _PINV_CACHE[key] = factors
    return factors


def clear_cache() -> None:
    """Drop all cached resize matrices (they are rebuilt on demand)."""
    _PINV_CACHE.clear()


def pi_resize(kernel: torch.Tensor, new_hw: int | Size2, antialias: bool = False) -> torch.Tensor:
    """Pseudo-inverse resize of a conv kernel ``(D, C, h, w)`` to ``(D, C, new_h, new_w)``.

    Differentiable with respect to ``kernel``; the input is never modified. ``antialias=True`` builds the
    map from antialiased (area-like) resizing, so a downsampled kernel reads every weight of the base
    kernel; the default (plain bilinear) is what the official FlexiViT weights expect.
    """
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be 4-D (D, C, h, w), got shape {tuple(kernel.shape)}")
    old = (int(kernel.shape[-2]), int(kernel.shape[-1]))
    new = _as_size2(new_hw)
    _check_positive("new kernel size", new)
    if old == new:
        return kernel
    p_h, p_w = _pinv_factors(old, new, antialias, kernel.device, kernel.dtype)
    # vec(P_h W P_w^T) = kron(P_h, P_w) vec(W) for row-major vec.
    return torch.einsum("nh,dchw,mw->dcnm", p_h, kernel, p_w)  # (D, C, new_h, new_w)


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
        grid = grid.reshape(grid.shape[0], side, side, grid.shape[2])  # (1, H, W, D)
    elif grid.ndim != 4:
        raise ValueError(f"position embedding must be (1, H, W, D) or (1, H*W, D), got {tuple(grid.shape)}")
    new = _as_size2(new_hw)
    _check_positive("new grid size", new)
    if tuple(grid.shape[1:3]) != new:
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic", "linear", "trilinear") else {}
        if antialias:
            kwargs["antialias"] = True
        dtype = grid.dtype
        nchw = grid.permute(0, 3, 1, 2).float() if dtype in (torch.float16, torch.bfloat16) else grid.permute(0, 3, 1, 2)
        grid = F.interpolate(nchw, size=new, mode=mode, **kwargs).to(dtype).permute(0, 2, 3, 1)  # (1, h, w, D)
    return grid.reshape(grid.shape[0], new[0] * new[1], grid.shape[3]) if flat else grid
