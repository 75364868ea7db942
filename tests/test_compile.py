"""One compiled model for every patch size: the logits of eager, few graphs, the same keys; and
``flexivit eval --compile`` / ``--precision``, which measure the model as it is deployed.

Graph counts are dynamo's (``flexivit.model.compile.graph_count``), after ``torch._dynamo.reset()``. The fast
tests compile with ``aot_eager`` (dynamo + AOTAutograd with the same dynamic shapes as inductor, but no
C++ code generation, which takes tens of seconds per graph on 2 cores); the ``slow`` ones use inductor.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import flexivit.eval.evaluate
from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.weights import load_model
from flexivit.cli.main import main
from flexivit.model.compile import compile_model, graph_count, token_trunk
from flexivit.eval.evaluate import evaluate_checkpoint, eval_dataset, load_eval_splits, sweep
from flexivit.eval.measure import MeasureSettings, autocast
from flexivit.eval.subjects import load_subject
from tiny_run import TRAIN_SIZES, make_run, subprocess_env, synthetic

FAST = MeasureSettings(batch_size=8, warmup=1, repeats=2)
# The quickstart's sizes at 28 px and the images per step its token budget (16 x 196 tokens) gives each.
QUICKSTART_BATCH = {2: 16, 4: 64, 7: 192, 14: 784}
# Inductor vs eager in fp32 on the CPU: same math, sums reordered and fused; logits are O(1).
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # graphs of an earlier test would be reused (same architecture)
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.getbasetemp())


def _small(img_size: int = 28, **overrides) -> FlexiViT:
    cfg = dict(img_size=img_size, patch_size=4, base_patch_size=4, base_grid=7, in_chans=1, num_classes=10,
               embed_dim=32, depth=2, num_heads=2, class_token=True, global_pool="token")
    return FlexiViT(FlexiViTConfig(**{**cfg, **overrides}))


def _test_images(n: int = 64) -> torch.Tensor:
    images, _ = synthetic(n, seed=2)
    return torch.from_numpy(images).float().div(255).sub(0.5).div(0.5)[:, None]  # (n, 1, 16, 16)


def test_compile_model_is_in_place_and_keeps_state_dict_keys():
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert compile_model(model, backend="aot_eager") is model
    after = model.state_dict()
    assert list(after) == list(before)  # no `_orig_mod.` prefix: checkpoints load either way
    assert all(after[k].equal(v) for k, v in before.items())
    _small().load_state_dict(after, strict=True)
    vit = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                            num_heads=2)
    keys = list(vit.state_dict())
    compile_model(vit, backend="aot_eager")  # timm's ViT has the same `blocks`
    assert list(vit.state_dict()) == keys
    with pytest.raises(ValueError, match="nn.Sequential named `blocks`"):
        compile_model(torch.nn.Linear(2, 2))


def _train_and_eval_graphs(model: FlexiViT, eager: FlexiViT) -> list[int]:
    """Graphs built after training steps at every quickstart size, after eval at batches >= 2, after batch 1
    (the compiled model's logits and gradients checked against ``eager`` on the way)."""
    counts, start = [], graph_count()
    model.train(), eager.train()
    for patch, batch in QUICKSTART_BATCH.items():
        x = torch.randn(batch, 1, 28, 28)
        y = torch.randint(0, 10, (batch,))
        for m in (model, eager):
            m.zero_grad()
            F.cross_entropy(m(x, patch), y).backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), (patch, name)
    counts.append(graph_count() - start)
    model.eval(), eager.eval()
    with torch.no_grad():
        for batches in ((256, 16), (1,)):
            for patch in QUICKSTART_BATCH:
                for batch in batches:
                    x = torch.randn(batch, 1, 28, 28)
                    assert torch.allclose(model(x, patch), eager(x, patch), atol=ATOL), (patch, batch)
            counts.append(graph_count() - start)
    return counts


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_one_graph_trains_every_quickstart_size_and_one_more_evaluates_them(backend):
    eager = _small(depth=1)
    model = compile_model(_small(depth=1), backend=backend)
    model.load_state_dict(eager.state_dict())
    train, train_and_eval, with_batch_1 = _train_and_eval_graphs(model, eager)
    assert (train, train_and_eval) == (1, 2)  # every size and batch: one graph per grad mode
    assert with_batch_1 == 3  # dynamo specialises size-1 dims: batch 1 gets its own graph
    assert _train_and_eval_graphs(model, eager) == [0, 0, 0]  # nothing new on a second pass


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_per_image_training_run_builds_at_most_eight_graphs(backend):
    """``patch.per_image`` training: every step packs another mix of sizes and image count into the run's one
    row bucket (quickstart: 16 rows of 196 tokens). Training steps, then evaluation at every size (batches
    of 256 and 16, and 1), as a run does: the packed trunk's one graph, plus the blocks' eval graphs."""
    from flexivit.model.packing import RowPacker

    eager = _small(depth=1, class_token=False, global_pool="avg")
    model = compile_model(_small(depth=1, class_token=False, global_pool="avg"), backend=backend)
    model.load_state_dict(eager.state_dict())
    weights = [0.4 / 196, 0.25 / 49, 0.25 / 16, 0.1 / 4]  # the quickstart's per-step mix, per image
    stream = RowPacker(sizes=list(QUICKSTART_BATCH), weights=weights, image_size=28, rows=16, seed=0,
                       patience=2).stream(0)
    start = graph_count()
    model.train(), eager.train()
    for step in range(4):
        plan = stream.plan(step)
        x, y = torch.randn(plan.num_images, 1, 28, 28), torch.randint(0, 10, (plan.num_images,))
        for m in (model, eager):
            m.zero_grad()
            F.cross_entropy(m(x, plan), y).backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), (step, name)
    assert graph_count() - start == 1  # one bucket, one graph for every step's layout
    model.eval(), eager.eval()
    with torch.no_grad():
        for patch in QUICKSTART_BATCH:
            for batch in (256, 16, 1):
                x = torch.randn(batch, 1, 28, 28)
                assert torch.allclose(model(x, patch), eager(x, patch), atol=ATOL), (patch, batch)
    assert graph_count() - start <= 8


def test_blocks_stay_compiled_when_called_one_by_one():
    """Gradient checkpointing calls the blocks one at a time: each block is compiled too."""
    eager = _small(depth=3)
    model = compile_model(_small(depth=3), backend="aot_eager")
    model.load_state_dict(eager.state_dict())
    model.set_grad_checkpointing(True)
    start = graph_count()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for m in (model, eager):
        F.cross_entropy(m(x, 7), y).backward()
    # the first block's input comes from the stem in another memory layout: 2 graphs for 3 blocks
    assert 1 <= graph_count() - start <= 2
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_inductor_logits_equal_eager_at_every_trained_size(run):
    eager, _ = load_model(run)
    model, _ = load_model(run)
    compile_model(model)
    assert token_trunk(model)._compiled_call_impl is not None
    x = _test_images()
    with torch.no_grad():
        for patch in TRAIN_SIZES:
            diff = (model.eval()(x, patch) - eager.eval()(x, patch)).abs().max().item()
            assert diff <= ATOL, (patch, diff)


def test_autocast_runs_in_the_precision_named():
    cpu = torch.device("cpu")
    a = torch.randn(4, 4)
    with autocast(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        autocast(cpu, "fp8")


def test_sweep_measures_in_the_precision_asked_for(run):
    subject = load_subject(run)
    data = eval_dataset(subject, load_eval_splits(None, subject.run_config)[1], limit=64)
    seen: set[torch.dtype] = set()
    subject.model.head.register_forward_hook(lambda module, inputs, out: seen.add(out.dtype))
    fp32 = sweep(subject, data, TRAIN_SIZES, settings=FAST, progress=False, device=torch.device("cpu"))
    assert seen == {torch.float32}  # the CPU default
    seen.clear()
    bf16 = sweep(subject, data, TRAIN_SIZES, settings=FAST, progress=False, device=torch.device("cpu"),
                 precision="bf16")
    assert seen == {torch.bfloat16}  # accuracy pass and every timed call
    for a, b in zip(fp32, bf16):
        assert a["top1"] > 0.9 and abs(a["top1"] - b["top1"]) <= 0.05
        assert a["loss"] != b["loss"]  # computed in another precision, not copied


def _eval_json(run, tmp_path, *flags: str) -> dict:
    argv = ["eval", str(run), "--out", str(tmp_path), "--limit", "64", "--batch-size", "8", "--warmup", "1",
            "--repeats", "2", "--no-progress", "--device", "cpu", *flags]
    assert main(argv) == 0
    return json.loads((tmp_path / "eval.json").read_text())


def test_eval_compile_records_compile_precision_and_threads(run, tmp_path, monkeypatch):
    monkeypatch.setattr(flexivit.eval.evaluate, "compile_model", functools.partial(compile_model, backend="aot_eager"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    compiled = _eval_json(run, tmp_path / "compiled", "--compile")
    eager = _eval_json(run, tmp_path / "eager")
    assert compiled["compile"] is True and eager["compile"] is False
    assert compiled["compiled_graphs"] == 2  # every size at batches 64 and 8, and batch 1
    assert "compiled_graphs" not in eager
    for report in (compiled, eager):
        assert report["precision"] == "fp32" and report["device"] == "cpu"
        assert report["torch_threads"] == torch.get_num_threads() and report["omp_num_threads"] == "1"
    for c, e in zip(compiled["results"], eager["results"]):
        assert c["patch_size"] == e["patch_size"] and c["top1"] == e["top1"]
        assert c["loss"] == pytest.approx(e["loss"], abs=1e-5) and c["gflops"] == e["gflops"]


@pytest.mark.slow
def test_eval_compile_with_inductor_gives_eager_accuracy(run, tmp_path):
    compiled = _eval_json(run, tmp_path / "compiled", "--compile")
    eager = _eval_json(run, tmp_path / "eager")
    assert compiled["compile"] is True and compiled["compiled_graphs"] == 2
    for c, e in zip(compiled["results"], eager["results"]):
        assert c["top1"] == e["top1"] and c["loss"] == pytest.approx(e["loss"], abs=ATOL)


@pytest.mark.slow
def test_bench_compile_smoke_counts_graphs_and_writes_results(tmp_path):
    tool = Path(__file__).parents[1] / "tools" / "bench_compile.py"
    subprocess.run([sys.executable, str(tool), "--smoke", "--backend", "aot_eager", "--out", str(tmp_path)],
                   check=True, env=subprocess_env(), capture_output=True, timeout=600)
    result = json.loads((tmp_path / "compile.json").read_text())
    assert result["graphs"] == {"train": 1, "eval64": 1, "eval1": 1, "total": 3}
    assert [r["patch_size"] for r in result["rows"]] == [2, 4, 8]
    for row in result["rows"]:
        assert all(row[k]["speedup"] > 0 and row[k]["eager_ms"] > 0 for k in ("train", "eval64", "eval1"))
    assert "| 8 | 4 | 64 |" in (tmp_path / "compile.md").read_text()  # p=8: 4 tokens, 64 images per step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_eval_sweep_defaults_to_bf16(run, tmp_path):
    report = evaluate_checkpoint(run, settings=FAST, progress=False, limit=64, device=torch.device("cuda"))
    assert report["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert report["device"].startswith("cuda") and report["compile"] is False
    assert all(r["top1"] > 0.9 for r in report["results"] if r["patch_size"] in TRAIN_SIZES)
    fp32 = evaluate_checkpoint(run, settings=FAST, progress=False, limit=64, device=torch.device("cuda"),
                               precision="fp32")
    assert fp32["precision"] == "fp32"
    assert [r["loss"] for r in fp32["results"]] != [r["loss"] for r in report["results"]]


@pytest.mark.slow
def test_train_compile_trains_the_compiled_model(tmp_path, monkeypatch):
    """`train.compile=true` compiles the model the trainer trains (aot_eager here: inductor's compile
    time is measured by tools/bench_compile.py, not paid in every CI run)."""
    import flexivit.model.compile
    from test_trainer_golden import OVERRIDES, make_data

    from flexivit.train.config import load_recipe
    from flexivit.train.loop import train

    compiled = []

    def aot_eager(model, **kwargs):
        compiled.append(model)
        return compile_model(model, backend="aot_eager")

    monkeypatch.setattr(flexivit.model.compile, "compile_model", aot_eager)
    cfg = load_recipe("fashion_mnist:smoke", [f"data.source={make_data(tmp_path / 'data')}", *OVERRIDES,
                                              "train.compile=true", "train.steps=4", "train.grad_accum=1"])
    before = graph_count()
    result = train(cfg, out_dir=tmp_path / "run")
    assert len(compiled) == 1 and graph_count() - before >= 1  # the training (and eval) graphs were built
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.val)
    keys = set(load_model(tmp_path / "run")[0].state_dict())
    assert keys == set(FlexiViT(compiled[0].config).state_dict())  # saved under plain names
