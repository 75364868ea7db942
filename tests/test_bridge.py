"""Least-squares bridges: exact fits, map choice by patch size, gradients, files, bad input, export."""

import json

import pytest
import timm.optim
import torch
from torch import nn

from flexivit.ext.lutq import make_lutq
from flexivit import FlexiViT, FlexiViTConfig, PatchScheme
from flexivit.ext.bridge import Bridge, block_origins, bridge_fallback, derived_state_dict
from flexivit.ext.bridge_fit import fit_bridge, insert_bridges, record_segment
from flexivit.model.weights import load_model, save_model
from flexivit.cli.main import main
from flexivit.eval.evaluate import evaluate_schemes
from flexivit.eval.export import default_preprocess, export_model

SMALL = dict(img_size=28, patch_size=7, base_patch_size=14, base_grid=7, in_chans=1, num_classes=5,
             embed_dim=32, depth=4, num_heads=2)
SIZES = [2, 4, 7, 14]
ALL_SIZES = [1, 2, 4, 7, 14, 28]  # every size that tiles 28 px: 1 and 28 have no map of their own


def _base() -> FlexiViT:
    return FlexiViT(FlexiViTConfig(**SMALL)).eval()


def _images(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28)  # (B, C, H, W)


def test_fit_recovers_an_exact_affine_map():
    x = torch.randn(300, 16, dtype=torch.float64)
    weight, bias = torch.randn(16, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    weights = torch.rand(300, dtype=torch.float64) + 0.1
    fit = fit_bridge(x, x @ weight + bias, ridge=0.0, weights=weights)
    torch.testing.assert_close(fit.weight, weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fit.bias, bias, rtol=1e-9, atol=1e-9)
    assert fit.residual < 1e-9
    noisy = fit_bridge(x, x @ weight + bias + torch.randn(300, 16, dtype=torch.float64))
    assert 0.01 < noisy.residual < 1


@pytest.mark.parametrize("per_size", [True, False])
def test_lstsq_bridge_reproduces_a_linear_segment(per_size):
    """Blocks 1 and 2 made linear layers: the fitted bridge computes what they did, at every size."""
    base = _base()
    base.blocks[1], base.blocks[2] = nn.Linear(32, 32), nn.Linear(32, 32)
    x = _images()
    derived, residuals = insert_bridges(base, ["1:3"], per_size=per_size, patch_sizes=SIZES, data=x, ridge=0.0)
    assert residuals["1:3"]["pooled"] < 1e-5 and max(residuals["1:3"]["per_size"].values()) < 1e-5
    recorded = record_segment(base, x, start=1, end=3, patch_sizes=[4])[4]
    with torch.no_grad():
        out = derived.blocks[1](recorded.inputs.float().reshape(12, 50, 32))  # (B, N, D)
    torch.testing.assert_close(out.reshape(-1, 32).double(), recorded.outputs, rtol=1e-5, atol=1e-5)
    test = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for p in ALL_SIZES:
            torch.testing.assert_close(derived(test, p), base(test, p), rtol=1e-5, atol=1e-5)
    assert len(derived.blocks) == 3 and torch.equal(derived.blocks[2].mlp.fc1.weight, base.blocks[3].mlp.fc1.weight)


def _marked_bridge(model: FlexiViT) -> Bridge:
    """The model's bridge with every map set to the constant of its size (W = 0, b = size; pooled: -1)."""
    bridge = model.blocks[1]
    with torch.no_grad():
        for size, linear in bridge.maps().items():
            linear.weight.zero_()
            linear.bias.fill_(-1.0 if size is None else float(size))
    return bridge


def test_each_size_runs_its_own_map_and_others_the_pooled_one_flagged():
    model = FlexiViT(FlexiViTConfig(**SMALL, bridges=("1:3",), bridge_sizes=(2, 4, 7, 14)))
    bridge = _marked_bridge(model)
    for p in ALL_SIZES:
        tokens = torch.randn(2, 1 + (28 // p) ** 2, 32)  # (B, N, D): class token + grid
        want = float(p) if p in SIZES else -1.0
        assert torch.equal(bridge(tokens), torch.full_like(tokens, want)), p
        assert bridge_fallback(model, PatchScheme(p), (28, 28)) == (p not in SIZES)
    # (28 - 10) / 3 + 1 = 7 tokens a side, as patch 4: that map runs, but it was not fitted there.
    assert bridge(torch.randn(1, 50, 32)).unique().tolist() == [4.0]
    assert bridge_fallback(model, PatchScheme(10, 3), (28, 28))
    batches = [{"image": _images(4), "label": torch.tensor([0, 1, 2, 3])}]
    rows = evaluate_schemes(model, batches, [PatchScheme(p) for p in (1, 4, 28)], image_hw=(28, 28))
    assert [r.get("bridge_fallback") for r in rows] == [True, None, True]
    pooled_only = FlexiViT(FlexiViTConfig(**SMALL, bridges=("1:3",)))
    assert not any(bridge_fallback(pooled_only, PatchScheme(p), (28, 28)) for p in ALL_SIZES)
    rows = evaluate_schemes(_base(), batches, [PatchScheme(1)], image_hw=(28, 28))
    assert "bridge_fallback" not in rows[0]


@pytest.mark.parametrize("bridge_sizes", [(), (2, 4, 7, 14)])
def test_every_parameter_used_at_a_size_gets_a_gradient(bridge_sizes):
    model = FlexiViT(FlexiViTConfig(**SMALL, bridges=("1:3",), bridge_sizes=bridge_sizes)).train()
    x = _images(3)
    for p in ALL_SIZES:
        model.zero_grad(set_to_none=True)
        model(x, p).sum().backward()
        own = str(p) if p in bridge_sizes else None
        for name, param in model.named_parameters():
            if name.startswith("blocks.1."):  # the bridge: the map of this size runs, no other
                used = name.startswith(f"blocks.1.per_size.{own}.") if own else name.startswith("blocks.1.pooled.")
            else:
                used = True
            got = param.grad is not None and bool(param.grad.abs().sum() > 0)
            assert got == used, f"{name} at patch {p}: gradient {got}, expected {used}"


def test_identity_init_is_dropping_the_blocks():
    base = _base()
    derived, residuals = insert_bridges(base, ["1:3"], per_size=True, patch_sizes=SIZES, init="identity")
    assert residuals == {}
    x = _images(3)
    with torch.no_grad():
        for p in (2, 7, 28):
            tokens, _ = base._embed(x, base.scheme(p))  # (B, N, D)
            tokens = base.blocks[3](base.blocks[0](tokens))
            torch.testing.assert_close(derived(x, p), base.forward_head(base.norm(tokens)), rtol=0, atol=0)


def test_random_init_is_seeded_trunc_normal_with_zero_bias():
    base = _base()

    def weights(seed: int) -> torch.Tensor:
        derived, _ = insert_bridges(base, ["2:4"], per_size=False, init="random", seed=seed)
        assert not derived.blocks[2].pooled.bias.any()
        return derived.blocks[2].pooled.weight.detach()

    first = weights(3)
    assert torch.equal(first, weights(3)) and not torch.equal(first, weights(4))
    assert 0.015 < float(first.std()) < 0.025


def test_save_load_keeps_logits_and_config(tmp_path):
    base = _base()
    derived, _ = insert_bridges(base, ["0:1", "2:4"], per_size=True, patch_sizes=[7, 14], data=_images(20))
    file = save_model(derived, tmp_path, class_names=list("abcde"), preprocess=default_preprocess(derived))
    loaded, meta = load_model(tmp_path)
    assert meta["config"]["bridges"] == ["0:1", "2:4"] and meta["config"]["bridge_sizes"] == [7, 14]
    assert loaded.config == derived.config and "blocks.0.per_size.14.weight" in loaded.state_dict()
    assert json.loads(file.with_suffix(".json").read_text())["config"]["bridges"] == ["0:1", "2:4"]
    x = _images(3)
    with torch.no_grad():
        for p in (2, 7, 14):
            assert torch.equal(loaded(x, p), derived.eval()(x, p))


def test_bridged_then_tied_model_reloads_with_tied_bridge_maps(tmp_path):
    derived, _ = insert_bridges(_base(), ["1:3"], per_size=True, patch_sizes=[7, 14], data=_images(20))
    make_lutq(derived, 4)
    save_model(derived, tmp_path, class_names=list("abcde"), preprocess=default_preprocess(derived))
    loaded, _ = load_model(tmp_path)
    assert type(loaded.blocks[1].per_size["7"]).__name__ == "LutqLinear"
    x = _images(3)
    with torch.no_grad():
        for p in (7, 28):
            assert torch.equal(loaded(x, p), derived.eval()(x, p))


def test_plain_config_has_no_bridge_keys_and_lists_are_read():
    assert not {"bridges", "bridge_sizes"} & set(FlexiViTConfig(**SMALL).to_dict())
    cfg = FlexiViTConfig.from_dict({**SMALL, "bridges": [" 2 : 4", "0:1"], "bridge_sizes": [14, 7]})
    assert cfg.bridges == ("0:1", "2:4") and cfg.bridge_sizes == (7, 14)


@pytest.mark.parametrize("fields, message", [
    (dict(bridges=("x",)), r"bridge spec 'x' is not 'a:b'"),
    (dict(bridges=("1-3",)), r"bridge spec '1-3' is not 'a:b'"),
    (dict(bridges=("2:9",)), r"bridge 2:9 is out of range: the model has 4 blocks, so 0 <= a < b <= 4"),
    (dict(bridges=("-1:2",)), r"bridge -1:2 is out of range"),
    (dict(bridges=("3:3",)), r"bridge 3:3 replaces no block: it needs a < b"),
    (dict(bridges=("1:3", "2:4")), r"bridges 1:3 and 2:4 overlap \(block 2\); merge them into 1:4"),
    (dict(bridges=("0:4",)), r"bridges 0:4 replace all 4 blocks; keep at least one transformer block"),
    (dict(bridges=("0:2", "2:4")), r"bridges 0:2, 2:4 replace all 4 blocks"),
    (dict(bridges="1:3"), r"bridges must be a list of 'a:b' specs"),
    (dict(bridge_sizes=(7,)), r"bridge_sizes apply to bridges only"),
    (dict(bridges=("1:3",), bridge_sizes=(5,)), r"patch size 5 does not tile a 28x28 image.*\(bridge_sizes\)"),
    (dict(bridges=("1:3",), bridge_sizes=(7, 7)), r"repeat a size"),
])
def test_bad_bridge_config_raises_its_message(fields, message):
    with pytest.raises(ValueError, match=message):
        FlexiViTConfig(**SMALL, **fields)


def test_insert_bridges_bad_input():
    base = _base()
    with pytest.raises(ValueError, match=r"bridges 1:3 and 2:4 overlap"):
        insert_bridges(base, ["1:3", "2:4"], per_size=False, init="identity")
    with pytest.raises(ValueError, match=r"unknown bridge init 'zeros'; choose one of lstsq, identity, random"):
        insert_bridges(base, ["1:3"], per_size=False, init="zeros")
    with pytest.raises(ValueError, match=r"init='lstsq' fits the bridges on calibration images: pass data"):
        insert_bridges(base, ["1:3"], per_size=False, patch_sizes=SIZES)
    with pytest.raises(ValueError, match=r"give patch_sizes"):
        insert_bridges(base, ["1:3"], per_size=True, init="identity")
    bridged, _ = insert_bridges(base, ["1:3"], per_size=False, init="identity")
    with pytest.raises(ValueError, match=r"the model has bridges already \(1:3\); bridge its plain base instead"):
        insert_bridges(bridged, ["0:1"], per_size=False, init="identity")
    with pytest.raises(ValueError, match=r"insert the bridges first, then tie the weights"):
        insert_bridges(make_lutq(_base(), 4), ["1:3"], per_size=False, init="identity")
    with pytest.raises(ValueError, match=r"not a one-shot iterator"):
        record_segment(base, iter([_images(2)]), start=0, end=1, patch_sizes=[7])


def test_too_few_calibration_rows_say_how_many_images_are_needed():
    base = _base()
    with pytest.raises(ValueError, match=r"the fit at patch size 14 has 10 token rows but a 32-wide map needs at "
                                         r"least 33 .*give at least 7 calibration images \(5 tokens each\)"):
        insert_bridges(base, ["1:3"], per_size=True, patch_sizes=[2, 14], data=_images(2))
    with pytest.raises(ValueError, match=r"the pooled fit over patch sizes 14, 28 has 7 token rows .*give at least "
                                         r"5 calibration images \(7 tokens each\)"):
        insert_bridges(base, ["1:3"], per_size=False, patch_sizes=[14, 28], data=_images(1))


def test_block_map_and_renamed_state():
    assert block_origins(6, [(1, 3)]) == [0, (1, 3), 3, 4, 5]
    assert block_origins(4, [(0, 1), (2, 4)]) == [(0, 1), 1, (2, 4)]
    state = {"blocks.0.w": 0, "blocks.1.w": 1, "blocks.2.w": 2, "blocks.3.w": 3, "blocks.5.w": 5, "head.w": 9}
    assert derived_state_dict(state, depth=6, spans=[(1, 3)]) == {"blocks.0.w": 0, "blocks.2.w": 3, "blocks.4.w": 5,
                                                                  "head.w": 9}


def test_bridge_counts_as_one_block_for_intermediates_and_layer_decay():
    model = FlexiViT(FlexiViTConfig(**SMALL, bridges=("1:3",), bridge_sizes=(7,)))
    final, taken = model.forward_intermediates(_images(2), patch_size=7)
    assert len(taken) == 3 and taken[1].shape == (2, 32, 4, 4)
    groups = timm.optim.create_optimizer_v2(model, opt="sgd", lr=1.0, layer_decay=0.5).param_groups
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    block0, bridge, block2 = (scale[id(p)] for p in (model.blocks[0].norm1.weight, model.blocks[1].pooled.weight,
                                                      model.blocks[2].norm1.weight))
    assert block0 < bridge < block2 and scale[id(model.blocks[1].per_size["7"].weight)] == bridge


@pytest.fixture(scope="module")
def bridged_file(tmp_path_factory):
    torch.manual_seed(0)
    derived, _ = insert_bridges(_base(), ["1:3"], per_size=True, patch_sizes=SIZES, data=_images())
    folder = tmp_path_factory.mktemp("bridged")
    save_model(derived, folder, class_names=list("abcde"), preprocess=default_preprocess(derived))
    return folder


def test_timm_export_of_a_bridged_model_is_refused_naming_the_flags(bridged_file, tmp_path, capsys):
    model, _ = load_model(bridged_file)
    assert not model.is_plain_vit() and model.non_plain_parts() == ["bridges 1:3"] and _base().is_plain_vit()
    with pytest.raises(ValueError, match=r"bridges 1:3.*`flexivit export --onnx` or `--torch-export`"):
        model.to_fixed(7)
    assert main(["export", str(bridged_file), "--patch-size", "7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bridges 1:3" in err and "--onnx" in err and "--torch-export" in err
    assert not (tmp_path / "x").exists()


def test_torch_export_of_a_bridged_model_round_trips_logits(bridged_file, tmp_path, capsys):
    out = tmp_path / "p7"
    assert main(["export", str(bridged_file), "--patch-size", "7", "--out", str(out), "--torch-export"]) == 0
    assert "not a timm model" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.pt2"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "flexivit-program-export-v1" and "bridges 1:3" in cfg["model"]
    assert cfg["patch_size"] == 7 and cfg["inputs"]["image"] == ["batch", 1, 28, 28] and "model_args" not in cfg
    assert cfg["verification"]["max_abs_diff"]["model.pt2"] <= 1e-5 and cfg["class_names"] == list("abcde")
    model, _ = load_model(bridged_file)
    program = torch.export.load(str(out / "model.pt2")).module()
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ONNX export and onnx's reference evaluator take ~10 s on a small CPU
def test_onnx_export_of_a_bridged_model_is_checked(bridged_file, tmp_path):
    model, meta = load_model(bridged_file)
    result = export_model(model, meta, 14, tmp_path / "onnx", onnx=True)
    assert sorted(result.files) == ["config.json", "model.onnx"] and result.max_abs_diff["model.onnx"] <= 1e-5
