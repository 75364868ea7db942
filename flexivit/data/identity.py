"""What a run trains on: a fingerprint of its data and of the split each image fell in, checked on resume.

A resumed run continues bit-identically only on the same images in the same splits: with images added or
deleted, the validation and test splits are drawn again (images that were scored as test move into train)
and the loader's order changes. ``data_fingerprint`` records, per split, the image count, the count per
class and a sha256 over its rows in order; ``flexivit.run`` stores it in every checkpoint and
``data_changes`` lists what differs when a run resumes, which is then refused.

A row is identified by its file path, relative to the data folder (image folders, and HF datasets that
keep file names), else by the sha1 of its encoded bytes (Fashion-MNIST, images stored inside a dataset),
and by its label. Reading the bytes costs one pass over them: 0.7 s for Fashion-MNIST's 70 000 images.
A file whose name and label stay while its pixels change is not detected.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from flexivit.data.sources import Splits
from flexivit.data.streams import shard_changes

__all__ = ["data_fingerprint", "data_changes", "SPLITS"]

SPLITS = ("train", "val", "test")
_BATCH = 4096


def _relative(path: str, root: Path | None) -> str:
    try:
        return str(Path(path).relative_to(root)) if root is not None else path
    except ValueError:  # not under the data folder
        return path


def _identities(images: pa.Array, root: Path | None) -> list[str]:
    """Each image as a stable string: its path (relative to ``root`` when under it) when it is read from a
    file, else the sha1 of its bytes (or, for an array image, of its values)."""
    if pa.types.is_struct(images.type):  # datasets.Image: {bytes, path}
        paths, data = images.field("path").to_pylist(), images.field("bytes")
        if data.null_count == len(data):
            return [_relative(p, root) for p in paths]
        return [hashlib.sha1(b).hexdigest() if b is not None else _relative(p, root)
                for b, p in zip(data.to_pylist(), paths)]
    if pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type):
        return [hashlib.sha1(b).hexdigest() for b in images.to_pylist()]
    return [hashlib.sha1(repr(v).encode()).hexdigest() for v in images.to_pylist()]


def split_fingerprint(ds: datasets.Dataset, class_names: list[str], root: Path | None = None) -> dict[str, Any]:
    """``{"images": n, "per_class": {name: n}, "digest": sha256 hex}`` of ``ds``'s rows in order."""
    digest, per_class = hashlib.sha256(), Counter()
    for batch in ds.select_columns(["image", "label"]).with_format("arrow").iter(batch_size=_BATCH):
        labels = batch.column("label").to_pylist()
        ids = _identities(batch.column("image").combine_chunks(), root)
        digest.update("".join(f"{i}\t{label}\n" for i, label in zip(ids, labels)).encode())
        per_class.update(labels)
    return {"images": len(ds), "per_class": {name: per_class[i] for i, name in enumerate(class_names)},
            "digest": digest.hexdigest()}


def stream_fingerprint(stream: Any) -> dict[str, Any]:
    """A streamed split (``flexivit.data.streams.ShardStream``) by its shards: their names, record counts and
    sizes in order (reading every record's label at each start would cost a pass over the data)."""
    shards = [[s.name, s.records, s.size] for s in stream.shards]
    digest = hashlib.sha256("".join(f"{n}\t{r}\t{b}\n" for n, r, b in shards).encode())
    return {"images": len(stream), "per_class": {}, "digest": digest.hexdigest(), "shards": shards}


def data_fingerprint(splits: Splits, source: str) -> dict[str, Any]:
    """The fingerprint of a run's data: its source, class names, and every split's rows."""
    folder = Path(source).expanduser()
    root = folder.resolve() if folder.is_dir() else None
    return {"source": source, "class_names": list(splits.class_names),
            "splits": {name: stream_fingerprint(ds) if hasattr(ds := getattr(splits, name), "shards")
                       else split_fingerprint(ds, splits.class_names, root) for name in SPLITS}}


def _split_changes(name: str, before: dict[str, Any], now: dict[str, Any]) -> str | None:
    if before == now:
        return None
    if "shards" in before and "shards" in now:  # a streamed split: say which shards changed
        return "; ".join(shard_changes(name, before["shards"], now["shards"])) or None
    if before["images"] != now["images"]:
        classes = [f"{c} {before['per_class'].get(c, 0)} -> {now['per_class'].get(c, 0)}"
                   for c in sorted(set(before["per_class"]) | set(now["per_class"]))
                   if before["per_class"].get(c, 0) != now["per_class"].get(c, 0)]
        return f"the {name} split had {before['images']} images and now has {now['images']} ({', '.join(classes)})"
    return f"the {name} split holds other images than before (the same count, {now['images']}, but not the same files)"


def data_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one sentence each (empty: the same data in the same splits)."""
    changes = []
    if before.get("class_names") != now.get("class_names"):
        changes.append(f"the classes were {before.get('class_names')} and are now {now.get('class_names')}")
    for name in SPLITS:
        change = _split_changes(name, before["splits"][name], now["splits"][name])
        if change:
            changes.append(change)
    return changes
