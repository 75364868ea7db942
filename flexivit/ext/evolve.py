"""``flexivit evolve``: evolve block graphs (``flexivit.ext.graph``) guided by their learned connection weights.

Every candidate is an ordinary run of the recipe with ``--set model.graph=<graph>`` trained for ``--steps``
on the study runner (``flexivit.experiments.runner``: a subprocess, validation split only, ``OUT/candidates/cNNN``),
scored by the worst (or mean) validation top-1 over the evaluated patch sizes. The initial population is
the chain and ``population - 1`` random graphs; each iteration a tournament picks the parent (the best of
those drawn) and removes the worst of them, and the child is ``evolution.mutate`` of the parent with the
parent's trained connection weights (``--unguided``: a coin at ``keep_rate`` instead). No graph is trained
twice: a child already trained is redrawn (``RETRIES`` draws of the operator, then ``RETRIES`` of the coin).

Determinism: iteration ``i`` draws from ``random.Random(f"flexivit-evolve:{seed}:{i}")`` (``i = 0``: the
initial population) and reads only the records of earlier candidates, so a rerun replans the same
candidates, skips those in ``evolve.jsonl`` and resumes an interrupted one from its checkpoint.
"""

from __future__ import annotations

import itertools
import json
import random
import shlex
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from flexivit.model.weights import atomic_write_text
from flexivit.train.config import load_recipe
from flexivit.ext.evolution import Mutation, check_threshold, mutate, random_graph, tournament
from flexivit.ext.graph import HEAD, BlockGraph, Edge, chain
from flexivit.experiments.results import read_jsonl, read_results
from flexivit.experiments.runner import Study
from flexivit.experiments.search import METRICS, check_data, run_spec, score_of
from flexivit.model.variants import VARIANTS

__all__ = ["EvolveError", "Settings", "Child", "parse_threshold", "evolve_graphs", "run_evolve", "RETRIES"]

RETRIES = 8  # draws of the configured operator for an untrained child, then as many of the keep_rate coin
INIT_DRAWS = 1000  # random graphs drawn at most while looking for population - 1 distinct ones
Train = Callable[["Child"], dict[str, Any]]


class EvolveError(ValueError):
    """An evolution that cannot run as asked; the message says what to change."""


def parse_threshold(text: str) -> float | str:
    """``--threshold``: a number in [0, 1] or ``uniform``."""
    try:
        return check_threshold(text if text == "uniform" else float(text))
    except ValueError:
        raise EvolveError(f"--threshold must be a number in [0, 1] or 'uniform', got {text!r}") from None


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What fixes the sequence of candidates (with the recipe, its ``--set`` and ``--steps``)."""

    population: int = 8
    iterations: int = 16
    tournament: int = 3
    threshold: float | str = 0.5
    unguided: bool = False
    keep_rate: float = 0.5  # the coin of --unguided, and of a guided parent with no untrained child
    seed: int = 0
    metric: str = "worst"

    def __post_init__(self) -> None:
        if self.population < 2:
            raise EvolveError(f"--population must be at least 2 (a tournament draws two members), "
                              f"got {self.population}")
        if not 2 <= self.tournament <= self.population:
            raise EvolveError(f"--tournament must be between 2 and --population ({self.population}), "
                              f"got {self.tournament}")
        if self.iterations < 1:
            raise EvolveError(f"--iterations must be at least 1 (each trains one child), got {self.iterations}")
        try:
            check_threshold(self.threshold)
        except ValueError:
            raise EvolveError(f"--threshold must be a number in [0, 1] or 'uniform', got {self.threshold!r}") from None
        if not 0 <= self.keep_rate <= 1:
            raise EvolveError(f"--keep-rate must be a probability in [0, 1], got {self.keep_rate}")
        if self.metric not in METRICS:
            raise EvolveError(f"--metric must be one of {METRICS}, got {self.metric!r}")


@dataclass(frozen=True, kw_only=True)
class Child:
    """A planned candidate: its graph, where it came from, and the population once it joins."""

    id: int
    iteration: int  # 0: the initial population
    graph: BlockGraph
    parent: int | None = None
    removed: int | None = None  # the tournament's worst, out of the population from this iteration on
    operator: str = "initial"  # "initial" | "guided" | "unguided" (the keep_rate coin)
    draws: int = 0  # mutations drawn until one gave an untrained graph
    mutation: Mutation | None = None
    population: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"c{self.id:03d}"


def _edge_text(edge: Edge, depth: int) -> str:
    return f"{edge[0]}-{HEAD if edge[1] == depth + 1 else edge[1]}"


def _edge(text: str, depth: int) -> Edge:
    i, j = text.split("-")
    return int(i), depth + 1 if j == HEAD else int(j)


def _rng(seed: int, iteration: int) -> random.Random:
    return random.Random(f"flexivit-evolve:{seed}:{iteration}")  # str seeds hash with SHA-512: stable everywhere


def _initial(depth: int, size: int, rng: random.Random) -> list[BlockGraph]:
    graphs = [chain(depth)]
    for _ in range(INIT_DRAWS):
        if len(graphs) == size:
            return graphs
        graph = random_graph(depth, rng)
        if graph not in graphs:
            graphs.append(graph)
    raise EvolveError(f"found only {len(graphs)} distinct graphs of depth {depth} in {INIT_DRAWS} draws, fewer than "
                      f"--population {size}: lower --population or raise model.depth")


def _mutate(parent: Child, weights: Mapping[Edge, float], settings: Settings, rng: random.Random,
            trained: set[BlockGraph]) -> tuple[Mutation, str, int]:
    """The first untrained child: ``RETRIES`` draws of the operator, then ``RETRIES`` of the coin."""
    for draw in range(1, 2 * RETRIES + 1):
        coin = settings.unguided or draw > RETRIES
        m = mutate(parent.graph, weights, threshold=settings.threshold, rng=rng,
                   keep_rate=settings.keep_rate if coin else None)
        if m.child not in trained:
            return m, "unguided" if coin else "guided", draw
    raise EvolveError(f"candidate {parent.id} ({parent.graph}) gave no untrained child in {2 * RETRIES} draws: "
                      f"{len(trained)} graphs of depth {parent.graph.depth} are trained already; use fewer "
                      "--iterations or a larger model.depth")


def evolve_graphs(settings: Settings, depth: int, train: Train) -> list[dict[str, Any]]:
    """Plan every candidate and ``train`` it, in order; ``train(child)`` returns its record, which holds at
    least ``score`` (higher is better) and ``weights`` (``{"i-j": trained weight}``). A pure function of its
    arguments: the same settings and the same records give the same children."""
    rng = _rng(settings.seed, 0)
    children = [Child(id=k, iteration=0, graph=g, population=tuple(range(settings.population)))
                for k, g in enumerate(_initial(depth, settings.population, rng))]
    records = [train(c) for c in children]
    population = list(range(settings.population))
    for iteration in range(1, settings.iterations + 1):
        rng = _rng(settings.seed, iteration)
        p, w = tournament(population, [records[m]["score"] for m in population], settings.tournament, rng)
        parent, removed = children[population[p]], population[w]
        weights = {_edge(e, depth): v for e, v in records[parent.id]["weights"].items()}
        m, operator, draws = _mutate(parent, weights, settings, rng, {c.graph for c in children})
        population = [k for k in population if k != removed] + [len(children)]
        child = Child(id=len(children), iteration=iteration, graph=m.child, parent=parent.id, removed=removed,
                      operator=operator, draws=draws, mutation=m, population=tuple(population))
        children.append(child)
        records.append(train(child))
    return records


def _weights(run: Path) -> tuple[dict[Edge, float], dict[str, float]]:
    """The trained connection weights of a run's model (the chain has none: each edge reports 1.0) and
    its GFLOPs per image at each evaluated patch size."""
    import torch

    from flexivit.model.weights import load_model
    from flexivit.ext.graph import GraphBlocks
    from flexivit.eval.measure import count_gflops

    model, _ = load_model(run)
    c = model.config
    blocks = model.blocks
    is_graph = isinstance(blocks, GraphBlocks)
    weights = blocks.connection_weights() if is_graph else dict.fromkeys(chain(c.depth).edges, 1.0)
    sizes = [int(p) for p in read_results(run).top1("val")]
    x = torch.zeros(1, c.in_chans, c.img_size, c.img_size)  # (B, C, H, W): FLOPs do not depend on pixels
    with torch.no_grad():
        gflops = {str(p): count_gflops(lambda inp, p=p: model(inp, p), x) for p in sizes}
    return weights, gflops


def _record(child: Child, run: Path, metric: str) -> dict[str, Any]:
    depth = child.graph.depth
    report = read_results(run)
    val = report.top1("val")
    weights, gflops = _weights(run)
    m = child.mutation
    edges = {k: [_edge_text(e, depth) for e in getattr(m, k)] if m else None
             for k in ("kept", "pruned", "added", "repaired")}
    return {"id": child.id, "iteration": child.iteration, "parent": child.parent, "removed": child.removed,
            "operator": child.operator, "draws": child.draws, "graph": child.graph.format(),
            "edges": len(child.graph.edges), "val": val, "metric": metric, "score": score_of(val, metric),
            "gflops": gflops, "weights": {_edge_text(e, depth): w for e, w in weights.items()}, **edges,
            "keep_rate": m.keep_rate if m else None, "population": list(child.population),
            "run": f"{run.parent.name}/{run.name}",
            "train_seconds": report.train_seconds, "images_seen": report.images_seen}


def _check_settings(out: Path, fixed: dict[str, Any]) -> None:
    """A rerun continues only the same search: all settings but ``iterations`` must match ``settings.json``."""
    path = out / "settings.json"
    old = json.loads(path.read_text()) if path.is_file() else fixed
    diff = sorted(k for k in fixed.keys() | old.keys() if k != "iterations" and old.get(k) != fixed.get(k))
    if diff:
        was = ", ".join(f"{k}: {old.get(k)!r}" for k in diff)
        raise EvolveError(f"{out} holds an evolution with other settings ({was}); rerun with those to continue it, "
                          "or pass another --out")


def _prepare(*, recipe: str, settings: Settings, steps: int | None, out: Path,
             overrides: Sequence[str]) -> tuple[int, dict[int, dict[str, Any]]]:
    """Check everything that can be checked before training; returns the depth and the finished records."""
    if steps is not None and steps < 1:
        raise EvolveError(f"--steps must be positive, got {steps}")
    if any(o.partition("=")[0].strip() == "model.graph" for o in overrides):
        raise EvolveError("evolve sets model.graph for each candidate: drop --set model.graph=... (to train one "
                          "graph, use flexivit train)")
    cfg = load_recipe(recipe, list(overrides))
    if cfg.model.variant not in VARIANTS:
        raise EvolveError(f"unknown model.variant {cfg.model.variant!r}; known: {sorted(VARIANTS)}")
    depth = cfg.model.depth or VARIANTS[cfg.model.variant]["depth"]
    fixed = {**asdict(settings), "recipe": recipe, "overrides": list(overrides), "steps": steps, "depth": depth}
    _check_settings(out, fixed)
    check_data(recipe, overrides)
    (out / "candidates").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "settings.json", json.dumps(fixed, indent=2) + "\n")
    log_path = out / "evolve.jsonl"
    done = {r["id"]: r for r in read_jsonl(log_path)}
    planned = settings.population + settings.iterations
    if len(done) > planned:
        raise EvolveError(f"{log_path} holds {len(done)} candidates, more than --population + --iterations = "
                          f"{planned}; pass --iterations {len(done) - settings.population} or more to continue it")
    return depth, done


def _trainer(done: dict[int, dict[str, Any]], records: list[dict[str, Any]], *, recipe: str, steps: int | None,
             out: Path, overrides: Sequence[str], metric: str, then_train: bool, say) -> Train:
    """``train`` for ``evolve_graphs``: a finished candidate's record from ``done``, else a trial run of it,
    recorded in ``records`` and ``evolve.jsonl``."""
    def train(child: Child) -> dict[str, Any]:
        if child.id in done:
            if done[child.id]["graph"] != child.graph.format():
                raise EvolveError(f"evolve.jsonl's candidate {child.id} is {done[child.id]['graph']}, but this search "
                                  f"plans {child.graph}: {out} was written by another search; pass another --out")
            records.append(done[child.id])
            return done[child.id]
        sets = [*overrides, f"model.graph={child.graph}", "train.test_eval=false",
                *([f"train.steps={steps}"] if steps else [])]
        outcome = Study(out, say=say).run(run_spec(f"candidates/{child.name}", sets, recipe=recipe))
        if not outcome.ok:
            nothing = "; nothing has finished, so --then-train has nothing to train" if then_train and not records \
                else ""
            raise EvolveError(f"candidate {child.id} ({child.graph}): {outcome.error}{nothing}")
        records.append(_record(child, out / "candidates" / child.name, metric))
        atomic_write_text(out / "evolve.jsonl", "".join(json.dumps(r) + "\n" for r in records))  # whole lines only
        say(f"  {child.name} (iteration {child.iteration}, {child.operator}): {child.graph} -> validation "
            f"{metric} {records[-1]['score']:.4f}")
        return records[-1]

    return train


def run_evolve(*, recipe: str, settings: Settings, steps: int | None, out: Path, overrides: Sequence[str] = (),
               then_train: bool = False, say=print) -> dict[str, Any]:
    """Run (or continue) an evolution; returns ``best_graph.json``'s content."""
    depth, done = _prepare(recipe=recipe, settings=settings, steps=steps, out=out, overrides=overrides)
    planned = settings.population + settings.iterations
    say(f"evolve: {planned} candidates, {len(done)} already finished (skipped), {planned - len(done)} to train")
    records: list[dict[str, Any]] = []
    evolve_graphs(settings, depth, _trainer(done, records, recipe=recipe, steps=steps, out=out, overrides=overrides,
                                            metric=settings.metric, then_train=then_train, say=say))
    best = _best(records, recipe=recipe, overrides=overrides, steps=steps, settings=settings)
    write_report(records, out, settings=settings, title=f"flexivit evolve {recipe}", keep_rate=best["guided_keep_rate"])
    if then_train:
        best["final"] = _final(best, recipe=recipe, overrides=list(overrides), out=out, say=say)
    atomic_write_text(out / "best_graph.json", json.dumps(best, indent=2) + "\n")
    return best


def _best(records: list[dict[str, Any]], *, recipe: str, overrides: Sequence[str], steps: int | None,
          settings: Settings) -> dict[str, Any]:
    top = min(records, key=lambda r: (-r["score"], r["id"]))
    sets = [*overrides, f"model.graph={top['graph']}"]
    guided = [r["keep_rate"] for r in records if r["operator"] == "guided"]
    return {"graph": top["graph"], "id": top["id"], "metric": settings.metric, "score": top["score"], "val": top["val"],
            "gflops": top["gflops"], "set": f"model.graph={top['graph']}",
            "command": shlex.join(["flexivit", "train", recipe, *(a for s in sets for a in ("--set", s))]),
            "recipe": recipe, "overrides": list(overrides), "steps": steps, "candidates": len(records),
            "settings": asdict(settings), "guided_keep_rate": statistics.mean(guided) if guided else None,
            "train_seconds": sum(r["train_seconds"] for r in records)}


def _final(best: dict[str, Any], *, recipe: str, overrides: list[str], out: Path, say) -> dict[str, Any]:
    """Train the best graph at the recipe's own budget and report it on the test split."""
    outcome = Study(out, say=say).run(run_spec("final", [*overrides, best["set"]], recipe=recipe))
    if not outcome.ok:
        raise EvolveError(f"the final run of {best['graph']}: {outcome.error}")
    return {"run": str(out / "final"), "test": read_results(out / "final").top1("scored")}


def write_report(records: list[dict[str, Any]], out: Path, *, settings: Settings, title: str,
                 keep_rate: float | None) -> None:
    """``evolve.md`` (every candidate, best first) and ``evolve.png`` (fitness per candidate in training
    order, and the best so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = sorted({p for r in records for p in r["val"]}, key=int)
    rate = "none" if keep_rate is None else f"{keep_rate:.3f}"
    columns = " | ".join(f"p={p}" for p in sizes)
    lines = [f"# {title}", "", f"{len(records)} candidates; settings {json.dumps(asdict(settings))}; mean keep-rate of "
             f"the guided mutations: {rate}. Validation top-1 (%), ranked by the {settings.metric} size; candidates "
             "never see the test split.", "",
             f"| id | iteration | parent | operator | graph | edges | {settings.metric} | {columns} | "
             f"GFLOPs ({' / '.join(f'p={p}' for p in sizes)}) | train s |",
             "|---:|---:|---:|---|---|---:|---:|" + "---:|" * len(sizes) + "---|---:|"]
    for r in sorted(records, key=lambda r: (-r["score"], r["id"])):
        cells = " | ".join(f"{100 * r['val'][p]:.2f}" if p in r["val"] else "–" for p in sizes)
        flops = " / ".join(f"{r['gflops'][p]:.4g}" for p in sizes if p in r["gflops"])
        parent = "–" if r["parent"] is None else r["parent"]
        lines.append(f"| {r['id']} | {r['iteration']} | {parent} | {r['operator']} | `{r['graph']}` | {r['edges']} | "
                     f"{100 * r['score']:.2f} | {cells} | {flops} | {r['train_seconds']:.1f} |")
    atomic_write_text(out / "evolve.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for operator, marker in (("initial", "s"), ("guided", "o"), ("unguided", "^")):
        group = [r for r in records if r["operator"] == operator]
        if group:
            ax.scatter([r["id"] for r in group], [100 * r["score"] for r in group], marker=marker, label=operator)
    best = list(itertools.accumulate((100 * r["score"] for r in records), max))
    ax.step([r["id"] for r in records], best, where="post", color="black", label="best so far")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # candidates are numbered
    ax.set_xlabel("candidate (training order)")
    ax.set_ylabel(f"validation top-1, {settings.metric} size (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "evolve.png", dpi=120)
    plt.close(fig)


# ---- the `flexivit evolve` command (flexivit.ext.COMMANDS) ---------------------------------------------
def add_arguments(p: Any, cli: Any) -> None:
    """``flexivit evolve RECIPE ...``: ``cli`` gives the CLI's shared arguments (``run_args``)."""
    cli.run_args(p)
    p.add_argument("--population", type=int, default=8, help="candidates alive at once: the chain and random "
                   "graphs at the start (default 8)")
    p.add_argument("--iterations", type=int, default=16, help="children trained after the initial population, one "
                   "per iteration (default 16)")
    p.add_argument("--tournament", type=int, default=3, help="members drawn each iteration: the best is the parent, "
                   "the worst leaves the population (default 3)")
    p.add_argument("--threshold", default="0.5", help="a parent's edge is kept iff its trained weight exceeds this: a "
                   "number in [0, 1] (default 0.5) or 'uniform' (drawn from U(0, 1) per edge)")
    p.add_argument("--unguided", action="store_true", help="the control: keep each edge with probability "
                   "--keep-rate whatever its weight")
    p.add_argument("--keep-rate", type=float, default=0.5, help="the coin of --unguided, and of a guided parent "
                   "with no untrained child (default 0.5; pass a guided run's mean keep-rate to compare with it)")
    p.add_argument("--steps", type=int, help="training steps of each candidate (default: the recipe's)")
    p.add_argument("--metric", default="worst", help="worst (default): the lowest validation top-1 over the "
                   "evaluated sizes; mean: their mean")
    p.add_argument("--seed", type=int, default=0, help="the search's seed (default 0); candidates train with the "
                   "recipe's train.seed")
    p.add_argument("--then-train", action="store_true", help="train the best graph at the recipe's budget into "
                   "OUT/final and report it on the test split")



def run(args: Any, cli: Any) -> None:
    settings = Settings(population=args.population, iterations=args.iterations, tournament=args.tournament,
                        threshold=parse_threshold(args.threshold), unguided=args.unguided, keep_rate=args.keep_rate,
                        seed=args.seed, metric=args.metric)
    overrides = ([f"data.source={args.data}"] if args.data else []) + list(args.overrides)
    out = args.out or Path("runs") / ("evolve-" + args.recipe.replace(":", "-").replace("/", "_").removesuffix(".py"))
    best = run_evolve(recipe=args.recipe, settings=settings, steps=args.steps, out=out, overrides=overrides,
                      then_train=args.then_train)
    print(f"best on validation ({best['metric']} size): candidate {best['id']}, {best['graph']} -> "
          f"{100 * best['score']:.2f} %; wrote {out / 'evolve.md'}, {out / 'evolve.png'}, {out / 'best_graph.json'}")
    print(f"train it: {best['command']}")
    if "final" in best:
        print(f"final run {best['final']['run']}, test top-1: " +
              ", ".join(f"p={p} {100 * v:.2f}" for p, v in best["final"]["test"].items()))
