"""Dataset sources as HF datasets, and the seeded DataLoader over them.

``load_source`` turns a source string into ``Splits``: train, validation and test ``datasets.Dataset``
objects, each with an ``image`` and an int ``label`` column, plus the class names and the native channel
count:

* ``"fashion-mnist"``: the 60k/10k idx files of the Debian package ``dataset-fashion-mnist``, parsed with
  numpy (``flexivit.data.fashion_mnist``) and held in memory as raw PGM bytes under a ``datasets.Image``
  feature (decoding a PGM is a header parse and a copy: about 30 µs a sample in batched access, PNG
  would cost more to build).
* a folder: one sub-folder per class, read by HF's ``imagefolder`` builder; ``train/``, ``test/`` and
  ``val/`` (or ``validation/``) sub-folders are used as the splits when present.
* ``"wds:PATTERN"`` / ``"wds:FOLDER"`` (WebDataset tar shards) and ``"hf-stream:NAME[:CONFIG]"`` (a local HF
  dataset's data files, streamed): the train split is streamed shard by shard (``flexivit.data.streams``).
* ``"hf:NAME[:CONFIG]"``: ``datasets.load_dataset(NAME, CONFIG)``. Offline this works for a dataset
  already in the HF cache (with ``HF_DATASETS_OFFLINE=1``), for a local folder of data files (e.g. a clone
  of a hub repo: ``data/train-*.parquet``), and for a folder written by ``save_to_disk``, which is read
  with ``datasets.load_from_disk``.

Every source gets a validation split, the one settings are chosen on; the test split is only reported.
A source that ships both a validation and a test split keeps them. Otherwise the validation split is
``val_fraction`` of the train split, stratified by label (every class within one image of its share)
and drawn with ``seed``. A source without a test split first gives ``val_fraction`` of its train split
to test (stratified, with a seed derived from ``seed``), then the validation split from the rest. No row
of the source lands in two splits, and the same seed gives the same splits.

Randomness in loading: ``make_loader`` draws the shuffle order of every epoch from a ``torch.Generator``
seeded with ``seed``. ``TransformedDataset(seed=…)`` seeds Python's, NumPy's and torch's CPU generators
(what timm's transforms draw from) from ``(seed, epoch, index)`` before each sample's transform, so an
augmented view depends on neither the worker count, the rank, nor where a run was resumed. A transform
that keeps an at-size image's pixels (no crop, flip or RandAugment: ``flexivit.data.transforms.AtSize``) draws
nothing: its batches are made in one tensor op, unseeded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.utils.stratify import stratified_shuffle_split_generate_indices

from flexivit.data import fashion_mnist
from flexivit.data.arrays import from_arrays
from flexivit.rng import mix
from flexivit.data.transforms import (
    CorruptImageError,
    TransformedDataset,
    build_transform,
    channels_of,
    collate,
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

FASHION_MNIST_CLASSES = fashion_mnist.CLASSES
FASHION_MNIST_DIR = fashion_mnist.DEFAULT_DIR
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
FOLDER_LAYOUT = (
    "expected one sub-folder per class (ROOT/CLASS/IMAGE.png), optionally under split folders "
    "(ROOT/train/CLASS/..., ROOT/val/CLASS/... and ROOT/test/CLASS/...)"
)
VAL_NAMES = ("val", "validation")  # folder and HF split names taken for a shipped validation split
TEST_SEED_STREAM = 1  # a held-out test split is drawn with mix(seed, 1), the validation split with seed


@dataclass(frozen=True)
class Splits:
    """Train, validation (settings are chosen on it) and test (only reported) splits, each with ``image``
    and int ``label`` columns."""

    train: datasets.Dataset
    val: datasets.Dataset
    test: datasets.Dataset
    class_names: list[str]
    channels: int  # native channel count of the source: 1 grayscale, 3 RGB


# --- Fashion-MNIST -----------------------------------------------------------------------------


def _load_fashion_mnist(root: str | None, val_fraction: float, seed: int, validation: bool) -> Splits:
    train, test = fashion_mnist.load(root)
    return _finish(train, None, test, val_fraction, seed, validation)


# --- shared helpers ----------------------------------------------------------------------------


def _hold_out(
    ds: datasets.Dataset, fraction: float, seed: int, name: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into (rest, held out): ``ceil(fraction * len(ds))`` rows, stratified by label, so each
    class holds out its share of the rows to within one."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {fraction}")
    labels = _labels(ds)
    counts = np.bincount(labels)
    counts = counts[counts > 0]  # images per class present
    held = math.ceil(fraction * len(ds))
    if counts.min() < 2 or min(held, len(ds) - held) < len(counts):
        raise ValueError(
            f"cannot hold out a stratified {name} split: {fraction:g} of {len(ds)} training images is {held}, and each "
            f"of the {len(counts)} classes needs an image on both sides (the smallest class has {counts.min()}). "
            "Raise data.val_fraction, add images, or ship your own splits (train/, val/, test/ folders; HF splits).")
    # HF's own stratifier, fed the label column in one read: ``train_test_split(stratify_by_column=...)``
    # reads it row by row (17 s for Fashion-MNIST's 60k rows with datasets 5.2).
    rest, out = next(stratified_shuffle_split_generate_indices(
        labels, len(ds) - held, held, rng=np.random.default_rng(seed)))
    log.info("%s split: %d of %d training images held out (stratified, seed %d)", name, held, len(ds), seed)
    return ds.select(rest), ds.select(out)


def _labels(ds: datasets.Dataset) -> np.ndarray:
    """The ``label`` column as one array, read in one batch."""
    return np.asarray(ds.with_format("numpy", columns=["label"])[:]["label"])


def _encode_labels(
    splits: dict[str, datasets.Dataset | None],
) -> tuple[dict[str, datasets.Dataset | None], list[str]]:
    """Make ``label`` one ``ClassLabel`` across ``splits`` (the ``train`` one's, if it has one).

    Without a ``ClassLabel``, the classes are the sorted unique labels (ints or strings) of all splits.
    """
    present = {k: ds for k, ds in splits.items() if ds is not None}
    feature = splits["train"].features["label"]
    if isinstance(feature, datasets.ClassLabel):
        for name, ds in present.items():
            other = ds.features["label"]
            if isinstance(other, datasets.ClassLabel) and other.names != feature.names:
                raise ValueError(f"train and {name} label names differ: {feature.names} vs {other.names}")
            if other != feature:
                present[name] = ds.cast_column("label", feature)
        return {**splits, **present}, list(feature.names)
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string") and not str(dtype).startswith(("int", "uint")):
        raise ValueError(f"labels must be ints, strings or a ClassLabel, got {feature}")
    values = set().union(*(ds.unique("label") for ds in present.values()))
    class_label = datasets.ClassLabel(names=[str(v) for v in sorted(values)])
    # Cast by name: ints go through their string form, so label k maps to str(k)'s position.
    encoded = {
        name: ds.cast_column("label", datasets.Value("string")).cast_column("label", class_label)
        for name, ds in present.items()
    }
    return {**splits, **encoded}, list(class_label.names)


def _native_channels(ds: datasets.Dataset, probes: int = 8) -> int:
    """3 if any of ``probes`` evenly spaced images is in colour, else 1 (unreadable ones skipped)."""
    raw = undecoded(ds)
    rows = np.linspace(0, len(raw) - 1, num=min(probes, len(raw))).astype(int).tolist()
    return channels_of((raw[i]["image"] for i in rows), what=f"{probes} sampled images")


def _finish(
    train: datasets.Dataset, val: datasets.Dataset | None, test: datasets.Dataset | None,
    val_fraction: float, seed: int, validation: bool = True,
) -> Splits:  # fmt: skip
    """Encode labels, hold out the test and validation splits the source lacks, find the channel count."""
    if len(train) == 0:
        raise ValueError("the train split is empty")
    parts, names = _encode_labels({"train": train, "val": val, "test": test})
    train, val, test = parts["train"], parts["val"], parts["test"]
    if test is None:
        train, test = _hold_out(train, val_fraction, mix(seed, TEST_SEED_STREAM), "test")
    if val is None and not validation:  # evaluation of test only: nothing to hold out
        val = train.select([])
    elif val is None:
        train, val = _hold_out(train, val_fraction, seed, "validation")
    return Splits(train=train, val=val, test=test, class_names=names, channels=_native_channels(train))


# --- image folders -----------------------------------------------------------------------------


def _check_class_folders(split_root: Path, dataset_root: Path) -> None:
    """Raise unless ``split_root`` holds images in class sub-folders and none loose at its top; warn about
    hidden class folders (a name starting with '.'), which HF's imagefolder skips."""
    for hidden in sorted(d for d in split_root.iterdir() if d.is_dir() and d.name.startswith(".")):
        count = sum(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in hidden.rglob("*"))
        if count:
            log.warning("%s: ignoring the hidden folder %s (%d images): a name starting with '.' is not read as "
                        "a class; rename it to use it", dataset_root, hidden.name, count)
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


def _load_folder(path: str, val_fraction: float, seed: int, cache_dir: str | None, validation: bool) -> Splits:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder {root} does not exist (sources are 'fashion-mnist', 'hf:NAME[:CONFIG]' or a "
            f"folder); {FOLDER_LAYOUT}"
        )
    split_roots = {"train": root}
    if (root / "train").is_dir():
        split_roots["train"] = root / "train"
        shipped = [root / name for name in ("test", *VAL_NAMES) if (root / name).is_dir()]
        if shipped:  # test/ and val/: both kept; a val/ folder alone is the test split
            split_roots["test"] = shipped[0]
        if len(shipped) > 1 and shipped[0].name == "test":
            split_roots["val"] = shipped[1]
    for split_root in split_roots.values():
        _check_class_folders(split_root, root)
    data_files = {split: str(split_root / "**") for split, split_root in split_roots.items()}
    # Explicit data_files: HF's own split inference would also read "test" in file names as a split.
    loaded = datasets.load_dataset(
        "imagefolder", data_files=data_files, drop_labels=False, cache_dir=cache_dir
    )
    return _finish(loaded["train"], loaded.get("val"), loaded.get("test"), val_fraction, seed, validation)


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
        raise ValueError(f"{where}: no column {missing}; columns are {ds.column_names}")
    ds = ds.select_columns([image_column, label_column])
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    return ds.rename_columns(renames) if renames else ds


def _load_hf(
    spec: str, split_train: str, split_test: str | None, image_column: str, label_column: str,
    val_fraction: float, seed: int, cache_dir: str | None, validation: bool,
) -> Splits:  # fmt: skip
    splits = _load_hf_dict(spec, cache_dir)
    wanted = [split_train] + ([split_test] if split_test else [])
    absent = [s for s in wanted if s not in splits]
    if absent:
        raise ValueError(f"hf:{spec} has no split {absent}; splits are {sorted(splits)}")
    if split_test is None:  # "test", else a validation split serves as the test split
        found = [s for s in ("test", *VAL_NAMES) if s in splits and s != split_train]
        split_test = found[0] if found else None
    shipped_val = [s for s in VAL_NAMES if s in splits and s not in (split_train, split_test)]
    split_val = shipped_val[0] if shipped_val else None  # only beside a test split: else it is the test split

    def columns(split: str | None) -> datasets.Dataset | None:
        if split is None:
            return None
        return _select_columns(splits[split], image_column, label_column, f"hf:{spec}[{split}]")

    return _finish(columns(split_train), columns(split_val), columns(split_test), val_fraction, seed, validation)


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
    validation: bool = True,
) -> Splits:
    """Load ``"fashion-mnist"``, ``"hf:NAME[:CONFIG]"`` or an image folder as train/val/test ``Splits``.

    ``validation=False`` (evaluation, which scores test alone) holds out no validation split: ``val`` is
    then empty unless the source ships one, so a dataset too small to stratify can still be evaluated.

    ``root`` overrides the Fashion-MNIST folder (else ``$FLEXIVIT_FASHION_MNIST_DIR``, else the Debian
    package's). ``split_*`` and ``*_column`` apply to ``hf:`` sources; ``split_test=None`` takes "test",
    then "val"/"validation". A "val"/"validation" split besides the train and test splits is the
    validation split. Missing splits are held out as the module docstring says. ``cache_dir`` is where
    HF builders write their Arrow files.
    """
    if source in ("fashion-mnist", "fashion_mnist"):
        return _load_fashion_mnist(root, val_fraction, seed, validation)
    if source.startswith(("wds:", "hf-stream:")):  # streamed train split (flexivit.data.streams)
        from flexivit.data.streams import load_stream

        return load_stream(source, val_fraction=val_fraction, seed=seed, split_train=split_train,
                           split_test=split_test, image_column=image_column, label_column=label_column,
                           cache_dir=cache_dir, validation=validation)
    if source.startswith("hf:"):
        return _load_hf(
            source[3:], split_train, split_test, image_column, label_column, val_fraction, seed, cache_dir,
            validation,
        )
    return _load_folder(source, val_fraction, seed, cache_dir, validation)


def select_classes(splits: Splits, names: Sequence[str]) -> Splits:
    """Keep only the classes ``names`` (in that order, relabelled 0..k-1): a downstream task made from
    any source, e.g. the four upper-body garments of Fashion-MNIST."""
    unknown = [n for n in names if n not in splits.class_names]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"data.classes must name distinct classes of the source; unknown {unknown}, "
                         f"available: {splits.class_names}")
    new_label = {splits.class_names.index(n): i for i, n in enumerate(names)}

    def subset(ds: datasets.Dataset) -> datasets.Dataset:
        labels = _labels(ds)
        keep = np.flatnonzero(np.isin(labels, list(new_label)))
        mapped = [new_label[int(l)] for l in labels[keep]]
        return ds.select(keep).remove_columns("label").add_column("label", mapped)

    return Splits(train=subset(splits.train), val=subset(splits.val), test=subset(splits.test),
                  class_names=list(names), channels=splits.channels)


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
