"""Evolution operators on block graphs (``flexivit.ext.graph``): pure functions of their arguments and a
``random.Random``, so the same seed gives the same child (derive it as ``random.Random(mix(seed, i))``).

- ``mutate``: the child keeps the parent's edges whose trained connection weight exceeds a threshold
  (a fixed value, or one drawn from U(0, 1) per edge), adds each edge the parent lacks with probability
  ``#pruned / #absent`` so that the expected edge count is the parent's, then is repaired to validity.
  ``keep_rate`` replaces the weights by a coin: each edge is kept with that probability (the unguided
  control, run at the guided search's mean keep rate).
- ``repair``: each node without inputs, in order ``1..h``, gets one from the node before it (which makes
  every node reachable from the stem); then each block that does not reach the head, from the last to
  the first, feeds the node after it. It only adds edges, and only what these two rules ask for.
- ``tournament``: ``size`` distinct members drawn at random; the best is the parent, the worst of them is
  the one to remove (ties: the lower index is the better).
- ``random_graph``: each allowed edge with probability ``density``, then repaired.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from flexivit.ext.graph import BlockGraph, Edge, allowed_edges

__all__ = ["Mutation", "mutate", "repair", "tournament", "random_graph", "check_threshold"]


@dataclass(frozen=True)
class Mutation:
    """A child graph and how it was made from its parent (edges in ``format`` order)."""

    child: BlockGraph
    kept: tuple[Edge, ...]  # parent edges that passed the threshold (or the coin)
    pruned: tuple[Edge, ...]  # parent edges that did not
    added: tuple[Edge, ...]  # edges absent from the parent, drawn at rate #pruned / #absent
    repaired: tuple[Edge, ...]  # edges the repair added to make the child valid

    @property
    def keep_rate(self) -> float:
        """The share of the parent's edges kept: what ``--unguided`` replays."""
        return len(self.kept) / (len(self.kept) + len(self.pruned))


def _order(edges: Iterable[Edge]) -> tuple[Edge, ...]:
    return tuple(sorted(edges, key=lambda e: (e[1], e[0])))


def check_threshold(threshold: float | str) -> float | str:
    """A fixed threshold in [0, 1] or ``"uniform"`` (one drawn from U(0, 1) per edge)."""
    if threshold == "uniform":
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1] or 'uniform', got {threshold!r}")
    return float(threshold)


def repair(depth: int, edges: Iterable[Edge]) -> tuple[BlockGraph, tuple[Edge, ...]]:
    """The valid graph made from forward ``edges`` (duplicates merged) by the two rules of the module
    docstring, and the edges the rules added."""
    present = set(edges)
    added = []
    for j in range(1, depth + 2):  # all nodes before j have inputs, so giving j one makes it reachable
        if not any(t == j for _, t in present):
            added.append((j - 1, j))
            present.add((j - 1, j))
    reaching = {depth + 1}
    for i in range(depth, 0, -1):  # all blocks after i reach the head, so feeding i + 1 makes i reach it
        if not reaching.intersection(t for s, t in present if s == i):
            added.append((i, i + 1))
            present.add((i, i + 1))
        reaching.add(i)
    return BlockGraph(depth, tuple(present)), _order(added)


def mutate(parent: BlockGraph, weights: Mapping[Edge, float], *, threshold: float | str, rng: random.Random,
           keep_rate: float | None = None) -> Mutation:
    """A child of ``parent`` guided by its trained connection ``weights`` (``GraphBlocks.connection_weights``).

    Guided: edge ``e`` is kept iff ``weights[e] > threshold`` (``"uniform"``: a threshold drawn from U(0, 1)
    for each edge). With ``keep_rate`` (unguided) each edge is kept with that probability instead and
    ``weights`` and ``threshold`` are not used for the choice. Then every allowed edge the parent lacks is
    added with probability ``min(1, #pruned / #absent)`` (edges just pruned are not among them), and the
    result is repaired. Edges are visited in ``format`` order, so one seed gives one child.
    """
    threshold = check_threshold(threshold)
    if keep_rate is not None and not 0 <= keep_rate <= 1:
        raise ValueError(f"keep_rate must be a probability in [0, 1], got {keep_rate!r}")
    missing = [e for e in parent.edges if e not in weights]
    if keep_rate is None and missing:
        i, j = missing[0]
        raise ValueError(f"no trained weight for edge {i}-{'h' if j == parent.head else j} of the parent; pass "
                         "the connection_weights() of the parent model after training")
    kept, pruned = [], []
    for edge in parent.edges:
        if keep_rate is not None:
            keep = rng.random() < keep_rate
        else:
            keep = weights[edge] > (rng.random() if threshold == "uniform" else threshold)
        (kept if keep else pruned).append(edge)
    absent = [e for e in allowed_edges(parent.depth) if e not in set(parent.edges)]
    rate = min(1.0, len(pruned) / len(absent)) if absent else 0.0
    added = [e for e in absent if rng.random() < rate]
    child, repaired = repair(parent.depth, kept + added)
    return Mutation(child=child, kept=tuple(kept), pruned=tuple(pruned), added=tuple(added), repaired=repaired)


def random_graph(depth: int, rng: random.Random, *, density: float = 0.5) -> BlockGraph:
    """Each allowed edge present with probability ``density``, then repaired (for an initial population)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return repair(depth, [e for e in allowed_edges(depth) if rng.random() < density])[0]


def tournament(population: Sequence[Any], scores: Sequence[float], size: int, rng: random.Random) -> tuple[int, int]:
    """``(parent, worst)``: indices of the best and the worst of ``size`` distinct members drawn at random
    (higher scores are better; a tie goes to the lower index, so the two always differ)."""
    n = len(population)
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for a population of {n}; give one score per member")
    if n < 2:
        raise ValueError(f"a tournament needs a population of at least 2, got {n}")
    if not 2 <= size <= n:
        raise ValueError(f"the tournament size must be between 2 and the population size {n}, got {size}")
    bad = [k for k, s in enumerate(scores) if math.isnan(s)]
    if bad:
        raise ValueError(f"member {bad[0]} has a NaN score; score a failed candidate -inf to rank it last")
    entrants = rng.sample(range(n), size)
    parent = max(entrants, key=lambda k: (scores[k], -k))
    worst = min(entrants, key=lambda k: (scores[k], -k))
    return parent, worst
