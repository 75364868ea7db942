"""Block graphs and the evolution operators: validation, the string form, the chain equals the plain
FlexiViT, the weighted combination, gradients at every size, and the mutation's statistics."""

import math
import random
from collections import deque

import pytest
import torch
from torch import nn

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.weights import load_model, save_model
from flexivit.ext.evolution import mutate, random_graph, repair, tournament
from flexivit.ext.graph import BlockGraph, GraphBlocks, GraphError, allowed_edges, chain

TINY = dict(img_size=28, patch_size=7, base_patch_size=14, base_grid=7, in_chans=1, num_classes=5,
            embed_dim=32, depth=4, num_heads=2)
SIZES = [2, 4, 7, 14]
SKIPS = "0-1,0-2,1-2,1-3,2-3,0-4,3-4,2-h,4-h"  # depth 4, every block but the first with two inputs or more


def _model(graph: str | None = None, seed: int = 0) -> FlexiViT:
    torch.manual_seed(seed)
    return FlexiViT(FlexiViTConfig(**TINY, graph=graph))


def _valid(graph: BlockGraph) -> bool:
    """An independent check: forward edges, every block on a path from the stem to the head."""
    head = graph.depth + 1

    def reach(start: int, step: dict[int, list[int]]) -> set[int]:
        seen, todo = {start}, deque([start])
        while todo:
            for nxt in step.get(todo.popleft(), []):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    fwd, bwd = {}, {}
    for i, j in graph.edges:
        fwd.setdefault(i, []).append(j)
        bwd.setdefault(j, []).append(i)
    nodes = set(range(head + 1))
    return (all(i < j for i, j in graph.edges) and len(set(graph.edges)) == len(graph.edges)
            and reach(0, fwd) == nodes and reach(head, bwd) == nodes)


# ---- validation and the string form ----------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("0-1,1-2,3-2,2-3,3-4,4-h", r"edge 3-2 leads from block 3 back to block 2, which would make a cycle"),
    ("0-1,1-2,2-2,2-3,3-4,4-h", r"edge 2-2 leads from block 2 into itself, which would make a cycle"),
    ("0-1,1-3,3-4,4-h,2-h", r"block 2 is not reachable from the stem \(block 2 has no inputs\)"),
    ("0-1,1-h,2-3,3-4,4-h", r"blocks 2, 3, 4 are not reachable .* block 3's inputs \(2\) are unreachable"),
    ("0-1,1-2,2-3,3-4,3-h", r"block 4 does not reach the head \(block 4 has no outputs\)"),
    ("0-1,1-2,2-3,3-4,2-h", r"blocks 3, 4 do not reach the head \(block 3's outputs \(4\) do not reach"),
    ("0-1,1-2,2-3,3-5,3-h", r"node 5 is out of range, the model has depth 4 \(blocks 1..4; write the head as h\)"),
    ("0-1,1-2,2-3,3-4,4-h,1-2", r"edge 1-2 appears twice"),
    ("0-1,1-2,2-3,3-4", r"the head \(h\) has no inputs"),
    ("", r"the graph string is empty"),
    ("0-1,1-2,2-3,3-4,4-h,3", r"cannot read '3'"),
    ("0-1,1-2,2-3,3-4,4-H", r"cannot read '4-H'"),
])
def test_invalid_graphs_name_the_node_and_the_reason(text, message):
    with pytest.raises(GraphError, match=message):
        BlockGraph.parse(text, 4)
    if text:  # the config reports the same error
        with pytest.raises(GraphError, match=message):
            FlexiViTConfig(**TINY, graph=text)


def test_tuple_form_checks_the_range_and_the_depth():
    with pytest.raises(GraphError, match=r"node 7 is out of range for depth 4 .*5 the head"):
        BlockGraph(4, ((0, 1), (1, 2), (2, 3), (3, 4), (4, 7)))
    with pytest.raises(GraphError, match="depth >= 1"):
        BlockGraph(0, ((0, 1),))


@pytest.mark.parametrize("depth", [1, 2, 4, 7])
def test_parse_of_format_is_the_identity(depth):
    rng = random.Random(depth)
    for _ in range(200):
        graph = random_graph(depth, rng, density=rng.uniform(0.05, 1.0))
        text = graph.format()
        assert BlockGraph.parse(text, depth) == graph and BlockGraph.parse(text, depth).format() == text
        assert all(c in "0123456789-,h" for c in text)  # nothing a shell would interpret
        shuffled = list(text.split(","))
        rng.shuffle(shuffled)
        assert BlockGraph.parse(" , ".join(shuffled), depth) == graph  # any order, spaces around edges


def test_the_chain_string():
    assert chain(3).format() == "0-1,1-2,2-3,3-h" and chain(3).is_chain()
    assert not BlockGraph.parse("0-1,1-2,2-3,0-3,3-h", 3).is_chain()
    assert len(allowed_edges(3)) == 10  # 5 nodes: every pair, earlier to later


# ---- the config and the model ----------------------------------------------------------------------
def test_config_keeps_the_graph_only_when_it_is_not_the_chain():
    plain = FlexiViTConfig(**TINY)
    assert "graph" not in plain.to_dict()
    assert FlexiViTConfig(**TINY, graph=chain(4).format()).graph is None  # the chain is the plain model
    config = FlexiViTConfig(**TINY, graph="4-h,0-1,1-2,0-2,2-3,3-4")
    assert config.graph == "0-1,0-2,1-2,2-3,3-4,4-h" == config.to_dict()["graph"]  # one spelling
    assert FlexiViTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("other, message", [(dict(bridges=("1:3",)), "bridges and a block graph do not combine"),
                                            (dict(lutq_k=4), "LUT-Q weight tying and a block graph")])
def test_graph_with_options_that_change_the_blocks_is_an_error(other, message):
    with pytest.raises(ValueError, match=message):
        FlexiViTConfig(**TINY, graph=SKIPS, **other)
    FlexiViTConfig(**TINY, graph=chain(4).format(), **other)  # the chain is the plain model: no conflict


def test_chain_equals_the_plain_flexivit():
    plain = _model()
    written_out = _model(chain(4).format())
    assert type(written_out.blocks) is nn.Sequential
    assert plain.state_dict().keys() == written_out.state_dict().keys()
    # GraphBlocks itself, running the chain, adds no parameter and computes the same logits.
    graph_run = _model()
    graph_run.blocks = GraphBlocks(list(graph_run.blocks), graph=chain(4))
    assert graph_run.blocks.edge_logits is None
    assert plain.state_dict().keys() == graph_run.state_dict().keys()
    graph_run.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 28, 28)
    for p in SIZES:
        assert torch.equal(plain(x, p), graph_run(x, p)), f"patch {p}"


def test_graph_model_keeps_the_block_keys_and_adds_one_logit_per_merged_edge():
    plain, graph = _model(), _model(SKIPS)
    extra = set(graph.state_dict()) - set(plain.state_dict())
    assert extra == {"blocks.edge_logits"} and not set(plain.state_dict()) - set(graph.state_dict())
    assert graph.blocks.weighted_edges == ((0, 2), (1, 2), (1, 3), (2, 3), (0, 4), (3, 4), (2, 5), (4, 5))
    assert graph.blocks.connection_weights() == {(0, 1): 1.0, **dict.fromkeys(graph.blocks.weighted_edges, 0.5)}
    for key, value in plain.state_dict().items():  # same seed, same draws: the blocks start alike
        assert torch.equal(value, graph.state_dict()[key]), key


class _Affine(nn.Module):
    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.shift


def test_weighted_combination_matches_a_hand_computation():
    graph = BlockGraph.parse("0-1,0-2,1-2,0-h,1-h,2-h", 2)
    blocks = GraphBlocks([_Affine(2.0, 1.0), _Affine(-0.5, 3.0)], graph=graph)
    logits = [0.3, -1.2, 2.0, 0.5, -0.7]  # edges 0-2, 1-2 | 0-h, 1-h, 2-h
    with torch.no_grad():
        blocks.edge_logits.copy_(torch.tensor(logits))
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    s = [1 / (1 + math.exp(-v)) for v in logits]
    n1 = 2.0 * x + 1.0
    n2 = -0.5 * (2 / 2 * (s[0] * x + s[1] * n1)) + 3.0
    head = 2 / 3 * (s[2] * x + s[3] * n1 + s[4] * n2)
    torch.testing.assert_close(blocks(x), head)
    weights = blocks.connection_weights()
    assert weights[(0, 1)] == 1.0 and weights[(1, 3)] == pytest.approx(s[3])


@pytest.mark.parametrize("patch", SIZES)
def test_every_parameter_and_connection_logit_gets_a_gradient(patch):
    model = _model(",".join(f"{i}-{'h' if j == 5 else j}" for i, j in allowed_edges(4)))  # every edge
    model(torch.randn(2, 1, 28, 28), patch).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient at patch {patch}"
    assert (model.blocks.edge_logits.grad != 0).all()  # each logit, not just the tensor


def test_grad_checkpointing_and_intermediates_follow_the_graph():
    model = _model(SKIPS).train()
    x = torch.randn(2, 1, 28, 28)
    model(x, 7).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x, 7).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    with torch.no_grad():
        tokens, _ = model._embed(x, model.scheme(7))
        nodes = model.blocks.nodes(tokens)
        final, inter = model.forward_intermediates(x, output_fmt="NLC", patch_size=7)
        torch.testing.assert_close(final, model.forward_features(x, 7))
        assert len(inter) == 4
        for i, t in enumerate(inter):
            torch.testing.assert_close(t, nodes[i + 1][:, 1:])  # block i's output, patch tokens
        early = model.forward_intermediates(x, indices=[1], output_fmt="NLC", patch_size=7, intermediates_only=True)
        torch.testing.assert_close(early[0], nodes[2][:, 1:])


def test_timm_export_names_the_other_formats():
    with pytest.raises(ValueError, match=r"--onnx.*--torch-export"):
        _model(SKIPS).to_fixed(7)


def test_save_and_load_keep_the_graph_and_the_logits(tmp_path):
    model = _model(SKIPS).eval()
    with torch.no_grad():
        model.blocks.edge_logits.copy_(torch.linspace(-2, 2, 8))
    save_model(model, tmp_path, class_names=[str(k) for k in range(5)], preprocess={})
    loaded, meta = load_model(tmp_path)
    assert meta["config"]["graph"] == SKIPS
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for p in SIZES:
            assert torch.equal(model(x, p), loaded(x, p)), f"patch {p}"


# ---- evolution operators ---------------------------------------------------------------------------
def test_pruning_keeps_exactly_the_edges_above_the_threshold():
    rng = random.Random(0)
    for seed in range(200):
        parent = random_graph(5, rng)
        weights = {e: rng.random() for e in parent.edges}
        m = mutate(parent, weights, threshold=0.5, rng=random.Random(seed))
        assert set(m.kept) == {e for e, w in weights.items() if w > 0.5}
        assert set(m.pruned) == set(parent.edges) - set(m.kept)
        assert not set(m.added) & set(parent.edges)
        assert set(m.child.edges) == set(m.kept) | set(m.added) | set(m.repaired)


def test_added_edges_match_the_pruned_ones_on_average():
    depth = 6
    chain_edges = set(chain(depth).edges)
    skips = [(0, 2), (1, 3), (2, 5), (0, 6), (3, 7), (4, 7)]
    parent = BlockGraph(depth, tuple(chain_edges | set(skips)))
    weights = {e: (0.9 if e in chain_edges else 0.2) for e in parent.edges}  # the chain stays: no repair
    added = []
    for seed in range(2000):
        m = mutate(parent, weights, threshold=0.5, rng=random.Random(seed))
        assert set(m.pruned) == set(skips) and not m.repaired
        added.append(len(m.added))
    assert sum(added) / len(added) == pytest.approx(len(skips), rel=0.05)


def test_uniform_threshold_keeps_an_edge_with_probability_its_weight():
    parent = BlockGraph.parse(SKIPS, 4)
    weights = {e: 0.3 for e in parent.edges}
    kept = [mutate(parent, weights, threshold="uniform", rng=random.Random(s)).keep_rate for s in range(2000)]
    assert sum(kept) / len(kept) == pytest.approx(0.3, rel=0.05)


def test_unguided_mutation_keeps_edges_at_the_given_rate_whatever_the_weights():
    parent = BlockGraph.parse(SKIPS, 4)
    kept = [mutate(parent, {}, threshold=0.5, keep_rate=0.7, rng=random.Random(s)).keep_rate for s in range(2000)]
    assert sum(kept) / len(kept) == pytest.approx(0.7, rel=0.05)


def test_every_child_is_a_valid_graph_and_a_seed_gives_one_child():
    rng = random.Random(1)
    for seed in range(500):
        depth = rng.randint(1, 8)
        parent = random_graph(depth, rng, density=rng.uniform(0.05, 1.0))
        weights = {e: rng.random() for e in parent.edges}
        options = rng.choice([dict(threshold=rng.random()), dict(threshold="uniform"),
                              dict(threshold=0.5, keep_rate=rng.random())])
        child = mutate(parent, weights, rng=random.Random(seed), **options).child
        assert _valid(child), f"seed {seed}: {child}"
        assert mutate(parent, weights, rng=random.Random(seed), **options).child == child
    parent = BlockGraph.parse(SKIPS, 4)
    children = {mutate(parent, {}, threshold=0.5, keep_rate=0.5, rng=random.Random(s)).child for s in range(20)}
    assert len(children) > 10  # and other seeds, other children


def test_repair_adds_only_what_is_missing():
    graph = BlockGraph.parse(SKIPS, 4)
    assert repair(4, graph.edges) == (graph, ())
    fixed, added = repair(4, [(0, 2), (2, 5)])  # blocks 1, 3, 4 lack inputs; then 1 and 4 lack outputs
    assert _valid(fixed) and set(fixed.edges) == {(0, 2), (2, 5)} | set(added)
    assert added == ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5))  # each from the node before, into the next


def test_random_graphs_are_valid_and_seeded():
    for seed in range(100):
        graph = random_graph(6, random.Random(seed))
        assert _valid(graph) and graph == random_graph(6, random.Random(seed))


def test_tournament_picks_the_best_and_the_worst_of_its_draw():
    scores = [0.3, 0.9, 0.1, 0.5, 0.5, 0.7]
    rng = random.Random(0)
    for _ in range(300):
        size = rng.randint(2, len(scores))
        parent, worst = tournament(list("abcdef"), scores, size, rng)
        assert 0 <= parent < 6 and 0 <= worst < 6 and parent != worst and scores[parent] >= scores[worst]
    assert tournament(list("abcdef"), scores, 6, rng) == (1, 2)  # everyone drawn: the global best and worst
    assert tournament("ab", [0.5, 0.5], 2, rng) == (0, 1)  # a tie: the lower index is the better


@pytest.mark.parametrize("call, message", [
    (lambda: tournament("a", [1.0], 2, random.Random(0)), "population of at least 2"),
    (lambda: tournament("abc", [1.0, 2.0, 3.0], 4, random.Random(0)), "between 2 and the population size 3"),
    (lambda: tournament("abc", [1.0, 2.0, 3.0], 1, random.Random(0)), "between 2 and the population size 3"),
    (lambda: tournament("abc", [1.0, 2.0], 2, random.Random(0)), "one score per member"),
    (lambda: tournament("ab", [1.0, math.nan], 2, random.Random(0)), "member 1 has a NaN score"),
    (lambda: mutate(chain(2), {}, threshold=1.5, rng=random.Random(0)), r"in \[0, 1\] or 'uniform'"),
    (lambda: mutate(chain(2), {}, threshold="sampled", rng=random.Random(0)), r"in \[0, 1\] or 'uniform'"),
    (lambda: mutate(chain(2), {(0, 1): 1.0}, threshold=0.5, rng=random.Random(0)), "no trained weight for edge 1-2"),
    (lambda: mutate(chain(2), {}, threshold=0.5, keep_rate=2.0, rng=random.Random(0)), "keep_rate"),
    (lambda: random_graph(3, random.Random(0), density=0.0), "density"),
])
def test_operators_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_recipe_override_builds_the_graph_model():
    from flexivit.train.builders import build_model
    from flexivit.train.config import load_recipe

    graph = "0-1,0-2,1-2,2-3,3-4,4-h"
    cfg = load_recipe("fashion_mnist:smoke", [f"model.graph={graph}"])
    model = build_model(cfg, channels=1, num_classes=10)
    assert isinstance(model.blocks, GraphBlocks) and model.config.graph == graph
    assert build_model(load_recipe("fashion_mnist:smoke"), channels=1, num_classes=10).config.graph is None
