"""The trainer benchmark's smoke mode runs end to end (numbers go to docs/, no thresholds here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_train.json").read_text())
    assert [r["patch_size"] for r in result["rows"]] == [4, 7]
    assert all(r["flexi_img_s"] > 0 and r["fixed_img_s"] > 0 for r in result["rows"])
    assert 0 <= result["data_wait_share_median"] <= 1
    assert "| 4 |" in (tmp_path / "bench_train.md").read_text()
