"""Patch schemes, the one patch-size validator, and the flexible patch embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from flexivit.model.resize import check_method, kernel_rank, pi_resize

__all__ = ["PatchScheme", "SchemeLike", "FlexiPatchEmbed", "valid_patch_sizes", "check_patch_sizes"]


@dataclass(frozen=True)
class PatchScheme:
    """How an image is cut into tokens: square patches of ``patch`` pixels every ``stride`` pixels.

    ``stride`` defaults to ``patch`` (non-overlapping tiles); ``stride < patch`` gives overlapping tiles.
    """

    patch: int
    stride: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.patch, int) or self.patch < 1:
            raise ValueError(f"patch size must be a positive integer, got {self.patch!r}")
        if self.stride is None:
            object.__setattr__(self, "stride", self.patch)
        elif not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be a positive integer, got {self.stride!r}")
        elif self.stride > self.patch:
            raise ValueError(
                f"stride {self.stride} > patch {self.patch} would skip pixels; use stride <= patch "
                f"(stride == patch for non-overlapping tiles)"
            )

    @classmethod
    def of(cls, value: "SchemeLike") -> "PatchScheme":
        """A scheme from a scheme, a patch size, or a ``(patch, stride)`` pair."""
        if isinstance(value, PatchScheme):
            return value
        if isinstance(value, (tuple, list)):
            return cls(int(value[0]), int(value[1]))
        return cls(int(value))

    @property
    def overlapping(self) -> bool:
        return self.stride < self.patch

    def tiles(self, image_hw: tuple[int, int]) -> bool:
        """Whether the tiles cover an ``image_hw`` image exactly, without padding."""
        h, w = image_hw
        return self.patch <= min(h, w) and (h - self.patch) % self.stride == 0 and (w - self.patch) % self.stride == 0

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Tokens along each axis for an image of ``image_hw``; raises (``check_patch_sizes``) if the tiles
        do not fit exactly."""
        if not self.tiles(image_hw):
            check_patch_sizes([self], image_hw)
        h, w = image_hw
        return ((h - self.patch) // self.stride + 1, (w - self.patch) // self.stride + 1)

    def padding_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Pixels to add at the bottom and right so that the tiles fit exactly."""
        h, w = image_hw

        def pad(n: int) -> int:
            if n <= self.patch:
                return self.patch - n
            return (-(n - self.patch)) % self.stride

        return pad(h), pad(w)


SchemeLike = Union[PatchScheme, int, tuple[int, int]]


def _image_hw(image_hw: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_hw, int):
        return image_hw, image_hw
    h, w = image_hw
    return int(h), int(w)


def valid_patch_sizes(image_hw: int | tuple[int, int], stride: int | None = None) -> list[int]:
    """Patch sizes that tile an image exactly (with ``stride == patch`` unless a stride is given)."""
    h, w = _image_hw(image_hw)
    if stride is None:
        return [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]
    return [p for p in range(stride, min(h, w) + 1) if (h - p) % stride == 0 and (w - p) % stride == 0]


def check_patch_sizes(
    schemes: Iterable[SchemeLike], image_hw: int | tuple[int, int], *, only: Sequence[int] | None = None,
    hint: str = "",
) -> list[PatchScheme]:
    """``schemes`` as ``PatchScheme``s, each checked to tile an ``image_hw`` image exactly.

    The one patch-size validator: the model's forward, the sampler, evaluation, prediction, export,
    fine-tuning and distillation all raise its ``ValueError``, which names the bad sizes and the valid
    ones. ``only`` narrows the valid sizes to those a model can run at (an export runs at one size);
    ``hint`` is appended to the message (e.g. how to pad instead).
    """
    hw = _image_hw(image_hw)
    given = [PatchScheme.of(s) for s in schemes]
    bad = [s for s in given if not s.tiles(hw) or (only is not None and s.patch not in only)]
    if given and not bad:
        return given
    valid = [p for p in valid_patch_sizes(hw) if only is None or p in only]
    message = f"valid patch sizes: {', '.join(map(str, valid))}"
    for stride in sorted({s.stride for s in bad if s.overlapping}):
        message += f"; with stride {stride}: {', '.join(map(str, valid_patch_sizes(hw, stride=stride)))}"
    named = ", ".join(str(s.patch) if not s.overlapping else f"{s.patch} (stride {s.stride})" for s in bad)
    plural = len(bad) > 1
    if not bad:
        problem = "no patch size given"
    elif all(s.tiles(hw) for s in bad):
        problem = f"patch size{'s' * plural} {named} cannot be used by this model ({hw[0]}x{hw[1]} images)"
    else:
        problem = f"patch size{'s' * plural} {named} {'do' if plural else 'does'} not tile a {hw[0]}x{hw[1]} image"
    raise ValueError(f"{problem}; {message}{hint}")


class FlexiPatchEmbed(nn.Module):
    """Patch embedding with one base kernel, PI-resized to the patch size of each call.

    The base kernel and bias are the only parameters and are never modified by a forward. In eval mode
    without autograd, the resized kernel is cached per scheme and recomputed when the weights change.
    ``resize`` names the image resize the kernel is matched to (``flexivit.model.resize.RESIZE_METHODS``).
    """

    def __init__(
        self,
        *,
        base_patch_size: int = 32,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        resize: str = "bilinear",
        pad: bool = False,
    ) -> None:
        super().__init__()
        self.base_patch_size = base_patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.resize = check_method(resize)
        self.pad = pad
        self.weight = nn.Parameter(torch.empty(embed_dim, in_chans, base_patch_size, base_patch_size))
        self.bias = nn.Parameter(torch.zeros(embed_dim)) if bias else None
        # patch -> (weight version key, resized kernel); a plain attribute so it never reaches state_dict.
        self._kernel_cache: dict[int, tuple[tuple, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LeCun normal over the base kernel's fan-in, as big_vision initialises its 32x32 kernel.
        fan_in = self.in_chans * self.base_patch_size**2
        nn.init.trunc_normal_(self.weight, std=1.0 / math.sqrt(fan_in))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def base_kernel(self) -> torch.Tensor:
        """The ``(D, C, base, base)`` kernel that PI-resize starts from: the weight itself here; a subclass
        may reparametrise it (a model option's layer), from the weight and its own buffers."""
        return self.weight

    def kernel(self, patch: int) -> torch.Tensor:
        """The ``(D, C, patch, patch)`` kernel for ``patch``; cached in eval mode without autograd."""
        # No cache while training, under autograd, or inside torch.compile (the key's data_ptr() would
        # break the graph; a compiled graph recomputes the tiny resize for free).
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return pi_resize(self.base_kernel(), patch, self.resize)
        w = self.weight
        key = (w._version, w.data_ptr(), w.device, w.dtype, self.resize, *(b._version for b in self.buffers(recurse=False)))
        hit = self._kernel_cache.get(patch)
        if hit is None or hit[0] != key:
            hit = (key, pi_resize(self.base_kernel(), patch, self.resize))
            self._kernel_cache[patch] = hit
        return hit[1]

    def kernel_rank(self, patch: int) -> int:
        """Rank of the kernel at ``patch`` as a ``(D, C*patch*patch)`` matrix (float64)."""
        return kernel_rank(self.base_kernel(), patch, self.resize)

    def forward(self, x: torch.Tensor, scheme: PatchScheme) -> torch.Tensor:
        """Embed ``x`` ``(B, C, H, W)`` into a token grid ``(B, gh, gw, D)``."""
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                f"convert the images or build the model with in_chans={x.shape[1]}"
            )
        if self.pad:
            pad_h, pad_w = scheme.padding_for((x.shape[2], x.shape[3]))
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
        elif not scheme.tiles((x.shape[2], x.shape[3])):
            check_patch_sizes([scheme], (x.shape[2], x.shape[3]), hint=" (or build the model with pad=True)")
        tokens = F.conv2d(x, self.kernel(scheme.patch), self.bias, stride=scheme.stride)  # (B, D, gh, gw)
        # A plain permute on this per-step path: einops.rearrange costs ~7 us more per call in eager mode.
        return tokens.permute(0, 2, 3, 1)  # (B, gh, gw, D)

    def extra_repr(self) -> str:
        return (
            f"base_patch_size={self.base_patch_size}, in_chans={self.in_chans}, embed_dim={self.embed_dim}, "
            f"resize={self.resize}, pad={self.pad}"
        )
