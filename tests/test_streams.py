"""Streaming sources (``wds:`` tar shards, ``hf-stream:`` data files): splits of whole shards, disjoint shards per
rank and worker, resume at the same sample, augmentation seeded like the map-style path, one-line errors.

Shards are written by the tests themselves with ``webdataset``'s writer; each record's image is random noise,
so a record is recognised by its pixels wherever it lands.
"""

import io
import json
import shutil
import subprocess
import sys
import tarfile
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from flexivit.data.arrays import from_arrays
from flexivit.data.sources import TransformedDataset, load_source
from flexivit.model.patch_embed import PatchScheme
from flexivit.train.sampler import PatchSizeSampler, make_distribution
from flexivit.data.shards import StreamError
from flexivit.train.step_batches import StepBatches
from flexivit.data.streams import RUN_RECORD, TrainStream, slot_order
from flexivit.train.runlock import LOCK_FILE
from flexivit.data.transforms import build_transform

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
SIZE = 8  # image side


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _write(path: Path, images: np.ndarray, labels: np.ndarray, *, drop: str | None = None) -> None:
    """One tar shard of ``images`` (N, H, W) with their ``labels`` as ``.cls``; ``drop`` leaves out that member."""
    with wds.TarWriter(str(path)) as writer:
        for i, (image, label) in enumerate(zip(images, labels)):
            sample = {"__key__": f"{path.stem}_{i:05d}", "png": _png(image), "cls": str(int(label))}
            writer.write({k: v for k, v in sample.items() if k != drop or i != len(images) // 2})


def _data(n: int, seed: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8), rng.integers(0, classes, n)


def _folder(root: Path, sizes: list[int], *, eval_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """train-NNN.tar shards of ``sizes`` records plus validation and test shards; returns the train records in
    listed order (the stream numbers its records through them)."""
    root.mkdir(parents=True, exist_ok=True)
    parts = [_data(n, seed) for seed, n in enumerate(sizes)]
    for k, (images, labels) in enumerate(parts):
        _write(root / f"train-{k:03d}.tar", images, labels)
    for k, name in enumerate(("validation", "test")):
        _write(root / f"{name}-000.tar", *_data(eval_size, 100 + k))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _load(source: str, tmp_path: Path, **kw):
    return load_source(source, cache_dir=str(tmp_path / "hf-cache"), **kw)


def _train(splits, *, batch_size: int = 3, width: int = 2, augment: bool = False, seed: int = 0) -> TrainStream:
    transform = build_transform(image_size=SIZE, channels=1, train=True, scale=(0.3, 1.0) if augment else (1.0, 1.0),
                                hflip=0.5 if augment else 0.0)
    return TrainStream(splits.train, transform, on_corrupt="error", seed=seed, batch_size=batch_size, mix_width=width)


def _batches(train: TrainStream, n: int, *, start: int = 0, rank: int = 0, ranks: int = 1, workers: int = 0):
    open_at = train.opener(rank=rank, ranks=ranks, num_workers=workers, device=CPU, prefetch_batches=2)
    return list(islice(open_at(start), n))


def _pixels(images: torch.Tensor) -> np.ndarray:
    """The uint8 pixels back from an at-size (un-augmented) batch ``(B, 1, H, W)``."""
    return np.rint((images[:, 0].numpy() * 0.5 + 0.5) * 255).astype(np.uint8)


def _ids(batches, train_images: np.ndarray) -> list[int]:
    """Which train record each image of ``batches`` is (by its pixels)."""
    lookup = {img.tobytes(): i for i, img in enumerate(train_images)}
    return [lookup[p.tobytes()] for b in batches for p in _pixels(b["image"])]


# --- order --------------------------------------------------------------------------------------------------


def test_slot_order_covers_each_epoch_once_keeps_file_order_and_resumes_anywhere():
    counts = [5, 3, 7, 1, 4, 6, 2, 8]
    slots, width = 3, 2
    full = {s: list(islice(slot_order(counts, seed=7, slot=s, slots=slots, width=width), 120)) for s in range(slots)}
    for epoch in range(2):  # every record once per epoch, over all slots
        seen = [(k, i) for s in range(slots) for e, k, i in full[s] if e == epoch]
        assert sorted(seen) == [(k, i) for k, n in enumerate(counts) for i in range(n)]
        for s in range(slots):  # each shard read in file order within a slot's epoch
            for k in range(len(counts)):
                assert [i for e, kk, i in full[s] if e == epoch and kk == k] in ([], list(range(counts[k])))
        shards = [{k for e, k, _ in full[s] if e == epoch} for s in range(slots)]
        assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1:])  # disjoint shards
    first = [k for _, k, _ in full[0][:8]]
    assert len(set(first)) > 1  # records of a group's shards are interleaved, not one shard after another
    for start in range(0, 110, 7):  # a stream opened at any record continues exactly
        again = list(islice(slot_order(counts, seed=7, slot=1, slots=slots, width=width, start=start), 10))
        assert again == full[1][start:start + 10]
    other = list(islice(slot_order(counts, seed=8, slot=1, slots=slots, width=width), 120))
    assert other != full[1]  # the seed draws the order


# --- splits -------------------------------------------------------------------------------------------------


def test_a_pattern_holds_out_whole_shards_for_validation_and_test(tmp_path):
    for k in range(10):
        _write(tmp_path / f"part-{k:03d}.tar", *_data(3 + k, k))
    source = f"wds:{tmp_path}/part-{{000..009}}.tar"
    splits = _load(source, tmp_path, val_fraction=0.1, seed=0)
    train = [s.name for s in splits.train.shards]
    held = {n: [s.name for s in splits.train.held[n]] for n in ("val", "test")}
    assert len(train) == 8 and len(held["val"]) == len(held["test"]) == 1
    assert set(train) | set(held["val"]) | set(held["test"]) == {f"part-{k:03d}.tar" for k in range(10)}
    assert len(splits.train) == sum(3 + int(n[5:8]) for n in train)
    assert len(splits.val) == 3 + int(held["val"][0][5:8]) and len(splits.test) == 3 + int(held["test"][0][5:8])
    assert splits.class_names == ["0", "1", "2"] and splits.channels == 1
    again = _load(source, tmp_path, val_fraction=0.1, seed=0)
    assert [s.name for s in again.train.shards] == train  # the same seed holds out the same shards
    others = {tuple(s.name for s in _load(source, tmp_path, val_fraction=0.1, seed=s).train.shards) for s in range(6)}
    assert len(others) > 1
    assert len(_load(source, tmp_path, val_fraction=0.3, seed=0).train.shards) == 4  # 3 test, then 3 of 7 val
    with pytest.raises(StreamError, match="leaves none to train on"):
        _load(f"wds:{tmp_path}/part-00{{0..1}}.tar", tmp_path, val_fraction=0.1, seed=0)


def test_a_folder_keeps_its_validation_and_test_shards(tmp_path):
    images, labels = _folder(tmp_path / "shards", [4, 5, 6])
    splits = _load(f"wds:{tmp_path / 'shards'}", tmp_path)
    assert [s.name for s in splits.train.shards] == ["train-000.tar", "train-001.tar", "train-002.tar"]
    assert len(splits.train) == 15 and len(splits.val) == len(splits.test) == 4
    val_images, val_labels = _data(4, 100)
    row = splits.val.with_format("numpy")[:]
    assert row["label"].tolist() == val_labels.tolist()
    assert np.stack([np.asarray(Image.open(io.BytesIO(r["bytes"]))) for r in splits.val.cast_column(
        "image", datasets.Image(decode=False))["image"]]).tobytes() == val_images.tobytes()


# --- batches: ranks, workers, resume, augmentation ---------------------------------------------------------


def test_ranks_and_workers_read_disjoint_shards_and_all_of_them_each_epoch(tmp_path):
    images, _ = _folder(tmp_path / "shards", [6] * 8)
    train = _train(_load(f"wds:{tmp_path / 'shards'}", tmp_path))
    # 2 ranks x 2 workers = 4 slots of 2 shards (12 records, 4 batches of 3) each: 8 batches a rank an epoch.
    ranks = [_ids(_batches(train, 16, rank=r, ranks=2, workers=2), images) for r in (0, 1)]
    for epoch in (slice(0, 24), slice(24, 48)):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert not set(a) & set(b) and sorted(a + b) == list(range(48))
    assert ranks[0][:24] != ranks[0][24:]  # the next epoch is another order
    shards = [{i // 6 for i in r[:24]} for r in ranks]
    assert not shards[0] & shards[1] and all(len(s) == 4 for s in shards)  # whole shards per rank


@pytest.mark.parametrize("workers,starts", [(0, [1, 4, 9, 13]), (2, [3, 6])])
def test_a_stream_opened_at_a_batch_continues_bit_identically(tmp_path, workers, starts):
    _folder(tmp_path / "shards", [5, 7, 4, 6])
    train = _train(_load(f"wds:{tmp_path / 'shards'}", tmp_path), augment=True)
    full = _batches(train, 18, workers=workers)  # 22 records: past an epoch at batch 7
    for start in starts:
        for a, b in zip(_batches(train, 18 - start, start=start, workers=workers), full[start:]):
            assert a["image"].equal(b["image"]) and a["label"].equal(b["label"])


def test_augmentation_is_seeded_from_seed_epoch_and_record_like_the_map_style_path(tmp_path):
    images, labels = _folder(tmp_path / "shards", [5, 7, 4])
    stream = _train(_load(f"wds:{tmp_path / 'shards'}", tmp_path), augment=True, seed=3)
    reference = TransformedDataset(from_arrays(images, labels, ["0", "1", "2"]), stream.transform, seed=3)
    order = list(islice(slot_order([5, 7, 4], seed=3, slot=0, slots=1, width=2), 15))
    batches = _batches(stream, 5)
    got = torch.cat([b["image"] for b in batches])
    base = {0: 0, 1: 5, 2: 12}
    for position, (epoch, shard, index) in enumerate(order):
        assert epoch == 0
        expected = reference[base[shard] + index]
        assert got[position].equal(expected["image"])
        assert int(torch.cat([b["label"] for b in batches])[position]) == expected["label"]


def test_step_batches_take_the_token_budget_batches_from_a_stream_and_resume_at_the_step(tmp_path):
    _folder(tmp_path / "shards", [6, 6, 5])
    train = _train(_load(f"wds:{tmp_path / 'shards'}", tmp_path), batch_size=2, augment=True)
    sampler = PatchSizeSampler(schemes=[PatchScheme(2), PatchScheme(4), PatchScheme(8)],
                               distribution=make_distribution("uniform"), seed=0, image_size=SIZE)

    def steps(start: int, stop: int) -> list[torch.Tensor]:
        batches = StepBatches(sampler=sampler, image_hw=(SIZE, SIZE), batch_size=2, token_budget=2 * 16, grad_accum=2)
        batches.attach_stream(train.opener(rank=0, ranks=1, num_workers=0, device=CPU, prefetch_batches=2), step=start)
        return [m["image"] for s in range(start, stop) for m in batches.micro_batches(s)]

    straight = steps(0, 10)
    sizes = [m.shape[0] for m in straight]
    assert sizes == [2 * loader_joined for s in range(10) for loader_joined in
                     [max(1, 32 // (2 * (SIZE // sampler.at(s).patch) ** 2))] * 2]
    assert len(set(sizes)) > 1  # patch 8 steps join several loader batches
    resumed = steps(6, 10)
    assert all(a.equal(b) for a, b in zip(resumed, straight[-len(resumed):]))


def test_hf_stream_reads_data_files_as_shards(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    folder = tmp_path / "hfdata" / "data"
    folder.mkdir(parents=True)
    records = []
    for k, (split, n) in enumerate([("train", 5), ("train", 6), ("train", 4), ("train", 7), ("test", 3)]):
        images, labels = _data(n, k)
        rows = [{"image": {"bytes": _png(i), "path": None}, "label": int(l)} for i, l in zip(images, labels)]
        index = sum(1 for s, _ in records if s == split)
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / f"{split}-{index:05d}.parquet"))
        records.append((split, images))
    splits = _load(f"hf-stream:{tmp_path / 'hfdata'}", tmp_path, val_fraction=0.2, seed=0)
    assert splits.class_names == ["a", "b", "c"] and len(splits.test) == 3
    assert len(splits.train.shards) == 3 and len(splits.val) + len(splits.train) == 22
    train = _train(splits, augment=True)
    full = _batches(train, 9)
    for a, b in zip(_batches(train, 5, start=4), full[4:]):
        assert a["image"].equal(b["image"]) and a["label"].equal(b["label"])
    plain = _train(splits)
    every = np.concatenate([im for s, im in records if s == "train"])
    seen = {p.tobytes() for b in _batches(plain, 6) for p in _pixels(b["image"])}
    assert seen <= {i.tobytes() for i in every} and len(seen) == len(splits.train)  # one epoch: each record once


# --- bad input ----------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_record_without_a_label_is_refused(tmp_path):
    _folder(tmp_path / "shards", [4, 4])
    _write(tmp_path / "shards" / "train-001.tar", *_data(4, 9), drop="cls")
    with pytest.raises(StreamError) as err:
        _load(f"wds:{tmp_path / 'shards'}", tmp_path)
    assert "train-001.tar: record 'train-001_00002' has no label" in _one_line(err)


def test_a_stream_without_a_label_column_is_refused(tmp_path):
    folder = tmp_path / "hfdata"
    folder.mkdir()
    rows = [{"image": {"bytes": _png(i), "path": None}} for i in _data(4, 0)[0]]
    datasets.Dataset.from_list(rows, features=datasets.Features({"image": datasets.Image()})).to_parquet(
        str(folder / "train-00000.parquet"))
    with pytest.raises(StreamError) as err:
        _load(f"hf-stream:{folder}", tmp_path)
    assert "has no column ['label']" in _one_line(err) and "data.label_column" in str(err.value)


def test_a_shard_truncated_mid_record_is_refused_before_anything_trains(tmp_path):
    _folder(tmp_path / "shards", [4, 4, 4])
    shard = tmp_path / "shards" / "train-002.tar"
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][2]
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])  # inside record 2's image
    with pytest.raises(StreamError) as err:
        _load(f"wds:{tmp_path / 'shards'}", tmp_path)
    assert "train-002.tar is truncated or damaged after 2 records" in _one_line(err)


def test_resume_over_changed_shards_ranks_or_workers_is_refused_naming_the_change(tmp_path):
    _folder(tmp_path / "shards", [4, 4, 4])
    out = tmp_path / "run"
    out.mkdir()
    train = _train(_load(f"wds:{tmp_path / 'shards'}", tmp_path))
    assert train.check_run(out, step=0, ranks=1, workers=1) is None  # a fresh run writes its record
    record = (out / RUN_RECORD).read_text()
    assert train.check_run(out, step=5, ranks=1, workers=1) is None
    assert "processes 1 -> 2" in train.check_run(out, step=5, ranks=2, workers=1)
    assert "data workers per process" in train.check_run(out, step=5, ranks=1, workers=2)
    assert "cannot feed 2 processes x 2 data workers" in train.check_run(out, step=5, ranks=2, workers=2)
    _write(tmp_path / "shards" / "train-003.tar", *_data(4, 7))
    _write(tmp_path / "shards" / "train-001.tar", *_data(5, 8))
    (tmp_path / "shards" / "train-000.tar").unlink()
    changed = _train(_load(f"wds:{tmp_path / 'shards'}", tmp_path)).check_run(out, step=5, ranks=1, workers=1)
    assert "\n" not in changed
    assert "train shards removed: train-000.tar" in changed and "train shards added: train-003.tar" in changed
    assert "train shard train-001.tar: 4 records" in changed and "-> 5 /" in changed
    assert (out / RUN_RECORD).read_text() == record  # nothing rewritten


# --- end to end -----------------------------------------------------------------------------------------------


def _fashion_shards(root: Path) -> None:
    """Fashion-MNIST's first 680 training images as 8 train shards of 60 (PNG), 100 validation and 100 test."""
    from flexivit.data.fashion_mnist import DEFAULT_DIR, read_idx

    images = read_idx(Path(DEFAULT_DIR) / "train-images-idx3-ubyte.gz")[:680]
    labels = read_idx(Path(DEFAULT_DIR) / "train-labels-idx1-ubyte.gz")[:680]
    root.mkdir(parents=True)
    for k in range(8):
        _write(root / f"train-{k:03d}.tar", images[60 * k:60 * (k + 1)], labels[60 * k:60 * (k + 1)])
    _write(root / "validation-000.tar", images[480:580], labels[480:580])
    _write(root / "test-000.tar", images[580:680], labels[580:680])


@pytest.mark.slow
def test_flexivit_train_on_shards_resumes_bit_identically_and_refuses_changed_shards(tmp_path):
    """12 steps with the quickstart's token budget (patch-14 steps read 784 images, more than an epoch) and two
    data workers, straight and resumed from the step-4 checkpoint of the same run, give the same weights."""
    shards = tmp_path / "shards"
    _fashion_shards(shards)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "PYTHONPATH": str(ROOT)}
    sets = [a for s in ["model.embed_dim=32", "model.depth=1", "train.steps=12", "train.checkpoint_every=4",
                        "train.keep_checkpoints=3", "train.log_every=4", "data.num_workers=2", "data.eval_limit=64"]
            for a in ("--set", s)]

    def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flexivit", "train", "fashion_mnist:smoke", "--data",
                               f"wds:{shards}", "--out", str(out), *sets, *extra], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=300)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight).returncode == 0
    shutil.copytree(straight, resumed)
    for later in ("state/step_8", "state/step_12"):
        shutil.rmtree(resumed / later)
    (resumed / "model.safetensors").unlink()
    again = train(resumed, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "(step 4)" in again.stdout
    from safetensors.torch import load_file

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    report = json.loads((resumed / "eval.json").read_text())
    assert report["images_seen"] == json.loads((straight / "eval.json").read_text())["images_seen"] > 480
    record = json.loads((straight / RUN_RECORD).read_text())
    assert record["workers"] == 2 and len(record["splits"]["train"]) == 8

    _write(shards / "train-008.tar", *_data(60, 1))  # a shard more: the stream is not the one the run started on
    before = sorted((p.relative_to(resumed), p.stat().st_mtime_ns) for p in resumed.rglob("*"))
    refused = train(resumed, "--resume")
    assert refused.returncode == 2
    lines = [l for l in refused.stderr.splitlines() if "error" in l]
    assert len(lines) == 1 and "train shards added: train-008.tar" in lines[0]
    after = sorted((p.relative_to(resumed), p.stat().st_mtime_ns) for p in resumed.rglob("*"))
    assert [p for p, _ in after] == [p for p, _ in before]
    changed = [p for (p, t), (_, u) in zip(before, after) if t != u]
    assert changed == [Path(LOCK_FILE), Path("config.json")]  # written by every start, before the data is read


def test_select_reads_a_sample_of_the_stream_as_a_table(tmp_path):
    images, labels = _folder(tmp_path / "shards", [5, 7, 4])
    stream = _load(f"wds:{tmp_path / 'shards'}", tmp_path).train
    rows = [3, 11, 0, 15]
    table = stream.select(rows).cast_column("image", datasets.Image(decode=False))
    assert [np.asarray(Image.open(io.BytesIO(r["bytes"]))).tobytes() for r in table["image"]] == [
        images[i].tobytes() for i in rows]
    assert table["label"] == labels[rows].tolist()
    with pytest.raises(IndexError):
        stream.select([16])


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_header_scan_finds_what_tarfile_finds(tmp_path, fmt):
    """The fast member walk of the start-up scan against ``tarfile`` itself: long names (pax records, GNU ``L``
    members, ustar prefixes), folders, empty and multi-block members."""
    from flexivit.data.shards import _tar_members

    path = tmp_path / "shard.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, size in enumerate([0, 1, 511, 512, 513, 3000]):
            folder = "d" * 60 + "/" + "e" * 60 if i % 2 else "top"
            info = tarfile.TarInfo(f"{folder}/{'k' * (40 if i % 3 else 5)}{i:03d}.jpg")
            info.size = size
            tar.addfile(info, io.BytesIO(rng.bytes(size)))
            tar.addfile(_folder_info(f"dir{i}"))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.size, m.offset_data) for m in tar if m.isreg()]
    with open(path, "rb") as f:
        assert list(_tar_members(f, path.stat().st_size)) == expected
    assert len(expected) == 6 and any(len(n) > 100 for n, _, _ in expected)


def _folder_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_a_shard_cut_anywhere_is_refused_unless_cut_between_records(tmp_path):
    """Every cut of a shard either falls between two records (at the next record's first header, or in the zero
    blocks that end the archive: a shorter shard of the records before it, which webdataset then reads whole)
    or is refused as truncated."""
    from flexivit.data.shards import TarShards

    full = tmp_path / "full.tar"
    _write(full, *_data(4, 0))
    with tarfile.open(full) as tar:
        members = tar.getmembers()  # .cls then .png for each record
    starts = [m.offset for m in members[0::2]]
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512  # the last member's padded end
    between = {k + 1: range(starts[k + 1], starts[k + 1] + 1) for k in range(3)}  # a cut there keeps k + 1 records
    between[4] = range(end, len(full.read_bytes()) + 1)
    data = full.read_bytes()
    cut_file = tmp_path / "cut.tar"
    for cut in [*range(1, len(data), 97), *(r[0] for r in between.values()), *(r[-1] for r in between.values())]:
        cut_file.write_bytes(data[:cut])
        kept = [k for k, r in between.items() if cut in r]
        try:
            shard = TarShards(str(cut_file)).scan(str(cut_file))
        except StreamError as err:
            assert not kept and "truncated" in str(err), (cut, str(err))
            continue
        assert kept and shard.records == kept[0], cut
        assert len(list(TarShards(str(cut_file)).records(shard, 0))) == shard.records  # webdataset reads as many
