"""tools/finetune_drift.py end to end: two tiny fixed-size fine-tunes of a saved model on real Fashion-MNIST
images, through the runner; the result holds each run's validation curve and parameter drift."""

import json
import sys
from pathlib import Path

import pytest
import torch

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.weights import save_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import finetune_drift  # noqa: E402

PREPROCESS = {"image_size": 28, "channels": 1, "crop_pct": 1.0, "mean": [0.5], "std": [0.5],
              "interpolation": "bilinear"}
TINY = ["train.log_every=2", "optim.warmup_steps=1", "data.batch_size=4", "train.token_budget=0",
        "data.eval_limit=40", "data.num_workers=0"]


@pytest.mark.slow
def test_two_learning_rates_give_curves_and_a_drift_that_grows_with_the_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    model = FlexiViT(FlexiViTConfig(img_size=28, patch_size=14, base_patch_size=14, base_grid=2, in_chans=1,
                                    num_classes=10, embed_dim=16, depth=1, num_heads=2, class_token=False,
                                    global_pool="avg"))
    save_model(model, tmp_path / "pre", class_names=[str(i) for i in range(10)], preprocess=PREPROCESS)
    sets = [a for s in TINY for a in ("--set", s)]
    finetune_drift.main(["--pretrained", str(tmp_path / "pre"), "--lr-scales", "0.1", "1", "--steps", "4",
                         "--eval-every", "2", "--out", str(tmp_path / "study"), "--results", str(tmp_path / "r"),
                         *sets])
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["split"] == "val" and [r["scale"] for r in payload["runs"]] == [0.1, 1.0]
    slow, fast = payload["runs"]
    assert fast["lr"] == pytest.approx(10 * slow["lr"])
    assert list(slow["val_by_step"]) == ["2", "4"] and set(slow["val_by_step"]["2"]) == {"2", "4", "7", "14"}
    moved = {r["group"]: r["rel_change"] for r in fast["drift"]}
    assert moved["head"] is None  # a head for the 4 classes replaced the 10-class one
    for a, b in zip(slow["drift"], fast["drift"]):
        if a["rel_change"] is not None and a["group"] != "head":
            assert b["rel_change"] > a["rel_change"] > 0, a["group"]
    assert "Parameter drift" in (tmp_path / "r.md").read_text()
    (trained,) = payload["provenance"]["trained_at"].values()  # both runs, trained by this checkout's code
    assert trained == ["ft-p14-scale0.1", "ft-p14-scale1"] and "runs trained at:" in (tmp_path / "r.md").read_text()
