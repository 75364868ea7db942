"""The pure helpers of tools/evolve_study.py: the unguided control's keep-rate, the best-so-far curves, the pick
of the graph to retrain and the verdict against the chain."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import evolve_study  # noqa: E402

CHAIN = "0-1,1-2,2-h"


def _row(operator, keep_rate=None, score=0.5, seconds=60.0, graph=CHAIN):
    return {"operator": operator, "keep_rate": keep_rate, "score": score, "train_seconds": seconds, "graph": graph}


def test_keep_rate_averages_guided_children_only():
    rows = [_row("initial"), _row("initial"), _row("guided", 0.8), _row("unguided", 0.5), _row("guided", 0.6)]
    assert evolve_study.keep_rate(rows) == (pytest.approx(0.7), "measured")  # coin children of a chain parent: out
    assert evolve_study.keep_rate(rows[:2] + rows[3:4]) == (0.5, "default: no guided child")


def test_best_so_far_is_monotone_and_accumulates_minutes():
    rows = [_row("initial", score=s, seconds=t) for s, t in ((0.5, 30), (0.4, 60), (0.7, 90), (0.6, 30))]
    curve = evolve_study.best_so_far(rows)
    assert curve["candidates"] == [1, 2, 3, 4]
    assert curve["best"] == pytest.approx([50, 50, 70, 70])
    assert curve["train_minutes"] == pytest.approx([0.5, 1.5, 3.0, 3.5])


def test_pick_returns_the_best_non_chain_graph_and_flags_a_winning_chain():
    searches = {"guided-seed0": [_row("initial", score=0.9), _row("guided", score=0.6, graph="0-1,0-2,1-2,2-h")],
                "unguided-seed0": [_row("initial", score=0.9), _row("unguided", score=0.7, graph="0-1,1-2,0-h,2-h")]}
    chosen = evolve_study.pick(searches, CHAIN)
    assert chosen["best"]["graph"] == "0-1,1-2,0-h,2-h" and chosen["source"] == "unguided-seed0"
    assert chosen["chain"]["graph"] == CHAIN and chosen["best_overall_is_chain"]


def test_verdict_needs_the_worst_size_gap_above_twice_the_larger_std():
    chain = [70.0, 70.5, 71.0]  # std 0.5
    assert evolve_study.verdict([72.5, 73.0, 73.5], chain)["beats"]  # gap 2.5 > 2 x 0.5
    assert not evolve_study.verdict([71.0, 73.0, 75.0], chain)["beats"]  # gap 2.5 < 2 x 2.0 (the best's std)
    assert not evolve_study.verdict([67.5, 68.0, 68.5], chain)["beats"]  # worse than the chain
    assert evolve_study.verdict([72.5, 73.0, 73.5], chain)["gap"] == pytest.approx(2.5)


def _finished_run(path: Path, **changes) -> Path:
    import json

    train = {"steps": 3600, "seed": changes.pop("seed", 0), "test_eval": True}
    cfg = {"name": "fashion_mnist", "model": {"graph": changes.pop("graph", None)}, "train": train,
           "data": {"eval_limit": None, "hflip": changes.pop("hflip", 0.5)}}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "eval.json").write_text("{}")
    return path


def test_chain_runs_are_checked_then_linked_as_the_chain_arm(tmp_path):
    plan = evolve_study.Plan(train_steps=3600, train_seeds=(0, 1))
    runs = [_finished_run(tmp_path / f"q{s}", seed=s) for s in (0, 1)]
    out = tmp_path / "study"
    evolve_study.link_chain_runs(out, plan, runs)
    evolve_study.link_chain_runs(out, plan, runs)  # a rerun with the same runs is a no-op
    assert [(out / "retrain" / f"chain-seed{s}").resolve() for s in (0, 1)] == [r.resolve() for r in runs]
    with pytest.raises(SystemExit, match="train.seed"):  # seeds in the wrong order
        evolve_study.link_chain_runs(tmp_path / "other", plan, runs[::-1])
    with pytest.raises(SystemExit, match="model.graph"):
        evolve_study.link_chain_runs(tmp_path / "g", plan, [runs[0], _finished_run(tmp_path / "g1", seed=1, graph=CHAIN)])
    with pytest.raises(SystemExit, match="data.hflip"):  # the study's flips, not today's recipe's
        evolve_study.link_chain_runs(tmp_path / "f", plan, [runs[0], _finished_run(tmp_path / "f1", seed=1, hflip=0.0)])
    with pytest.raises(SystemExit, match="one run per train seed"):
        evolve_study.link_chain_runs(tmp_path / "n", plan, runs[:1])
