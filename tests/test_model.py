"""FlexiViT properties: timm parity, gradients at every size, pure buffers, caches, bad input."""

import pytest
import timm
import torch
import torch.nn.functional as F

import flexivit
from flexivit import FlexiViT, FlexiViTConfig, PatchScheme
from flexivit.model import resize

SMALL = dict(img_size=28, patch_size=7, base_patch_size=14, base_grid=7, in_chans=1, num_classes=5,
             embed_dim=32, depth=2, num_heads=2)


def _model(**kw) -> FlexiViT:
    return FlexiViT(FlexiViTConfig(**{**SMALL, **kw}))


@pytest.mark.parametrize("patch", [2, 4, 7, 14, 28])
@pytest.mark.parametrize("variant", [dict(), dict(class_token=False, global_pool="avg"), dict(posemb="factorized")])
def test_every_parameter_gets_a_gradient_at_every_patch_size(patch, variant):
    model = _model(**variant)
    x = torch.randn(3, 1, 28, 28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(x, patch).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient at patch {patch}"
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed during a forward at patch {patch}"


@pytest.mark.parametrize("method", ["bilinear", "bilinear_aa"])
def test_upsampled_patches_give_the_same_tokens(method):
    """Through the whole stem: PI-resize makes a p-patch of an upsampled image equal the base patch."""
    model = _model(base_patch_size=4, kernel_resize=method).double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    base = model.patch_embed(x, PatchScheme(4))  # (B, 7, 7, D)
    # Resize each 4x4 patch to 8x8 on its own (as the method defines it; resizing the whole image would
    # mix pixels across patch borders), then embed with the kernel PI-resized to 8.
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 1, 49, 4, 4).permute(0, 2, 1, 3, 4)  # (B, 49, 1, 4, 4)
    big = F.interpolate(patches.reshape(-1, 1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False,
                        antialias=method == "bilinear_aa")
    tokens = F.conv2d(big, model.patch_embed.kernel(8), model.patch_embed.bias)  # (B*49, D, 1, 1)
    torch.testing.assert_close(tokens.reshape(2, 7, 7, -1), base, rtol=1e-9, atol=1e-9)


def _explicit_tiles(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    """Tokens as dot products of each explicitly cut tile with the kernel: ``(B, gh, gw, D)``."""
    p = kernel.shape[-1]
    tiles = F.unfold(x, p, stride=stride)  # (B, C*p*p, gh*gw)
    tokens = torch.einsum("bkl,dk->bld", tiles, kernel.reshape(kernel.shape[0], -1)) + bias  # (B, gh*gw, D)
    g = (x.shape[-1] - p) // stride + 1
    return tokens.reshape(x.shape[0], g, g, -1)  # (B, gh, gw, D)


def test_overlapping_scheme_embeds_every_tile():
    model = _model().double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    feats = model.forward_features(x, patch_size=7, stride=3)
    assert feats.shape == (2, 1 + 8 * 8, 32)  # (28 - 7) / 3 + 1 = 8 tokens per axis, plus the class token
    embed = model.patch_embed
    expected = _explicit_tiles(x, embed.kernel(7), embed.bias, stride=3)  # (B, 8, 8, D)
    torch.testing.assert_close(embed(x, PatchScheme(7, 3)), expected, rtol=1e-10, atol=1e-10)


def test_padding_equals_an_explicitly_padded_image():
    padded, plain = _model(pad=True).double(), _model().double()
    plain.load_state_dict(padded.state_dict())
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    big = torch.zeros(2, 1, 30, 30, dtype=torch.float64)
    big[:, :, :28, :28] = x  # zeros at the bottom and right, so that 5 tiles it: 6x6 tokens
    torch.testing.assert_close(padded(x, 5), plain(big, 5), rtol=1e-10, atol=1e-10)
    expected = _explicit_tiles(big, plain.patch_embed.kernel(5), plain.patch_embed.bias, stride=5)
    torch.testing.assert_close(padded.patch_embed(x, PatchScheme(5)), expected, rtol=1e-10, atol=1e-10)


def test_default_scheme_and_forward_head():
    model = _model()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model(x), model(x, 7))
    feats = model.forward_features(x, 4)
    assert feats.shape == (2, 1 + 49, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)


def test_eval_cache_is_hit_and_invalidated(monkeypatch):
    model = _model().eval()
    resize.clear_cache()
    calls = []
    real = torch.linalg.pinv
    monkeypatch.setattr(torch.linalg, "pinv", lambda a, *r, **k: calls.append(1) or real(a, *r, **k))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        first = model(x, 4)
        n = len(calls)
        assert n == 2
        kernel = model.patch_embed.kernel(4)
        assert model.patch_embed.kernel(4) is kernel  # cached tensor reused
        torch.testing.assert_close(model(x, 4), first)
        model.patch_embed.weight.mul_(2)  # weights change: the cached kernel must not be used
        assert model.patch_embed.kernel(4) is not kernel
        assert not torch.allclose(model(x, 4), first)
    assert len(calls) == n  # resize matrices came from the module-level cache
    keys = set(model.state_dict())
    assert not any("cache" in k for k in keys)
    assert keys >= {"patch_embed.weight", "pos_embed", "cls_token"}


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m(torch.randn(1, 1, 28, 28), 5),
         r"^patch size 5 does not tile a 28x28 image; valid patch sizes: 1, 2, 4, 7, 14, 28 \(or .*pad=True\)$"),
        (lambda m: m(torch.randn(1, 1, 28, 28), 32), "patch size 32 does not tile a 28x28 image; valid patch sizes"),
        (lambda m: m(torch.randn(1, 1, 28, 28), 8, stride=3), "8 \\(stride 3\\) does not tile.*with stride 3: 4, 7, "),
        (lambda m: m(torch.randn(1, 1, 28, 28), 0), "positive integer"),
        (lambda m: m(torch.randn(1, 1, 28, 28), 4, stride=5), "stride 5 > patch 4"),
        (lambda m: m(torch.randn(1, 3, 28, 28), 4), "expected 1 input channels, got 3"),
        (lambda m: m(torch.randn(1, 28, 28), 4), "4-D image batch"),
    ],
)
def test_bad_input_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call(_model())


def test_bad_config_messages():
    with pytest.raises(ValueError, match="needs class_token=True"):
        FlexiViTConfig(class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="unknown FlexiViT config keys"):
        FlexiViTConfig.from_dict({"embed_dimm": 3})
    with pytest.raises(ValueError, match="unknown kernel resize 'box'; choose one of bilinear, bilinear_aa, area"):
        FlexiViTConfig(kernel_resize="box")


@pytest.mark.parametrize("flag,method", [(True, "bilinear_aa"), (False, "bilinear")])
def test_configs_saved_with_kernel_antialias_still_load(flag, method):
    saved = {**FlexiViTConfig(**SMALL).to_dict(), "kernel_antialias": flag}
    del saved["kernel_resize"]
    config = FlexiViTConfig.from_dict(saved)
    assert config.kernel_resize == method
    assert FlexiViT(config).patch_embed.resize == method


@pytest.mark.parametrize("method", ["bilinear", "bilinear_aa", "area"])
def test_each_kernel_resize_runs_and_is_cached_per_method(method):
    model = _model(kernel_resize=method).eval()
    with torch.no_grad():
        assert torch.equal(model.patch_embed.kernel(4), resize.pi_resize(model.patch_embed.weight, 4, method))
        assert model.patch_embed.kernel(4) is model.patch_embed.kernel(4)
        assert model(torch.randn(2, 1, 28, 28), 4).shape == (2, 5)
    assert model.kernel_rank(2) == 4 and model.kernel_rank(28) == 32  # min(C*p*p, D=32)
    small_base = _model(kernel_resize=method, base_patch_size=4)
    assert [small_base.kernel_rank(p) for p in (2, 4, 7, 14)] == [4, 16, 16, 16]  # capped by the 4x4 base


def test_timm_registry_names_do_not_collide():
    assert isinstance(timm.create_model("flexivit_small", img_size=32, pretrained=False),
                      timm.models.VisionTransformer)  # timm's own entry survives our import
    for name in flexivit.VARIANTS:
        assert timm.is_model(name)
    model = timm.create_model("flexi_vit_micro", num_classes=3, in_chans=1)
    assert isinstance(model, FlexiViT) and model.config.num_classes == 3
    with pytest.raises(ValueError, match="no downloadable weights"):
        timm.create_model("flexi_vit_micro", pretrained=True)


def test_reset_classifier():
    model = _model()
    model.reset_classifier(3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert model.config.num_classes == 3
