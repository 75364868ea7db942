"""Data time of a training step: the batched path of pixel-keeping transforms vs the per-image PIL pipeline.

    python tools/bench_data.py                  # writes docs/results/bench_data.{md,json}
    python tools/bench_data.py --smoke --out /tmp/b

The quickstart's training transform (no crop, no flip) keeps the pixels of Fashion-MNIST's 28x28 images,
so ``TransformedDataset`` builds its batches with ``AtSize.batch`` (one stacked tensor op). This times
``__getitems__`` for the batch sizes a token-budget step asks for (16, 64, 192 and 784 images at patch
2, 4, 7 and 14) both ways in one process, alternating the two and taking medians (the machines are
shared and noisy), and checks that both give the same tensors. Needs the Debian package
``dataset-fashion-mnist`` (``make data``); ``--smoke`` uses random images instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexivit.data.arrays import from_arrays
from flexivit.data.sources import load_source
from flexivit.data.transforms import TransformedDataset, build_transform, collate

ROOT = Path(__file__).resolve().parent.parent  # the checkout: default folder of results

SIZES = (16, 64, 192, 784)  # images of one step at patch 2 / 4 / 7 / 14 under the quickstart's token budget


def _seconds(ds: TransformedDataset, indices: list[int]) -> float:
    start = time.perf_counter()
    collate(ds.__getitems__(indices))
    return time.perf_counter() - start


def measure(*, smoke: bool, repeats: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    if smoke:
        train = from_arrays(rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8), np.arange(1000) % 10,
                            [str(i) for i in range(10)])
    else:
        train = load_source("fashion-mnist", seed=seed).train
    transform = build_transform(image_size=28, channels=1, train=True, scale=(1.0, 1.0), hflip=0.0)
    batched = TransformedDataset(train, transform, seed=seed)
    per_image = TransformedDataset(train, transform.general, seed=seed)  # the PIL pipeline, image by image
    rows = []
    for size in SIZES:
        indices = rng.choice(len(train), size=min(size, len(train)), replace=False).tolist()
        same = torch.equal(collate(batched.__getitems__(indices))["image"],
                           collate(per_image.__getitems__(indices))["image"])
        times: dict[str, list[float]] = {"batched": [], "per_image": []}
        for _ in range(repeats):
            times["batched"].append(_seconds(batched, indices))
            times["per_image"].append(_seconds(per_image, indices))
        b, p = (statistics.median(times[k]) for k in ("batched", "per_image"))
        rows.append({"images": size, "batched_ms": 1e3 * b, "per_image_ms": 1e3 * p,
                     "speedup": p / b, "identical": same})
    return {"rows": rows, "repeats": repeats, "data": "random 28x28" if smoke else "fashion-mnist train",
            "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()}, torch {torch.__version__}"}


def write(result: dict[str, Any], out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Data time of one training step: batched pixel-keeping transform vs per-image PIL pipeline", "",
        f"Command: `{command}`  ",
        f"Data: {result['data']}; {result['machine']}, torch threads = {result['torch_threads']}; "
        f"median of {result['repeats']} alternating repeats.", "",
        "| images (patch 2 / 4 / 7 / 14 step) | batched (ms) | per image (ms) | speed-up | same tensors |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['images']} | {r['batched_ms']:.2f} | {r['per_image_ms']:.2f} | {r['speedup']:.1f}x | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_data")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="random images, 3 repeats")
    args = parser.parse_args()
    result = measure(smoke=args.smoke, repeats=3 if args.smoke else args.repeats)
    write(result, args.out, "python tools/bench_data.py" + (" --smoke" if args.smoke else ""))
    print(args.out.with_suffix(".md").read_text())
    if not all(r["identical"] for r in result["rows"]):
        sys.exit("the batched path gave other tensors than the per-image pipeline")


if __name__ == "__main__":
    main()
