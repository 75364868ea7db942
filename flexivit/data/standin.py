"""A tiny ImageNet stand-in written to disk: an image folder of 224-px JPEGs, a few classes.

``write_imagenet_standin(root)`` writes ``root/{train,val,test}/CLASS/NAME.JPEG`` in the layout
``flexivit``'s folder source reads (``flexivit.data.sources.load_source``: class sub-folders under split folders,
so the shipped validation and test splits are kept), with WordNet-style class ids (``n00000000`` ...) and
``.JPEG`` names as ImageNet has them. Images are 224 px on their short side; every third one is
landscape and every third portrait (224 x 280, 280 x 224), so the random-resized crop and the eval
resize + center crop see non-square inputs. Each class is a colour with a class-specific stripe
direction, plus noise, so a few steps can already move the loss; the content is deterministic in
``seed``. Reused by the streaming tests (shards are written from the same images).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SPLITS", "class_ids", "standin_image", "write_imagenet_standin", "write_imagenet_standin_shards"]

SPLITS = {"train": 8, "val": 2, "test": 2}  # images per class in each split
SHAPES = ((224, 224), (280, 224), (224, 280))  # (W, H), cycled over an image's index


def class_ids(classes: int) -> list[str]:
    """WordNet-style folder names, sorted as the folder source orders classes."""
    return [f"n{k:08d}" for k in range(classes)]


def standin_image(label: int, index: int, *, classes: int, seed: int = 0) -> Image.Image:
    """Image ``index`` of class ``label``: a class colour, stripes at a class angle, noise (RGB)."""
    w, h = SHAPES[index % len(SHAPES)]
    rng = np.random.default_rng([seed, label, index])
    hue = label / classes
    colour = np.array([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 80 + 128  # (3,)
    angle = np.pi * label / classes
    yy, xx = np.mgrid[0:h, 0:w]  # (H, W) each
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) / 6 + rng.uniform(0, 2 * np.pi))  # (H, W)
    pixels = colour + 50 * stripes[..., None] + rng.normal(0, 20, size=(h, w, 3))  # (H, W, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_imagenet_standin(root: str | Path, *, classes: int = 4, per_split: dict[str, int] | None = None,
                           seed: int = 0, quality: int = 90) -> dict[str, int]:
    """Write the stand-in under ``root``; returns the number of images written per split."""
    root = Path(root)
    counts = {}
    for split_index, (split, per_class) in enumerate((per_split or SPLITS).items()):
        for label, name in enumerate(class_ids(classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                index = split_index * 1000 + i  # distinct images in every split
                standin_image(label, index, classes=classes, seed=seed).save(
                    folder / f"{name}_{index}.JPEG", quality=quality)
        counts[split] = classes * per_class
    return counts


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_imagenet_standin_shards(root: str | Path, *, classes: int = 4, train_per_class: int = 12,
                                  eval_per_class: int = 2, shards: int = 6, seed: int = 0,
                                  quality: int = 90) -> dict[str, int]:
    """The stand-in as WebDataset shards, laid out as HF names ImageNet's splits: ``root/train-NNNNN.tar``
    (``shards`` of them, records shuffled by ``seed``) and ``root/validation-00000.tar``; each record is
    ``KEY.jpg`` with ``KEY.cls`` (the class index). Returns the images written per split."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": (train_per_class, shards, 0), "validation": (eval_per_class, 1, 1)}
    counts = {}
    for split, (per_class, n_shards, offset) in splits.items():
        records = [(label, offset * 1000 + i) for label in range(classes) for i in range(per_class)]
        order = np.random.default_rng([seed, offset]).permutation(len(records))
        for k in range(n_shards):
            with tarfile.open(root / f"{split}-{k:05d}.tar", "w") as tar:
                for j in order[k::n_shards]:
                    label, index = records[j]
                    buffer = io.BytesIO()
                    standin_image(label, index, classes=classes, seed=seed).save(buffer, "JPEG", quality=quality)
                    key = f"{class_ids(classes)[label]}_{index}"
                    _add(tar, f"{key}.jpg", buffer.getvalue())
                    _add(tar, f"{key}.cls", str(label).encode())
        counts[split] = len(records)
    return counts
