"""`flexivit evolve`: the planning loop (with fake scores, no training), bad inputs, and end-to-end runs
(slow): a CLI smoke run whose best graph trains via --set, and a kill mid-iteration + rerun."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from flexivit.model.weights import load_model
from flexivit.cli.main import main
from flexivit.ext.evolve import RETRIES, EvolveError, Settings, evolve_graphs, parse_threshold, run_evolve
from flexivit.ext.graph import BlockGraph, block_graph, chain
from test_train import ROOT, _cli, _env, _sets


def _fake(chain_score: float | None = None):
    """A ``train`` that scores and weights each graph from a seed of its string; as in ``GraphBlocks``, an edge
    into a node with one input reports weight 1.0."""
    def train(child):
        g = child.graph
        rng = random.Random(g.format())
        score = chain_score if chain_score is not None and g.is_chain() else rng.random()
        weights = {f"{i}-{'h' if j == g.head else j}": rng.random() if len(g.inputs(j)) > 1 else 1.0
                   for i, j in g.edges}
        return {"child": child, "graph": child.graph.format(), "score": score, "weights": weights}
    return train


@pytest.mark.parametrize("kwargs, message", [
    (dict(population=1, tournament=2), r"--population must be at least 2"),
    (dict(population=4, tournament=1), r"--tournament must be between 2 and --population \(4\), got 1"),
    (dict(population=4, tournament=5), r"--tournament must be between 2 and --population \(4\), got 5"),
    (dict(iterations=0), r"--iterations must be at least 1"),
    (dict(threshold=1.5), r"--threshold must be a number in \[0, 1\] or 'uniform', got 1.5"),
    (dict(threshold="often"), r"--threshold must be .* got 'often'"),
    (dict(keep_rate=-0.1), r"--keep-rate must be a probability"),
    (dict(metric="best"), r"--metric must be one of"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(EvolveError, match=message):
        Settings(**kwargs)


def test_threshold_flag():
    assert parse_threshold("0.3") == 0.3 and parse_threshold("uniform") == "uniform" and parse_threshold("1") == 1.0
    for bad in ("1.01", "-0.5", "half", "nan"):
        with pytest.raises(EvolveError, match=f"got '{bad}'"):
            parse_threshold(bad)


@pytest.mark.parametrize("argv, message", [
    (["--population", "1"], "--population must be at least 2"),
    (["--population", "3", "--tournament", "4"], "between 2 and --population (3), got 4"),
    (["--iterations", "0"], "--iterations must be at least 1"),
    (["--threshold", "2"], "--threshold must be a number in [0, 1] or 'uniform'"),
    (["--set", "model.graph=0-1,1-2,2-3,3-4,4-h"], "evolve sets model.graph for each candidate"),
    (["--set", "model.dept=2"], "did you mean model.depth"),
])
def test_cli_refuses_bad_input_with_one_line(argv, message, tmp_path, capsys):
    assert main(["evolve", "fashion_mnist:smoke", "--out", str(tmp_path / "e"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexivit evolve: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "e" / "settings.json").exists()


def test_a_rerun_with_other_settings_is_refused_before_training(tmp_path):
    base = dict(recipe="fashion_mnist:smoke", steps=3, out=tmp_path, overrides=["model.depth=2"], say=lambda _: None)
    (tmp_path / "settings.json").write_text(json.dumps({**Settings(seed=0).__dict__, "recipe": "fashion_mnist:smoke",
                                                        "overrides": ["model.depth=2"], "steps": 3, "depth": 2}))
    with pytest.raises(EvolveError, match=r"other settings \(seed: 0\)"):
        run_evolve(settings=Settings(seed=1), **base)
    with pytest.raises(EvolveError, match=r"other settings \(steps: 3\)"):
        run_evolve(settings=Settings(seed=0), **{**base, "steps": 4})


def test_a_failed_candidate_stops_the_search_and_says_then_train_has_nothing(tmp_path, monkeypatch):
    failing = (sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(3)")  # a CLI that fails
    monkeypatch.setattr("flexivit.experiments.runner.FLEXIVIT", failing)
    with pytest.raises(EvolveError, match=r"candidate 0 \(0-1,1-2,2-h\): candidates/c000 failed \(exit 3\); see "
                       r".*c000.log; .*rerun the same command to resume it; nothing has finished, so --then-train "
                       r"has nothing to train"):
        run_evolve(recipe="fashion_mnist:smoke", settings=Settings(population=2, tournament=2), steps=3, out=tmp_path,
                   overrides=["model.depth=2"], then_train=True, say=lambda _: None)
    (attempt,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    sets = attempt["command"][attempt["command"].index("--out") + 2:]
    assert sets[1::2] == ["model.depth=2", "model.graph=0-1,1-2,2-h", "train.test_eval=false", "train.steps=3"]
    assert attempt["status"] == "failed" and attempt["exit"] == 3
    assert not (tmp_path / "evolve.jsonl").exists() and not (tmp_path / "best_graph.json").exists()


def test_the_tournament_keeps_the_population_size_and_removes_the_worst_drawn():
    settings = Settings(population=6, iterations=40, tournament=3, seed=3)
    records = evolve_graphs(settings, 5, _fake())
    assert len(records) == 46 and [r["child"].id for r in records] == list(range(46))
    population = list(range(6))
    for r in records[6:]:
        child = r["child"]
        assert child.parent in population and child.removed in population and child.parent != child.removed
        assert records[child.parent]["score"] >= records[child.removed]["score"]
        population = [k for k in population if k != child.removed] + [child.id]
        assert list(child.population) == population and len(set(population)) == 6


def test_a_guided_child_keeps_exactly_its_parents_edges_above_the_threshold():
    records = evolve_graphs(Settings(population=5, iterations=30, threshold=0.5, seed=1), 5, _fake())
    guided = [r["child"] for r in records if r["child"].operator == "guided"]
    assert len(guided) > 20
    for child in guided:
        parent = records[child.parent]
        kept = {f"{i}-{'h' if j == 6 else j}" for i, j in child.mutation.kept}
        assert kept == {e for e, w in parent["weights"].items() if w > 0.5}
        m = child.mutation
        assert set(child.graph.edges) == set(m.kept) | set(m.added) | set(m.repaired)


def test_the_same_seed_gives_the_same_children_and_another_seed_others():
    def sequence(seed: int, unguided: bool = False) -> list[tuple]:
        settings = Settings(population=4, iterations=12, seed=seed, threshold="uniform", unguided=unguided)
        return [(r["child"].graph, r["child"].parent, r["child"].removed) for r in evolve_graphs(settings, 4, _fake())]

    assert sequence(7) == sequence(7) and sequence(7, True) == sequence(7, True)
    assert sequence(7) != sequence(8) and sequence(7) != sequence(7, True)


def test_no_graph_is_trained_twice_and_a_stuck_chain_parent_falls_back_to_the_coin():
    # The chain scores best and the tournament draws everyone, so the chain is every child's parent; its edges
    # report weight 1.0, so its guided child is itself: after RETRIES draws the keep_rate coin takes over.
    records = evolve_graphs(Settings(population=3, iterations=6, tournament=3, seed=0), 2, _fake(chain_score=2.0))
    graphs = [r["child"].graph for r in records]
    assert len(set(graphs)) == len(graphs) == 9  # 9 of the 10 valid graphs of depth 2
    for r in records[3:]:
        assert r["child"].parent == 0 and r["child"].operator == "unguided" and r["child"].draws > RETRIES
    for seed in range(5):  # and, in general, no repeats
        records = evolve_graphs(Settings(population=4, iterations=20, seed=seed), 3, _fake())
        assert len({r["child"].graph for r in records}) == 24


def test_a_search_space_too_small_is_a_clear_error():
    with pytest.raises(EvolveError, match=r"found only 2 distinct graphs of depth 1 .* lower --population"):
        evolve_graphs(Settings(population=3, tournament=2), 1, _fake())
    with pytest.raises(EvolveError, match=r"gave no untrained child in 16 draws: 2 graphs of depth 1 are trained"):
        evolve_graphs(Settings(population=2, tournament=2, iterations=1), 1, _fake())


# ---- end to end ----------------------------------------------------------------------------------------
# Each candidate is a subprocess whose imports alone take ~10 s of CPU here, so the runs are as small as the
# command allows: population 2, one iteration, 3 steps, two patch sizes.
SETS = ["model.embed_dim=32", "model.depth=2", "data.batch_size=32", "data.eval_limit=64", "data.num_workers=0",
        "patch.sizes=[4,14]", "patch.weights=[0.5,0.5]", "train.steps=4", "train.checkpoint_every=1",
        "train.log_every=1", "train.token_budget=0"]
ARGS = ["fashion_mnist:smoke", "--population", "2", "--iterations", "1", "--tournament", "2", "--steps", "3",
        "--metric", "mean", *_sets(SETS)]


def _lines(out) -> list[dict]:
    """evolve.jsonl without the wall-clock times, which no two runs share."""
    text = (out / "evolve.jsonl").read_text()
    return [{k: v for k, v in json.loads(line).items() if k != "train_seconds"} for line in text.splitlines()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("evolve") / "straight"
    done = _cli("evolve", *ARGS, "--out", str(out), "--then-train")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.slow
def test_cli_smoke_run_writes_its_outputs_and_its_best_graph_trains_via_set(smoke):
    out, stdout = smoke
    lines = _lines(out)
    assert [line["id"] for line in lines] == [0, 1, 2] and lines[0]["graph"] == chain(2).format()
    assert len({line["graph"] for line in lines}) == 3 and lines[2]["parent"] in (0, 1)
    for line in lines:  # validation only, at every size; every edge's trained weight; GFLOPs per size
        report = json.loads((out / line["run"] / "eval.json").read_text())
        assert report["split"] == "val" and report["step"] == 3 and set(line["val"]) == {"4", "14"}
        graph, model = BlockGraph.parse(line["graph"], 2), load_model(out / line["run"])[0]
        assert block_graph(model.config) == graph  # trained via --set model.graph=<its string>
        assert sorted(line["weights"]) == sorted(graph.format().split(","))
        if not graph.is_chain():
            trained = model.blocks.connection_weights()
            assert trained == {e: line["weights"][f"{e[0]}-{'h' if e[1] == 3 else e[1]}"] for e in graph.edges}
        assert line["gflops"]["4"] > line["gflops"]["14"] > 0
    best = json.loads((out / "best_graph.json").read_text())
    top = max(lines, key=lambda line: (line["score"], -line["id"]))
    assert best["graph"] == top["graph"] and best["set"] == f"model.graph={top['graph']}" and best["candidates"] == 3
    final = out / "final"  # `flexivit train RECIPE --set ... --set model.graph=<best>` at the recipe's budget
    report = json.loads((final / "eval.json").read_text())
    assert report["split"] == "test" and report["step"] == 4
    assert block_graph(load_model(final)[0].config) == BlockGraph.parse(best["graph"], 2)
    assert best["command"].endswith(f"--set {best['set']}") and "test top-1" in stdout
    rows = (out / "evolve.md").read_text().split("\n| ")[2:]  # after the header: best first
    assert len(rows) == 3 and rows[0].startswith(f"{top['id']} |")
    assert (out / "evolve.png").stat().st_size > 0


@pytest.mark.slow
def test_kill_mid_iteration_and_rerun_gives_the_same_evolve_jsonl(smoke, tmp_path):
    """Finished candidates are read from evolve.jsonl only, so the state a run killed during iteration 1 left
    is the straight run's settings, first two lines and run dirs (copied), plus the child's partial run: made
    here by really killing the command while it trains the child."""
    straight, out = smoke[0], tmp_path / "killed"
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("c002*", "final", "best_graph.json", "evolve.*"))
    (out / "evolve.jsonl").write_text("".join((straight / "evolve.jsonl").read_text().splitlines(keepends=True)[:2]))
    command = [sys.executable, "-m", "flexivit", "evolve", *ARGS, "--out", str(out)]
    proc = subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the kill takes the candidate too
    states = out / "candidates" / "c002" / "state"
    deadline = time.monotonic() + 300
    # Any checkpoint of the child will do: waiting for step_1 alone could miss it (pruned at step 3) and let the
    # command finish before the kill.
    while not any(states.glob("step_*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the command ended before the child of iteration 1 wrote a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # while the child of iteration 1 trains
    proc.wait()
    assert any(states.glob("step_*")) and len((out / "evolve.jsonl").read_text().splitlines()) == 2
    rerun = _cli("evolve", *ARGS, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "3 candidates, 2 already finished (skipped), 1 to train" in rerun.stdout
    assert "resumed from" in (out / "candidates" / "c002.log").read_text()
    assert _lines(out) == _lines(straight)
