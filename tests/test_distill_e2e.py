"""Teacher → distilled FlexiViT → fine-tuned (flexible and fixed-size), all through the CLI on real data."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from flexivit.model.weights import load_model

from test_train import ROOT, _env


CLASSES = ["Trouser", "Bag", "Sandal", "Pullover"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexivit", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=900)


def _rank(run, share: float = 0.1) -> int:
    """Singular values of the run's base kernel, read as (D, C*h*w), above ``share`` of the largest."""
    s = torch.linalg.svdvals(load_model(run)[0].patch_embed.weight.detach().double().flatten(1))
    return int((s > share * s[0]).sum())


def _top1(run) -> dict[int, float]:
    return {r["patch_size"]: r["top1"] for r in json.loads((run / "eval.json").read_text())["results"]}


@pytest.mark.slow
def test_teacher_distill_finetune_pipeline(tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    quick = ["--set", "train.steps=120", "--set", "train.checkpoint_every=60"]
    done = _cli("train", "fashion_mnist_teacher:smoke", "--out", str(teacher), *quick)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _cli("train", "fashion_mnist_distill:smoke", "--out", str(student), "--set", f"distill.teacher={teacher}", *quick)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(l) for l in (student / "log.jsonl").read_text().splitlines()]
    for window in (r["per_patch"] for r in log if "per_patch" in r):
        for stats in window.values():  # logged per patch size
            assert {"distill", "agree", "acc", "loss"} <= set(stats) and 0 <= stats["agree"] <= 1
    state = student / "state" / "step_120"
    assert [p.name for p in state.glob("model*.safetensors")] == ["model.safetensors"]  # one model: no teacher
    saved_model, _ = load_model(student)
    with safe_open(str(state / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(saved_model.state_dict())  # the student's weights and nothing else

    upsampled = tmp_path / "student-upsampled"
    done = _cli("train", "fashion_mnist_distill:smoke", "--out", str(upsampled), "--set", f"distill.teacher={teacher}",
                "--set", "distill.full_rank_base=false", *quick)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _rank(upsampled) <= 16 < _rank(student)  # the upsampled 4x4 kernel stays near rank 16 at 0.02x the lr

    flexible, fixed = tmp_path / "ft-flexible", tmp_path / "ft-fixed"
    task = quick + ["--set", f"data.classes={','.join(CLASSES)}"]  # a quicker task than the recipe's tops
    done = _cli("finetune", str(student), "fashion_mnist_finetune:smoke", "--out", str(flexible), *task)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _cli("finetune", str(student), "fashion_mnist_finetune:smoke", "--patch-size", "7", "--out", str(fixed), *task)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in (flexible, fixed):
        assert sorted(_top1(run)) == [2, 4, 7, 14]  # evaluated at every size
        assert json.loads((run / "model.json").read_text())["class_names"] == CLASSES
    for patch, top1 in _top1(flexible).items():
        assert top1 > 0.45, f"flexible fine-tuning, patch {patch}: {top1:.3f} is not far above chance (0.25)"
    assert json.loads((fixed / "config.json").read_text())["patch"]["sizes"] == [7]


def test_finetune_bad_input(tmp_path):
    bad = _cli("finetune", str(tmp_path / "nothing"), "fashion_mnist_finetune:smoke", "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    bad = _cli("finetune", str(tmp_path / "junk.safetensors"), "fashion_mnist_finetune:smoke", "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and "not a readable safetensors model file" in bad.stderr
    bad = _cli("finetune", str(tmp_path / "nothing"), "fashion_mnist_finetune:smoke", "--patch-size", "5")
    assert bad.returncode == 2 and "valid patch sizes: 1, 2, 4, 7, 14, 28" in bad.stderr
