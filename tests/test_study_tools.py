"""Issue 14's study tools (tools/bgn_study.py, tools/proxy_study.py) turn run outputs into the targets' verdicts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from flexivit.data.sources import FASHION_MNIST_CLASSES

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


def _fewshot_report(gains: dict[str, float], global_acc: float) -> dict:
    """A ``fewshot.json`` of one run with ``--local`` listing the keys of ``gains``; 4 tokens per image, so the
    local proxies used are capped at ``4 * shots``."""
    local = [m if m == "all" else int(m) for m in gains]
    results, paired = [], []
    for p in (2, 4, 7, 14):
        for shots in (1, 5):
            results.append({"patch_size": p, "shots": shots, "method": "global", "top1": global_acc, "ci95": 0.01,
                            "local_proxies": 0, "episodes_top1": [global_acc]})
            for method in ("local", "global+local"):
                for m, gain in zip(local, gains.values()):
                    acc = 0.5 if method == "local" else global_acc + gain
                    results.append({"patch_size": p, "shots": shots, "method": method, "local": m, "top1": acc,
                                    "ci95": 0.01, "local_proxies": min(4 * shots, 99 if m == "all" else m),
                                    "episodes_top1": [acc]})
            paired += [{"patch_size": p, "shots": shots, "local": m, "gain": gain + (0.02 if p == 14 else 0),
                        "ci95": 0.01} for m, gain in zip(local, gains.values())]
    settings = {"classes": ["a"], "ways": 4, "shots": [1, 5], "queries": 15, "episodes": 1, "mix": 0.5, "seed": 0,
                "split": "test", "backbone_classes_in_episodes": [], "local": local}
    return {**settings, "results": results, "paired_gain_over_global": paired}


def test_proxy_study_classes_and_targets():
    proxy = _tool("proxy_study")
    assert sorted(proxy.UPPER_BODY + proxy.BACKBONE_CLASSES) == sorted(FASHION_MNIST_CLASSES)
    assert set(proxy.UPPER_BODY) == {"T-shirt/top", "Pullover", "Coat", "Shirt"}
    table = proxy.fewshot_table(_fewshot_report({"4": -0.05, "16": 0.03, "all": 0.0}, 0.60))
    assert table["rows"]["5-shot global"]["2"]["top1"] == pytest.approx(60.0)
    assert table["rows"]["1-shot global+local M=4"]["7"] == {"top1": pytest.approx(55.0), "ci95": 1.0,
                                                              "local_proxies": 4}
    assert list(table["rows"])[:4] == ["1-shot global", "1-shot local M=4", "1-shot local M=16", "1-shot local M=all"]
    assert len(table["rows"]) == 2 * 7 and table["paired_gain"]["1-shot M=4"]["14"]["gain"] == pytest.approx(-3.0)
    lines = "\n".join(proxy.targets({"fewshot": table, "parity": {}}))
    # M=16 gains: +3 at p=2/4/7, +5 at p=14 -> mean +3.5 (met), every size above +1 (met)
    assert "averaged over sizes: +3.5 (met)" in lines
    assert "p=2 +3.0 ± 1.0, p=4 +3.0 ± 1.0, p=7 +3.0 ± 1.0, p=14 +5.0 ± 1.0 (met)" in lines


def test_proxy_study_reads_the_run_of_every_m_and_refuses_the_former_layout(tmp_path):
    proxy = _tool("proxy_study")
    (tmp_path / "old" / "fewshot-m16").mkdir(parents=True)
    (tmp_path / "old" / "fewshot-m16" / "fewshot.json").write_text(json.dumps(_fewshot_report({"16": 0.03}, 0.6)))
    with pytest.raises(SystemExit, match="former tool .* run the tool without --report-only"):
        proxy.collect(tmp_path / "old")
    (tmp_path / "new" / "fewshot").mkdir(parents=True)
    report = _fewshot_report({"4": -0.05, "16": 0.03, "all": 0.0}, 0.60)
    (tmp_path / "new" / "fewshot" / "fewshot.json").write_text(json.dumps(report))
    result = proxy.collect(tmp_path / "new")
    assert result["fewshot"]["settings"]["local"] == [4, 16, "all"]
    proxy.write(result, tmp_path / "results" / "proxies")
    text = (tmp_path / "results" / "proxies.md").read_text()
    assert "| 1-shot local M=16 | 50.0 ± 1.0\\* |" in text and "| 5-shot M=16 | +3.0 ± 1.0 |" in text


def test_the_runs_each_study_hands_the_runner(tmp_path):
    bgn = _tool("bgn_study")
    runs = bgn.specs(steps=7, smoke=False, eval_limit=64)
    assert [r.name for r in runs] == [name for name, _ in bgn.plan()] and len(runs) == 3 * 3 + 1
    for run in runs:
        assert run.command == "train" and run.recipe == bgn.RECIPE and run.sets[:2] == tuple(bgn.COMMON)
        assert run.sets[-2:] == ("train.steps=7", "data.eval_limit=64")
    proxy = _tool("proxy_study")
    runs = proxy.specs(tmp_path, backbone_steps=5, parity_steps=6, episodes=3, smoke=True)
    backbone, fewshot = runs[0], runs[-1]  # the few-shot run last: it waits for its backbone
    assert backbone.name == "backbone" and "train.steps=5" in backbone.sets
    assert fewshot.command == "fewshot" and fewshot.needs == ("backbone",) and fewshot.recipe is None
    assert fewshot.inputs == (str(tmp_path / "backbone"),) and fewshot.done == ("fewshot.json",)
    args = dict(zip(fewshot.args[::2], fewshot.args[1::2]))
    assert args["--data"] == "fashion-mnist" and args["--episodes"] == "3" and args["--local"] == "4,16,all"
    assert sorted(r.name for r in runs[1:-1]) == sorted(f"parity-{h}-seed{s}" for h in proxy.HEADS for s in proxy.SEEDS)
