"""From a dataset row to a model-ready tensor: decoding, timm transforms, batching.

``build_transform`` makes a callable that takes a PIL image of any mode and returns a normalised float
tensor ``(C, H, W)`` with ``C`` the requested channel count: grayscale sources are replicated to 3
channels when asked for, and RGB sources are reduced to one with ``convert("L")``.

timm's RandAugment fills the area uncovered by rotations and shears with a colour derived from
``mean``; for a 1-channel image with a 3-value fill PIL raises. The training pipeline therefore runs
the crop, flip and RandAugment on an RGB image whenever RandAugment is on, and converts to the target
mode just before ``ToTensor``. For a 1-channel output the fill is grey (the one mean value thrice) and
every RandAugment op treats equal channels equally, so a grayscale image stays grey in RGB and
``convert("L")`` gives it back exactly: nothing is lost by the detour.

``TransformedDataset`` reads an HF dataset with its image column undecoded and decodes with PIL itself,
so that an unreadable file is reported by its path (or skipped and counted by ``collate``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from flexivit.rng import mix, seed_all
from torchvision import transforms as T

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "GRAY_MODES",
    "channels_of",
    "AtSize",
    "CorruptImageError",
    "ToMode",
    "TransformedDataset",
    "build_transform",
    "collate",
    "eval_transform",
    "open_image",
    "preprocess_spec",
    "per_channel",
    "undecoded",
]

log = logging.getLogger(__name__)

# The official FlexiViT weights (big_vision, and timm's `flexivit_*` configs) expect pixels scaled to
# [-1, 1], i.e. mean 0.5 and std 0.5 for every channel.
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5

# PIL modes without colour; anything else is converted as RGB.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

Transform = Callable[[Image.Image], torch.Tensor]


def channels_of(images: Iterable[Any], *, what: str) -> int:
    """3 if any of ``images`` (raw: paths, bytes or dicts ``open_image`` reads) is in colour, else 1; only
    headers are read and unreadable ones skipped. ``what`` names the images in the error when none reads."""
    modes = []
    for image in images:
        try:
            with open_image(image, load=False) as pil:  # reads the header only
                modes.append(pil.mode)
        except CorruptImageError:
            continue
    if not modes:
        raise CorruptImageError(f"none of {what} could be decoded")
    return 1 if all(mode in GRAY_MODES for mode in modes) else 3
Sample = dict[str, Any]


class ToMode:
    """Convert a PIL image to ``mode`` (``"L"`` or ``"RGB"``); a no-op when it is already there.

    A class rather than a lambda so that transforms pickle into DataLoader workers under ``spawn``.
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


class AtSize:
    """A transform that leaves the pixels of an image already ``size`` x ``size`` in place, with a batched
    path for such images.

    ``__call__`` is ``general``, the full PIL pipeline. ``batch`` computes what ``general`` computes on a
    list of at-size images (to ``mode``, then ``ToTensor``'s ``/ 255`` and ``Normalize``'s ``- mean``,
    ``/ std``, the same float ops in the same order, so bit for bit) as one stacked tensor: with the
    reading and decoding it leaves, 3-3.6x less data time per Fashion-MNIST batch than the per-image PIL
    and torchvision calls (``tools/bench_data.py``). It draws no random numbers, so nothing needs
    seeding; it returns None (use ``__call__``) when any image is of another size.
    """

    def __init__(
        self, general: Transform, *, size: int, mode: str, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.general = general
        self.size = size
        self.to_mode = ToMode(mode)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.general(image)

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor | None:
        """``(B, C, size, size)`` for ``images``, or None if one is not ``size`` x ``size``."""
        if not images or any(im.size != (self.size, self.size) for im in images):
            return None
        arrays = [np.asarray(self.to_mode(im), dtype=np.uint8) for im in images]
        pixels = torch.from_numpy(np.stack(arrays))  # (B, H, W) for "L", (B, H, W, 3) for "RGB"
        if pixels.ndim == 3:
            pixels = pixels.unsqueeze(-1)  # (B, H, W, 1)
        x = pixels.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)  # (B, C, H, W)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, general={self.general!r})"


def per_channel(
    values: float | Sequence[float] | None, channels: int, default: float, name: str
) -> tuple[float, ...]:
    """``values`` as a tuple of length ``channels``; a scalar or a 1-tuple is broadcast."""
    if values is None:
        return (float(default),) * channels
    if isinstance(values, (int, float)):
        return (float(values),) * channels
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values but the transform outputs {channels} channels")
    return values


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def build_transform(
    *,
    image_size: int,
    channels: int,
    train: bool,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    randaugment: str | None = None,
    crop_pct: float = 1.0,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    interpolation: str = "bilinear",
) -> Transform:
    """A PIL image → normalised ``(channels, image_size, image_size)`` float tensor.

    Training: random resized crop over ``scale`` of the area (aspect ratio 3/4..4/3), horizontal flip
    with probability ``hflip``, then ``randaugment`` if given (a timm auto-augment string such as
    ``"rand-m9-mstd0.5"``); no colour jitter. Evaluation: resize the shorter side to
    ``image_size / crop_pct`` and take the centre ``image_size`` crop (``crop_pct=1.0``, the default,
    keeps the whole of a square image, which suits small datasets such as Fashion-MNIST).

    ``mean`` and ``std`` default to 0.5 per channel (pixels in [-1, 1], as the official FlexiViT
    weights expect); a scalar or a 1-tuple is broadcast to ``channels`` values.
    """
    _check_channels(channels)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    mean_c = per_channel(mean, channels, DEFAULT_MEAN, "mean")
    std_c = per_channel(std, channels, DEFAULT_STD, "std")
    target = ToMode("L" if channels == 1 else "RGB")
    if not train:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        timm_eval = create_transform(
            image_size,
            is_training=False,
            crop_pct=crop_pct,
            interpolation=interpolation,
            mean=mean_c,
            std=std_c,
        )
        general = T.Compose([target, timm_eval])
        # crop_pct 1: an image already image_size square is resized to its own size (PIL copies it) and
        # centre-cropped whole.
        if crop_pct != 1.0:
            return general
        return AtSize(general, size=image_size, mode=target.mode, mean=mean_c, std=std_c)

    # Augment in RGB when RandAugment is on (its fill colour is a 3-tuple taken from the mean).
    work = ToMode("RGB") if randaugment else target
    mean_rgb = mean_c * 3 if channels == 1 else mean_c
    std_rgb = std_c * 3 if channels == 1 else std_c
    crop_flip, augment, _ = create_transform(
        image_size,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=None,
        auto_augment=randaugment,
        interpolation=interpolation,
        mean=mean_rgb,
        std=std_rgb,
        separate=True,
    )
    steps: list[Callable] = [work, crop_flip]
    if augment.transforms:
        steps.append(augment)
    steps += [target, T.ToTensor(), T.Normalize(mean_c, std_c)]
    general = T.Compose(steps)
    # Scale (1, 1) on a square image: every accepted crop is round(s*sqrt(r)) x round(s/sqrt(r)) = s x s
    # (a smaller one would cover less than the whole area), i.e. the whole image, resized to its own size.
    if tuple(scale) == (1.0, 1.0) and hflip == 0 and not randaugment:
        return AtSize(general, size=image_size, mode=target.mode, mean=mean_c, std=std_c)
    return general


def preprocess_spec(*, image_size: int, channels: int, crop_pct: float = 1.0) -> dict[str, Any]:
    """How to prepare an image for a model, as stored with it (``preprocess``): the evaluation transform's
    arguments, with the default pixel scaling."""
    return {"image_size": image_size, "channels": channels, "crop_pct": crop_pct,
            "mean": [DEFAULT_MEAN] * channels, "std": [DEFAULT_STD] * channels, "interpolation": "bilinear"}


def eval_transform(pre: dict[str, Any]) -> Transform:
    """The evaluation transform a stored ``preprocess`` describes (missing optional keys take defaults)."""
    return build_transform(
        image_size=pre["image_size"], channels=pre["channels"], train=False, crop_pct=pre.get("crop_pct", 1.0),
        mean=pre.get("mean"), std=pre.get("std"), interpolation=pre.get("interpolation", "bilinear"),
    )


# --- decoding and batching ---------------------------------------------------------------------


class CorruptImageError(RuntimeError):
    """An image that PIL cannot decode; the message names its file."""


def open_image(value: Any, *, load: bool = True) -> Image.Image:
    """A PIL image from what a dataset row holds: PIL image, ``{"bytes", "path"}`` dict or array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, bytes):
        value = {"bytes": value, "path": None}
    if isinstance(value, dict):
        path = value.get("path")
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else path
        try:
            image = Image.open(source)
            if load:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            where = path or "(embedded bytes)"
            raise CorruptImageError(f"cannot decode image {where}: {err}") from err
        return image
    array = np.asarray(value)
    if array.dtype != np.uint8:
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # (H, W)
    return Image.fromarray(array)


def undecoded(ds: datasets.Dataset) -> datasets.Dataset:
    """``ds`` with its ``image`` column left undecoded (Image → path/bytes dicts, arrays → numpy)."""
    feature = ds.features["image"]
    if isinstance(feature, datasets.Image):
        return ds.cast_column("image", datasets.Image(decode=False)) if feature.decode else ds
    if isinstance(feature, datasets.Value):  # e.g. encoded bytes
        return ds
    return ds.with_format("numpy", columns=["image"], output_all_columns=True)


class TransformedDataset(torch.utils.data.Dataset):
    """Map-style dataset: row ``i`` → ``{"image": (C, H, W) float tensor, "label": int}``.

    Images are decoded here with PIL (the HF column is read undecoded, so a failure can name the file).
    ``on_corrupt="error"`` raises ``CorruptImageError``; ``"skip"`` returns ``None``, which ``collate``
    drops and counts. ``__getitems__`` fetches a whole batch from Arrow in one call.

    With ``seed`` set, the random generators are seeded from ``(seed, epoch, index)`` before each
    sample's transform (``set_epoch`` moves to the next epoch), so a sample's augmented view does not
    depend on worker count, rank, or where a run was resumed.
    """

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        on_corrupt: str = "error",
        seed: int | None = None,
    ) -> None:
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        self.dataset = undecoded(hf_dataset.select_columns(["image", "label"]))
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _open(self, image: Any, index: int) -> Image.Image | None:
        try:
            return open_image(image)
        except CorruptImageError as err:
            if self.on_corrupt == "error":
                hint = "on_corrupt='skip' drops such images"
                raise CorruptImageError(f"row {index}: {err} ({hint})") from err
            log.warning("skipping row %d: %s", index, err)
            return None

    def _sample(self, pil: Image.Image | None, label: Any, index: int) -> Sample | None:
        if pil is None:
            return None
        if self.seed is not None:
            seed_all(mix(self.seed, self.epoch, index))
        return {"image": self.transform(pil), "label": int(label)}

    def __getitem__(self, index: int) -> Sample | None:
        row = self.dataset[int(index)]
        return self._sample(self._open(row["image"], int(index)), row["label"], int(index))

    def __getitems__(self, indices: Sequence[int]) -> list[Sample | None]:
        """The samples of ``indices``; through the transform's batched path (``AtSize``) when it has one for
        them, with the same tensors as one by one."""
        indices = [int(i) for i in indices]
        rows = self.dataset[indices]
        pils = [self._open(img, i) for img, i in zip(rows["image"], indices)]
        batch = getattr(self.transform, "batch", None)
        images = batch([p for p in pils if p is not None]) if batch is not None else None
        if images is None:
            return [self._sample(p, lbl, i) for p, lbl, i in zip(pils, rows["label"], indices)]
        it = iter(images)
        return [None if p is None else {"image": next(it), "label": int(lbl)} for p, lbl in zip(pils, rows["label"])]


def collate(batch: Sequence[Sample | None]) -> dict[str, Any]:
    """Stack samples into ``{"image": (B, C, H, W), "label": (B,) long, "skipped": int}``.

    ``None`` samples (skipped corrupt images) are dropped and counted; a batch with nothing left has
    ``image`` of shape ``(0,)`` and an empty ``label``.
    """
    kept = [s for s in batch if s is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long), "skipped": skipped}
    images = torch.stack([s["image"] for s in kept])  # (B, C, H, W)
    labels = torch.tensor([s["label"] for s in kept], dtype=torch.long)  # (B,)
    return {"image": images, "label": labels, "skipped": skipped}
