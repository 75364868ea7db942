"""flexivit.experiments.runner: a finished run is skipped, an interrupted one resumed, a folder made with
other settings refused naming the change, a failure is one line naming the run and its log; first with a
stand-in for the flexivit CLI (tests/scripts/fake_flexivit.py), then (slow) with real tiny training runs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flexivit.experiments.results import read_jsonl, read_results
from flexivit.experiments.runner import RECORD, RUNS_LOG, RunError, RunSpec, Study, raise_failures

FAKE = (sys.executable, str(Path(__file__).parent / "scripts" / "fake_flexivit.py"))
RECIPE = "fashion_mnist:smoke"


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """The arguments of every fake call, in order."""
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(path))
    return lambda: read_jsonl(path)


def _study(tmp_path, lines=None, jobs=1):
    say = lines.append if lines is not None else lambda _: None
    return Study(tmp_path / "study", jobs=jobs, program=FAKE, say=say)


def _spec(name="a", steps=3, **kw):
    return RunSpec(name=name, recipe=RECIPE, sets=(f"train.steps={steps}", *kw.pop("sets", ())), **kw)


def test_a_finished_run_is_skipped_and_every_attempt_logged(tmp_path, calls):
    lines = []
    study = _study(tmp_path, lines)
    (first,) = study.run_all([_spec()])
    assert first.status == "finished" and first.exit_code == 0 and first.cpu_s > 0
    assert calls() == [["train", RECIPE, "--out", str(tmp_path / "study" / "a"), "--set", "train.steps=3"]]
    assert read_results(tmp_path / "study" / "a").top1("test") == {"4": 0.5, "7": 0.5}
    assert "fake train into" in (tmp_path / "study" / "a.log").read_text()  # the command's output in its log
    (again,) = study.run_all([_spec(sets=("train.log_every=7",))])  # a cadence field may differ
    assert again.status == "skipped" and len(calls()) == 1
    assert "1 runs, 1 finished already (skipped), 0 to run" in lines and "a: finished already, skipped" in lines
    log = read_jsonl(tmp_path / "study" / RUNS_LOG)
    assert [r["status"] for r in log] == ["finished", "skipped"]
    assert log[0]["command"] == [*FAKE, *calls()[0]] and log[0]["log"] == str(tmp_path / "study" / "a.log")
    assert study.attempts("a") == log and study.attempts("b") == []


def test_an_interrupted_run_fails_in_one_line_then_resumes(tmp_path, calls, monkeypatch):
    study = _study(tmp_path)
    monkeypatch.setenv("FAKE_INTERRUPT", "a")
    with pytest.raises(RunError) as err:
        study.run_all([_spec()])
    log = tmp_path / "study" / "a.log"
    assert str(err.value) == f"a failed (exit 1); see {log}; fix the cause and rerun the same command to resume it"
    assert study.check([_spec()]) == {"a": "resume"}
    monkeypatch.delenv("FAKE_INTERRUPT")
    (outcome,) = study.run_all([_spec()])
    assert outcome.status == "finished" and calls()[-1][-1] == "--resume" and "(resumed)" in log.read_text()


def test_a_folder_made_with_other_settings_is_refused_naming_each_change(tmp_path, calls):
    study = _study(tmp_path)
    study.run_all([_spec(inputs=("base-a",), args=("--patch-size", "7"))])
    cases = [(_spec(steps=4, inputs=("base-a",), args=("--patch-size", "7")), "train.steps: 3 there, 4 now"),
             (_spec(inputs=("base-b",), args=("--patch-size", "7")), "inputs: ['base-a'] there, ['base-b'] now"),
             (_spec(inputs=("base-a",)), "args: ['--patch-size', '7'] there, [] now"),
             (RunSpec(name="a", command="finetune", recipe=RECIPE, sets=("train.steps=3",), inputs=("base-a",),
                      args=("--patch-size", "7")), "command: 'train' there, 'finetune' now")]
    for spec, change in cases:
        with pytest.raises(RunError, match="was made with other settings") as err:
            study.run_all([spec])
        assert change in str(err.value) and "\n" not in str(err.value)
    # A recipe whose defaults moved since the run counts as a change, though the --set values are the same.
    record = json.loads((tmp_path / "study" / "a" / RECORD).read_text())
    record["config"]["optim"]["lr"] *= 2
    (tmp_path / "study" / "a" / RECORD).write_text(json.dumps(record))
    with pytest.raises(RunError, match=r"optim.lr: [\d.e-]+ there, [\d.e-]+ now"):
        study.check([_spec(inputs=("base-a",), args=("--patch-size", "7"))])
    assert len(calls()) == 1  # refused before anything ran


def test_failures_leave_the_other_runs_running_and_block_what_needs_them(tmp_path, calls, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "teacher")
    study = _study(tmp_path, jobs=2)
    specs = [_spec("teacher"), _spec("other"), _spec("student", needs=("teacher",))]
    outcomes = study.run_all(specs, strict=False)
    assert [(o.name, o.status) for o in outcomes] == [("teacher", "failed"), ("other", "finished"),
                                                      ("student", "blocked")]
    assert sorted(Path(c[c.index("--out") + 1]).name for c in calls()) == ["other", "teacher"]
    assert outcomes[2].error == (f"student did not run: it needs teacher, which failed; see "
                                 f"{tmp_path / 'study' / 'teacher.log'}")
    with pytest.raises(RunError, match=r"^2 runs did not finish: teacher \(failed, exit 3, see .*teacher.log\), "
                                       r"student \(blocked, see .*teacher.log\); fix the cause"):
        raise_failures(outcomes)
    assert "the fake was told to fail" in (tmp_path / "study" / "teacher.log").read_text()


def test_exit_zero_without_the_files_of_a_finished_run_is_a_failure(tmp_path, calls, monkeypatch):
    monkeypatch.setenv("FAKE_EMPTY", "a")
    (outcome,) = _study(tmp_path).run_all([_spec()], strict=False)
    assert outcome.status == "failed" and "exited 0 but left no model.safetensors, eval.json" in outcome.error


def test_a_program_that_cannot_start_is_a_failed_run(tmp_path):
    study = Study(tmp_path, program=(str(tmp_path / "no-such-python"),), say=lambda _: None)
    (outcome,) = study.run_all([_spec()], strict=False)
    assert outcome.status == "failed" and outcome.exit_code == -1
    assert "could not start" in outcome.log.read_text() and f"see {outcome.log}" in outcome.error


def test_commands_without_a_recipe_are_checked_on_their_arguments(tmp_path, calls):
    study = _study(tmp_path)
    spec = RunSpec(name="fewshot", command="fewshot", inputs=("backbone",), args=("--data", "d", "--episodes", "3"),
                   done=("eval.json",))  # no recipe: --data is the command's own argument
    study.run_all([spec])
    assert calls() == [["fewshot", "backbone", "--out", str(tmp_path / "study" / "fewshot"), "--data", "d",
                        "--episodes", "3"]]
    assert study.check([spec]) == {"fewshot": "finished"}
    with pytest.raises(RunError, match=r"args: \['--data', 'd', '--episodes', '3'\] there, \['--data', 'd', "
                                       r"'--episodes', '4'\] now"):
        study.check([RunSpec(name="fewshot", command="fewshot", inputs=("backbone",),
                             args=("--data", "d", "--episodes", "4"), done=("eval.json",))])


def test_a_folder_made_before_the_runner_is_skipped_when_finished_and_resumed_otherwise(tmp_path, calls):
    lines = []
    old = tmp_path / "study" / "old"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"x")
    (old / "eval.json").write_text("{}")
    (tmp_path / "study" / "cut" / "state" / "step_4").mkdir(parents=True)
    study = _study(tmp_path, lines)
    assert study.check([_spec("old"), _spec("cut")]) == {"old": "finished", "cut": "resume"}
    study.run_all([_spec("old")])
    assert calls() == [] and "old: finished already, skipped (made before the runner kept records: settings not " \
                             "checked)" in lines


def test_each_run_records_the_code_revisions_that_trained_it(tmp_path, calls, monkeypatch):
    from flexivit.experiments import runner
    from flexivit.provenance import git_revision

    here = git_revision(runner.Study._root())
    study = _study(tmp_path)
    study.run_all([_spec("a")])
    record = json.loads((tmp_path / "study" / "a" / RECORD).read_text())
    assert record["code"] == [here] and read_jsonl(tmp_path / "study" / RUNS_LOG)[-1]["code"] == here
    label = here["commit"][:7] + ("+uncommitted" if here["clean"] is False else "") if here["commit"] else "not recorded"
    assert study.trained_at([_spec("a")]) == {label: ["a"]}

    # b is interrupted at one revision and resumed at another: both trained it, in that order
    revisions = iter([{"commit": "1" * 40, "clean": True}, {"commit": "2" * 40, "clean": False}])
    monkeypatch.setattr(runner, "git_revision", lambda root: next(revisions))
    monkeypatch.setenv("FAKE_INTERRUPT", "b")
    with pytest.raises(RunError):
        study.run_all([_spec("b")])
    monkeypatch.delenv("FAKE_INTERRUPT")
    study.run_all([_spec("b")])
    assert [c["commit"][0] for c in json.loads((tmp_path / "study" / "b" / RECORD).read_text())["code"]] == ["1", "2"]
    old = tmp_path / "study" / "old"  # a finished folder from before the runner kept records
    old.mkdir()
    assert study.trained_at([_spec("a"), _spec("b"), _spec("old"), _spec("never")]) == {
        label: ["a"], "1111111": ["b"], "2222222+uncommitted": ["b"], "not recorded": ["old"]}

    # a fresh start in the same folder (no checkpoints left) begins a new list
    monkeypatch.setattr(runner, "git_revision", lambda root: {"commit": "3" * 40, "clean": True})
    (tmp_path / "study" / "b" / "model.safetensors").unlink()
    shutil.rmtree(tmp_path / "study" / "b" / "state")
    study.run_all([_spec("b")])
    assert study.trained_at([_spec("b")]) == {"3333333": ["b"]}


@pytest.mark.parametrize("kw,message", [
    (dict(name="../x"), "a folder under the study folder"), (dict(name=""), "a folder under the study folder"),
    (dict(name="a", args=("--set", "x=1")), "the runner's to write"), (dict(name="a", args=("--out=z",)), "--out"),
    (dict(name="a", recipe=RECIPE, args=("--data", "x")), "data.source=... for --data"),
])
def test_bad_specs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        RunSpec(**kw)


def test_needs_must_come_first_and_names_be_unique(tmp_path):
    study = _study(tmp_path)
    with pytest.raises(ValueError, match="needs .*must come before it"):
        study.run_all([_spec("b", needs=("a",)), _spec("a")])
    with pytest.raises(ValueError, match="two runs are named a"):
        study.run_all([_spec("a"), _spec("a")])


TINY = ["model.embed_dim=16", "model.depth=1", "data.batch_size=16", "data.eval_limit=32", "train.steps=4",
        "train.checkpoint_every=2", "train.log_every=2", "train.token_budget=0", "data.num_workers=0"]


@pytest.mark.slow
def test_real_runs_are_skipped_refused_and_resumed(tmp_path, monkeypatch):
    """`flexivit train` of the smoke recipe at 4 steps through the runner: skipped when rerun, refused with
    other steps, and continued with --resume from its checkpoint when its end is lost."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study = Study(tmp_path, say=lambda _: None)
    spec = RunSpec(name="tiny", recipe=RECIPE, sets=tuple(TINY))
    (first,) = study.run_all([spec])
    run = tmp_path / "tiny"
    assert first.status == "finished" and read_results(run).steps == 4
    saved = json.loads((run / "config.json").read_text())
    assert saved == json.loads((run / RECORD).read_text())["config"]  # what the trainer ran is what was recorded
    assert study.check([spec]) == {"tiny": "finished"}
    with pytest.raises(RunError, match="train.steps: 4 there, 5 now"):
        study.check([RunSpec(name="tiny", recipe=RECIPE, sets=(*TINY, "train.steps=5"))])
    for lost in ("eval.json", "model.safetensors"):  # as if killed after its last checkpoint
        (run / lost).unlink()
    (again,) = study.run_all([spec])
    assert again.status == "finished" and "resumed from" in (tmp_path / "tiny.log").read_text()
    assert [r["status"] for r in study.attempts("tiny")] == ["finished", "finished"]
    assert study.attempts("tiny")[1]["command"][-1] == "--resume"
    done = subprocess.run([*study.command(spec)], capture_output=True, text=True, env=study._env())
    assert done.returncode == 2 and "pass --resume" in done.stderr  # the trainer's own guard, which the runner avoids
