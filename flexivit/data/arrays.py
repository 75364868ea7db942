"""In-memory HF datasets from uint8 arrays (how Fashion-MNIST and test data are held).

Images are stored as binary PGM/PPM bytes under a ``datasets.Image`` feature, so they decode like any
image file (``flexivit.data.transforms.open_image``) while building the column is one vectorised numpy pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable

__all__ = ["from_arrays"]


def _netpbm_column(images: np.ndarray) -> pa.ChunkedArray:
    """Encode ``(N, H, W)`` or ``(N, H, W, 3)`` uint8 images as an Arrow ``datasets.Image`` column.

    Each image becomes a binary PGM (1 channel) or PPM (3 channels): a short text header then the raw
    pixels, built for all images at once with no per-image Python loop.
    """
    n, h, w = images.shape[:3]
    magic = "P5" if images.ndim == 3 else "P6"
    header = np.frombuffer(f"{magic}\n{w} {h}\n255\n".encode(), dtype=np.uint8)
    records = np.concatenate(
        [np.broadcast_to(header, (n, header.size)), images.reshape(n, -1)], axis=1
    )  # (N, header + H*W*C)
    per_chunk = max(1, (2**31 - 1) // records.shape[1])  # binary offsets are int32
    chunks = []
    for start in range(0, n, per_chunk):
        part = np.ascontiguousarray(records[start : start + per_chunk])
        offsets = np.arange(len(part) + 1, dtype=np.int32) * part.shape[1]
        data = pa.BinaryArray.from_buffers(
            pa.binary(), len(part), [None, pa.py_buffer(offsets), pa.py_buffer(part.reshape(-1))]
        )
        paths = pa.nulls(len(part), pa.string())
        chunks.append(pa.StructArray.from_arrays([data, paths], names=["bytes", "path"]))
    return pa.chunked_array(chunks, type=datasets.Image().pa_type)


def from_arrays(
    images: np.ndarray, labels: Sequence[int] | np.ndarray, class_names: Sequence[str]
) -> datasets.Dataset:
    """An in-memory dataset from uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` with C in {1, 3}.

    ``image`` is a ``datasets.Image`` column (decodes to a PIL ``"L"`` or ``"RGB"`` image) and
    ``label`` a ``ClassLabel`` over ``class_names``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]  # (N, H, W)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 1|3), got shape {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"{len(images)} images but labels have shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(
            f"labels must lie in [0, {len(class_names)}), got [{labels.min()}, {labels.max()}]"
        )
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))}
    )
    table = pa.table({"image": _netpbm_column(images), "label": pa.array(labels, type=pa.int64())})
    # Our own fingerprint: datasets would pickle the whole table to hash it (3x slower).
    digest = hashlib.blake2b(np.ascontiguousarray(images), digest_size=16)
    digest.update(labels.tobytes())
    digest.update("\n".join(class_names).encode())
    return datasets.Dataset(
        InMemoryTable(table),
        info=datasets.DatasetInfo(features=features),
        fingerprint=digest.hexdigest(),
    )
