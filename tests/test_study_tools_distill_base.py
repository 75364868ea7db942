"""tools/distill_base_study.py: the runs it plans (teachers first, each student from its seed's teacher) and the
rule written before its runs, applied to run folders written here (no training)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

from test_study_tools_per_image import _finished

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import distill_base_study  # noqa: E402


def test_teachers_come_first_and_each_student_distils_from_its_seeds_teacher(tmp_path):
    runs = distill_base_study.specs(tmp_path, [0, 5])
    assert [r.name for r in runs] == ["teacher/seed0", "teacher/seed5", "upsampled/seed0", "full-rank/seed0",
                                      "upsampled/seed5", "full-rank/seed5"]
    for run in runs[2:]:
        seed = run.name.split("seed")[1]
        assert run.recipe == "fashion_mnist_distill" and run.needs == (f"teacher/seed{seed}",)
        assert f"distill.teacher={tmp_path / 'teacher' / f'seed{seed}'}" in run.sets and f"train.seed={seed}" in run.sets
        assert ("distill.full_rank_base=true" in run.sets) == run.name.startswith("full-rank")
    assert all(r.recipe == "fashion_mnist_teacher" and not r.needs for r in runs[:2])


def _study(tmp_path: Path, full_rank_at_14: list[float], full_rank_at_4: list[float]) -> dict:
    for seed in (0, 1, 2):
        _finished(tmp_path / "teacher" / f"seed{seed}", {4: 88.0}, {4: 87.0}, 230_000)
        upsampled = {2: 85.0, 4: 86.0 + seed, 7: 86.0, 14: 83.0 + 0.5 * seed}
        full_rank = {2: 85.0, 4: full_rank_at_4[seed], 7: 86.0, 14: full_rank_at_14[seed]}
        for arm, val in (("upsampled", upsampled), ("full-rank", full_rank)):
            _finished(tmp_path / arm / f"seed{seed}", val, {p: v - 1 for p, v in val.items()}, 230_000)
    return distill_base_study.arms_over_seeds(tmp_path, list(distill_base_study.ARMS), [0, 1, 2])


def test_the_rule_counts_a_cause_above_one_point_at_14_and_adopts_above_the_larger_std(tmp_path):
    arms = _study(tmp_path / "a", full_rank_at_14=[85.0, 85.5, 86.0], full_rank_at_4=[86.0, 87.0, 88.0])
    rule = distill_base_study.verdict(arms, [0, 1, 2])
    assert rule["gain_at_14"] == pytest.approx(2.0) and rule["cause"]
    worst_up = [83.0, 83.5, 84.0]  # p=14 is the recipe's worst size on every seed
    worst_full = [85.0, 85.0, 85.0]
    assert rule["gain_worst"] == pytest.approx(statistics.mean(worst_full) - statistics.mean(worst_up))
    assert rule["worst_std_margin"] == pytest.approx(statistics.stdev(worst_up))
    assert rule["adopt"]

    arms = _study(tmp_path / "b", full_rank_at_14=[84.0, 84.5, 85.0], full_rank_at_4=[86.0, 87.0, 88.0])
    rule = distill_base_study.verdict(arms, [0, 1, 2])
    assert rule["gain_at_14"] == pytest.approx(1.0) and not rule["cause"]  # "more than 1 point"

    arms = _study(tmp_path / "c", full_rank_at_14=[88.0, 88.0, 88.0], full_rank_at_4=[83.0, 84.0, 84.5])
    rule = distill_base_study.verdict(arms, [0, 1, 2])
    assert rule["cause"] and not rule["adopt"]  # patch 14 gains, but patch 4 becomes no better a worst size


def test_the_report_states_the_rules_outcome_and_every_seed_at_14(tmp_path):
    arms = _study(tmp_path, full_rank_at_14=[85.0, 85.5, 86.0], full_rank_at_4=[86.0, 87.0, 88.0])
    teachers = distill_base_study.arms_over_seeds(tmp_path, ["teacher"], [0, 1, 2])["teacher"]
    text = distill_base_study.markdown(arms, teachers, [0, 1, 2], distill_base_study.verdict(arms, [0, 1, 2]))
    row = next(line for line in text.splitlines() if line.startswith("| full-rank |"))
    assert "85.00 / 85.50 / 86.00" in row and "85.50 ± 0.50" in row
    assert "+2.00 points: the rank-≤16 start is a cause" in text and "`full-rank` replaces" in text
