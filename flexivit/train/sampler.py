"""Which patch size to train with at each step.

The draw happens in the training loop, not in the model, and is a pure function of ``(seed, step)``:
every rank draws the same scheme without talking to the others, and a resumed run continues the same
sequence. The uniform number behind each draw is a BLAKE2b hash of ``"seed:step"`` (stdlib, so the
sequence does not change with the numpy or torch version), and the global RNGs are never touched.
"""

from __future__ import annotations

import hashlib
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flexivit.model.patch_embed import PatchScheme, check_patch_sizes

__all__ = [
    "Distribution",
    "Uniform",
    "Weighted",
    "Gaussian",
    "Curriculum",
    "make_distribution",
    "PatchSizeSampler",
]

SchemeLike = PatchScheme | int | tuple[int, int]


class Distribution(ABC):
    """Probabilities over a list of schemes sorted by ``(patch, stride)``, possibly changing with the step."""

    @abstractmethod
    def probs(self, schemes: Sequence[PatchScheme], step: int) -> torch.Tensor:
        """The probability of each scheme at ``step``: a float64 tensor of shape ``(len(schemes),)``."""

    def check(self, schemes: Sequence[PatchScheme]) -> None:
        """Raise ``ValueError`` if this distribution cannot be used with ``schemes``."""

    @property
    def positional(self) -> bool:
        """Whether the probabilities are tied to positions in the scheme list (rather than to patch sizes)."""
        return False


@dataclass(frozen=True)
class Uniform(Distribution):
    """Every scheme equally likely."""

    def probs(self, schemes: Sequence[PatchScheme], step: int) -> torch.Tensor:
        n = len(schemes)
        return torch.full((n,), 1.0 / n, dtype=torch.float64)


@dataclass(frozen=True)
class Weighted(Distribution):
    """Fixed weights, one per scheme in sorted order (by patch size, then stride); normalised on use."""

    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        weights = tuple(float(w) for w in self.weights)
        object.__setattr__(self, "weights", weights)
        if not weights:
            raise ValueError("weights must not be empty")
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
        if sum(weights) <= 0:
            raise ValueError(f"weights must not all be zero, got {list(weights)}")

    def check(self, schemes: Sequence[PatchScheme]) -> None:
        if len(self.weights) != len(schemes):
            raise ValueError(
                f"got {len(self.weights)} weights for {len(schemes)} schemes "
                f"(patch sizes {[s.patch for s in schemes]}); give one weight per scheme "
                "(--set patch.weights=...), or draw uniformly (--set patch.distribution=uniform --set patch.weights=none)"
            )

    def probs(self, schemes: Sequence[PatchScheme], step: int) -> torch.Tensor:
        self.check(schemes)
        w = torch.tensor(self.weights, dtype=torch.float64)
        return w / w.sum()

    @property
    def positional(self) -> bool:
        return True


@dataclass(frozen=True)
class Gaussian(Distribution):
    """Probability proportional to ``exp(-(p - center)**2 / (2 * width**2))`` over the patch sizes ``p``."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.center):
            raise ValueError(f"gaussian center must be finite, got {self.center!r}")
        if not (math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"gaussian width must be positive and finite, got {self.width!r}")

    def probs(self, schemes: Sequence[PatchScheme], step: int) -> torch.Tensor:
        p = torch.tensor([s.patch for s in schemes], dtype=torch.float64)
        logits = -((p - self.center) ** 2) / (2 * self.width**2)
        # Softmax rather than exp/sum so a center far outside the sizes does not underflow to 0/0.
        return torch.softmax(logits, dim=0)


@dataclass(frozen=True)
class Curriculum(Distribution):
    """Stages ``(end_step_exclusive, distribution)`` in increasing order of end.

    A step uses the first stage whose end is greater than it; the last stage also covers every later step.
    """

    stages: tuple[tuple[int, Distribution], ...]

    def __post_init__(self) -> None:
        stages = tuple((end, dist) for end, dist in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("a curriculum needs at least one stage")
        previous = 0
        for end, dist in stages:
            if not isinstance(end, int) or isinstance(end, bool) or end <= previous:
                ends = [e for e, _ in stages]
                raise ValueError(f"curriculum stage ends must be positive integers in increasing order, got {ends}")
            if not isinstance(dist, Distribution):
                raise TypeError(f"curriculum stage ending at {end} has {dist!r}, which is not a Distribution")
            previous = end

    def stage_at(self, step: int) -> Distribution:
        """The distribution in force at ``step``."""
        for end, dist in self.stages:
            if step < end:
                return dist
        return self.stages[-1][1]

    def check(self, schemes: Sequence[PatchScheme]) -> None:
        for _, dist in self.stages:
            dist.check(schemes)

    def probs(self, schemes: Sequence[PatchScheme], step: int) -> torch.Tensor:
        return self.stage_at(step).probs(schemes, step)

    @property
    def positional(self) -> bool:
        return any(dist.positional for _, dist in self.stages)


_KINDS = ("uniform", "weighted", "gaussian")


def make_distribution(
    kind: str,
    *,
    weights: Sequence[float] | None = None,
    center: float | None = None,
    width: float | None = None,
) -> Distribution:
    """A distribution by name, for configs and the command line: ``"uniform"``, ``"weighted"`` or ``"gaussian"``."""
    name = kind.strip().lower()
    if name not in _KINDS:
        raise ValueError(f"unknown distribution kind {kind!r}; valid kinds: {', '.join(_KINDS)}")
    given = {"weights": weights, "center": center, "width": width}
    needed = {"uniform": (), "weighted": ("weights",), "gaussian": ("center", "width")}[name]
    missing = [k for k in needed if given[k] is None]
    if missing:
        raise ValueError(f"distribution {name!r} needs {', '.join(missing)}")
    unused = [k for k, v in given.items() if v is not None and k not in needed]
    if unused:
        raise ValueError(f"distribution {name!r} does not take {', '.join(unused)}")
    if name == "weighted":
        return Weighted(tuple(weights))
    if name == "gaussian":
        return Gaussian(float(center), float(width))
    return Uniform()


def _uniform(seed: int, step: int) -> float:
    """A number in [0, 1) that depends only on ``(seed, step)``."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8, person=b"flexivit").digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)  # 53 random bits, like random.random()


def _pick(probs: Sequence[float], u: float) -> int:
    """Inverse-CDF draw; a scheme with probability zero is never returned, even under rounding."""
    target = u * sum(probs)
    total = 0.0
    for i, p in enumerate(probs):
        total += p
        if p > 0 and target < total:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)


class PatchSizeSampler:
    """Draws the patch scheme for each training step from a distribution, as a pure function of ``(seed, step)``.

    ``schemes`` are kept sorted by ``(patch, stride)``; ``Weighted`` weights follow that order, so with
    position-tied weights the schemes must already be given in it. With ``image_size``, every scheme must
    tile the image exactly.
    """

    def __init__(
        self,
        *,
        schemes: Sequence[SchemeLike],
        distribution: Distribution = Uniform(),
        seed: int = 0,
        image_size: int | tuple[int, int] | None = None,
    ) -> None:
        given = [PatchScheme.of(s) for s in schemes]
        if not given:
            raise ValueError("schemes must not be empty; give at least one patch size")
        duplicates = sorted({s for s in given if given.count(s) > 1}, key=lambda s: (s.patch, s.stride))
        if duplicates:
            raise ValueError(f"duplicate schemes: {[(s.patch, s.stride) for s in duplicates]}")
        ordered = sorted(given, key=lambda s: (s.patch, s.stride))
        if not isinstance(distribution, Distribution):
            raise TypeError(f"distribution must be a Distribution, got {distribution!r}")
        if distribution.positional and ordered != given:
            raise ValueError(
                f"weights are matched to schemes sorted by patch size, but the schemes were given as "
                f"{[s.patch for s in given]}; pass them sorted ({[s.patch for s in ordered]}) with the "
                f"weights in the same order"
            )
        distribution.check(ordered)
        if image_size is not None:
            check_patch_sizes(ordered, image_size)
        self.schemes: tuple[PatchScheme, ...] = tuple(ordered)
        self.distribution = distribution
        self.seed = operator.index(seed)
        self.image_size = image_size

    def probs(self, step: int) -> torch.Tensor:
        """The probability of each scheme in ``self.schemes`` at ``step`` (float64, sums to 1)."""
        step = _check_step(step)
        p = torch.as_tensor(self.distribution.probs(self.schemes, step), dtype=torch.float64)
        if p.shape != (len(self.schemes),) or not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
            raise ValueError(f"{self.distribution!r} gave invalid probabilities {p.tolist()} at step {step}")
        if float(p.sum()) <= 0:
            raise ValueError(f"{self.distribution!r} gave all-zero probabilities at step {step}")
        return p / p.sum()

    def at(self, step: int) -> PatchScheme:
        """The scheme for ``step``; the same on every rank and on every call."""
        step = _check_step(step)
        return self.schemes[_pick(self.probs(step).tolist(), _uniform(self.seed, step))]

    def __repr__(self) -> str:
        sizes = [s.patch if s.stride == s.patch else (s.patch, s.stride) for s in self.schemes]
        return f"PatchSizeSampler(schemes={sizes}, distribution={self.distribution!r}, seed={self.seed})"


def _check_step(step: int) -> int:
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return step
