"""tools/gpu_check.py on the CPU: its smoke writes every section, counts the FLOPs an independent formula gives,
records a failing section instead of stopping, and never writes a CPU result to docs/results.

No speed thresholds: the smoke's numbers come from a tiny model on shared cores and mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

SIZES = ("2", "4", "8")  # the smoke's patch sizes at 32 px
DOCS_RESULT = ROOT / "docs" / "results" / "gpu_check.json"


def train_flops(p: int, img: int = 32, dim: int = 32, depth: int = 1, classes: int = 10) -> int:
    """FLOPs of one training image of a timm ViT (class token, MLP ratio 4), 2 per multiply-add, counted the way
    torch's FlopCounterMode counts: backward is twice the forward, except the patch convolution (its input needs
    no gradient: weight gradient only) and attention (the backward recomputes the scores: 5 matmuls for 2)."""
    n = (img // p) ** 2
    t = n + 1  # tokens with the class token
    conv = 2 * n * (3 * p * p) * dim
    linears = depth * 2 * t * (3 + 1 + 4 + 4) * dim * dim  # qkv, proj, fc1, fc2
    attention = depth * 2 * (2 * t * t * dim)  # q k^T and (scores) v
    head = 2 * dim * classes
    return 2 * conv + 3 * (linears + head) + attention * 7 // 2


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_cpu_smoke_writes_every_section(tmp_path):
    before = DOCS_RESULT.read_bytes() if DOCS_RESULT.exists() else None
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert (DOCS_RESULT.read_bytes() if DOCS_RESULT.exists() else None) == before  # docs/results untouched

    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["cpu_smoke"] is True and res["seeds"] == [0] and "split" in res and "provenance" in res
    sections = res["sections"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(["models", *gpu_check.SECTIONS], "ok")
    assert res["environment"]["batches"] == {"2": 2, "4": 8, "8": 32}  # tokens per step kept about equal

    for p in SIZES:  # the counter sees every matmul and the attention of both models
        flops = sections["flops"]["result"][p]
        assert flops["timm_gflop_per_train_image"] * 1e9 == pytest.approx(train_flops(int(p)), rel=1e-9)
        # FlexiViT: the same network plus its kernel PI-resize (small matmuls; none at the base size 8): 1-4 %
        # more at this 32-wide model, 0.01-0.1 % at ViT-B's width
        extra = flops["flexi_gflop_per_train_image"] / flops["timm_gflop_per_train_image"] - 1
        assert (extra == 0) if p == "8" else (0 < extra < 0.05)
    for rows in (sections["eager"]["result"], sections["compiled"]["result"]["sizes"]):
        assert tuple(rows) == SIZES
        for p, row in rows.items():
            assert row["tokens"] == (32 // int(p)) ** 2
            for phase in ("train", "eval"):
                img_s = [row[f"{k}_{phase}_img_s"] for k in gpu_check.MODELS]
                assert all(math.isfinite(v) and v > 0 for v in img_s), row
                assert row[f"{phase}_ratio"] == pytest.approx(img_s[0] / img_s[1])
            flops = sections["flops"]["result"][p]["flexi_gflop_per_train_image"]
            assert row["flexi_train_tflop_s"] == pytest.approx(flops * row["flexi_train_img_s"] / 1e3)
            assert row["flexi_mfu"] is None  # no peak for a CPU
    # compile_model: one training graph and one eval graph serve all three sizes
    assert sections["compiled"]["result"]["graphs"]["flexi"] == 2
    ddp = sections["ddp"]["result"]
    assert ddp["ddp"] is True and ddp["steps"] == 8 and ddp["env"]["WORLD_SIZE"] == "1"
    assert list(ddp["test_top1"]) == ["8", "12", "16", "24", "30", "48"]  # imagenet:smoke's eval sizes
    text = (tmp_path / "gpu_check.md").read_text()
    assert "**CPU smoke**" in text and "## How this file was made" in text
    assert [text.count(f"| {mode} | {p} | ") for mode in ("eager", "compiled") for p in SIZES] == [1] * 6


def test_refuses_what_would_mislead(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--cpu-smoke"])
    assert "--cpu-smoke needs --out DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--cpu-smoke", "--out", "x", "--sections", "eager,warp"])
    assert "unknown sections ['warp']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args([])
        assert "no CUDA device here" in capsys.readouterr().err


def test_peak_table_matches_device_names():
    assert gpu_check.peak_for("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_for("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_for("NVIDIA H200") == 989.4
    assert gpu_check.peak_for("Tesla T4") is None


def test_a_failing_size_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch, threads):
    c = gpu_check.build_check(gpu_check.parse_args(["--cpu-smoke", "--out", str(tmp_path), "--peak-tflops", "2"]))
    real = gpu_check.measure_size

    def broken_at_4(check, p):
        if p == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(check, p)

    monkeypatch.setattr(gpu_check, "measure_size", broken_at_4)
    done = gpu_check.run_sections(c, ["flops", "eager"])
    assert list(done) == ["models", "flops", "eager"] and done["flops"]["status"] == "ok"
    rows = done["eager"]["result"]
    assert done["eager"]["status"] == "error" and "['4']" in done["eager"]["error"]
    assert rows["4"] == {"status": "error", "error": "RuntimeError: CUDA out of memory (simulated)"}
    for p in ("2", "8"):
        assert rows[p]["status"] == "ok"
        assert rows[p]["flexi_mfu"] == pytest.approx(rows[p]["flexi_train_tflop_s"] / 2)
    c.deadline = 0.0  # past: every section is skipped, and says why
    assert gpu_check.run_sections(c, ["eager"])["eager"] == {"status": "skipped", "reason": "time limit reached"}
