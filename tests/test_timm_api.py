"""timm's model API on FlexiViT: layer-wise lr decay, gradient checkpointing, intermediates, no-decay names, and
timm-native construction (features_only, pretrained_cfg_overlay=dict(file=...), load_checkpoint)."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import group_parameters, load_checkpoint
from timm.optim import create_optimizer_v2

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.timm_weights import checkpoint_filter_fn
from flexivit.model.variants import VARIANTS, FlexiFeatureGetter
from flexivit.model.weights import CheckpointError, load_model, save_model
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


# ---- timm-native construction: features_only, pretrained_cfg_overlay=dict(file=...), load_checkpoint ----------

# What a Fashion-MNIST run saves: flexi_vit_micro on 1-channel 28 px images, 5 classes, the recipe's kernel resize.
TRAINED = dict(VARIANTS["flexi_vit_micro"], in_chans=1, num_classes=5, kernel_resize="area")
PRE = {"image_size": 28, "channels": 1, "crop_pct": 1.0, "mean": [0.25], "std": [0.75], "interpolation": "bilinear"}
CLASSES = [f"class-{i}" for i in range(5)]


def _randomised(**fields) -> FlexiViT:
    """A trained-looking model: every tensor non-trivial (init zeroes biases and keeps pos_embed tiny)."""
    model = FlexiViT(FlexiViTConfig(**{**TRAINED, **fields})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _by_hand(model: FlexiViT, x: torch.Tensor, patch: int) -> list[torch.Tensor]:
    """Every block's patch tokens as NCHW maps, run block by block (independent of forward_intermediates)."""
    tokens, (gh, gw) = model._embed(x, model.scheme(patch))
    maps = []
    for block in model.blocks:
        tokens = block(tokens)
        maps.append(tokens[:, model.num_prefix_tokens:].transpose(1, 2).reshape(len(x), -1, gh, gw))
    return maps


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same model as a flexivit model file and as a plain state_dict safetensors file."""
    torch.manual_seed(1)
    model = _randomised()
    folder = tmp_path_factory.mktemp("weights")
    model_file = save_model(model, folder / "run", class_names=CLASSES, preprocess=PRE)
    plain = folder / "state_dict.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    return model, model_file, plain


def test_features_only_gives_every_taken_block_at_the_default_and_any_scheme():
    features = timm.create_model("flexi_vit_micro", features_only=True, in_chans=1, out_indices=(0, 1, 3)).eval()
    assert isinstance(features, FlexiFeatureGetter)
    info = features.feature_info
    assert info.module_name() == ["blocks.0", "blocks.1", "blocks.3"] and info.channels() == [64] * 3
    assert info.reduction() == [7] * 3  # the default patch size of flexi_vit_micro
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for patch, maps in ((None, features(x)), (4, features(x, patch_size=4)), (14, features(x, 14))):
            want = _by_hand(features.model, x, patch or 7)
            assert [m.shape[-1] for m in maps] == [28 // (patch or info.reduction()[0])] * 3
            for got, ref in zip(maps, [want[0], want[1], want[3]]):
                torch.testing.assert_close(got, ref)
        overlapping = features(x, patch_size=14, stride=7)
        assert [m.shape for m in overlapping] == [(2, 64, 3, 3)] * 3


def test_features_only_defaults_and_patch_size_override():
    features = timm.create_model("flexi_vit_small", features_only=True, patch_size=8, img_size=32, depth=4)
    assert features.feature_info.reduction() == [8] * 3 and features.feature_info.module_name()[0] == "blocks.1"
    maps = features(torch.randn(1, 3, 32, 32))
    assert [m.shape for m in maps] == [(1, 384, 4, 4)] * 3  # as timm's ViTs: the last three blocks, NCHW
    assert "num_classes" not in features.pretrained_cfg  # timm's feature cfg
    overlay = dict(mean=(0.1,), crop_pct=0.9)  # the caller's overlay wins over the model's own cfg
    overlaid = timm.create_model("flexi_vit_micro", in_chans=1, pretrained_cfg_overlay=overlay)
    assert timm.data.resolve_data_config(model=overlaid) == dict(
        input_size=(1, 28, 28), interpolation="bicubic", mean=(0.1,), std=(0.5,), crop_pct=0.9, crop_mode="center")


def _logits(model, x):
    with torch.no_grad():
        return {p: model(x, p) for p in (4, 7, 14)}


def test_pretrained_cfg_overlay_loads_a_flexivit_model_file(saved):
    _, model_file, _ = saved
    reference, _ = load_model(model_file)
    model = timm.create_model("flexi_vit_micro", pretrained=True, pretrained_cfg_overlay=dict(file=str(model_file)))
    assert model.config == reference.config  # channels, classes and kernel resize come from the file
    x = torch.randn(3, 1, 28, 28)
    for p, want in _logits(reference, x).items():
        torch.testing.assert_close(_logits(model.eval(), x)[p], want, rtol=0, atol=0)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28) and cfg["num_classes"] == 5 and cfg["label_names"] == tuple(CLASSES)
    assert timm.data.resolve_data_config(model=model)["mean"] == (0.25,)  # the file's preprocessing
    by_dir = timm.create_model("flexi_vit_micro", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(model_file.parent)))  # a run directory
    torch.testing.assert_close(by_dir.eval()(x), reference(x))


def test_pretrained_cfg_overlay_loads_a_plain_state_dict(saved):
    source, _, plain = saved
    model = timm.create_model("flexi_vit_micro", pretrained=True, kernel_resize="area",
                              pretrained_cfg_overlay=dict(file=str(plain))).eval()
    assert (model.config.in_chans, model.config.num_classes) == (1, 5)  # read off the tensors' shapes
    x = torch.randn(3, 1, 28, 28)
    for p, want in _logits(source, x).items():
        torch.testing.assert_close(_logits(model, x)[p], want, rtol=0, atol=0)


def test_pretrained_with_other_classes_and_channels_replaces_the_head_and_adapts_the_kernel(saved):
    source, model_file, _ = saved
    model = timm.create_model("flexi_vit_micro", pretrained=True, pretrained_cfg_overlay=dict(file=str(model_file)),
                              num_classes=3, in_chans=3).eval()
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 3)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "patch_embed.weight"))}
    for k, v in body.items():
        assert torch.equal(model.state_dict()[k], v), k
    gray = torch.randn(2, 1, 28, 28)
    with torch.no_grad():  # timm splits the 1-channel kernel over 3 channels: a gray image gives the same tokens
        torch.testing.assert_close(model.forward_features(gray.expand(-1, 3, -1, -1), 4),
                                   source.forward_features(gray, 4), rtol=1e-5, atol=1e-5)
    features = timm.create_model("flexi_vit_micro", pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(model_file)))
    with torch.no_grad():
        torch.testing.assert_close(features(gray, patch_size=4)[-1], _by_hand(source, gray, 4)[-1])


def test_timm_load_checkpoint_and_checkpoint_path(saved):
    source, model_file, plain = saved
    x = torch.randn(2, 1, 28, 28)
    for file in (model_file, plain):
        model = FlexiViT(FlexiViTConfig(**TRAINED)).eval()
        assert not torch.equal(model(x), source(x))
        load_checkpoint(model, str(file))
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
        again = timm.create_model("flexi_vit_micro", in_chans=1, num_classes=5, kernel_resize="area",
                                  checkpoint_path=str(file)).eval()
        torch.testing.assert_close(again(x), source(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"does not fit this FlexiViT: unexpected blocks\.3\.attn"):
        load_checkpoint(FlexiViT(FlexiViTConfig(**{**TRAINED, "depth": 3})), str(plain), filter_fn=checkpoint_filter_fn)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_weight_files_raise_one_line(saved, tmp_path):
    _, model_file, plain = saved

    def create(file, name="flexi_vit_micro", **kw):
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kw)

    with pytest.raises(CheckpointError, match="does not exist") as err:
        create(tmp_path / "missing.safetensors")
    _one_line(err)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
        create(garbage)
    _one_line(err)
    with pytest.raises(CheckpointError, match=r"embed_dim=64 \(the model: 96\)") as err:  # a file of another variant
        create(model_file, embed_dim=96, num_heads=2)
    assert "create_model" in _one_line(err)
    with pytest.raises(CheckpointError, match=r"missing blocks\.4\.\S+, .* and \d+ more") as err:
        create(plain, depth=5)
    _one_line(err)
    with pytest.raises(CheckpointError, match=r"shapes differ: patch_embed\.weight \[64, 1, 14, 14\]") as err:
        create(plain, base_patch_size=7)
    _one_line(err)
    vit = tmp_path / "timm_vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).state_dict(), str(vit))
    with pytest.raises(CheckpointError, match="FlexiViT.from_timm") as err:
        create(vit)
    _one_line(err)
