"""timm interop: weights in from any timm ViT, a plain timm ViT out at any size."""

import ast
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import flexivit.model.timm_interop
from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model import resize

TIMM_CASES = {
    "cls-token, pos incl. cls": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7),
    "gap + fc_norm": dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=7,
                          class_token=False, global_pool="avg"),
    "no_embed_class": dict(img_size=30, patch_size=6, embed_dim=32, depth=1, num_heads=2, no_embed_class=True),
    "qk_norm + layerscale + pre_norm": dict(img_size=24, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                                            qk_norm=True, init_values=0.1, pre_norm=True, in_chans=1),
}


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial values everywhere (timm zero-inits biases, pos_embed and cls_token stay tiny)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("case", TIMM_CASES)
@pytest.mark.parametrize("as_state_dict", [False, True])
def test_from_timm_reproduces_timm_logits(case, as_state_dict):
    vit = VisionTransformer(**TIMM_CASES[case]).eval()
    _randomise(vit)
    x = torch.randn(2, vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
    source = vit.state_dict() if as_state_dict else vit
    overrides = {"num_heads": vit.blocks[0].attn.num_heads} if as_state_dict else {}
    if as_state_dict and not vit.has_class_token:
        overrides["global_pool"] = "avg"
    flexi = FlexiViT.from_timm(source, **overrides).eval()
    assert flexi.config.base_patch_size == vit.patch_embed.patch_size[0]  # kernel becomes the base as is
    torch.testing.assert_close(flexi(x), vit(x), rtol=1e-5, atol=1e-5)


def test_official_flexivit_timm_models_are_accepted():
    """timm's flexivit_* hold the official weights (16x16 kernel, 15x15 grid at 240 px)."""
    vit = timm.create_model("flexivit_small", pretrained=False, img_size=240, depth=2, num_classes=11).eval()
    _randomise(vit)
    flexi = FlexiViT.from_timm(vit).eval()
    assert (flexi.config.base_patch_size, flexi.config.base_grid, flexi.config.img_size) == (16, 15, 240)
    x = torch.randn(1, 3, 240, 240)
    torch.testing.assert_close(flexi(x), vit(x), rtol=1e-5, atol=1e-5)
    assert flexi(x, 8).shape == flexi(x, 48).shape == (1, 11)


def test_other_base_is_an_explicit_lossy_choice():
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
    _randomise(vit)
    moved = FlexiViT.from_timm(vit, base_patch_size=16, base_grid=7).eval()
    assert moved.patch_embed.weight.shape[-1] == 16 and moved.pos_embed.shape[1] == 7
    x = torch.randn(2, 3, 32, 32)
    assert moved(x, 8).shape == vit(x).shape
    assert not torch.allclose(moved(x, 8), vit(x), atol=1e-4)  # round trips through resizes lose


@pytest.mark.parametrize("patch", [2, 4, 7, 14])
@pytest.mark.parametrize("variant", [dict(), dict(class_token=False, global_pool="avg"), dict(posemb="factorized"),
                                     dict(kernel_resize="area"), dict(kernel_resize="bilinear_aa")])
def test_to_fixed_matches_flexible_model(patch, variant):
    cfg = FlexiViTConfig(img_size=28, patch_size=7, base_patch_size=14, in_chans=1, num_classes=4,
                         embed_dim=32, depth=2, num_heads=2, **variant)
    flexi = FlexiViT(cfg).eval()
    _randomise(flexi)
    fixed = flexi.to_fixed(patch)
    assert type(fixed) is VisionTransformer and not fixed.training
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(fixed(x), flexi(x, patch), rtol=1e-5, atol=1e-5)


def test_from_timm_errors():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        FlexiViT.from_timm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a timm VisionTransformer state_dict"):
        FlexiViT.from_timm({"weight": torch.zeros(2)})
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=2)
    with pytest.raises(ValueError, match="register tokens"):
        FlexiViT.from_timm(vit)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, global_pool="map")
    with pytest.raises(ValueError, match="attention pooling"):
        FlexiViT.from_timm(vit)
    flexi = FlexiViT(FlexiViTConfig(img_size=28, patch_size=7, base_patch_size=14, embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="valid patch sizes"):
        flexi.to_fixed(5)


def test_moving_to_another_base_uses_the_configured_resize():
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
    moved = FlexiViT.from_timm(vit, base_patch_size=16, kernel_resize="area")
    expected = resize.pi_resize(vit.patch_embed.proj.weight, 16, "area")
    torch.testing.assert_close(moved.patch_embed.weight, expected)
    assert moved.config.kernel_resize == "area"


def test_timm_interop_never_imports_the_model():
    """timm_interop works on configs and state dicts; model/vit.py imports it, never the other way round."""
    source = Path(flexivit.model.timm_interop.__file__).read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "flexivit.model.vit" not in imported and "flexivit.model.config" in imported
