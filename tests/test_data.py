"""Data sources, their train/validation/test splits, transforms and loaders, on files written by the tests
(and the Debian Fashion-MNIST).

Everything runs offline: HF sources are a ``save_to_disk`` folder and a folder of parquet files, the
two forms of a hub dataset that ``load_source("hf:PATH")`` reads without a network.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from flexivit.train.builders import build_data, eval_loader
from flexivit.train.config import Config
from flexivit.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    CorruptImageError,
    TransformedDataset,
    build_transform,
    collate,
    from_arrays,
    Splits,
    load_source,
    make_loader,
    select_classes,
)

HAS_FASHION_MNIST = (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file()
needs_fashion_mnist = pytest.mark.skipif(
    not HAS_FASHION_MNIST,
    reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist`",
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf-cache")


def write_images(folder: Path, classes: dict[str, int], *, mode: str = "RGB", size=(20, 16)) -> None:
    """``folder/CLASS/CLASS_i.png`` for ``classes[CLASS]`` random images of ``size`` (W, H)."""
    rng = np.random.default_rng(len(str(folder)))
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(folder / name / f"{name}_{i}.png")


def paths(ds: datasets.Dataset) -> list[str]:
    return [v["path"] for v in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def contents(ds: datasets.Dataset) -> list[bytes]:
    """The decoded pixels of every image: equal images give equal keys whatever their file or encoding."""
    return [image.tobytes() for image in ds["image"]]


def class_counts(ds: datasets.Dataset, classes: int) -> np.ndarray:
    return np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=classes)


def assert_stratified(held: datasets.Dataset, pool: list[datasets.Dataset], classes: int) -> None:
    """Each class holds out its share of ``pool`` (the rows the split was drawn from) to within one image."""
    pool_counts = sum(class_counts(ds, classes) for ds in pool)
    expected = len(held) * pool_counts / pool_counts.sum()
    assert np.all(np.abs(class_counts(held, classes) - expected) <= 1), (class_counts(held, classes), expected)


def assert_disjoint(splits: Splits, key) -> None:
    """No row in two splits (``key`` names a row by its file or its pixels)."""
    parts = [key(splits.train), key(splits.val), key(splits.test)]
    assert all(len(set(part)) == len(part) for part in parts)
    assert sum(map(len, parts)) == len(set().union(*parts))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


# --- Fashion-MNIST and arrays ------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_loads() -> None:
    splits = load_source("fashion-mnist")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.class_names == FASHION_MNIST_CLASSES and len(splits.class_names) == 10
    assert splits.channels == 1
    first = splits.test[0]
    assert first["image"].mode == "L" and first["image"].size == (28, 28)
    assert first["label"] == 9  # the first test image is an ankle boot
    assert class_counts(splits.val, 10).tolist() == [600] * 10  # 6000 of each class in the train file
    assert class_counts(splits.test, 10).tolist() == [1000] * 10


def write_fashion_mnist_like(folder: Path, counts: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Idx files ``train-*`` and ``t10k-*`` with ``counts[prefix][c]`` images of class ``c``; every image is
    unique (its row number is written into its first two pixels). Returns the labels per prefix."""
    labels, start = {}, 0
    for prefix, per_class in counts.items():
        labels[prefix] = np.repeat(np.arange(len(per_class)), per_class)
        np.random.default_rng(start).shuffle(labels[prefix])
        n = len(labels[prefix])
        images = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
        rows = np.arange(start, start + n)
        images[:, 0, 0], images[:, 0, 1] = rows // 256, rows % 256
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[prefix])
        start += n
    return labels


def test_fashion_mnist_dir_from_env_and_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = write_fashion_mnist_like(tmp_path, {"train": [10] * 4, "t10k": [2] * 4})
    monkeypatch.setenv("FLEXIVIT_FASHION_MNIST_DIR", str(tmp_path))
    splits = load_source("fashion-mnist")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (36, 4, 8)
    assert splits.test["label"] == labels["t10k"].tolist()  # the test file, whole and in order
    monkeypatch.delenv("FLEXIVIT_FASHION_MNIST_DIR")
    assert len(load_source("fashion-mnist", root=str(tmp_path)).train) == 36


def test_fashion_mnist_validation_split_is_carved_from_train(tmp_path: Path) -> None:
    per_class = [30, 45, 60, 75, 90]  # unequal classes, so a plain random split would not keep shares
    write_fashion_mnist_like(tmp_path, {"train": per_class, "t10k": [4] * 5})
    first = load_source("fashion-mnist", root=str(tmp_path), val_fraction=0.2, seed=3)
    again = load_source("fashion-mnist", root=str(tmp_path), val_fraction=0.2, seed=3)
    other = load_source("fashion-mnist", root=str(tmp_path), val_fraction=0.2, seed=4)
    assert (len(first.train), len(first.val), len(first.test)) == (240, 60, 20)
    assert_disjoint(first, contents)
    for splits in (first, other):
        assert_stratified(splits.val, [splits.train, splits.val], 5)
    assert contents(first.val) == contents(again.val) and contents(first.train) == contents(again.train)
    assert set(contents(other.val)) != set(contents(first.val))
    assert contents(other.test) == contents(first.test)  # a shipped test split does not move with the seed


def test_select_classes_subsets_every_split(tmp_path: Path) -> None:
    write_fashion_mnist_like(tmp_path, {"train": [10] * 4, "t10k": [2] * 4})
    splits = load_source("fashion-mnist", root=str(tmp_path))
    tops = select_classes(splits, ["Pullover", "T-shirt/top"])  # classes 2 and 0, relabelled 0 and 1
    for name in ("train", "val", "test"):
        before, after = getattr(splits, name), getattr(tops, name)
        assert list(after["label"]) == [{2: 0, 0: 1}[l] for l in before["label"] if l in (0, 2)]
        assert contents(after) == [c for c, l in zip(contents(before), before["label"]) if l in (0, 2)]


def test_run_data_evaluates_val_or_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_mnist_like(tmp_path, {"train": [10] * 4, "t10k": [3] * 4})
    monkeypatch.setenv("FLEXIVIT_FASHION_MNIST_DIR", str(tmp_path))
    cfg = Config()
    cfg.data.eval_limit = 6  # cuts the 12 test images, not the 4 validation ones
    data = build_data(cfg)
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 6)
    for split in ("val", "test"):
        labels = torch.cat([b["label"] for b in eval_loader(cfg, data, split)])
        assert labels.tolist() == list(getattr(data.splits, split)["label"])[: len(labels)]
    assert eval_loader(cfg, data).dataset is data.val  # periodic evaluation selects on validation
    with pytest.raises(ValueError, match=r"one of \('val', 'test'\), got 'train'"):
        eval_loader(cfg, data, "train")


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist", root=str(tmp_path))


@pytest.mark.parametrize("shape", [(6, 9, 7), (6, 9, 7, 1), (6, 9, 7, 3)])
def test_from_arrays_round_trip(shape: tuple[int, ...]) -> None:
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    ds = from_arrays(images, [0, 1, 2, 0, 1, 2], ["a", "b", "c"])
    assert ds.features["label"].names == ["a", "b", "c"]
    back = np.stack([np.asarray(im) for im in ds["image"]])
    assert np.array_equal(back, images.reshape(back.shape))
    with pytest.raises(TypeError, match="uint8"):
        from_arrays(images.astype(np.float32), [0] * 6, ["a"])
    with pytest.raises(ValueError, match="labels must lie"):
        from_arrays(images, [0, 1, 2, 3, 4, 5], ["a", "b"])


# --- image folders -----------------------------------------------------------------------------


@pytest.mark.parametrize("test_dir", ["test", "val"])
def test_folder_with_a_test_folder(tmp_path: Path, cache: str, test_dir: str) -> None:
    """A ``test/`` (or, alone, a ``val/``) folder is the test split; validation comes from ``train/``."""
    write_images(tmp_path / "data" / "train", {"cat": 4, "dog": 3, "eel": 2})
    write_images(tmp_path / "data" / test_dir, {"cat": 1, "dog": 2, "eel": 1})
    splits = load_source(str(tmp_path / "data"), val_fraction=1 / 3, cache_dir=cache)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 4)
    assert splits.class_names == ["cat", "dog", "eel"] and splits.channels == 3
    assert sorted(splits.test["label"]) == [0, 1, 1, 2]
    assert all(f"/{test_dir}/" in p for p in paths(splits.test))
    assert sorted(splits.val["label"]) == [0, 1, 2]  # one of each class: their shares of 3 are 1.3, 1, 0.7
    assert all("/train/" in p for p in paths(splits.train) + paths(splits.val))


def test_folder_with_val_and_test_folders_keeps_both(tmp_path: Path, cache: str) -> None:
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        write_images(tmp_path / split, {"cat": count, "dog": count})
    splits = load_source(str(tmp_path), cache_dir=cache)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 4, 2)
    for split in ("train", "val", "test"):
        assert all(f"/{split}/" in p for p in paths(getattr(splits, split)))


def test_folder_without_splits_holds_out_test_then_validation(tmp_path: Path, cache: str) -> None:
    # "test" in a file name must not turn into a split (HF's own inference would do that).
    write_images(tmp_path, {"test": 12, "b": 18, "c": 30})
    first = load_source(str(tmp_path), val_fraction=0.2, seed=3, cache_dir=cache)
    again = load_source(str(tmp_path), val_fraction=0.2, seed=3, cache_dir=cache)
    other = load_source(str(tmp_path), val_fraction=0.2, seed=4, cache_dir=cache)
    assert (len(first.train), len(first.val), len(first.test)) == (38, 10, 12)  # 60 → 12 test, 48 → 10 val
    assert_disjoint(first, paths)
    assert len(set(paths(first.train) + paths(first.val) + paths(first.test))) == 60
    for splits in (first, other):
        assert_stratified(splits.test, [splits.train, splits.val, splits.test], 3)
        assert_stratified(splits.val, [splits.train, splits.val], 3)
    for split in ("train", "val", "test"):
        assert paths(getattr(first, split)) == paths(getattr(again, split))
    assert set(paths(other.val)) != set(paths(first.val)) and set(paths(other.test)) != set(paths(first.test))


def test_a_split_too_small_to_stratify_is_a_clear_error(tmp_path: Path, cache: str) -> None:
    write_images(tmp_path / "one", {"a": 1, "b": 9})
    with pytest.raises(ValueError, match="smallest class has 1.*Raise data.val_fraction"):
        load_source(str(tmp_path / "one"), val_fraction=0.3, cache_dir=cache)
    write_images(tmp_path / "few" / "train", {"a": 10, "b": 10, "c": 10})
    write_images(tmp_path / "few" / "test", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(ValueError, match="validation split: 0.05 of 30 training images is 2.*3 classes"):
        load_source(str(tmp_path / "few"), val_fraction=0.05, cache_dir=cache)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        load_source(str(tmp_path / "few"), val_fraction=0.0, cache_dir=cache)


def test_grayscale_folder_reports_one_channel(tmp_path: Path, cache: str) -> None:
    write_images(tmp_path, {"a": 6, "b": 6}, mode="L")
    assert load_source(str(tmp_path), val_fraction=0.34, cache_dir=cache).channels == 1


def test_folder_errors_name_the_path_and_layout(tmp_path: Path, cache: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}.*one sub-folder per class"):
        load_source(str(tmp_path / "nope"), cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}.*no images"):
        load_source(str(tmp_path / "empty"), cache_dir=cache)
    (tmp_path / "texts" / "a").mkdir(parents=True)
    (tmp_path / "texts" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        load_source(str(tmp_path / "texts"), cache_dir=cache)
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="images directly in"):
        load_source(str(tmp_path), cache_dir=cache)


# --- hf: sources -------------------------------------------------------------------------------


def small_hub_dataset(n: int, labels: list) -> datasets.Dataset:
    rng = np.random.default_rng(n)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"img": images, "fine": labels[:n], "extra": list(range(n))})


def test_hf_save_to_disk_folder(tmp_path: Path, cache: str) -> None:
    """A ``validation`` split without a ``test`` split is the test split; validation comes from train."""
    label = datasets.ClassLabel(names=["x", "y", "z"])
    train = small_hub_dataset(9, [0, 1, 2] * 3).cast_column("fine", label)
    val = small_hub_dataset(3, [2, 1, 0]).cast_column("fine", label)
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(tmp_path / "saved")
    splits = load_source(f"hf:{tmp_path / 'saved'}", image_column="img", label_column="fine", val_fraction=1 / 3,
                         cache_dir=cache)
    assert splits.train.column_names == ["image", "label"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    assert splits.class_names == ["x", "y", "z"] and splits.channels == 3
    assert splits.test["label"] == [2, 1, 0]
    assert sorted(splits.val["label"]) == [0, 1, 2]


def test_hf_validation_split_is_carved_from_train(tmp_path: Path, cache: str) -> None:
    labels = [0] * 8 + [1] * 24 + [2] * 48
    datasets.DatasetDict(
        {"train": small_hub_dataset(80, labels), "test": small_hub_dataset(6, [0, 1, 2] * 2)}
    ).save_to_disk(tmp_path / "saved")

    def load(seed: int) -> Splits:
        return load_source(f"hf:{tmp_path / 'saved'}", image_column="img", label_column="fine", seed=seed,
                           val_fraction=0.25, cache_dir=cache)

    first, again, other = load(5), load(5), load(6)
    assert (len(first.train), len(first.val), len(first.test)) == (60, 20, 6)
    assert_disjoint(first, contents)
    for splits in (first, other):
        assert_stratified(splits.val, [splits.train, splits.val], 3)
    assert contents(first.val) == contents(again.val) and contents(first.train) == contents(again.train)
    assert set(contents(other.val)) != set(contents(first.val))
    assert contents(other.test) == contents(first.test)


def test_hf_validation_and_test_splits_are_both_kept(tmp_path: Path, cache: str) -> None:
    parts = {"train": small_hub_dataset(6, [0, 1] * 3), "validation": small_hub_dataset(4, [1, 1, 0, 0]),
             "test": small_hub_dataset(2, [0, 1])}
    datasets.DatasetDict(parts).save_to_disk(tmp_path / "saved")
    splits = load_source(f"hf:{tmp_path / 'saved'}", image_column="img", label_column="fine", cache_dir=cache)
    for name, split in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        assert contents(split) == [image.tobytes() for image in parts[name]["img"]]  # whole, in order


def test_hf_parquet_folder_with_string_labels_is_held_out(tmp_path: Path, cache: str) -> None:
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds = small_hub_dataset(12, ["owl", "bee", "ant"] * 4)
    ds.to_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    splits = load_source(
        f"hf:{tmp_path / 'repo'}", image_column="img", label_column="fine", val_fraction=0.25,
        cache_dir=cache,
    )  # fmt: skip
    assert splits.class_names == ["ant", "bee", "owl"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    assert sorted(splits.test["label"]) == sorted(splits.val["label"]) == [0, 1, 2]


def test_hf_int_labels_without_classlabel(tmp_path: Path, cache: str) -> None:
    datasets.DatasetDict(
        {"train": small_hub_dataset(6, [3, 7, 3, 7, 3, 7]), "test": small_hub_dataset(2, [7, 3])}
    ).save_to_disk(tmp_path / "saved")
    splits = load_source(f"hf:{tmp_path / 'saved'}", image_column="img", label_column="fine", val_fraction=0.34)
    assert splits.class_names == ["3", "7"]
    assert sorted(list(splits.train["label"]) + list(splits.val["label"])) == [0, 0, 0, 1, 1, 1]
    assert splits.test["label"] == [1, 0]


def test_hf_missing_split_or_column(tmp_path: Path, cache: str) -> None:
    datasets.DatasetDict({"train": small_hub_dataset(4, [0, 1, 0, 1])}).save_to_disk(tmp_path / "s")
    with pytest.raises(ValueError, match="no split.*'holdout'"):
        load_source(f"hf:{tmp_path / 's'}", split_test="holdout", image_column="img")
    with pytest.raises(ValueError, match="no column.*'image'"):
        load_source(f"hf:{tmp_path / 's'}", label_column="fine")


# --- transforms --------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("source_mode", ["L", "RGB"])
@pytest.mark.parametrize("channels", [1, 3])
def test_channels_shapes_and_ranges(train: bool, source_mode: str, channels: int) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 26, 3), dtype=np.uint8))
    image = image.convert(source_mode)
    out = build_transform(image_size=24, channels=channels, train=train)(image)
    assert out.shape == (channels, 24, 24) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0  # mean 0.5, std 0.5: [0, 1] → [-1, 1]
    if source_mode == "L" and channels == 3:
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    raw = build_transform(image_size=24, channels=channels, train=train, mean=0.0, std=1.0)(image)
    assert raw.min() >= 0.0 and raw.max() <= 1.0


def test_mean_std_length_must_match_channels() -> None:
    with pytest.raises(ValueError, match="mean has 3 values"):
        build_transform(image_size=8, channels=1, train=False, mean=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="channels must be 1"):
        build_transform(image_size=8, channels=2, train=True)


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_on_grayscale(channels: int) -> None:
    # A 3-value fill on an "L" image makes timm's RandAugment raise; the RGB detour avoids it.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    transform = build_transform(
        image_size=32, channels=channels, train=True, randaugment="rand-m9-mstd0.5",
        mean=(0.485, 0.456, 0.406)[:channels], std=(0.229, 0.224, 0.225)[:channels],
    )  # fmt: skip
    random.seed(0)
    outs = [transform(image) for _ in range(60)]
    assert all(o.shape == (channels, 32, 32) and torch.isfinite(o).all() for o in outs)


def test_eval_transform_is_deterministic() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    transform = build_transform(image_size=24, channels=3, train=False, crop_pct=0.875)
    assert torch.equal(transform(image), transform(image))
    random.seed(0)
    train = build_transform(image_size=24, channels=3, train=True)
    assert not torch.equal(train(image), train(image))


# --- corrupt images and loaders ----------------------------------------------------------------


@pytest.fixture
def folder_with_corrupt_image(tmp_path: Path, cache: str) -> datasets.Dataset:
    write_images(tmp_path / "data" / "train", {"a": 3, "b": 3})
    for split in ("val", "test"):  # shipped, so that the broken image stays in the train split
        write_images(tmp_path / "data" / split, {"a": 1, "b": 1})
    (tmp_path / "data" / "train" / "b" / "broken.png").write_bytes(b"\x89PNG but not really")
    return load_source(str(tmp_path / "data"), cache_dir=cache).train


def test_corrupt_image_error_names_the_file(folder_with_corrupt_image: datasets.Dataset) -> None:
    ds = TransformedDataset(folder_with_corrupt_image, build_transform(image_size=8, channels=3, train=False))
    with pytest.raises(CorruptImageError, match="broken.png"):
        [ds[i] for i in range(len(ds))]


def test_corrupt_image_skip_drops_and_counts(folder_with_corrupt_image: datasets.Dataset) -> None:
    transform = build_transform(image_size=8, channels=1, train=True)
    ds = TransformedDataset(folder_with_corrupt_image, transform, on_corrupt="skip")
    batches = list(make_loader(ds, batch_size=4, shuffle=True, seed=0, drop_last=False))
    assert sum(b["skipped"] for b in batches) == 1
    assert sum(len(b["label"]) for b in batches) == 6
    assert all(b["image"].shape[1:] == (1, 8, 8) for b in batches if len(b["label"]))
    empty = collate([None, None])
    assert empty["skipped"] == 2 and empty["label"].shape == (0,)


def labelled_dataset(n: int = 40) -> TransformedDataset:
    images = np.random.default_rng(0).integers(0, 256, (n, 12, 12), dtype=np.uint8)
    hf = from_arrays(images, np.arange(n) % 10, [str(i) for i in range(10)])
    return TransformedDataset(hf, build_transform(image_size=12, channels=1, train=True, scale=(0.3, 1.0)))


def test_make_loader_order_follows_seed() -> None:
    ds = labelled_dataset()

    def order(seed: int) -> list[list[int]]:
        loader = make_loader(ds, batch_size=8, shuffle=True, seed=seed, drop_last=True)
        return [b["label"].tolist() for b in loader]

    assert order(0) == order(0) and order(0) != order(1)
    batch = next(iter(make_loader(ds, batch_size=8, shuffle=False, seed=0, drop_last=True)))
    assert batch["image"].shape == (8, 1, 12, 12) and batch["label"].dtype == torch.long
    assert batch["label"].tolist() == list(range(8))


def test_seeded_augmentations_follow_sample_and_epoch_not_workers() -> None:
    """With ``seed`` set, a sample's augmented view depends on (seed, epoch, index) only: the same with
    0 or 1 workers, and new at the next epoch (workers are not persistent, so they see set_epoch)."""
    ds = labelled_dataset(16)
    ds.seed = 7

    def epoch(n: int, workers: int) -> torch.Tensor:
        ds.set_epoch(n)
        loader = make_loader(ds, batch_size=8, shuffle=False, seed=0, num_workers=workers, drop_last=False)
        assert not loader.persistent_workers
        return torch.cat([b["image"] for b in loader])

    assert torch.equal(epoch(0, 0), epoch(0, 1))
    assert torch.equal(epoch(1, 0), epoch(1, 1))
    assert not torch.equal(epoch(0, 1), epoch(1, 1))


def test_workers_keep_enough_batches_ready_for_a_token_budget_step() -> None:
    ds = labelled_dataset(16)
    assert make_loader(ds, batch_size=4, shuffle=False, seed=0, num_workers=2, prefetch_batches=10,
                       drop_last=False).prefetch_factor == 5  # 2 workers x 5 = the 10 batches asked for
    assert make_loader(ds, batch_size=4, shuffle=False, seed=0, num_workers=1, prefetch_batches=1,
                       drop_last=False).prefetch_factor == 2  # never below torch's default
    assert make_loader(ds, batch_size=4, shuffle=False, seed=0, drop_last=False).prefetch_factor is None


def test_evaluation_holds_out_no_validation_split_so_tiny_test_sets_load(tmp_path):
    """`flexivit eval` scores test alone: a dataset too small to stratify a validation split still loads."""
    from flexivit.eval.evaluate import load_eval_splits

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(6, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    splits = {"train": from_arrays(images[:3], labels[:3], ["a", "b", "c"]),
              "test": from_arrays(images[3:], labels[3:], ["a", "b", "c"])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "tiny"))
    with pytest.raises(ValueError, match="cannot hold out a stratified validation split"):
        load_source(f"hf:{tmp_path / 'tiny'}")
    source, loaded = load_eval_splits(f"hf:{tmp_path / 'tiny'}", None)
    assert len(loaded.test) == 3 and len(loaded.val) == 0 and len(loaded.train) == 3
