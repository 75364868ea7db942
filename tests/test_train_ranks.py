"""Two real CPU ranks (gloo, through `accelerate launch`): they agree on every step, draw their own
dropout masks, and stop together, with the same message, on every error a user can cause."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import PROBE, ROOT, TINY, _env, _probe, _sets

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**_env(), "ACCELERATE_USE_CPU": "1"})


def _printed(result: subprocess.CompletedProcess, text: str) -> int:
    """How many ranks printed the error line holding ``text`` (the launcher's report quotes it once more)."""
    printed = re.findall(r"(?<!traceback : )flexivit train: error: [^\n]*", result.stderr)  # a line may follow a bar
    return sum(text in line for line in printed)


def _reported(result: subprocess.CompletedProcess, text: str) -> int:
    """How many ranks the launcher's report names with the error line holding ``text`` (their error files)."""
    return sum(text in line for line in re.findall(r"traceback : flexivit train: error: [^\n]*", result.stderr))


def _cli_on_two_ranks(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = _launch("-m", "flexivit", *args)
    return result, time.perf_counter() - start


@pytest.mark.slow
def test_two_cpu_ranks_draw_the_same_schemes_and_their_own_masks(tmp_path):
    out = tmp_path / "ddp"
    result = _launch(str(PROBE), str(out), *_sets(TINY + ["model.drop_path_rate=0.5", "model.depth=2"]))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [_probe(out, r) for r in (0, 1)]
    assert len(ranks[0]["schemes"]) == 12
    assert ranks[0]["schemes"] == ranks[1]["schemes"]
    assert len({p for _, p in ranks[0]["schemes"]}) > 1  # the size really changes between steps
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["trace"] == ranks[1]["trace"]
    # Each rank seeds dropout from (seed, step, micro, rank): the same step drops other samples per rank.
    differing = [s for s in ranks[0]["masks"] if ranks[0]["masks"][s] != ranks[1]["masks"][s]]
    assert len(differing) >= 10, differing


@pytest.mark.slow
def test_existing_checkpoints_stop_both_ranks_with_the_message(tmp_path):
    out = tmp_path / "run"
    first, _ = _cli_on_two_ranks("train", "fashion_mnist:smoke", "--out", str(out), *_sets(TINY + ["train.steps=4"]))
    assert first.returncode == 0, first.stderr[-3000:]
    again, seconds = _cli_on_two_ranks("train", "fashion_mnist:smoke", "--out", str(out), *_sets(TINY))
    assert again.returncode != 0
    assert _printed(again, "already holds checkpoints; pass --resume") == 2, again.stderr[-3000:]  # each rank
    assert _reported(again, "already holds checkpoints; pass --resume") == 2, again.stderr[-3000:]
    assert seconds < 120


@pytest.mark.slow
def test_resume_with_a_changed_config_stops_both_ranks_naming_the_field(tmp_path):
    out = tmp_path / "run"
    first, _ = _cli_on_two_ranks("train", "fashion_mnist:smoke", "--out", str(out), *_sets(TINY + ["train.steps=4"]))
    assert first.returncode == 0, first.stderr[-3000:]
    changed, seconds = _cli_on_two_ranks("train", "fashion_mnist:smoke", "--out", str(out), "--resume",
                                         *_sets(TINY + ["train.token_budget=1568"]))
    assert changed.returncode != 0
    # Both ranks print the line, each whole (print_line: printed in two writes, the ranks' lines once ran
    # together as one, in about 1 run of 10), and record it for the launcher's report.
    assert _printed(changed, "train.token_budget: 0 -> 1568") == 2, changed.stderr[-3000:]
    assert _reported(changed, "train.token_budget: 0 -> 1568") == 2, changed.stderr[-3000:]
    assert seconds < 120
    longer, _ = _cli_on_two_ranks("train", "fashion_mnist:smoke", "--out", str(out), "--resume", *_sets(TINY))
    assert longer.returncode == 0, longer.stderr[-3000:]  # more steps and another cadence are allowed
    log = [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 12
