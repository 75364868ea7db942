"""Data sources, transforms and loaders, on files written by the tests (and the Debian Fashion-MNIST).

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

from flexivit.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    CorruptImageError,
    TransformedDataset,
    build_transform,
    collate,
    from_arrays,
    load_source,
    make_loader,
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


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


# --- Fashion-MNIST and arrays ------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_loads() -> None:
    splits = load_source("fashion-mnist")
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert splits.class_names == FASHION_MNIST_CLASSES and len(splits.class_names) == 10
    assert splits.channels == 1
    first = splits.train[0]
    assert first["image"].mode == "L" and first["image"].size == (28, 28)
    assert first["label"] == 9  # the first training image is an ankle boot
    assert sorted(splits.test.unique("label")) == list(range(10))


def test_fashion_mnist_dir_from_env_and_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        arrays[prefix] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", arrays[prefix][0])
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", arrays[prefix][1])
    monkeypatch.setenv("FLEXIVIT_FASHION_MNIST_DIR", str(tmp_path))
    splits = load_source("fashion-mnist")
    assert (len(splits.train), len(splits.test)) == (12, 5)
    assert np.array_equal(np.asarray(splits.test[3]["image"]), arrays["t10k"][0][3])
    assert splits.train["label"] == arrays["train"][1].tolist()
    monkeypatch.delenv("FLEXIVIT_FASHION_MNIST_DIR")
    assert len(load_source("fashion-mnist", root=str(tmp_path)).train) == 12


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
def test_folder_with_split_folders(tmp_path: Path, cache: str, test_dir: str) -> None:
    write_images(tmp_path / "data" / "train", {"cat": 4, "dog": 3, "eel": 2})
    write_images(tmp_path / "data" / test_dir, {"cat": 1, "dog": 2, "eel": 1})
    splits = load_source(str(tmp_path / "data"), cache_dir=cache)
    assert (len(splits.train), len(splits.test)) == (9, 4)
    assert splits.class_names == ["cat", "dog", "eel"] and splits.channels == 3
    assert sorted(splits.test["label"]) == [0, 1, 1, 2]
    assert all(f"/{test_dir}/" in p for p in paths(splits.test))


def test_folder_held_out_split_is_deterministic_and_disjoint(tmp_path: Path, cache: str) -> None:
    # "test" in a file name must not turn into a split (HF's own inference would do that).
    write_images(tmp_path, {"test": 10, "b": 10, "c": 10})
    first = load_source(str(tmp_path), val_fraction=0.2, seed=3, cache_dir=cache)
    again = load_source(str(tmp_path), val_fraction=0.2, seed=3, cache_dir=cache)
    other = load_source(str(tmp_path), val_fraction=0.2, seed=4, cache_dir=cache)
    assert (len(first.train), len(first.test)) == (24, 6)
    assert paths(first.test) == paths(again.test) and paths(first.train) == paths(again.train)
    assert not set(paths(first.train)) & set(paths(first.test))
    assert len(set(paths(first.train)) | set(paths(first.test))) == 30
    assert sorted(first.test["label"]) == [0, 0, 1, 1, 2, 2]  # stratified
    assert set(paths(other.test)) != set(paths(first.test))


def test_held_out_split_without_stratification_when_a_class_is_too_small(
    tmp_path: Path, cache: str
) -> None:
    write_images(tmp_path, {"a": 1, "b": 5})
    splits = load_source(str(tmp_path), val_fraction=0.34, cache_dir=cache)
    assert (len(splits.train), len(splits.test)) == (3, 3)


def test_grayscale_folder_reports_one_channel(tmp_path: Path, cache: str) -> None:
    write_images(tmp_path, {"a": 3, "b": 3}, mode="L")
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
    label = datasets.ClassLabel(names=["x", "y", "z"])
    train = small_hub_dataset(9, [0, 1, 2] * 3).cast_column("fine", label)
    val = small_hub_dataset(3, [2, 1, 0]).cast_column("fine", label)
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(tmp_path / "saved")
    splits = load_source(f"hf:{tmp_path / 'saved'}", image_column="img", label_column="fine", cache_dir=cache)
    assert splits.train.column_names == ["image", "label"]
    assert (len(splits.train), len(splits.test)) == (9, 3)
    assert splits.class_names == ["x", "y", "z"] and splits.channels == 3
    assert splits.test["label"] == [2, 1, 0]


def test_hf_parquet_folder_with_string_labels_is_held_out(tmp_path: Path, cache: str) -> None:
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds = small_hub_dataset(12, ["owl", "bee", "ant"] * 4)
    ds.to_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    splits = load_source(
        f"hf:{tmp_path / 'repo'}", image_column="img", label_column="fine", val_fraction=0.25,
        cache_dir=cache,
    )  # fmt: skip
    assert splits.class_names == ["ant", "bee", "owl"]
    assert (len(splits.train), len(splits.test)) == (9, 3)
    assert sorted(splits.test["label"]) == [0, 1, 2]


def test_hf_int_labels_without_classlabel(tmp_path: Path, cache: str) -> None:
    datasets.DatasetDict(
        {"train": small_hub_dataset(6, [3, 7, 3, 7, 3, 7]), "test": small_hub_dataset(2, [7, 3])}
    ).save_to_disk(tmp_path / "saved")
    splits = load_source(f"hf:{tmp_path / 'saved'}", image_column="img", label_column="fine")
    assert splits.class_names == ["3", "7"]
    assert splits.train["label"] == [0, 1, 0, 1, 0, 1] and splits.test["label"] == [1, 0]


def test_hf_missing_split_or_column(tmp_path: Path, cache: str) -> None:
    datasets.DatasetDict({"train": small_hub_dataset(4, [0, 1, 0, 1])}).save_to_disk(tmp_path / "s")
    with pytest.raises(KeyError, match="no split.*'holdout'"):
        load_source(f"hf:{tmp_path / 's'}", split_test="holdout", image_column="img")
    with pytest.raises(KeyError, match="no column.*'image'"):
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
    write_images(tmp_path / "data" / "test", {"a": 1, "b": 1})
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
