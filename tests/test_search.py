"""`flexivit search`: a grid of ordinary trials scored on the validation split, resumable."""

import json

import pytest

from flexivit.experiments.search import SearchError, Trial, parse_grid, plan, summarise
from test_train import TINY, _cli, _sets


def test_grid_is_the_product_of_its_keys_times_the_seeds():
    grid = parse_grid(["optim.lr=1e-3,3e-3", "patch.sizes=[2,4],[7,14]"], [], "fashion_mnist")
    assert grid == [("optim.lr", ["1e-3", "3e-3"]), ("patch.sizes", ["[2,4]", "[7,14]"])]
    trials = plan(grid, seeds=[0, 1])
    assert len(trials) == 8 and len({t.name for t in trials}) == 8
    assert trials[0].overrides() == ["optim.lr=1e-3", "patch.sizes=[2,4]", "train.seed=0"]


@pytest.mark.parametrize("specs,message", [
    (["optim.lrr=1e-3,3e-3"], "did you mean optim.lr"),
    (["optim.lr="], "has no values"),
    (["optim.lr=fast,1e-3"], "expected a number"),
    (["optim.lr=1e-3", "optim.lr=3e-3"], "given twice"),
    (["optim.lr=1e-3,1e-3"], "repeats a value"),
    (["train.seed=0,1"], "--seeds"),
    (["optim.lr"], "must look like KEY=V1,V2"),
])
def test_bad_grids_are_refused_before_any_trial(specs, message):
    with pytest.raises(SearchError, match=message):
        parse_grid(specs, [], "fashion_mnist")


def test_the_best_setting_is_the_argmax_of_the_mean_over_seeds():
    def record(lr: str, seed: int, val: dict) -> dict:
        t = Trial((("optim.lr", lr),), seed)
        return {"trial": t.name, "setting": t.setting, "values": {"optim.lr": lr}, "seed": seed, "val": val,
                "train_seconds": 1.0}

    records = [record("1", 0, {"2": 0.9, "4": 0.5}), record("1", 1, {"2": 0.9, "4": 0.7}),
               record("2", 0, {"2": 0.6, "4": 0.65}), record("2", 1, {"2": 0.62, "4": 0.61})]
    worst = summarise(records, "worst")
    assert worst[0]["setting"] == "optim.lr=2" and worst[0]["metric"] == pytest.approx(0.605)
    assert worst[1]["metric"] == pytest.approx(0.6) and worst[1]["metric_std"] > 0
    assert summarise(records, "mean")[0]["setting"] == "optim.lr=1"


@pytest.mark.slow
def test_search_cli_runs_skips_finished_trials_and_trains_the_winner(tmp_path):
    out = tmp_path / "search"
    args = ["search", "fashion_mnist:smoke", "--out", str(out), "--grid", "optim.lr=1e-3,3e-3", "--steps", "8",
            *_sets(TINY), "--then-train"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = [json.loads(l) for l in (out / "search.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {l["values"]["optim.lr"] for l in lines} == {"1e-3", "3e-3"}
    for line in lines:  # trials are scored on validation and never evaluate the test split
        report = json.loads((out / "trials" / line["trial"] / "eval.json").read_text())
        assert report["split"] == "val" and report["results"] == report["val"] and report["step"] == 8
    best = json.loads((out / "best.json").read_text())
    worst = {l["values"]["optim.lr"]: min(l["val"].values()) for l in lines}
    assert best["values"]["optim.lr"] == max(worst, key=worst.get)
    final = json.loads((out / "final" / "eval.json").read_text())
    assert final["split"] == "test" and final["step"] == 12  # the recipe's own budget, not --steps
    assert (out / "search.md").exists() and (out / "search.png").exists()
    again = _cli(*args[:-1])
    assert again.returncode == 0 and "2 already finished (skipped), 0 to run" in again.stdout


def test_search_cli_bad_input(tmp_path):
    bad = _cli("search", "fashion_mnist:smoke", "--grid", "optim.lrr=1,2", "--out", str(tmp_path / "s"))
    assert bad.returncode == 2 and "did you mean optim.lr" in bad.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    bad = _cli("search", "fashion_mnist:smoke", "--grid", "optim.lr=1,2", "--init", str(junk), "--out", str(tmp_path / "s"))
    assert bad.returncode == 2 and "is not a FlexiViT checkpoint" in bad.stderr
    bad = _cli("search", "fashion_mnist:smoke", "--grid", "optim.lr=1,2", "--seeds", "a,b", "--out", str(tmp_path / "s"))
    assert bad.returncode == 2 and "--seeds takes comma-separated integers" in bad.stderr
