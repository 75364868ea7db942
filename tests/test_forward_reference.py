"""Overlapping and padded forwards against an explicit computation, value by value.

The reference is written out by hand from public pieces only: ``F.pad`` of the image (zeros at the bottom
and right, as many rows and columns as the tiles need), ``F.conv2d`` with ``pi_resize(base kernel, p)`` at
the scheme's stride, plus the position grid resampled to the token grid; then the class token and the
transformer's own modules (``norm_pre``, ``blocks``, ``norm``, timm's names).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.patch_embed import PatchScheme
from flexivit.model.resize import pi_resize


def make_model(*, pad: bool, in_chans: int = 3) -> FlexiViT:
    config = FlexiViTConfig(img_size=28, patch_size=7, base_patch_size=14, base_grid=7, in_chans=in_chans,
                            num_classes=10, embed_dim=32, depth=2, num_heads=2, pad=pad)
    model = FlexiViT(config).eval()
    with torch.no_grad():  # non-trivial values where initialisation leaves zeros or near-zeros
        model.patch_embed.bias.normal_()
        if model.cls_token is not None:
            model.cls_token.normal_()
    return model


def padded_size(n: int, patch: int, stride: int) -> int:
    """The smallest size >= ``n`` that ``patch``-wide tiles every ``stride`` pixels cover exactly."""
    return patch + math.ceil(max(n - patch, 0) / stride) * stride


def reference_embedding(model: FlexiViT, x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """What ``patch_embed`` should give: ``(B, gh, gw, D)``, before the position grid."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, padded_size(w, patch, stride) - w, 0, padded_size(h, patch, stride) - h))
    kernel = pi_resize(model.patch_embed.weight, patch)  # (D, C, p, p)
    grid = F.conv2d(x, kernel, model.patch_embed.bias, stride=stride)  # (B, D, gh, gw)
    return rearrange(grid, "b d h w -> b h w d")  # (B, gh, gw, D)


def reference_features(model: FlexiViT, x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """What ``forward_features`` should give: ``(B, prefix + gh*gw, D)``."""
    tokens = reference_embedding(model, x, patch, stride)
    _, gh, gw, _ = tokens.shape
    tokens = rearrange(tokens + model.posemb_grid((gh, gw)), "b h w d -> b (h w) d")  # (B, N, D)
    if model.cls_token is not None:
        tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1)  # (B, 1 + N, D)
    return model.norm(model.blocks(model.norm_pre(tokens)))


def check(model: FlexiViT, x: torch.Tensor, patch: int, stride: int) -> None:
    scheme = PatchScheme(patch, stride)
    for grad in (False, True):  # the cached eval path and the uncached autograd path
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(model.patch_embed(x, scheme), reference_embedding(model, x, patch, stride),
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.forward_features(x, patch, stride),
                                       reference_features(model, x, patch, stride), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("patch,stride", [(8, 4), (7, 3), (16, 4), (14, 7), (4, 2)])
def test_overlapping_forward_equals_explicit_convolution(patch: int, stride: int) -> None:
    """stride < patch on a 28 px image the tiles cover exactly: down- and upsampled kernels alike."""
    model = make_model(pad=False)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(patch * 100 + stride))
    assert (28 - patch) % stride == 0
    check(model, x, patch, stride)
    tokens = model.forward_features(x, patch, stride)
    assert tokens.shape[1] == model.num_prefix_tokens + ((28 - patch) // stride + 1) ** 2


@pytest.mark.parametrize(
    "hw,patch,stride",
    [((30, 30), 7, 7), ((30, 26), 8, 8), ((30, 30), 8, 6), ((29, 31), 16, 5), ((5, 9), 7, 7)],
)
def test_padded_forward_equals_explicit_zero_padding(hw: tuple[int, int], patch: int, stride: int) -> None:
    """``pad=True``: zeros at the bottom and right, exactly as many as the tiles need."""
    model = make_model(pad=True, in_chans=1)
    x = torch.randn(2, 1, *hw, generator=torch.Generator().manual_seed(sum(hw) + patch))
    assert not PatchScheme(patch, stride).tiles(hw)  # padding is needed in every case here
    check(model, x, patch, stride)


def test_padding_is_not_a_crop_and_changes_only_the_border_tokens() -> None:
    """The padded forward sees every pixel (a change in the last row moves the bottom tokens), and
    tokens away from the padded border are those of the unpadded image's own tiles."""
    model = make_model(pad=True, in_chans=1)
    x = torch.randn(1, 1, 30, 30, generator=torch.Generator().manual_seed(0))
    scheme = PatchScheme(7, 7)  # 30 px → 35 px: 5 x 5 tokens, the last row and column of tiles padded
    with torch.no_grad():
        base = model.patch_embed(x, scheme)  # (1, 5, 5, D)
        moved = x.clone()
        moved[..., -1, :] += 1.0
        bottom = model.patch_embed(moved, scheme)
        inner = model.patch_embed(x[..., :28, :28], scheme)  # tiles that need no padding
    assert not torch.allclose(base[:, -1], bottom[:, -1])
    torch.testing.assert_close(base[:, :-1], bottom[:, :-1])
    torch.testing.assert_close(base[:, :4, :4], inner, rtol=1e-5, atol=1e-5)
