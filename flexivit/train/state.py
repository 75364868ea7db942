"""Training states: ``state/step_N/`` folders (Accelerate's ``save_state`` plus ``trainer_state.json``),
written to a temporary folder, fingerprinted (size + sha256 of every file) and renamed into place, so a
crash never leaves a half-written "latest" checkpoint, and one damaged later on disk is detected and
skipped in favour of the previous one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from flexivit.files import _umask as umask, atomic_write_text
from flexivit.model.weights import CheckpointError

__all__ = ["finalize_state_dir", "find_states", "latest_good_state", "verify_state", "prune_states",
           "read_trainer_state", "MANIFEST"]

MANIFEST = "MANIFEST.json"


def _fingerprint(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        files[str(file.relative_to(folder))] = {"size": file.stat().st_size, "sha256": digest}
    return files


def finalize_state_dir(tmp: Path, final: Path, trainer_state: dict[str, Any]) -> Path:
    """Seal a fully written temporary state folder and move it into place atomically. Its files get the
    permissions a plain ``open`` gives (Accelerate's safetensors writer creates them 0600)."""
    for file in (p for p in tmp.rglob("*") if p.is_file()):
        os.chmod(file, 0o666 & ~umask())
    atomic_write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2) + "\n")
    atomic_write_text(tmp / MANIFEST, json.dumps({"files": _fingerprint(tmp)}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer's record in a state folder: ``step``, ``model_config`` and (since the reshaped trainer)
    the whole run ``config``."""
    try:
        return json.loads((folder / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder} has no readable trainer_state.json ({err}); it is not a flexivit "
                              "training checkpoint") from None


def verify_state(folder: Path) -> str | None:
    """``None`` if the state folder is complete and unchanged, else the reason it is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (the write did not finish)"
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable manifest"
    actual = _fingerprint(folder)
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            return f"missing file {name}"
        if got["size"] != want["size"]:
            return f"{name} is damaged (size {got['size']} bytes, expected {want['size']})"
        if got != want:
            return f"{name} is damaged (its content changed: sha256 differs from the manifest's, same size)"
    return None


def find_states(root: Path) -> list[Path]:
    """State folders ``step_N`` under ``root``, newest first."""
    if not root.is_dir():
        return []
    states = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(states, key=lambda p: int(p.name[5:]), reverse=True)


def latest_good_state(root: Path, warn=print) -> Path | None:
    """The newest state that verifies; damaged ones are reported through ``warn`` and skipped."""
    for folder in find_states(root):
        problem = verify_state(folder)
        if problem is None:
            return folder
        warn(f"skipping checkpoint {folder}: {problem}; falling back to the previous one")
    return None


def prune_states(root: Path, keep: int) -> None:
    for folder in find_states(root)[max(keep, 1):]:
        shutil.rmtree(folder, ignore_errors=True)
