"""Block graphs: the transformer blocks of a FlexiViT wired as a DAG, one learned weight per connection.

Nodes are numbered in execution order: ``0`` the stem (the embedded tokens), ``1..depth`` the blocks,
``depth + 1`` the head (what the final norm, the pool and the classifier see). An edge ``(i, j)`` feeds
node ``i``'s output into node ``j``; edges run only from an earlier node to a later one, so the numbering
is a topological order and no graph can hold a cycle. Every block and the head has at least one input,
every block is reachable from the stem and reaches the head. ``chain(depth)`` (``0-1, 1-2, ...``) is the
plain FlexiViT. Every block keeps the width and token count, so any such graph is a valid network and
costs the blocks' FLOPs plus the weighted sums.

String form (``--set model.graph=...``, ``config.json``, model metadata): edges ``SOURCE-TARGET`` joined by
commas, the head written ``h``; the chain of depth 3 is ``0-1,1-2,2-3,3-h``. Digits, ``-``, ``,`` and ``h``
need no shell quoting. ``format`` writes the edges sorted by (target, source), so a node's inputs stand
together; ``parse`` reads any order and ignores spaces around the edges.

Combination: a node with ``k >= 2`` inputs ``x_1..x_k`` takes ``(2 / k) * sum_i sigmoid(l_i) * x_i``, one
logit ``l_i`` per incoming edge (``GraphBlocks.edge_logits``), all starting at 0 (weight 1/2). The sum is
scaled by a constant, ``2 / k`` (one over the initial total weight), not by the current ``sum_i sigmoid(l_i)``:
at initialisation a node sees the mean of its inputs whatever its fan-in, so the residual stream keeps its
scale where branches merge, while each weight keeps an absolute meaning (a weight near 0 removes its input;
normalising by the current sum would make only ratios matter and leave a common drift of all weights
unseen by the loss), which is what pruning by a threshold on the trained weights needs. A node with one
input uses it as it is, with no parameter: the chain has no edge parameters at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from timm.models import checkpoint
from torch import nn

from flexivit.model.options import ModelOption, register

__all__ = ["BlockGraph", "GraphBlocks", "GraphError", "Edge", "allowed_edges", "chain", "HEAD", "block_graph", "GRAPH_LOGITS",
           "GraphFields"]

Edge = tuple[int, int]
HEAD = "h"  # how the string form writes the head
_EXAMPLE = "e.g. the chain of depth 2 is 0-1,1-2,2-h"


class GraphError(ValueError):
    """A block graph that is not a valid network; the message names the node and says why."""


def _token(node: int, depth: int) -> str:
    return HEAD if node == depth + 1 else str(node)


def _edge(edge: Edge, depth: int) -> str:
    return f"{_token(edge[0], depth)}-{_token(edge[1], depth)}"


def _name(node: int, depth: int) -> str:
    if node == 0:
        return "the stem (0)"
    return "the head (h)" if node == depth + 1 else f"block {node}"


def _listed(nodes: Iterable[int], depth: int) -> str:
    return ", ".join(_token(n, depth) for n in nodes)


def _subject(blocks: list[int], depth: int, one: str, many: str) -> str:
    """'block 2 is' or 'blocks 2, 3 are'."""
    return f"block {blocks[0]} {one}" if len(blocks) == 1 else f"blocks {_listed(blocks, depth)} {many}"


def allowed_edges(depth: int) -> list[Edge]:
    """Every edge a graph of ``depth`` blocks may hold, in ``format``'s order (by target, then source)."""
    return [(i, j) for j in range(1, depth + 2) for i in range(j)]


def _check_edges(depth: int, edges: Sequence[Edge]) -> None:
    """Range, direction and duplicates, edge by edge."""
    seen: set[Edge] = set()
    for i, j in edges:
        for node in (i, j):
            if not 0 <= node <= depth + 1:
                raise GraphError(f"edge {i}-{j}: node {node} is out of range for depth {depth} (0 is the stem, "
                                 f"1..{depth} the blocks, {depth + 1} the head)")
        if i >= j:
            what = "into itself" if i == j else f"back to {_name(j, depth)}"
            raise GraphError(f"edge {_edge((i, j), depth)} leads from {_name(i, depth)} {what}, which would make a "
                             f"cycle: every edge goes from an earlier node to a later one (0, 1..{depth}, h)")
        if (i, j) in seen:
            raise GraphError(f"edge {_edge((i, j), depth)} appears twice; list each connection once")
        seen.add((i, j))


def _check_connected(depth: int, edges: Sequence[Edge]) -> None:
    """Every block reachable from the stem, the head fed, every block reaching the head."""
    head = depth + 1
    inputs = {j: [i for i, t in edges if t == j] for j in range(1, head + 1)}
    outputs = {i: [t for s, t in edges if s == i] for i in range(head)}
    reached = {0}
    for j in range(1, head + 1):  # inputs come from earlier nodes: one pass in order settles reachability
        if reached.intersection(inputs[j]):
            reached.add(j)
    lost = [j for j in range(1, head) if j not in reached]
    if lost:
        why = [f"block {j}'s inputs ({_listed(inputs[j], depth)}) are unreachable" if inputs[j]
               else f"block {j} has no inputs" for j in lost]
        raise GraphError(f"{_subject(lost, depth, 'is', 'are')} not reachable from the stem"
                         f" ({'; '.join(why)}): give block {lost[0]} an input, e.g. {lost[0] - 1}-{lost[0]}")
    if not inputs[head]:
        raise GraphError(f"the head (h) has no inputs, so no block reaches the classifier: add an edge into h, "
                         f"e.g. {depth}-h")
    reaching = {head}
    for i in range(depth, 0, -1):  # and outputs go to later nodes: one pass backwards settles the rest
        if reaching.intersection(outputs[i]):
            reaching.add(i)
    dangling = [i for i in range(1, head) if i not in reaching]
    if dangling:
        why = [f"block {i}'s outputs ({_listed(outputs[i], depth)}) do not reach the head" if outputs[i]
               else f"block {i} has no outputs" for i in dangling]
        last = dangling[-1]
        raise GraphError(f"{_subject(dangling, depth, 'does', 'do')} not reach the head"
                         f" ({'; '.join(why)}): feed block {last} into a later node, e.g. "
                         f"{_edge((last, last + 1), depth)}")


@dataclass(frozen=True)
class BlockGraph:
    """A valid DAG over the stem (0), blocks ``1..depth`` and the head (``depth + 1``); edges kept sorted
    by (target, source). Raises ``GraphError`` naming the node and the reason when it is not valid."""

    depth: int
    edges: tuple[Edge, ...]

    def __post_init__(self) -> None:
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise GraphError(f"a block graph needs depth >= 1 blocks, got {self.depth!r}")
        edges = [(int(i), int(j)) for i, j in self.edges]
        _check_edges(self.depth, edges)
        _check_connected(self.depth, edges)
        object.__setattr__(self, "edges", tuple(sorted(edges, key=lambda e: (e[1], e[0]))))

    @property
    def head(self) -> int:
        return self.depth + 1

    def inputs(self, node: int) -> tuple[int, ...]:
        """The nodes feeding ``node``, in increasing order."""
        return tuple(i for i, j in self.edges if j == node)

    def is_chain(self) -> bool:
        return self.edges == chain(self.depth).edges

    def format(self) -> str:
        """The string form: ``0-1,1-2,2-h`` (see the module docstring); ``parse`` reads it back."""
        return ",".join(_edge(e, self.depth) for e in self.edges)

    __str__ = format

    @classmethod
    def parse(cls, text: str, depth: int) -> "BlockGraph":
        """The graph written as ``text`` for a model of ``depth`` blocks (nodes ``0``, ``1..depth``, ``h``)."""
        if not text.strip():
            raise GraphError(f"the graph string is empty; write its edges as SOURCE-TARGET joined by commas, {_EXAMPLE}")
        edges = []
        for item in (part.strip() for part in text.split(",")):
            ends = item.split("-")
            if len(ends) != 2 or not all(e == HEAD or e.isdigit() for e in ends):
                raise GraphError(f"cannot read {item!r} in the graph {text!r}: each edge is SOURCE-TARGET with nodes "
                                 f"0 (the stem), 1..{depth} (the blocks) or h (the head), {_EXAMPLE}")
            edges.append((_node(ends[0], depth, item), _node(ends[1], depth, item)))
        return cls(depth, tuple(edges))


def _node(token: str, depth: int, item: str) -> int:
    if token == HEAD:
        return depth + 1
    node = int(token)
    if node > depth:
        raise GraphError(f"edge {item}: node {node} is out of range, the model has depth {depth} (blocks 1..{depth}; "
                         f"write the head as h)")
    return node


def chain(depth: int) -> BlockGraph:
    """The plain FlexiViT: each node feeds the next."""
    return BlockGraph(depth, tuple((i, i + 1) for i in range(depth + 1)))


class GraphBlocks(nn.Sequential):
    """Transformer blocks run as a ``BlockGraph``: a drop-in for ``FlexiViT.blocks``.

    The blocks sit at the indices of the plain model (node ``n`` is ``self[n - 1]``), so their state-dict
    keys stay ``blocks.{i}.*``; ``edge_logits`` holds one logit per edge into a node with several inputs
    (in ``graph.edges`` order), and is ``None`` (no parameter) when no node has more than one.
    ``forward(tokens)`` returns what the head receives.
    """

    wired = True  # FlexiViT calls forward(tokens, checkpointing=...) and nodes(...) instead of running blocks in turn

    def __init__(self, blocks: Sequence[nn.Module], *, graph: BlockGraph) -> None:
        if len(blocks) != graph.depth:
            raise ValueError(f"the graph has depth {graph.depth} but {len(blocks)} blocks were given")
        super().__init__(*blocks)
        self.graph = graph
        self.weighted_edges = tuple(e for e in graph.edges if len(graph.inputs(e[1])) > 1)
        # Where each multi-input node's logits start in edge_logits: plain ints, not state.
        self._offsets = {j: self.weighted_edges.index((graph.inputs(j)[0], j)) for _, j in self.weighted_edges}
        logits = nn.Parameter(torch.zeros(len(self.weighted_edges))) if self.weighted_edges else None  # weight 1/2
        self.register_parameter("edge_logits", logits)

    def _combine(self, node: int, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """Node ``node``'s input: its one input, or ``(2 / k) * sum_i sigmoid(l_i) * x_i`` over its ``k``."""
        sources = self.graph.inputs(node)
        if len(sources) == 1:
            return outputs[sources[0]]
        start = self._offsets[node]
        weights = torch.sigmoid(self.edge_logits[start : start + len(sources)]) * (2 / len(sources))  # (k,)
        return sum(w * outputs[i] for w, i in zip(weights, sources))  # (B, N, D)

    def nodes(self, tokens: torch.Tensor, *, last: int | None = None, checkpointing: bool = False) -> list[torch.Tensor]:
        """Outputs of nodes ``0..last`` (default: through the head, whose output is its combined input),
        each ``(B, N, D)``; ``checkpointing`` recomputes each block in the backward pass."""
        last = self.graph.head if last is None else last
        outputs = {0: tokens}
        for node in range(1, last + 1):
            x = self._combine(node, outputs)
            if node == self.graph.head:
                outputs[node] = x
            else:
                block = self[node - 1]
                outputs[node] = checkpoint(block, x) if checkpointing else block(x)
        return [outputs[n] for n in range(last + 1)]

    def forward(self, tokens: torch.Tensor, *, checkpointing: bool = False) -> torch.Tensor:
        return self.nodes(tokens, checkpointing=checkpointing)[-1]

    def connection_weights(self) -> dict[Edge, float]:
        """Every edge's weight ``sigmoid(logit)``; an edge into a single-input node has no parameter, and
        its node uses its input at full weight, so it reports 1.0."""
        weights = dict.fromkeys(self.graph.edges, 1.0)
        if self.edge_logits is not None:
            weights.update(zip(self.weighted_edges, torch.sigmoid(self.edge_logits.detach()).tolist()))
        return weights


GRAPH_LOGITS = "blocks.edge_logits"  # the connection logits' parameter name in a FlexiViT


def block_graph(config: Any) -> BlockGraph:
    """A FlexiViT config's blocks as a graph: its ``graph`` parsed, or the chain."""
    values = config.option("graph")
    return chain(config.depth) if values is None else BlockGraph.parse(values.graph, config.depth)


@dataclass(frozen=True)
class GraphFields:
    # The blocks wired as a DAG (e.g. "0-1,0-2,1-2,2-h"); None, or the chain written out (stored as None), is the
    # plain ViT.
    graph: str | None = None


@dataclass(frozen=True)
class GraphRunFields:
    # Learning-rate multiplier of the connection logits (optim.graph_lr_scale; the chain has none). Adam moves a
    # logit by about lr a step: at x1 and lr 3e-3, 150 steps left every weight within 0.03 of its 1/2 start, so
    # evolve's threshold could not tell the connections apart; at x100 they spread over 0.03-0.98 and the
    # all-edges graph scored best on validation (x1/30/100/300).
    graph_lr_scale: float = 100.0


@register
class GraphOption(ModelOption):
    """Blocks wired as a DAG with learned connection weights (``model.graph``; ``flexivit evolve``)."""

    name = "graph"
    fields = GraphFields
    order = 30
    run_fields = {"optim": GraphRunFields}

    def normalize(self, values: GraphFields, config: Any) -> GraphFields:
        if values.graph is None:
            return values
        graph = BlockGraph.parse(values.graph, config.depth)  # raises naming the node and why
        return GraphFields(None if graph.is_chain() else graph.format())  # one spelling

    def check(self, values: GraphFields, config: Any) -> None:
        if config.option("lutq") is not None:
            raise ValueError("LUT-Q weight tying and a block graph are not combined in this version; set one of "
                             "lutq_k and graph")

    def build_blocks(self, values: GraphFields, config: Any, blocks: list[nn.Module]) -> nn.Module:
        return GraphBlocks(blocks, graph=BlockGraph.parse(values.graph, config.depth))

    def refuses_packing(self, values: GraphFields) -> str | None:
        return f"graph={values.graph!r}: block graphs are not run packed"

    def non_plain(self, values: GraphFields) -> list[str]:
        return [f"a block graph ({values.graph})"]

    def check_run(self, run: Any) -> None:
        if not run.optim.graph_lr_scale >= 0:
            raise ValueError(f"optim.graph_lr_scale={run.optim.graph_lr_scale!r}: must be 0 or more")

    def lr_scales(self, run: Any, model: nn.Module) -> dict[str, float]:
        names = {name for name, _ in model.named_parameters()}
        return {GRAPH_LOGITS: run.optim.graph_lr_scale} if GRAPH_LOGITS in names else {}
