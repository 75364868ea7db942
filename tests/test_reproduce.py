"""The flexibility reproduction: its plan (fixed ViTs at the FlexiViT's images, a label-only FlexiViT at the
distilled one's FLOPs), then end to end at its smoke budget (trains, evaluates, writes the report, resumes,
refuses run directories made with other settings). The arithmetic itself: tests/test_budget.py."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from flexivit.experiments import budget
from flexivit.experiments import flexibility_files as files
from flexivit.experiments.flexibility import plan
from flexivit.experiments.runner import RECORD, RunError, Study

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "reproduce_flexibility.py"
_spec = importlib.util.spec_from_file_location("reproduce_flexibility", TOOL)
fr = importlib.util.module_from_spec(_spec)  # the tool's report functions
_spec.loader.exec_module(fr)

# A stand-in forward cost per patch size (GFLOPs per image) for the arithmetic tests: small patches dear.
STUB = {2: 4.0, 4: 1.0, 7: 0.3, 14: 0.08}


def _stub(cfg, patch: int) -> float:
    return STUB[patch]


def _plan(tmp_path, seeds=(0, 1), steps=400):
    runs = plan(seeds=list(seeds), small=4, large=14, sizes=[2, 4, 7, 14], extra=[f"train.steps={steps}"],
                   out=tmp_path, gflops=_stub)
    return {r.dir_name: r for r in runs}


def test_fixed_vits_are_plain_and_see_the_flexivits_images(tmp_path):
    runs = _plan(tmp_path)
    # The recipe: batch 16, token budget 16 x 196; a ViT/4 step joins 4 loader batches, a ViT/14 step 49.
    per_step = {4: 64, 14: 784}
    for seed in (0, 1):
        for suffix in ("", "-distilled"):
            flexi = runs[f"flexi{suffix}-seed{seed}"].config()
            images = sum(budget.images_by_patch(flexi).values())
            assert flexi.train.steps == 400 and images > 400 * 16  # token-budget steps join batches
            for p in (4, 14):
                fixed = runs[f"fixed-p{p}{suffix}-seed{seed}"].config()
                assert (fixed.model.base_patch_size, fixed.model.base_grid, fixed.patch.sizes) == (p, 28 // p, [p])
                seen = budget.images_by_patch(fixed)
                assert list(seen) == [p] and seen[p] == fixed.train.steps * per_step[p]
                assert abs(seen[p] - images) <= per_step[p] / 2  # equal images, to within half a step
                # The same recipe otherwise: optimiser, data and batch, token budget, seed, distillation.
                # Only the kernel's learning rate differs: a plain ViT's kernel is never resized, so it
                # learns at the full rate rather than the FlexiViT's scaled one.
                assert fixed.optim.kernel_lr_scale == 1.0
                # Its zero-shot curve uses the paper's operator, not the one the FlexiViT recipe chose.
                assert fixed.model.kernel_resize == "bilinear"
                assert (replace(fixed.optim, kernel_lr_scale=flexi.optim.kernel_lr_scale), fixed.data) == \
                    (flexi.optim, flexi.data)
                assert (fixed.train.token_budget, fixed.train.seed) == (flexi.train.token_budget, seed)
                assert fixed.distill == flexi.distill  # distilled ones keep their own base, as the FlexiViT does
    # Distilled runs learn from the label-trained ViT/4 of their own seed and start from it; all of them
    # keep their own base (the teacher's kernel and grid are resized into it).
    teacher_dir = str(tmp_path / "fixed-p4-seed1")
    for name in ("flexi-distilled", "fixed-p4-distilled", "fixed-p14-distilled"):
        run = runs[f"{name}-seed1"]
        d = run.config().distill
        assert run.teacher == "fixed-p4" and d.teacher == teacher_dir and d.init_from_teacher
        assert d.keep_student_base  # every student keeps its own base: the FlexiViT its 14x14, a ViT/p its p
        assert d.full_rank_base  # ...and the recipe's full-rank start (a no-op where the base is the teacher's size)
    assert runs["fixed-p4-seed0"].config().distill.teacher is None
    # Every teacher is listed (and so trained) before the runs that distil from it.
    order = list(runs)
    assert all(order.index(f"{r.teacher}-seed{r.seed}") < order.index(n) for n, r in runs.items() if r.teacher)


def test_label_only_flexivit_gets_the_distilled_flexivits_flops(tmp_path):
    runs = _plan(tmp_path, seeds=(3,), steps=300)
    teacher = runs["fixed-p4-seed3"].config()
    target = budget.run_gflops(runs["flexi-distilled-seed3"].config(), _stub, teacher)
    labels = budget.run_gflops(runs["flexi-seed3"].config(), _stub)
    # Teacher forwards: one ViT/4 forward (1.0 GFLOPs here) per image the student trains on.
    images = sum(budget.images_by_patch(runs["flexi-seed3"].config()).values())
    assert target == pytest.approx(labels + images * STUB[4])
    long = runs["flexi-equal-flops-seed3"]
    assert long.budget == "flops" and long.supervision == "labels"
    cfg = long.config()
    assert budget.run_gflops(cfg, _stub) >= target  # the fewest steps that reach the target ...
    cfg.train.steps -= 1
    assert budget.run_gflops(cfg, _stub) < target  # ... and one step fewer does not


def test_run_directories_made_with_other_settings_are_refused(tmp_path):
    run = _plan(tmp_path, seeds=(0,), steps=200)["fixed-p14-seed0"]
    study = Study(tmp_path)
    assert study.check([run.spec()]) == {run.dir_name: "fresh"}  # nothing there yet
    (tmp_path / run.dir_name).mkdir()
    record = study.record(run.spec())
    record["config"]["model"].pop("drop_path_rate")  # a field added since: its default there
    (tmp_path / run.dir_name / RECORD).write_text(json.dumps(record))
    study.check([run.spec()])
    steps = record["config"]["train"]["steps"]
    config = record["config"]
    changes = (("train", {**config["train"], "steps": 1800}, f"train.steps: 1800 there, {steps} now"),
               ("model", {**config["model"], "base_patch_size": 4}, "model.base_patch_size: 4 there, 14"))
    for key, value, change in changes:
        (tmp_path / run.dir_name / RECORD).write_text(json.dumps({**record, "config": {**config, key: value}}))
        with pytest.raises(RunError, match="made with other settings") as err:
            study.check([run.spec()])
        assert change in str(err.value)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)


@pytest.mark.slow
def test_smoke_reproduction_writes_all_three_files_and_resumes(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    # Two runs at a time: the distilled students must still wait for their teacher (the p=4 ViT).
    first = _run("--smoke", "--jobs", "2", "--out", str(out), "--results", str(results))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "flexi-distilled-seed0.log").exists()  # every run's output in its own log
    assert {"flexibility.md", "flexibility.json", "flexibility.png"} <= {p.name for p in results.iterdir()}
    assert (results / "flexibility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((results / "flexibility.json").read_text())
    assert report["patch_sizes"] == [2, 4, 7, 14] and report["seeds"] == [0]
    kinds = {name: c["kind"] for name, c in report["curves"].items()}
    fixed = {f"fixed-p{p}{s}/{r}": "fixed" + s for p in (4, 14) for s in ("", "-distilled") for r in ("pi", "bilinear")}
    assert kinds == {**fixed, "flexi": "flexi", "flexi-equal-flops": "flexi", "flexi-distilled": "flexi-distilled"}
    for name, curve in report["curves"].items():
        assert set(curve) >= {"kind", "train_patch_size", "resize", "top1_mean", "top1_std", "images_seen",
                              "train_gflops", "train_seconds", "supervision"}
        assert set(curve["top1_mean"]) == set(curve["top1_std"]) == {"2", "4", "7", "14"}
        assert all(0.0 <= v <= 1.0 for v in curve["top1_mean"].values())
        assert curve["resize"] == (name.split("/")[1] if curve["kind"].startswith("fixed") else None)
        family = curve["run"].removesuffix("-distilled")
        assert curve["train_patch_size"] == {"fixed-p4": 4, "fixed-p14": 14}.get(family)
        assert curve["supervision"] == ("distilled" if "distilled" in name else "labels")
        assert curve["images_seen"] > 0 and curve["train_gflops"] > 0 and curve["train_seconds"] > 0
    # Through PI-resize and through bilinear resize, a fixed ViT is the same model at its own size.
    curves = report["curves"]
    for name, p in (("fixed-p4", "4"), ("fixed-p14", "14"), ("fixed-p4-distilled", "4")):
        assert curves[f"{name}/pi"]["top1_mean"][p] == curves[f"{name}/bilinear"]["top1_mean"][p]
    # The trainer's image count is the plan's, and each fixed ViT saw its FlexiViT's images.
    budgets = report["budgets"]
    for name, b in budgets.items():
        (row,) = b["per_seed"]
        assert row["images_seen"] == sum(row["images_by_patch"].values()), name
    for suffix in ("", "-distilled"):
        images = budgets[f"flexi{suffix}"]["images_seen"]
        for p, per_step in ((4, 64), (14, 768)):  # smoke: batch 64, token budget 64 x 49
            assert abs(budgets[f"fixed-p{p}{suffix}"]["images_seen"] - images) <= per_step / 2
    assert budgets["flexi-distilled"]["train_gflops"] > budgets["flexi"]["train_gflops"]  # teacher forwards
    assert budgets["flexi-equal-flops"]["train_gflops"] >= budgets["flexi-distilled"]["train_gflops"]
    assert all(curves[t["flexi"]]["supervision"] == curves[t["baseline"]]["supervision"] for t in report["targets"])
    assert {(r["distilled"], r["labels"]) for r in report["distill_vs_labels"]} >= {
        ("flexi-distilled", "flexi"), ("flexi-distilled", "flexi-equal-flops")}
    text = (results / "flexibility.md").read_text()
    assert "| flexi |" in text and "| flexi-equal-flops |" in text

    again = _run("--smoke", "--out", str(out), "--results", str(results))  # resumable: nothing retrained
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished already, skipped") == 7
    assert json.loads((results / "flexibility.json").read_text())["curves"] == report["curves"]

    other = _run("--smoke", "--steps", "31", "--out", str(out), "--results", str(results))
    assert other.returncode == 2 and "fixed-p4-seed0 was made with other settings (train.steps: " in other.stderr

    # --rerun: only the named row and its teacher train again, into the report in place of their old values.
    for gone in ("fixed-p4-seed0", "flexi-distilled-seed0"):
        __import__("shutil").rmtree(out / gone)
    rerun = _run("--smoke", "--rerun", "flexi-distilled", "--out", str(out), "--results", str(results))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(l.split(":")[0] for l in rerun.stdout.splitlines() if ": started, log" in l) == [
        "fixed-p4-seed0", "flexi-distilled-seed0"]
    merged = json.loads((results / "flexibility.json").read_text())
    assert [r["rows"] for r in merged["reruns"]] == [["flexi-distilled"]] and merged["reruns"][0]["git"]["commit"]
    assert sorted(*merged["reruns"][0]["trained_at"].values()) == ["fixed-p4-seed0", "flexi-distilled-seed0"]
    assert list(merged["curves"]) == list(report["curves"])  # the table keeps its order
    assert {k: v for k, v in merged["curves"].items() if k != "flexi-distilled"} == {
        k: v for k, v in report["curves"].items() if k != "flexi-distilled"}
    assert merged["budgets"]["flexi-distilled"]["per_seed"][0]["train_seconds"] != \
        report["budgets"]["flexi-distilled"]["per_seed"][0]["train_seconds"]  # a new run's own record
    assert "Rerun: flexi-distilled" in (results / "flexibility.md").read_text()
    assert _run("--rederive", "--results", str(results)).returncode == 0  # still re-derivable from its records
    for bad, said in ((["--steps", "31"], "--steps differ"), (["--out", str(tmp_path / "elsewhere")], "--out differ"),
                      (["--rerun", "flexi-typo"], "not a row of the plan")):
        args = ["--smoke", "--rerun", "flexi-distilled", "--out", str(out), "--results", str(results), *bad]
        refused = _run(*args)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr[-2000:]

    # An interim report while a run still trains: the finished ones are reported, the unfinished one is named.
    (out / "flexi-equal-flops-seed0" / "eval.json").rename(out / "flexi-equal-flops-seed0" / "eval.json.bak")
    interim = _run("--smoke", "--finished-only", "--out", str(out), "--results", str(results))
    assert interim.returncode == 0, interim.stderr[-3000:]
    assert "finished already" not in interim.stdout and ": started, log" not in interim.stdout  # nothing trained
    partial = json.loads((results / "flexibility.json").read_text())
    assert partial["unfinished"] == ["flexi-equal-flops-seed0"] and "flexi-equal-flops" not in partial["curves"]
    # (The rerun above retrained two runs: the same top-1 on this deterministic CPU, other wall times.)
    assert {k: v["top1_mean"] for k, v in report["curves"].items() if k != "flexi-equal-flops"} == {
        k: v["top1_mean"] for k, v in partial["curves"].items()}
    assert [r["labels"] for r in partial["distill_vs_labels"]] == [
        r["labels"] for r in report["distill_vs_labels"] if r["labels"] != "flexi-equal-flops"]
    assert "Interim report" in (results / "flexibility.md").read_text()


def test_one_seed_reports_no_spread_and_several_seeds_their_sample_std(tmp_path):
    runs = [r for r in plan(seeds=[0, 1], small=4, large=14, sizes=[2, 4, 7, 14], extra=[], out=tmp_path,
                               gflops=_stub) if r.name == "flexi"]
    spent = {r.dir_name: {"steps": 10, "images_by_patch": {"2": 5}, "images_seen": 5, "train_gflops": 1.0,
                          "train_seconds": 60.0} for r in runs}
    per_run = {r.dir_name: {"flexi": {p: top1 for p in ("2", "4", "7", "14")}}
               for r, top1 in zip(runs, (0.5, 0.7))}
    one = fr.summarise(runs[:1], per_run, spent, [2, 4, 7, 14], [0])["curves"]["flexi"]
    two = fr.summarise(runs, per_run, spent, [2, 4, 7, 14], [0, 1])["curves"]["flexi"]
    assert one["top1_mean"]["4"] == 0.5 and one["top1_std"]["4"] is None and one["seeds"] == [0]
    assert two["top1_mean"]["4"] == pytest.approx(0.6) and two["top1_std"]["4"] == pytest.approx(0.02 ** 0.5)
    assert two["seeds"] == [0, 1]
    assert files._pm(0.5, None) == "50.0" and files._pm(0.6, 0.1414) == "60.0 ± 14.1"


def _report(tmp_path, seeds=(0, 1)):
    """A report made by the tool's own functions from made-up accuracies and the plan's (stub) budgets."""
    from flexivit.experiments import flexibility_report as rep

    runs = list(_plan(tmp_path, seeds=seeds).values())
    by_dir = {r.dir_name: r for r in runs}
    spent = {r.dir_name: {**rep.planned_budget(r, by_dir, _stub), "images_seen": 1000 + r.seed,
                          "train_seconds": 60.0 + 7 * r.seed, **rep.run_record(r)} for r in runs}
    per_run = {}
    for i, r in enumerate(runs):  # distinct accuracies per run, seed and size
        names = [r.name] if not r.kind.startswith("fixed") else [f"{r.name}/pi", f"{r.name}/bilinear"]
        per_run[r.dir_name] = {n: {str(p): (i * 7 + j * 3 + r.seed * 11 + p) % 89 / 100 for p in (2, 4, 7, 14)}
                               for j, n in enumerate(names)}
    result = fr.summarise(runs, per_run, spent, [2, 4, 7, 14], list(seeds))
    result.update(command="python tools/reproduce_flexibility.py --steps 400", steps=400, eval_images=10,
                  unfinished=[], train_minutes=sum(s["train_seconds"] for s in spent.values()) / 60)
    result["targets"] = fr.target_checks(result)
    result["distill_vs_labels"] = fr.distill_vs_labels(result, fr.comparisons(4, 14))
    return result, runs, per_run


def test_a_report_records_each_base_and_rederives_from_its_per_seed_records(tmp_path):
    from flexivit.experiments.flexibility_report import rederive

    result, runs, per_run = _report(tmp_path)
    for name, curve in result["curves"].items():  # every row names the base it trained
        fixed = curve["kind"].startswith("fixed")
        assert curve["base_patch_size"] == (curve["train_patch_size"] if fixed else 14), name
        assert curve["base_grid"] == (28 // curve["base_patch_size"] if fixed else 7)  # a ViT/p's own token grid
        assert (curve["kernel_resize"], curve["kernel_lr_scale"]) == (("bilinear", 1.0) if fixed else ("area", 0.02))
    row = result["budgets"]["fixed-p14"]["per_seed"][1]
    assert "model.base_patch_size=14" in row["overrides"] and row["recipe"] == "fashion_mnist"
    # The target's value against an independent reading of the per-seed values.
    seeds = {r.seed for r in runs}
    mean = lambda run, curve, p: sum(per_run[f"{run}-seed{s}"][curve][p] for s in seeds) / len(seeds)  # noqa: E731
    (check,) = [t for t in result["targets"] if t["baseline"] == "fixed-p4/pi" and t["flexi"] == "flexi"
                and t["target"].startswith("within")]
    assert check["value"] == pytest.approx(100 * (mean("flexi", "flexi", "4") - mean("fixed-p4", "fixed-p4/pi", "4")))
    (dvl,) = [r for r in result["distill_vs_labels"] if r["labels"] == "flexi"]
    teacher = result["budgets"]["fixed-p4"]["train_gflops"]
    assert dvl["teacher_train_gflops"] == teacher
    assert dvl["train_gflops_ratio_with_teacher"] == pytest.approx(
        (result["budgets"]["flexi-distilled"]["train_gflops"] + teacher) / result["budgets"]["flexi"]["train_gflops"])

    rebuilt, diffs = rederive(json.loads(json.dumps(result)), runs, _stub, 4, 14)
    assert diffs == [] and json.loads(json.dumps(rebuilt)) == json.loads(json.dumps(result))

    # A file written before the records existed (no per-seed top-1, no base): the base comes from the plan.
    old = json.loads(json.dumps(result))
    for curve in old["curves"].values():
        for key in ("top1_per_seed", "base_patch_size", "base_grid", "kernel_resize", "kernel_lr_scale"):
            curve.pop(key)
    rebuilt, diffs = rederive(old, runs, _stub, 4, 14)
    assert diffs == [] and rebuilt["curves"]["fixed-p14/pi"]["base_patch_size"] == 14

    # Any stored value its records do not give is named.
    bad = json.loads(json.dumps(result))
    bad["curves"]["flexi"]["top1_per_seed"]["4"][0] += 0.05
    bad["budgets"]["fixed-p4"]["per_seed"][0]["steps"] += 1
    _, diffs = rederive(bad, runs, _stub, 4, 14)
    named = {d.split(":")[0] for d in diffs}
    assert {"curves.flexi.top1_mean.4", "budgets.fixed-p4.per_seed[0].steps"} <= named
    assert any(d.startswith("targets[") for d in diffs)


def test_the_committed_report_records_every_baselines_base():
    report = json.loads((ROOT / "docs" / "results" / "flexibility.json").read_text())
    for name, curve in report["curves"].items():
        if curve["kind"].startswith("fixed"):
            assert curve["base_patch_size"] == curve["train_patch_size"], name
        for row in report["budgets"][curve["run"]]["per_seed"]:
            assert f"model.base_patch_size={curve['base_patch_size']}" in row["overrides"] or (
                not curve["kind"].startswith("fixed") and curve["base_patch_size"] == 14), name
    assert report["split"] == "test" and "2fee273" in report["records_note"]


@pytest.mark.slow
def test_rederive_rebuilds_the_committed_report(tmp_path):
    source = ROOT / "docs" / "results" / "flexibility.json"
    (tmp_path / "flexibility.json").write_text(source.read_text())
    done = _run("--rederive", "--results", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((tmp_path / "flexibility.json").read_text()) == json.loads(source.read_text())
    assert (tmp_path / "flexibility.md").read_text() == (ROOT / "docs" / "results" / "flexibility.md").read_text()
    assert (tmp_path / "flexibility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the plot is redrawn too
    stored = json.loads(source.read_text())
    stored["budgets"]["fixed-p14"]["per_seed"][2]["train_gflops"] *= 1.01
    (tmp_path / "flexibility.json").write_text(json.dumps(stored))
    done = _run("--rederive", "--results", str(tmp_path))
    assert done.returncode == 1 and "budgets.fixed-p14.per_seed[2].train_gflops" in done.stdout


def test_a_rerun_replaces_only_its_rows_and_records_itself():
    def curve(run: str, top1: float) -> dict:
        return {"kind": "flexi", "run": run, "budget": "images", "supervision": "labels", "resize": None,
                "top1_mean": {"4": top1}, "top1_std": {"4": None}, "images_seen": 1.0, "train_gflops": 1.0,
                "train_seconds": 60.0}

    def budgets(*names: str, seconds: float) -> dict:
        return {n: {"per_seed": [{"seed": 0, "train_seconds": seconds}]} for n in names}

    stored = {"patch_sizes": [4], "curves": {"a": curve("a", 0.5), "b": curve("b", 0.6), "c": curve("c", 0.7)},
              "budgets": budgets("a", "b", "c", seconds=60.0), "targets": [], "distill_vs_labels": []}
    fresh = {"curves": {"b": curve("b", 0.9)}, "budgets": budgets("b", seconds=120.0)}
    merged = fr.merge_rerun(stored, fresh, ["b"], {"command": "x --rerun b"}, [])
    assert list(merged["curves"]) == ["a", "b", "c"] and merged["curves"]["b"]["top1_mean"]["4"] == 0.9
    assert merged["curves"]["a"] == stored["curves"]["a"] and merged["budgets"]["b"]["per_seed"][0]["train_seconds"] == 120
    assert merged["train_minutes"] == 4.0 and merged["reruns"] == [{"command": "x --rerun b", "rows": ["b"]}]
    assert stored["curves"]["b"]["top1_mean"]["4"] == 0.6  # the stored report is not modified
    again = fr.merge_rerun(merged, fresh, ["b"], {"command": "y"}, [])
    assert [r["command"] for r in again["reruns"]] == ["x --rerun b", "y"]
    with pytest.raises(ValueError, match=r"did not finish \['c'\]"):
        fr.merge_rerun(stored, fresh, ["c"], {}, [])
