"""tools/fixednorm_study.py: the fine-tunes it hands the runner, and its report of the winners and of the
projection's overhead read from run outputs (made up here, so a wrong split or mean shows)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fixednorm_study", ROOT / "tools" / "fixednorm_study.py")
fn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fn)


def _run(path: Path, *, test: dict[int, float], val: dict[int, float], seconds: float = 60.0) -> None:
    rows = lambda acc: [{"patch_size": p, "top1": a, "n": 50} for p, a in acc.items()]  # noqa: E731
    path.mkdir(parents=True)
    (path / "eval.json").write_text(json.dumps({"split": "test", "results": rows(test), "val": rows(val),
                                                "images_seen": 400, "train_seconds": seconds}))


def test_a_fine_tune_of_the_base_scored_on_test_or_validation_only():
    run = fn._finetune("winners/AdamW-seed1", base="runs/qs", recipe="fashion_mnist_finetune",
                       sets=["optim.lr=1e-3", "train.seed=1"])
    assert (run.command, run.inputs, run.recipe, run.name) == ("finetune", ("runs/qs",), "fashion_mnist_finetune",
                                                               "winners/AdamW-seed1")
    assert run.sets == (*fn.COMMON, "optim.lr=1e-3", "train.seed=1", "train.test_eval=true")
    assert fn._finetune("o", base="b", recipe="r", sets=[], test=False).sets[-1] == "train.test_eval=false"


def test_winners_are_reported_on_test_with_their_spread_and_the_overhead_as_a_ratio_of_medians(tmp_path):
    for seed, (a, b) in enumerate(((0.80, 0.70), (0.84, 0.74))):
        _run(tmp_path / "winners" / f"AdamW-seed{seed}", test={2: a, 14: b}, val={2: 0.1, 14: 0.1})
    for i, (proj, plain) in enumerate(((12.0, 10.0), (13.0, 10.0), (30.0, 11.0))):
        _run(tmp_path / "overhead" / f"projection-{i}", test={2: 0.5}, val={2: 0.5}, seconds=proj)
        _run(tmp_path / "overhead" / f"no_projection-{i}", test={2: 0.5}, val={2: 0.5}, seconds=plain)
    result = fn.collect(tmp_path, "runs/qs")
    (row,) = result["test"]
    assert row["method"] == "AdamW (lr x wd)" and row["seeds"] == 2
    assert row["test_mean"] == pytest.approx({"2": 82.0, "14": 72.0}) and row["worst_mean"] == pytest.approx(72.0)
    assert row["test_std"]["2"] == pytest.approx(2 ** 0.5 * 2) and row["train_minutes"] == pytest.approx(1.0)
    assert result["overhead"]["ratio"] == pytest.approx(13.0 / 10.0)
    fn.write(result, tmp_path / "results" / "fixednorm")
    assert "| AdamW (lr x wd) | 2 | 72.0 ± 2.8 | 82.0 ± 2.8 | 72.0 ± 2.8 | 400 | 1.0 |" in \
        (tmp_path / "results" / "fixednorm.md").read_text()
