"""Model files: exportable weights with their config, written atomically (training states: train/state.py).

- ``model.safetensors``: the FlexiViT weights with its config, class names and preprocessing in the
  safetensors metadata (one self-describing file, no pickle); ``model.json`` repeats it for people.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from flexivit.files import _publish, _temp_file, atomic_write_text
from flexivit.model.options import loading_weights
from flexivit.model.vit import FlexiViT, FlexiViTConfig

__all__ = [
    "CheckpointError", "save_model", "load_model", "read_model_meta", "atomic_write_text", "run_dir",
]

MODEL_FILE = "model.safetensors"
FORMAT = "flexivit-model-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save_model(model: FlexiViT, path: str | Path, *, class_names: list[str], preprocess: dict[str, Any],
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` (+ ``model.json``) into ``path`` (a folder) or to ``path`` (a file).

    ``state_dict`` replaces ``model.state_dict()`` where the full weights come from elsewhere (Accelerate's
    ``get_state_dict``, which gathers them under FSDP). An option may store its tensors in another form (its
    ``pack_state``, e.g. tied weights as values and packed indices); a plain model's file is unaffected."""
    path = Path(path)
    file = path / MODEL_FILE if path.suffix != ".safetensors" else path
    file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": model.config.to_dict(), "class_names": list(class_names),
            "preprocess": preprocess}
    state = model.state_dict() if state_dict is None else state_dict
    for option, values in model.config.active():
        state = option.pack_state(values, model, state)
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
    """The metadata stored in a model file (config, class names, preprocessing); for a big_vision ``.npz``,
    what ``flexivit.model.big_vision`` reads it as (from the arrays' shapes)."""
    if Path(path).suffix == ".npz":
        from flexivit.model.big_vision import big_vision_config, big_vision_meta  # it builds on this module

        return big_vision_meta(big_vision_config(path))
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


def load_model(path: str | Path, map_location: str = "cpu", **overrides: Any) -> tuple[FlexiViT, dict[str, Any]]:
    """Load a model file, a run directory's model or a big_vision ``.npz`` (``flexivit.model.big_vision``);
    returns ``(model in eval mode, metadata)``. An option may give the model the form its file holds
    (``for_loading``, e.g. tied weights without their shadows). ``overrides`` set config fields that keep the
    weights' shapes (e.g. ``drop_path_rate``)."""
    if Path(path).suffix == ".npz":
        from flexivit.model.big_vision import load_big_vision_model  # it builds on this module

        return load_big_vision_model(path, map_location, **overrides)
    meta = read_model_meta(path)
    with loading_weights():  # options skip work the file's tensors overwrite
        model = FlexiViT(FlexiViTConfig.from_dict({**meta["config"], **overrides}))
    for option, values in model.config.active():  # e.g. tied layers in their frozen form
        model = option.for_loading(values, model)
    try:
        state = load_file(str(_model_file(path)), device=map_location)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read the weights in {path}: {err}") from None
    for option, values in model.config.active():
        state = option.unpack_state(values, model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # only overrides that change a shape get here
        raise CheckpointError(f"the weights in {path} do not fit its config with {overrides}: "
                              f"{str(err).splitlines()[-1].strip()}") from None
    return model.eval(), meta


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
