"""tools/bench_per_image.py end to end in its smoke mode: both arms step, images are counted as the run's
builders plan them, and the result files carry their provenance. No speed thresholds (shared machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexivit.train.builders import build_model, build_sampler, build_step_batches
from flexivit.train.config import load_recipe
from flexivit.train.step_batches import loader_batches

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess importing torch: 5-25 s on 2 shared cores
def test_bench_per_image_smoke_counts_each_arms_images_and_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_per_image.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench_per_image.py --smoke failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads((tmp_path / "bench_per_image.json").read_text())
    assert result["seeds"] == [] and "split" in result and "provenance" in result
    sets = ["model.depth=1", "model.embed_dim=32"]
    per_step = load_recipe("fashion_mnist", sets)
    per_image = load_recipe("fashion_mnist", [*sets, "patch.per_image=true"])
    model = build_model(per_step, channels=1, num_classes=10)
    packed = build_step_batches(per_image, build_sampler(per_image), model, rank=0, ranks=1)
    probs = build_sampler(per_step).probs(0).tolist()
    for measured in result["rounds"]:  # every round: one step per size, and the per-image plans 0 and 1
        counts = {str(s.patch): 16 * loader_batches(s, (28, 28), 16, per_step.train.token_budget) for s in build_sampler(per_step).schemes}
        assert {p: m["images"] for p, m in measured["sizes"].items()} == counts
        assert measured["per step"]["images"] == pytest.approx(sum(q * n for q, n in zip(probs, counts.values())))
        assert measured["per image"]["images"] == sum(packed.plan(s, 0).num_images for s in (0, 1))
        assert all(measured[a]["wall_s"] > 0 for a in ("per step", "per image"))
    assert set(result["ratio_per_image_over_per_step"]) == {"wall_s", "cpu_s"}
    assert "## How this file was made" in (tmp_path / "bench_per_image.md").read_text()
