"""The trainer's parts on their own: step batches, metric windows, hooks, evaluation reductions, resume
checks and file permissions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from flexivit.model.weights import atomic_write_text, save_model
from flexivit.train.config import Config, load_recipe
from flexivit.eval.evaluate import evaluate_schemes
from flexivit.train.hooks import Hooks
from flexivit.train.metrics import MetricWindow
from flexivit.model.patch_embed import PatchScheme
from flexivit.train.assemble import RESUMABLE_CHANGES, config_changes
from flexivit.train.sampler import PatchSizeSampler, make_distribution
from flexivit.train.step_batches import StepBatches


class _Loader:
    """A loader of numbered one-image batches whose order depends on the epoch, like a shuffled one."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield {"image": torch.zeros(1, 1, 4, 4), "label": torch.tensor([1000 * self.epoch + (i * 7) % self.n]),
                   "skipped": 0}


def _skip(loader, n):
    it = iter(loader)
    for _ in range(n):
        next(it)
    return it


def _step_batches(token_budget: int = 32, grad_accum: int = 2) -> StepBatches:
    sampler = PatchSizeSampler(schemes=[PatchScheme(p) for p in (1, 2, 4)], distribution=make_distribution("uniform"),
                               seed=3, image_size=4)
    return StepBatches(sampler=sampler, image_hw=(4, 4), batch_size=1, token_budget=token_budget, grad_accum=grad_accum)


def _labels(batches: StepBatches, step: int) -> list[list[int]]:
    return [b["label"].tolist() for b in batches.micro_batches(step)]


@pytest.mark.parametrize("budget,accum", [(0, 1), (32, 2), (16, 3)])
def test_step_batches_started_mid_run_continue_the_uninterrupted_stream(budget, accum):
    straight = _step_batches(budget, accum)
    straight.attach(loader=_Loader(11), dataset=_Loader(11), skip=_skip, step=0)
    stream = [_labels(straight, s) for s in range(20)]
    for start in (3, 7, 15):  # across epoch boundaries of the 11-batch loader
        resumed = _step_batches(budget, accum)
        resumed.attach(loader=_Loader(11), dataset=_Loader(11), skip=_skip, step=start)
        assert [_labels(resumed, s) for s in range(start, 20)] == stream[start:]
    sizes = [len(sum(micro, [])) for micro in stream]
    expected = [accum * straight.joined(s) for s in range(20)]
    assert sizes == expected
    assert (len(set(expected)) > 1) == (budget > 0)  # token budgets really vary the batch count
    assert straight.consumed(20) == sum(expected)


def test_step_batches_refuse_a_split_smaller_than_one_step():
    batches = _step_batches(0, 4)
    with pytest.raises(ValueError, match="fewer than train.grad_accum=4"):
        batches.attach(loader=_Loader(3), dataset=_Loader(3), skip=_skip, step=0)


def test_metric_window_means_per_patch_and_flags_the_first_non_finite_step():
    window = MetricWindow(torch.device("cpu"))
    losses = {1: (4, 1.0), 2: (2, 3.0), 3: (4, 5.0), 4: (2, float("nan")), 5: (4, float("inf"))}
    for step, (patch, loss) in losses.items():
        window.add(step=step, patch=patch, metrics={"loss": torch.tensor(loss), "acc": torch.tensor(0.5)},
                   images=8, seconds=0.5, wait=0.1)
    two_ranks = lambda t: torch.cat([t, t])  # noqa: E731 - an all-gather over two identical ranks
    record, bad = window.summary(two_ranks)
    assert record["per_patch"]["2"]["steps"] == 2 and record["per_patch"]["4"]["img_s"] == pytest.approx(16.0)
    assert record["per_patch"]["4"]["acc"] == pytest.approx(0.5)
    assert record["data_wait_share"] == pytest.approx(0.2)
    assert bad == (4, 2)  # the NaN at step 4 (patch 2), not the later inf
    clean = MetricWindow(torch.device("cpu"))
    clean.add(step=1, patch=4, metrics={"loss": torch.tensor(2.0)}, images=1, seconds=1.0, wait=0.0)
    clean.add(step=2, patch=4, metrics={"loss": torch.tensor(4.0)}, images=1, seconds=1.0, wait=0.0)
    record, bad = clean.summary(lambda t: t)
    assert bad is None and record["per_patch"]["4"]["loss"] == pytest.approx(3.0)


class _Counter:
    def __init__(self, name: str) -> None:
        self.name, self.calls = name, torch.zeros(2)

    def after_step(self, model, step: int) -> None:
        self.calls += torch.tensor([1.0, step])

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state) -> None:
        self.calls = state["calls"].clone()


def test_hooks_run_in_order_and_their_state_round_trips(tmp_path):
    hooks = Hooks([_Counter("a"), _Counter("b")])
    for step in (1, 2, 3):
        hooks.after_step(None, step)
    hooks.save(tmp_path)
    fresh = Hooks([_Counter("a"), _Counter("b")])
    fresh.load(tmp_path)
    assert [h.calls.tolist() for h in fresh.hooks] == [[3.0, 6.0], [3.0, 6.0]]
    with pytest.raises(ValueError, match="unique"):
        Hooks([_Counter("a"), _Counter("a")])
    with pytest.raises(ValueError, match="holds no hooks.safetensors"):
        Hooks([_Counter("a")]).load(tmp_path / "elsewhere")


def test_evaluation_reduces_once_per_scheme_even_when_a_shard_is_empty():
    """A rank whose batches were all skipped as corrupt still takes part in every reduction."""
    model = torch.nn.Module()
    model.forward = lambda x, p, s: torch.zeros(x.shape[0], 3)  # never called on an empty shard
    empty = [{"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long)}]
    calls = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return t + torch.tensor([3.0, 3.0, 6.0, 4.0, 0.0], dtype=t.dtype)  # the other rank's totals

    rows = evaluate_schemes(model, empty, [PatchScheme(2), PatchScheme(4)], image_hw=(8, 8), reduce=reduce)
    assert len(calls) == 2 and all(c.abs().sum() == 0 for c in calls)
    assert [(r["n"], r["top1"], r["loss"]) for r in rows] == [(4, 0.75, 1.5), (4, 0.75, 1.5)]


def test_resume_checks_name_every_changed_field_but_cadence():
    saved = Config().to_dict()
    now = load_recipe("fashion_mnist", ["train.steps=99", "train.log_every=7", "train.token_budget=64",
                                        "data.batch_size=3"]).to_dict()
    changed = config_changes(saved, now)
    assert "train.token_budget" in changed and "data.batch_size" in changed and "patch.weights" in changed
    assert not set(changed) & RESUMABLE_CHANGES
    assert config_changes(now, now) == {}


def test_written_files_follow_the_umask(tmp_path):
    """Atomic writes go through a temporary file, which tempfile creates 0600: the result must not."""
    from flexivit import FlexiViT, FlexiViTConfig

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "eval.json", json.dumps({}))
        model = FlexiViT(FlexiViTConfig(img_size=8, patch_size=4, base_patch_size=4, base_grid=2, in_chans=1,
                                        num_classes=2, embed_dim=8, depth=1, num_heads=1))
        file = save_model(model, tmp_path, class_names=["a", "b"], preprocess={})
    finally:
        os.umask(old)
    for path in (tmp_path / "eval.json", file, Path(file).with_suffix(".json")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
