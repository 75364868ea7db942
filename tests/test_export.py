"""Export at one patch size: a timm ViT that loads without flexivit, checked before anything is written."""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from flexivit import FlexiViT
from flexivit.eval import export as export_module
from flexivit.model.weights import load_model
from flexivit.cli.main import main
from flexivit.eval.export import ExportError, export_checkpoint, load_export
from tiny_run import CLASSES, PREPROCESS, make_run, subprocess_env

# Runs in a fresh interpreter: loads the export the two ways docs/deploy.md shows, never importing flexivit.
TIMM_ONLY = textwrap.dedent(
    """
    import json, sys
    import safetensors.torch, timm, torch
    from timm.models.vision_transformer import VisionTransformer

    folder, inputs, out = sys.argv[1:]
    cfg = json.load(open(f"{folder}/config.json"))
    model = VisionTransformer(**cfg["model_args"])
    model.load_state_dict(safetensors.torch.load_file(f"{folder}/model.safetensors"))
    model.eval()
    by_create = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = safetensors.torch.load_file(inputs)["x"]
    with torch.no_grad():
        logits = {"direct": model(x), "create_model": by_create(x)}
    assert not any(name.split(".")[0] == "flexivit" for name in sys.modules), "flexivit was imported"
    safetensors.torch.save_file(logits, out)
    print(cfg["class_names"][0], cfg["preprocess"]["image_size"], by_create.pretrained_cfg["input_size"])
    """
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "p4"
    assert main(["export", str(run), "--patch-size", "4", "--out", str(out), "--torch-export"]) == 0
    return out


def test_export_writes_config_weights_and_program(exported):
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.pt2", "model.safetensors"]
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["patch_size"] == 4 and cfg["model_args"]["patch_size"] == 4 and cfg["model_args"]["img_size"] == 16
    assert cfg["class_names"] == CLASSES and cfg["preprocess"] == PREPROCESS
    assert cfg["pretrained_cfg"]["input_size"] == [1, 16, 16]
    assert cfg["verification"]["max_abs_diff"]["model.safetensors"] <= 1e-5


def test_exported_model_loads_with_timm_alone_and_matches(run, exported, tmp_path):
    model, _ = load_model(run)
    x = torch.randn(5, 1, 16, 16)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = tmp_path / "load_with_timm.py"
    script.write_text(TIMM_ONLY)
    result = subprocess.run([sys.executable, str(script), str(exported), str(tmp_path / "x.safetensors"),
                             str(tmp_path / "logits.safetensors")], capture_output=True, text=True,
                            env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:2] == ["cell-0", "16"]
    from safetensors.torch import load_file

    logits = load_file(str(tmp_path / "logits.safetensors"))
    with torch.no_grad():
        want = model(x, 4)
    torch.testing.assert_close(logits["direct"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["create_model"], want, rtol=1e-5, atol=1e-5)


def test_torch_export_program_matches_at_other_batch_sizes(run, exported):
    model, _ = load_model(run)
    program = torch.export.load(str(exported / "model.pt2")).module()
    for batch in (1, 7):
        x = torch.randn(batch, 1, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x, 4), rtol=1e-5, atol=1e-5)


def test_export_refuses_to_write_when_logits_differ(run, tmp_path, monkeypatch):
    real = FlexiViT.to_fixed

    def off_by_a_bit(self, patch_size=None, **kw):
        vit = real(self, patch_size, **kw)
        with torch.no_grad():
            vit.head.bias.add_(1e-3)
        return vit

    monkeypatch.setattr(FlexiViT, "to_fixed", off_by_a_bit)
    out = tmp_path / "bad"
    with pytest.raises(ExportError, match="logits differ.*nothing was written"):
        export_checkpoint(run, 4, out)
    assert not out.exists() and not list(tmp_path.iterdir())  # not even a temporary folder is left


def test_export_bad_input(run, tmp_path, capsys, monkeypatch):
    assert main(["export", str(run), "--patch-size", "3", "--out", str(tmp_path / "x")]) == 2
    assert "valid patch sizes: 1, 2, 4, 8, 16" in capsys.readouterr().err
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"\0" * 64)
    assert main(["export", str(bogus), "--patch-size", "4", "--out", str(tmp_path / "y")]) == 2
    assert "not a readable safetensors model file" in capsys.readouterr().err
    monkeypatch.setattr(export_module, "_missing", lambda *modules: list(modules))
    assert main(["export", str(run), "--patch-size", "4", "--out", str(tmp_path / "z"), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "--onnx needs the onnx and onnxscript" in err and "pip install onnx onnxscript" in err
    assert not (tmp_path / "z").exists()


def test_evaluating_an_export_runs_its_one_size(run, exported, tmp_path):
    data = json.loads((run / "config.json").read_text())["data"]["source"]
    assert main(["eval", str(exported), "--data", data, "--out", str(tmp_path), "--no-progress", "--batch-size",
                 "4", "--warmup", "0", "--repeats", "1"]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["patch_size"] for r in rows] == [4] and rows[0]["top1"] > 0.9


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnx") is None,
                    reason="ONNX export needs the onnx and onnxscript packages")
def test_onnx_export_is_checked(run, tmp_path):
    result = export_checkpoint(run, 8, tmp_path / "onnx", onnx=True)
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert result.max_abs_diff["model.onnx"] <= 1e-5
    vit, cfg = load_export(tmp_path / "onnx")
    assert cfg["patch_size"] == 8 and vit.patch_embed.patch_size == (8, 8)
