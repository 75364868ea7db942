"""Training from streams: WebDataset tar shards (``wds:``) and HF datasets streamed from their data files
(``hf-stream:``), for data too large to hold in memory or in one Arrow table.

``load_stream`` gives the same ``Splits`` as the map-style sources (``flexivit.data.sources``), with a
``ShardStream`` as the train split; ``TrainStream`` adds the training transform and makes each process's
batches. How a stream is split, ordered and resumed:

* **Splits are whole shards.** A source's own splits are kept as the map-style sources keep theirs (a
  folder of ``train-*.tar`` / ``validation-*.tar`` / ``test-*.tar``; an HF dataset's splits). A missing test
  split is ``ceil(val_fraction * n)`` of the n train shards, drawn with ``mix(seed, 1)``; a missing
  validation split then ``ceil(val_fraction * rest)`` of the rest, drawn with ``seed``. Validation and test
  are read once into an Arrow table in the HF cache (``datasets.Dataset.from_generator``, memory-mapped),
  so evaluation runs exactly as for map-style data; only training streams.
* **Slots.** Every process has ``max(1, data.num_workers)`` stream slots, one per data worker. Epoch ``e``
  permutes the train shards with ``mix(seed, 2, e)`` and slot ``s`` of ``S`` takes every ``S``-th of them
  from the ``s``-th: slots read disjoint shards, every shard once an epoch. A slot reads its shards in
  groups of ``data.stream_mix``, interleaving each group's records at random (a uniform shuffle of which
  shard the next record comes from; each shard in file order), drawn from ``(seed, 3, epoch, slot, group)``.
  A slot runs through its epochs on its own; an epoch is a slot's pass over its shards.
* **Batches.** Worker ``w`` of a process makes its slot's batches of ``data.batch_size`` records, and the
  DataLoader takes one from each worker in turn; batch ``j`` of a process is slot ``j % W``'s
  ``j // W``-th. The order therefore depends on the number of processes and of workers, which a resumed
  run may not change (``TrainStream.check_run``, with the shard list).
* **Resume.** ``StepBatches`` knows how many batches the steps before a step took; each slot skips whole
  epochs and shards by their record counts and reads past (never decodes) the records before its position
  in the shards it has open, so a resumed run continues at the same sample.
* **Augmentation** is seeded from ``(seed, epoch, record)`` as for map-style data, a record numbered by
  its place in the train shards (in their listed order).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flexivit.data.sources import VAL_NAMES, Splits
from flexivit.files import atomic_write_text
from flexivit.rng import mix, seed_all
from flexivit.data.shards import HFStreamShards, Shard, StreamError, TarShards
from flexivit.data.transforms import CorruptImageError, channels_of, collate, open_image

__all__ = ["STREAM_PREFIXES", "RUN_RECORD", "ShardStream", "TrainStream", "StreamError", "load_stream", "slot_order"]

STREAM_PREFIXES = ("wds:", "hf-stream:")
RUN_RECORD = "stream.json"  # in the run directory: the shards, processes and workers a run streams with
TEST_SEED_STREAM, SHARD_SEED_STREAM, ORDER_SEED_STREAM = 1, 2, 3  # mix(seed, k, ...) of each random draw

Source = TarShards | HFStreamShards
Batch = dict[str, Any]


def open_source(source: str, *, image_column: str, label_column: str, cache_dir: str | None) -> Source:
    """The shards of ``wds:...`` or ``hf-stream:...`` (the columns name an HF dataset's image and label)."""
    if source.startswith("wds:"):
        return TarShards(source[len("wds:"):])
    return HFStreamShards(source[len("hf-stream:"):], image_column=image_column, label_column=label_column,
                          cache_dir=cache_dir)


# --- splits ---------------------------------------------------------------------------------------------


def _choose(files: dict[str, list[str]], split_train: str, split_test: str | None, source: str
            ) -> tuple[list[str], list[str] | None, list[str] | None]:
    """(train, validation, test) shard paths as the map-style sources choose splits (None: not shipped)."""
    absent = [s for s in (split_train, split_test) if s is not None and s not in files]
    if absent:
        raise StreamError(f"{source} has no split {absent}; its splits are {sorted(files)}")
    if split_test is None:  # "test", else a validation split serves as the test split
        found = [s for s in ("test", *VAL_NAMES) if s in files and s != split_train]
        split_test = found[0] if found else None
    vals = [s for s in VAL_NAMES if s in files and s not in (split_train, split_test)]
    return files[split_train], files[vals[0]] if vals else None, files[split_test] if split_test else None


def _hold_out(paths: list[str], fraction: float, seed: int, name: str, source: str) -> tuple[list[str], list[str]]:
    """(rest, held out): ``ceil(fraction * len(paths))`` whole shards drawn with ``seed``, both in listed order."""
    if not 0.0 < fraction < 1.0:
        raise StreamError(f"data.val_fraction must be in (0, 1), got {fraction}")
    held = math.ceil(fraction * len(paths))
    if held >= len(paths):
        raise StreamError(
            f"{source}: cannot hold out a {name} split of whole shards: {fraction:g} of {len(paths)} shards leaves "
            f"none to train on; write more shards, or ship {name} shards (a folder of train-*.tar with "
            "validation-*.tar and test-*.tar; an HF dataset's splits)")
    chosen = set(np.random.default_rng(seed).choice(len(paths), size=held, replace=False).tolist())
    return [p for i, p in enumerate(paths) if i not in chosen], [p for i, p in enumerate(paths) if i in chosen]


def _rows(kind: str, spec: str, image_column: str, label_column: str, shards: list[Shard],
          label_index: dict[Any, int], stamps: list[int]) -> Iterator[dict[str, Any]]:
    """Every record of ``shards`` as an ``image`` / ``label`` row (``stamps``, the files' mtimes, only key the
    HF cache so that a rewritten shard is read again)."""
    source = open_source(f"{kind}:{spec}", image_column=image_column, label_column=label_column, cache_dir=None)
    for shard in shards:
        for image, label in source.records(shard, 0):
            yield {"image": image, "label": label_index[label]}


def _materialize(source: Source, shards: list[Shard], names: list[str], label_index: dict[Any, int], *,
                 columns: tuple[str, str], cache_dir: str | None) -> datasets.Dataset:
    """An evaluation split read once into the HF cache (a memory-mapped Arrow table)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    if not shards:
        return datasets.Dataset.from_dict({"image": [], "label": []}, features=features)
    stamps = [Path(s.path).stat().st_mtime_ns for s in shards]
    return datasets.Dataset.from_generator(
        _rows, features=features, cache_dir=cache_dir,
        gen_kwargs={"kind": source.kind, "spec": source.spec, "image_column": columns[0], "label_column": columns[1],
                    "shards": shards, "label_index": label_index, "stamps": stamps})


def _classes(source: Source, shards: Sequence[Shard]) -> tuple[list[str], dict[Any, int]]:
    """Class names and raw label -> class index: a ClassLabel's own, else the sorted labels of every split
    (as ``flexivit.data.sources`` names the classes of plain int or string labels)."""
    if source.class_names is not None:
        return list(source.class_names), {i: i for i in range(len(source.class_names))}
    values = sorted({v for s in shards for v in s.labels})
    return [str(v) for v in values], {v: i for i, v in enumerate(values)}


class ShardStream:
    """The train split of a stream source: its shards in listed order (records are numbered through them),
    the held-out shards (for the run record), the class names and the raw label -> class index map."""

    def __init__(self, *, source: Source, shards: list[Shard], held: dict[str, list[Shard]], class_names: list[str],
                 label_index: dict[Any, int]) -> None:
        self.source, self.shards, self.held = source, shards, held
        self.class_names, self.label_index = class_names, label_index
        self.base = np.concatenate([[0], np.cumsum([s.records for s in shards])[:-1]]).astype(int).tolist()

    def __len__(self) -> int:
        return sum(s.records for s in self.shards)

    def channels(self, probes: int = 8) -> int:
        """3 if any of the first ``probes`` images is in colour, else 1 (unreadable ones skipped)."""
        images = (image for image, _ in islice(self.source.records(self.shards[0], 0), probes))
        return channels_of(images, what=f"the first {probes} images of {self.shards[0].path}")

    def select(self, indices: Iterable[int]) -> datasets.Dataset:
        """Records ``indices`` (numbered through the shards in listed order) as an in-memory table, in that
        order: a small sample for what needs random access, such as a calibration set."""
        wanted = [int(i) for i in indices]
        if any(not 0 <= i < len(self) for i in wanted):
            raise IndexError(f"record indices must be in [0, {len(self)})")
        keep, rows = set(wanted), {}
        for k, shard in enumerate(self.shards):
            mine = [i - self.base[k] for i in keep if self.base[k] <= i < self.base[k] + shard.records]
            for i, (image, label) in enumerate(islice(self.source.records(shard, 0), max(mine, default=-1) + 1)):
                if self.base[k] + i in keep:
                    rows[self.base[k] + i] = {"image": image, "label": self.label_index[label]}
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=self.class_names)})
        return datasets.Dataset.from_list([rows[i] for i in wanted], features=features)

    def record(self, *, ranks: int, workers: int) -> dict[str, Any]:
        """What a resumed run must find unchanged to continue at the same sample."""
        splits = {"train": self.shards, **self.held}
        return {"source": self.source.source, "ranks": ranks, "workers": workers,
                "splits": {k: [[s.name, s.records, s.size] for s in v] for k, v in splits.items()}}


def load_stream(
    source: str, *, val_fraction: float, seed: int, split_train: str, split_test: str | None, image_column: str,
    label_column: str, cache_dir: str | None, validation: bool,
) -> Splits:  # fmt: skip
    """``wds:PATTERN|FOLDER`` or ``hf-stream:NAME[:CONFIG]`` as ``Splits``: train a ``ShardStream``,
    validation and test Arrow tables (see the module docstring for the rule that holds shards out)."""
    shards = open_source(source, image_column=image_column, label_column=label_column, cache_dir=cache_dir)
    train, val, test = _choose(shards.files, split_train, split_test, source)
    if test is None:
        train, test = _hold_out(train, val_fraction, mix(seed, TEST_SEED_STREAM), "test", source)
    if val is None and validation:
        train, val = _hold_out(train, val_fraction, seed, "validation", source)
    scanned = {name: [shards.scan(p) for p in paths or []] for name, paths in (("train", train), ("val", val),
                                                                                ("test", test))}
    names, index = _classes(shards, [s for v in scanned.values() for s in v])
    stream = ShardStream(source=shards, shards=scanned["train"], held={"val": scanned["val"], "test": scanned["test"]},
                         class_names=names, label_index=index)
    columns = (image_column, label_column)
    val, test = (_materialize(shards, scanned[k], names, index, columns=columns, cache_dir=cache_dir)
                 for k in ("val", "test"))
    return Splits(train=stream, val=val, test=test, class_names=names, channels=stream.channels())


# --- order ----------------------------------------------------------------------------------------------


def epoch_shards(n: int, *, seed: int, epoch: int, slot: int, slots: int) -> list[int]:
    """The shards slot ``slot`` of ``slots`` reads in ``epoch``: every ``slots``-th of a permutation."""
    return np.random.default_rng(mix(seed, SHARD_SEED_STREAM, epoch)).permutation(n)[slot::slots].tolist()


def slot_order(counts: Sequence[int], *, seed: int, slot: int, slots: int, width: int, start: int = 0
               ) -> Iterator[tuple[int, int, int]]:
    """``(epoch, shard, record in shard)`` of slot ``slot``'s records from its ``start``-th on, endlessly;
    whole groups before ``start`` are skipped by their counts alone."""
    if len(counts) < slots:
        raise StreamError(f"{len(counts)} train shards cannot feed {slots} stream slots (processes x workers)")
    epoch = 0
    while True:
        mine = epoch_shards(len(counts), seed=seed, epoch=epoch, slot=slot, slots=slots)
        for g in range(0, len(mine), width):
            group = mine[g:g + width]
            sizes = [counts[k] for k in group]
            if start >= sum(sizes):
                start -= sum(sizes)
                continue
            rng = np.random.default_rng(mix(seed, ORDER_SEED_STREAM, epoch, slot, g))
            choice = rng.permutation(np.repeat(np.arange(len(group)), sizes))  # which shard each record is from
            taken = np.bincount(choice[:start], minlength=len(group))  # records of each shard before start
            for c in choice[start:].tolist():
                yield epoch, group[c], int(taken[c])
                taken[c] += 1
            start = 0
        epoch += 1


def _read(source: Source, shards: list[Shard], order: Iterator[tuple[int, int, int]]
          ) -> Iterator[tuple[int, int, int, Any, Any]]:
    """``(epoch, shard, record, image, raw label)`` along ``order``, each shard opened where it is first
    needed and closed after its last record."""
    readers: dict[int, Iterator] = {}
    for epoch, k, index in order:
        if k not in readers:
            readers[k] = source.records(shards[k], index)
        image, label = next(readers[k])
        if index == shards[k].records - 1:
            next(readers.pop(k), None)  # lets the reader check that the shard ended where it was counted to
        yield epoch, k, index, image, label


# --- training batches -----------------------------------------------------------------------------------


class TrainStream:
    """A ``ShardStream`` with the training transform: each process's batches, from any batch on."""

    def __init__(self, stream: ShardStream, transform: Callable, *, on_corrupt: str, seed: int, batch_size: int,
                 mix_width: int) -> None:
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if mix_width < 1:
            raise ValueError(f"data.stream_mix must be at least 1, got {mix_width}")
        self.stream, self.transform, self.on_corrupt = stream, transform, on_corrupt
        self.seed, self.batch_size, self.mix_width = seed, batch_size, mix_width

    def check_run(self, out: Path, *, step: int, ranks: int, workers: int) -> str | None:
        """None if the run in ``out`` can stream from ``step``, else why not. A fresh run (step 0) writes its
        record; a resumed one must find the same shards (names, records, bytes), processes and workers."""
        slots, n = ranks * workers, len(self.stream.shards)
        if n < slots:
            return (f"{n} train shards cannot feed {ranks} processes x {workers} data workers: every worker reads "
                    f"its own shards; write at least {slots} shards or lower data.num_workers")
        now, path = self.stream.record(ranks=ranks, workers=workers), Path(out) / RUN_RECORD
        if step == 0:
            atomic_write_text(path, json.dumps(now, indent=1) + "\n")
            return None
        if not path.is_file():
            return f"{out} has checkpoints but no {RUN_RECORD}, so its stream cannot be checked; train into a new --out"
        changes = _changes(json.loads(path.read_text()), now)
        if not changes:
            return None
        return (f"the stream changed since this run started ({'; '.join(changes)}); a stream resumes at the same "
                "sample only with the same shards, processes and data workers: resume with those, or train into "
                "a new --out")

    def opener(self, *, rank: int, ranks: int, num_workers: int, device: torch.device, prefetch_batches: int
               ) -> Callable[[int], Iterator[Batch]]:
        """``open_at(n)``: this process's batches from its ``n``-th on, on ``device``."""

        def open_at(start: int) -> Iterator[Batch]:
            dataset = _SlotBatches(self, rank=rank, ranks=ranks, workers=max(1, num_workers), start=start)
            extra = {"prefetch_factor": max(2, -(-prefetch_batches // num_workers))} if num_workers else {}
            loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
                                **extra)
            for batch in loader:
                yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

        return open_at

    def _open(self, image: Any, where: str) -> Any:
        try:
            return open_image(image)
        except CorruptImageError as err:
            if self.on_corrupt == "error":
                raise CorruptImageError(f"{where}: {err} (on_corrupt='skip' drops such images)") from err
            return None

    def decode(self, records: list[tuple[int, int, int, Any, Any]]) -> Batch:
        """One collated batch from ``(epoch, shard, record, image, raw label)`` tuples: through the transform's
        batched path when it has one (it draws nothing), else each image seeded from (seed, epoch, record)."""
        shards, base, index = self.stream.shards, self.stream.base, self.stream.label_index
        pils = [self._open(image, f"{shards[k].path} record {i}") for _, k, i, image, _ in records]
        labels = [index[raw] for *_, raw in records]
        batched = getattr(self.transform, "batch", None)
        images = batched([p for p in pils if p is not None]) if batched is not None else None
        samples: list[dict[str, Any] | None] = []
        kept = iter(images) if images is not None else None
        for (epoch, k, i, _, _), pil, label in zip(records, pils, labels):
            if pil is None:
                samples.append(None)
                continue
            if kept is None:
                seed_all(mix(self.seed, epoch, base[k] + i))
            samples.append({"image": next(kept) if kept is not None else self.transform(pil), "label": label})
        return collate(samples)


class _SlotBatches(IterableDataset):
    """The batches of one process from its ``start``-th: DataLoader worker ``u`` plays slot ``(start + u) % W``
    (so the loader's first batch, taken from worker 0, is the process's ``start``-th)."""

    def __init__(self, train: TrainStream, *, rank: int, ranks: int, workers: int, start: int) -> None:
        self.train, self.rank, self.ranks, self.workers, self.start = train, rank, ranks, workers, start

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        first = self.start + (info.id if info is not None else 0)
        slot = self.rank * self.workers + first % self.workers
        t, b = self.train, self.train.batch_size
        counts = [s.records for s in t.stream.shards]
        order = slot_order(counts, seed=t.seed, slot=slot, slots=self.ranks * self.workers, width=t.mix_width,
                           start=(first // self.workers) * b)
        records = _read(t.stream.source, t.stream.shards, order)
        while True:
            yield t.decode(list(islice(records, b)))


def _changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two run records, in words."""
    found = [f"{what} {saved.get(key)} -> {now[key]}" for key, what in
             (("ranks", "processes"), ("workers", "data workers per process (max(1, data.num_workers))"))
             if saved.get(key) != now[key]]
    for split in sorted(set(saved["splits"]) | set(now["splits"])):
        found += shard_changes(split, saved["splits"].get(split, []), now["splits"].get(split, []))
    return found


def shard_changes(split: str, before: list[list[Any]], now: list[list[Any]]) -> list[str]:
    """What differs between two lists of a split's shards (``[name, records, bytes]`` each), in words."""
    a = {n: (r, b) for n, r, b in before}
    b = {n: (r, b) for n, r, b in now}
    removed, added = [n for n in a if n not in b], [n for n in b if n not in a]
    found = []
    if removed:
        found.append(f"{split} shards removed: {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")
    if added:
        found.append(f"{split} shards added: {', '.join(added[:5])}{' ...' if len(added) > 5 else ''}")
    for name in (n for n in a if n in b and a[n] != b[n]):
        (ra, sa), (rb, sb) = a[name], b[name]
        found.append(f"{split} shard {name}: {ra} records / {sa} bytes -> {rb} / {sb}")
    if not (removed or added) and list(a) != list(b):
        found.append(f"{split} shards listed in another order")
    return found
