"""tools/per_image_study.py and tools/patch14_study.py: the equal-image arithmetic, the runs they plan, and
their reports' means over seeds, on run folders written here (no training)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from flexivit.train.builders import build_model, build_sampler, build_step_batches
from flexivit.train.config import load_recipe
from flexivit.train.step_batches import loader_batches

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import patch14_study  # noqa: E402
import per_image_study  # noqa: E402


def test_the_per_image_arm_runs_just_enough_steps_for_the_per_step_arms_images():
    target, steps, images = per_image_study.equal_image_steps(1)
    cfg = load_recipe("fashion_mnist", ["data.num_workers=0", "train.seed=1"])
    sampler = build_sampler(cfg)
    by_hand = sum(16 * loader_batches(sampler.at(s), (28, 28), 16, 16 * 196) for s in range(cfg.train.steps))
    assert target == by_hand
    packed = load_recipe("fashion_mnist", ["data.num_workers=0", "train.seed=1", "patch.per_image=true"])
    batches = build_step_batches(packed, build_sampler(packed), build_model(packed, channels=1, num_classes=10),
                                 rank=0, ranks=1)
    assert images == batches.consumed(steps) >= target > batches.consumed(steps - 1)
    names = [s.name for s in per_image_study.specs([1])]
    assert names == ["per-step/seed1", "per-image/seed1"]
    assert f"train.steps={steps}" in per_image_study.specs([1])[1].sets


def _finished(run: Path, val: dict[int, float], test: dict[int, float], images: int) -> None:
    run.mkdir(parents=True)
    rows = lambda acc: [{"patch_size": p, "top1": a / 100} for p, a in acc.items()]  # noqa: E731
    (run / "eval.json").write_text(json.dumps({"split": "test", "results": rows(test), "val": rows(val),
                                               "images_seen": images, "train_seconds": 60.0}))
    (run / "config.json").write_text(json.dumps({"train": {"steps": 10}}))


@pytest.mark.parametrize("tool,arms", [(per_image_study, ("per-step", "per-image")),
                                       (patch14_study, ("per-step", "kernel-lr1"))])
def test_the_reports_give_each_arms_mean_and_std_over_seeds(tmp_path, tool, arms):
    values = {}
    for a, arm in enumerate(arms):
        for seed in (0, 1, 2):
            val = {2: 80 + seed + a, 4: 82 + a, 7: 84.5, 14: 83 + 2 * seed}
            test = {p: v - 1 for p, v in val.items()}
            values[arm, seed] = val
            _finished(tmp_path / arm / f"seed{seed}", val, test, 1000 + seed)
    arms_read = tool.collect(tmp_path, [0, 1, 2])
    assert arms_read[arms[1]]["2"]["val"]["14"] == pytest.approx(87.0)
    text = tool.markdown(arms_read, [0, 1, 2])
    for a, arm in enumerate(arms):
        p2 = [values[arm, s][2] for s in (0, 1, 2)]
        worst = [min(values[arm, s].values()) for s in (0, 1, 2)]
        row = next(line for line in text.splitlines() if line.startswith(f"| {arm} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == f"{statistics.mean(worst):.2f} ± {statistics.stdev(worst):.2f}"
        assert cells[2] == f"{statistics.mean(p2):.2f} ± {statistics.stdev(p2):.2f}"
