"""What only a GPU can show: bf16 training at several patch sizes, then evaluation and export.

Skipped without CUDA (our CI has none); run it with `pytest tests/test_cuda.py` on a GPU machine.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bf16_training_at_two_patch_sizes_then_eval_and_export(tmp_path):
    from accelerate import Accelerator

    from flexivit.train.config import load_recipe
    from flexivit.eval.export import export_checkpoint
    from flexivit.rng import seed_all
    from flexivit.train.loop import train

    cfg = load_recipe("fashion_mnist:smoke", [
        "model.embed_dim=64", "model.depth=2", "data.batch_size=32", "data.eval_limit=256", "train.steps=8",
        "train.checkpoint_every=4", "train.mixed_precision=bf16", "patch.sizes=4,7", "patch.distribution=uniform",
        "patch.weights=none", "train.token_budget=0", "model.drop_path_rate=0.1",
    ])
    seen = []
    result = train(cfg, out_dir=tmp_path / "run", accelerator=Accelerator(mixed_precision="bf16"),
                   on_step=lambda info: seen.append((info.scheme.patch, info.loss.device.type)))
    assert {p for p, _ in seen} == {4, 7} and all(d == "cuda" for _, d in seen)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.eval)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert sorted(r["patch_size"] for r in report["results"]) == [4, 7]
    export = export_checkpoint(tmp_path / "run", 7, tmp_path / "export")
    assert max(export.max_abs_diff.values()) < 1e-3
    # CUDA dropout draws from the seeded device generator: the same seed gives the same mask.
    seed_all(5)
    a = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)
    seed_all(5)
    assert a.equal(torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5))
