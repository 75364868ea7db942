"""timm's model API on FlexiViT: layer-wise lr decay, gradient checkpointing, intermediates, no-decay names."""

import pytest
import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.train.config import Config
from flexivit.train.optim import build_optimizer

SMALL = dict(img_size=28, patch_size=7, base_patch_size=14, base_grid=7, in_chans=1, num_classes=5,
             embed_dim=32, depth=3, num_heads=2)


def _model(**kw) -> FlexiViT:
    return FlexiViT(FlexiViTConfig(**{**SMALL, **kw}))


def _scales(optimizer: torch.optim.Optimizer, model: FlexiViT) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("posemb", ["learn", "factorized"])
def test_layer_decay_gives_each_block_its_own_decreasing_lr_scale(posemb):
    model = _model(posemb=posemb)
    scales = _scales(create_optimizer_v2(model, opt="adamw", lr=1e-3, layer_decay=0.75), model)
    assert len(scales) == len(list(model.parameters()))  # every parameter is in a group
    depth = model.config.depth
    for i in range(depth):
        block = {v for k, v in scales.items() if k.startswith(f"blocks.{i}.")}
        assert block == {0.75 ** (depth - i)}, f"block {i}"  # powers of 0.75 are exact in binary
    stem = [k for k in scales if not k.startswith(("blocks.", "norm.", "fc_norm.", "head."))]
    assert set(stem) == {"patch_embed.weight", "patch_embed.bias", "cls_token"} | set(model.no_weight_decay())
    assert {scales[k] for k in stem} == {0.75 ** (depth + 1)}  # the stem decays most
    assert scales["head.weight"] == 1.0 and scales["norm.weight"] == 0.75  # as timm: norm with the last block


def test_no_weight_decay_names_existing_parameters_and_the_optimizer_honours_them():
    for posemb in ("learn", "factorized"):
        model = _model(posemb=posemb)
        names = model.no_weight_decay()
        assert names and names <= dict(model.named_parameters()).keys()
        optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
        param_names = {id(p): n for n, p in model.named_parameters()}
        decayed = {param_names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert not decayed & names and "patch_embed.weight" in decayed


def test_group_matcher_orders_stem_blocks_then_norm():
    model = _model()
    groups = group_parameters(model, model.group_matcher(), reverse=True)  # parameter name -> layer id
    assert groups["cls_token"] == groups["pos_embed"] == groups["patch_embed.weight"] == 0
    assert [groups[f"blocks.{i}.attn.qkv.weight"] for i in range(3)] == [1, 2, 3]
    assert groups["norm.weight"] == 3 and groups["head.weight"] == 4  # timm's ViT groups them the same way


def test_build_optimizer_uses_layer_decay_from_the_config():
    model = _model()
    cfg = Config()
    plain, _ = build_optimizer(cfg, model)
    assert all("lr_scale" not in g for g in plain.param_groups)
    cfg.optim.layer_decay = 0.5
    optimizer, scheduler = build_optimizer(cfg, model)
    scales = _scales(optimizer, model)
    assert scales["blocks.0.mlp.fc1.weight"] == pytest.approx(0.5**3) and scales["head.weight"] == 1.0
    for step in (0, cfg.optim.warmup_steps, cfg.train.steps // 2):  # the schedule scales every group alike
        scheduler.step_update(step)
        base = [g["lr"] / g["lr_scale"] for g in optimizer.param_groups]
        assert base == pytest.approx([base[0]] * len(base)) and 0 < base[0] <= cfg.optim.lr


def _grads(model: FlexiViT, x: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout and drop-path masks in both runs
    model(x, patch).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("patch", [4, 14])
def test_grad_checkpointing_gives_the_same_gradients(patch):
    model = _model(drop_path_rate=0.2, drop_rate=0.1).train()
    x = torch.randn(2, 1, 28, 28)
    reference = _grads(model, x, patch)
    calls = []  # block forwards (module hooks do not fire when checkpointing recomputes)
    for block in model.blocks:
        block.forward = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(block.forward)
    model.set_grad_checkpointing()
    checkpointed = _grads(model, x, patch)
    assert len(calls) == 2 * len(model.blocks)  # each block ran again in the backward pass
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    model.set_grad_checkpointing(False)
    calls.clear()
    _grads(model, x, patch)
    assert len(calls) == len(model.blocks)


@pytest.mark.parametrize("variant", [dict(), dict(class_token=False, global_pool="avg")])
@pytest.mark.parametrize("patch,stride", [(4, None), (7, 3)])
def test_forward_intermediates(variant, patch, stride):
    model = _model(**variant).eval()
    x = torch.randn(2, 1, 28, 28)
    n = model.num_prefix_tokens
    g = (28 - patch) // (stride or patch) + 1
    kw = dict(patch_size=patch, stride=stride)
    with torch.no_grad():
        feats = model.forward_features(x, patch, stride)
        tokens, _ = model._embed(x, model.scheme(patch, stride))  # (B, prefix + N, D)
        by_hand = []
        for block in model.blocks:
            tokens = block(tokens)
            by_hand.append(tokens)
        final, maps = model.forward_intermediates(x, **kw)
        torch.testing.assert_close(final, feats)
        assert [m.shape for m in maps] == [(2, 32, g, g)] * 3  # NCHW, every block
        nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, **kw)
        for i, (m, t) in enumerate(zip(nlc, by_hand)):
            torch.testing.assert_close(m, t[:, n:], msg=f"block {i}")
            torch.testing.assert_close(maps[i], m.transpose(1, 2).reshape(2, 32, g, g))  # row-major token grid
        normed = model.forward_intermediates(x, norm=True, output_fmt="NLC", intermediates_only=True, **kw)
        torch.testing.assert_close(normed[-1], feats[:, n:])  # the last block, normed: forward_features
        picked = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True, **kw)
        last_two = model.forward_intermediates(x, indices=2, output_fmt="NLC", stop_early=True,
                                               intermediates_only=True, **kw)
        for got, want in ((picked, [nlc[0], nlc[2]]), (last_two, nlc[1:])):
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        pairs = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True, **kw)
        if n:
            torch.testing.assert_close(pairs[1][1], by_hand[1][:, :n])  # (B, 1, D): the class token
        else:
            assert all(torch.equal(a, b) for a, b in zip(pairs, nlc))  # no prefix tokens: plain maps
    with pytest.raises(ValueError, match="'NCHW' or 'NLC'"):
        model.forward_intermediates(x, output_fmt="NHWC")
