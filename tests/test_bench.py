"""tools/bench.py end to end in its smoke mode: it runs, writes both result files, and they hold sane numbers.

No speed thresholds: the smoke numbers come from a tiny model on a shared machine and mean nothing.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"bench.py --smoke failed:\n{proc.stdout}\n{proc.stderr}"
    assert (out / "bench.md").is_file() and (out / "bench.json").is_file()

    result = json.loads((out / "bench.json").read_text())
    for key in ("hardware", "torch", "config", "rows", "pi_resize", "scaling"):
        assert key in result, f"bench.json lacks {key!r}"
    (sweep,) = result["config"].values()
    sizes = [row["patch_size"] for row in result["rows"]]
    assert sorted(sizes) == sorted(sweep["patch_sizes"]), "one row per patch size expected"

    positive = ["tokens", "train_ratio", "eval_ratio", "flexi_train_img_s", "timm_train_img_s",
                "flexi_eval_img_s", "timm_eval_img_s", "stem_overhead_ms"]
    for row in result["rows"]:
        for key in positive:
            value = row[key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, row)
        for key in ("peak_mem_mb_flexi", "peak_mem_mb_timm"):  # null where /proc does not allow it
            assert row[key] is None or row[key] >= 0, (key, row)
    assert result["pi_resize"]["cold_ms"] > 0 and result["pi_resize"]["cached_ms"] > 0

    table = (out / "bench.md").read_text()
    assert "Command:" in table and "Hardware:" in table
    assert table.count("| smoke |") == len(sizes)
