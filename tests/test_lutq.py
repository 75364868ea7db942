"""LUT-Q weight tying (flexivit.ext.lutq): tied layers, one-iteration re-clustering, packing, storage, export."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.weights import load_model, save_model
from flexivit.eval.export import export_model, load_export
from flexivit.ext.lutq import (
    make_lutq,
    PACKED_KEY, LutqHook, LutqLinear, apply_lutq, cluster_step, fold_lutq, freeze, index_bits, lutq_hooks,
    lutq_layers, nearest_pow2, pack_indices, unpack_indices,
)
from flexivit.ext.scale_invariant import convert_layers

TINY = FlexiViTConfig(img_size=28, patch_size=7, base_patch_size=14, base_grid=4, in_chans=1, num_classes=10,
                      embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="avg")
SIZES = (2, 4, 7, 14)
META = dict(class_names=[str(i) for i in range(10)], preprocess={"image_size": 28, "channels": 1})


def _model(k: int = 4, **fields) -> FlexiViT:
    torch.manual_seed(0)
    return FlexiViT(replace(TINY, lutq_k=k, **fields))


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))  # (B, C, H, W)


def _scale_invariant() -> FlexiViT:
    model = FlexiViT(TINY)
    convert_layers(model, scope="linears")
    return model


def _effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer's forward computes with, read off its Jacobian (exact for a linear map)."""
    return torch.autograd.functional.jacobian(layer, torch.zeros(layer.in_features))  # (out, in)


def _train(model: FlexiViT, steps: int, check=None) -> None:
    """AdamW steps at every patch size with the re-clustering hook; ``check(model)`` after each."""
    hook = LutqHook(layers=lutq_layers(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    model.train()
    for step in range(steps):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        F.cross_entropy(model(x, SIZES[step % len(SIZES)]), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.after_step(model, step + 1)
        if check is not None:
            check(model)
    model.eval()


@pytest.mark.parametrize("pow2", [False, True])
def test_every_weight_is_tied_to_at_most_k_values_after_every_step(pow2):
    model = _model(k=4, lutq_scope="blocks+head", lutq_pow2=pow2)
    start = {n: (l.weight.detach().clone(), l.tied_weight()) for n, l in lutq_layers(model).items()}
    linears = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert set(start) == {f"blocks.{i}.{m}" for i in range(2) for m in linears} | {"head"}

    def check(m: FlexiViT) -> None:
        for name, layer in lutq_layers(m).items():
            w = _effective_weight(layer)
            assert torch.equal(w, layer.values[layer.indices.long()]), name
            assert w.unique().numel() <= 4 and set(w.unique().tolist()) <= set(layer.values.tolist()), name

    _train(model, 6, check)
    for name, layer in lutq_layers(model).items():
        shadow, tied = start[name]
        assert not torch.equal(layer.weight, shadow) and not torch.equal(layer.tied_weight(), tied), name
    assert isinstance(model.patch_embed.weight, nn.Parameter) and model.patch_embed.weight.unique().numel() > 256


@pytest.mark.parametrize("pow2", [False, True])
def test_one_clustering_step_assigns_nearest_then_averages_and_never_increases_the_error(pow2):
    torch.manual_seed(3)
    layer = LutqLinear.from_linear(nn.Linear(24, 16), k=8, pow2=pow2)
    for _ in range(5):
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight) * 0.05)  # an optimizer step
        w, old = layer.weight.detach().double(), layer.values.double().clone()
        before = (w - layer.tied_weight().double()).square().sum()
        cluster_step(layer)
        after = (w - layer.tied_weight().double()).square().sum()
        assert after <= before * (1 + 1e-12)
        idx = layer.indices.long()
        gap = (w[..., None] - old).abs()  # (out, in, K)
        assert torch.equal(gap.gather(-1, idx[..., None])[..., 0], gap.min(-1).values)  # a nearest value
        for j in range(8):
            members = w[idx == j]
            if not members.numel():
                assert layer.values[j] == old[j]  # empty clusters keep their value
            elif pow2:
                powers = torch.tensor([2.0**e for e in range(-30, 4)], dtype=torch.float64)
                candidates = powers * members.mean().sign()
                best = candidates[(candidates - members.mean()).abs().argmin()]
                assert layer.values[j].double() == best
            else:
                assert abs(float(layer.values[j]) - float(members.mean())) <= 1e-6 * abs(float(members.mean()))


def test_pow2_dictionaries_hold_only_signed_powers_of_two_or_zero():
    model = _model(k=8, lutq_pow2=True)
    _train(model, 3)
    for layer in lutq_layers(model).values():
        mantissa, _ = torch.frexp(layer.values)
        assert bool(((mantissa.abs() == 0.5) | (layer.values == 0)).all()), layer.values
    x = torch.tensor([0.0, 1.0, 1.49, 1.51, -3.0, 0.3, -0.74])
    assert nearest_pow2(x).tolist() == [0.0, 1.0, 1.0, 2.0, -2.0, 0.25, -0.5]  # nearest in value; 3 ties down


def test_gradients_reach_the_shadow_as_a_plain_layer_with_the_tied_weight_would_get_them():
    torch.manual_seed(4)
    layer = LutqLinear.from_linear(nn.Linear(12, 6), k=4)
    plain = nn.Linear(12, 6)
    with torch.no_grad():
        plain.weight.copy_(layer.tied_weight())
        plain.bias.copy_(layer.bias)
    x = torch.randn(5, 12)
    layer(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert torch.equal(layer.weight.grad, plain.weight.grad) and torch.equal(layer.bias.grad, plain.bias.grad)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]  # values / indices are buffers
    model = _model()
    model(_images(), 4).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (13, 11), (4, 8)])
def test_packed_indices_unpack_exactly(bits, shape):
    indices = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack_indices(indices, bits)
    n = indices.numel()
    assert packed.dtype == torch.uint8 and packed.shape == (-(-n * bits // 8),)
    assert torch.equal(unpack_indices(packed, bits, shape), indices)


def test_index_widths():
    assert {k: index_bits(k) for k in (2, 3, 4, 5, 16, 17, 256)} == {2: 1, 3: 2, 4: 2, 5: 4, 16: 4, 17: 8, 256: 8}


def test_frozen_and_training_forms_give_identical_logits_at_every_patch_size():
    model = _model(k=4, lutq_scope="blocks+head")
    _train(model, 4)
    frozen = freeze(copy.deepcopy(model))
    layers = lutq_layers(frozen).values()
    assert all(layer.frozen and "weight" not in dict(layer.named_parameters()) for layer in layers)
    x = _images()
    with torch.no_grad():
        for p in SIZES:
            assert torch.equal(frozen(x, p), model(x, p)), p


def test_a_saved_model_reloads_frozen_with_identical_logits_and_a_smaller_file(tmp_path):
    model = _model(k=4)
    _train(model, 4)
    file = save_model(model, tmp_path / "lutq", **META)
    stored = load_file(str(file))
    for name, layer in lutq_layers(model).items():
        assert f"{name}.weight" not in stored and stored[f"{name}.values"].shape == (4,)
        assert stored[f"{name}.{PACKED_KEY}"].dtype == torch.uint8
        assert stored[f"{name}.{PACKED_KEY}"].numel() == -(-layer.weight.numel() // 4)  # 2-bit indices
    assert "blocks.0.attn.qkv.weight" in model.state_dict()  # the training state (Accelerate's) keeps the shadow
    loaded, meta = load_model(file)
    assert meta["config"]["lutq_k"] == 4 and all(l.frozen for l in lutq_layers(loaded).values())
    x = _images()
    with torch.no_grad():
        for p in SIZES:
            assert torch.equal(loaded(x, p), model(x, p)), p
    plain = FlexiViT(TINY)
    plain.load_state_dict(fold_lutq(model))
    dense = save_model(plain, tmp_path / "float", **META)
    assert file.stat().st_size < dense.stat().st_size
    assert set(load_file(str(dense))) == set(plain.state_dict())  # a plain model's file holds its state dict


def test_loading_fits_no_dictionary(tmp_path, monkeypatch):
    """A model file fills every tensor, so loading builds the frozen form without k-means (which cost 42 s for a
    flexi_vit_tiny): no dictionary is fitted and the logits are the saved model's."""
    import flexivit.ext.lutq as lutq_module

    model = _model(k=4)
    _train(model, 2)
    file = save_model(model, tmp_path / "lutq", **META)
    fits = []
    monkeypatch.setattr(lutq_module, "fit_dictionary", lambda layer, *a, **k: fits.append(layer))
    loaded, _ = load_model(file)
    assert fits == [] and all(layer.frozen for layer in lutq_layers(loaded).values())
    x = _images()
    with torch.no_grad():
        for p in SIZES:
            assert torch.equal(loaded(x, p), model(x, p)), p
    FlexiViT(TINY.__class__.from_dict({**TINY.to_dict(), "lutq_k": 4}))  # building to train still fits
    assert fits


def test_to_fixed_and_the_export_are_plain_vits_with_the_lut_q_logits(tmp_path):
    model = _model(k=4, lutq_scope="blocks+head")
    _train(model, 3)
    x = _images()
    with torch.no_grad():
        for p in SIZES:
            fixed = model.to_fixed(p).eval()
            torch.testing.assert_close(fixed(x), model(x, p), rtol=1e-5, atol=1e-5)
    assert fixed.blocks[1].mlp.fc2.weight.unique().numel() <= 4 and type(fixed.head) is nn.Linear
    save_model(model, tmp_path / "run", **META)
    loaded, meta = load_model(tmp_path / "run")
    export_model(loaded, meta, 7, tmp_path / "export")
    exported, _ = load_export(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x, 7), rtol=1e-5, atol=1e-5)


def test_the_option_builds_what_tying_a_plain_model_builds_and_plain_configs_are_as_before():
    assert not any(key.startswith("lutq") for key in FlexiViTConfig().to_dict())
    assert not any(key.startswith("lutq") for key in TINY.to_dict())
    built = _model(k=4, lutq_pow2=True)
    torch.manual_seed(0)
    tied = make_lutq(FlexiViT(TINY), 4, pow2=True)
    assert tied.config == built.config and FlexiViTConfig.from_dict(built.config.to_dict()) == built.config
    assert built.config.to_dict()["lutq_scope"] == "blocks"
    a, b = built.state_dict(), tied.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = _model(lutq_scope="blocks+head")
    head.reset_classifier(3)
    assert isinstance(head.head, LutqLinear) and head.head.out_features == 3


def test_the_hook_reports_the_tying_error_and_keeps_no_state_of_its_own():
    model = _model(k=4)
    hook = LutqHook(layers=lutq_layers(model))
    assert hook.metrics() == {} and hook.state_dict() == {}
    hook.after_step(model, 1)
    weights = [(l.weight.detach(), l.tied_weight()) for l in lutq_layers(model).values()]
    errors = [float((w - tied).norm() / w.norm()) for w, tied in weights]
    assert hook.metrics()["lutq_rel_error"] == pytest.approx(sum(errors) / len(errors), rel=1e-6)
    assert hook.metrics() == {}  # averaged since the last call
    assert [h.name for h in lutq_hooks(model)] == ["lutq"] and lutq_hooks(FlexiViT(TINY)) == []
    assert lutq_hooks(freeze(model)) == []  # a frozen model has nothing to re-cluster


@pytest.mark.parametrize("call, message", [
    (lambda: _model(k=1), "2 <= K <= 256"),
    (lambda: _model(k=257), "2 <= K <= 256"),
    (lambda: FlexiViTConfig(lutq_k=4.5), "2 <= K <= 256"),
    (lambda: apply_lutq(FlexiViT(replace(TINY, embed_dim=4, num_heads=1, mlp_ratio=1.0)), k=16),
     "blocks.0.attn.proj.weight, which has only 16 elements"),
    (lambda: LutqLinear(in_features=2, out_features=2, k=4), "weight, which has only 4 elements"),
    (lambda: apply_lutq(FlexiViT(TINY), k=4, scope="all"), "unknown LUT-Q scope 'all'"),
    (lambda: FlexiViTConfig(lutq_k=4, lutq_scope="head"), "unknown lutq_scope 'head'"),
    (lambda: apply_lutq(_model(), k=4), "has LUT-Q layers already (blocks.0.attn.qkv"),
    (lambda: make_lutq(_model(), 8), "has LUT-Q layers already"),
    (lambda: FlexiViTConfig(lutq_pow2=True), "set lutq_k"),
    (lambda: FlexiViTConfig(lutq_k=4, scale_invariant="linears"), "do not combine"),
    (lambda: apply_lutq(_scale_invariant(), k=4), "not a plain nn.Linear"),
    (lambda: cluster_step(freeze(_model()).blocks[0].mlp.fc1), "frozen"),
    (lambda: LutqHook(layers=lutq_layers(freeze(_model()))), "training-form"),
    (lambda: lutq_hooks(_model(), sharded=True), "FSDP"),
    (lambda: pack_indices(torch.tensor([4], dtype=torch.uint8), 2), "does not fit in 2 bits"),
    (lambda: pack_indices(torch.zeros(3, dtype=torch.uint8), 3), "one of (1, 2, 4, 8) bits"),
    (lambda: unpack_indices(torch.zeros(3, dtype=torch.uint8), 4, (3, 3)), "5 bytes do"),
])
def test_bad_inputs_are_refused_with_a_message(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_a_refused_conversion_converts_nothing():
    model = FlexiViT(replace(TINY, embed_dim=4, num_heads=1, mlp_ratio=1.0))
    with pytest.raises(ValueError):
        apply_lutq(model, k=16)  # qkv (48 elements) would fit; proj (16) does not
    assert lutq_layers(model) == {}


def test_training_resumes_bit_identically_through_the_trainer(tmp_path):
    from test_trainer_golden import make_data

    from flexivit.train.config import load_recipe
    from flexivit.train.loop import train

    source = make_data(tmp_path / "data")
    cfg = load_recipe("fashion_mnist:smoke", [
        f"data.source={source}", "model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.base_patch_size=8",
        "model.base_grid=4", "data.image_size=16", "data.batch_size=8", "data.eval_limit=16", "patch.sizes=4,8",
        "patch.distribution=uniform", "patch.weights=none", "train.steps=8", "train.checkpoint_every=4",
        "train.log_every=4", "train.token_budget=0", "optim.warmup_steps=2"])

    def tie(model: FlexiViT) -> FlexiViT:
        return make_lutq(model, 4)

    class Killed(Exception):
        pass

    def kill(info) -> None:
        if info.step == 6:
            raise Killed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(copy.deepcopy(cfg), out_dir=tmp_path / "straight", init=tie)
        with pytest.raises(Killed):
            train(copy.deepcopy(cfg), out_dir=tmp_path / "killed", init=tie, on_step=kill)
        train(copy.deepcopy(cfg), out_dir=tmp_path / "killed", init=tie, resume=True)
    finally:
        torch.set_num_threads(threads)
    for file in ("model.safetensors", "state/step_8/model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / file)), load_file(str(tmp_path / "killed" / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    state = load_file(str(tmp_path / "killed" / "state/step_8/model.safetensors"))
    assert {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.values", "blocks.0.mlp.fc1.indices"} <= set(state)
    logged = [json.loads(l) for l in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["hooks"]["lutq_rel_error"] > 0 for r in logged if "hooks" in r] == [True, True]
