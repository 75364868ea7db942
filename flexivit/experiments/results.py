"""One reader of what a finished run reports, for ``flexivit search``/``evolve`` and every study tool.

A run directory of ``flexivit train``/``finetune``/``compress`` holds ``eval.json``: ``results`` (the rows
of the scored split, ``split``: ``"test"``, or ``"val"`` when ``train.test_eval`` was off), ``val`` (the
validation rows), ``images_seen`` and ``train_seconds``; a row is one patch size (``patch_size``, ``top1``
as a fraction, ``n`` images, and ``gflops`` where ``flexivit eval`` measured it). Older reports lack
``split`` (they scored test) or ``val``. ``read_results`` turns that into a ``RunResults``, keyed by patch
size as the JSON keys it (``"7"``), so that no caller needs to know which split ``results`` holds.

Searches keep one JSON line per finished trial or candidate (``search.jsonl``, ``evolve.jsonl``):
``read_jsonl`` reads those, and the trainer's own ``log.jsonl`` gives the evaluations made during training
(``eval_by_step``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from flexivit.jsonl import read_jsonl  # one reader of JSON lines (a torn last line is dropped with a message)

K = TypeVar("K")

__all__ = ["RunResults", "ResultsError", "EVAL_FILE", "read_results", "maybe_results", "read_jsonl",
           "eval_by_step", "mean_std_by_key", "summarise", "arms_over_seeds"]

EVAL_FILE = "eval.json"
SPLITS = ("val", "test", "scored")  # "scored": the split eval.json's "results" holds


class ResultsError(ValueError):
    """A run has not finished (no ``eval.json``) or its report cannot be read; the message says which."""


@dataclass(frozen=True, kw_only=True)
class RunResults:
    """What one finished run reports. ``rows`` holds the raw rows of each split (``[]`` where the run did
    not score it), so that a caller can read what a row carries beyond top-1."""

    run: Path
    split: str  # the split of eval.json's "results": "test", or "val" when the run skipped test
    rows: dict[str, list[dict[str, Any]]]  # "val" | "test" -> rows, one per evaluated patch size
    images_seen: int | None
    train_seconds: float | None
    steps: int | None  # the run's configured train.steps (config.json), else the step eval.json names

    def top1(self, split: str) -> dict[str, float]:
        """Top-1 (a fraction) per patch size on ``split`` ("val", "test", or "scored": the split the run
        reported); ``{}`` where the run did not score it."""
        return {str(r["patch_size"]): r["top1"] for r in self._rows(split)}

    def percent(self, split: str) -> dict[str, float]:
        """Top-1 in percent per patch size on ``split``."""
        return {p: 100 * v for p, v in self.top1(split).items()}

    def worst(self, split: str) -> float:
        """The lowest top-1 (a fraction) over the patch sizes of ``split``."""
        top1 = self.top1(split)
        if not top1:
            raise ResultsError(f"{self.run / EVAL_FILE} has no {split} split to take the worst size of")
        return min(top1.values())

    def images(self, split: str) -> int:
        """Images scored on ``split`` (0 where the run did not score it)."""
        rows = self._rows(split)
        return int(rows[0]["n"]) if rows else 0

    def gflops(self, split: str) -> dict[str, float]:
        """Forward GFLOPs per image per patch size, where the rows of ``split`` store them."""
        return {str(r["patch_size"]): r["gflops"] for r in self._rows(split) if r.get("gflops") is not None}

    def _rows(self, split: str) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.rows[self.split if split == "scored" else split]


def read_results(run: str | Path) -> RunResults:
    """The report of the finished run in ``run`` (a run directory)."""
    run = Path(run)
    path = run / EVAL_FILE
    if not path.is_file():
        raise ResultsError(f"{run} holds no {EVAL_FILE}: the run has not finished (rerun its study to finish it)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path} is not JSON ({err}); delete it and rerun the run to write it again") from None
    split = report.get("split", "test")
    if split not in ("val", "test"):
        raise ResultsError(f"{path} scored the {split!r} split; a run reports 'val' or 'test'")
    scored = report.get("results") or []
    rows = {"val": report.get("val") or (scored if split == "val" else []), "test": scored if split == "test" else []}
    steps = report.get("step")
    config = run / "config.json"
    if config.is_file():
        steps = json.loads(config.read_text()).get("train", {}).get("steps", steps)
    return RunResults(run=run, split=split, rows=rows, images_seen=report.get("images_seen"),
                      train_seconds=report.get("train_seconds"), steps=steps)


def maybe_results(run: str | Path) -> RunResults | None:
    """``read_results(run)``, or None while the run has not finished."""
    return read_results(run) if (Path(run) / EVAL_FILE).is_file() else None


def eval_by_step(run: str | Path, split: str = "val") -> dict[str, dict[str, float]]:
    """Top-1 (a fraction) per patch size of every evaluation on ``split`` logged while ``run`` trained
    (``train.eval_every``, and the final one), keyed by step as a string."""
    return {str(r["step"]): {str(e["patch_size"]): e["top1"] for e in r["eval"]}
            for r in read_jsonl(Path(run) / "log.jsonl") if r.get("split") == split}


def mean_std_by_key(values: Sequence[Mapping[K, float]]) -> dict[str, dict[K, float]]:
    """``mean`` and sample ``std`` (0 for one value) per key over ``values`` (e.g. one run's top-1 per size
    per seed); every mapping has the keys of the first."""
    keys = list(values[0])
    return {"mean": {k: statistics.mean(v[k] for v in values) for k in keys},
            "std": {k: statistics.stdev([v[k] for v in values]) if len(values) > 1 else 0.0 for k in keys}}


def summarise(results: Sequence[RunResults], split: str) -> dict[str, dict[int, float]] | None:
    """Top-1 in percent per patch size (int) over ``results`` (the seeds of one setting): ``mean`` and the
    sample ``std`` (0 for one run); None if a run did not score ``split``."""
    if any(not r.top1(split) for r in results):
        return None
    return mean_std_by_key([{int(p): value for p, value in r.percent(split).items()} for r in results])


def arms_over_seeds(out: str | Path, arms: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[str, dict[str, Any]]]:
    """``arm -> seed -> {val, test (top-1 % per size), images_seen, train_seconds, steps}`` of the finished runs
    ``out/ARM/seedS`` of a study that runs every arm once per seed."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in arms:
        table[arm] = {}
        for seed in seeds:
            result = read_results(Path(out) / arm / f"seed{seed}")
            table[arm][str(seed)] = {"val": result.percent("val"), "test": result.percent("test"),
                                     "images_seen": result.images_seen, "train_seconds": result.train_seconds,
                                     "steps": result.steps}
    return table

