"""tools/compare_runs.py turns eval.json files into a table, JSON and a PNG."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_compare_runs(tmp_path):
    for name, accs in {"a": [0.5, 0.7], "b": [0.6, 0.65]}.items():
        (tmp_path / name).mkdir()
        rows = [{"patch_size": p, "top1": a} for p, a in zip((4, 7), accs)]
        (tmp_path / name / "eval.json").write_text(json.dumps({"results": rows}))
    out = tmp_path / "cmp" / "result"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_runs.py"), str(tmp_path / "a"),
                           str(tmp_path / "b"), "--labels", "A", "B", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| A | 50.0 | 70.0 |" in out.with_suffix(".md").read_text()
    assert json.loads(out.with_suffix(".json").read_text())["top1"]["B"] == {"4": 60.0, "7": 65.0}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
