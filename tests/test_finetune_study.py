"""tools/finetune_study.py: the target arithmetic, the plan of fine-tunes and their overrides, the digits task's
folder, the settings check of existing runs, then the tool end to end at its smoke budget."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import finetune_study as fs  # noqa: E402
from flexivit.builders import build_data  # noqa: E402
from flexivit.config import load_recipe  # noqa: E402
from flexivit.search import SearchError  # noqa: E402
from tiny_run import make_run, subprocess_env  # noqa: E402

SIZES = [2, 4, 7, 14]


def _rows(default: dict[int, float], fixed: dict[int, float]) -> dict:
    rows = {"default": {"test": {"mean": default}}}
    rows.update({fs.fixed_label(p): {"test": {"mean": {q: (fixed[p] if q == p else 0.0) for q in SIZES}}}
                 for p in SIZES})
    return rows


def test_targets_hold_the_chosen_size_to_two_points_and_the_others_to_five():
    fixed = {2: 80.0, 4: 82.0, 7: 85.0, 14: 80.0}
    met = fs.targets(_rows({2: 75.0, 4: 77.5, 7: 83.0, 14: 81.0}, fixed), SIZES, 7)
    assert [c["gap"] for c in met] == pytest.approx([-5.0, -4.5, -2.0, 1.0])
    assert [c["bound"] for c in met] == [-5.0, -5.0, -2.0, -5.0]
    assert all(c["met"] for c in met)  # both bounds reached exactly, and a default above its baseline
    missed = fs.targets(_rows({2: 74.9, 4: 80.0, 7: 82.9, 14: 76.0}, fixed), SIZES, 7)
    assert [c["met"] for c in missed] == [False, True, False, True]  # -5.1 at 2; -2.1 at 7 (within 5 is not enough)
    elsewhere = fs.targets(_rows({2: 77.5, 4: 77.5, 7: 82.9, 14: 76.0}, fixed), SIZES, 2)  # --size moves the bound
    assert [c["met"] for c in elsewhere] == [False, True, True, True]


def test_plan_gives_every_run_its_seed_pretrained_model_size_and_own_directory(tmp_path):
    pretrained = [tmp_path / "qs-seed0", tmp_path / "qs-seed1"]
    tasks = {"tops": fs.task_overrides("tops", None), "digits": fs.task_overrides("digits", tmp_path / "mnist5k")}
    runs = fs.plan(pretrained, tasks, SIZES, ["train.steps=5"])
    assert len(runs) == 2 * 2 * (1 + len(SIZES)) and len({r.path for r in runs}) == len(runs)
    recipe = load_recipe(fs.RECIPE)
    for run in runs:
        cfg = run.config()
        assert run.pretrained == pretrained[run.seed] and cfg.train.seed == run.seed and cfg.train.steps == 5
        assert cfg.optim.lr == pytest.approx(recipe.optim.lr) and cfg.optim.pull == recipe.optim.pull == 0
        if run.task == "digits":
            assert cfg.data.source == str((tmp_path / "mnist5k").resolve()) and cfg.data.classes is None
        else:
            assert cfg.data.source == "fashion-mnist" and cfg.data.classes == recipe.data.classes
        if run.patch is None:
            assert run.args() == [] and cfg.patch.sizes == SIZES and cfg.patch.weights == recipe.patch.weights
        else:  # plain: the recipe's 0.3x learning rate for fixed fine-tunes is undone, no pull
            assert run.args() == ["--patch-size", str(run.patch)] and cfg.patch.sizes == [run.patch]
            assert sorted(cfg.patch.eval_sizes) == SIZES and run.label == f"fixed p={run.patch}"
    with pytest.raises(SearchError, match="--mnist5k"):
        fs.task_overrides("digits", None)


def _folder(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / str(c) / f"{i:03d}.png")
    return root


def test_digits_task_keeps_every_class_of_the_folder(tmp_path):
    folder = _folder(tmp_path / "digits", classes=3, per_class=20)
    data = build_data(load_recipe(fs.RECIPE, fs.task_overrides("digits", folder)))
    assert data.num_classes == 3 and len(data.train) + len(data.val) + len(data.test) == 60
    with pytest.raises(ValueError, match="data.classes"):  # the recipe alone asks the folder for its 4 garments
        build_data(load_recipe(fs.RECIPE, [f"data.source={folder}"]))


def test_a_run_directory_made_with_other_settings_is_refused(tmp_path):
    (same,) = [r for r in fs.plan([tmp_path / "p"], {"tops": []}, SIZES, ["train.steps=5"]) if r.patch == 7]
    (other,) = [r for r in fs.plan([tmp_path / "p"], {"tops": []}, SIZES, ["train.steps=6"]) if r.patch == 7]
    (tmp_path / "out" / same.path).mkdir(parents=True)
    same.config().save(tmp_path / "out" / same.path / "config.json")
    fs.check_settings(same, tmp_path / "out")
    with pytest.raises(SearchError, match="train.steps: 5 -> 6"):
        fs.check_settings(other, tmp_path / "out")


def test_a_run_directory_fine_tuned_from_another_pretrained_run_is_refused(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    (ft,) = [r for r in fs.plan([first, second], {"tops": []}, SIZES, []) if r.patch is None and r.seed == 0]
    (swapped,) = [r for r in fs.plan([second, first], {"tops": []}, SIZES, []) if r.patch is None and r.seed == 0]
    (tmp_path / "out" / ft.path).mkdir(parents=True)
    (tmp_path / "out" / ft.path / fs.PRETRAINED_FILE).write_text(f"{first}\n")
    fs.check_settings(ft, tmp_path / "out")
    with pytest.raises(SearchError, match="fine-tuned from .*a, not .*b"):
        fs.check_settings(swapped, tmp_path / "out")


def _study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "finetune_study.py"), *args], capture_output=True,
                          text=True, env=subprocess_env(), timeout=900)


@pytest.mark.slow
def test_smoke_study_reports_every_row_and_target_and_resumes(tmp_path):
    pretrained = make_run(tmp_path)  # 16 px, sizes 2/4/8: fine-tuned at 28 px on the recipe's sizes
    args = ["--pretrained", str(pretrained), "--tasks", "tops", "--smoke", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "finetune")]
    done = _study(*args, "--jobs", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "finetune.json").read_text())
    labels = ["default", *(f"fixed p={p}" for p in SIZES)]
    assert list(result["tasks"]) == ["tops"] and result["seeds"] == [0] and result["sizes"] == SIZES
    rows = result["tasks"]["tops"]["rows"]
    assert list(rows) == labels
    for r in rows.values():
        for split in ("test", "val"):
            assert sorted(map(int, r[split]["mean"])) == SIZES
            assert all(0 <= v <= 100 for v in r[split]["mean"].values())
        assert r["images_seen"] > 0 and r["train_gflops"] > 0 and r["test_images"] == 200
    checks = result["tasks"]["tops"]["targets"]
    assert [(c["size"], c["bound"]) for c in checks] == [(2, -5), (4, -5), (7, -2), (14, -5)]
    for c in checks:
        assert c["default"] == rows["default"]["test"]["mean"][str(c["size"])]
        assert c["fixed"] == rows[f"fixed p={c['size']}"]["test"]["mean"][str(c["size"])]
    md = (tmp_path / "finetune.md").read_text().splitlines()
    for label in labels:
        assert sum(line.startswith(f"| {label} |") for line in md) == 2  # the test and the validation table
    runs = tmp_path / "runs" / "tops"
    assert json.loads((runs / "fixed-p14-seed0" / "config.json").read_text())["patch"]["sizes"] == [14]
    assert json.loads((runs / "default-seed0" / "config.json").read_text())["patch"]["sizes"] == SIZES
    again = _study(*args)
    assert again.returncode == 0 and "5 finished already (skipped), 0 to run" in again.stdout
