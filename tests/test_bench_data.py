"""The data benchmark's smoke mode runs end to end and finds the two paths' tensors equal (timings go to
docs/, no thresholds here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_data_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "bench_data"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_data.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["images"] for r in result["rows"]] == [16, 64, 192, 784]
    assert all(r["identical"] and r["batched_ms"] > 0 and r["per_image_ms"] > 0 for r in result["rows"])
    assert "| 784 |" in out.with_suffix(".md").read_text()
