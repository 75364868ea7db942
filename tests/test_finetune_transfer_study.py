"""tools/finetune_transfer_study.py: the arms it plans resolve to the configs they name, the cheap arm keeps to a
quarter of the plain fixed fine-tune at 7's GFLOPs, and the issue's targets are checked on made-up test means."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import finetune_transfer_study as ts  # noqa: E402

KEEP = ["finetune.fixed_others=0.5", "finetune.consistency=1", "finetune.consistency_share=0.5"]
FORWARD = {2: 0.1165, 4: 0.0218, 7: 0.00666, 14: 0.00169}.__getitem__  # the micro model's forward GFLOPs per image


def test_each_arm_resolves_to_the_fine_tune_it_names():
    arms = ts.arm_runs(["train.seed=1"], KEEP, [2.0, 1.0], [14, 7], [2, 4, 7, 14], 50)
    assert list(arms) == ["fixed-p2", "fixed-p4", "fixed-p7", "fixed-p14", "flexible", "keep-p14", "keep-p7",
                          "cheap-p14", "keep-p14-scale1", "keep-p7-scale1", "cheap-p14-scale1"]
    assert ts.resolved(*arms["keep-p7-scale1"]).optim.lr == pytest.approx(4e-3)
    assert ts.resolved(*arms["cheap-p14-scale1"]).optim.lr == pytest.approx(4e-3)
    for p in (2, 4, 7, 14):
        cfg = ts.resolved(*arms[f"fixed-p{p}"])
        assert cfg.patch.sizes == [p] and cfg.optim.lr == pytest.approx(ts.FIXED_LR[p])
        assert cfg.finetune.consistency == 0 and cfg.optim.pull == 0 and cfg.train.seed == 1
    flexible = ts.resolved(*arms["flexible"])
    assert flexible.patch.sizes == [2, 4, 7, 14] and flexible.optim.lr == pytest.approx(4e-3)
    for p in (14, 7):
        cfg = ts.resolved(*arms[f"keep-p{p}"])
        assert cfg.patch.default == p and cfg.patch.sizes == [2, 4, 7, 14] and cfg.optim.lr == pytest.approx(8e-3)
        assert cfg.patch.weights[cfg.patch.sizes.index(p)] == 0.5 and cfg.finetune.consistency == 1
    cheap = ts.resolved(*arms["cheap-p14"])
    assert cheap.train.steps == 50 and cheap.patch.default == 14
    assert cheap.optim.warmup_steps == round(50 * 50 / 400)  # the recipe's warm-up share of its 400 steps


def test_the_cheap_arm_takes_the_most_steps_within_a_quarter_of_the_fixed_fine_tune_at_7():
    arms = ts.arm_runs(["train.seed=0"], KEEP, [2.0], [14], [2, 4, 7, 14], None)
    steps = ts.cheap_steps(arms["keep-p14"][0], arms["fixed-p7"][0], FORWARD)
    budget = ts.finetune_gflops(ts.resolved(*arms["fixed-p7"]), FORWARD) / 4
    cost = lambda n: ts.finetune_gflops(ts.resolved([*arms["keep-p14"][0], f"train.steps={n}"], 14), FORWARD)  # noqa: E731
    assert cost(steps) <= budget < cost(steps + 1)


def _row(test, gflops):
    return {"test": {"mean": {str(p): v for p, v in zip((2, 4, 7, 14), test)}}, "gflops": gflops}


def test_the_targets_hold_each_arm_to_the_issues_bounds():
    rows = {"fixed-p2": _row((88, 50, 20, 10), 2200), "fixed-p4": _row((60, 91, 45, 15), 1700),
            "fixed-p7": _row((23, 48, 95, 17), 1500), "fixed-p14": _row((10, 11, 9, 94.5), 1600),
            "flexible": _row((82, 85, 91, 89), 1700),
            "keep-p14": _row((85, 89.5, 93.5, 93.6), 2100),  # 7 below 14; 4 within 2 of fixed p4? no (-1.5 ok)
            "keep-p7": _row((78.9, 86, 94.5, 90), 2000),  # p2 3.1 below flexible: missed
            "cheap-p14": _row((80, 86, 92, 91), 370)}
    checks = {(c["arm"], c["target"], c["size"]): c for c in ts.targets(rows, [14, 7], [2, 4, 7, 14])}
    assert checks["keep-p14", "at p minus at 14", 7]["met"] is False  # 93.5 < 93.6
    assert checks["keep-p14", "minus plain fixed at p", 4]["value"] == pytest.approx(-1.5)
    assert checks["keep-p14", "minus plain fixed at p", 4]["met"] is True
    assert checks["keep-p14", "1/4 minus its GFLOPs / plain fixed at p's", 7]["met"] is False  # 2100 / 1500
    assert checks["cheap-p14", "1/4 minus its GFLOPs / plain fixed at p's", 7]["met"] is True  # 370 / 1500
    assert checks["keep-p7", "minus flexible default", 2]["met"] is False
    assert checks["keep-p7", "own size minus plain fixed", 7]["value"] == pytest.approx(-0.5)
    assert checks["keep-p14", "own size minus plain fixed", 14]["met"] is True  # -0.9
    assert checks["cheap-p14", "own size minus plain fixed", 14]["met"] is False  # -3.5


def test_each_kept_arm_takes_the_lr_with_the_better_worst_size_over_tasks_and_the_first_unless_beaten():
    worst = {"tops": {"keep-p14": 66.0, "keep-p14-scale1": 67.5, "keep-p7": 70.0, "keep-p7-scale1": 70.2,
                      "cheap-p14": 40.0, "cheap-p14-scale1": 45.0},
             "digits": {"keep-p14": 88.0, "keep-p14-scale1": 87.0, "keep-p7": 85.0, "keep-p7-scale1": 85.3,
                        "cheap-p14": 30.0, "cheap-p14-scale1": 29.0}}
    # keep-p14: 77.0 vs 77.25 (+0.25 < 0.5: the first stays); keep-p7: +0.25, stays; cheap: 35.0 vs 37.0 -> 1
    assert ts.choose_scales(worst, [2.0, 1.0]) == {"keep-p14": 2.0, "keep-p7": 2.0, "cheap-p14": 1.0}
