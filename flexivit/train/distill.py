"""Distillation: a frozen teacher, targets from its outputs (optionally quantised), and a student that
starts from the teacher's weights.

The teacher sees the *same* augmented (and mixed) view as the student — function matching — resized
to its own resolution and renormalised to its own statistics, so no second data pipeline can drift
from the first. It is frozen, kept in eval mode, never handed to ``accelerator.prepare`` (DDP/FSDP wrap
only the student) and never checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from flexivit.model.weights import CheckpointError, load_model, load_weights_only
from flexivit.model.vit import FlexiViT, FlexiViTConfig
from flexivit.model.patch_embed import check_patch_sizes
from flexivit.model.resize import pi_resize, resample_posemb

__all__ = ["Teacher", "load_teacher", "quantize_targets", "distill_loss", "student_from_teacher", "beyond_reach"]


@dataclass(frozen=True)
class ViewSpec:
    """How a model wants its input: size, channels and normalisation."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def convert_view(x: torch.Tensor, source: ViewSpec, target: ViewSpec) -> torch.Tensor:
    """Re-express a normalised batch ``(B, C, H, W)`` for another model: resize, channels, statistics."""
    mean_s = torch.tensor(source.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_s = torch.tensor(source.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    pixels = x * std_s + mean_s  # (B, C, H, W) in [0, 1]
    if source.channels == 1 and target.channels == 3:
        pixels = pixels.expand(-1, 3, -1, -1)
    elif source.channels == 3 and target.channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        pixels = (pixels * luma).sum(dim=1, keepdim=True)  # (B, 1, H, W), as PIL's convert("L")
    if pixels.shape[-1] != target.image_size or pixels.shape[-2] != target.image_size:
        pixels = F.interpolate(pixels, size=(target.image_size,) * 2, mode="bilinear", align_corners=False,
                               antialias=True)
    mean_t = torch.tensor(target.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(target.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (pixels - mean_t) / std_t


class Teacher(nn.Module):
    """A frozen model that maps the student's batch to logits at its own resolution and statistics."""

    def __init__(self, model: nn.Module, *, view: ViewSpec, patch_size: int | None = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.view = view
        self.patch_size = patch_size

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always eval: dropout and norm statistics stay fixed

    @torch.no_grad()
    def forward(self, student_images: torch.Tensor, student_view: ViewSpec) -> torch.Tensor:
        x = convert_view(student_images, student_view, self.view)
        if isinstance(self.model, FlexiViT):
            return self.model(x, self.patch_size)
        return self.model(x)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"teacher weights {path} do not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"teacher weights {path} are not a readable safetensors file ({err})") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        state = load_weights_only(path)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a state_dict of tensors")
        return state
    raise CheckpointError(f"teacher weights {path}: unsupported format {path.suffix!r} (use .safetensors or .pth)")


def load_teacher(spec: str, *, patch_size: int | None = None) -> Teacher:
    """``spec`` is a flexivit run directory / model file, or ``timm:MODEL_NAME=WEIGHTS_FILE``."""
    if spec.startswith("timm:"):
        name, sep, file = spec[5:].partition("=")
        if not sep or not name or not file:
            raise ValueError(f"a timm teacher is written timm:MODEL_NAME=WEIGHTS_FILE, got {spec!r}")
        state = _read_weights(Path(file))
        head = state.get("head.weight")
        kwargs: dict[str, Any] = {"num_classes": int(head.shape[0])} if head is not None else {}
        if "patch_embed.proj.weight" in state:
            kwargs["in_chans"] = int(state["patch_embed.proj.weight"].shape[1])
        model = timm.create_model(name, pretrained=False, **kwargs)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"weights {file} do not fit timm model {name}: missing {missing}, unexpected {unexpected}")
        cfg = model.pretrained_cfg
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        chans = int(kwargs.get("in_chans", 3))
        mean, std = tuple(cfg.get("mean", (0.5,) * chans)), tuple(cfg.get("std", (0.5,) * chans))
        return Teacher(model, view=ViewSpec(size, chans, mean[:chans], std[:chans]))
    model, meta = load_model(spec)
    pre = meta["preprocess"]
    view = ViewSpec(int(pre["image_size"]), int(pre["channels"]), tuple(pre["mean"]), tuple(pre["std"]))
    patch = patch_size or model.config.patch_size
    check_patch_sizes([model.scheme(patch)], view.image_size)
    return Teacher(model, view=view, patch_size=patch)


def quantize_targets(probs: torch.Tensor, mode: str) -> torch.Tensor:
    """Quantise teacher probabilities ``(B, K)``: ``none``, ``hard``, ``topk:K`` or ``bits:B``.

    ``bits:B`` puts every probability on the grid ``{0, 1/L, …, 1}`` with ``L = 2**B - 1`` levels above
    zero by largest-remainder rounding, so the targets lie on the grid *and* sum to exactly 1.
    """
    if mode == "none":
        return probs
    if mode == "hard":
        return F.one_hot(probs.argmax(dim=1), probs.shape[1]).to(probs.dtype)
    kind, _, value = mode.partition(":")
    if kind == "topk" and value.isdigit() and int(value) >= 1:
        k = min(int(value), probs.shape[1])
        top = probs.topk(k, dim=1)
        kept = torch.zeros_like(probs).scatter_(1, top.indices, top.values)
        return kept / kept.sum(dim=1, keepdim=True)
    if kind == "bits" and value.isdigit() and int(value) >= 1:
        levels = 2 ** int(value) - 1
        scaled = probs / probs.sum(dim=1, keepdim=True) * levels
        units = scaled.floor()
        missing = (levels - units.sum(dim=1)).round().long()  # (B,) units still to hand out
        order = (scaled - units).argsort(dim=1, descending=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(probs.shape[1], device=probs.device).expand_as(order))
        units = units + (ranks < missing[:, None]).to(units.dtype)
        return units / levels
    raise ValueError(f"unknown target quantisation {mode!r}; use none, hard, topk:K or bits:B")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                 quantize: str = "none") -> torch.Tensor:
    """KL(teacher ‖ student) at a temperature, scaled by T² so gradients keep their size."""
    t = temperature
    targets = quantize_targets(F.softmax(teacher_logits.float() / t, dim=1), quantize)
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    kl = (torch.xlogy(targets, targets) - targets * log_q).sum(dim=1)  # (B,)
    return kl.mean() * t * t


def beyond_reach(fresh: torch.Tensor, small_hw: tuple[int, int]) -> torch.Tensor:
    """The part of ``fresh`` (D, C, H, W) that no kernel of size ``small_hw`` PI-resized to (H, W) can hold:
    per (output, input) channel, its component orthogonal to the range of that resize. Zero when the
    resize reaches every kernel (downsampling); otherwise what a resized teacher kernel lacks."""
    h, w = small_hw
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)  # every small kernel's coordinates
    reach = pi_resize(basis, fresh.shape[-2:]).reshape(h * w, -1).T  # (H*W, h*w): the resize's range
    u, s, _ = torch.linalg.svd(reach, full_matrices=False)
    q = u[:, s > s.max() * 1e-10]  # (H*W, rank): orthonormal basis of the range
    if q.shape[1] == q.shape[0]:  # every kernel is reachable: exactly nothing to add, not rounding noise
        return torch.zeros_like(fresh)
    flat = rearrange(fresh.double(), "d c hh ww -> (d c) (hh ww)")
    outside = flat - flat @ q @ q.T
    return rearrange(outside, "(d c) (hh ww) -> d c hh ww", d=fresh.shape[0], hh=fresh.shape[-2]).to(fresh.dtype)


def student_from_teacher(student_config: FlexiViTConfig, teacher: nn.Module, *, keep_student_base: bool = False,
                         full_rank_base: bool = False) -> FlexiViT:
    """A FlexiViT initialised from the teacher: blocks, norms and head copied; the teacher's patch kernel
    and position grid become the student's base (or are resized into the student's base when
    ``keep_student_base``: round trips are lossy). With ``full_rank_base`` too, the resized kernel gains
    the part of the student's fresh kernel it cannot reach (``beyond_reach``): an upsampled kernel alone
    has at most the teacher's rank (a base of the teacher's size, or smaller, gains nothing). Shapes that
    differ are listed in the error."""
    source = teacher if isinstance(teacher, FlexiViT) else FlexiViT.from_timm(teacher) if isinstance(teacher, VisionTransformer) else None
    if source is None:
        raise ValueError(f"the student can start only from a ViT teacher (timm VisionTransformer or FlexiViT), got {type(teacher).__name__}")
    state = source.state_dict()
    teacher_hw = tuple(state["patch_embed.weight"].shape[-2:])  # the teacher's own kernel, before any resize
    fields = student_config.to_dict()
    if keep_student_base:
        with torch.no_grad():
            state["patch_embed.weight"] = pi_resize(state["patch_embed.weight"], student_config.base_patch_size)
            if "pos_embed" in state:
                state["pos_embed"] = resample_posemb(state["pos_embed"], student_config.base_grid)
    else:
        fields.update(base_patch_size=source.config.base_patch_size, base_grid=source.config.base_grid)
    student = FlexiViT(FlexiViTConfig.from_dict(fields))
    own = student.state_dict()
    if full_rank_base:
        with torch.no_grad():
            state["patch_embed.weight"] = state["patch_embed.weight"] + beyond_reach(own["patch_embed.weight"],
                                                                                     teacher_hw)
    problems = [f"{k}: teacher {tuple(state[k].shape)} vs student {tuple(v.shape)}"
                for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems += [f"{k}: not in the teacher" for k in own if k not in state]
    problems += [f"{k}: not in the student" for k in state if k not in own]
    if problems:
        raise ValueError("cannot initialise the student from the teacher; these do not match:\n  " + "\n  ".join(problems))
    student.load_state_dict(state, strict=True)
    return student
