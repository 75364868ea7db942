"""Property tests of the resize operators: each equals the op it names, PI exactness, least squares,
separability, rank, caching."""

import math

import pytest
import torch
import torch.nn.functional as F

from flexivit.model import resize
from flexivit.model.resize import RESIZE_METHODS, area_matrix_1d, kernel_rank, pi_resize, resample_posemb, resize_matrix

UP = [((8, 8), (16, 16)), ((4, 4), (7, 7)), ((3, 5), (6, 9)), ((2, 2), (32, 32)), ((5, 4), (5, 11))]
DOWN = [((16, 16), (8, 8)), ((14, 14), (2, 2)), ((9, 6), (4, 5)), ((32, 32), (7, 7))]


def _box_average(x: torch.Tensor, new_hw) -> torch.Tensor:
    """The exact average of the piecewise-constant image ``x`` over each output cell, computed without
    any weights: every pixel is repeated onto a grid fine enough for both sizes, then blocks are averaged."""
    (h, w), (nh, nw) = x.shape[-2:], new_hw
    lh, lw = math.lcm(h, nh), math.lcm(w, nw)
    fine = x.repeat_interleave(lh // h, dim=-2).repeat_interleave(lw // w, dim=-1)  # (N, C, lh, lw)
    return fine.reshape(*x.shape[:2], nh, lh // nh, nw, lw // nw).mean(dim=(-3, -1))  # (N, C, nh, nw)


def _resize_image(x: torch.Tensor, new_hw, method: str = "bilinear") -> torch.Tensor:
    """The image op each method names, computed by torch (or, for ``area``, by ``_box_average``)."""
    if method == "area":
        return _box_average(x, new_hw)
    return F.interpolate(x, size=new_hw, mode="bilinear", align_corners=False, antialias=method == "bilinear_aa")


@pytest.mark.parametrize("method", RESIZE_METHODS)
@pytest.mark.parametrize("old,new", UP + DOWN)
def test_resize_matrix_equals_the_op_it_names(old, new, method):
    x = torch.randn(3, 1, *old, dtype=torch.float64)
    expected = _resize_image(x, new, method).reshape(3, -1)
    got = x.reshape(3, -1) @ resize_matrix(old, new, method).T
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("old,new", [(8, 4), (12, 3), (3, 9), (4, 8), (4, 14)])
def test_area_equals_torch_area_when_one_size_divides_the_other(old, new):
    x = torch.randn(4, 1, 1, old, dtype=torch.float64)
    torch_area = F.interpolate(x, size=(1, new), mode="area").reshape(4, new)
    torch.testing.assert_close(x.reshape(4, old) @ area_matrix_1d(old, new).T, torch_area, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("old,new", [(7, 3), (3, 7), (14, 4)])
def test_area_is_not_torch_area_at_other_ratios(old, new):
    """torch weighs every input pixel a cell touches equally; the box filter weighs it by the overlap."""
    x = torch.randn(4, 1, 1, old, dtype=torch.float64)
    torch_area = F.interpolate(x, size=(1, new), mode="area").reshape(4, new)
    assert not torch.allclose(x.reshape(4, old) @ area_matrix_1d(old, new).T, torch_area)
    torch.testing.assert_close(area_matrix_1d(old, new).sum(dim=1), torch.ones(new, dtype=torch.float64))


def test_bilinear_is_the_area_average_at_2x_downsampling_and_aa_is_a_tent():
    """At 4->2 plain bilinear is the box average, so its PI map sums each covered half of the kernel; the
    antialiased (tent) operator's PI map puts a negative weight on the far half."""
    torch.testing.assert_close(resize_matrix(4, 2, "bilinear"), resize_matrix(4, 2, "area"), rtol=0, atol=1e-15)
    kernel = torch.eye(4, dtype=torch.float64).reshape(4, 1, 1, 4)  # row i: the i-th basis kernel
    covered = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(pi_resize(kernel, (1, 2), "area").reshape(4, 2), covered)
    tent = pi_resize(kernel, (1, 2), "bilinear_aa").reshape(4, 2)  # (base weight, new weight)
    assert tent[3, 0] < -0.38 and tent[0, 1] < -0.38


@pytest.mark.parametrize("method", RESIZE_METHODS)
@pytest.mark.parametrize("old,new", UP)
def test_pi_resize_is_exact_when_upsampling(old, new, method):
    """<resize(x), pi_resize(w)> == <x, w> for every patch x: the token is unchanged."""
    kernel = torch.randn(6, 3, *old, dtype=torch.float64)
    patches = torch.randn(10, 3, *old, dtype=torch.float64)
    tokens = F.conv2d(patches, kernel)  # (10, 6, 1, 1)
    resized_tokens = F.conv2d(_resize_image(patches, new, method), pi_resize(kernel, new, method))
    torch.testing.assert_close(resized_tokens, tokens, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", RESIZE_METHODS)
@pytest.mark.parametrize("old,new", DOWN)
def test_pi_resize_is_the_least_squares_solution_when_downsampling(old, new, method):
    """w_hat = argmin ||B^T w_hat - w||, as torch's own least-squares solver finds it."""
    kernel = torch.randn(4, 2, *old, dtype=torch.float64)
    b = resize_matrix(old, new, method)  # (new, old) flattened
    lstsq = torch.linalg.lstsq(b.T, kernel.reshape(8, -1).T).solution.T  # (D*C, new_h*new_w)
    torch.testing.assert_close(pi_resize(kernel, new, method).reshape(8, -1), lstsq, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", RESIZE_METHODS)
@pytest.mark.parametrize("old,new", UP + DOWN)
def test_separable_equals_full_pinv(old, new, method):
    kernel = torch.randn(3, 2, *old, dtype=torch.float64)
    full = torch.linalg.pinv(resize_matrix(old, new, method).T)  # (new, old) flattened
    expected = (kernel.reshape(6, -1) @ full.T).reshape(3, 2, *new)
    torch.testing.assert_close(pi_resize(kernel, new, method), expected, rtol=1e-9, atol=1e-9)


def test_wide_filters_read_every_base_weight_when_downsampling():
    """Plain bilinear 14->2 reads 4 of 196 weights; the tent and box filters read them all."""
    kernel = torch.randn(1, 1, 14, 14, dtype=torch.float64, requires_grad=True)
    pi_resize(kernel, 2).sum().backward()
    assert int((kernel.grad != 0).sum()) == 4  # samples land on pixel centres 3 and 10 of each axis
    for method in ("bilinear_aa", "area"):
        kernel.grad = None
        pi_resize(kernel, 2, method).sum().backward()
        assert int((kernel.grad != 0).sum()) == 196, method


@pytest.mark.parametrize("method", RESIZE_METHODS)
def test_kernel_rank_is_capped_by_the_base_when_upsampling(method):
    kernel = torch.randn(64, 2, 4, 4)
    assert kernel_rank(kernel, 4, method) == 32  # C * 4 * 4: a random base kernel has full rank
    assert kernel_rank(kernel, 14, method) == 32  # 392 columns, but only the base's 32 directions
    assert kernel_rank(kernel, 2, method) == 8  # C * 2 * 2 when downsampling
    assert kernel_rank(torch.randn(64, 2, 14, 14), 7, method) == 64  # D caps it here


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
    pi_resize(kernel, 4, "area")  # another operator
    assert len(calls) == 8
    resize.clear_cache()
    pi_resize(kernel, 4)
    assert len(calls) == 10


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


def test_bad_sizes_and_methods():
    with pytest.raises(ValueError, match="4-D"):
        pi_resize(torch.randn(3, 8, 8), 4)
    with pytest.raises(ValueError, match=">= 1"):
        pi_resize(torch.randn(1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="choose one of bilinear, bilinear_aa, area"):
        pi_resize(torch.randn(1, 1, 8, 8), 4, "bicubic")
