"""The files a stream is made of: which shards each split has, how many records each holds, and their raw
records, read in file order from any record on.

Two kinds of source (``flexivit.data.streams`` turns either into a training stream):

* ``TarShards`` — WebDataset tar shards (``wds:``): one record per key, its image in a ``.jpg`` / ``.png``
  / ``.webp`` / ... member and its class index as text in a ``.cls`` member (the convention of
  ``webdataset`` and timm's ``wds`` reader). Read with ``webdataset``'s own tar iterator. A pattern
  (``/data/shards-{000..099}.tar``, or a glob) is one split; a folder is split by file names the way HF
  datasets names splits (``train-*.tar``, ``validation-*.tar``, ``test-*.tar``; ``datasets.data_files``).
* ``HFStreamShards`` — the data files of a local HF dataset (``hf-stream:``), read by
  ``datasets.load_dataset(..., streaming=True)`` one data file (``IterableDataset.shard``) at a time.

A shard's record count comes from a scan when the source is opened: the tar headers (the data is seeked
past, so this reads about 2 KB a record) or the parquet label column. ``webdataset`` and ``datasets``
stream without counts, but an exact resume needs them: with counts a restart jumps to its shard and skips
records there without decoding them. The scan also finds a truncated shard and a record without a label
before anything trains.
"""

from __future__ import annotations

import functools
import glob
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import datasets
from datasets.data_files import get_data_patterns, resolve_pattern
from webdataset.handlers import reraise_exception
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tarfile_samples

__all__ = ["StreamError", "Shard", "TarShards", "HFStreamShards", "IMAGE_KEYS", "LABEL_KEY"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "gif", "tif", "tiff")
LABEL_KEY = "cls"  # WebDataset's class-index member, e.g. 000123.cls holding "417"

Record = tuple[Any, Any]  # (the image as a dataset row holds it: {"bytes", "path"}, the raw label)


class StreamError(ValueError):
    """A stream source that cannot be used as it is; the message names the shard and what to do."""


@dataclass(frozen=True)
class Shard:
    """One shard as scanned: its file, record count, size in bytes and the distinct raw labels it holds."""

    path: str
    records: int
    size: int
    labels: tuple[Any, ...]

    @property
    def name(self) -> str:
        """The file name: what a run records, so shards staged to another folder still resume."""
        return Path(self.path).name


def _local(path: str, source: str) -> str:
    if "://" in path or path.startswith(("pipe:", "file:")):
        raise StreamError(f"{source}: {path} is not a local file; streams read local shards (a mounted bucket "
                          "works) because their record counts are read from the files before training")
    if not Path(path).is_file():
        raise StreamError(f"{source}: shard {path} does not exist")
    return str(Path(path).resolve())


def _split_folder(folder: Path, extensions: list[str]) -> dict[str, list[str]]:
    """The data files under ``folder`` by split, named as HF datasets names them (train, validation, test)."""
    found: dict[str, list[str]] = {}
    for split, patterns in get_data_patterns(str(folder)).items():
        files: set[str] = set()
        for pattern in patterns:
            try:
                files.update(resolve_pattern(pattern, str(folder), allowed_extensions=extensions))
            except FileNotFoundError:  # this pattern names no file; another may
                continue
        if files:
            found[str(split)] = sorted(files)
    return found


BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # tar type flags of regular files


class _Damaged(Exception):
    """A tar header that cannot be read: the file ends inside it, or it is not a header."""


def _tar_members(f: BinaryIO, file_size: int) -> Iterator[tuple[str, int, int]]:
    """``(name, size, data offset)`` of every regular file in the tar ``f``, reading only the headers.

    ``tarfile`` (random-access mode) does the same at 70-140 µs a member here, building a ``TarInfo`` and
    parsing each pax record; ImageNet's 1.28 M records (two or three members each, every one with a pax
    header from ``webdataset``'s writer) would take 5-10 minutes per process to open. This reads the ustar
    fields, pax ``path`` / ``size`` records and GNU long names (``L``), which is what shard writers emit, at
    about a tenth of that; ``tests/test_streams.py`` checks it against ``tarfile`` on pax and GNU archives.
    """
    pos, pending, extended = 0, {}, False  # extended: a pax or long-name header announced a next member
    while True:
        f.seek(pos)
        header = f.read(BLOCK)
        if not any(header) and not extended:  # zeros, whole or cut: the end (or a cut between members)
            return
        if len(header) < BLOCK or header[257:262] not in (b"ustar", bytes(5)) or not any(header):
            raise _Damaged("unexpected end of data" if len(header) < BLOCK else f"no tar header at byte {pos}")
        raw = header[124:136]
        size = int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.rstrip(b" \0") or b"0", 8)
        flag, data = header[156:157], pos + BLOCK
        pos = data + -(-size // BLOCK) * BLOCK
        if pos > file_size:  # the data or its padding cut: tarfile's stream reader (webdataset's) fails there too
            raise _Damaged("unexpected end of data")
        if flag in (b"x", b"L"):  # pax records or a GNU long name, both for the next member
            f.seek(data)
            payload = f.read(size)
            pending.update(_pax(payload) if flag == b"x" else {"path": payload.split(b"\0", 1)[0].decode()})
            extended = True
            continue
        if flag not in REGULAR:
            pending, extended = {}, False
            continue
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
        name = pending.get("path") or (f"{prefix}/{name}" if prefix else name)
        if "size" in pending:
            size = int(pending["size"])
            pos = data + -(-size // BLOCK) * BLOCK
            if pos > file_size:
                raise _Damaged("unexpected end of data")
        pending, extended = {}, False
        yield name, size, data


def _pax(payload: bytes) -> dict[str, str]:
    """The ``path`` and ``size`` of pax records ``"LEN key=value\\n"``."""
    found, i = {}, 0
    while i < len(payload) and payload[i:i + 1] != b"\0":
        length = int(payload[i:payload.index(b" ", i)])
        key, _, value = payload[payload.index(b" ", i) + 1:i + length - 1].partition(b"=")
        if key in (b"path", b"size"):
            found[key.decode()] = value.decode()
        i += length
    return found


@functools.lru_cache(maxsize=None)
def _scan_tar(path: str, size: int, mtime_ns: int) -> Shard:
    """Count the records of a tar shard and read its labels; cached per file version."""
    records, labels, key, members = 0, set(), None, set()

    def close() -> int:
        if key is None:
            return 0
        if LABEL_KEY not in members:
            raise StreamError(f"{path}: record {key!r} has no label (no .{LABEL_KEY} member); a training stream needs "
                              f"the class index of every record in KEY.{LABEL_KEY}")
        if not members & set(IMAGE_KEYS):
            raise StreamError(f"{path}: record {key!r} has no image (members {sorted(members)}; expected one of "
                              f"{', '.join('.' + k for k in IMAGE_KEYS)}); the shard may be truncated mid-record")
        return 1

    with open(path, "rb") as f:
        try:
            for name, length, offset in _tar_members(f, size):
                base, ext = base_plus_ext(name)
                if base is None or name.split("/")[-1].startswith("__"):  # webdataset skips these too
                    continue
                if base != key:
                    records += close()
                    key, members = base, set()
                ext = ext.lower()
                members.add(ext)
                if ext == LABEL_KEY:
                    f.seek(offset)
                    labels.add(_parse_cls(f.read(length), path, base))
            records += close()
        except (_Damaged, ValueError, UnicodeDecodeError) as err:
            if isinstance(err, StreamError):
                raise
            raise StreamError(f"{path} is truncated or damaged after {records} records ({err}); re-write it or "
                              "remove it from the shard list") from None
    if records == 0:
        raise StreamError(f"{path} holds no records; remove it from the shard list")
    return Shard(path=path, records=records, size=size, labels=tuple(sorted(labels)))


def _parse_cls(raw: bytes, path: str, key: str) -> int:
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise StreamError(f"{path}: record {key!r} has a .{LABEL_KEY} member that is not an integer class index: "
                          f"{raw[:40]!r}") from None


class TarShards:
    """WebDataset tar shards from a pattern (one split) or a folder (split by file names)."""

    kind = "wds"

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.source = f"wds:{spec}"
        folder = Path(spec).expanduser()
        if folder.is_dir():
            self.files = _split_folder(folder.resolve(), [".tar"])
            if not self.files:
                raise StreamError(f"{self.source}: no .tar shards in {folder}")
        else:
            paths = [p for url in expand_urls(spec)
                     for p in (sorted(glob.glob(os.path.expanduser(url))) if glob.has_magic(url) else [url])]
            if not paths:
                raise StreamError(f"{self.source}: the pattern matches no shard files")
            self.files = {"train": [_local(os.path.expanduser(p), self.source) for p in paths]}
        self.class_names: list[str] | None = None  # .cls holds indices; the names are the sorted labels

    def scan(self, path: str) -> Shard:
        """``path``'s record count and labels (scanned once per file version in a process)."""
        stat = os.stat(path)
        return _scan_tar(path, stat.st_size, stat.st_mtime_ns)

    def records(self, shard: Shard, start: int) -> Iterator[Record]:
        """The records of ``shard`` from its ``start``-th on (the ones before are read, never decoded)."""
        done = 0
        try:
            for sample in tarfile_samples(iter([{"url": shard.path}]), handler=reraise_exception):
                if done >= start:
                    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                    yield ({"bytes": image, "path": f"{shard.path}#{sample['__key__']}"},
                           _parse_cls(sample[LABEL_KEY], shard.path, sample["__key__"]))
                done += 1
        except (tarfile.ReadError, EOFError, OSError) as err:
            raise StreamError(f"{shard.path} became unreadable after {done} records ({err})") from None
        _check_complete(shard, done)


def _check_complete(shard: Shard, done: int) -> None:
    if done != shard.records:
        raise StreamError(f"{shard.path} changed since it was scanned: {done} records read, {shard.records} counted; "
                          "shards must not change during a run")


class HFStreamShards:
    """The data files of a local HF dataset, each read by ``datasets``' streaming loader as one shard."""

    kind = "hf-stream"

    def __init__(self, spec: str, *, image_column: str, label_column: str, cache_dir: str | None = None) -> None:
        self.spec, self.source = spec, f"hf-stream:{spec}"
        self.image_column, self.label_column, self.cache_dir = image_column, label_column, cache_dir
        name, _, config = spec.partition(":")
        if Path(spec).expanduser().exists():  # a local path may itself hold a colon
            name, config = spec, ""
        if not Path(name).expanduser().is_dir():
            raise StreamError(f"{self.source}: {name} is not a local folder; hf-stream reads the data files of a local "
                              "dataset (e.g. a clone of a hub dataset repo), offline")
        self.name, self.config = str(Path(name).expanduser().resolve()), config or None
        builder = datasets.load_dataset_builder(self.name, self.config, cache_dir=cache_dir)
        self.files = {str(s): list(f) for s, f in (builder.config.data_files or {}).items()}
        self._splits = {split: self._stream(split) for split in self.files}
        features = next(iter(self._splits.values())).features
        for split, stream in self._splits.items():
            missing = [c for c in (image_column, label_column) if c not in (stream.features or {})]
            if missing:
                raise StreamError(f"{self.source}[{split}] has no column {missing} (columns: "
                                  f"{sorted(stream.features or {})}); a training stream needs images and labels: "
                                  "set data.image_column and data.label_column")
        label = features[label_column]
        self.class_names = list(label.names) if isinstance(label, datasets.ClassLabel) else None
        self._owner = {path: (split, i) for split, paths in self.files.items() for i, path in enumerate(paths)}

    def _stream(self, split: str) -> datasets.IterableDataset:
        stream = datasets.load_dataset(self.name, self.config, split=split, streaming=True, cache_dir=self.cache_dir)
        if stream.n_shards != len(self.files[split]):
            raise StreamError(f"{self.source}[{split}]: datasets streams {stream.n_shards} shards from "
                              f"{len(self.files[split])} data files; give each data file one shard")
        return stream

    def _shard(self, path: str, columns: list[str]) -> datasets.IterableDataset:
        split, index = self._owner[path]
        stream = self._splits[split]
        part = stream.shard(num_shards=stream.n_shards, index=index).select_columns(columns)
        if isinstance(part.features[self.image_column], datasets.Image) and self.image_column in columns:
            part = part.cast_column(self.image_column, datasets.Image(decode=False))
        return part

    def scan(self, path: str) -> Shard:
        """``path``'s record count and labels, refusing null labels."""
        size = os.stat(path).st_size
        if path.endswith(".parquet"):  # the footer has the row count; the label column alone is read
            import pyarrow.parquet as pq

            column = pq.read_table(path, columns=[self.label_column]).column(0)
            records, nulls, values = len(column), column.null_count, set(column.unique().to_pylist())
        else:  # other formats have no count in their header: one pass over the label column
            values, records, nulls = set(), 0, 0
            for row in self._shard(path, [self.label_column]):
                records, nulls = records + 1, nulls + (row[self.label_column] is None)
                values.add(row[self.label_column])
            values.discard(None)
        if nulls:
            raise StreamError(f"{path}: {nulls} of {records} records have no label ({self.label_column} is null); a "
                              "training stream needs a label for every record")
        if records == 0:
            raise StreamError(f"{path} holds no records; remove it from the dataset")
        return Shard(path=path, records=records, size=size, labels=tuple(sorted(values)))

    def records(self, shard: Shard, start: int) -> Iterator[Record]:
        """The rows of ``shard`` from its ``start``-th on (``IterableDataset.skip``: the ones before are read as
        Arrow rows, their images never decoded)."""
        done = start
        for row in self._shard(shard.path, [self.image_column, self.label_column]).skip(start):
            yield row[self.image_column], row[self.label_column]
            done += 1
        _check_complete(shard, done)
