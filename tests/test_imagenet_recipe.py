"""The `imagenet` recipe end to end on a generated stand-in of 224-px JPEGs, 4 classes, as an image folder
(train/val/test folders) and as a WebDataset shard set (`train-*.tar`, `validation-*.tar`, streamed): train
on two CPU ranks through `accelerate launch`, resume from a mid-run checkpoint, `flexivit eval`,
`flexivit export`.

The run is `imagenet:smoke` (the S card's data path: 240-px random-resized crop, RandAugment, mixup 0.2, label
smoothing, bf16 autocast, 2 loader workers, patch sizes 8..48, batch 8 per rank, 8 steps) with one change
for CPU time: the model is 64 wide, 2 deep, 2 heads (`model.embed_dim/depth/num_heads`) instead of ViT-S.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from flexivit.model.weights import load_model
from flexivit.train.config import load_recipe
from flexivit.data.standin import write_imagenet_standin, write_imagenet_standin_shards
from test_train import ROOT, _env, _sets

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
SMALL = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2"]


def _run(args: list[str], tmp: Path, ranks: bool = False) -> subprocess.CompletedProcess:
    env = {**_env(), "HF_DATASETS_CACHE": str(tmp / "hf"), **({"ACCELERATE_USE_CPU": "1"} if ranks else {})}
    cmd = [*LAUNCH, "-m", "flexivit", *args] if ranks else [sys.executable, "-m", "flexivit", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_imagenet_recipe_trains_resumes_evaluates_and_exports(tmp_path, layout):
    data = tmp_path / "imagenet"
    if layout == "folder":
        assert write_imagenet_standin(data) == {"train": 32, "val": 8, "test": 8}
        source = str(data)
    else:  # 6 train shards of 8 (one held out for validation: val_fraction 0.01 of 6 shards rounds up to 1)
        assert write_imagenet_standin_shards(data) == {"train": 48, "validation": 8}
        source = f"wds:{data}"
    cfg = load_recipe("imagenet:smoke", SMALL)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train = ["train", "imagenet:smoke", "--data", source, *_sets(SMALL)]

    _run([*train, "--out", str(straight)], tmp_path, ranks=True)
    windows = [r for r in _log(straight) if "per_patch" in r]
    assert [r["step"] for r in windows] == [2, 4, 6, 8]
    assert {int(p) for r in windows for p in r["per_patch"]} <= set(cfg.patch.sizes)
    report = json.loads((straight / "eval.json").read_text())
    assert report["images_seen"] == 8 * 8 * 2  # 8 steps x 8 images x 2 ranks
    assert [r["patch_size"] for r in report["results"]] == cfg.patch.eval_sizes
    assert {r["n"] for r in report["results"]} == {8} and {r["n"] for r in report["val"]} == {8}  # 8 images each
    saved = json.loads((straight / "config.json").read_text())
    assert (saved["data"]["randaugment"], saved["data"]["mixup"], saved["train"]["mixed_precision"]) == (
        "rand-m9-mstd0.5", 0.2, "bf16")

    # An interrupted run: the state a run stopped after step 4's checkpoint leaves behind; it resumes from there
    # on two ranks and must end where the uninterrupted run ended, bit for bit.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "state" / "step_8")
    for name in ("model.safetensors", "model.json", "eval.json", "eval.md"):
        (resumed / name).unlink()
    out = _run([*train, "--out", str(resumed), "--resume"], tmp_path, ranks=True)
    assert f"resumed from {resumed / 'state' / 'step_4'} (step 4)" in out.stdout + out.stderr
    assert [r["step"] for r in _log(resumed) if "per_patch" in r] == [2, 4, 6, 8]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # flexivit eval (one process, fp32) scores the same test folder as the trainer's own report (two ranks, bf16).
    _run(["eval", str(resumed), "--out", str(tmp_path / "eval"), "--device", "cpu", "--batch-size", "8",
          "--repeats", "2", "--no-progress"], tmp_path)
    swept = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert swept["split"] == "test" and swept["n"] == 8
    trained = {r["patch_size"]: r for r in json.loads((resumed / "eval.json").read_text())["results"]}
    for row in swept["results"]:
        assert row["loss"] == pytest.approx(trained[row["patch_size"]]["loss"], abs=0.02)
        assert abs(row["top1"] - trained[row["patch_size"]]["top1"]) <= 1 / 8

    # flexivit export: a plain timm ViT at patch 16, loaded with timm alone, gives the FlexiViT's logits.
    _run(["export", str(resumed), "--patch-size", "16", "--out", str(tmp_path / "export")], tmp_path)
    args = json.loads((tmp_path / "export" / "config.json").read_text())["model_args"]
    assert (args["patch_size"], args["img_size"], args["num_classes"]) == (16, 240, 4)
    vit = VisionTransformer(**args).eval()
    vit.load_state_dict(load_file(str(tmp_path / "export" / "model.safetensors")))
    flexi, _ = load_model(resumed)
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), flexi(x, 16), atol=1e-5, rtol=0)
