"""The Hugging Face Hub: ``FlexiViT.save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

``FlexiViT`` takes ``huggingface_hub.PyTorchModelHubMixin`` as a base, which gives ``push_to_hub`` (create the
repo, one commit of the saved folder) and the model card; this module is the part that is FlexiViT's own.
A saved folder (and a Hub repo) holds::

    model.safetensors   what flexivit.model.weights.save_model writes: the weights, with the config, class names
                        and preprocessing in its metadata (so the folder is also a run directory for
                        `flexivit eval`, `predict`, `export`, and load_model)
    model.json          that metadata again, for people
    config.json         the same for the Hub and other tools: format, architecture, model config, class names,
                        preprocessing and a timm-style pretrained_cfg
    README.md           the mixin's model card (an existing one is kept)

``from_pretrained`` reads the config from ``model.safetensors`` itself, not from ``config.json`` as the
mixin's own loader would (it passes config.json's keys to ``__init__``, which would skip
``FlexiViTConfig.from_dict``'s checks and mistake a run directory's recipe ``config.json`` for model
arguments), so a run directory, a run's ``model.safetensors`` and a saved folder all load. Class names
and preprocessing travel on the model as timm's ``pretrained_cfg`` (``label_names``, ``input_size``,
``crop_pct``, ``mean``, ``std``, ``interpolation``), so a loaded model saves or pushes them again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from flexivit.model.weights import FORMAT, MODEL_FILE, CheckpointError, load_model, save_model
from flexivit.files import atomic_write_text
from flexivit.data.transforms import preprocess_spec

if TYPE_CHECKING:
    from flexivit.model.vit import FlexiViT

__all__ = ["HUB_FORMAT", "CONFIG_FILE", "attach_meta", "model_meta", "hub_config", "write_folder", "save_pretrained",
           "load_pretrained"]

HUB_FORMAT = "flexivit-hub-v1"
CONFIG_FILE = "config.json"
_FOLDER_FILES = (MODEL_FILE, "model.json", CONFIG_FILE, "README.md")  # weights first: they carry the config


def _export_format(folder: Path) -> str | None:
    """The format a ``flexivit export`` folder's ``config.json`` names (a timm or program export), else None.
    Read here rather than asking ``flexivit.eval.export``, which sits above the model layer."""
    try:
        fmt = json.loads((folder / "config.json").read_text()).get("format")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return fmt if isinstance(fmt, str) and fmt.startswith("flexivit-") and "export" in fmt else None


def attach_meta(model: FlexiViT, meta: dict[str, Any]) -> None:
    """Keep a model file's class names and preprocessing on ``model.pretrained_cfg`` (timm's keys)."""
    pre = meta.get("preprocess") or {}
    model.pretrained_cfg["label_names"] = list(meta.get("class_names") or [])
    if pre:
        model.pretrained_cfg.update(
            input_size=(pre["channels"], pre["image_size"], pre["image_size"]), crop_pct=pre.get("crop_pct", 1.0),
            mean=tuple(pre["mean"]), std=tuple(pre["std"]), interpolation=pre.get("interpolation", "bilinear"))


def model_meta(model: FlexiViT) -> dict[str, Any]:
    """Class names and preprocessing to save with ``model``: those attached by a load (``attach_meta``),
    else none and the default preprocessing of a model file saved without any (pixels in [-1, 1])."""
    cfg = model.pretrained_cfg
    if "label_names" not in cfg:  # never loaded from a file: the defaults flexivit.eval.export also uses
        return {"class_names": [], "preprocess": preprocess_spec(image_size=model.config.img_size,
                                                                 channels=model.config.in_chans)}
    channels, size, _ = cfg["input_size"]
    pre = {"image_size": size, "channels": channels, "crop_pct": cfg["crop_pct"], "mean": list(cfg["mean"]),
           "std": list(cfg["std"]), "interpolation": cfg["interpolation"]}
    return {"class_names": list(cfg["label_names"]), "preprocess": pre}


def hub_config(model: FlexiViT, meta: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of a saved folder."""
    pre, names = meta["preprocess"], meta["class_names"]
    return {
        "format": HUB_FORMAT,
        "architecture": "FlexiViT",
        "weights": {"file": MODEL_FILE, "format": FORMAT},
        "model_config": model.config.to_dict(),
        "num_classes": model.config.num_classes,
        "class_names": names,
        "label_names": names,
        "preprocess": pre,
        "pretrained_cfg": {  # what timm's data helpers read (timm.data.resolve_data_config)
            "input_size": [pre["channels"], pre["image_size"], pre["image_size"]],
            "interpolation": pre["interpolation"],
            "crop_pct": pre["crop_pct"],
            "crop_mode": "center",
            "mean": pre["mean"],
            "std": pre["std"],
            "num_classes": model.config.num_classes,
        },
    }


def write_folder(model: FlexiViT, directory: Path) -> None:
    """The mixin's ``_save_pretrained``: ``model.safetensors`` (+ ``model.json``) and ``config.json``."""
    meta = model_meta(model)
    save_model(model, directory, class_names=meta["class_names"], preprocess=meta["preprocess"])
    atomic_write_text(directory / CONFIG_FILE, json.dumps(hub_config(model, meta), indent=2) + "\n")


def _check_target(target: Path) -> None:
    config = target / CONFIG_FILE
    if not config.is_file():
        return
    try:
        ours = json.loads(config.read_text()).get("format") == HUB_FORMAT
    except (json.JSONDecodeError, AttributeError, OSError):
        ours = False
    if not ours:
        raise CheckpointError(f"{target} holds a {CONFIG_FILE} that save_pretrained did not write (a run's recipe or "
                              "an export?); save into a new folder so that it is not overwritten")


def save_pretrained(model: FlexiViT, save_directory: str | Path, *, class_names: list[str] | None = None,
                    preprocess: dict[str, Any] | None = None, **kwargs: Any) -> str | None:
    """``FlexiViT.save_pretrained``: the mixin's, written into a temporary folder beside ``save_directory`` and
    moved in once complete (each file replaced atomically, an existing README.md kept), so a failed save
    leaves nothing half-written. ``class_names`` / ``preprocess`` replace those the model carries; ``kwargs``
    go to ``PyTorchModelHubMixin.save_pretrained`` (``push_to_hub``, ``repo_id``, ``model_card_kwargs``...)."""
    target = Path(save_directory)
    _check_target(target)
    if class_names is not None or preprocess is not None:
        meta = model_meta(model)
        attach_meta(model, {"class_names": meta["class_names"] if class_names is None else class_names,
                            "preprocess": meta["preprocess"] if preprocess is None else preprocess})
    if kwargs.get("push_to_hub") and kwargs.get("repo_id") is None:
        kwargs["repo_id"] = target.name  # the mixin's default, which would otherwise name the temporary folder
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        result = PyTorchModelHubMixin.save_pretrained(model, tmp, **kwargs)
        target.mkdir(exist_ok=True)
        for name in _FOLDER_FILES:
            if (tmp / name).is_file() and not (name == "README.md" and (target / name).exists()):
                os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _model_file(name: str | Path, **download: Any) -> Path:
    """``model.safetensors`` of a local folder, the file itself, or a Hub repo's (downloaded or cached)."""
    path = Path(name)
    if path.is_dir():
        if _export_format(path):
            raise CheckpointError(f"{path} is a `flexivit export` folder (a timm ViT at one patch size): load it "
                                  "with flexivit.eval.export.load_export or timm.create_model('local-dir:...')")
        if not (path / MODEL_FILE).is_file():
            raise CheckpointError(f"{path} holds no {MODEL_FILE}; pass a folder written by save_pretrained, a run "
                                  "directory or a Hub repo id")
        return path / MODEL_FILE
    if path.is_file():
        return path
    try:
        return Path(hf_hub_download(repo_id=str(name), filename=MODEL_FILE, **download))
    except HFValidationError:
        raise CheckpointError(f"{name} is neither a local folder or file nor a Hub repo id (user/name)") from None
    except (LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError) as err:
        raise CheckpointError(f"cannot get {MODEL_FILE} of Hub repo {name}: {_first_line(err)}") from None


def load_pretrained(name_or_path: str | Path, *, map_location: str = "cpu", revision: str | None = None,
                    cache_dir: str | Path | None = None, force_download: bool = False, token: str | bool | None = None,
                    local_files_only: bool = False, **overrides: Any) -> FlexiViT:
    """``FlexiViT.from_pretrained``: a model (eval mode) from a folder written by ``save_pretrained``, a run
    directory, a model file, or a Hub repo id (downloaded with ``hf_hub_download``, which honours
    ``HF_HUB_OFFLINE`` and the cache). ``overrides`` set config fields that keep the weights' shapes (e.g.
    ``drop_path_rate``); to change the classes, load and call ``reset_classifier``."""
    file = _model_file(name_or_path, revision=revision, cache_dir=cache_dir, force_download=force_download,
                       token=token, local_files_only=local_files_only)
    model, meta = load_model(file, map_location=map_location, **overrides)  # its errors name the file and why
    attach_meta(model, meta)
    return model
