"""The streaming benchmark's smoke mode runs both loaders end to end on shards it writes and records its
provenance (timings go to docs/, no thresholds here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_stream_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    out = tmp_path / "bench_stream"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_stream.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["config"] for r in result["rows"]] == ["crop+flip", "crop+flip+RandAugment"]
    for row in result["rows"]:
        for clock in ("cpu", "wall"):
            rates = row[clock]
            assert all(v > 0 for values in rates["img_per_s"].values() for v in values)
            assert rates["median_ratio"] == pytest.approx(
                rates["median_img_per_s"]["flexivit"] / rates["median_img_per_s"]["timm"])  # one repeat
    assert result["images"] == 128 and result["provenance"]["command"].startswith("bench_stream.py --smoke")
    assert "flexivit / timm" in out.with_suffix(".md").read_text()
