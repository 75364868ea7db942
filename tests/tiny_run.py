"""A small trained FlexiViT run, made once per test session (shared by the eval/deploy/export tests).

Synthetic data: 16x16 grayscale images, one bright 5x5 square on noise; the class is the square's cell in a
3x2 grid (6 classes, so top-5 is reported). The model trains in-process with plain torch for 150 steps,
drawing the patch size from {2, 4, 8} each step, and is saved with ``flexivit.model.weights.save_model`` next
to a run ``config.json`` that names the synthetic test set as its data source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.weights import save_model
from flexivit.data.sources import from_arrays

IMAGE = 16
CLASSES = [f"cell-{i}" for i in range(6)]
TRAIN_SIZES = [2, 4, 8]
CORNERS = [(r, c) for r in (1, 10) for c in (1, 6, 11)]  # top-left of each class's square (y, x)
PREPROCESS = {"image_size": IMAGE, "channels": 1, "crop_pct": 1.0, "mean": [0.5], "std": [0.5],
              "interpolation": "bilinear"}


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images ``(n, 16, 16)`` and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    images = rng.integers(0, 90, size=(n, IMAGE, IMAGE)).astype(np.uint8)
    for img, label in zip(images, labels):
        y, x = CORNERS[label]
        img[y : y + 5, x : x + 4] = 230
    return images, labels


def class_image(label: int, size: tuple[int, int], mode: str) -> Image.Image:
    """A clean picture of class ``label`` at another size (W, H) and PIL mode."""
    img = np.full((IMAGE, IMAGE), 40, dtype=np.uint8)
    y, x = CORNERS[label]
    img[y : y + 5, x : x + 4] = 230
    return Image.fromarray(img).resize(size, Image.NEAREST).convert(mode)


def _train(model: FlexiViT, images: np.ndarray, labels: np.ndarray, steps: int = 150) -> None:
    x = torch.from_numpy(images).float().div(255).sub(0.5).div(0.5)[:, None]  # (N, 1, H, W)
    y = torch.from_numpy(labels).long()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        patch = TRAIN_SIZES[step % len(TRAIN_SIZES)]
        loss = F.cross_entropy(model(x[idx], patch), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def make_run(root: Path) -> Path:
    """Train and save the run under ``root`` (reused if already there); returns the run directory."""
    run = root / "tiny-run"
    if (run / "model.safetensors").exists():
        return run
    torch.manual_seed(0)
    config = FlexiViTConfig(img_size=IMAGE, patch_size=4, base_patch_size=8, base_grid=4, in_chans=1,
                            num_classes=len(CLASSES), embed_dim=32, depth=1, num_heads=2, class_token=False,
                            global_pool="avg")
    model = FlexiViT(config)
    _train(model, *synthetic(2048, seed=1))
    data_dir = root / "synthetic"
    test_images, test_labels = synthetic(200, seed=2)
    datasets.DatasetDict({
        "train": from_arrays(*synthetic(60, seed=3), CLASSES),
        "test": from_arrays(test_images, test_labels, CLASSES),
    }).save_to_disk(str(data_dir))
    save_model(model, run, class_names=CLASSES, preprocess=PREPROCESS)
    run_config = {"name": "tiny", "data": {"source": f"hf:{data_dir}"}, "patch": {"sizes": TRAIN_SIZES},
                  "train": {"seed": 0}}
    (run / "config.json").write_text(json.dumps(run_config))
    return run


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
