"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: its four gzipped idx files parsed with
numpy into in-memory HF datasets (``flexivit.data.arrays.from_arrays``). ``flexivit.data.sources`` makes the splits."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import datasets
import numpy as np

from flexivit.data.arrays import from_arrays

CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = [f"{prefix}-{kind}.gz" for prefix in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]


def read_idx(path: Path) -> np.ndarray:
    """A gzipped idx file (the MNIST format) of unsigned bytes as an array of its declared shape."""
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _split(folder: Path, prefix: str) -> datasets.Dataset:
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")  # (N, 28, 28)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")  # (N,)
    return from_arrays(images, labels, CLASSES)


def load(root: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The 60k training and 10k test images from ``root``, else ``$FLEXIVIT_FASHION_MNIST_DIR``, else the
    package's folder; a clear error says how to get the files when one is missing."""
    folder = Path(root or os.environ.get("FLEXIVIT_FASHION_MNIST_DIR") or DEFAULT_DIR)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing from {folder}: {', '.join(missing)}. Install them with "
            "`apt-get install dataset-fashion-mnist` (as root) or `make data`, or point "
            "FLEXIVIT_FASHION_MNIST_DIR (or root=) at a folder holding the four idx .gz files."
        )
    return _split(folder, "train"), _split(folder, "t10k")
