"""Export a FlexiViT at one patch size as a plain timm ``VisionTransformer`` (+ ONNX, + ``torch.export``).

An export folder holds::

    config.json          model_args, preprocessing, class names, provenance, the check that was made
    model.safetensors    the timm VisionTransformer's state_dict
    model.onnx           with --onnx (needs the onnx and onnxscript packages)
    model.pt2            with --torch-export (torch.export.save; batch size dynamic)

It loads with timm alone (no flexivit import), in either of two ways::

    cfg = json.load(open("DIR/config.json"))
    model = timm.models.vision_transformer.VisionTransformer(**cfg["model_args"])
    model.load_state_dict(safetensors.torch.load_file("DIR/model.safetensors"))

    model = timm.create_model("local-dir:DIR", pretrained=True)   # timm >= 1.0 local folders

(``architecture`` names a plain timm ViT entrypoint only so that ``create_model`` can build one; every
architecture argument comes from ``model_args``.) Nothing is written unless the exported model's logits
match the flexible model's on a sample batch, and each file is checked again after it has been read
back; the files then move into ``--out`` together.

A model that is not a plain ViT (``FlexiViT.is_plain_vit()`` false: an option it has cannot fold into timm's weights) has no
timm form. Its export holds ``config.json`` (format ``flexivit-program-export-v1``: what the model is, its
input and output, preprocessing, class names, the check) and ``model.onnx`` and/or ``model.pt2``: the
FlexiViT called at the fixed patch size (``FixedPatchModel``), traced, read back and checked the same way.
Without ``--onnx`` / ``--torch-export`` such an export is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from flexivit.model.weights import load_model
from flexivit.files import _umask
from flexivit.model.vit import FlexiViT
from flexivit.outdir import OutDirError, check_folder_target, describe_held, held
from flexivit.model.patch_embed import check_patch_sizes
from flexivit.model.timm_interop import timm_vit_kwargs
from flexivit.data.transforms import preprocess_spec

__all__ = [
    "ExportError", "ExportResult", "EXPORT_FORMAT", "PROGRAM_FORMAT", "FixedPatchModel", "export_model",
    "export_checkpoint", "load_export", "is_export_dir", "default_preprocess",
]

EXPORT_FORMAT = "flexivit-timm-export-v1"
PROGRAM_FORMAT = "flexivit-program-export-v1"  # ONNX / torch.export only: a model that is not a plain ViT
CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE, PROGRAM_FILE = "config.json", "model.safetensors", "model.onnx", "model.pt2"
TIMM_ARCHITECTURE = "vit_tiny_patch16_224"  # any plain ViT entrypoint: model_args override all its defaults
SAMPLE_BATCH = 4


class ExportError(ValueError):
    """An export that cannot be made or does not reproduce the model; nothing was written."""


class FixedPatchModel(nn.Module):
    """A FlexiViT at one patch size, ``forward(image) -> logits``: what ONNX / ``torch.export`` trace for a
    model that ``to_fixed`` cannot turn into a timm ViT."""

    def __init__(self, model: FlexiViT, patch_size: int) -> None:
        super().__init__()
        self.model = model
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.model(x, self.patch_size)


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # per checked artefact


def default_preprocess(model: FlexiViT) -> dict[str, Any]:
    """Preprocessing for a model file saved without any: the model's size and channels, pixels in [-1, 1]."""
    return preprocess_spec(image_size=model.config.img_size, channels=model.config.in_chans)


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _require_onnx() -> None:
    missing = _missing("onnx", "onnxscript")
    if missing:
        raise ExportError(
            f"--onnx needs the {' and '.join(missing)} package(s), which are not installed: "
            f"`pip install {' '.join(missing)}` (or leave out --onnx)"
        )


def _config(model: FlexiViT, patch: int, meta: dict[str, Any], source: str | None) -> dict[str, Any]:
    cfg = model.config
    pre = {**default_preprocess(model), **(meta.get("preprocess") or {})}
    names = list(meta.get("class_names") or [str(i) for i in range(cfg.num_classes)])
    if model.is_plain_vit():
        head = {"format": EXPORT_FORMAT, "architecture": TIMM_ARCHITECTURE, "num_classes": cfg.num_classes,
                "model_args": timm_vit_kwargs(cfg, patch, cfg.img_size)}
    else:
        head = {"format": PROGRAM_FORMAT, "num_classes": cfg.num_classes,
                "model": f"a FlexiViT with {' and '.join(model.non_plain_parts())} at patch size {patch} (not a timm "
                         "VisionTransformer: load model.pt2 with torch.export.load, or run model.onnx)",
                "inputs": {"image": ["batch", pre["channels"], pre["image_size"], pre["image_size"]]},
                "outputs": {"logits": ["batch", cfg.num_classes]}}
    return {
        **head,
        "patch_size": patch,
        "class_names": names,
        "label_names": names,
        "preprocess": pre,
        "pretrained_cfg": {  # what timm's data helpers read (timm.data.resolve_data_config)
            "input_size": [pre["channels"], pre["image_size"], pre["image_size"]],
            "fixed_input_size": True,
            "interpolation": pre["interpolation"],
            "crop_pct": pre["crop_pct"],
            "crop_mode": "center",
            "mean": pre["mean"],
            "std": pre["std"],
            "num_classes": cfg.num_classes,
        },
        "source": {"checkpoint": source, "flexivit_config": cfg.to_dict()},
    }


def load_export(folder: str | Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """The exported timm model (eval mode) and its config, read the way docs/deploy.md shows."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = VisionTransformer(**config["model_args"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval(), config


def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``export_model``."""
    file = Path(path) / CONFIG_FILE
    if not (Path(path).is_dir() and file.is_file() and (Path(path) / WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads(file.read_text()).get("format") == EXPORT_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def _check(what: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> float:
    if got.shape != ref.shape:
        raise ExportError(f"{what}: logits of shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    diff = (got.float() - ref.float()).abs()
    worst = float(diff.max())
    if not bool((diff <= atol + rtol * ref.float().abs()).all()):
        raise ExportError(
            f"{what}: logits differ from the flexible model's (max |diff| {worst:.3g}, tolerance "
            f"{atol:g} + {rtol:g}*|logit|); nothing was written"
        )
    return worst


def _sample(model: FlexiViT, batch: int = SAMPLE_BATCH) -> torch.Tensor:
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)  # (B, C, H, W)


def _write_program(fixed: nn.Module, x: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(fixed, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def _write_onnx(fixed: nn.Module, x: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(fixed, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                      input_names=["image"], output_names=["logits"], external_data=False, verbose=False)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda inp: torch.from_numpy(session.run(None, {"image": inp.numpy()})[0])
    from onnx.reference import ReferenceEvaluator  # part of the onnx package

    evaluator = ReferenceEvaluator(str(path))
    return lambda inp: torch.from_numpy(evaluator.run(None, {"image": inp.numpy()})[0])


def _move_into(tmp: Path, out_dir: Path, names: list[str]) -> dict[str, Path]:
    """Publish the checked files of ``tmp`` in ``out_dir``. A new folder is ``tmp`` renamed into place: it appears
    whole or not at all. Into an existing folder its old config.json goes first and the new one comes last, so a
    crash in between leaves a folder without config.json (not loadable: ``is_export_dir`` is false), never a new
    config beside old weights; export files there that this export did not make are removed."""
    umask = _umask()
    for name in names:
        os.chmod(tmp / name, 0o666 & ~umask)  # some writers create 0600 files; exports are for sharing
    if not out_dir.exists():
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700
        os.replace(tmp, out_dir)
        return {name: out_dir / name for name in names}
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    for stale in {WEIGHTS_FILE, ONNX_FILE, PROGRAM_FILE} - set(names):
        (out_dir / stale).unlink(missing_ok=True)
    for name in sorted(names, key=lambda n: n == CONFIG_FILE):  # config.json last
        os.replace(tmp / name, out_dir / name)
    return {name: out_dir / name for name in names}


@torch.no_grad()
def export_model(
    model: FlexiViT, meta: dict[str, Any], patch_size: int, out_dir: str | Path, *, onnx: bool = False,
    torch_export: bool = False, atol: float = 1e-5, rtol: float = 1e-5, source: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``model`` at ``patch_size`` as a timm ViT into ``out_dir`` after checking its logits; a model that
    is not a plain ViT as ONNX / ``torch.export`` only (one of the two must be asked for). A ``out_dir`` that
    already holds a model or a training run is refused unless ``overwrite``."""
    found = held(check_folder_target(out_dir))
    if found and not overwrite:
        raise OutDirError(f"--out {out_dir} already holds {describe_held(found)}; pass --overwrite to replace its "
                          "model files with the export, or choose another --out")
    patch = check_patch_sizes([int(patch_size)], model.config.img_size)[0].patch
    plain = model.is_plain_vit()
    if not plain and not (onnx or torch_export):
        raise ExportError(
            f"this model has {' and '.join(model.non_plain_parts())}, which timm's VisionTransformer cannot hold, so "
            f"there are no timm files to write; pass --onnx and/or --torch-export to export it at patch size {patch} "
            "as model.onnx / model.pt2 instead"
        )
    if onnx:
        _require_onnx()
    model = model.eval().to("cpu")
    x = _sample(model)
    ref = model(x, patch)  # (B, classes)
    fixed = model.to_fixed(patch).eval() if plain else FixedPatchModel(model, patch).eval()
    result = ExportResult(out_dir=Path(out_dir))
    if plain:
        result.max_abs_diff["timm"] = _check("the timm VisionTransformer", fixed(x), ref, atol, rtol)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        config = _config(model, patch, meta, source)
        names = [CONFIG_FILE]
        if plain:
            state = {k: v.detach().contiguous() for k, v in fixed.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            reloaded, _ = load_export(tmp)
            result.max_abs_diff[WEIGHTS_FILE] = _check(f"{WEIGHTS_FILE} read back", reloaded(x), ref, atol, rtol)
            names.append(WEIGHTS_FILE)
        if torch_export:
            program = _write_program(fixed, x, tmp / PROGRAM_FILE)
            result.max_abs_diff[PROGRAM_FILE] = _check(f"{PROGRAM_FILE} read back", program(x), ref, atol, rtol)
            names.append(PROGRAM_FILE)
        if onnx:
            session = _write_onnx(fixed, x, tmp / ONNX_FILE)
            result.max_abs_diff[ONNX_FILE] = _check(f"{ONNX_FILE} read back", session(x), ref, atol, rtol)
            names.append(ONNX_FILE)
        config["verification"] = {"sample_batch": SAMPLE_BATCH, "atol": atol, "rtol": rtol,
                                  "max_abs_diff": result.max_abs_diff}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        result.files = _move_into(tmp, out, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def export_checkpoint(checkpoint: str | Path, patch_size: int, out_dir: str | Path, **options: Any) -> ExportResult:
    """``export_model`` for a run directory or model file (see ``flexivit.model.weights.load_model``)."""
    model, meta = load_model(checkpoint)
    return export_model(model, meta, patch_size, out_dir, source=str(checkpoint), **options)
