"""Property tests for the patch-size sampler: frequencies, curriculum boundaries, determinism, errors."""

from __future__ import annotations

import ast
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import flexivit.train.sampler as sampler_module
from flexivit.model.patch_embed import PatchScheme
from flexivit.train.sampler import (
    Curriculum,
    Gaussian,
    PatchSizeSampler,
    Uniform,
    Weighted,
    make_distribution,
)

SIZES = [8, 12, 16, 24, 32]  # all tile a 96x96 image
N_DRAWS = 10_000
# Upper 0.999 quantiles of the chi-square distribution by degrees of freedom (standard tables).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}


def draws(sampler: PatchSizeSampler, steps) -> list[int]:
    return [sampler.at(k).patch for k in steps]


def chi_square(patches: list[int], sizes: list[int], probs: list[float]) -> float:
    """Pearson's statistic of observed patch sizes against expected probabilities (zero-mass sizes skipped)."""
    n = len(patches)
    stat = 0.0
    for size, p in zip(sizes, probs):
        if p > 0:
            expected = n * p
            stat += (patches.count(size) - expected) ** 2 / expected
    return stat


@pytest.mark.parametrize(
    "distribution",
    [Uniform(), Weighted((1.0, 2.0, 3.0, 4.0, 5.0)), Gaussian(center=16.0, width=8.0)],
    ids=["uniform", "weighted", "gaussian"],
)
@pytest.mark.parametrize("seed", [0, 1234])
def test_frequencies_match_distribution(distribution, seed):
    s = PatchSizeSampler(schemes=SIZES, distribution=distribution, seed=seed)
    probs = s.probs(0).tolist()
    patches = draws(s, range(N_DRAWS))
    df = sum(p > 0 for p in probs) - 1
    assert chi_square(patches, SIZES, probs) < CHI2_999[df]


def test_chi_square_bound_has_power():
    # The bound must reject a sampler whose frequencies are not the claimed ones.
    s = PatchSizeSampler(schemes=SIZES, distribution=Weighted((1.0, 2.0, 3.0, 4.0, 5.0)))
    patches = draws(s, range(N_DRAWS))
    assert chi_square(patches, SIZES, [0.2] * 5) > 10 * CHI2_999[4]


def test_probabilities_follow_their_formulas():
    schemes = [PatchScheme(p) for p in SIZES]
    assert torch.allclose(Uniform().probs(schemes, 0), torch.full((5,), 0.2, dtype=torch.float64))
    assert Weighted((1, 1, 2, 0, 4)).probs(schemes, 0).tolist() == [0.125, 0.125, 0.25, 0.0, 0.5]
    g = Gaussian(center=13.0, width=5.0).probs(schemes, 0)
    raw = torch.tensor([math.exp(-((p - 13.0) ** 2) / (2 * 25.0)) for p in SIZES], dtype=torch.float64)
    assert torch.allclose(g, raw / raw.sum())
    # Far from every size, the gaussian still normalises instead of underflowing to NaN.
    far = Gaussian(center=1e4, width=1.0).probs(schemes, 0)
    assert torch.isfinite(far).all() and far.argmax().item() == 4 and math.isclose(far.sum().item(), 1.0)


def test_zero_weight_schemes_are_never_drawn():
    s = PatchSizeSampler(schemes=SIZES, distribution=Weighted((0, 1, 0, 1, 0)), seed=7)
    assert set(draws(s, range(2000))) == {12, 24}


def test_gaussian_is_over_sorted_patch_sizes():
    # Mass follows the patch size, not the order the schemes were given in.
    s = PatchSizeSampler(schemes=[32, 8, 24, 16, 12], distribution=Gaussian(center=8.0, width=2.0))
    assert [x.patch for x in s.schemes] == SIZES
    assert s.probs(0).argmax().item() == 0


def one_hot(index: int) -> Weighted:
    return Weighted(tuple(1.0 if i == index else 0.0 for i in range(len(SIZES))))


def test_curriculum_switches_exactly_at_boundaries():
    curriculum = Curriculum(stages=((100, one_hot(0)), (250, one_hot(2)), (300, one_hot(4))))
    s = PatchSizeSampler(schemes=SIZES, distribution=curriculum, seed=3)
    assert set(draws(s, range(0, 100))) == {8}
    assert set(draws(s, range(100, 250))) == {16}
    assert set(draws(s, range(250, 300))) == {32}
    # The last stage covers every later step.
    assert set(draws(s, [300, 301, 10_000, 10**9])) == {32}
    assert s.probs(99).tolist() == [1.0, 0, 0, 0, 0] and s.probs(100).tolist() == [0, 0, 1.0, 0, 0]
    assert curriculum.stage_at(249) is curriculum.stages[1][1] and curriculum.stage_at(250) is curriculum.stages[2][1]


def test_curriculum_mixes_distribution_kinds():
    curriculum = Curriculum(stages=((10, Gaussian(center=32.0, width=1.0)), (20, Uniform())))
    s = PatchSizeSampler(schemes=SIZES, distribution=curriculum)
    assert s.probs(9).argmax().item() == 4
    assert torch.allclose(s.probs(10), torch.full((5,), 0.2, dtype=torch.float64))


def test_same_seed_same_sequence_in_a_fresh_sampler():
    a = PatchSizeSampler(schemes=SIZES, seed=42)
    sequence = draws(a, range(1000))
    # Another rank, built from the schemes in another order.
    b = PatchSizeSampler(schemes=list(reversed(SIZES)), seed=42)
    assert draws(b, range(1000)) == sequence
    # A run resumed at step 600 continues the same sequence, whatever order the steps are queried in.
    resumed = PatchSizeSampler(schemes=SIZES, seed=42)
    assert draws(resumed, range(600, 1000)) == sequence[600:]
    assert draws(resumed, reversed(range(1000))) == sequence[::-1]
    # Repeated calls agree.
    assert draws(a, range(1000)) == sequence


def test_different_seeds_give_different_sequences():
    sequences = [draws(PatchSizeSampler(schemes=SIZES, seed=seed), range(500)) for seed in (0, 1, 2, 10**12)]
    for i in range(len(sequences)):
        for j in range(i + 1, len(sequences)):
            agreement = sum(x == y for x, y in zip(sequences[i], sequences[j])) / 500
            assert agreement < 0.4  # independent uniform draws agree ~20% of the time


def test_sequence_ignores_and_leaves_global_rng():
    s = PatchSizeSampler(schemes=SIZES, distribution=Gaussian(center=16.0, width=6.0), seed=5)
    reference = draws(s, range(200))
    interleaved = []
    for k in range(200):
        torch.manual_seed(k)
        np.random.seed(1000 + k)
        random.seed(k * 7)
        torch.rand(3), np.random.rand(), random.random()  # consume some global randomness too
        interleaved.append(s.at(k).patch)
    assert interleaved == reference
    # Drawing does not consume the global RNGs either.
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    draws(s, range(50))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_accepts_scheme_forms_and_image_size():
    s = PatchSizeSampler(schemes=[PatchScheme(16), 8, (24, 12)], image_size=(96, 96))
    assert s.schemes == (PatchScheme(8), PatchScheme(16), PatchScheme(24, 12))
    assert PatchSizeSampler(schemes=SIZES, image_size=96).schemes == tuple(PatchScheme(p) for p in SIZES)


def test_make_distribution():
    assert make_distribution("uniform") == Uniform()
    assert make_distribution("Weighted", weights=[1, 3]) == Weighted((1.0, 3.0))
    assert make_distribution("gaussian", center=16, width=4) == Gaussian(16.0, 4.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(schemes=[]), ValueError, "schemes must not be empty"),
        (dict(schemes=[8, 16, (8, 8)]), ValueError, r"duplicate schemes: \[\(8, 8\)\]"),
        (dict(schemes=SIZES, distribution=Weighted((1.0, 2.0))), ValueError, "got 2 weights for 5 schemes"),
        (
            dict(schemes=[16, 8], distribution=Weighted((1.0, 2.0))),
            ValueError,
            r"pass them sorted \(\[8, 16\]\)",
        ),
        (
            dict(schemes=SIZES, distribution=Curriculum(((10, Uniform()), (20, Weighted((1.0,)))))),
            ValueError,
            "got 1 weights for 5 schemes",
        ),
        (
            dict(schemes=[8, 10, 16], image_size=96),
            ValueError,
            r"^patch size 10 does not tile a 96x96 image; valid patch sizes: "
            r"1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96$",
        ),
        (
            dict(schemes=[(16, 8), (20, 8)], image_size=(64, 48)),
            ValueError,
            r"^patch size 20 \(stride 8\) does not tile a 64x48 image; valid patch sizes: 1, 2, 4, 8, 16; "
            r"with stride 8: 8, 16, 24, 32, 40, 48$",
        ),
        (dict(schemes=SIZES, distribution="uniform"), TypeError, "must be a Distribution"),
    ],
    ids=["empty", "duplicate", "weights-length", "weights-unsorted", "curriculum-weights", "tiling",
         "tiling-stride", "not-a-distribution"],
)
def test_bad_sampler_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        PatchSizeSampler(**kwargs)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Weighted((1.0, -0.5)), "finite and non-negative"),
        (lambda: Weighted((1.0, float("nan"))), "finite and non-negative"),
        (lambda: Weighted((0.0, 0.0)), "must not all be zero"),
        (lambda: Weighted(()), "must not be empty"),
        (lambda: Gaussian(center=16.0, width=0.0), "width must be positive"),
        (lambda: Gaussian(center=16.0, width=-1.0), "width must be positive"),
        (lambda: Curriculum(()), "at least one stage"),
        (lambda: Curriculum(((100, Uniform()), (100, Uniform()))), r"increasing order, got \[100, 100\]"),
        (lambda: Curriculum(((0, Uniform()),)), "positive integers"),
        (lambda: make_distribution("triangle"), "unknown distribution kind 'triangle'; valid kinds: uniform, weighted, gaussian"),
        (lambda: make_distribution("weighted"), "'weighted' needs weights"),
        (lambda: make_distribution("gaussian", center=3.0), "'gaussian' needs width"),
        (lambda: make_distribution("uniform", width=2.0), "'uniform' does not take width"),
        (lambda: PatchSizeSampler(schemes=SIZES).at(-1), "step must be non-negative"),
    ],
)
def test_bad_distribution_inputs(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_sampler_module_does_not_import_accelerate():
    tree = ast.parse(Path(sampler_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "accelerate" for name in imported)
