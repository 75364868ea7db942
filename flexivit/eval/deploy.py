"""Deployment: pick a patch size for a budget, and classify image files with a trained model.

``choose_patch_size(profile, max_latency_ms=…, max_gflops=…, min_accuracy=…)`` reads a profile (the
``results`` of an ``eval.json``, measured on the machine that will serve) and returns

- with a cost budget (``max_latency_ms`` and/or ``max_gflops``, optionally with ``min_accuracy`` too):
  the most accurate size within every limit;
- with ``min_accuracy`` alone: the cheapest size that reaches it.

"Cheaper" means fewer GFLOPs, then lower latency, then fewer tokens: counted FLOPs are exact, while two
latencies a few percent apart are within timing noise. Ties are broken in a fixed order, so a profile
always gives the same answer: "most accurate" compares top-1, then cost (in that order), then prefers
the larger patch size; "cheapest" compares cost, then the higher top-1, then the larger patch size. A
cost missing from the profile is skipped. A profile without accuracies (latencies
measured just now, no eval.json) ranks sizes by token count instead: more tokens, more accurate, as for
every FlexiViT the paper reports. When nothing fits, ``BudgetError`` names the nearest option: the one
whose worst relative overshoot of a limit is smallest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from flexivit.model.weights import run_dir
from flexivit.eval.evaluate import default_device
from flexivit.eval.measure import MeasureSettings, latency_ms
from flexivit.eval.subjects import EvalSubject, FixedSizeViT, load_subject, resolve_patch_sizes
from flexivit.data.transforms import eval_transform, open_image
from flexivit.model.packed import forward_packed

__all__ = ["BudgetError", "Choice", "Prediction", "Predictor", "choose_patch_size", "load_profile",
           "parse_accuracy"]

Profile = str | Path | dict[str, Any] | Sequence[dict[str, Any]]
_COST_ORDER = ("gflops", "latency_ms", "tokens")


class BudgetError(ValueError):
    """No patch size in the profile meets the budget (or the profile lacks what the budget needs)."""


@dataclass(frozen=True)
class Choice:
    patch_size: int
    row: dict[str, Any]  # the profile row of the chosen size
    reason: str  # one sentence, printed by the CLI


def load_profile(profile: Profile) -> list[dict[str, Any]]:
    """Profile rows from an ``eval.json`` path, its parsed dict, or a list of result rows."""
    if isinstance(profile, (str, Path)):
        profile = json.loads(Path(profile).read_text())
    rows = profile.get("results", []) if isinstance(profile, dict) else list(profile)
    if not rows:
        raise BudgetError("the profile has no results; run `flexivit eval CHECKPOINT` to measure one")
    return rows


def parse_accuracy(text: str | float, name: str = "min_accuracy") -> float:
    """``0.85`` or ``"85%"`` → 0.85; anything else raises a ``ValueError`` naming the setting ``name``."""
    try:
        value = float(text[:-1]) / 100 if isinstance(text, str) and text.endswith("%") else float(text)
    except ValueError:
        value = math.nan  # not a number: refused below, with the same message
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: an accuracy is a fraction in [0, 1] (0.85) or a percentage (85%), got {text!r}")
    return value


def _describe(row: dict[str, Any]) -> str:
    parts = [f"top-1 {100 * row['top1']:.2f}%"] if row.get("top1") is not None else []
    if row.get("latency_ms") is not None:
        parts.append(f"{row['latency_ms']:.3g} ms")
    if row.get("gflops") is not None:
        parts.append(f"{row['gflops']:.4g} GFLOPs")
    parts.append(f"{row['tokens']} tokens")
    return f"patch {row['patch_size']} ({', '.join(parts)})"


def _costs(row: dict[str, Any]) -> tuple[float, ...]:
    return tuple(float(row[k]) if row.get(k) is not None else 0.0 for k in _COST_ORDER)


def choose_patch_size(
    profile: Profile, *, max_latency_ms: float | None = None, max_gflops: float | None = None,
    min_accuracy: float | None = None,
) -> Choice:
    """The patch size for a budget (see the module docstring for the rule and its tie-breaks)."""
    rows = load_profile(profile)
    limits = {k: v for k, v in (("latency_ms", max_latency_ms), ("gflops", max_gflops)) if v is not None}
    if not limits and min_accuracy is None:
        raise ValueError("give a budget: max_latency_ms, max_gflops and/or min_accuracy")
    if any(v <= 0 for v in limits.values()):
        raise ValueError(f"cost budgets must be positive, got {limits}")
    if min_accuracy is not None:
        min_accuracy = parse_accuracy(min_accuracy)
    needed = list(limits) + (["top1"] if min_accuracy is not None else [])
    for key in needed:
        if any(r.get(key) is None for r in rows):
            raise BudgetError(
                f"the profile has no {key!r} for every patch size (an eval.json written by training has "
                "accuracies only); run `flexivit eval CHECKPOINT` on this machine to measure it"
            )
    by_accuracy = all(r.get("top1") is not None for r in rows)

    def accuracy(r: dict[str, Any]) -> float:
        return float(r["top1"]) if by_accuracy else float(r["tokens"])

    def overshoot(r: dict[str, Any]) -> float:
        worst = max([r[k] / v - 1 for k, v in limits.items()] or [-math.inf])
        if min_accuracy:
            worst = max(worst, (min_accuracy - r["top1"]) / min_accuracy)
        return worst

    wants = [f"{'latency' if k == 'latency_ms' else 'GFLOPs'} <= {v:g}{' ms' if k == 'latency_ms' else ''}"
             for k, v in limits.items()] + ([f"top-1 >= {100 * min_accuracy:g}%"] if min_accuracy is not None else [])
    fits = [r for r in rows if overshoot(r) <= 0]
    if not fits:
        nearest = min(rows, key=lambda r: (overshoot(r), _costs(r), -r["patch_size"]))
        sizes = ", ".join(str(r["patch_size"]) for r in rows)
        raise BudgetError(f"no patch size meets {' and '.join(wants)} (sizes profiled: {sizes}); "
                          f"the nearest is {_describe(nearest)}")
    if limits:
        best = min(fits, key=lambda r: (-accuracy(r), _costs(r), -r["patch_size"]))
        rank = "the most accurate" if by_accuracy else "the most tokens (no accuracies in the profile)"
        reason = f"{_describe(best)}: {rank} within {' and '.join(wants)}"
    else:
        best = min(fits, key=lambda r: (_costs(r), -accuracy(r), -r["patch_size"]))
        reason = f"{_describe(best)}: the cheapest with {wants[0]}"
    return Choice(int(best["patch_size"]), dict(best), reason)


# ---- prediction --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    image: str
    patch_size: int
    top: list[tuple[int, str, float]]  # (class index, class name, probability), most probable first

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "patch_size": self.patch_size,
                "top": [{"index": i, "class": name, "prob": p} for i, name, p in self.top]}


class Predictor:
    """A loaded model with its stored preprocessing and class names; ``predict`` takes files or PIL images."""

    def __init__(self, subject: EvalSubject, device: torch.device | None = None) -> None:
        self.subject = subject
        self.device = device or default_device()
        self.model = subject.model.to(self.device).eval()
        self.class_names = list(subject.meta.get("class_names") or [])
        self.transform = eval_transform(subject.preprocess)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: torch.device | None = None) -> "Predictor":
        """From a run directory, a model file or a timm export folder."""
        return cls(load_subject(checkpoint), device)

    @property
    def default_patch_size(self) -> int:
        model = self.model
        return model.patch_size if isinstance(model, FixedSizeViT) else int(model.config.patch_size)

    def check_patch_size(self, patch_size: int) -> int:
        s = self.subject
        return resolve_patch_sizes([int(patch_size)], s.valid_sizes, image_size=s.preprocess["image_size"])[0]

    def load(self, image: str | Path | Image.Image) -> torch.Tensor:
        """One image as the model's input ``(C, H, W)``; files of any size and mode, like evaluation."""
        if not isinstance(image, Image.Image):
            path = Path(image)
            if path.is_dir():
                raise ValueError(f"{path} is a folder; pass image files (e.g. {path}/*.png)")
            if not path.is_file():
                raise FileNotFoundError(f"image {path} does not exist")
            image = open_image({"bytes": None, "path": str(path)})
        return self.transform(image)

    def check_patch_sizes(self, patch_size: int | Sequence[int] | None, count: int) -> list[int]:
        """One checked size per image: ``patch_size`` (default: the model's) for all, or a list, one each."""
        if not isinstance(patch_size, (list, tuple)):
            return [self.check_patch_size(patch_size if patch_size is not None else self.default_patch_size)] * count
        if len(patch_size) != count:
            raise ValueError(f"got {len(patch_size)} patch sizes for {count} images; give one per image")
        checked: dict[int, int] = {}
        for i, p in enumerate(patch_size):
            if p not in checked:
                try:
                    checked[p] = self.check_patch_size(p)
                except ValueError as error:
                    raise ValueError(f"image {i}: {error}") from None
        return [checked[p] for p in patch_size]

    @torch.no_grad()
    def predict(self, images: Sequence[str | Path | Image.Image], patch_size: int | Sequence[int] | None = None,
                topk: int = 5, batch_size: int = 64) -> list[Prediction]:
        """Top-``topk`` classes and probabilities per image at ``patch_size`` (default: the model's), or at
        ``patch_size[i]`` for image ``i``: each batch of mixed sizes runs as one packed call (flexivit.model.packed)."""
        patches = self.check_patch_sizes(patch_size, len(images))
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        tensors = [self.load(image) for image in images]  # every file is read before any work is done
        out = []
        for start in range(0, len(tensors), batch_size):
            x = torch.stack(tensors[start : start + batch_size]).to(self.device)  # (B, C, H, W)
            sizes = patches[start : start + batch_size]
            logits = self.model(x, sizes[0]) if len(set(sizes)) == 1 else forward_packed(self.model, x, sizes)
            probs = logits.float().softmax(dim=-1)  # (B, classes)
            values, indices = probs.topk(min(topk, probs.shape[1]), dim=-1)  # (B, k)
            for j in range(x.shape[0]):
                image = images[start + j]
                name = str(image) if not isinstance(image, Image.Image) else f"<image {start + j}>"
                top = [(int(i), self._name(int(i)), float(v)) for v, i in zip(values[j], indices[j])]
                out.append(Prediction(name, sizes[j], top))
        return out

    def _name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)

    def latency_profile(self, sizes: Sequence[int] | None = None,
                        settings: MeasureSettings = MeasureSettings(warmup=2, repeats=10)) -> list[dict[str, Any]]:
        """Batch-1 latency per patch size, measured now (default sizes: those ``flexivit eval`` sweeps)."""
        pre = self.subject.preprocess
        x = torch.zeros(1, pre["channels"], pre["image_size"], pre["image_size"], device=self.device)
        rows = []
        for p in sizes or self.subject.default_sizes:
            tokens = (pre["image_size"] // p) ** 2
            rows.append({"patch_size": p, "tokens": tokens,
                         "latency_ms": latency_ms(lambda inp: self.model(inp, p), x, settings)})
        return rows

    def profile_for_latency(self) -> tuple[list[dict[str, Any]], str]:
        """A latency profile for this machine: the run's sweep (``eval_sweep.json``, else ``eval.json``) when it
        was measured on this kind of device, else latencies measured now (with its accuracies when it has them)."""
        folder = run_dir(self.subject.checkpoint)  # a sweep beside a training's record is eval_sweep.json
        file = next((f for f in (folder / "eval_sweep.json", folder / "eval.json") if f.is_file()),
                    folder / "eval.json")
        saved = json.loads(file.read_text()) if file.is_file() else {}
        rows = saved.get("results") or []
        same_device = saved.get("device", "").split(":")[0] == self.device.type
        if rows and same_device and all(r.get("latency_ms") is not None for r in rows):
            return rows, f"latencies from {file}"
        measured = self.latency_profile([r["patch_size"] for r in rows] or None)
        accuracy = {r["patch_size"]: r.get("top1") for r in rows}
        for r in measured:
            if accuracy.get(r["patch_size"]) is not None:
                r["top1"] = accuracy[r["patch_size"]]
        if any(r.get("top1") is None for r in measured):
            for r in measured:
                r.pop("top1", None)
        return measured, f"latencies measured now on {self.device.type}"

    def choose_for_latency(self, budget_ms: float) -> tuple[Choice, str]:
        (choice,), source = self.choose_for_latencies([budget_ms])
        return choice, source

    def choose_for_latencies(self, budgets_ms: Sequence[float]) -> tuple[list[Choice], str]:
        """One choice per budget (per image, for a packed call), all on one latency profile."""
        rows, source = self.profile_for_latency()
        chosen = {b: choose_patch_size(rows, max_latency_ms=b) for b in set(budgets_ms)}
        return [chosen[b] for b in budgets_ms], source
