"""Training with a patch size per image (patch.per_image): the packing stream, the step batches that read
it, the builder's arithmetic and refusals, the model call, and kill + resume through the real trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexivit.model.config import FlexiViTConfig
from flexivit.model.packed import forward_packed
from flexivit.model.packing import RowPacker
from flexivit.model.vit import FlexiViT
from flexivit.train.builders import build_model, build_sampler, build_step_batches
from flexivit.train.config import load_recipe
from flexivit.train.step_batches import PackedStepBatches, StepBatches, loader_batches

ROOT = Path(__file__).resolve().parent.parent
SIZES = [2, 4, 7, 14]
# The quickstart's per-step weights, and the per-image weights they give under its token budget.
STEP_WEIGHTS = [0.4, 0.25, 0.25, 0.1]
IMAGE_WEIGHTS = [0.4 / 196, 0.25 / 49, 0.25 / 16, 0.1 / 4]


def _shares(plans) -> tuple[dict[int, float], float]:
    counts, padding = Counter(), 0.0
    for plan in plans:
        counts.update(plan.patch_sizes)
        padding += plan.padding
    total = sum(counts.values())
    return {p: counts[p] / total for p in SIZES}, padding / len(plans)


@pytest.mark.parametrize("weights", [IMAGE_WEIGHTS, STEP_WEIGHTS], ids=["training-mix", "serving-mix"])
def test_a_stream_takes_every_draw_so_sizes_follow_their_weights_with_little_padding(weights):
    """The pure per-step plans lose one rejected (large) draw per step and under-take patch 2; a stream
    carries it to the next plan, so the shares match the weights, and padding stays under 2 % at the
    quickstart's 16 rows."""
    packer = RowPacker(sizes=SIZES, weights=weights, image_size=28, rows=16, seed=0, patience=2)
    stream = packer.stream(0)
    shares, padding = _shares([stream.plan(i) for i in range(400)])
    target = [w / sum(weights) for w in weights]
    for p, t in zip(SIZES, target):
        assert abs(shares[p] - t) < 0.1 * t + 0.003, (p, shares[p], t)
    assert padding < 0.02
    skewed, _ = _shares([packer.plan(i) for i in range(400)])  # the per-step plans: skewed away from patch 2
    assert skewed[2] < shares[2]


def test_a_stream_plan_is_a_pure_function_of_seed_key_and_index():
    packer = RowPacker(sizes=SIZES, weights=IMAGE_WEIGHTS, image_size=28, rows=4, seed=5, patience=1)
    forward = [stream.plan(i) for stream in (packer.stream(0), packer.stream(1)) for i in range(30)]
    fresh = RowPacker(sizes=SIZES, weights=IMAGE_WEIGHTS, image_size=28, rows=4, seed=5, patience=1)
    streams = {key: fresh.stream(key) for key in (0, 1)}
    backward = [streams[key].plan(i) for key in (1, 0) for i in reversed(range(30))]
    assert forward[:30] == backward[30:][::-1] and forward[30:] == backward[:30][::-1]
    assert forward[:30] != forward[30:]  # another key, another stream
    other = RowPacker(sizes=SIZES, weights=IMAGE_WEIGHTS, image_size=28, rows=4, seed=6, patience=1).stream(0)
    assert [other.plan(i) for i in range(30)] != forward[:30]


def test_every_plan_fits_its_rows_and_the_first_k_images_keep_their_places():
    packer = RowPacker(sizes=SIZES, weights=STEP_WEIGHTS, image_size=28, rows=3, seed=1, patience=2)
    stream = packer.stream(2)
    for i in range(50):
        plan = stream.plan(i)
        assert sorted(j for row in plan.rows for j in row) == list(range(plan.num_images))
        assert all(sum(plan.lengths[j] for j in row) <= plan.row_tokens for row in plan.rows)
        cut = plan.first(plan.num_images // 2)
        assert cut.patch_sizes == plan.patch_sizes[: cut.num_images]
        assert all(set(a) == {j for j in b if j < cut.num_images} for a, b in zip(cut.rows, plan.rows))


class _Loader:
    """Batches of ``batch`` numbered images (label = position in the epoch, + 1000 per epoch); batch ``gap``
    of every epoch lost its last image as corrupt (``skipped``)."""

    def __init__(self, n: int, batch: int, gap: int = -1) -> None:
        self.n, self.batch, self.gap, self.epoch = n, batch, gap, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch

    def __iter__(self):
        for b in range(len(self)):
            labels = [1000 * self.epoch + b * self.batch + k for k in range(self.batch)]
            if b == self.gap:
                labels = labels[:-1]
            yield {"image": torch.zeros(len(labels), 1, 4, 4), "label": torch.tensor(labels),
                   "skipped": int(b == self.gap)}


def _skip(loader, n):
    it = iter(loader)
    for _ in range(n):
        next(it)
    return it


def _packed_batches(gap: int = -1, accum: int = 2) -> tuple[PackedStepBatches, _Loader]:
    packer = RowPacker(sizes=[1, 2, 4], weights=[1, 2, 4], image_size=4, rows=2, seed=3, patience=1)
    batches = PackedStepBatches(packer=packer, batch_size=5, grad_accum=accum, rank=0, ranks=2)
    return batches, _Loader(200, 5, gap)


@pytest.mark.parametrize("gap", [-1, 3])
def test_packed_step_batches_read_positions_in_order_and_resume_mid_batch(gap):
    batches, loader = _packed_batches(gap)
    batches.attach(loader=loader, dataset=loader, skip=_skip, step=0)
    straight = {s: [b for b in batches.micro_batches(s)] for s in range(12)}
    position = 0
    for s in range(12):
        for m, b in enumerate(straight[s]):
            plan = batches.plan(s, m)
            expected = [p for p in range(position, position + plan.num_images) if not (gap >= 0 and p % 200 == 5 * gap + 4)]
            labels = [l % 1000 + 200 * (l // 1000) for l in b["label"].tolist()]  # positions across epochs
            assert labels == expected
            assert b["plan"].patch_sizes == plan.patch_sizes[: len(expected)]
            assert b["world_images"] == plan.num_images + batches.streams[1].plan(s * 2 + m).num_images
            position += plan.num_images
    for start in (1, 5, 9):  # a resumed run reads exactly what the straight run read from that step on
        again, loader2 = _packed_batches(gap)
        again.attach(loader=loader2, dataset=loader2, skip=_skip, step=start)
        for s in range(start, 12):
            for a, b in zip(again.micro_batches(s), straight[s]):
                assert a["label"].tolist() == b["label"].tolist() and a["plan"] == b["plan"]


def test_the_builder_gives_each_size_its_per_step_share_of_images():
    cfg = load_recipe("fashion_mnist", ["patch.per_image=true"])
    model = build_model(cfg, channels=1, num_classes=10)
    batches = build_step_batches(cfg, build_sampler(cfg), model, rank=0, ranks=1)
    assert isinstance(batches, PackedStepBatches)
    packer = batches.packer
    assert (packer.rows, packer.row_tokens) == (16, 196 + model.num_prefix_tokens)
    per_step = [w * loader_batches(s, (28, 28), 16, 16 * 196) for w, s in zip(STEP_WEIGHTS, build_sampler(cfg).schemes)]
    assert packer.weights == pytest.approx(per_step)
    plain = build_step_batches(load_recipe("fashion_mnist"), build_sampler(cfg), model, rank=0, ranks=1)
    assert isinstance(plain, StepBatches)


@pytest.mark.parametrize("sets,message", [
    (["patch.distribution=curriculum", "patch.curriculum=[{\"until\": 5, \"distribution\": \"uniform\"}]"],
     "which a curriculum changes with the step"),
    (["patch.strides=[2,3,7,14]"], "non-overlapping patches only"),
    (["data.mixup=0.2"], "set data.mixup=0"),
    (["model.norm=batchnorm"], "patch.per_image: the packed forward cannot run a model with"),
    (["patch.row_tokens=100"], "patch.row_tokens=100 is shorter than an image at patch 2"),
    (["train.token_budget=100"], "train.token_budget=100 holds no row of 196 tokens"),
])
def test_the_builder_refuses_what_packing_cannot_train_in_one_line(sets, message):
    cfg = load_recipe("fashion_mnist", ["patch.per_image=true", *sets])
    model = build_model(cfg, channels=1, num_classes=10)
    with pytest.raises(ValueError) as error:
        build_step_batches(cfg, build_sampler(cfg), model, rank=0, ranks=1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_model_called_with_a_plan_runs_each_image_at_its_size():
    model = FlexiViT(FlexiViTConfig(img_size=28, patch_size=7, base_patch_size=14, embed_dim=32, depth=2,
                                    num_heads=2, in_chans=1, num_classes=5)).eval()
    plan = RowPacker(sizes=SIZES, weights=STEP_WEIGHTS, image_size=28, rows=2, seed=0, class_token=True).stream(0).plan(3)
    images = torch.randn(plan.num_images, 1, 28, 28)
    with torch.no_grad():
        called = model(images, plan)
        alone = torch.cat([model(x[None], p) for x, p in zip(images, plan.patch_sizes)])
    torch.testing.assert_close(called, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(called, forward_packed(model, images, plan.patch_sizes, rows=plan.rows,
                                                      row_tokens=plan.row_tokens), atol=0, rtol=0)
    with pytest.raises(ValueError, match="do not pass a stride"):
        model(images, plan, 7)


PROBE = ROOT / "tests" / "scripts" / "train_probe.py"
TINY = ["model.embed_dim=32", "model.depth=2", "model.drop_path_rate=0.5", "data.batch_size=8",
        "data.eval_limit=128", "train.steps=10", "train.checkpoint_every=4", "train.log_every=2",
        "train.token_budget=784", "patch.per_image=true"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin"}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_per_image_kill_and_resume_is_bit_identical(tmp_path):
    """Four rows of 196 tokens per step (~40 images of mixed sizes); SIGKILL two steps after the step-4
    checkpoint, resume: weights and log equal the uninterrupted run's."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    sets = [a for s in TINY for a in ("--set", s)]
    assert _run([sys.executable, str(PROBE), str(straight), *sets]).returncode == 0
    assert _run([sys.executable, str(PROBE), str(killed), "--kill-after", "6", *sets]).returncode == -9
    resumed = _run([sys.executable, str(PROBE), str(killed), "--resume", *sets])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    for name in a:
        assert a[name].equal(b[name]), f"{name} differs after kill + resume"
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (straight, killed)]
    train_lines = [[(r["step"], r["per_patch"]["mixed"]["loss"]) for r in log if "per_patch" in r] for log in logs]
    assert train_lines[0] == train_lines[1] and [s for s, _ in train_lines[0]] == [2, 4, 6, 8, 10]
    cfg = load_recipe("fashion_mnist:smoke", TINY)
    planned = build_step_batches(cfg, build_sampler(cfg), build_model(cfg, channels=1, num_classes=10), rank=0, ranks=1)
    for run in (straight, killed):  # the images the plans took, counted again after the resume
        assert json.loads((run / "eval.json").read_text())["images_seen"] == planned.consumed(10)
