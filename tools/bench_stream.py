"""Decode + augment throughput per core on 224-px JPEG tar shards: flexivit's stream vs timm's own loader.

    OMP_NUM_THREADS=1 python tools/bench_stream.py         # writes docs/results/bench_stream.{json,md}
    python tools/bench_stream.py --smoke --out /tmp/b      # a few images, to check that it runs

Makes WebDataset shards of 224x224 RGB JPEGs (Fashion-MNIST training images upsampled bicubically from
28 px, JPEG quality 90; random images with ``--smoke``), then reads the same train shards two ways in one
process, with no data worker and one torch thread (so img/s is per core): ``flexivit.data.streams``
(``data.source="wds:DIR"``, ``TrainStream``) and timm's loader (``timm.data.create_dataset("wds/...")``
+ ``create_loader``). Both apply the same augmentation, a random-resized crop to 224 (scale 0.08-1,
bilinear) and a horizontal flip, then ``ToTensor`` and ``Normalize``; the second configuration adds the
``imagenet`` recipe's RandAugment (``rand-m9-mstd0.5``). Each repeat reads every train image once through
each pipeline, alternating which goes first, timing the process's CPU time (per core: the cores are shared
with other jobs, which move wall time by up to 3x) and wall time; the table gives the median of the
per-repeat ratios. It also times flexivit's start-up scan of the shards (record counts and labels from the
tar headers).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

from flexivit.data import shards as shard_mod  # noqa: E402
from flexivit.data.sources import load_source  # noqa: E402
from flexivit.provenance import write_result  # noqa: E402
from flexivit.data.streams import TrainStream  # noqa: E402
from flexivit.data.transforms import build_transform  # noqa: E402

SIZE = 224
SHARDS = 8
BATCH = 64
CONFIGS = {"crop+flip": None, "crop+flip+RandAugment": "rand-m9-mstd0.5"}
CLOCKS = ("cpu", "wall")


def make_shards(folder: Path, images: int, *, smoke: bool, seed: int = 0) -> None:
    """``SHARDS`` train shards holding ``images`` JPEGs in all, plus one small validation and one test shard
    (a folder source keeps them, so every train shard is read by both pipelines)."""
    import webdataset as wds

    from flexivit.data.fashion_mnist import DEFAULT_DIR, read_idx

    extra = 2 * 16
    if smoke:
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 256, (images + extra, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, images + extra)
    else:
        pixels = read_idx(Path(DEFAULT_DIR) / "train-images-idx3-ubyte.gz")[: images + extra]
        labels = read_idx(Path(DEFAULT_DIR) / "train-labels-idx1-ubyte.gz")[: images + extra]

    def jpeg(image: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(image).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB").save(out, format="JPEG", quality=90)
        return out.getvalue()

    per = images // SHARDS
    groups = [(f"train-{k:03d}.tar", range(k * per, (k + 1) * per)) for k in range(SHARDS)]
    groups += [("validation-000.tar", range(images, images + 16)), ("test-000.tar", range(images + 16, images + 32))]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in groups:
        with wds.TarWriter(str(folder / name)) as writer:
            for i in rows:
                writer.write({"__key__": f"{i:07d}", "jpg": jpeg(pixels[i]), "cls": str(int(labels[i]))})


def ours(folder: Path, randaugment: str | None, images: int) -> Callable[[], Iterable[dict[str, Any]]]:
    splits = load_source(f"wds:{folder}", seed=0)
    transform = build_transform(image_size=SIZE, channels=3, train=True, scale=(0.08, 1.0), hflip=0.5,
                                randaugment=randaugment)
    train = TrainStream(splits.train, transform, on_corrupt="error", seed=0, batch_size=BATCH, mix_width=8)
    open_at = train.opener(rank=0, ranks=1, num_workers=0, device=torch.device("cpu"), prefetch_batches=2)

    def batches() -> Iterable[dict[str, Any]]:
        stream = open_at(0)
        return (next(stream) for _ in range(images // BATCH))

    return batches


def timms(folder: Path, randaugment: str | None, images: int) -> Callable[[], Iterable[Any]]:
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("wds/bench", root=str(folder), split=f"train-{{000..{SHARDS - 1:03d}}}.tar|{images}",
                             is_training=True, batch_size=BATCH)
    loader = create_loader(dataset, input_size=(3, SIZE, SIZE), batch_size=BATCH, is_training=True, scale=(0.08, 1.0),
                           ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=None, auto_augment=randaugment,
                           interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, num_workers=0,
                           use_prefetcher=False, device=torch.device("cpu"), persistent_workers=False)

    def batches() -> Iterable[Any]:
        return (b for _, b in zip(range(images // BATCH), loader))

    return batches


def _timed(batches: Callable[[], Iterable[Any]]) -> tuple[float, float, int]:
    """Wall and CPU seconds (this process: one torch thread, no workers, so one core) to read every batch."""
    wall, cpu, count = time.perf_counter(), time.process_time(), 0
    for batch in batches():
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
        count += images.shape[0]
    return time.perf_counter() - wall, time.process_time() - cpu, count


def scan_us_per_record(folder: Path) -> float:
    """flexivit's start-up scan of the train shards (the cache emptied first), in µs per record."""
    shard_mod._scan_tar.cache_clear()
    paths = sorted(folder.glob("train-*.tar"))
    start = time.perf_counter()
    records = sum(shard_mod.TarShards(str(p)).scan(str(p.resolve())).records for p in paths)
    return 1e6 * (time.perf_counter() - start) / records


def measure(folder: Path, images: int, repeats: int) -> dict[str, Any]:
    rows = []
    for config, randaugment in CONFIGS.items():
        pipelines = {"flexivit": ours(folder, randaugment, images), "timm": timms(folder, randaugment, images)}
        rates: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in pipelines} for clock in CLOCKS}
        for r in range(repeats):
            for name in (list(pipelines) if r % 2 == 0 else list(pipelines)[::-1]):
                wall, cpu, count = _timed(pipelines[name])
                rates["cpu"][name].append(count / cpu)
                rates["wall"][name].append(count / wall)
        row: dict[str, Any] = {"config": config, "randaugment": randaugment}
        for clock, by_name in rates.items():
            ratios = [a / b for a, b in zip(by_name["flexivit"], by_name["timm"])]
            medians = {k: statistics.median(v) for k, v in by_name.items()}
            row[clock] = {"img_per_s": by_name, "median_img_per_s": medians, "ratio_per_repeat": ratios,
                          "median_ratio": statistics.median(ratios)}
        rows.append(row)
    return {"rows": rows, "scan_us_per_record": scan_us_per_record(folder)}


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Streaming: decode + augment throughput per core, flexivit vs timm, on the same JPEG shards", "",
        f"{payload['images']} training images (224x224 RGB JPEG, {payload['data']}) in {SHARDS} WebDataset tar "
        f"shards; batches of {BATCH}; no data worker, {payload['torch_threads']} torch thread, so the process uses "
        f"one core; {payload['repeats']} repeats, each timing the two loaders back to back (alternating which goes "
        "first). Per core: images per second of the process's CPU time; wall: per second of wall time, which other "
        "jobs on the shared cores move by up to 3x between passes. A ratio is the median over repeats of each "
        "pair's ratio (its range in brackets); the img/s columns are each loader's own medians. Per-repeat values "
        "are in the JSON.", "",
        "| augmentation | flexivit stream (img/s per core) | timm wds loader (img/s per core) | flexivit / timm, "
        "per core | flexivit / timm, wall |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        cpu, wall = r["cpu"], r["wall"]
        m = cpu["median_img_per_s"]

        def ratio(d: dict[str, Any]) -> str:
            return f"{d['median_ratio']:.2f} ({min(d['ratio_per_repeat']):.2f}-{max(d['ratio_per_repeat']):.2f})"

        lines.append(f"| {r['config']} | {m['flexivit']:.1f} | {m['timm']:.1f} | {ratio(cpu)} | {ratio(wall)} |")
    lines += ["", f"flexivit's start-up scan of the shards (record counts and labels from the tar headers): "
              f"{payload['scan_us_per_record']:.1f} µs per record (files in the page cache)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_stream")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shards", type=Path, help="where to write the shards (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="random images, 128 of them, 1 repeat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images, repeats = (2 * BATCH, 1) if args.smoke else (args.images, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.shards or Path(tmp) / "shards"
        make_shards(folder, images, smoke=args.smoke)
        payload = {"seeds": [0], "split": "train (generated shards)", "images": images, "repeats": repeats,
                   "data": "random pixels" if args.smoke else "Fashion-MNIST train, upsampled from 28 px",
                   "torch_threads": torch.get_num_threads(), **measure(folder, images, repeats)}
    _, md = write_result(args.out, payload, markdown(payload))
    print(md.read_text())


if __name__ == "__main__":
    main()
