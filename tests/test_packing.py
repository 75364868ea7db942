"""Packing into token rows (flexivit.model.packing): layouts, determinism from (seed, step, rank), padding."""

import math
import random
from collections import Counter

import pytest

from flexivit.model.packing import RowPacker, first_fit_decreasing, tokens_per_image

# The quickstart (recipes/fashion_mnist.py): 28 px, patch sizes 2, 4, 7, 14 drawn 0.4 / 0.25 / 0.25 / 0.1.
QUICKSTART = dict(sizes=[2, 4, 7, 14], weights=[0.4, 0.25, 0.25, 0.1], image_size=28)


def _quickstart(**kwargs) -> RowPacker:
    return RowPacker(**{**QUICKSTART, **kwargs})


def test_tokens_per_image():
    assert [tokens_per_image(28, p) for p in (2, 4, 7, 14)] == [196, 49, 16, 4]
    assert tokens_per_image((12, 8), 4, prefix=1) == 7
    with pytest.raises(ValueError, match="does not tile"):
        tokens_per_image(28, 5)


def test_first_fit_decreasing_places_every_image_once_within_capacity():
    rng = random.Random(0)
    for _ in range(50):
        capacity = rng.randint(10, 200)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 60))]
        rows = first_fit_decreasing(lengths, capacity)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        # First fit: no image could have gone into an earlier row when it was placed (longest first).
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        row_of = {i: r for r, row in enumerate(rows) for i in row}
        for k, i in enumerate(order):
            for r in range(row_of[i]):
                held = sum(lengths[j] for j in order[:k] if row_of[j] == r)
                assert held + lengths[i] > capacity
        assert rows == first_fit_decreasing(lengths, capacity)


def _fewest_rows(lengths: list[int], capacity: int) -> int:
    """The optimum by exhaustive search (every set partition), for a few images."""
    best = len(lengths)

    def place(k: int, loads: list[int]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if k == len(lengths):
            best = len(loads)
            return
        for r in range(len(loads)):
            if loads[r] + lengths[k] <= capacity:
                loads[r] += lengths[k]
                place(k + 1, loads)
                loads[r] -= lengths[k]
        place(k + 1, loads + [lengths[k]])

    place(0, [])
    return best


def test_first_fit_decreasing_is_within_its_bound_of_the_optimum():
    rng = random.Random(1)
    for _ in range(100):
        capacity = rng.randint(10, 60)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 8))]
        optimum = _fewest_rows(lengths, capacity)
        assert optimum >= math.ceil(sum(lengths) / capacity)
        assert len(first_fit_decreasing(lengths, capacity)) <= 11 / 9 * optimum + 6 / 9  # Dosa's tight bound


def test_first_fit_decreasing_names_an_image_longer_than_a_row():
    with pytest.raises(ValueError, match="image 2 has 50 tokens, more than a row of 49"):
        first_fit_decreasing([4, 16, 50], 49)


def test_a_plan_is_a_pure_function_of_seed_step_and_rank():
    a, b = _quickstart(rows=8, seed=3), _quickstart(rows=8, seed=3)
    forward = [a.plan(step, rank) for step in range(5) for rank in range(2)]
    backward = [b.plan(step, rank) for step in reversed(range(5)) for rank in reversed(range(2))]
    assert forward == backward[::-1]  # the same plans in any call order, from a fresh packer (a resume)
    assert a.plan(2, 0) != a.plan(2, 1) and a.plan(2, 0) != a.plan(3, 0)
    assert a.plan(2, 0) != _quickstart(rows=8, seed=4).plan(2, 0)


def test_a_plan_fills_its_rows_first_fit_and_stops_at_the_first_miss():
    packer = _quickstart(rows=4, seed=0)
    misses = 0
    for step in range(30):
        plan = packer.plan(step)
        assert len(plan.rows) == 4 and plan.row_tokens == 196
        assert sorted(i for row in plan.rows for i in row) == list(range(plan.num_images))
        assert all(sum(plan.lengths[i] for i in row) <= 196 for row in plan.rows)
        # The sizes are the step's draws in order, up to the first that fits nowhere.
        # The sizes are the step's draws in order, up to the first that fits nowhere, or until no row has
        # room for even the smallest size.
        draws = [packer.sizes[packer.draw(step, 0, k)] for k in range(plan.num_images + 1)]
        free = [196 - sum(plan.lengths[i] for i in row) for row in plan.rows]
        assert list(plan.patch_sizes) == draws[:-1]
        assert (plan.rejected, max(free) < tokens_per_image(28, draws[-1])) == (1, True) or (
            plan.rejected == 0 and max(free) < 4)
        misses += plan.rejected
    assert misses > 20  # most steps end at a miss


def test_draws_follow_the_weights_and_never_a_zero_weight_size():
    packer = RowPacker(sizes=[2, 4, 7, 14], weights=[0.5, 0.0, 0.3, 0.2], image_size=28, rows=1)
    counts = Counter(packer.sizes[packer.draw(0, 0, k)] for k in range(20000))
    assert counts[4] == 0
    for size, weight in ((2, 0.5), (7, 0.3), (14, 0.2)):
        assert abs(counts[size] / 20000 - weight) < 0.015


@pytest.mark.parametrize("class_token,rows", [(False, 32), (True, 64)])
def test_padding_under_two_percent_on_the_quickstart_mix(class_token, rows):
    packer = _quickstart(rows=rows, class_token=class_token, seed=0)
    plans = [packer.plan(step, rank) for step in range(100) for rank in range(2)]
    padding = sum(p.padding for p in plans) / len(plans)
    assert padding < 0.02, padding
    # The sizes taken still follow the weights: one rejected draw per step skews them by about 1 / images.
    taken = Counter(p for plan in plans for p in plan.patch_sizes)
    total = sum(taken.values())
    for size, weight in zip(QUICKSTART["sizes"], QUICKSTART["weights"]):
        assert abs(taken[size] / total - weight) < 0.02, (size, taken[size] / total)


def test_patience_trades_skew_for_padding():
    plain, patient = _quickstart(rows=16, seed=0), _quickstart(rows=16, seed=0, patience=4)
    steps = range(100)
    pad = [sum(packer.plan(s).padding for s in steps) / len(steps) for packer in (plain, patient)]
    share = [sum(packer.plan(s).patch_sizes.count(2) for s in steps) / sum(packer.plan(s).num_images for s in steps)
             for packer in (plain, patient)]
    assert pad[1] < pad[0] / 2 and share[1] < share[0]  # less padding, fewer of the large (patch 2) images


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sizes=[2, 5], image_size=28, rows=4), "does not tile"),
        (dict(sizes=[2, 4], weights=[1.0], image_size=28, rows=4), "one non-negative weight per size"),
        (dict(sizes=[2, 4], image_size=28, rows=0), "rows must be >= 1"),
        (dict(sizes=[2, 4], image_size=28, rows=4, row_tokens=100), "raise row_tokens to 196"),
        (dict(sizes=[2, 2], image_size=28, rows=4), "distinct patch sizes"),
    ],
)
def test_bad_packer_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RowPacker(**kwargs)
