"""Issue 14's study tools (tools/bgn_study.py, tools/proxy_study.py) turn run outputs into the targets' verdicts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from flexivit.data import FASHION_MNIST_CLASSES

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run_dir(path: Path, *, val: dict[int, float], test: dict[int, float], steps: int = 50) -> None:
    path.mkdir(parents=True)
    rows = lambda acc: [{"patch_size": p, "top1": a / 100, "n": 100} for p, a in acc.items()]  # noqa: E731
    report = {"split": "test", "results": rows(test), "val": rows(val), "images_seen": 800, "train_seconds": 60.0}
    (path / "eval.json").write_text(json.dumps(report))
    (path / "config.json").write_text(json.dumps({"train": {"steps": steps}}))


def test_bgn_spreads_and_targets_from_run_outputs(tmp_path):
    bgn = _tool("bgn_study")
    # worst size = p=14 except where noted; the val split differs so that reading the wrong split shows
    test = {"layernorm": (70, 71, 72), "batchnorm": (60, 68, 72), "bgn": (66, 69, 70)}
    for norm, worst in test.items():
        for batch, w in zip(bgn.BATCHES, worst):
            _run_dir(tmp_path / f"{norm}-b{batch}", val={2: 50, 4: 50, 7: 50, 14: 40},
                     test={2: w + 10, 4: w + 5, 7: w + 1, 14: w})
    _run_dir(tmp_path / bgn.POW2, val={2: 50, 4: 50, 7: 50, 14: 40}, test={2: 79, 4: 74, 7: 70.5, 14: 67.5})
    result = bgn.collect(tmp_path)
    spread = result["spreads"]["test"]
    assert spread["batchnorm"]["worst"] == {"4": 60, "16": 68, "64": 72}
    assert spread["batchnorm"]["worst_spread"] == pytest.approx(12)
    assert spread["bgn"]["worst_spread"] == pytest.approx(4)
    assert spread["bgn"]["size_spread"]["2"] == pytest.approx(4)
    assert result["spreads"]["val"]["bgn"]["worst_spread"] == pytest.approx(0)
    lines = "\n".join(result["targets"])
    assert "bgn below batchnorm: 4.0 vs 12.0 points (met)" in lines
    assert "batch 4 + 2 points (worst size): +6.0 (met)" in lines
    # pow2 vs bgn-b16 (79 / 74 / 70 / 69): +0.0, +0.0, +0.5, -1.5 -> one size off by more than 1 point
    assert "p=14 -1.5 (missed)" in lines
    bgn.write(result, tmp_path / "results" / "bgn")
    assert "| bgn-b4 | test | 76.0 | 71.0 | 67.0 | 66.0 | 66.0 | 800 | 1.0 |" in (tmp_path / "results" / "bgn.md").read_text()


def _fewshot_report(gain: float, global_acc: float) -> dict:
    results, paired = [], []
    for p in (2, 4, 7, 14):
        for shots in (1, 5):
            for method, acc in (("global", global_acc), ("local", 0.5), ("global+local", global_acc + gain)):
                results.append({"patch_size": p, "shots": shots, "method": method, "top1": acc, "ci95": 0.01,
                                "local_proxies": 0 if method == "global" else 16, "episodes_top1": [global_acc]})
            paired.append({"patch_size": p, "shots": shots, "gain": gain + (0.02 if p == 14 else 0), "ci95": 0.01})
    settings = {"classes": ["a"], "ways": 4, "shots": [1, 5], "queries": 15, "episodes": 1, "mix": 0.5, "seed": 0,
                "split": "test", "backbone_classes_in_episodes": []}
    return {**settings, "results": results, "paired_gain_over_global": paired}


def test_proxy_study_classes_and_targets():
    proxy = _tool("proxy_study")
    assert sorted(proxy.UPPER_BODY + proxy.BACKBONE_CLASSES) == sorted(FASHION_MNIST_CLASSES)
    assert set(proxy.UPPER_BODY) == {"T-shirt/top", "Pullover", "Coat", "Shirt"}
    reports = {"4": _fewshot_report(-0.05, 0.61), "16": _fewshot_report(0.03, 0.60), "all": _fewshot_report(0.0, 0.60)}
    table = proxy.fewshot_table(reports)
    assert table["rows"]["5-shot global"]["2"]["top1"] == pytest.approx(60.0)  # from the M=16 run
    assert not table["global_same_in_every_run"]  # the M=4 run's global differs
    assert list(table["rows"])[:4] == ["1-shot global", "1-shot local M=4", "1-shot local M=16", "1-shot local M=all"]
    lines = "\n".join(proxy.targets({"fewshot": table, "parity": {}}))
    # M=16 gains: +3 at p=2/4/7, +5 at p=14 -> mean +3.5 (met), every size above +1 (met)
    assert "averaged over sizes: +3.5 (met)" in lines
    assert "p=2 +3.0 ± 1.0, p=4 +3.0 ± 1.0, p=7 +3.0 ± 1.0, p=14 +5.0 ± 1.0 (met)" in lines
