"""Property tests of the resize operators: exactness, least squares, separability, caching."""

import pytest
import torch
import torch.nn.functional as F

from flexivit import resize
from flexivit.resize import pi_resize, resample_posemb, resize_matrix

UP = [((8, 8), (16, 16)), ((4, 4), (7, 7)), ((3, 5), (6, 9)), ((2, 2), (32, 32)), ((5, 4), (5, 11))]
DOWN = [((16, 16), (8, 8)), ((14, 14), (2, 2)), ((9, 6), (4, 5)), ((32, 32), (7, 7))]


def _resize_image(x: torch.Tensor, new_hw, antialias: bool = False) -> torch.Tensor:
    return F.interpolate(x, size=new_hw, mode="bilinear", align_corners=False, antialias=antialias)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("old,new", UP + DOWN)
def test_resize_matrix_matches_interpolate(old, new, antialias):
    x = torch.randn(3, 1, *old, dtype=torch.float64)
    expected = _resize_image(x, new, antialias).reshape(3, -1)
    got = x.reshape(3, -1) @ resize_matrix(old, new, antialias).T
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("old,new", UP)
def test_pi_resize_is_exact_when_upsampling(old, new, antialias):
    """<resize(x), pi_resize(w)> == <x, w> for every patch x: the token is unchanged."""
    kernel = torch.randn(6, 3, *old, dtype=torch.float64)
    patches = torch.randn(10, 3, *old, dtype=torch.float64)
    tokens = F.conv2d(patches, kernel)  # (10, 6, 1, 1)
    resized_tokens = F.conv2d(_resize_image(patches, new, antialias), pi_resize(kernel, new, antialias))
    torch.testing.assert_close(resized_tokens, tokens, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("old,new", DOWN)
def test_pi_resize_solves_least_squares_when_downsampling(old, new):
    """w_hat minimises ||B^T w_hat - w||: the normal equations B (B^T w_hat - w) = 0 hold."""
    kernel = torch.randn(4, 2, *old, dtype=torch.float64)
    w_hat = pi_resize(kernel, new).reshape(8, -1)  # (D*C, new_h*new_w)
    b = resize_matrix(old, new)  # (new, old) flattened
    residual = w_hat @ b - kernel.reshape(8, -1)  # rows of B^T w_hat - w
    torch.testing.assert_close(residual @ b.T, torch.zeros(8, b.shape[0], dtype=torch.float64), atol=1e-9, rtol=0)
    # ...and it is not a trivial solution: a random perturbation has a larger residual.
    worse = (w_hat + 0.01 * torch.randn_like(w_hat)) @ b - kernel.reshape(8, -1)
    assert worse.norm() > residual.norm()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("old,new", UP + DOWN)
def test_separable_equals_full_pinv(old, new, antialias):
    kernel = torch.randn(3, 2, *old, dtype=torch.float64)
    full = torch.linalg.pinv(resize_matrix(old, new, antialias).T)  # (new, old) flattened
    expected = (kernel.reshape(6, -1) @ full.T).reshape(3, 2, *new)
    torch.testing.assert_close(pi_resize(kernel, new, antialias), expected, rtol=1e-9, atol=1e-9)


def test_antialias_downsampling_reads_every_base_weight():
    """Plain bilinear 14->2 reads 4 of 196 weights; the area-like operator reads them all."""
    kernel = torch.randn(1, 1, 14, 14, dtype=torch.float64, requires_grad=True)
    pi_resize(kernel, 2).sum().backward()
    assert int((kernel.grad != 0).sum()) == 4  # samples land on pixel centres 3 and 10 of each axis
    kernel.grad = None
    pi_resize(kernel, 2, antialias=True).sum().backward()
    assert int((kernel.grad != 0).sum()) == 196


def test_pi_resize_is_differentiable_and_pure():
    kernel = torch.randn(4, 3, 8, 8, requires_grad=True)
    before = kernel.detach().clone()
    pi_resize(kernel, 5).square().sum().backward()
    assert kernel.grad is not None and kernel.grad.abs().sum() > 0
    assert torch.equal(kernel.detach(), before)
    assert pi_resize(kernel, 8) is kernel  # same size: identity


def test_cache_counts_pinv_calls(monkeypatch):
    resize.clear_cache()
    calls = []
    real = torch.linalg.pinv
    monkeypatch.setattr(torch.linalg, "pinv", lambda a, *args, **kw: calls.append(a.shape) or real(a, *args, **kw))
    kernel = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        pi_resize(kernel, 4)
    assert len(calls) == 2  # one per axis, once
    pi_resize(kernel.double(), 4)  # another dtype: its own entry
    pi_resize(kernel, (4, 6))  # another size
    assert len(calls) == 6
    resize.clear_cache()
    pi_resize(kernel, 4)
    assert len(calls) == 8


def test_resample_posemb_layouts_and_values():
    grid = torch.randn(1, 7, 7, 16)
    out = resample_posemb(grid, (4, 9))
    assert out.shape == (1, 4, 9, 16)
    expected = _resize_image(grid.permute(0, 3, 1, 2), (4, 9)).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, expected)
    flat = resample_posemb(grid.reshape(1, 49, 16), 4)
    torch.testing.assert_close(flat, resample_posemb(grid, 4).reshape(1, 16, 16))
    assert resample_posemb(grid, 7) is grid
    with pytest.raises(ValueError, match="square number of tokens"):
        resample_posemb(torch.randn(1, 50, 16), 4)
    with pytest.raises(ValueError, match=r"\(1, H, W, D\)"):
        resample_posemb(torch.randn(7, 16), 4)


def test_bad_sizes():
    with pytest.raises(ValueError, match="4-D"):
        pi_resize(torch.randn(3, 8, 8), 4)
    with pytest.raises(ValueError, match=">= 1"):
        pi_resize(torch.randn(1, 1, 8, 8), 0)
