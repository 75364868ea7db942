"""The flexibility reproduction end to end at its smoke budget: trains, evaluates, writes the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "reproduce_flexibility.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)


@pytest.mark.slow
def test_smoke_reproduction_writes_all_three_files_and_resumes(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    # Two runs at a time: the distilled student must still wait for its teacher (the p=4 baseline).
    first = _run("--smoke", "--jobs", "2", "--out", str(out), "--results", str(results))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "flexi-distilled-seed0" / "train.log").exists()  # concurrent runs log to their dirs
    assert {"flexibility.md", "flexibility.json", "flexibility.png"} <= {p.name for p in results.iterdir()}
    assert (results / "flexibility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((results / "flexibility.json").read_text())
    assert report["patch_sizes"] == [2, 4, 7, 14] and report["seeds"] == [0]
    kinds = {name: c["kind"] for name, c in report["curves"].items()}
    assert kinds == {"fixed-p4/pi": "fixed", "fixed-p4/bilinear": "fixed", "fixed-p14/pi": "fixed",
                     "fixed-p14/bilinear": "fixed", "flexi": "flexi", "flexi-distilled": "flexi-distilled"}
    for name, curve in report["curves"].items():
        assert set(curve) >= {"kind", "train_patch_size", "resize", "top1_mean", "top1_std"}
        assert set(curve["top1_mean"]) == set(curve["top1_std"]) == {"2", "4", "7", "14"}
        assert all(0.0 <= v <= 1.0 for v in curve["top1_mean"].values())
        assert curve["resize"] == (name.split("/")[1] if curve["kind"] == "fixed" else None)
        assert curve["train_patch_size"] == ({"fixed-p4": 4, "fixed-p14": 14}.get(name.split("/")[0]))
    # Through PI-resize and through bilinear resize, a baseline is the same model at its own size.
    curves = report["curves"]
    for p in ("4", "14"):
        assert curves[f"fixed-p{p}/pi"]["top1_mean"][p] == curves[f"fixed-p{p}/bilinear"]["top1_mean"][p]
    assert "| flexi |" in (results / "flexibility.md").read_text()

    again = _run("--smoke", "--out", str(out), "--results", str(results))  # resumable: nothing retrained
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already, skipped") == 4
    assert json.loads((results / "flexibility.json").read_text())["curves"] == report["curves"]
