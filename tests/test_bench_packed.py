"""tools/bench_packed.py end to end in its smoke mode: it runs and writes both result files with sane numbers.

No speed thresholds: smoke timings on a shared machine mean nothing.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess importing torch: 5-25 s on 2 shared cores
def test_bench_packed_smoke_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_packed.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench_packed.py --smoke failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads((tmp_path / "bench_packed.json").read_text())
    assert result["seeds"] == [0] and "split" in result and "provenance" in result
    (row,) = result["rows"]
    assert sum(row["sizes"].values()) == row["batch"] == 16
    assert row["max_logit_gap_packed_vs_per_size"] < 1e-4  # the three ways classify the same images
    for method in ("packed", "packed_sdpa", "per_size", "padded"):
        assert len(row["wall_s"][method]) == result["rounds"] and all(t > 0 for t in row["cpu_s"][method])
        assert math.isfinite(row["img_s"][method]) and row["img_s"][method] > 0
    assert row["tokens"]["packed"] == row["rows"] * row["row_tokens"] >= row["tokens"]["per_size"]
    assert row["tokens"]["padded"] == 16 * 196
    assert len(result["packing"]) == 16 and all(0 <= t["padding"] < 0.1 for t in result["packing"])
    markdown = (tmp_path / "bench_packed.md").read_text()
    assert "| flexi_vit_micro | 16 | 0 |" in markdown and "## How this file was made" in markdown
