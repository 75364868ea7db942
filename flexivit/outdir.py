"""Where a command may write: a folder that holds a model or a training run is not written over unless asked.

``export`` and ``train`` (and the commands that train) refuse an ``--out`` that holds a model file or a
training run (``state/``, ``log.jsonl``) unless ``--overwrite`` is passed; an ``--out`` that is a file, or
that lies under a file, is refused in one line by every command that writes a folder. docs/safety.md lists
what is refused and how to override it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["OutDirError", "MODEL_FILES", "RUN_MARKS", "check_folder_target", "held", "describe_held",
           "train_out_problem", "clear_run"]

MODEL_FILES = ("model.safetensors", "model.onnx", "model.pt2")  # a run's model, an export's weights or programs
RUN_MARKS = ("state", "log.jsonl")  # a training run's checkpoints and log


class OutDirError(ValueError):
    """An output folder that cannot be written as asked; the message says what to pass instead."""


def check_folder_target(out: str | Path, flag: str = "--out") -> Path:
    """``out`` as a folder to write into: refused when it is a file, or when a folder above it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"{flag} {out} is a file; give a folder (new or existing)")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OutDirError(f"{flag} {out} lies under {above}, which is a file, not a folder")
    return out


def held(folder: str | Path) -> list[str]:
    """The model files and training-run parts in ``folder`` (empty when it holds neither or does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [name for name in (*MODEL_FILES, *RUN_MARKS) if (folder / name).exists()]


def describe_held(names: list[str]) -> str:
    """``a training run (model.safetensors, state/)`` or ``a model (model.onnx)``: what ``held`` found."""
    kind = "a training run" if set(names) & set(RUN_MARKS) else "a model"
    return f"{kind} ({', '.join(n + '/' if n == 'state' else n for n in names)})"


# What a run writes besides its checkpoints: removed by ``--overwrite`` before the new run starts, so the
# folder never shows the old run's model, log or report as the new one's.
RUN_OUTPUTS = ("model.json", "eval.json", "eval.md", "eval_sweep.json", "eval_sweep.md", "eval_sweep.png", "tb")


def train_out_problem(out: Path, *, resume: bool, overwrite: bool, has_states: bool) -> str | None:
    """Why a training may not write into ``out`` as asked (``None``: it may)."""
    if resume and overwrite:
        return "--resume continues the run in --out and --overwrite replaces it; pass one of them"
    if overwrite:
        return None
    if not resume and has_states:
        return f"{out} already holds checkpoints; pass --resume to continue it, --overwrite to start it over, or " \
               "choose a new --out"
    models = [name for name in MODEL_FILES if (out / name).exists()]
    if models and not has_states:
        return f"{out} already holds a model ({', '.join(models)}) and no checkpoint to " \
               f"{'resume' if resume else 'continue'}; pass --overwrite to train a new one over it, or choose a new --out"
    return None


def clear_run(out: Path) -> list[str]:
    """Remove a previous run's checkpoints, model, log and report from ``out``; returns the names removed."""
    removed = []
    for name in (*RUN_MARKS, *MODEL_FILES, *RUN_OUTPUTS):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed
