"""Packing images of different token counts into fixed-length token rows.

Two layers:

- ``first_fit_decreasing(lengths, capacity)`` lays out a given set of images (the packed forward's
  default layout, ``flexivit.model.packed``): longest first, each into the first row with room.
- ``RowPacker`` plans a training step from a stream of images: it draws a patch size for each next image
  of the stream and places it, first fit, into the step's ``rows`` rows of ``row_tokens`` tokens. Every
  draw is a function of ``(seed, step, rank, k)`` (``flexivit.rng.mix``), so a plan is a pure function of
  ``(seed, step, rank)``: every rank packs its own rows without talking to the others, and a resumed run
  replans the same steps bit-identically without saved state.

The stopping rule: a step ends at the first drawn size that fits in no row (``patience=0``). The images
taken are then the draws before it, an i.i.d. prefix, so their sizes follow the weights except for that
one rejected draw per step (Wald's identity: the shortfall is one draw's worth per step, skewed to the
large sizes that need an empty row). The leftover space of the last partly filled rows is padding, about
half a row per step, so padding shrinks as ``1 / rows``. ``patience=k`` keeps drawing after a miss, up to
``k`` misses in a row, and fills gaps with the small sizes that fit: less padding, a larger skew to small
sizes. ``tests/test_packing.py`` measures both on the quickstart's mix.

Training (``PackStream``): a draw that fits nowhere is not thrown away but waits, in order, at the head of
the next plan of the same stream, as an online bin packer holds back an item for the next bin. Every
draw is then taken, so the images' sizes follow the weights exactly (no skew), and a plan depends on the
plans before it: ``PackStream.plan(i)`` replays the stream from its start (cheap: one seeded
``random.Random`` per plan) and remembers what each plan carries forward.

Buckets, for ``torch.compile``: a run packs every step into the same ``(rows, row_tokens)``, so the
transformer blocks always see tokens ``(rows, row_tokens, D)`` and one attention mask shape; only the eager
stem and pooling see the varying image count. One bucket per run, hence one graph per grad mode.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from flexivit.model.patch_embed import PatchScheme, check_patch_sizes
from flexivit.rng import mix

__all__ = ["check_lengths", "first_fit_decreasing", "tokens_per_image", "PackPlan", "RowPacker", "PackStream"]


def tokens_per_image(image_hw: int | tuple[int, int], patch: int, *, prefix: int = 0) -> int:
    """Tokens one image puts in a row: its patch grid plus ``prefix`` (1 with a class token)."""
    hw = (image_hw, image_hw) if isinstance(image_hw, int) else image_hw
    gh, gw = PatchScheme(int(patch)).grid_size(hw)
    return prefix + gh * gw


def check_lengths(lengths: Sequence[int], capacity: int) -> None:
    """Raise ``ValueError`` naming the first image longer than a row of ``capacity`` tokens."""
    if capacity < 1:
        raise ValueError(f"a row must hold at least one token, got row_tokens={capacity}")
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"image {i} has {n} tokens, more than a row of {capacity} (row_tokens); raise "
                             "row_tokens or give that image a larger patch size")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Image indices per row: longest first (ties by index), each into the first row with room.

    Deterministic; raises ``ValueError`` naming the first image longer than a row.
    """
    check_lengths(lengths, capacity)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


@dataclass(frozen=True)
class PackPlan:
    """One step on one rank: the ``k``-th image of the stream runs at ``patch_sizes[k]``, in row
    ``r`` where ``k in rows[r]``; pass ``patch_sizes``, ``rows`` and ``row_tokens`` to
    ``flexivit.model.packed.pack``/``forward_packed`` with the images."""

    patch_sizes: tuple[int, ...]
    lengths: tuple[int, ...]  # tokens of each image
    rows: tuple[tuple[int, ...], ...]  # image indices per row
    row_tokens: int
    rejected: int  # draws that fit nowhere (no image is taken for them)

    @property
    def num_images(self) -> int:
        return len(self.patch_sizes)

    @property
    def padding(self) -> float:
        """The fraction of the rows' token slots that hold no image."""
        return 1.0 - sum(self.lengths) / (len(self.rows) * self.row_tokens)

    def first(self, k: int) -> PackPlan:
        """The plan of its first ``k`` images only (the others' slots become padding): a step whose stream
        came short, e.g. corrupt images skipped by the loader."""
        if not 0 <= k <= self.num_images:
            raise ValueError(f"k must be in [0, {self.num_images}], got {k}")
        rows = tuple(tuple(i for i in row if i < k) for row in self.rows)
        return PackPlan(self.patch_sizes[:k], self.lengths[:k], rows, self.row_tokens, self.rejected)


class RowPacker:
    """Plans each step's rows from ``(seed, step, rank)``: patch sizes drawn with ``weights`` (one per size
    in ``sizes``, uniform by default), placed first fit into ``rows`` rows of ``row_tokens`` tokens (by
    default the longest image: the smallest patch, plus the class token with ``class_token``)."""

    def __init__(
        self, *, sizes: Sequence[int], image_size: int | tuple[int, int], rows: int,
        weights: Sequence[float] | None = None, row_tokens: int | None = None, class_token: bool = False,
        seed: int = 0, patience: int = 0,
    ) -> None:
        sizes = [int(p) for p in sizes]
        if not sizes or len(set(sizes)) != len(sizes):
            raise ValueError(f"sizes must be distinct patch sizes, at least one, got {sizes}")
        check_patch_sizes(sizes, image_size)
        weights = [1.0] * len(sizes) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sizes) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"give one non-negative weight per size ({len(sizes)}), not all zero; got {weights}")
        if rows < 1 or patience < 0:
            raise ValueError(f"rows must be >= 1 and patience >= 0, got rows={rows}, patience={patience}")
        self.sizes, self.weights = tuple(sizes), tuple(weights)
        self.lengths = tuple(tokens_per_image(image_size, p, prefix=int(class_token)) for p in sizes)
        self.row_tokens = max(self.lengths) if row_tokens is None else int(row_tokens)
        too_long = [p for p, n in zip(sizes, self.lengths) if n > self.row_tokens]
        if too_long:
            raise ValueError(f"patch sizes {too_long} give images longer than a row of {self.row_tokens} tokens; "
                             f"raise row_tokens to {max(self.lengths)} or leave it unset")
        self.rows, self.seed, self.patience = int(rows), int(seed), int(patience)
        total = sum(weights)
        self._cdf = [c / total for c in itertools.accumulate(weights)]
        self._last = max(i for i, w in enumerate(weights) if w > 0)

    def draw(self, step: int, rank: int, k: int) -> int:
        """The index into ``sizes`` of draw ``k`` of ``step`` on ``rank``."""
        return self._index((mix(self.seed, step, rank, k) >> 10) / float(1 << 53))  # 53 of mix's 63 bits, in [0, 1)

    def _index(self, u: float) -> int:
        """The size (an index into ``sizes``) a uniform ``u`` in [0, 1) draws: the inverse CDF."""
        i = bisect.bisect_right(self._cdf, u)  # never a zero-weight size: its CDF step is empty
        return i if i < len(self.sizes) else self._last  # u above a CDF that rounded to just under 1

    def plan(self, step: int, rank: int = 0) -> PackPlan:
        """The step's images (sizes in stream order) and rows; the same on every call."""
        if step < 0 or rank < 0:
            raise ValueError(f"step and rank must be non-negative, got step={step}, rank={rank}")
        plan, _ = self._place((), (self.draw(step, rank, k) for k in itertools.count()))
        return plan

    def stream(self, key: int = 0) -> PackStream:
        """The plans of one stream, in order, with carried-over draws (``PackStream``); ``key`` tells streams
        apart (a trainer uses its rank)."""
        return PackStream(self, key=key)

    def _place(self, queued: Sequence[int], fresh: Iterator[int]) -> tuple[PackPlan, tuple[int, ...]]:
        """First fit of the ``queued`` size indices, then of ``fresh`` draws, into empty rows, until a draw
        fits nowhere more than ``patience`` times in a row (or no row has room for the smallest size).
        Returns the plan and the draws that did not fit, in order."""
        free = [self.row_tokens] * self.rows
        rows: list[list[int]] = [[] for _ in range(self.rows)]
        sizes: list[int] = []
        lengths: list[int] = []
        left: list[int] = []
        smallest = min(n for n, w in zip(self.lengths, self.weights) if w > 0)
        misses = 0
        for k, i in enumerate(itertools.chain(queued, fresh)):
            carried = k < len(queued)  # an earlier plan's draw: never dropped, never a miss
            if max(free) < smallest:
                if carried:
                    left.append(i)
                    continue
                break
            n = self.lengths[i]
            row = next((r for r, room in enumerate(free) if room >= n), None)
            if row is None:
                left.append(i)
                if carried:
                    continue
                misses += 1
                if misses > self.patience:
                    break
                continue
            misses = 0
            rows[row].append(len(sizes))
            free[row] -= n
            sizes.append(self.sizes[i])
            lengths.append(n)
        # Which images a step takes is settled above; their layout is free. First-fit decreasing repeats the
        # same rows (four patch-4 images, twelve patch-7 ones and a patch 14...), which the grouped
        # attention runs as a few unmasked calls (flexivit.model.packed); it keeps the draw-order layout in
        # the rare case it would need more rows.
        decreasing = first_fit_decreasing(lengths, self.row_tokens) if lengths else []
        if len(decreasing) <= self.rows:
            rows = decreasing + [[] for _ in range(self.rows - len(decreasing))]
        plan = PackPlan(tuple(sizes), tuple(lengths), tuple(map(tuple, rows)), self.row_tokens, len(left))
        return plan, tuple(left)

    def __repr__(self) -> str:
        return (f"RowPacker(sizes={list(self.sizes)}, weights={list(self.weights)}, rows={self.rows}, "
                f"row_tokens={self.row_tokens}, seed={self.seed}, patience={self.patience})")


class PackStream:
    """One stream's plans in order, for training: plan ``i`` first places the draws plan ``i - 1`` could not
    (in order), then fresh draws from ``random.Random(mix(seed, key, i))`` (whose ``random()`` sequence
    Python keeps stable across versions). Every draw is used, so the images follow the weights exactly.
    ``plan(i)`` is a pure function of ``(seed, key, i)``: it replays from the last plan it remembers."""

    def __init__(self, packer: RowPacker, *, key: int) -> None:
        self.packer, self.key = packer, int(key)
        self._carried: list[tuple[int, ...]] = [()]  # what each plan 0, 1, ... starts with
        self._last: tuple[int, PackPlan] | None = None

    def _fresh(self, i: int) -> Iterator[int]:
        rng = random.Random(mix(self.packer.seed, self.key, i))
        while True:
            yield self.packer._index(rng.random())

    def plan(self, i: int) -> PackPlan:
        """Plan ``i`` of the stream; the same on every call and in every process. Plans read in order are
        placed once each (the last one is kept; each placement records what the next plan starts with)."""
        if i < 0:
            raise ValueError(f"plan index must be non-negative, got {i}")
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        for j in range(min(i, len(self._carried) - 1), i + 1):
            plan, left = self.packer._place(self._carried[j], self._fresh(j))
            if len(self._carried) == j + 1:
                self._carried.append(left)
        self._last = (i, plan)
        return plan
