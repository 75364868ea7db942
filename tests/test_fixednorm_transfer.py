"""tools/fixednorm_transfer.py: the winner each method takes from its search, the winners' runs (the winner's
setting, every class of the folder, test scored, one run per seed), and the report's numbers against an
independent computation from the same synthetic study folder."""

import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import fixednorm_transfer as ft  # noqa: E402

SIZES = ("2", "4", "7", "14")
SEARCH = {  # method -> {value: validation top-1 per size (a fraction)}
    "AdamW": {"1e-3": (0.80, 0.85, 0.90, 0.88), "3e-3": (0.84, 0.86, 0.91, 0.89), "1e-2": (0.86, 0.80, 0.92, 0.90)},
    "fixed-norm": {"0.01": (0.82, 0.85, 0.90, 0.88), "0.03": (0.83, 0.85, 0.91, 0.88), "0.1": (0.83, 0.84, 0.90, 0.87)},
}
TEST = {"AdamW": [(0.85, 0.87, 0.92, 0.90), (0.83, 0.88, 0.91, 0.89), (0.86, 0.86, 0.93, 0.91)],
        "fixed-norm": [(0.84, 0.86, 0.92, 0.89), (0.82, 0.87, 0.90, 0.88), (0.85, 0.85, 0.91, 0.90)]}


def _rows(top1: tuple[float, ...], n: int) -> list[dict]:
    return [{"patch_size": int(p), "top1": a, "n": n} for p, a in zip(SIZES, top1)]


def _study(out: Path) -> argparse.Namespace:
    """A finished study folder as the tool leaves it: both searches, then three seeds of each winner."""
    for name, grid in SEARCH.items():
        folder = out / f"search_{ft.folder(name)}"
        folder.mkdir(parents=True)
        key = ft.METHODS[name][1]
        with open(folder / "search.jsonl", "w") as f:
            for value, val in reversed(grid.items()):  # finished in another order than the grid's
                f.write(json.dumps({"trial": f"{key}={value}__seed=0", "values": {key: value}, "seed": 0,
                                    "val": dict(zip(SIZES, val)), "train_seconds": 100.0, "images_seen": 88816}) + "\n")
        with open(folder / "runs.jsonl", "w") as f:
            for value in grid:
                f.write(json.dumps({"run": f"trials/{key}={value}__seed=0", "status": "finished", "cpu_s": 90.0}) + "\n")
        for seed, test in enumerate(TEST[name]):
            run = out / "winners" / f"{ft.folder(name)}-seed{seed}"
            run.mkdir(parents=True)
            val = tuple(a - 0.01 for a in test)
            (run / "eval.json").write_text(json.dumps({"split": "test", "results": _rows(test, 500), "val": _rows(val, 450),
                                                        "images_seen": 88816, "train_seconds": 120.0 + seed}))
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps({"run": f"winners/{ft.folder(name)}-seed{seed}", "status": "finished",
                                    "cpu_s": 100.0 + seed}) + "\n")
    return argparse.Namespace(out=out, base="runs/quickstart", data="data/mnist5k", steps=None, seeds=[0, 1, 2],
                              note="The grid was widened once.")


def test_each_method_takes_the_setting_with_the_best_worst_size_and_its_winners_score_test(tmp_path):
    args = _study(tmp_path)
    # AdamW: worst sizes 80 / 84 / 80 -> 3e-3 (1e-2 has the best p=2 but a worse p=4). Fixed-norm: 82 / 83 / 83,
    # a tie between 0.03 and 0.1 that the smaller step size wins, whatever order the trials finished in.
    assert ft.best_values(args, "AdamW") == {"optim.lr": "3e-3"}
    assert ft.best_values(args, "fixed-norm") == {"optim.elr": "0.03"}
    specs = {s.name: s for s in ft.winner_specs(args)}
    assert sorted(specs) == [f"winners/{m}-seed{s}" for m in ("adamw", "fixednorm") for s in (0, 1, 2)]
    adamw = specs["winners/adamw-seed1"]
    assert adamw.recipe == "fashion_mnist_finetune" and adamw.command == "finetune"
    assert adamw.inputs == ("runs/quickstart",)
    assert {"optim.lr=3e-3", "data.classes=null", "data.source=data/mnist5k", "train.test_eval=true",
            "train.seed=1"} <= set(adamw.sets)
    fixed = specs["winners/fixednorm-seed2"]
    assert fixed.recipe == "fashion_mnist_fixednorm" and {"optim.elr=0.03", "train.seed=2"} <= set(fixed.sets)


def test_the_report_holds_every_seed_and_its_means_are_the_seeds_means(tmp_path):
    args = _study(tmp_path)
    result = ft.collect(args)
    assert result["seeds"] == [0, 1, 2] and "split" in result
    for name, tests in TEST.items():
        m = result["methods"][name]
        assert [t["worst_val"] for t in m["trials"]] == pytest.approx([100 * min(v) for v in SEARCH[name].values()])
        assert [t["cpu_seconds"] for t in m["trials"]] == [90.0] * 3
        runs = m["winner_seeds"]
        assert [r["seed"] for r in runs] == [0, 1, 2] and [r["cpu_seconds"] for r in runs] == [100.0, 101.0, 102.0]
        assert [r["worst_test"] for r in runs] == pytest.approx([100 * min(t) for t in tests])
        assert runs[0]["test_images"] == 500 and runs[0]["val_images"] == 450
    text = ft.markdown(result)
    worst = [100 * min(t) for t in TEST["AdamW"]]
    p7 = [100 * t[2] for t in TEST["AdamW"]]
    row = next(line for line in text.split("## Winners on the test split")[1].splitlines() if line.startswith("| AdamW"))
    assert f"{statistics.mean(worst):.1f} ± {statistics.stdev(worst):.1f}" in row
    assert f"{statistics.mean(p7):.1f} ± {statistics.stdev(p7):.1f}" in row
    assert "optim.lr=3e-3" in row and "| 500 |" in row
    assert "1e-3: 80.0, 3e-3: 84.0, 1e-2: 80.0" in text and "The grid was widened once." in text
    diffs = [100 * (min(f) - min(a)) for f, a in zip(TEST["fixed-norm"], TEST["AdamW"])]
    assert ", ".join(f"{d:+.1f}" for d in diffs) + f" (mean {statistics.mean(diffs):+.1f})" in text


def test_a_missing_search_is_one_clear_error(tmp_path):
    args = argparse.Namespace(out=tmp_path, base="b", data="d", steps=None, seeds=[0], note="")
    with pytest.raises(ft.SearchError, match="run the search stage first"):
        ft.best_values(args, "AdamW")
