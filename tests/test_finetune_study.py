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
from flexivit.train.builders import build_data  # noqa: E402
from flexivit.train.config import load_recipe  # noqa: E402
from flexivit.experiments.runner import RECORD, RunError, Study  # noqa: E402
from flexivit.experiments.search import SearchError  # noqa: E402
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


def _side(default: dict[int, float], fixed: dict[int, float]) -> dict:
    """One task's ``collect`` rows with validation (and, 1 point lower, test) means."""
    rows = {"default": {"val": {"mean": default}, "test": {"mean": {p: v - 1 for p, v in default.items()}}}}
    for p in SIZES:
        at_p = {q: (fixed[p] if q == p else 0.0) for q in SIZES}
        rows[fs.fixed_label(p)] = {"val": {"mean": at_p}, "test": {"mean": {q: v - 1 for q, v in at_p.items()}}}
    return {"about": "", "rows": rows}


def test_each_side_chooses_its_learning_rate_on_validation_and_the_incumbent_needs_beating_by_keep():
    fixed_a = {2: 80.0, 4: 82.0, 7: 85.0, 14: 80.0}
    fixed_b = {2: 83.0, 4: 81.0, 7: 85.0, 14: 79.0}  # better at 2 on one task, worse on the other: mean decides
    default = {2: 76.0, 4: 78.0, 7: 83.5, 14: 78.0}
    found = {"1e-3": {"tops": _side(default, fixed_a), "digits": _side(default, fixed_a)},
             "2e-3": {"tops": _side({**default, 7: 83.5 + fs.KEEP + 0.1}, fixed_b),
                      "digits": _side({**default, 7: 83.5 + fs.KEEP + 0.1}, {**fixed_b, 2: 78.0})}}
    picked = fs.choose(found, SIZES, 7)
    assert picked["fixed"] == {2: "2e-3", 4: "1e-3", 7: "1e-3", 14: "1e-3"}  # 7: a tie keeps the incumbent
    assert picked["fixed_val"][2] == {"1e-3": 80.0, "2e-3": 80.5}
    # worst margins: 1e-3 at p=7 is 83.5 - 85 + 2 = 0.5 (p=2 against 2e-3's 83 on tops: 76 - 83 + 5 = -2.0)
    assert picked["default_margin"]["1e-3"] == pytest.approx(-2.0)
    assert picked["default_margin"]["2e-3"] == pytest.approx(-2.0) and picked["default"] == "1e-3"
    found["2e-3"]["tops"]["rows"]["default"]["val"]["mean"][2] = 76.0 + fs.KEEP + 0.2  # now beats it by > KEEP
    found["2e-3"]["digits"]["rows"]["default"]["val"]["mean"][2] = 76.0 + fs.KEEP + 0.2
    picked = fs.choose(found, SIZES, 7)
    assert picked["default"] == "2e-3" and picked["default_margin"]["2e-3"] == pytest.approx(-2.0 + fs.KEEP + 0.2)
    tasks = fs.chosen_tasks(found, picked, SIZES, 7)
    rows = tasks["tops"]["rows"]
    assert rows["default"]["lr"] == "2e-3" and rows["fixed p=2"]["lr"] == "2e-3" and rows["fixed p=4"]["lr"] == "1e-3"
    assert rows["fixed p=2"]["test"]["mean"][2] == 82.0  # the chosen run's test, not the other lr's
    assert [c["fixed"] for c in tasks["tops"]["targets"]] == [82.0, 81.0, 84.0, 79.0]


def test_plan_gives_every_run_its_seed_pretrained_model_size_and_own_directory(tmp_path):
    pretrained = [tmp_path / "qs-seed0", tmp_path / "qs-seed1"]
    tasks = {"tops": fs.task_sets("tops", None), "digits": fs.task_sets("digits", tmp_path / "mnist5k")}
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
        spec = run.spec()
        assert (spec.command, spec.inputs, spec.recipe, spec.sets) == ("finetune", (str(run.pretrained),), fs.RECIPE,
                                                                       run.sets)
        assert spec.name == str(run.path) and list(spec.args) == run.args()
        if run.patch is None:
            assert run.args() == [] and cfg.patch.sizes == SIZES and cfg.patch.weights == recipe.patch.weights
        else:  # plain: the recipe's 0.3x learning rate for fixed fine-tunes is undone, no pull
            assert run.args() == ["--patch-size", str(run.patch)] and cfg.patch.sizes == [run.patch]
            assert sorted(cfg.patch.eval_sizes) == SIZES and run.label == f"fixed p={run.patch}"
    with pytest.raises(SearchError, match="--mnist5k"):
        fs.task_sets("digits", None)
    searched = fs.plan(pretrained, tasks, SIZES, ["optim.lr=2e-3"], "lr2e-3")  # a --lr value: its own directory
    assert [r.path.relative_to("lr2e-3") for r in searched] == [r.path for r in runs]
    assert all(r.config().optim.lr == pytest.approx(2e-3) for r in searched)


@pytest.mark.parametrize("lrs", [["1e-3", "1e-3"], ["1e-3", "fast"], ["1e-3", "0"]])
def test_learning_rates_to_search_must_be_distinct_positive_numbers(tmp_path, capsys, lrs):
    with pytest.raises(SystemExit):
        fs.main(["--pretrained", str(tmp_path), "--tasks", "tops", "--lr", *lrs])
    assert "--lr takes distinct positive numbers" in capsys.readouterr().err


def _folder(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / str(c) / f"{i:03d}.png")
    return root


def test_digits_task_keeps_every_class_of_the_folder(tmp_path):
    folder = _folder(tmp_path / "digits", classes=3, per_class=20)
    data = build_data(load_recipe(fs.RECIPE, fs.task_sets("digits", folder)))
    assert data.num_classes == 3 and len(data.train) + len(data.val) + len(data.test) == 60
    with pytest.raises(ValueError, match="data.classes"):  # the recipe alone asks the folder for its 4 garments
        build_data(load_recipe(fs.RECIPE, [f"data.source={folder}"]))


def _started(study: Study, ft) -> None:
    """The run folder of ``ft`` as the runner leaves it once started."""
    (study.folder / ft.path).mkdir(parents=True)
    (study.folder / ft.path / RECORD).write_text(json.dumps(study.record(ft.spec())))


def test_a_run_directory_made_with_other_settings_is_refused(tmp_path):
    (same,) = [r for r in fs.plan([tmp_path / "p"], {"tops": []}, SIZES, ["train.steps=5"]) if r.patch == 7]
    (other,) = [r for r in fs.plan([tmp_path / "p"], {"tops": []}, SIZES, ["train.steps=6"]) if r.patch == 7]
    study = Study(tmp_path / "out")
    _started(study, same)
    assert study.check([same.spec()]) == {str(same.path): "fresh"}
    with pytest.raises(RunError, match="train.steps: 5 there, 6 now"):
        study.check([other.spec()])


def test_a_run_directory_fine_tuned_from_another_pretrained_run_is_refused(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    (ft,) = [r for r in fs.plan([first, second], {"tops": []}, SIZES, []) if r.patch is None and r.seed == 0]
    (swapped,) = [r for r in fs.plan([second, first], {"tops": []}, SIZES, []) if r.patch is None and r.seed == 0]
    study = Study(tmp_path / "out")
    _started(study, ft)
    study.check([ft.spec()])
    with pytest.raises(RunError, match=r"inputs: \['.*a'\] there, \['.*b'\] now"):
        study.check([swapped.spec()])


def _study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "finetune_study.py"), *args], capture_output=True,
                          text=True, env=subprocess_env(), timeout=900)


def _check_plain_report(result: dict, md: list[str]) -> None:
    """Every row at every size on both splits, and the targets read off the rows."""
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
    for label in labels:
        assert sum(line.startswith(f"| {label} |") for line in md) == 2  # the test and the validation table


@pytest.mark.slow
def test_smoke_lr_search_reports_the_chosen_runs_and_one_lr_reuses_them_as_a_plain_study(tmp_path):
    pretrained = make_run(tmp_path)  # 16 px, sizes 2/4/8: fine-tuned at 28 px on the recipe's sizes
    lrs, runs = ["1e-3", "3e-3"], tmp_path / "runs"
    common = ["--pretrained", str(pretrained), "--tasks", "tops", "--smoke"]
    done = _study(*common, "--out", str(runs), "--results", str(tmp_path / "search"), "--lr", *lrs, "--jobs", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "search.json").read_text())
    search = result["search"]
    assert search["lrs"] == lrs and search["default"] in lrs and set(search["fixed"].values()) <= set(lrs)
    for lr in lrs:
        tops = runs / f"lr{lr}" / "tops"
        saved = {f.parent.name: json.loads(f.read_text()) for f in tops.glob("*/config.json")}
        assert len(saved) == 1 + len(SIZES)
        assert all(c["optim"]["lr"] == pytest.approx(float(lr)) for c in saved.values())
        assert saved["fixed-p14-seed0"]["patch"]["sizes"] == [14] and saved["default-seed0"]["patch"]["sizes"] == SIZES
    rows = result["tasks"]["tops"]["rows"]
    for label, lr, run in [("default", search["default"], "default-seed0"),
                           *((f"fixed p={p}", search["fixed"][str(p)], f"fixed-p{p}-seed0") for p in SIZES)]:
        report = json.loads((runs / f"lr{lr}" / "tops" / run / "eval.json").read_text())
        assert rows[label]["lr"] == lr  # one seed: the row is that run's own test result
        own = {str(r["patch_size"]): 100 * r["top1"] for r in report["results"]}  # eval.json keeps fractions
        assert rows[label]["test"]["mean"] == pytest.approx(own)
    md = (tmp_path / "search.md").read_text()
    assert "chosen per side on the validation split" in md and f"| default (lr {search['default']}) |" in md

    # One --lr value is every run's lr: the plain study of that lr, whose finished runs are reused.
    plain = _study(*common, "--out", str(runs / "lr1e-3"), "--results", str(tmp_path / "plain"), "--lr", "1e-3")
    assert plain.returncode == 0 and "5 runs, 5 finished already (skipped), 0 to run" in plain.stdout, \
        plain.stderr[-3000:]
    _check_plain_report(json.loads((tmp_path / "plain.json").read_text()),
                        (tmp_path / "plain.md").read_text().splitlines())
