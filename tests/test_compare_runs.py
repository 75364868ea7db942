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
                           str(tmp_path / "b"), "--labels", "A", "B", "--out", str(out), "--note", "Trained two at a time."],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    md = out.with_suffix(".md").read_text().splitlines()
    assert "| A | 50.0 | 70.0 |" in md and md[2] == "Trained two at a time."  # the note under the title
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["top1"]["B"] == {"4": 60.0, "7": 65.0} and record["note"] == "Trained two at a time."
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_sharing_a_label_are_averaged_with_their_std(tmp_path):
    for name, (test, val) in {"s0": ([0.80, 0.70], [0.81, 0.71]), "s1": ([0.82, 0.74], [0.83, 0.75]),
                              "other": ([0.5, 0.6], [0.5, 0.6])}.items():
        (tmp_path / name).mkdir()
        rows = lambda accs: [{"patch_size": p, "top1": a} for p, a in zip((4, 7), accs)]  # noqa: E731
        (tmp_path / name / "eval.json").write_text(json.dumps(
            {"split": "test", "results": rows(test), "val": rows(val), "images_seen": 100, "train_seconds": 120}))
    out = tmp_path / "cmp" / "seeds"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_runs.py"), *(str(tmp_path / n) for n in
                           ("s0", "s1", "other")), "--labels", "D", "D", "O", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    md = out.with_suffix(".md").read_text()
    assert "| D (2 runs) | 81.00 ± 1.41 | 72.00 ± 2.83 |" in md  # test: mean ± sample std
    assert "| D (2 runs) | 82.00 ± 1.41 | 73.00 ± 2.83 |" in md  # validation
    assert "| O | 50.0 | 60.0 |" in md
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["runs"] == {"D": 2, "O": 1} and record["train_minutes"]["D"] == 2.0
