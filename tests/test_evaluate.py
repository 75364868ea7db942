"""The patch-size sweep: accuracies as evaluated one size at a time, counted FLOPs, report files, CLI."""

import json
import struct

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from flexivit import FlexiViT
from flexivit.cli.main import main
from flexivit.data.sources import collate, from_arrays
from flexivit.eval.evaluate import evaluate_checkpoint, eval_dataset, format_table, load_eval_splits, sweep
from flexivit.eval.measure import MeasureSettings, count_gflops
from flexivit.eval.report import pareto_front, plot_series, save_plot, write_report
from flexivit.eval.subjects import load_subject, resolve_patch_sizes
from tiny_run import CLASSES, TRAIN_SIZES, make_run, synthetic

FAST = MeasureSettings(batch_size=8, warmup=1, repeats=3)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def report(run):
    return evaluate_checkpoint(run, patch_sizes="all", baselines=[f"{run}:4"], settings=FAST, progress=False)


def _accuracy_alone(model: torch.nn.Module, dataset, patch: int) -> float:
    """Top-1 at one patch size with a plain loop: one image at a time, no sweep machinery."""
    hits = 0
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=1, collate_fn=collate):
            hits += int(model(batch["image"], patch).argmax(dim=1).item() == batch["label"].item())
    return hits / len(dataset)


def test_sweep_accuracy_equals_separate_evaluation_and_flops_grow_with_tokens(run):
    subject = load_subject(run)
    _, splits = load_eval_splits(None, subject.run_config)
    data = eval_dataset(subject, splits)
    rows = sweep(subject, data, [1, 2, 4, 8, 16], settings=FAST, progress=False, eval_batch_size=64)
    for row in rows:
        assert row["top1"] == pytest.approx(_accuracy_alone(subject.model, data, row["patch_size"]), abs=1e-12)
        assert row["n"] == len(data) == 200 and "top5" in row  # 6 classes > 5
    assert all(r["top1"] > 0.9 for r in rows if r["patch_size"] in TRAIN_SIZES)  # the model really learned
    by_tokens = sorted(rows, key=lambda r: r["tokens"])
    assert [r["tokens"] for r in by_tokens] == [1, 4, 16, 64, 256]
    gflops = [r["gflops"] for r in by_tokens]
    assert all(a < b for a, b in zip(gflops, gflops[1:])), gflops
    for r in rows:
        assert r["img_per_s"] > 0 and r["latency_ms"] > 0 and r["peak_mem_mb"] > 0
        assert r["params"] == sum(p.numel() for p in subject.model.parameters())
        assert r["params_fixed"] == sum(p.numel() for p in subject.model.to_fixed(r["patch_size"]).parameters())


def test_flop_count_includes_fused_attention():
    """The CPU's fused attention is counted: the same total as the explicit q@k and attn@v matmuls."""
    model = FlexiViT(img_size=16, base_patch_size=8, base_grid=4, in_chans=1, num_classes=3, embed_dim=32,
                     depth=2, num_heads=2).eval()
    x = torch.randn(1, 1, 16, 16)
    fused = count_gflops(lambda inp: model(inp, 2), x)
    for block in model.blocks:
        block.attn.fused_attn = False
    assert fused == pytest.approx(count_gflops(lambda inp: model(inp, 2), x), rel=1e-9)
    tokens, dim, depth = 64, 32, 2
    attention = depth * 2 * (2 * tokens * tokens * dim)  # q@k^T and attn@v, 2 FLOPs per multiply-add
    assert fused * 1e9 > attention


def test_a_model_of_some_of_the_datas_classes_is_evaluated_on_those(run, tmp_path):
    images, labels = synthetic(40, seed=7)
    labels[:10] = len(CLASSES)  # ten images of a class the model does not know
    wider = from_arrays(images, labels, [*CLASSES, "unknown"])
    datasets.DatasetDict({"train": wider, "validation": wider, "test": wider}).save_to_disk(str(tmp_path / "wider"))
    report = evaluate_checkpoint(run, data=f"hf:{tmp_path / 'wider'}", patch_sizes=[4], settings=FAST,
                                 progress=False)
    assert report["n"] == 30 and report["results"][0]["top1"] > 0.9


def test_report_files_plot_one_point_per_size_and_baselines(report, tmp_path):
    sizes = [r["patch_size"] for r in report["results"]]
    assert sizes == [1, 2, 4, 8, 16]  # 'all': every size that tiles 16 px
    files = write_report(report, tmp_path)
    assert files["png"].read_bytes()[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", files["png"].read_bytes()[16:24])
    assert width > 500 and height > 200
    saved = json.loads(files["json"].read_text())
    for key in ("checkpoint", "data", "results", "peak_mem_kind", "device", "pareto", "baselines"):
        assert key in saved
    assert saved["peak_mem_kind"] == "cpu_tensor_peak"
    assert saved["split"] == "test"  # `flexivit eval` reports on test; settings are chosen on validation
    for row in saved["results"]:
        for key in ("patch_size", "tokens", "top1", "top5", "loss", "gflops", "params", "img_per_s",
                    "latency_ms", "peak_mem_mb"):
            assert key in row
    series = plot_series(report)
    main_series = [s for s in series if not s.baseline]
    assert {s.cost for s in main_series} == {"gflops", "latency_ms"}
    assert all(len(s.points) == len(sizes) for s in main_series)
    assert [len(s.points) for s in series if s.baseline] == [1, 1]  # the p4 baseline on each panel
    artists = save_plot(report, tmp_path / "again.png")
    for cost, collections in artists.items():
        assert [len(c.get_offsets()) for c in collections] == [len(sizes), 1]
    assert "| patch |" in files["md"].read_text() and "Baseline" in files["md"].read_text()


def test_pareto_front_on_crafted_points():
    rows = [
        {"patch_size": 2, "gflops": 4.0, "top1": 0.90},
        {"patch_size": 4, "gflops": 1.0, "top1": 0.85},
        {"patch_size": 5, "gflops": 1.5, "top1": 0.80},  # dominated by p4
        {"patch_size": 8, "gflops": 0.3, "top1": 0.70},
        {"patch_size": 9, "gflops": 0.3, "top1": 0.60},  # same cost as p8, less accurate
    ]
    assert pareto_front(rows, "gflops") == [8, 4, 2]


def test_format_table_without_costs_keeps_the_training_columns():
    table = format_table([{"patch_size": 4, "stride": 4, "tokens": 49, "top1": 0.5, "loss": 1.0}])
    assert table.splitlines()[0] == "| patch | stride | tokens | top-1 (%) | loss |"
    assert table.splitlines()[2] == "| 4 | 4 | 49 | 50.00 | 1.0000 |"


def test_patch_size_specs():
    valid = [1, 2, 4, 8, 16]
    assert resolve_patch_sizes("all", valid, image_size=16) == valid
    assert resolve_patch_sizes("8,2", valid, image_size=16) == [2, 8]
    assert resolve_patch_sizes(None, valid, [2, 4], image_size=16) == [2, 4]
    with pytest.raises(ValueError, match="^patch size 3 does not tile a 16x16 image; valid patch sizes: 1, 2, 4, 8, 16$"):
        resolve_patch_sizes("3,4", valid, image_size=16)
    with pytest.raises(ValueError, match="^patch size 4 cannot be used by this model .*; valid patch sizes: 8$"):
        resolve_patch_sizes("4", [8], image_size=16)  # an export runs at its one size
    with pytest.raises(ValueError, match="no patch size given; valid patch sizes: 1, 2"):
        resolve_patch_sizes(",", valid, image_size=16)
    with pytest.raises(ValueError, match="4,7,14"):
        resolve_patch_sizes("four", valid, image_size=16)


def test_eval_cli_writes_report_and_prints_the_budget_choice(run, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", str(run), "--patch-sizes", "2,4,8", "--out", str(out), "--no-progress", "--batch-size", "8",
               "--warmup", "1", "--repeats", "3", "--min-accuracy", "95%"])
    stdout = capsys.readouterr().out
    assert rc == 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["data"].startswith("hf:")  # the run's dataset, from its config.json
    assert [r["patch_size"] for r in saved["results"]] == [2, 4, 8]
    assert saved["choice"]["patch_size"] == 8  # all three reach 95%: the cheapest
    assert "chosen patch size: 8" in stdout and "cheapest" in stdout
    assert (out / "eval.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "args,message",
    [
        (["--patch-sizes", "3"], "valid patch sizes: 1, 2, 4, 8, 16"),
        (["--max-gflops", "1e-9"], "no patch size meets GFLOPs <= 1e-09"),
        (["--min-accuracy", "1.5"], "a fraction in [0, 1]"),
        (["--data", "OTHER"], "but the data has"),
    ],
)
def test_eval_cli_bad_input(run, tmp_path, capsys, args, message):
    if args[1] == "OTHER":  # a dataset whose classes are not the model's
        images, labels = synthetic(8, seed=5)
        other = from_arrays(images, labels % 2, ["cat", "dog"])
        # Validation shipped too: 8 images are too few to carve a stratified one from.
        datasets.DatasetDict({"train": other, "validation": other, "test": other}).save_to_disk(str(tmp_path / "other"))
        args = ["--data", f"hf:{tmp_path / 'other'}"]
    rc = main(["eval", str(run), "--out", str(tmp_path), "--no-progress", "--batch-size", "4", "--warmup", "0",
               "--repeats", "1", "--patch-sizes", "8", *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_eval_cli_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a model")
    assert main(["eval", str(bogus), "--no-progress"]) == 2
    assert "not a readable safetensors model file" in capsys.readouterr().err
