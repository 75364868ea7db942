"""`flexivit compress`: deriving a compact model from a trained one, its checks, and the CLI end to end."""

import json

import pytest
import torch

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.weights import load_model, save_model
from flexivit.ext.compress import check_compress, derive
from flexivit.ext.bridge import CompressConfig
from flexivit.ext.lutq import lutq_layers

from test_distill_e2e import _cli, _top1

SIZES = [2, 4, 7, 14]


def _base(**overrides) -> FlexiViT:
    torch.manual_seed(0)
    fields = dict(img_size=28, patch_size=7, base_patch_size=14, base_grid=7, in_chans=1, num_classes=5,
                  embed_dim=32, depth=4, num_heads=2)
    return FlexiViT(FlexiViTConfig(**{**fields, **overrides})).eval()


def _images(n: int = 48) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)


@pytest.mark.parametrize("settings, message", [
    ({}, "needs something to do"),
    ({"bridges": ["2-4"]}, "2-4"),
    ({"bridges": ["1:3", "2:4"]}, "overlap"),
    ({"bridges": ["0:4"]}, "replace all 4 blocks"),
    ({"bridges": ["3:3"]}, "3:3"),
    ({"bridges": ["2:9"]}, "range"),
    ({"bridges": ["2:4"], "bridge_init": "zeros"}, "bridge_init"),
    ({"lutq_k": 1}, "2"),
    ({"lutq_k": 300}, "256"),
    ({"lutq_k": 4, "lutq_scope": "all"}, "lutq_scope"),
    ({"lutq_k": 4, "calib_images": 0}, "calib_images"),
    ({"lutq_k": 4, "targets": "teacher"}, "compress.targets"),
])
def test_bad_settings_are_refused_before_any_work(settings, message):
    with pytest.raises(ValueError, match=message):
        check_compress(CompressConfig(**settings), depth=4)


def test_derived_model_is_smaller_tied_and_leaves_the_base_alone():
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    settings = CompressConfig(bridges=["2:4"], lutq_k=4)
    derived, residuals = derive(base, settings, patch_sizes=SIZES, calibration=_images())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # the base is not touched
    assert not lutq_layers(base) and base.config.lutq_k is None
    assert derived.config.bridges == ("2:4",) and derived.config.lutq_k == 4 and len(derived.blocks) == 3
    assert set(residuals["2:4"]["per_size"]) == {str(p) for p in SIZES}
    for name, layer in lutq_layers(derived).items():
        assert layer.tied_weight().unique().numel() <= 4, name
    # Blocks before the bridge are the base's, tied: each tied weight is the nearest of 4 values to it.
    tied = derived.blocks[0].attn.qkv
    assert torch.equal(tied.weight.detach(), base.blocks[0].attn.qkv.weight)
    nearest = (tied.weight.detach()[..., None] - tied.values).abs().argmin(-1)
    assert torch.equal(tied.values[nearest], tied.tied_weight().detach())


def test_derived_config_reads_back_from_json_unchanged():
    derived, _ = derive(_base(), CompressConfig(bridges=["2:4"], lutq_k=4), patch_sizes=SIZES, calibration=_images())
    # A resumed run compares the config saved as JSON with the rebuilt one: tuples must not differ from lists.
    assert json.loads(json.dumps(derived.config.to_dict())) == derived.config.to_dict()
    assert FlexiViTConfig.from_dict(json.loads(json.dumps(derived.config.to_dict()))) == derived.config


def test_lutq_only_copies_the_base_and_runs_at_every_size():
    base = _base()
    derived, residuals = derive(base, CompressConfig(lutq_k=16), patch_sizes=SIZES)
    assert residuals == {} and len(derived.blocks) == 4 and not lutq_layers(base)
    # The derived model is the base with each tied tensor replaced by its 16-value version, nothing else.
    swapped = {k: v.clone() for k, v in base.state_dict().items()}
    for name, layer in lutq_layers(derived).items():
        swapped[f"{name}.weight"] = layer.tied_weight().detach()
        error = (layer.tied_weight() - base.get_submodule(name).weight).norm() / base.get_submodule(name).weight.norm()
        assert error < 0.12, name  # optimal 16-level quantiser of a Gaussian: 0.0975 relative error
    reference = FlexiViT(base.config)
    reference.load_state_dict(swapped)
    x = _images(4)
    for p in SIZES:
        torch.testing.assert_close(derived.eval()(x, p), reference.eval()(x, p), atol=1e-6, rtol=1e-5)


def test_scale_invariant_base_is_folded_first():
    base = _base(scale_invariant="linears")
    derived, _ = derive(base, CompressConfig(bridges=["3:4"], bridge_init="identity"), patch_sizes=SIZES)
    assert derived.config.scale_invariant == "none"
    x = _images(2)
    # An identity bridge over the last block is the base without it.
    plain = FlexiViT(FlexiViTConfig.from_dict({**base.config.to_dict(), "scale_invariant": "none", "si_norm": "matrix",
                                               "si_head_scale": None}))
    from flexivit.ext.scale_invariant import fold_state_dict

    plain.load_state_dict(fold_state_dict(base))
    plain.blocks = plain.blocks[:3]
    torch.testing.assert_close(derived.eval()(x, 7), plain.eval()(x, 7))


def test_compressed_base_is_refused(tmp_path):
    derived, _ = derive(_base(), CompressConfig(lutq_k=4), patch_sizes=SIZES)
    save_model(derived, tmp_path, class_names=list("abcde"), preprocess={})
    compressed, _ = load_model(tmp_path)
    with pytest.raises(ValueError, match="compressed already"):
        derive(compressed, CompressConfig(lutq_k=4), patch_sizes=SIZES)


def test_cli_refuses_a_base_that_is_not_a_flexivit(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a model")
    done = _cli("compress", str(tmp_path), "fashion_mnist_compress:smoke", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "FlexiViT run directory or model file" in done.stderr


@pytest.mark.slow
def test_compress_smoke_eval_export(tmp_path):
    base, derived = tmp_path / "base", tmp_path / "derived"
    done = _cli("train", "fashion_mnist:smoke", "--out", str(base), "--set", "train.steps=60",
                "--set", "train.checkpoint_every=60")
    assert done.returncode == 0, done.stderr[-3000:]
    done = _cli("compress", str(base), "fashion_mnist_compress:smoke", "--out", str(derived))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((derived / "compress.json").read_text())
    assert report["file_ratio"] > 4 and all(r < 0.8 for r in report["gflops_ratio"].values())
    assert set(report["derived_model"]["distinct_values"].values()) <= {1, 2, 3, 4}
    assert sorted(_top1(derived)) == SIZES
    assert json.loads((derived / "config.json").read_text())["distill"]["teacher"] == str(base)

    done = _cli("eval", str(derived), "--patch-sizes", "all", "--limit", "200", "--out", str(tmp_path / "sweep"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = _cli("export", str(derived), "--patch-size", "7", "--out", str(tmp_path / "timm"))
    assert done.returncode == 2 and "--torch-export" in done.stderr  # a bridged model is not a timm ViT
    done = _cli("export", str(derived), "--patch-size", "7", "--torch-export", "--out", str(tmp_path / "prog"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "prog" / "model.pt2").is_file()

    done = _cli("compress", str(base), "fashion_mnist_compress:smoke", "--out", str(derived), "--resume",
                "--set", "train.steps=30")  # a longer run continues from the saved state
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    done = _cli("compress", str(derived), "fashion_mnist_compress:smoke", "--out", str(tmp_path / "again"))
    assert done.returncode == 2 and "compressed already" in done.stderr


def test_too_few_calibration_images_say_how_many_are_needed():
    with pytest.raises(ValueError, match=r"give at least \d+ calibration images"):
        derive(_base(), CompressConfig(bridges=["2:4"]), patch_sizes=SIZES, calibration=_images(2))


def test_a_compressed_model_fine_tunes_as_its_dense_weights(tmp_path):
    from flexivit.train.finetune import from_pretrained

    derived, _ = derive(_base(), CompressConfig(bridges=["3:4"], bridge_init="identity", lutq_k=4), patch_sizes=SIZES)
    save_model(derived, tmp_path, class_names=list("abcde"), preprocess={})
    compressed, _ = load_model(tmp_path)
    fresh = FlexiViT(FlexiViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=32, depth=4,
                                    num_heads=2))
    tuned = from_pretrained(compressed, fresh).eval()
    assert tuned.config.lutq_k is None and tuned.config.bridges == ("3:4",) and not lutq_layers(tuned)
    x = _images(2)
    for p in SIZES:  # the same features: only the head is new
        torch.testing.assert_close(tuned.forward_features(x, p), compressed.forward_features(x, p))
