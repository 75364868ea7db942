"""Nothing lost and one line per mistake: the defects of issue 29 (silent loss or overwrite, tracebacks
instead of a message), each reproduced through the command line or the API a user would call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexivit.cli.main import main
from flexivit.train.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.embed_dim=32", "model.depth=1", "data.batch_size=8", "train.steps=4", "train.checkpoint_every=2",
        "train.log_every=2", "train.token_budget=0", "optim.warmup_steps=1"]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _folder(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), per_class: int = 12, mode: str = "L",
            seed: int = 0) -> Path:
    """``per_class`` random 28x28 PNGs in a sub-folder per class."""
    rng = np.random.default_rng(seed)
    shape = (28, 28, 3) if mode == "RGB" else (28, 28)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _cli(capsys, *args: str) -> tuple[int, str]:
    """``flexivit ARGS`` in this process: its exit code and its stderr."""
    code = main(list(args))
    return code, capsys.readouterr().err


def _train(capsys, data: Path, out: Path, *extra: str, sets: list[str] = ()) -> tuple[int, str]:
    return _cli(capsys, "train", "fashion_mnist:smoke", "--data", str(data), "--out", str(out),
                *_sets(TINY + list(sets)), *extra)


# ---- settings that cannot work are refused naming the key --------------------------------------------
@pytest.mark.parametrize("setting,message", [
    ("data.batch_size=0", "data.batch_size=0: must be a positive integer"),
    ("data.eval_batch_size=-1", "data.eval_batch_size=-1: must be a positive integer"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0: must be a positive integer"),
    ("train.log_every=0", "train.log_every=0: must be a positive integer"),
    ("train.steps=-3", "train.steps=-3: must be 0 or more"),
    ("train.token_budget=-5", "train.token_budget=-5: must be 0 (off) or a positive token count"),
    ("train.grad_accum=0", "train.grad_accum=0: must be a positive integer"),
    ("train.eval_every=-1", "train.eval_every=-1: must be 0 (at the end only) or a positive integer"),
    ("optim.lr=-1", "optim.lr=-1.0: must be 0 or more"),
    ("optim.lr=nan", "optim.lr=nan: must be 0 or more"),
    ("optim.clip_grad=0", "optim.clip_grad=0.0: must be unset (none) or positive"),
    ("data.hflip=1.5", "data.hflip=1.5: must be a probability in [0, 1]"),
    ("data.val_fraction=1", "data.val_fraction=1.0: must be in (0, 1)"),
    ("data.on_corrupt=ignore", "data.on_corrupt='ignore': must be 'error' or 'skip'"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8': must be 'no', 'bf16' or 'fp16'"),
])
def test_a_setting_that_cannot_work_is_refused_naming_it(setting, message):
    with pytest.raises(ConfigError) as err:
        load_recipe("fashion_mnist:smoke", [setting])
    assert str(err.value) == message


def test_the_trainer_checks_a_config_built_in_python(tmp_path):
    from flexivit.train.loop import train

    cfg = load_recipe("fashion_mnist:smoke")
    cfg.train.log_every = 0
    with pytest.raises(ConfigError, match="train.log_every=0: must be a positive integer"):
        train(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bad_settings_stop_the_cli_with_one_line_and_exit_2(tmp_path, capsys):
    data = _folder(tmp_path / "imgs")
    for setting in ("data.batch_size=0", "train.checkpoint_every=0", "train.log_every=0"):
        code, err = _train(capsys, data, tmp_path / "run", sets=[setting])
        assert code == 2 and err.count("\n") == 1 and setting in err, err


# ---- a trained run shared by the tests below ---------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, finished run trained on it by the CLI)."""
    root = tmp_path_factory.mktemp("trained")
    data = _folder(root / "imgs", per_class=16)
    code = main(["train", "fashion_mnist:smoke", "--data", str(data), "--out", str(root / "run"), *_sets(TINY)])
    assert code == 0
    return data, root / "run"


def test_a_malformed_accuracy_floor_names_the_flag(trained, capsys):
    code, err = _cli(capsys, "eval", str(trained[1]), "--min-accuracy", "abc")
    assert code == 2 and err.count("\n") == 1
    assert "--min-accuracy" in err and "'abc'" in err, err


def test_predict_on_a_folder_says_it_is_a_folder(trained, capsys):
    code, err = _cli(capsys, "predict", str(trained[1]), str(trained[0]))
    assert code == 2 and "is a folder" in err and "does not exist" not in err, err


def test_fewshot_refuses_one_way_episodes(trained, capsys):
    code, err = _cli(capsys, "fewshot", str(trained[1]), "--data", str(trained[0]), "--ways", "1", "--shots", "1",
                     "--queries", "1", "--episodes", "2")
    assert code == 2 and "--ways 1" in err and "2 or more" in err, err


def test_a_checkpoint_file_of_the_right_size_with_other_bytes_is_called_changed(tmp_path):
    from flexivit.train.state import finalize_state_dir, verify_state

    tmp = tmp_path / ".tmp-step_1"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    state = finalize_state_dir(tmp, tmp_path / "step_1", {"step": 1})
    assert verify_state(state) is None
    (state / "model.safetensors").write_bytes(bytes(reversed(range(256))) * 4)  # same size, other content
    problem = verify_state(state)
    assert "model.safetensors" in problem and "content" in problem and "expected 1024" not in problem, problem


def test_checkpoint_files_respect_the_umask(trained):
    states = sorted((trained[1] / "state").iterdir())
    assert states
    umask = os.umask(0o022)
    os.umask(umask)
    for file in (f for s in states for f in s.iterdir()):
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


# ---- recipes, data folders and data workers ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_name_in_the_working_folder_does_not_shadow_a_built_in_recipe(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion_mnist").mkdir() if kind == "folder" else (tmp_path / "fashion_mnist").write_text("x = 1\n")
    assert load_recipe("fashion_mnist:smoke").name == "fashion_mnist-smoke"


def test_a_recipe_file_without_an_extension_loads_and_a_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("from flexivit.train.config import Config\n\n"
                                   "def get_config(arg=None):\n    return Config(name='mine-' + str(arg))\n")
    assert load_recipe("mine:x").name == "mine-x"
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match="folder is a folder, not a recipe file"):
        load_recipe("folder")


def test_a_one_class_dataset_warns_that_any_model_scores_100(tmp_path, caplog):
    from flexivit.train.builders import build_data

    cfg = load_recipe("fashion_mnist:smoke", [f"data.source={_folder(tmp_path / 'one', classes=('a',))}"])
    with caplog.at_level("WARNING"):
        build_data(cfg)
    assert any("one class" in r.getMessage() and "100 %" in r.getMessage() for r in caplog.records), caplog.text


def test_a_hidden_class_folder_is_named_in_a_warning(tmp_path, caplog):
    from flexivit.data.sources import load_source

    data = _folder(tmp_path / "imgs", classes=("a", "b", ".c"))
    with caplog.at_level("WARNING"):
        splits = load_source(str(data))
    assert splits.class_names == ["a", "b"]  # skipped, as HF's imagefolder does ...
    assert any(".c" in r.getMessage() and "12 images" in r.getMessage() for r in caplog.records), caplog.text


def test_a_corrupt_image_met_in_a_data_worker_is_one_line(tmp_path, capsys):
    data = _folder(tmp_path / "imgs")
    (data / "a" / "5.png").write_bytes(b"not a png" * 10)
    code, err = _train(capsys, data, tmp_path / "run", sets=["data.num_workers=1"])
    errors = [line for line in err.splitlines() if "error:" in line]  # stderr also holds the progress bars
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("flexivit train: error: row ") and "cannot decode image" in errors[0], err
    assert errors[0].endswith("5.png' (on_corrupt='skip' drops such images)"), err


@pytest.mark.slow
def test_a_bad_setting_on_two_ranks_is_the_launchers_named_root_cause(tmp_path):
    """Each rank stops with the one line and exit 2; the launcher's report (its own exit 1 and traceback, which
    no rank can change) names that line as the root cause instead of a link to torch's documentation."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run([*launch, "-m", "flexivit", "train", "fashion_mnist:smoke", "--out", str(tmp_path / "run"),
                             "--set", "optim.lrr=3"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    line = "flexivit train: error: unknown config key 'optim.lrr'; did you mean optim.lr"
    assert result.returncode != 0 and line in result.stderr, result.stderr[-3000:]
    root_cause = result.stderr.split("Root Cause")[-1]
    assert "exitcode  : 2" in root_cause and f"traceback : {line}" in root_cause, root_cause
    assert "To enable traceback" not in root_cause


@pytest.mark.slow
def test_flexivit_launch_exits_2_with_the_ranks_line_and_no_launcher_traceback(tmp_path):
    """``flexivit launch OPTIONS train ...`` is ``accelerate launch OPTIONS -m flexivit train ...`` whose own status
    is the ranks': a bad setting on two ranks prints each rank's one line, then exits 2 with nothing else."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run([sys.executable, "-m", "flexivit", "launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "train", "fashion_mnist:smoke", "--out", str(tmp_path / "run"), "--set", "optim.lrr=3"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    line = "flexivit train: error: unknown config key 'optim.lrr'; did you mean optim.lr"
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count(line) == 2, result.stderr[-3000:]  # one per rank
    assert [t for t in result.stderr.splitlines() if t.strip() and line not in t] == [], result.stderr[-3000:]


@pytest.mark.slow
def test_flexivit_launch_one_process_trains_and_exits_0(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "flexivit", "launch", "--cpu", "--num_processes", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "train", "fashion_mnist:smoke",
                             "--out", str(out), "--data", str(_folder(tmp_path / "imgs")), *_sets(TINY)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "eval.json").is_file()


def test_flexivit_launch_names_a_missing_command_and_a_failed_rank_in_one_line(capsys):
    from flexivit.cli.launch import _report, split_command

    assert split_command(["--num_processes", "2", "train", "r", "--out", "o"], ["train", "eval"]) == (
        ["--num_processes", "2"], ["train", "r", "--out", "o"])
    code, err = _cli(capsys, "launch", "--num_processes", "2")
    assert code == 2 and err.count("\n") == 1 and "needs a flexivit command after the launcher's options" in err
    assert _report(2, "rank 1", "flexivit train: error: x") == 2 and capsys.readouterr().err == ""  # rank said it
    assert _report(1, "rank 0", "RuntimeError: boom") == 1
    assert capsys.readouterr().err == "flexivit launch: error: rank 0 exited with status 1: RuntimeError: boom\n"
    assert _report(-9, "rank 0", "Traceback...\n  File x\nKilled") == 1  # a signal; a traceback is not repeated
    assert capsys.readouterr().err == "flexivit launch: error: rank 0 exited with status -9: see its output above\n"


def test_a_ranks_error_line_goes_out_in_one_write(monkeypatch):
    """Ranks under a launcher share one stderr: a line written as text, then newline, ran into another rank's."""
    from flexivit.cli.errors import print_line

    writes: list[str] = []

    class Stderr:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            writes.append("<flush>")

    monkeypatch.setattr(sys, "stderr", Stderr())
    print_line("flexivit train: error: x")
    assert writes == ["flexivit train: error: x\n", "<flush>"]


# ---- export ------------------------------------------------------------------------------------------
def test_export_into_a_run_folder_is_refused_unless_overwrite(trained, tmp_path, capsys):
    run = tmp_path / "run"
    __import__("shutil").copytree(trained[1], run)
    before = {f: (run / f).read_bytes() for f in ("model.safetensors", "config.json")}
    code, err = _cli(capsys, "export", str(run), "--patch-size", "7", "--out", str(run))
    assert code == 2 and "already holds a training run (model.safetensors, state/, log.jsonl)" in err, err
    assert "--overwrite" in err
    assert {f: (run / f).read_bytes() for f in before} == before
    assert _cli(capsys, "export", str(run), "--patch-size", "7", "--out", str(run), "--overwrite")[0] == 0
    assert json.loads((run / "config.json").read_text())["patch_size"] == 7  # asked for: replaced


def test_export_into_an_export_or_a_file_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "p7"
    assert _cli(capsys, "export", str(trained[1]), "--patch-size", "7", "--out", str(out))[0] == 0
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # the folder renamed into place, not 0700
    code, err = _cli(capsys, "export", str(trained[1]), "--patch-size", "4", "--out", str(out))
    assert code == 2 and "already holds a model (model.safetensors)" in err, err
    (tmp_path / "file").write_text("")
    for target in (tmp_path / "file", tmp_path / "file" / "sub"):
        code, err = _cli(capsys, "export", str(trained[1]), "--patch-size", "4", "--out", str(target))
        assert code == 2 and err.count("\n") == 1 and "is a file" in err, err


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_crash_while_replacing_an_export_never_pairs_a_new_config_with_old_weights(trained, tmp_path, monkeypatch):
    from flexivit.eval import export as export_module
    from flexivit.eval.export import export_checkpoint, is_export_dir, load_export

    out = tmp_path / "export"
    export_checkpoint(trained[1], 7, out)
    real, moved = os.replace, []

    def crash_after_one_move(src, dst):
        if moved:
            raise OSError("disk full")
        moved.append(Path(dst).name)
        real(src, dst)

    monkeypatch.setattr(export_module.os, "replace", crash_after_one_move)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(trained[1], 4, out, overwrite=True)
    monkeypatch.undo()
    assert moved == ["model.safetensors"]
    assert not is_export_dir(out)  # the new weights are there, without a config to load them by
    export_checkpoint(trained[1], 4, out, overwrite=True)  # the same command again completes it
    model, config = load_export(out)
    assert config["patch_size"] == 4 and model.patch_embed.proj.kernel_size == (4, 4)


def test_recalibrate_onto_a_file_is_one_line(tmp_path, capsys):
    data = _folder(tmp_path / "imgs")
    assert _train(capsys, data, tmp_path / "bgn", sets=["model.norm=bgn", "model.norm_groups=4"])[0] == 0
    (tmp_path / "file").write_text("")
    for target in (tmp_path / "file", tmp_path / "file" / "sub", tmp_path / "file" / "model.safetensors"):
        code, err = _cli(capsys, "recalibrate", str(tmp_path / "bgn"), "--patch-sizes", "1", "--images", "8",
                         "--out", str(target))
        assert code == 2 and "is a file" in err and "Errno" not in err, err
    assert _cli(capsys, "recalibrate", str(tmp_path / "bgn"), "--patch-sizes", "1", "--images", "8", "--out",
                str(tmp_path / "new" / "m.safetensors"))[0] == 0


@pytest.mark.parametrize("command", ["eval", "fewshot"])
def test_a_report_onto_a_file_is_refused_before_any_work(trained, tmp_path, capsys, command):
    (tmp_path / "file").write_text("")
    extra = ["--data", str(trained[0]), "--ways", "2"] if command == "fewshot" else ["--no-progress"]
    code, err = _cli(capsys, command, str(trained[1]), "--out", str(tmp_path / "file"), *extra)
    assert code == 2 and err.strip() == f"flexivit {command}: error: --out {tmp_path / 'file'} is a file; give a " \
                                       "folder (new or existing)", err


# ---- eval beside a training record -------------------------------------------------------------------
FAST_EVAL = ["--no-progress", "--batch-size", "4", "--warmup", "0", "--repeats", "1"]


def test_eval_of_a_run_keeps_the_training_record_and_writes_the_sweep_beside_it(trained, tmp_path, capsys):
    from flexivit.eval.deploy import Predictor

    run = tmp_path / "run"
    __import__("shutil").copytree(trained[1], run)
    record = (run / "eval.json").read_bytes()
    assert main(["eval", str(run), *FAST_EVAL]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {run / 'eval_sweep.json'}, {run / 'eval_sweep.md'}, {run / 'eval_sweep.png'}" in printed
    assert "| 14 | 14 | 4 |" in printed  # the table, as before
    assert (run / "eval.json").read_bytes() == record  # val, images_seen, train_seconds: all still there
    assert json.loads(record)["images_seen"] > 0
    sweep = json.loads((run / "eval_sweep.json").read_text())
    assert [r["patch_size"] for r in sweep["results"]] == [2, 4, 7, 14]
    assert all(r["latency_ms"] > 0 for r in sweep["results"]) and (run / "eval_sweep.md").is_file()
    assert (run / "eval_sweep.png").read_bytes()[:4] == b"\x89PNG"
    rows, source = Predictor.from_checkpoint(run).profile_for_latency()  # predict --budget-ms reads the sweep
    assert source == f"latencies from {run / 'eval_sweep.json'}" and rows == sweep["results"]


def test_eval_into_a_folder_without_a_training_record_writes_eval_json(trained, tmp_path, capsys):
    assert _cli(capsys, "eval", str(trained[1]), "--out", str(tmp_path / "sweep"), *FAST_EVAL)[0] == 0
    assert "latency_ms" in json.loads((tmp_path / "sweep" / "eval.json").read_text())["results"][0]
    assert _cli(capsys, "eval", str(trained[1]), "--out", str(tmp_path / "sweep"), *FAST_EVAL)[0] == 0  # a sweep
    assert not (tmp_path / "sweep" / "eval_sweep.json").exists()  # replaces a sweep, as before


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_eval_refuses_a_limit_below_one(trained, tmp_path, capsys, limit):
    code, err = _cli(capsys, "eval", str(trained[1]), "--out", str(tmp_path), "--limit", limit, *FAST_EVAL)
    assert code == 2 and f"--limit must be a positive number of test images, got {limit}" in err, err
    assert not list(tmp_path.iterdir())


# ---- one training per folder, and no silent overwrite --------------------------------------------------
HOLD_LOCK = """
import sys, time
from pathlib import Path
from flexivit.train.runlock import RunLock
lock = RunLock(Path(sys.argv[1]))
assert lock.acquire() is None
print("held", flush=True)
time.sleep(600)
"""


def test_a_held_lock_refuses_and_a_left_record_is_taken_over_in_process(tmp_path, capsys):
    from flexivit.train.runlock import LOCK_FILE, RunLock

    data, out = _folder(tmp_path / "imgs"), tmp_path / "run"
    out.mkdir()
    with RunLock(out) as lock:  # flock conflicts between two open files of one process too
        assert lock.acquire() is None and lock.held
        code, err = _train(capsys, data, out)
        assert code == 2 and f"{out} is in use by another training: pid {os.getpid()} on " in err, err
    assert (out / LOCK_FILE).read_text() == ""
    (out / LOCK_FILE).write_text(json.dumps({"pid": 99999999, "host": "elsewhere", "command": "flexivit train x",
                                             "since": "2026-01-01 00:00:00"}))  # left by a killed run
    assert main(["train", "fashion_mnist:smoke", "--data", str(data), "--out", str(out), *_sets(TINY)]) == 0
    printed = capsys.readouterr().out
    assert f"taking over the lock on {out} from pid 99999999 on elsewhere (flexivit train x, since 2026-01-01 " \
           "00:00:00), which ended without releasing it" in printed, printed


@pytest.mark.slow
def test_a_second_training_into_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    data, out = _folder(tmp_path / "imgs"), tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = _train(capsys, data, out)
        assert code == 2 and f"{out} is in use by another training: pid {holder.pid} on " in err, err
        assert f"({Path(sys.executable).name} -c {out}, since " in err and "wait for it to end" in err, err
        assert not (out / "log.jsonl").exists() and not (out / "config.json").exists()  # nothing of it touched
    finally:
        holder.kill()  # killed: the kernel drops its lock, its record stays behind
        holder.wait()
    code = main(["train", "fashion_mnist:smoke", "--data", str(data), "--out", str(out), *_sets(TINY)])
    printed = capsys.readouterr().out
    assert code == 0 and f"taking over the lock on {out} from pid {holder.pid}" in printed, printed
    assert (out / ".flexivit-lock").read_text() == ""  # released at the end: nothing to take over next time
    assert main(["train", "fashion_mnist:smoke", "--data", str(data), "--out", str(out), "--resume",
                 *_sets(TINY + ["train.steps=6"])]) == 0
    assert "taking over" not in capsys.readouterr().out


def test_training_into_a_folder_with_a_model_and_no_checkpoints_is_refused_unless_overwrite(trained, tmp_path, capsys):
    data, out = trained[0], tmp_path / "run"
    __import__("shutil").copytree(trained[1], out)
    __import__("shutil").rmtree(out / "state")
    model = (out / "model.safetensors").read_bytes()
    for extra in ([], ["--resume"]):
        code, err = _train(capsys, data, out, *extra)
        assert code == 2 and "already holds a model (model.safetensors) and no checkpoint" in err, err
        assert "--overwrite" in err and (out / "model.safetensors").read_bytes() == model
    code, err = _train(capsys, data, out, "--resume", "--overwrite")
    assert code == 2 and "pass one of them" in err
    (out / "eval_sweep.json").write_text("{}")  # a sweep of the old model: it goes with it
    code = main(["train", "fashion_mnist:smoke", "--data", str(data), "--out", str(out), "--overwrite",
                 *_sets(TINY + ["train.steps=2"])])
    printed = capsys.readouterr().out
    assert code == 0 and "--overwrite: removed the previous run's log.jsonl, model.safetensors" in printed, printed
    assert not (out / "eval_sweep.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 2, 2]  # training, validation and test lines of the new run only
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step_2"]


def test_overwrite_starts_a_run_with_checkpoints_over(trained, tmp_path, capsys):
    data, out = trained[0], tmp_path / "run"
    __import__("shutil").copytree(trained[1], out)
    code, err = _train(capsys, data, out)
    assert code == 2 and "already holds checkpoints; pass --resume to continue it, --overwrite to start it over" in err
    assert _train(capsys, data, out, "--overwrite", sets=["train.steps=2", "train.keep_checkpoints=5"])[0] == 0
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step_2"]  # step_4 of the old run is gone


# ---- a resume on other data ----------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    ("delete", "the train split had 26 images and now has 24 ("),  # and the redrawn test split: other images
    ("add", "the train split had 26 images and now has 27 ("),
    ("rename", "the train split holds other images than before (the same count, 26, but not the same files)"),
])
def test_a_resume_on_changed_data_is_refused_naming_the_change(tmp_path, capsys, change, message):
    data, out = _folder(tmp_path / "imgs", per_class=11), tmp_path / "run"
    assert _train(capsys, data, out)[0] == 0
    state = json.loads((out / "state" / "step_4" / "trainer_state.json").read_text())
    assert state["data"]["splits"]["test"]["images"] == 4
    if change == "delete":  # the folder's splits are drawn from it: two images fewer redraw them
        (data / "a" / "0.png").unlink()
        (data / "b" / "0.png").unlink()
    elif change == "add":
        (data / "a" / "new.png").write_bytes((data / "b" / "0.png").read_bytes())
    else:  # the same counts, another file
        (data / "c" / "0.png").rename(data / "c" / "renamed.png")
    code, err = _train(capsys, data, out, "--resume", sets=["train.steps=6"])
    assert code == 2 and "checkpoint" in err and "was made on other data: " in err and message in err, err
    assert "restore the data as it was, or train into a new --out" in err
    if change == "delete":
        assert "the test split holds other images than before (the same count, 4" in err, err
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step_2", "step_4"]  # nothing trained


def test_a_resume_on_the_same_data_reloaded_is_accepted(tmp_path, capsys):
    data, out = _folder(tmp_path / "imgs", per_class=11), tmp_path / "run"
    assert _train(capsys, data, out)[0] == 0
    (data / "a" / "0.png").touch()  # a new modification time is not a change of data
    assert _train(capsys, data, out, "--resume", sets=["train.steps=6"])[0] == 0


# ---- a line cut short by a crash -------------------------------------------------------------------------
def test_a_torn_last_log_line_is_dropped_with_a_message_and_the_run_resumes(tmp_path, capsys):
    data, out = _folder(tmp_path / "imgs"), tmp_path / "run"
    assert _train(capsys, data, out, sets=["train.steps=2"])[0] == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed while appending
    code = main(["train", "fashion_mnist:smoke", "--data", str(data), "--out", str(out), "--resume", *_sets(TINY)])
    printed = capsys.readouterr().out
    assert code == 0 and f"{out / 'log.jsonl'}: dropped its last line, which is not a whole JSON record" in printed
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 2, 2, 4, 4, 4]  # training, validation and test lines at the end of each run


def test_read_jsonl_keeps_every_whole_record(tmp_path):
    from flexivit.jsonl import read_jsonl

    path, said = tmp_path / "x.jsonl", []
    path.write_text('{"a": 1}\n{"a": 2\n{"a": 3}\n{"a": ')
    assert read_jsonl(path, said.append) == [{"a": 1}, {"a": 3}]
    assert [s.split(": dropped ")[1].split(",")[0] for s in said] == ["line 2", "its last line"]
    assert path.read_text() == '{"a": 1}\n{"a": 3}\n'  # repaired: the next append starts a line of its own
    assert read_jsonl(path, said.append) == [{"a": 1}, {"a": 3}] and len(said) == 2
    assert read_jsonl(tmp_path / "missing.jsonl") == []


@pytest.mark.slow
def test_a_torn_last_search_line_is_dropped_and_its_trial_done_again(tmp_path, capsys):
    data, out = _folder(tmp_path / "imgs"), tmp_path / "search"
    args = ["search", "fashion_mnist:smoke", "--data", str(data), "--out", str(out), "--grid", "optim.lr=1e-3",
            "--steps", "2", *_sets(TINY)]
    assert main(args) == 0
    record = (out / "search.jsonl").read_text()
    (out / "search.jsonl").write_text(record[: len(record) // 2])  # killed while appending its one record
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'search.jsonl'}: dropped its last line" in printed and "0 already finished" in printed, printed
    assert json.loads((out / "search.jsonl").read_text())["trial"] == json.loads(record)["trial"]


# ---- a checkpoint folder that stops accepting writes -------------------------------------------------------
def test_an_unwritable_checkpoint_folder_stops_naming_it_and_keeps_the_last_good_checkpoint(tmp_path, capsys,
                                                                                          monkeypatch):
    from accelerate import Accelerator

    from flexivit.train.state import verify_state

    data, out = _folder(tmp_path / "imgs"), tmp_path / "run"
    real = Accelerator.save_state

    def refused_at_step_4(self, output_dir=None, **kw):
        if output_dir.endswith("step_4"):  # as if state/ had been made read-only after the first checkpoint
            raise PermissionError(13, "Permission denied", f"{output_dir}/model.safetensors")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", refused_at_step_4)
    code, err = _train(capsys, data, out)
    state = out / "state"
    assert code == 2 and f"cannot write the step-4 checkpoint into {state} (PermissionError: " in err, err
    assert f"the last good checkpoint is {state / 'step_2'}: make {state} writable" in err and "Traceback" not in err
    assert sorted(p.name for p in state.iterdir()) == ["step_2"] and verify_state(state / "step_2") is None


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_both_ranks_without_a_hang(tmp_path):
    out = tmp_path / "run"
    (out / "state").mkdir(parents=True)
    (out / "state" / ".tmp-step_4").write_text("")  # a file where the step-4 checkpoint's folder must go
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run([*launch, "-m", "flexivit", "train", "fashion_mnist:smoke", "--out", str(out),
                             "--data", str(_folder(tmp_path / "imgs")), *_sets(TINY)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    line = f"flexivit train: error: cannot write the step-4 checkpoint into {out / 'state'} (FileExistsError: "
    assert result.returncode != 0 and result.stderr.count(line) >= 2, result.stderr[-3000:]  # each rank, + report
    assert f"the last good checkpoint is {out / 'state' / 'step_2'}" in result.stderr
    assert sorted(p.name for p in (out / "state").iterdir() if p.is_dir()) == ["step_2"]
