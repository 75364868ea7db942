"""flexivit.experiments.results: one reader of a run's eval.json for every split layout the trainer and
`flexivit eval` have written, the search logs, and the mean ± std over seeds."""

import json
import math

import pytest

from flexivit.experiments.results import (ResultsError, eval_by_step, maybe_results, read_jsonl, read_results,
                                          summarise)


def _rows(top1: dict[int, float], n: int = 100, **extra) -> list[dict]:
    return [{"patch_size": p, "top1": a, "n": n, **extra} for p, a in top1.items()]


def _run(path, report: dict, config: dict | None = None):
    path.mkdir(parents=True)
    (path / "eval.json").write_text(json.dumps(report))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_run_that_scored_test_reports_both_splits(tmp_path):
    run = _run(tmp_path / "r", {"split": "test", "results": _rows({2: 0.6, 7: 0.8}, n=300),
                                "val": _rows({2: 0.5, 7: 0.9}), "images_seen": 1234, "train_seconds": 90.5, "step": 40},
               {"train": {"steps": 40}})
    r = read_results(run)
    assert r.split == "test" and r.top1("test") == {"2": 0.6, "7": 0.8} and r.top1("val") == {"2": 0.5, "7": 0.9}
    assert r.top1("scored") == r.top1("test") and r.percent("val") == {"2": 50.0, "7": 90.0}
    assert r.worst("test") == 0.6 and r.worst("val") == 0.5
    assert (r.images("test"), r.images("val"), r.images_seen, r.train_seconds, r.steps) == (300, 100, 1234, 90.5, 40)
    assert r.gflops("test") == {}


def test_a_validation_only_run_has_no_test_scores(tmp_path):
    val = _rows({4: 0.7, 14: 0.4})
    r = read_results(_run(tmp_path / "r", {"split": "val", "results": val, "val": val, "images_seen": 8,
                                           "train_seconds": 1.0, "step": 3}))
    assert r.top1("test") == {} and r.images("test") == 0 and r.top1("scored") == r.top1("val") == {"4": 0.7, "14": 0.4}
    assert r.steps == 3  # no config.json: the step eval.json names
    with pytest.raises(ResultsError, match="no test split"):
        r.worst("test")


def test_older_reports_and_eval_sweeps_are_read_too(tmp_path):
    old = read_results(_run(tmp_path / "old", {"results": _rows({4: 0.5})}))  # before "split" and "val"
    assert old.split == "test" and old.top1("test") == {"4": 0.5} and old.top1("val") == {}
    assert old.images_seen is None and old.steps is None
    sweep = read_results(_run(tmp_path / "sweep", {"split": "test", "results": _rows({4: 0.5, 7: 0.6}, gflops=0.25)}))
    assert sweep.gflops("test") == {"4": 0.25, "7": 0.25}


def test_an_unfinished_or_broken_run_is_one_clear_error(tmp_path):
    assert maybe_results(tmp_path) is None
    with pytest.raises(ResultsError, match="holds no eval.json: the run has not finished"):
        read_results(tmp_path)
    (tmp_path / "eval.json").write_text("{")
    with pytest.raises(ResultsError, match="is not JSON"):
        read_results(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        read_results(_run(tmp_path / "r", {"results": []})).top1("train")


def test_summarise_is_the_mean_and_sample_std_over_seeds(tmp_path):
    runs = [read_results(_run(tmp_path / f"s{i}", {"split": "test", "results": _rows(t), "val": _rows(t)}))
            for i, t in enumerate(({2: 0.80, 7: 0.70}, {2: 0.82, 7: 0.74}, {2: 0.87, 7: 0.75}))]
    s = summarise(runs, "test")
    assert s["mean"] == pytest.approx({2: 83.0, 7: 73.0})
    by_hand = math.sqrt(((80 - 83) ** 2 + (82 - 83) ** 2 + (87 - 83) ** 2) / 2)
    assert s["std"][2] == pytest.approx(by_hand) and summarise(runs[:1], "val")["std"] == {2: 0.0, 7: 0.0}
    no_test = read_results(_run(tmp_path / "v", {"split": "val", "results": _rows({2: 0.1}), "val": _rows({2: 0.1})}))
    assert summarise([*runs, no_test], "test") is None


def test_the_logs_of_searches_and_of_training(tmp_path):
    (tmp_path / "search.jsonl").write_text('{"trial": "a"}\n\n{"trial": "b"}\n')
    assert read_jsonl(tmp_path / "search.jsonl") == [{"trial": "a"}, {"trial": "b"}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    lines = [{"step": 2, "loss": 1.0}, {"step": 5, "split": "val", "eval": _rows({4: 0.3})},
             {"step": 10, "split": "val", "eval": _rows({4: 0.6})},
             {"step": 10, "split": "test", "eval": _rows({4: 0.2})}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert eval_by_step(tmp_path) == {"5": {"4": 0.3}, "10": {"4": 0.6}}
    assert eval_by_step(tmp_path, "test") == {"10": {"4": 0.2}}
