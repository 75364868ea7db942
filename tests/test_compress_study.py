"""tools/compress_study.py: a run scored on validation only must not be read as a test score."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import compress_study as cs  # noqa: E402


def _report(run: Path, *, split: str, val: float, test: float | None) -> None:
    rows = lambda top1: [{"patch_size": p, "top1": top1} for p in (2, 7)]  # noqa: E731
    run.mkdir(parents=True)
    report = {"split": split, "results": rows(val if test is None else test), "val": rows(val),
              "images_seen": 100, "train_seconds": 60.0}
    (run / "eval.json").write_text(json.dumps(report))


def test_a_validation_only_run_has_no_test_row_and_a_test_run_keeps_its_own(tmp_path):
    _report(tmp_path / "screen", split="val", val=0.5, test=None)  # train.test_eval=false: results are val
    _report(tmp_path / "headline", split="test", val=0.5, test=0.25)
    screen, headline = cs._read(tmp_path, "screen"), cs._read(tmp_path, "headline")
    assert screen["val"] == {"2": 50.0, "7": 50.0} and screen["test"] == {}
    assert headline["val"] == {"2": 50.0, "7": 50.0} and headline["test"] == {"2": 25.0, "7": 25.0}


def test_every_arm_is_a_compress_run_of_the_base_finished_once_it_wrote_compress_json():
    for stage in cs.STAGES:
        for name, arg, sets, test in cs.plan(stage):
            run = cs.spec("runs/base", name, arg, sets, test)
            assert (run.command, run.inputs, run.name) == ("compress", ("runs/base",), name)
            assert run.recipe == (f"{cs.RECIPE}:{arg}" if arg else cs.RECIPE) and "compress.json" in run.done
            assert run.sets == (*cs.COMMON, *sets, f"train.test_eval={str(test).lower()}")
