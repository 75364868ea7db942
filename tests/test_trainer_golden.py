"""The trainer reproduces stored weights: a refactor of the loop must move no measured number.

A fixed small configuration (synthetic data with shipped train/validation/test splits, token-budget
steps, gradient accumulation, drop-path) trains for 8 steps on CPU; its final weights must equal
``tests/golden/trainer.safetensors``. Those weights were written by the trainer as it was before the
reshape into setup + loop (commit 0ded764), and the reshaped trainer reproduced them bit for bit on
the development machine. The test allows 1e-6 so that another CPU's kernels (AVX2 vs AVX-512) cannot
fail it; a wrong step order, a skipped batch or a changed random stream moves weights by far more.

Regenerate only when a change is meant to move numbers, and say so in its commit:
    python tests/test_trainer_golden.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flexivit.data.arrays import from_arrays
from flexivit.train.config import load_recipe

GOLDEN = Path(__file__).resolve().parent / "golden" / "trainer.safetensors"
CLASSES = [f"c{i}" for i in range(4)]
OVERRIDES = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.base_patch_size=8", "model.base_grid=4",
    "model.drop_path_rate=0.2", "data.image_size=16", "data.batch_size=8", "data.eval_batch_size=64",
    "data.num_workers=0", "patch.sizes=2,4,8", "patch.distribution=uniform", "patch.weights=none",
    "train.steps=8", "train.grad_accum=2", "train.token_budget=512", "train.log_every=4",
    "train.checkpoint_every=4", "optim.warmup_steps=2",
    # What the recipe held when the stored weights were written (it has moved on since).
    "model.kernel_resize=bilinear_aa", "optim.kernel_lr_scale=1", "data.hflip=0.5",
]


def _arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 16x16 uint8 images whose class is the quadrant of a bright square."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    images = rng.integers(0, 80, size=(n, 16, 16)).astype(np.uint8)
    for image, label in zip(images, labels):
        y, x = divmod(int(label), 2)
        image[2 + 8 * y : 6 + 8 * y, 2 + 8 * x : 6 + 8 * x] = 220
    return images, labels


def make_data(folder: Path) -> str:
    """A save_to_disk dataset with its own train, validation and test splits; returns its source string."""
    splits = {name: from_arrays(*_arrays(n, seed), CLASSES)
              for name, n, seed in (("train", 256, 0), ("validation", 64, 1), ("test", 64, 2))}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return f"hf:{folder}"


def train_weights(tmp: Path, **kwargs) -> dict[str, torch.Tensor]:
    from flexivit.train.loop import train

    cfg = load_recipe("fashion_mnist:smoke", [f"data.source={make_data(tmp / 'data')}", *OVERRIDES])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, out_dir=tmp / "run", **kwargs)
    finally:
        torch.set_num_threads(threads)
    return load_file(str(tmp / "run" / "model.safetensors"))


@pytest.mark.slow
def test_trainer_reproduces_the_stored_weights(tmp_path):
    got, want = train_weights(tmp_path), load_file(str(GOLDEN))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=f"{name} moved")


@pytest.mark.slow
def test_logged_metrics_are_the_per_step_values_averaged(tmp_path):
    """Metrics stay on the device between log lines: no step may be lost or counted twice."""
    steps: list[tuple[int, int, float]] = []
    train_weights(tmp_path, on_step=lambda info: steps.append((info.step, info.scheme.patch, info.loss.item())))
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    windows = [r for r in log if "per_patch" in r]
    assert [w["step"] for w in windows] == [4, 8]
    start = 0
    for window in windows:
        inside = [(p, loss) for step, p, loss in steps if start < step <= window["step"]]
        for patch, stats in window["per_patch"].items():
            losses = [loss for p, loss in inside if p == int(patch)]
            assert stats["steps"] == len(losses) > 0
            assert stats["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
        assert sum(s["steps"] for s in window["per_patch"].values()) == len(inside)
        start = window["step"]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.parent.mkdir(exist_ok=True)
        save_file(train_weights(Path(tmp)), str(GOLDEN))
    print(f"wrote {GOLDEN}")
