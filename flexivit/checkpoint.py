"""Checkpoints: exportable model files and verified training states, written atomically.

- ``model.safetensors``: the FlexiViT weights with its config, class names and preprocessing in the
  safetensors metadata (one self-describing file, no pickle); ``model.json`` repeats it for people.
- ``state/step_N/``: Accelerate's ``save_state`` (safetensors + weights-only tensors) plus our
  ``trainer_state.json``; written to a temporary folder, fingerprinted (size + sha256 of every file) and
  renamed into place, so a crash never leaves a half-written "latest" checkpoint, and a checkpoint
  damaged later on disk is detected and skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from .files import _publish, _temp_file, _umask as umask, atomic_write_text
from .lutq import freeze, pack_state, unpack_state
from .model import FlexiViT, FlexiViTConfig

__all__ = [
    "CheckpointError", "save_model", "load_model", "read_model_meta", "atomic_write_text", "run_dir",
    "finalize_state_dir", "find_states", "latest_good_state", "verify_state", "prune_states", "read_trainer_state",
]

MODEL_FILE = "model.safetensors"
MANIFEST = "MANIFEST.json"
FORMAT = "flexivit-model-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save_model(model: FlexiViT, path: str | Path, *, class_names: list[str], preprocess: dict[str, Any],
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` (+ ``model.json``) into ``path`` (a folder) or to ``path`` (a file).

    ``state_dict`` replaces ``model.state_dict()`` where the full weights come from elsewhere (Accelerate's
    ``get_state_dict``, which gathers them under FSDP). LUT-Q layers are stored as their values and packed
    indices, without the shadow weights (``flexivit.lutq.pack_state``); a plain model's file is unaffected."""
    path = Path(path)
    file = path / MODEL_FILE if path.suffix != ".safetensors" else path
    file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": model.config.to_dict(), "class_names": list(class_names),
            "preprocess": preprocess}
    state = pack_state(model, model.state_dict() if state_dict is None else state_dict)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    fd, tmp = _temp_file(file)
    os.close(fd)
    save_file(tensors, tmp, metadata={"flexivit": json.dumps(meta)})
    _publish(tmp, file)
    atomic_write_text(file.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return file


def run_dir(checkpoint: str | Path) -> Path:
    """The folder a checkpoint belongs to (its config.json and eval.json live there): a run directory
    itself, or the folder of a model file."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        file = path / MODEL_FILE
        if not file.exists():
            raise CheckpointError(
                f"{path} holds no {MODEL_FILE}; pass a finished run directory or a .safetensors model file "
                "(an unfinished run can be continued with `flexivit train ... --resume`)"
            )
        return file
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """The metadata stored in a model file (config, class names, preprocessing)."""
    file = _model_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            raw = (f.metadata() or {}).get("flexivit")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors model file ({err})") from None
    if raw is None:
        raise CheckpointError(f"{file} is a safetensors file but not a flexivit model (no 'flexivit' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: unsupported model format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[FlexiViT, dict[str, Any]]:
    """Load a model file or a run directory's model; returns ``(model in eval mode, metadata)``. A LUT-Q
    model comes back in its frozen form (values and indices, no shadow weights)."""
    meta = read_model_meta(path)
    model = freeze(FlexiViT(FlexiViTConfig.from_dict(meta["config"])))
    try:
        state = load_file(str(_model_file(path)), device=map_location)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read the weights in {path}: {err}") from None
    model.load_state_dict(unpack_state(model, state), strict=True)
    return model.eval(), meta


# ---- training states ---------------------------------------------------------------------------------
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


def load_weights_only(path: Path) -> Any:
    """Read a ``.pth``/``.bin`` of plain tensors; refuses pickles that would run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or others by format
        raise CheckpointError(
            f"{path} cannot be loaded safely: it is not a file of plain tensors ({type(err).__name__}), and "
            "reading it would mean running code stored in it, which flexivit never does. Convert it to "
            "safetensors where you trust it (safetensors.torch.save_file(state_dict, 'model.safetensors'))"
        ) from None
