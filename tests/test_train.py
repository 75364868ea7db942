"""The trainer through its real entry points: CLI, accelerate launch with two CPU ranks, kill + resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flexivit.train.state import find_states, latest_good_state

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "scripts" / "train_probe.py"
# A tiny, fast configuration of the smoke recipe for the mechanics tests.
TINY = ["model.embed_dim=32", "model.depth=1", "data.batch_size=32", "data.eval_limit=256",
        "train.steps=12", "train.checkpoint_every=4", "train.keep_checkpoints=3", "train.log_every=4",
        "train.token_budget=0"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT)}


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600, **kw)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "flexivit", *args])


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def _probe(run: Path, rank: int = 0) -> dict:
    return json.loads((run / f"probe_rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["train.token_budget=1568"]], ids=["plain", "token-budget"])
def test_kill_and_resume_is_bit_identical(tmp_path, extra):
    """Weights, drop-path masks after the resume, and a post-step hook's state all match an uninterrupted
    run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    tiny = TINY + extra + ["model.drop_path_rate=0.5", "model.depth=2"]  # token budget 32 x 49: patch 7 steps take 3 batches
    assert _run([sys.executable, str(PROBE), str(straight), *_sets(tiny)]).returncode == 0
    crash = _run([sys.executable, str(PROBE), str(killed), "--kill-after", "6", *_sets(tiny)])
    assert crash.returncode == -9  # SIGKILL mid-epoch, two steps after the step-4 checkpoint
    assert [p.name for p in find_states(killed / "state")] == ["step_4"]
    resumed = _run([sys.executable, str(PROBE), str(killed), "--resume", *_sets(tiny)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), f"{name} differs after kill + resume"
    log = [json.loads(l) for l in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "per_patch" in r] == [4, 8, 12]  # no duplicated lines after resume
    a, b = _probe(straight), _probe(killed)
    assert a["trace"] == b["trace"]  # the hook's state came back from the step-4 checkpoint
    resumed_steps = [str(s) for s in range(5, 13)]
    assert [a["masks"][s] for s in resumed_steps] == [b["masks"][s] for s in resumed_steps]
    assert any(1 in m for s in resumed_steps for m in a["masks"][s])  # drop-path really dropped samples


@pytest.mark.slow
def test_cli_smoke_trains_checkpoints_and_evaluates_every_size(tmp_path):
    out = tmp_path / "smoke"
    result = _cli("train", "fashion_mnist:smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy at every patch size" in result.stdout
    report = json.loads((out / "eval.json").read_text())
    accuracies = {r["patch_size"]: r["top1"] for r in report["results"]}
    assert sorted(accuracies) == [2, 4, 7, 14]
    for patch, top1 in accuracies.items():
        assert top1 > 0.35, f"patch {patch}: top-1 {top1:.3f} is not far above chance (0.1)"
    assert json.loads((out / "config.json").read_text())["name"] == "fashion_mnist-smoke"
    assert [p.name for p in find_states(out / "state")] == ["step_200", "step_100"]
    assert (out / "model.safetensors").exists() and list((out / "tb").rglob("events.out.tfevents*"))


@pytest.mark.slow
def test_truncated_checkpoint_is_refused_and_previous_used(tmp_path):
    out = tmp_path / "run"
    assert _cli("train", "fashion_mnist:smoke", "--out", str(out), *_sets(TINY)).returncode == 0
    newest = find_states(out / "state")[0]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    messages = []
    assert latest_good_state(out / "state", warn=messages.append).name == "step_8"
    assert "model.safetensors is damaged" in messages[0] and "falling back" in messages[0]
    resumed = _cli("train", "fashion_mnist:smoke", "--out", str(out), "--resume", *_sets(TINY))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint" in resumed.stdout + resumed.stderr and "step 8" in resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_resume_with_another_model_shape_is_refused(tmp_path):
    out = tmp_path / "run"
    assert _cli("train", "fashion_mnist:smoke", "--out", str(out), *_sets(TINY)).returncode == 0
    bad = _cli("train", "fashion_mnist:smoke", "--out", str(out), "--resume", *_sets(TINY + ["model.embed_dim=48"]))
    assert bad.returncode == 2
    assert "another model shape" in bad.stderr and "embed_dim" in bad.stderr


@pytest.mark.slow
def test_diverging_loss_stops_with_a_clear_message(tmp_path):
    out = tmp_path / "run"
    bad = _cli("train", "fashion_mnist:smoke", "--out", str(out),
               *_sets(TINY + ["optim.lr=1e30", "optim.clip_grad=none", "optim.warmup_steps=0"]))
    assert bad.returncode == 2
    assert "the loss became" in bad.stderr and "last good checkpoint" in bad.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "fashoin_mnist"], "did you mean fashion_mnist"),
        (["train", "fashion_mnist", "--set", "optim.lrr=1"], "did you mean optim.lr"),
        (["train", "fashion_mnist", "--set", "train.steps=many"], "expected an integer"),
        (["train", "fashion_mnist", "--set", "optim.lr"], "must look like section.key=value"),
        (["train", "fashion_mnist", "--data", "/no/such/folder"], "/no/such/folder"),
        (["train", "fashion_mnist:huge"], "takes no argument or 'smoke'"),
    ],
)
def test_bad_input_messages(args, message, tmp_path):
    result = _cli(*args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr[-2000:]


def test_help_lists_recipes():
    result = _cli("train", "--help")
    assert result.returncode == 0 and "fashion_mnist" in result.stdout


def test_internal_errors_keep_their_traceback(tmp_path):
    """User errors print one line (exit 2); a bug inside a recipe or the library is not hidden as one."""
    recipe = tmp_path / "broken.py"
    recipe.write_text("def get_config(arg=None):\n    return {}['missing']\n")
    result = _cli("train", str(recipe), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "KeyError: 'missing'" in result.stderr
