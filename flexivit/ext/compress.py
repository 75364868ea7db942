"""``flexivit compress``: a compact model derived from a trained FlexiViT, still flexible.

The derived network starts from the base (every weight it shares is copied), with blocks replaced by
least-squares bridges (``flexivit.ext.bridge``, fitted on calibration images from the training split at every
training patch size) and its Linears tied to K values each (LUT-Q, ``flexivit.ext.lutq``). It then trains with
the ordinary loop on the base's outputs, quantised as ``distill.quantize`` says, at sampled patch sizes; 0
steps is allowed and gives the training-free derived model. The run directory is a normal one (model,
checkpoints, ``eval.json``) plus ``compress.json``: file bytes, GFLOPs per patch size, distinct values per
tied tensor and the bridges' fit residuals, for the base and the derived model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from flexivit.ext.bridge import CompressConfig, parse_spans
from flexivit.ext.bridge_fit import BRIDGE_INITS, insert_bridges
from flexivit.train.builders import load_splits, preprocess_meta, schemes_of
from flexivit.model.weights import MODEL_FILE, CheckpointError, atomic_write_text, load_model, read_model_meta
from flexivit.train.config import Config, ConfigError
from flexivit.data.sources import TransformedDataset
from flexivit.ext.lutq import LUTQ_SCOPES, check_k, lutq_layers, make_lutq
from flexivit.eval.measure import count_gflops
from flexivit.model.vit import FlexiViT, FlexiViTConfig
from flexivit.ext.scale_invariant import fold_state_dict
from flexivit.train.loop import RunResult, train
from flexivit.data.transforms import eval_transform

__all__ = ["compress", "derive", "check_compress", "COMPRESS_FILE"]

COMPRESS_FILE = "compress.json"
TARGETS = ("base", "labels")  # what the derived model trains on


def check_compress(c: CompressConfig, depth: int) -> None:
    """Refuse settings that cannot derive anything, before data or a teacher are loaded."""
    if not c.bridges and c.lutq_k is None:
        raise ConfigError("compress needs something to do: set compress.bridges (e.g. ['2:4']) and/or "
                          "compress.lutq_k (e.g. 4)")
    if c.bridges:
        parse_spans(c.bridges, depth)  # malformed, out of range, empty, overlapping, every block: ValueError
    if c.bridge_init not in BRIDGE_INITS:
        raise ConfigError(f"compress.bridge_init must be one of {', '.join(BRIDGE_INITS)}, got {c.bridge_init!r}")
    if c.lutq_k is not None:
        check_k(c.lutq_k)
    if c.lutq_scope not in LUTQ_SCOPES:
        raise ConfigError(f"compress.lutq_scope must be one of {', '.join(LUTQ_SCOPES)}, got {c.lutq_scope!r}")
    if c.targets not in TARGETS:
        raise ConfigError(f"compress.targets must be one of {', '.join(TARGETS)}, got {c.targets!r}")
    if c.calib_images < 1:
        raise ConfigError(f"compress.calib_images must be positive, got {c.calib_images}")


def _plain(model: FlexiViT) -> FlexiViT:
    """The base as plain layers (a scale-invariant one folded: same function)."""
    if model.config.scale_invariant == "none":
        return model
    fields = {**model.config.to_dict(), "scale_invariant": "none", "si_norm": "matrix", "si_head_scale": None}
    plain = FlexiViT(FlexiViTConfig.from_dict(fields))
    plain.load_state_dict(fold_state_dict(model))
    return plain.eval()


def derive(base: FlexiViT, c: CompressConfig, *, patch_sizes: list[int], calibration: Any = None,
           seed: int = 0) -> tuple[FlexiViT, dict[str, Any]]:
    """The derived model (training form) and the bridges' residuals on ``calibration`` images."""
    if base.config.bridges or base.config.lutq_k is not None:
        raise ValueError("the base is compressed already (it has bridges or LUT-Q weights); compress its own "
                         "uncompressed base instead")
    derived, residuals = _plain(base), {}
    if c.bridges:
        derived, residuals = insert_bridges(derived, c.bridges, per_size=c.bridge_per_size, patch_sizes=patch_sizes,
                                            init=c.bridge_init, data=calibration, ridge=c.bridge_ridge, seed=seed)
    elif derived is base:  # LUT-Q ties in place: never tie the caller's base
        derived = FlexiViT(base.config)
        derived.load_state_dict(base.state_dict())
    if c.lutq_k is not None:
        make_lutq(derived, c.lutq_k, scope=c.lutq_scope, pow2=c.lutq_pow2)
    return derived.train(), residuals


def _calibration(cfg: Config, channels: int) -> DataLoader:
    """The first ``compress.calib_images`` training images, as a saved model preprocesses them (no
    augmentation): the bridges are fitted to what the base computes on training data, never on the
    validation or test split."""
    train = load_splits(cfg).train
    train = train.select(range(min(cfg.compress.calib_images, len(train))))
    dataset = TransformedDataset(train, eval_transform(preprocess_meta(cfg, channels)), on_corrupt=cfg.data.on_corrupt)
    return DataLoader(dataset, batch_size=64, shuffle=False)


def _file_bytes(path: Path) -> int:
    file = path / MODEL_FILE if path.is_dir() else path
    return file.stat().st_size


def _costs(model: FlexiViT, sizes: list[int]) -> dict[str, float]:
    c = model.config
    x = torch.zeros(2, c.in_chans, c.img_size, c.img_size)  # (B, C, H, W): FLOPs do not depend on pixels
    return {str(p): count_gflops(lambda inp, p=p: model(inp, p), x) for p in sizes}


def _describe(model: FlexiViT, file: Path, sizes: list[int]) -> dict[str, Any]:
    model = model.eval()
    return {"file_bytes": _file_bytes(file), "gflops": _costs(model, sizes),
            "params": sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()),
            "distinct_values": {name: int(layer.values.unique().numel()) for name, layer in lutq_layers(model).items()},
            "blocks": len(model.blocks)}


def compress(base: str | Path, cfg: Config, *, out_dir: str | Path, resume: bool = False,
             overwrite: bool = False) -> RunResult:
    """Derive from ``base`` (a run directory or model file) as ``cfg.compress`` says, train on its quantised
    outputs for ``cfg.train.steps`` steps (0: none) and write ``compress.json`` beside the run."""
    try:
        read_model_meta(base)
    except CheckpointError as err:
        raise CheckpointError(f"the base must be a FlexiViT run directory or model file: {err}") from None
    base_model, _ = load_model(base)
    check_compress(cfg.compress, base_model.config.depth)
    if base_model.config.bridges or base_model.config.lutq_k is not None:
        raise ValueError(f"{base} is compressed already (bridges or LUT-Q); compress its uncompressed base instead")
    if cfg.distill.teacher not in (None, str(base)):
        raise ConfigError("compress trains on the base's own outputs (or on labels with compress.targets=labels); "
                          "leave distill.teacher unset")
    if cfg.compress.targets == "base":
        cfg.distill.teacher, cfg.distill.init_from_teacher = str(base), False
    else:  # the labels alone: no teacher, and nothing to quantise
        cfg.distill.teacher, cfg.distill.quantize = None, "none"
    sizes = [s.patch for s in schemes_of(cfg.patch)]
    residuals: dict[str, Any] = {}

    def init(fresh: FlexiViT) -> FlexiViT:
        mismatch = {k: (getattr(base_model.config, k), getattr(fresh.config, k))
                    for k in ("img_size", "in_chans", "num_classes") if getattr(base_model.config, k) != getattr(fresh.config, k)}
        if mismatch:
            raise ValueError(f"the recipe's data does not fit the base (base vs recipe: {mismatch}); compress "
                             "on the task the base was trained for")
        calibration = _calibration(cfg, fresh.config.in_chans) if cfg.compress.bridges else None
        derived, fits = derive(base_model, cfg.compress, patch_sizes=sizes, calibration=calibration, seed=cfg.train.seed)
        residuals.update(fits)
        return derived

    result = train(cfg, out_dir=out_dir, resume=resume, init=init, overwrite=overwrite)
    derived, _ = load_model(out_dir)
    report = {"base": str(base), "settings": {**dataclasses.asdict(cfg.compress), "quantize": cfg.distill.quantize,
                                              "teacher_patch_size": cfg.distill.teacher_patch_size},
              "steps": cfg.train.steps, "patch_sizes": sizes, "bridge_residuals": residuals,
              "base_model": _describe(base_model, Path(base), sizes),
              "derived_model": _describe(derived, Path(out_dir), sizes)}
    report["file_ratio"] = report["base_model"]["file_bytes"] / report["derived_model"]["file_bytes"]
    report["gflops_ratio"] = {p: report["derived_model"]["gflops"][p] / report["base_model"]["gflops"][p] for p in map(str, sizes)}
    atomic_write_text(Path(out_dir) / COMPRESS_FILE, json.dumps(report, indent=2) + "\n")
    print(f"derived model: {report['file_ratio']:.1f}x smaller file, GFLOPs x"
          + "/".join(f"{v:.2f}" for v in report["gflops_ratio"].values()) + f" at patch {'/'.join(map(str, sizes))}; "
          f"wrote {Path(out_dir) / COMPRESS_FILE}")
    return result


# ---- the `flexivit compress` command (flexivit.ext.COMMANDS) -------------------------------------------
TRAINS = True  # a TrainingError is the user's to fix here too


def add_arguments(p: Any, cli: Any) -> None:
    """``flexivit compress BASE RECIPE ...``: ``cli`` gives the CLI's shared arguments (``run_args``)."""
    p.add_argument("base", help="the trained FlexiViT: a run directory or a model .safetensors file")
    cli.run_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a model or "
                   "checkpoints: they, the log and the report are removed first (refused without it)")


def run(args: Any, cli: Any) -> None:
    cfg, out = cli.resolve(args)
    compress(args.base, cfg, out_dir=out, resume=args.resume, overwrite=args.overwrite)
