"""The optimizer's parameter groups: weight decay, layer decay and per-parameter learning-rate scales."""

import pytest
import torch

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.train.config import load_recipe
from flexivit.train.optim import build_optimizer


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


def _graph_model(graph: str | None) -> FlexiViT:
    return FlexiViT(FlexiViTConfig(img_size=16, patch_size=4, base_patch_size=8, base_grid=4, in_chans=1,
                                   num_classes=3, embed_dim=16, depth=2, num_heads=2, graph=graph))


def test_graph_lr_scale_gives_the_connection_logits_their_own_rate():
    model, twin = _graph_model("0-1,0-2,1-2,1-h,2-h"), _graph_model("0-1,0-2,1-2,1-h,2-h")
    optimizer, scheduler = build_optimizer(load_recipe("fashion_mnist", ["optim.graph_lr_scale=40"]), model)
    plain, plain_scheduler = build_optimizer(load_recipe("fashion_mnist", ["optim.graph_lr_scale=1"]), twin)
    logits = _group_of(optimizer, model.blocks.edge_logits)
    assert logits["params"] == [model.blocks.edge_logits] and logits["weight_decay"] == 0.0  # a 1-D parameter
    for step in (0, 50, 500):
        scheduler.step_update(step)
        plain_scheduler.step_update(step)
        assert logits["lr"] == pytest.approx(40 * _group_of(plain, twin.blocks.edge_logits)["lr"])
    # Everything else keeps its rate, and a model without logits (the chain) builds with the scale set.
    assert _group_of(optimizer, model.head.weight)["lr"] == _group_of(plain, twin.head.weight)["lr"]
    chain = _graph_model(None)
    build_optimizer(load_recipe("fashion_mnist", ["optim.graph_lr_scale=40"]), chain)


def test_connection_weights_move_in_proportion_to_graph_lr_scale():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
    moved = {}
    for scale in (1.0, 30.0):
        torch.manual_seed(1)
        model = _graph_model("0-1,0-2,1-2,1-h,2-h")
        cfg = load_recipe("fashion_mnist", [f"optim.graph_lr_scale={scale}", "optim.warmup_steps=0"])
        optimizer = build_optimizer(cfg, model)[0]
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        moved[scale] = model.blocks.edge_logits.detach().abs().max().item()
    # Adam's first steps move a parameter by about its rate: 30x the rate, about 30x the distance.
    assert 15 < moved[30.0] / moved[1.0] < 45
