"""tools/finetune_keep_study.py: the selection rule of docs/flexible_finetune.md on made-up rows, and the runs it
plans (each candidate's overrides reach the config `flexivit finetune --patch-size` trains with)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import finetune_keep_study as ks  # noqa: E402


def row(candidate, run, val, gflops=100.0):
    return {"candidate": candidate, "run": run, "val": dict(zip(("2", "4", "7", "14"), val)), "gflops": gflops}


def test_the_rule_needs_the_fine_tune_size_within_a_point_then_takes_the_worst_size():
    rows = [row("fixed", "f-lo", (10, 12, 12, 90.2)), row("fixed", "f-hi", (16, 18, 14, 94.4)),
            row("flexible", "flex", (82, 85, 93, 88.7)),  # best worst size, but 5.7 points down at 14
            row("others0.5", "o-hi", (81.8, 83, 87, 94.0)), row("others0.5", "o-lo", (85, 85, 85, 93.3)),
            row("consistency", "c", (65, 68, 74, 92.7))]
    sel = ks.select(rows, patch_size=14, margin=1.0, tie=1.0)
    assert sel["reference_top1_at_p"] == 94.4
    assert [r["eligible"] for r in rows] == [False, True, False, True, False, False]  # 93.3 < 94.4 - 1
    assert sel["per_candidate"] == {"fixed": "f-hi", "others0.5": "o-hi"}
    assert sel["out"] == ["consistency", "flexible"] and sel["winner"] == "o-hi"


def test_a_tie_goes_to_fewer_gflops_then_fewer_changed_settings():
    base = [row("fixed", "f", (10, 10, 10, 94.0))]
    tied = [row("others0.5", "a", (80.0, 85, 85, 94.0), gflops=300), row("consistency", "b", (80.9, 85, 85, 94.0), gflops=450)]
    assert ks.select(base + tied, patch_size=14, margin=1.0, tie=1.0)["winner"] == "a"
    assert ks.select(base + tied, patch_size=14, margin=1.0, tie=0.5)["winner"] == "b"  # no longer a tie
    same = [row("others0.5", "a", (80.0, 85, 85, 94.0)), row("others0.5-probehead", "c", (80.5, 85, 85, 94.0))]
    assert ks.select(base + same, patch_size=14, margin=1.0, tie=1.0)["winner"] == "a"  # 1 setting changed, not 2


@pytest.mark.parametrize("candidate", ks.CANDIDATES, ids=lambda c: c.name)
def test_every_candidate_resolves_to_the_config_it_names(candidate):
    sets = ks.run_sets(ks.task_sets("tops", None), candidate, 0.25, 400, 50)
    cfg = ks.resolved(sets, candidate, 14)
    f = cfg.finetune
    assert cfg.train.steps == 400 and cfg.train.test_eval is False
    if not candidate.fixed:  # the flexible default: the recipe's sampled sizes and lr
        assert cfg.patch.weights == [0.2, 0.2, 0.4, 0.2] and cfg.optim.lr == pytest.approx(4e-3)
        return
    assert cfg.patch.default == 14 and cfg.optim.lr == pytest.approx(4e-3 * 0.25)
    others = float(next((s.split("=")[1] for s in candidate.sets if s.startswith("finetune.fixed_others=")), 0))
    assert f.fixed_others == others
    assert cfg.patch.sizes == ([2, 4, 7, 14] if others else [14])
    assert (f.consistency > 0) == ("consistency" in candidate.name)
    assert (f.head_init == "probe") == ("probehead" in candidate.name)


def test_combined_seeds_score_the_mean_of_each_seeds_worst_size_and_drop_runs_not_on_every_seed():
    def screen(fixed14, keep, extra=()):
        rows = [row("fixed", "f", (10, 10, 10, fixed14)), row("others0.5-consistency", "k", keep, gflops=200), *extra]
        for r in rows:
            r.update(scale=1.0, lr=4e-3, sets=[], images={}, consistency_images={}, probe_images_per_size=0,
                     train_seconds=60.0)
        return {"pretrained": "p", "task": "t", "patch_size": 14, "steps": 400, "gflops_forward": {},
                "fixed_gflops_at": {}, "seeds": [0], "runs": rows}

    only0 = row("consistency", "c", (99, 99, 99, 99))
    only0.update(scale=1.0, lr=4e-3, sets=[], images={}, consistency_images={}, probe_images_per_size=0,
                 train_seconds=1.0)
    payload = ks.combine([screen(95, (80, 90, 90, 94.5), [only0]), screen(94, (90, 80, 90, 93.5))], margin=1.0, tie=1.0)
    keep = next(r for r in payload["runs"] if r["run"] == "k")
    assert keep["val"]["14"] == pytest.approx(94.0) and keep["val"]["2"] == pytest.approx(85.0)
    assert keep["worst"] == pytest.approx(80.0)  # mean of the seeds' worst (80, 80), not the worst of means (85)
    assert payload["selection"]["reference_top1_at_p"] == pytest.approx(94.5) and keep["eligible"]
    assert payload["left_out"] == ["c"] and payload["selection"]["winner"] == "k"
    assert "80.0" in ks.combined_markdown(payload)
