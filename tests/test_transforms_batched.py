"""The batched path of transforms that keep an at-size image's pixels (``AtSize``) against the PIL pipeline
it replaces: the same tensors bit for bit, per image and through ``TransformedDataset``."""

from __future__ import annotations

import io
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from flexivit.data.arrays import from_arrays
from flexivit.data.transforms import AtSize, TransformedDataset, build_transform, collate


def images(n: int, size: int, mode: str, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("source_mode", ["L", "RGB"])
@pytest.mark.parametrize("channels", [1, 3])
def test_batch_equals_the_pil_pipeline_bit_for_bit(train: bool, source_mode: str, channels: int) -> None:
    kwargs = {"scale": (1.0, 1.0), "hflip": 0.0} if train else {"crop_pct": 1.0}
    transform = build_transform(image_size=14, channels=channels, train=train, mean=0.3, std=0.7, **kwargs)
    assert isinstance(transform, AtSize)
    batch = images(6, 14, source_mode)
    for seed in range(5):  # the crop's random draws differ per seed; at scale (1, 1) none moves a pixel
        random.seed(seed)
        torch.manual_seed(seed)
        expected = torch.stack([transform.general(im) for im in batch])  # (B, C, 14, 14)
        assert expected.shape == (6, channels, 14, 14)
        assert torch.equal(transform.batch(batch), expected)


def test_batch_declines_images_of_another_size() -> None:
    transform = build_transform(image_size=14, channels=1, train=False)
    assert transform.batch(images(2, 14, "L") + images(1, 20, "L")) is None
    assert transform.batch([]) is None


@pytest.mark.parametrize("kwargs", [
    {"train": True, "scale": (0.3, 1.0), "hflip": 0.0},
    {"train": True, "scale": (1.0, 1.0), "hflip": 0.5},
    {"train": True, "scale": (1.0, 1.0), "hflip": 0.0, "randaugment": "rand-m9-mstd0.5"},
    {"train": False, "crop_pct": 0.875},
])
def test_transforms_that_move_pixels_have_no_batched_path(kwargs: dict) -> None:
    assert not hasattr(build_transform(image_size=14, channels=1, **kwargs), "batch")


@pytest.mark.parametrize("size", [12, 16])  # at size: the batched path; 16 -> 12: one by one
def test_dataset_batches_match_one_by_one(size: int) -> None:
    rng = np.random.default_rng(3)
    hf = from_arrays(rng.integers(0, 256, (10, size, size), dtype=np.uint8), np.arange(10) % 3, ["a", "b", "c"])
    transform = build_transform(image_size=12, channels=1, train=True, scale=(1.0, 1.0), hflip=0.0)
    ds = TransformedDataset(hf, transform, seed=5)
    indices = [7, 2, 9, 0]
    batched = collate(ds.__getitems__(indices))
    single = collate([ds[i] for i in indices])
    assert torch.equal(batched["image"], single["image"]) and torch.equal(batched["label"], single["label"])
    assert batched["image"].shape == (4, 1, 12, 12)


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_corrupt_images_are_skipped_in_place_on_the_batched_path() -> None:
    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)]
    rows = [{"bytes": png(arrays[0]), "path": None}, {"bytes": b"not an image", "path": None},
            {"bytes": png(arrays[1]), "path": None}, {"bytes": png(arrays[2]), "path": None}]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c", "d"])})
    hf = datasets.Dataset.from_dict({"image": rows, "label": [0, 1, 2, 3]}, features=features)
    transform = build_transform(image_size=8, channels=1, train=False)
    samples = TransformedDataset(hf, transform, on_corrupt="skip").__getitems__([0, 1, 2, 3])
    assert samples[1] is None and [s["label"] for s in samples if s] == [0, 2, 3]
    kept = [Image.fromarray(a) for a in arrays]
    expected = torch.stack([transform.general(k) for k in kept])  # (3, 1, 8, 8)
    assert torch.equal(torch.stack([s["image"] for s in samples if s]), expected)
