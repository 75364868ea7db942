"""Dataset sources as HF datasets, and the seeded DataLoader over them.

``load_source`` turns a source string into ``Splits`` (a train and a test ``datasets.Dataset``, each with
an ``image`` and an int ``label`` column, plus the class names and the native channel count):

* ``"fashion-mnist"``: the 60k/10k idx files of the Debian package ``dataset-fashion-mnist``, parsed with
  numpy and held in memory as raw PGM bytes under a ``datasets.Image`` feature (decoding a PGM is a
  header parse and a copy: about 30 µs a sample in batched access, PNG would cost more to build).
* a folder: one sub-folder per class, read by HF's ``imagefolder`` builder; ``train/`` and ``test/`` (or
  ``val/``, ``validation/``) sub-folders are used as the splits when present.
* ``"hf:NAME[:CONFIG]"``: ``datasets.load_dataset(NAME, CONFIG)``. Offline this works for a dataset
  already in the HF cache (with ``HF_DATASETS_OFFLINE=1``), for a local folder of data files (e.g. a clone
  of a hub repo: ``data/train-*.parquet``), and for a folder written by ``save_to_disk``, which is read
  with ``datasets.load_from_disk``.

Without a test split, ``val_fraction`` of the train split is held out, stratified by label (seeded, so
the same seed gives the same split).

Augmentation randomness comes from Python's ``random`` and torch's global RNGs (timm's transforms), which
DataLoader workers seed from the loader's generator: with ``num_workers > 0`` a given ``seed`` repeats
both the order and the augmentations; with ``num_workers=0`` the caller seeds the global RNGs.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from .arrays import from_arrays
from .transforms import (
    GRAY_MODES,
    CorruptImageError,
    TransformedDataset,
    build_transform,
    collate,
    open_image,
    undecoded,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "CorruptImageError",
    "Splits",
    "TransformedDataset",
    "build_transform",
    "collate",
    "from_arrays",
    "load_source",
    "make_loader",
]

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
FOLDER_LAYOUT = (
    "expected one sub-folder per class (ROOT/CLASS/IMAGE.png), optionally under split folders "
    "(ROOT/train/CLASS/..., ROOT/test/CLASS/... or ROOT/val/CLASS/...)"
)


@dataclass(frozen=True)
class Splits:
    """A train and a test split, with ``image`` and int ``label`` columns."""

    train: datasets.Dataset
    test: datasets.Dataset
    class_names: list[str]
    channels: int  # native channel count of the source: 1 grayscale, 3 RGB


# --- Fashion-MNIST -----------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped idx file (the MNIST format) of unsigned bytes as an array of its declared shape."""
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_split(root: Path, prefix: str) -> datasets.Dataset:
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")  # (N, 28, 28)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")  # (N,)
    return from_arrays(images, labels, FASHION_MNIST_CLASSES)


def _load_fashion_mnist(root: str | None) -> Splits:
    folder = Path(root or os.environ.get("FLEXIVIT_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    needed = [
        f"{prefix}-{kind}.gz"
        for prefix in ("train", "t10k")
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing from {folder}: {', '.join(missing)}. Install them with "
            "`apt-get install dataset-fashion-mnist` (as root) or `make data`, or point "
            "FLEXIVIT_FASHION_MNIST_DIR (or root=) at a folder holding the four idx .gz files."
        )
    train, test = _fashion_mnist_split(folder, "train"), _fashion_mnist_split(folder, "t10k")
    return Splits(train=train, test=test, class_names=list(FASHION_MNIST_CLASSES), channels=1)


# --- shared helpers ----------------------------------------------------------------------------


def _hold_out(
    ds: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into (train, held out), stratified by label when every class allows it."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) to hold out a test split, got {fraction}")
    try:
        parts = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    except ValueError as err:  # a class with one image, or fewer held-out rows than classes
        log.warning("stratified hold-out impossible (%s); holding out a plain random split", err)
        parts = ds.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def _encode_labels(
    train: datasets.Dataset, test: datasets.Dataset | None
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """Make ``label`` a ``ClassLabel`` shared by both splits; return them and the class names.

    Without a ``ClassLabel``, the classes are the sorted unique labels (ints or strings) of both splits.
    """
    feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        if test is not None and test.features["label"] != feature:
            other = test.features["label"]
            if isinstance(other, datasets.ClassLabel) and other.names != feature.names:
                raise ValueError(f"train and test label names differ: {feature.names} vs {other.names}")
            test = test.cast_column("label", feature)
        return train, test, list(feature.names)
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string") and not str(dtype).startswith(("int", "uint")):
        raise TypeError(f"labels must be ints, strings or a ClassLabel, got {feature}")
    values = set(train.unique("label")) | (set(test.unique("label")) if test is not None else set())
    class_label = datasets.ClassLabel(names=[str(v) for v in sorted(values)])

    def encode(ds: datasets.Dataset) -> datasets.Dataset:
        # Cast by name: ints go through their string form, so label k maps to str(k)'s position.
        return ds.cast_column("label", datasets.Value("string")).cast_column("label", class_label)

    return encode(train), encode(test) if test is not None else None, list(class_label.names)


def _native_channels(ds: datasets.Dataset, probes: int = 8) -> int:
    """3 if any of ``probes`` evenly spaced images is in colour, else 1 (unreadable ones skipped)."""
    raw = undecoded(ds)
    modes = []
    for i in np.linspace(0, len(raw) - 1, num=min(probes, len(raw))).astype(int).tolist():
        try:
            with open_image(raw[i]["image"], load=False) as image:  # reads the header only
                modes.append(image.mode)
        except CorruptImageError:
            continue
    if not modes:
        raise CorruptImageError(f"none of {probes} sampled images could be decoded")
    return 1 if all(mode in GRAY_MODES for mode in modes) else 3


def _finish(
    train: datasets.Dataset, test: datasets.Dataset | None, val_fraction: float, seed: int
) -> Splits:
    """Encode labels, hold out a test split if there is none, and find the channel count."""
    if len(train) == 0:
        raise ValueError("the train split is empty")
    train, test, names = _encode_labels(train, test)
    if test is None:
        train, test = _hold_out(train, val_fraction, seed)
    return Splits(train=train, test=test, class_names=names, channels=_native_channels(train))


# --- image folders -----------------------------------------------------------------------------


def _check_class_folders(split_root: Path, dataset_root: Path) -> None:
    """Raise unless ``split_root`` holds images in class sub-folders and none loose at its top."""
    loose = [p for p in split_root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise ValueError(
            f"{dataset_root}: images directly in {split_root} (e.g. {loose[0].name}); {FOLDER_LAYOUT}"
        )
    has_images = any(
        p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        for d in split_root.iterdir()
        if d.is_dir()
        for p in d.rglob("*")
    )
    if not has_images:
        raise ValueError(
            f"{dataset_root}: no images found in class folders under {split_root}; {FOLDER_LAYOUT}"
        )


def _load_folder(path: str, val_fraction: float, seed: int, cache_dir: str | None) -> Splits:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder {root} does not exist (sources are 'fashion-mnist', 'hf:NAME[:CONFIG]' or a "
            f"folder); {FOLDER_LAYOUT}"
        )
    split_roots = {"train": root}
    if (root / "train").is_dir():
        split_roots["train"] = root / "train"
        for name in ("test", "val", "validation"):
            if (root / name).is_dir():
                split_roots["test"] = root / name
                break
    for split_root in split_roots.values():
        _check_class_folders(split_root, root)
    data_files = {split: str(split_root / "**") for split, split_root in split_roots.items()}
    # Explicit data_files: HF's own split inference would also read "test" in file names as a split.
    loaded = datasets.load_dataset(
        "imagefolder", data_files=data_files, drop_labels=False, cache_dir=cache_dir
    )
    return _finish(loaded["train"], loaded.get("test"), val_fraction, seed)


# --- Hugging Face datasets ---------------------------------------------------------------------


def _load_hf_dict(spec: str, cache_dir: str | None) -> dict[str, datasets.Dataset]:
    """The splits of ``NAME[:CONFIG]``: a ``save_to_disk`` folder, or anything ``load_dataset`` reads."""
    name, _, config = spec.partition(":")
    if Path(spec).expanduser().exists():  # a local path may itself hold a colon
        name, config = spec, ""
    local = Path(name).expanduser()
    if (local / "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(str(local)))
    if (local / "state.json").is_file():
        return {"train": datasets.load_from_disk(str(local))}
    return dict(datasets.load_dataset(name, config or None, cache_dir=cache_dir))


def _select_columns(
    ds: datasets.Dataset, image_column: str, label_column: str, where: str
) -> datasets.Dataset:
    """``ds`` reduced to its image and label columns, renamed ``image`` and ``label``."""
    missing = [c for c in (image_column, label_column) if c not in ds.column_names]
    if missing:
        raise KeyError(f"{where}: no column {missing}; columns are {ds.column_names}")
    ds = ds.select_columns([image_column, label_column])
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    return ds.rename_columns(renames) if renames else ds


def _load_hf(
    spec: str, split_train: str, split_test: str | None, image_column: str, label_column: str,
    val_fraction: float, seed: int, cache_dir: str | None,
) -> Splits:  # fmt: skip
    splits = _load_hf_dict(spec, cache_dir)
    wanted = [split_train] + ([split_test] if split_test else [])
    absent = [s for s in wanted if s not in splits]
    if absent:
        raise KeyError(f"hf:{spec} has no split {absent}; splits are {sorted(splits)}")
    if split_test is None:
        found = [s for s in ("test", "validation") if s in splits and s != split_train]
        split_test = found[0] if found else None

    def columns(split: str) -> datasets.Dataset:
        return _select_columns(splits[split], image_column, label_column, f"hf:{spec}[{split}]")

    test = columns(split_test) if split_test is not None else None
    return _finish(columns(split_train), test, val_fraction, seed)


def load_source(
    source: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    split_train: str = "train",
    split_test: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    root: str | None = None,
    cache_dir: str | None = None,
) -> Splits:
    """Load ``"fashion-mnist"``, ``"hf:NAME[:CONFIG]"`` or an image folder as train/test ``Splits``.

    ``root`` overrides the Fashion-MNIST folder (else ``$FLEXIVIT_FASHION_MNIST_DIR``, else the Debian
    package's). ``split_*`` and ``*_column`` apply to ``hf:`` sources; ``split_test=None`` takes "test",
    then "validation", else holds out ``val_fraction`` of the train split with ``seed`` (as do folders
    without a test folder). ``cache_dir`` is where HF builders write their Arrow files.
    """
    if source in ("fashion-mnist", "fashion_mnist"):
        return _load_fashion_mnist(root)
    if source.startswith("hf:"):
        return _load_hf(
            source[3:], split_train, split_test, image_column, label_column, val_fraction, seed, cache_dir
        )
    return _load_folder(source, val_fraction, seed, cache_dir)


def select_classes(splits: Splits, names: Sequence[str]) -> Splits:
    """Keep only the classes ``names`` (in that order, relabelled 0..k-1): a downstream task made from
    any source, e.g. the four upper-body garments of Fashion-MNIST."""
    unknown = [n for n in names if n not in splits.class_names]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"data.classes must name distinct classes of the source; unknown {unknown}, "
                         f"available: {splits.class_names}")
    new_label = {splits.class_names.index(n): i for i, n in enumerate(names)}

    def subset(ds: datasets.Dataset) -> datasets.Dataset:
        labels = np.asarray(ds["label"])
        keep = np.flatnonzero(np.isin(labels, list(new_label)))
        mapped = [new_label[int(l)] for l in labels[keep]]
        return ds.select(keep).remove_columns("label").add_column("label", mapped)

    return Splits(train=subset(splits.train), test=subset(splits.test), class_names=list(names), channels=splits.channels)


# --- loader -----------------------------------------------------------------------------------


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    prefetch_batches: int = 2,
    drop_last: bool,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose order (and, with workers, augmentation) is fixed by ``seed``.

    ``prefetch_batches`` is how many batches the workers keep ready in all (ignored without workers):
    a step that joins many batches (token budget) then finds them prepared while earlier, compute-heavy
    steps ran.
    """
    generator = torch.Generator().manual_seed(seed)
    extra = {"prefetch_factor": max(2, -(-prefetch_batches // num_workers))} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate,
        # Not persistent: workers must pick up set_epoch() on the dataset at each new epoch.
        persistent_workers=False,
        **extra,
    )
