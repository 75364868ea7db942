"""Budget-driven choice of the patch size, and prediction on image files (Python API and CLI)."""

import json
import subprocess
import sys

import pytest

from flexivit.cli.main import main
from flexivit.eval.deploy import BudgetError, Predictor, choose_patch_size, parse_accuracy
from tiny_run import CLASSES, class_image, make_run, subprocess_env


def _row(p, top1, latency, gflops, tokens=None):
    return {"patch_size": p, "tokens": tokens if tokens is not None else (48 // p) ** 2, "top1": top1,
            "latency_ms": latency, "gflops": gflops}


PROFILE = [
    _row(4, 0.90, 12.0, 4.0),
    _row(6, 0.88, 6.0, 1.8),
    _row(8, 0.85, 3.0, 1.0),
    _row(12, 0.80, 1.5, 0.3),
    _row(16, 0.70, 1.0, 0.15),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.getbasetemp())


# ---- choose_patch_size ---------------------------------------------------------------------------------
def test_most_accurate_within_a_cost_budget():
    assert choose_patch_size(PROFILE, max_latency_ms=5).patch_size == 8
    assert choose_patch_size(PROFILE, max_latency_ms=6).patch_size == 6  # the limit itself fits
    assert choose_patch_size(PROFILE, max_gflops=0.5).patch_size == 12
    assert choose_patch_size(PROFILE, max_latency_ms=100, max_gflops=1.0).patch_size == 8  # both limits apply
    assert choose_patch_size(PROFILE, max_latency_ms=5, min_accuracy=0.8).patch_size == 8


def test_everything_fits_gives_the_most_accurate():
    choice = choose_patch_size(PROFILE, max_latency_ms=1e6)
    assert choice.patch_size == 4 and choice.row["top1"] == 0.90
    assert "most accurate" in choice.reason and "patch 4" in choice.reason


def test_accuracy_floor_alone_gives_the_cheapest_that_reaches_it():
    assert choose_patch_size(PROFILE, min_accuracy=0.84).patch_size == 8
    assert choose_patch_size(PROFILE, min_accuracy="88%").patch_size == 6
    assert choose_patch_size(PROFILE, min_accuracy=0).patch_size == 16


def test_ties_are_broken_by_gflops_then_latency_then_tokens_then_the_larger_patch():
    tied = [_row(4, 0.9, 1.0, 2.0), _row(6, 0.9, 1.0, 1.0), _row(8, 0.9, 2.0, 0.5), _row(7, 0.9, 1.5, 0.5),
            _row(5, 0.9, 1.5, 0.5, 49)]
    # all tie on top-1; fewest GFLOPs leaves 8, 7, 5; lowest latency leaves 7, 5; fewer tokens (36 < 49): 7
    assert choose_patch_size(tied, max_latency_ms=5).patch_size == 7
    assert choose_patch_size(tied, min_accuracy=0.5).patch_size == 7
    same = [_row(4, 0.9, 1.0, 1.0, 10), _row(6, 0.9, 1.0, 1.0, 10)]
    assert choose_patch_size(same, max_latency_ms=5).patch_size == 6  # everything equal: the larger patch
    assert choose_patch_size(list(reversed(same)), max_latency_ms=5).patch_size == 6  # order does not matter
    cheapest = [_row(4, 0.95, 1.0, 1.0, 10), _row(6, 0.90, 1.0, 1.0, 10)]
    assert choose_patch_size(cheapest, min_accuracy=0.5).patch_size == 4  # equal cost: the more accurate


def test_nothing_fits_names_the_nearest_option():
    with pytest.raises(BudgetError, match=r"latency <= 0.5 ms.*nearest is patch 16 \(top-1 70.00%, 1 ms"):
        choose_patch_size(PROFILE, max_latency_ms=0.5)
    with pytest.raises(BudgetError, match=r"top-1 >= 95%.*nearest is patch 4"):
        choose_patch_size(PROFILE, min_accuracy=0.95)
    # p12 is 7% over the latency limit (1.5 vs 1.4 ms), p16 18% short of the accuracy floor (70 vs 85%)
    with pytest.raises(BudgetError, match="nearest is patch 12"):
        choose_patch_size(PROFILE, max_latency_ms=1.4, min_accuracy=0.85)


def test_profile_problems_are_explained():
    accuracy_only = [{"patch_size": 4, "tokens": 49, "top1": 0.9}]
    with pytest.raises(BudgetError, match="no 'latency_ms'.*flexivit eval"):
        choose_patch_size(accuracy_only, max_latency_ms=3)
    with pytest.raises(ValueError, match="give a budget"):
        choose_patch_size(PROFILE)
    with pytest.raises(ValueError, match="percentage"):
        parse_accuracy("120%")
    latency_only = [{"patch_size": p, "tokens": (16 // p) ** 2, "latency_ms": 1.0} for p in (2, 4, 8)]
    choice = choose_patch_size(latency_only, max_latency_ms=2)
    assert choice.patch_size == 2 and "most tokens" in choice.reason  # no accuracies: tokens as the proxy
    assert choose_patch_size({"results": PROFILE}, max_gflops=1.0).patch_size == 8  # an eval.json dict


# ---- predict ---------------------------------------------------------------------------------------------
def _write_images(folder):
    """Per class, a file of another size, mode and format; returns [(path, label)]."""
    folder.mkdir(exist_ok=True)
    cases = [((37, 37), "L", "png"), ((53, 53), "RGB", "jpg"), ((37, 53), "RGB", "png"),
             ((53, 37), "L", "jpg"), ((41, 41), "RGBA", "png"), ((45, 45), "P", "png")]
    written = []
    for label, (size, mode, fmt) in enumerate(cases):
        path = folder / f"class{label}-{size[0]}x{size[1]}-{mode}.{fmt}"
        class_image(label, size, mode).save(path, **({"quality": 95} if fmt == "jpg" else {}))
        written.append((path, label))
    return written


def test_predict_api_on_image_files_of_any_size_and_mode(run, tmp_path):
    files = _write_images(tmp_path)
    predictor = Predictor.from_checkpoint(run)
    predictions = predictor.predict([p for p, _ in files], patch_size=4, topk=3)
    assert len(predictions) == len(files)
    for prediction, (path, label) in zip(predictions, files):
        assert prediction.image == str(path) and prediction.patch_size == 4
        probs = [p for _, _, p in prediction.top]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(name in CLASSES for _, name, _ in prediction.top)
        square = "37x53" not in path.name and "53x37" not in path.name  # non-square: centre crop cuts
        if square:
            assert prediction.top[0][1] == CLASSES[label], path.name
    assert predictor.predict([files[0][0]])[0].patch_size == 4  # the model's default size


def test_predict_cli_json_matches_the_api(run, tmp_path):
    files = [str(p) for p, _ in _write_images(tmp_path)[:2]]
    result = subprocess.run([sys.executable, "-m", "flexivit", "predict", str(run), *files, "--patch-size", "8",
                             "--topk", "2", "--json"], capture_output=True, text=True, env=subprocess_env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    api = Predictor.from_checkpoint(run).predict(files, patch_size=8, topk=2)
    assert out["patch_size"] == 8 and len(out["predictions"]) == 2
    for got, want in zip(out["predictions"], api):
        assert got["image"] == want.image
        assert [t["class"] for t in got["top"]] == [name for _, name, _ in want.top]
        assert [t["prob"] for t in got["top"]] == pytest.approx([p for _, _, p in want.top], abs=1e-6)


def test_predict_text_output_and_budget(run, tmp_path, capsys):
    image = str(_write_images(tmp_path)[0][0])
    assert main(["predict", str(run), image, "--budget-ms", "1000", "--topk", "1"]) == 0
    out = capsys.readouterr().out
    assert "patch size 2 for 1000 ms" in out  # no latency-bearing eval.json: measured now, most accurate
    assert "cell-0" in out


def test_per_image_budgets_choose_each_images_size_and_run_one_packed_call(run, tmp_path, capsys):
    files = [str(p) for p, _ in _write_images(tmp_path)[:3]]
    predictor = Predictor.from_checkpoint(run)
    rows = [{**r, "top1": {2: 0.9, 4: 0.8, 8: 0.7}[r["patch_size"]]} for r in predictor.latency_profile([2, 4, 8])]
    latency = {r["patch_size"]: r["latency_ms"] for r in rows}
    (run / "eval.json").write_text(json.dumps({"device": "cpu", "results": rows}))
    try:
        budgets = [1e6, latency[8] * 1.0001 if latency[8] < latency[4] else 1e6, latency[4] * 1.0001]
        choices, _ = predictor.choose_for_latencies(budgets)
        expected = [min((p for p in (2, 4, 8) if latency[p] <= b), key=lambda p: p) for b in budgets]
        assert [c.patch_size for c in choices] == expected  # the most accurate (smallest) size within each budget
        assert main(["predict", str(run), *files, "--budgets-ms", ",".join(repr(b) for b in budgets), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert [p["patch_size"] for p in out["predictions"]] == expected
        alone = [predictor.predict([f], p, topk=1)[0].top[0][1] for f, p in zip(files, expected)]
        assert [p["top"][0]["class"] for p in out["predictions"]] == alone
        assert main(["predict", str(run), *files, "--budgets-ms", "5,5"]) == 2
        assert "--budgets-ms gives 2 values for 3 images" in capsys.readouterr().err
    finally:
        (run / "eval.json").unlink()


def test_budget_uses_the_runs_eval_json_when_it_has_latencies(run, tmp_path):
    predictor = Predictor.from_checkpoint(run)
    assert predictor.profile_for_latency()[1].startswith("latencies measured now")
    rows = [{**r, "top1": 0.99 if r["patch_size"] == 8 else 0.5} for r in predictor.latency_profile([2, 4, 8])]
    (run / "eval.json").write_text(json.dumps({"device": "cpu", "results": rows}))
    try:
        choice, source = predictor.choose_for_latency(1e6)
        assert choice.patch_size == 8 and source == f"latencies from {run / 'eval.json'}"
    finally:
        (run / "eval.json").unlink()


@pytest.mark.parametrize(
    "make,args,message",
    [
        (lambda d: (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really"), [], "cannot decode image"),
        (lambda d: None, ["--patch-size", "5"], "valid patch sizes: 1, 2, 4, 8, 16"),
        (lambda d: None, ["--topk", "0"], "topk must be >= 1"),
    ],
)
def test_predict_bad_input(run, tmp_path, capsys, make, args, message):
    make(tmp_path)
    image = tmp_path / "broken.png" if (tmp_path / "broken.png").exists() else _write_images(tmp_path)[0][0]
    assert main(["predict", str(run), str(image), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexivit predict: error:") and message in err


def test_predict_rejects_a_non_checkpoint_and_a_missing_image(run, tmp_path, capsys):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"garbage")
    image = str(_write_images(tmp_path)[0][0])
    assert main(["predict", str(bogus), image]) == 2
    assert "not a readable safetensors model file" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
