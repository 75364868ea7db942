"""Turn a resolved ``Config`` into the objects a run needs: model, sampler, data, optimizer."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from flexivit.train.config import Config, PatchConfig, StageConfig
from flexivit.data.sources import (
    Splits, TransformedDataset, build_transform, collate, load_source, make_loader, select_classes,
)
from flexivit.model.config import CORE_FIELDS
from flexivit.model.options import registered
from flexivit.model.vit import FlexiViT
from flexivit.model.patch_embed import PatchScheme
from flexivit.train.sampler import Curriculum, Distribution, PatchSizeSampler, make_distribution
from flexivit.train.step_batches import PackedStepBatches, StepBatches, loader_batches
from flexivit.model.packed import check_packable
from flexivit.model.packing import RowPacker, tokens_per_image
from flexivit.data.streams import ShardStream, TrainStream
from flexivit.data.transforms import eval_transform, preprocess_spec
from flexivit.model.variants import VARIANTS, create_variant
from flexivit.rng import mix

__all__ = ["build_model", "build_sampler", "build_step_batches", "schemes_of", "default_patch", "RunData", "build_data", "eval_loader", "preprocess_meta",
           "task_support"]


def schemes_of(patch: PatchConfig, sizes: list[int] | None = None) -> list[PatchScheme]:
    sizes = patch.sizes if sizes is None else sizes
    if patch.strides is not None and sizes is patch.sizes:
        if len(patch.strides) != len(sizes):
            raise ValueError(f"patch.strides has {len(patch.strides)} entries for {len(sizes)} patch.sizes")
        return [PatchScheme(p, s) for p, s in zip(sizes, patch.strides)]
    return [PatchScheme(p) for p in sizes]


def default_patch(patch: PatchConfig) -> int:
    """The deployment default: ``patch.default`` or the median training size."""
    if patch.default is not None:
        return patch.default
    return int(statistics.median_low(sorted(patch.sizes)))


def build_model(cfg: Config, *, channels: int, num_classes: int) -> FlexiViT:
    own = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model) if f.name not in ("variant", "options")}
    overrides = {k: v for k, v in {**own, **cfg.model.options}.items() if v is not None}
    if cfg.model.variant not in VARIANTS:
        raise ValueError(f"unknown model.variant {cfg.model.variant!r}; known: {sorted(VARIANTS)}")
    if set(overrides) - CORE_FIELDS:  # option fields: each option may fill its own from the run (e.g. sizes)
        for option in registered():
            overrides = option.from_run(overrides, cfg)
    return create_variant(
        cfg.model.variant,
        img_size=cfg.data.image_size,
        patch_size=default_patch(cfg.patch),
        in_chans=channels,
        num_classes=num_classes,
        **overrides,
    )


def _distribution(kind: str, weights: list[float] | None, center: float | None, width: float | None) -> Distribution:
    return make_distribution(
        kind, weights=tuple(weights) if weights is not None else None, center=center, width=width
    )


def _stage(stage: StageConfig) -> tuple[int, Distribution]:
    return stage.until, _distribution(stage.distribution, stage.weights, stage.center, stage.width)


def build_sampler(cfg: Config) -> PatchSizeSampler:
    patch = cfg.patch
    if patch.distribution == "curriculum":
        if not patch.curriculum:
            raise ValueError("patch.distribution='curriculum' needs patch.curriculum stages")
        dist: Distribution = Curriculum(stages=tuple(_stage(s) for s in patch.curriculum))
    else:
        dist = _distribution(patch.distribution, patch.weights, patch.center, patch.width)
    return PatchSizeSampler(
        schemes=schemes_of(patch), distribution=dist, seed=cfg.train.seed, image_size=cfg.data.image_size
    )


def build_step_batches(cfg: Config, sampler: PatchSizeSampler, model: FlexiViT, *, rank: int,
                       ranks: int) -> StepBatches | PackedStepBatches:
    """The run's stream of step batches: one patch scheme per step, or with ``patch.per_image`` one per image.

    Per image, a size's share of the images is what it gets under the per-step sampler with the same
    settings: its step probability times the images such a step takes (the token budget's share). So a
    per-image run sees the per-step run's mix of images (and tokens) at each size; only how the sizes
    share a step differs. Rows: ``train.token_budget // row_tokens`` (``data.batch_size`` without a budget).
    """
    d, p, t = cfg.data, cfg.patch, cfg.train
    hw = (d.image_size, d.image_size)
    if not p.per_image:
        return StepBatches(sampler=sampler, image_hw=hw, batch_size=d.batch_size, token_budget=t.token_budget,
                           grad_accum=t.grad_accum)
    if isinstance(sampler.distribution, Curriculum):
        raise ValueError("patch.per_image draws every image from fixed weights, which a curriculum changes with the "
                         "step; use patch.distribution=uniform, weighted or gaussian")
    if any(s.stride != s.patch for s in sampler.schemes):
        raise ValueError("patch.per_image packs non-overlapping patches only; unset patch.strides")
    if d.mixup > 0 or d.cutmix > 0:
        raise ValueError("patch.per_image gives steps a varying, possibly odd image count, which timm's Mixup "
                         "refuses; set data.mixup=0 and data.cutmix=0")
    try:
        check_packable(model)
    except ValueError as err:
        raise ValueError(f"patch.per_image: {err}") from None
    probs = sampler.probs(0).tolist()
    weights = [q * loader_batches(s, hw, d.batch_size, t.token_budget) for q, s in zip(probs, sampler.schemes)]
    sizes = [s.patch for s in sampler.schemes]
    longest = max(tokens_per_image(hw, q, prefix=model.num_prefix_tokens) for q in sizes)
    row_tokens = p.row_tokens or longest
    if row_tokens < longest:
        raise ValueError(f"patch.row_tokens={row_tokens} is shorter than an image at patch {min(sizes)} "
                         f"({longest} tokens); raise it or unset it")
    rows = t.token_budget // row_tokens if t.token_budget else d.batch_size
    if rows < 1:
        raise ValueError(f"train.token_budget={t.token_budget} holds no row of {row_tokens} tokens "
                         "(patch.row_tokens); raise the budget or shorten the rows")
    packer = RowPacker(sizes=sizes, weights=weights, image_size=hw, rows=rows, row_tokens=row_tokens,
                       class_token=model.num_prefix_tokens > 0, seed=t.seed, patience=p.pack_patience)
    return PackedStepBatches(packer=packer, batch_size=d.batch_size, grad_accum=t.grad_accum, rank=rank, ranks=ranks)


@dataclass
class RunData:
    """The run's datasets: ``train`` augmented (a ``TrainStream`` for a stream source); ``val`` (what settings
    are chosen on) and ``test`` (only reported) with the evaluation transform, both cut to ``data.eval_limit``
    images when it is set."""

    splits: Splits
    channels: int
    train: Dataset
    val: Dataset
    test: Dataset

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)


def load_splits(cfg: Config) -> Splits:
    """The run's train / validation / test splits (``data.classes`` applied), before any transform."""
    d = cfg.data
    splits = load_source(
        d.source, val_fraction=d.val_fraction, seed=cfg.train.seed, split_train=d.split_train,
        split_test=d.split_test, image_column=d.image_column, label_column=d.label_column,
    )
    if d.classes and isinstance(splits.train, ShardStream):
        raise ValueError("data.classes does not apply to a stream source; write shards of the classes you want")
    return select_classes(splits, d.classes) if d.classes else splits


def build_data(cfg: Config) -> RunData:
    d = cfg.data
    splits = load_splits(cfg)
    if len(splits.class_names) < 2:
        logging.getLogger(__name__).warning(
            "%s has one class (%r): every label is the same, so any model scores 100 %%; give it a sub-folder (or "
            "label) per class", d.source, splits.class_names[0])
    channels = d.channels or splits.channels
    train_tf = build_transform(
        image_size=d.image_size, channels=channels, train=True, scale=tuple(d.scale), hflip=d.hflip,
        randaugment=d.randaugment,
    )
    eval_tf = eval_transform(preprocess_meta(cfg, channels))  # exactly what a saved model stores

    def evaluated(ds: datasets.Dataset) -> TransformedDataset:
        if d.eval_limit is not None:
            ds = ds.select(range(min(d.eval_limit, len(ds))))
        return TransformedDataset(ds, eval_tf, on_corrupt=d.on_corrupt)

    if isinstance(splits.train, ShardStream):  # read shard by shard (flexivit.data.streams)
        train = TrainStream(splits.train, train_tf, on_corrupt=d.on_corrupt, seed=cfg.train.seed,
                            batch_size=d.batch_size, mix_width=d.stream_mix)
    else:
        train = TransformedDataset(splits.train, train_tf, on_corrupt=d.on_corrupt, seed=cfg.train.seed)
    return RunData(
        splits=splits,
        channels=channels,
        train=train,
        val=evaluated(splits.val),
        test=evaluated(splits.test),
    )


EVAL_SPLITS = ("val", "test")


def eval_loader(cfg: Config, data: RunData, split: str = "val", *, rank: int = 0, world: int = 1) -> DataLoader:
    """A loader over ``data.val`` (periodic evaluation, model selection) or ``data.test`` (the report);
    with ``world`` processes, rank ``rank``'s shard: every ``world``-th image, none evaluated twice."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"eval_loader split must be one of {EVAL_SPLITS}, got {split!r}")
    dataset = getattr(data, split)
    return make_loader(
        dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world)),
        batch_size=cfg.data.eval_batch_size, shuffle=False, seed=cfg.train.seed,
        num_workers=cfg.data.num_workers, drop_last=False,
    )


def preprocess_meta(cfg: Config, channels: int) -> dict[str, Any]:
    """What a deployed model needs to prepare an image like the evaluation did."""
    return preprocess_spec(image_size=cfg.data.image_size, channels=channels, crop_pct=cfg.data.crop_pct)


SUPPORT_PER_CLASS = 16  # training images per class that initialise a fine-tuned head from examples
SUPPORT_STREAM = 2  # task_support draws with mix(train.seed, 2)


def task_support(cfg: Config, per_class: int = SUPPORT_PER_CLASS) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, C, H, W)`` and labels ``(B,)`` of up to ``per_class`` training images of each class of
    ``cfg``'s task (``data.classes`` applied), drawn with ``mix(train.seed, 2)`` and prepared as evaluation
    prepares them: the support set an option's fine-tuned head may start from."""
    d = cfg.data
    splits = load_splits(cfg)
    transform = eval_transform(preprocess_meta(cfg, d.channels or splits.channels))
    labels = np.asarray(splits.train.with_format("numpy", columns=["label"])[:]["label"])
    rng = np.random.default_rng(mix(cfg.train.seed, SUPPORT_STREAM))
    rows = [int(i) for c in np.unique(labels) for i in
            rng.choice(np.flatnonzero(labels == c), min(per_class, int((labels == c).sum())), replace=False)]
    batch = collate(TransformedDataset(splits.train, transform, on_corrupt=d.on_corrupt).__getitems__(rows))
    return batch["image"], batch["label"]
