"""Official FlexiViT and ViT weights: big_vision ``.npz`` checkpoints read in their own layout.

big_vision (``big_vision/models/vit.py``, ``models/proj/flexi/vit.py``) saves the flax parameter tree as
an ``.npz`` whose array names are the tree paths joined by ``/`` (under ``params/``, ``opt/target/`` or
at the top). Nothing is resized at load: the base kernel and the position grid keep their stored size
(32x32 and 7x7 for the FlexiViT releases) and are resized per call as big_vision does. What maps where:

- ``embedding/kernel`` ``(ph, pw, C, D)`` (HWIO) → ``patch_embed.weight`` ``(D, C, ph, pw)``; big_vision
  PI-resizes it per call against ``tf.image.resize`` bilinear without antialiasing: ``kernel_resize="bilinear"``.
- ``pos_embedding`` ``(1, g*g, D)`` (row-major grid) → ``pos_embed`` ``(1, g, g, D)``; big_vision resamples it
  with ``jax.image.resize(..., "linear")``, whose antialias is on by default (a tent filter when the grid
  shrinks, plain bilinear when it grows): ``posemb_antialias=True``.
- ``cls`` (pool ``tok``, joined after the position embedding) → ``cls_token``; without it (pool ``gap``) the
  mean of the final-normed tokens: ``global_pool="avg"`` with ``fc_norm=False``.
- ``Transformer/encoderblock_i/``: ``LayerNorm_0``, ``MultiHeadDotProductAttention_0`` (``query``/``key``/
  ``value`` kernels ``(D, H, d)``, ``out`` ``(H, d, D)``), ``LayerNorm_1``, ``MlpBlock_0/Dense_0|1`` → timm's
  ``Block`` (``attn.qkv`` fused as q, k, v). flax's LayerNorm eps is 1e-6 (ours); flax's ``gelu`` is the tanh
  approximation: ``act_layer="gelu_tanh"``. ``Transformer/encoder_norm`` → ``norm``; ``head`` → ``head``.

Also read: scanned encoders (one ``encoderblock`` with a leading depth axis), the numbered names of older
checkpoints (``LayerNorm_0/_2``, ``MlpBlock_3``, ``MultiHeadDotProductAttention_1``), position embeddings
kept under ``Transformer/`` with the class token's own entry (folded into ``cls``, as big_vision's
``fix_old_checkpoints`` does), and bfloat16 arrays (which numpy stores as 2-byte void).
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
from einops import rearrange

from flexivit.model.config import FlexiViTConfig
from flexivit.model.weights import FORMAT, CheckpointError
from flexivit.model.hub import attach_meta
from flexivit.model.vit import FlexiViT
from flexivit.model.patch_embed import valid_patch_sizes
from flexivit.data.transforms import preprocess_spec

__all__ = ["BigVisionError", "load_big_vision", "big_vision_config", "big_vision_meta", "load_big_vision_model"]

Source = str | Path | Mapping[str, np.ndarray]
_POS_NAMES = ("pos_embedding", "Transformer/pos_embedding", "Transformer/posembed_input/pos_embedding")
_BLOCK_PARTS = ("LayerNorm", "MultiHeadDotProductAttention", "MlpBlock")
# What big_vision computes, as FlexiViTConfig fields the arrays cannot show (overridable).
BIG_VISION_DEFAULTS = {"act_layer": "gelu_tanh", "posemb_antialias": True, "kernel_resize": "bilinear"}


class BigVisionError(CheckpointError, ValueError):
    """An ``.npz`` that is not a ViT / FlexiViT checkpoint FlexiViT can hold, or not the model asked for."""


@dataclass(frozen=True)
class _Layout:
    """Where each part of the model sits in a checkpoint (names relative to ``prefix``)."""

    prefix: str
    pos: str
    has_cls: bool
    has_head: bool
    depth: int
    scan: bool  # one "encoderblock" whose arrays carry a leading depth axis
    ln1: str
    ln2: str
    attn: str
    mlp: str

    def block(self, i: int) -> str:
        return "Transformer/encoderblock/" if self.scan else f"Transformer/encoderblock_{i}/"

    def names(self) -> set[str]:
        """Every array name (relative) the model takes."""
        names = {"embedding/kernel", "embedding/bias", self.pos, "Transformer/encoder_norm/scale",
                 "Transformer/encoder_norm/bias"}
        names |= {"cls"} if self.has_cls else set()
        names |= {"head/kernel", "head/bias"} if self.has_head else set()
        per_block = [f"{ln}/{p}" for ln in (self.ln1, self.ln2) for p in ("scale", "bias")]
        per_block += [f"{self.attn}/{m}/{p}" for m in ("query", "key", "value", "out") for p in ("kernel", "bias")]
        per_block += [f"{self.mlp}/Dense_{j}/{p}" for j in (0, 1) for p in ("kernel", "bias")]
        return names | {self.block(i) + n for i in range(1 if self.scan else self.depth) for n in per_block}


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The arrays' shapes from the ``.npy`` headers inside an ``.npz``, without reading the arrays."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in readers:
                        raise ValueError(f"{info.filename} has a .npy header of version {version}")
                    shapes[info.filename.removesuffix(".npy")] = tuple(readers[version](f)[0])
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise BigVisionError(f"{path} is not a readable .npz file ({err})") from None
    return shapes


def _arrays(source: Source) -> ContextManager[Mapping[str, np.ndarray]]:
    """The arrays, read lazily from an ``.npz`` (closed on exit) or the mapping given."""
    if isinstance(source, Mapping):
        return nullcontext(source)
    return np.load(source, allow_pickle=False)  # an NpzFile: _read_shapes has checked it is one


def _find_prefix(names: set[str], where: str, prefix: str | None) -> str:
    if prefix is not None:
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if prefix + "embedding/kernel" not in names:
            raise BigVisionError(f"{where} has no {prefix}embedding/kernel (the prefix given)")
        return prefix
    found = sorted(n[: -len("embedding/kernel")] for n in names
                   if n == "embedding/kernel" or n.endswith("/embedding/kernel"))
    if not found:
        sample = ", ".join(sorted(names)[:4])
        raise BigVisionError(f"{where} is not a ViT/FlexiViT checkpoint: no embedding/kernel among its {len(names)} "
                             f"arrays (such as {sample})")
    if len(found) > 1:
        raise BigVisionError(f"{where} holds several ViTs ({', '.join(p or '(top)' for p in found)}); choose one "
                             "with prefix=")
    return found[0]


def _block_parts(names: set[str], base: str, where: str) -> tuple[str, str, str, str]:
    """``(ln1, ln2, attn, mlp)``: a block's submodules in order, by their numbered flax names."""
    children = {n[len(base):].split("/")[0] for n in names if n.startswith(base)}
    kinds: dict[str, list[str]] = {k: [] for k in _BLOCK_PARTS}
    for child in children:
        kind, _, index = child.rpartition("_")
        if kind not in kinds or not index.isdigit():
            raise BigVisionError(f"{where}: block {base} has a {child}, which a ViT block has not")
        kinds[kind].append(child)
    ln, attn, mlp = (sorted(kinds[k], key=lambda c: int(c.rpartition("_")[2])) for k in _BLOCK_PARTS)
    if len(ln) != 2 or len(attn) != 1 or len(mlp) != 1:
        raise BigVisionError(f"{where}: block {base} holds {sorted(children)}, not two LayerNorms, one attention "
                             "and one MlpBlock")
    return ln[0], ln[1], attn[0], mlp[0]


def _layout(names: set[str], where: str, prefix: str | None) -> tuple[_Layout, set[str]]:
    """The layout of the ViT in ``names`` and the relative names it covers."""
    prefix = _find_prefix(names, where, prefix)
    rel = {n[len(prefix):] for n in names if n.startswith(prefix)}
    for part, what in (("MAPHead_0", "an attention-pooling (MAP) head"), ("pre_logits", "a pre-logits layer")):
        if any(n.startswith(part + "/") for n in rel):
            raise BigVisionError(f"{where} has {what} ({part}), which FlexiViT does not have")
    pos = next((p for p in _POS_NAMES if p in rel), None)
    if pos is None:
        raise BigVisionError(f"{where} has no learned position embedding (pos_embedding; a fixed sincos2d one is "
                             "not stored), and FlexiViT resamples a learned grid")
    indices = sorted({int(m.group(1)) for n in rel if (m := re.match(r"Transformer/encoderblock_(\d+)/", n))})
    scan = not indices and any(n.startswith("Transformer/encoderblock/") for n in rel)
    if not indices and not scan:
        raise BigVisionError(f"{where} is not a ViT/FlexiViT checkpoint: no Transformer/encoderblock_N")
    if indices and indices != list(range(len(indices))):
        raise BigVisionError(f"{where}: the encoder blocks are numbered {indices}, not 0..{len(indices) - 1}")
    base = "Transformer/encoderblock/" if scan else "Transformer/encoderblock_0/"
    ln1, ln2, attn, mlp = _block_parts(rel, base, where)
    depth = len(indices)  # 0 for a scanned encoder: its depth is its arrays' leading axis (_inferred)
    layout = _Layout(prefix, pos, "cls" in rel, "head/kernel" in rel, depth, scan, ln1, ln2, attn, mlp)
    return layout, rel


def _check_names(layout: _Layout, rel: set[str], where: str) -> None:
    expected = layout.names()
    for problem, which in (("lacks", expected - rel), ("has arrays FlexiViT has no place for:", rel - expected)):
        if which:
            listed = ", ".join(sorted(which)[:4]) + (f" and {len(which) - 4} more" if len(which) > 4 else "")
            raise BigVisionError(f"{where} {problem} {listed}")


def _grid(shape: tuple[int, ...], dim: int, has_cls: bool) -> int | None:
    """The side of a ``(1, g*g, D)`` position embedding, or ``(1, 1 + g*g, D)`` with the class token's entry."""
    if len(shape) != 3 or shape[0] != 1 or shape[2] != dim:
        return None
    for n in (shape[1], shape[1] - 1 if has_cls else 0):
        if n > 0 and math.isqrt(n) ** 2 == n:
            return math.isqrt(n)
    return None


def _inferred(shapes: Mapping[str, tuple[int, ...]], layout: _Layout, where: str) -> dict[str, Any]:
    """The config fields the arrays fix (``depth`` too for a scanned encoder)."""
    p = layout.prefix
    kernel = shapes[p + "embedding/kernel"]
    if len(kernel) != 4 or kernel[0] != kernel[1]:
        raise BigVisionError(f"{where}: embedding/kernel has shape {kernel}, not a square (p, p, C, D) conv kernel")
    base, _, chans, dim = kernel
    grid = _grid(shapes[p + layout.pos], dim, layout.has_cls)
    if grid is None:
        raise BigVisionError(f"{where}: {layout.pos} has shape {shapes[p + layout.pos]}, not (1, g*g, {dim})")
    scan_axis = 1 if layout.scan else 0
    query = shapes[f"{p}{layout.block(0)}{layout.attn}/query/kernel"][scan_axis:]  # (D, H, d)
    hidden = shapes[f"{p}{layout.block(0)}{layout.mlp}/Dense_0/kernel"][-1]
    if len(query) != 3 or query[0] != dim or query[1] * query[2] != dim:
        raise BigVisionError(f"{where}: attention query kernel {query} is not (D, heads, D // heads) for D={dim}")
    if int(dim * (hidden / dim)) != hidden:  # timm's Mlp width is int(dim * mlp_ratio)
        raise BigVisionError(f"{where}: an MLP width of {hidden} is not int({dim} * mlp_ratio) for any float ratio")
    depth = shapes[f"{p}{layout.block(0)}{layout.ln1}/scale"][0] if layout.scan else layout.depth
    return dict(
        embed_dim=dim, depth=depth, num_heads=query[1], mlp_ratio=hidden / dim, base_patch_size=base,
        base_grid=grid, in_chans=chans, num_classes=shapes[p + "head/kernel"][-1] if layout.has_head else 0,
        class_token=layout.has_cls, global_pool="token" if layout.has_cls else "avg", fc_norm=False,
        posemb="learn", qkv_bias=True, qk_norm=False, init_values=None, pre_norm=False, final_norm=True,
    )


def _config(fixed: dict[str, Any], overrides: dict[str, Any], where: str) -> FlexiViTConfig:
    """The config of the checkpoint's model; ``overrides`` may set any other field, never contradict ``fixed``."""
    for key, asked in overrides.items():
        if key in fixed and not (asked == fixed[key] or key == "mlp_ratio" and math.isclose(asked, fixed[key])):
            raise BigVisionError(f"{where} holds a model with {key}={fixed[key]!r}, not {key}={asked!r} as asked")
    base, grid = fixed["base_patch_size"], fixed["base_grid"]
    img = int(overrides.get("img_size", base * grid))
    # The default patch size: the stored kernel's where it tiles the image, else the valid size nearest to it.
    patch = base if img % base == 0 else min(valid_patch_sizes(img), key=lambda p: (abs(p - base), p))
    values = {**BIG_VISION_DEFAULTS, "img_size": img, "patch_size": patch, **fixed, **overrides}
    return FlexiViTConfig.from_dict(values)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 tensor; numpy stores bfloat16 as 2-byte void (``utils.recover_dtype`` in big_vision)."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def _state_dict(arrays: Mapping[str, np.ndarray], layout: _Layout, config: FlexiViTConfig) -> dict[str, torch.Tensor]:
    """The FlexiViT state_dict of the checkpoint's arrays (see the module docstring for the mapping)."""
    p, g = layout.prefix, config.base_grid
    read: dict[str, torch.Tensor] = {}  # each array read once: an NpzFile reads it again on every access

    def get(name: str, i: int | None = None) -> torch.Tensor:
        full = p + (layout.block(i) + name if i is not None else name)
        if full not in read:
            read[full] = _tensor(arrays[full])
        return read[full][i] if i is not None and layout.scan else read[full]

    pos = get(layout.pos)  # (1, [1 +] g*g, D)
    cls_pos, pos = (pos[:, :1], pos[:, 1:]) if pos.shape[1] == g * g + 1 else (None, pos)
    state = {
        "patch_embed.weight": rearrange(get("embedding/kernel"), "h w c d -> d c h w"),
        "patch_embed.bias": get("embedding/bias"),
        "pos_embed": rearrange(pos, "b (h w) d -> b h w d", h=g),  # (1, g, g, D)
        "norm.weight": get("Transformer/encoder_norm/scale"),
        "norm.bias": get("Transformer/encoder_norm/bias"),
    }
    if layout.has_cls:  # an old checkpoint's class-token position entry is folded in, as big_vision does
        state["cls_token"] = get("cls") + (cls_pos if cls_pos is not None else 0)  # (1, 1, D)
    if layout.has_head:
        state["head.weight"], state["head.bias"] = get("head/kernel").T, get("head/bias")
    for i in range(config.depth):
        b, attn = f"blocks.{i}.", layout.attn
        qkv = [get(f"{attn}/{m}/kernel", i) for m in ("query", "key", "value")]  # (D, H, d) each
        state |= {
            b + "norm1.weight": get(f"{layout.ln1}/scale", i), b + "norm1.bias": get(f"{layout.ln1}/bias", i),
            b + "attn.qkv.weight": torch.cat([rearrange(k, "d h e -> (h e) d") for k in qkv]),  # (3D, D)
            b + "attn.qkv.bias": torch.cat([get(f"{attn}/{m}/bias", i).flatten() for m in ("query", "key", "value")]),
            b + "attn.proj.weight": rearrange(get(f"{attn}/out/kernel", i), "h e d -> d (h e)"),
            b + "attn.proj.bias": get(f"{attn}/out/bias", i),
            b + "norm2.weight": get(f"{layout.ln2}/scale", i), b + "norm2.bias": get(f"{layout.ln2}/bias", i),
            b + "mlp.fc1.weight": get(f"{layout.mlp}/Dense_0/kernel", i).T,
            b + "mlp.fc1.bias": get(f"{layout.mlp}/Dense_0/bias", i),
            b + "mlp.fc2.weight": get(f"{layout.mlp}/Dense_1/kernel", i).T,
            b + "mlp.fc2.bias": get(f"{layout.mlp}/Dense_1/bias", i),
        }
    return state


def _read(source: Source, prefix: str | None, overrides: dict[str, Any]) -> tuple[str, _Layout, FlexiViTConfig]:
    """A name for messages, the layout and the config, from the arrays' names and shapes."""
    where = "the checkpoint" if isinstance(source, Mapping) else str(source)
    if isinstance(source, Mapping):
        shapes = {k: tuple(v.shape) for k, v in source.items()}
    elif not Path(source).is_file():
        raise BigVisionError(f"big_vision checkpoint {source} does not exist")
    else:
        shapes = _read_shapes(Path(source))
    layout, rel = _layout(set(shapes), where, prefix)
    _check_names(layout, rel, where)
    fixed = _inferred(shapes, layout, where)
    return where, replace(layout, depth=fixed["depth"]), _config(fixed, overrides, where)


def big_vision_config(source: Source, *, prefix: str | None = None, **overrides: Any) -> FlexiViTConfig:
    """The ``FlexiViTConfig`` of a big_vision checkpoint (from the arrays' shapes alone; see ``load_big_vision``)."""
    return _read(source, prefix, overrides)[2]


def big_vision_meta(config: FlexiViTConfig) -> dict[str, Any]:
    """Model-file metadata (``flexivit.model.weights``) for big_vision weights: no class names; pixels in [-1, 1]
    and the evaluation crop of big_vision's FlexiViT recipes (resize to ``size // 7 * 8``, centre crop)."""
    size = config.img_size
    pre = preprocess_spec(image_size=size, channels=config.in_chans, crop_pct=size / (size // 7 * 8))
    return {"format": FORMAT, "config": config.to_dict(), "class_names": [], "preprocess": pre}


def load_big_vision(source: Source, *, prefix: str | None = None, **overrides: Any) -> FlexiViT:
    """A FlexiViT (eval mode) holding a big_vision ViT / FlexiViT checkpoint, its kernel and grid at stored size.

    ``source``: an ``.npz`` path or a mapping of its arrays. ``prefix``: the subtree holding the ViT when the
    file holds several (e.g. ``params/img``). ``overrides`` set config fields: those the arrays fix (width,
    depth, heads, MLP, base patch and grid, channels, classes, pooling) must agree with them (else one line
    naming the mismatch); others are free, e.g. ``img_size=240`` (the FlexiViT releases' resolution; the
    default is base patch x grid) or ``patch_size`` (the default for ``forward``).
    """
    model, _ = _load(source, prefix, overrides)
    return model


def load_big_vision_model(path: str | Path, map_location: str = "cpu", *, prefix: str | None = None,
                          **overrides: Any) -> tuple[FlexiViT, dict[str, Any]]:
    """``flexivit.model.weights.load_model`` for an ``.npz``: ``(model in eval mode, metadata)``."""
    model, meta = _load(path, prefix, overrides)
    return model.to(map_location), meta


def _load(source: Source, prefix: str | None, overrides: dict[str, Any]) -> tuple[FlexiViT, dict[str, Any]]:
    where, layout, config = _read(source, prefix, overrides)
    with _arrays(source) as arrays:
        state = _state_dict(arrays, layout, config)
    model = FlexiViT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BigVisionError(f"{where}: the weights do not fit a FlexiViT with {overrides} (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}); load it without those overrides")
    meta = big_vision_meta(config)
    attach_meta(model, meta)
    return model.eval(), meta
