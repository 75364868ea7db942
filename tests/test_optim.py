"""The optimizer's parameter groups: weight decay, layer decay and per-parameter learning-rate scales."""

import pytest
import torch

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.config import load_recipe
from flexivit.optim import build_optimizer


def _model() -> FlexiViT:
    return FlexiViT(FlexiViTConfig(img_size=16, patch_size=4, base_patch_size=8, base_grid=4, in_chans=1,
                                   num_classes=3, embed_dim=16, depth=2, num_heads=2))


def _group_of(optimizer, param) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("extra", [[], ["optim.layer_decay=0.5"], ["optim.warmup_steps=0"]])
def test_kernel_lr_scale_gives_the_base_kernel_its_own_rate(extra):
    model, twin = _model(), _model()
    optimizer, scheduler = build_optimizer(load_recipe("fashion_mnist", ["optim.kernel_lr_scale=0.25", *extra]), model)
    plain, plain_scheduler = build_optimizer(load_recipe("fashion_mnist", ["optim.kernel_lr_scale=1", *extra]), twin)
    kernel = _group_of(optimizer, model.patch_embed.weight)
    assert kernel["params"] == [model.patch_embed.weight]  # alone in its group
    before = _group_of(plain, twin.patch_embed.weight)
    assert kernel["weight_decay"] == before["weight_decay"]  # everything but the rate is its old group's
    for step in (0, 50, 500):
        scheduler.step_update(step)
        plain_scheduler.step_update(step)
        assert kernel["lr"] == pytest.approx(0.25 * before["lr"])
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(all_params) == len(set(map(id, all_params))) == len(list(model.parameters()))


def test_optimizer_without_scales_is_timms_own():
    from timm.optim import create_optimizer_v2

    model = _model()
    cfg = load_recipe("fashion_mnist", ["optim.kernel_lr_scale=1"])  # the recipe scales its kernel
    ours = build_optimizer(cfg, model)[0]
    timms = create_optimizer_v2(model, opt="adamw", lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    assert [[id(p) for p in g["params"]] for g in ours.param_groups] == \
           [[id(p) for p in g["params"]] for g in timms.param_groups]
    assert [g["weight_decay"] for g in ours.param_groups] == [g["weight_decay"] for g in timms.param_groups]
