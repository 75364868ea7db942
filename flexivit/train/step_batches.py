"""The stream of training batches, step by step: token budgets, gradient accumulation and resume.

A step of patch scheme ``s`` runs ``train.grad_accum`` micro-batches. With a token budget, each
micro-batch joins ``loader_batches(s, …)`` loader batches into one forward, so large patches see more
images for about the same compute and memory. How many loader batches a step takes is a function of the
step number alone (the sampler draws from ``(seed, step)``), so a resumed run skips exactly the batches
the steps before it consumed and continues mid-epoch on the same images.

With ``patch.per_image`` (``PackedStepBatches``) each image has its own patch size: a micro-batch is one
plan of the rank's ``PackStream`` (``flexivit.model.packing``), its images packed into token rows.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from flexivit.model.packing import PackPlan, RowPacker
from flexivit.model.patch_embed import PatchScheme
from flexivit.train.sampler import PatchSizeSampler

__all__ = ["loader_batches", "StepBatches", "PackedStepBatches"]

Batch = dict[str, Any]


def loader_batches(scheme: PatchScheme, image_hw: tuple[int, int], batch_size: int, token_budget: int) -> int:
    """Loader batches one micro-step of ``scheme`` joins: 1, or its share of ``train.token_budget``
    (``max(1, budget // (batch_size * tokens per image))``)."""
    if token_budget <= 0:
        return 1
    gh, gw = scheme.grid_size(image_hw)
    return max(1, token_budget // (batch_size * gh * gw))


def _join(parts: list[Batch]) -> Batch:
    """Loader batches concatenated into one micro-batch; batches emptied by corrupt images are dropped."""
    if len(parts) == 1:
        return parts[0]
    kept = [b for b in parts if b["label"].numel()]
    skipped = sum(int(b.get("skipped", 0)) for b in parts)
    if not kept:
        return {**parts[0], "skipped": skipped}
    return {"image": torch.cat([b["image"] for b in kept]), "label": torch.cat([b["label"] for b in kept]),
            "skipped": skipped}


class StepBatches:
    """``micro_batches(step)`` → the micro-batches of ``step``, each one joined forward's worth of images.

    Built from the run's arithmetic alone (so ``most()`` can size the loader's prefetch before the loader
    exists); ``attach`` then positions it on the loader at a step. The loader is re-iterated once per
    epoch (``set_epoch`` on it and on ``dataset`` first, so shuffling and augmentation follow the
    epoch); ``skip(loader, n)`` drops the first ``n`` batches of an epoch
    (``accelerator.skip_first_batches``), used once when starting mid-epoch.
    """

    def __init__(
        self, *, sampler: PatchSizeSampler, image_hw: tuple[int, int], batch_size: int, token_budget: int,
        grad_accum: int,
    ) -> None:
        self.sampler, self.image_hw = sampler, image_hw
        self.batch_size, self.token_budget, self.grad_accum = batch_size, token_budget, grad_accum
        self._stream: Iterator[Batch] | None = None

    def attach(self, *, loader: Any, dataset: Any, skip: Callable[[Any, int], Any], step: int) -> None:
        """Read from ``loader`` from the first batch of ``step`` on."""
        per_epoch = len(loader)
        if per_epoch < self.grad_accum:
            raise ValueError(
                f"the training split gives {per_epoch} batches per process, fewer than "
                f"train.grad_accum={self.grad_accum}; lower data.batch_size or train.grad_accum"
            )
        self._stream = _epochs(loader, dataset, skip, per_epoch, self.consumed(step))

    def attach_stream(self, open_at: Callable[[int], Iterator[Batch]], *, step: int) -> None:
        """Read an endless stream (``flexivit.data.streams``) from the first batch of ``step``: ``open_at(n)`` gives
        this process's batches from its ``n``-th on."""
        self._stream = open_at(self.consumed(step))

    def scheme_at(self, step: int) -> PatchScheme:
        """The patch scheme of every image of ``step``."""
        return self.sampler.at(step)

    def joined(self, step: int) -> int:
        """Loader batches in each micro-batch of ``step``."""
        return loader_batches(self.sampler.at(step), self.image_hw, self.batch_size, self.token_budget)

    def most(self) -> int:
        """Loader batches of the dearest step: how many the data workers should keep prefetched."""
        return self.grad_accum * max(
            loader_batches(s, self.image_hw, self.batch_size, self.token_budget) for s in self.sampler.schemes
        )

    def consumed(self, step: int) -> int:
        """Loader batches the steps before ``step`` took (3600 draws cost about 0.1 s)."""
        return self.grad_accum * sum(self.joined(s) for s in range(step))

    def micro_batches(self, step: int) -> Iterator[Batch]:
        """The ``train.grad_accum`` micro-batches of ``step``, read one at a time (only one is held)."""
        if self._stream is None:
            raise RuntimeError("StepBatches.attach(...) must be called before micro_batches(step)")
        joined = self.joined(step)
        for _ in range(self.grad_accum):
            yield _join([next(self._stream) for _ in range(joined)])


class PackedStepBatches:
    """``micro_batches(step)`` → micro-batches whose images each have their own patch size (``patch.per_image``).

    Micro-batch ``m`` of ``step`` is plan ``step * grad_accum + m`` of this rank's ``PackStream``: the next
    ``plan.num_images`` images of the loader's batches, in order, with the plan as ``batch["plan"]`` and the
    images of the same micro-batch on every rank as ``batch["world_images"]``. The loader's batches are read
    as a stream of image positions (``batch_size`` per batch; an image the loader skipped as corrupt is a
    position without an image, and the micro-batch runs without it), so how far a step has read is a
    function of the step alone and a resumed run continues on the same images.
    """

    def __init__(self, *, packer: RowPacker, batch_size: int, grad_accum: int, rank: int, ranks: int) -> None:
        self.packer, self.batch_size, self.grad_accum = packer, batch_size, grad_accum
        self.streams = [packer.stream(key=r) for r in range(ranks)]  # every rank's, to count a step's images
        self.stream = self.streams[rank]
        self._source: Iterator[Batch] | None = None
        self._held: list[Any] = []  # [images, labels, positions] of the batch being read; positions >= images

    def scheme_at(self, step: int) -> None:
        """``None``: the images of a step have their own sizes (each micro-batch's ``plan``)."""
        return None

    def consumed(self, step: int) -> int:
        """Image positions this rank's steps before ``step`` read."""
        return sum(self.stream.plan(i).num_images for i in range(step * self.grad_accum))

    def most(self) -> int:
        """Loader batches of the fullest possible step: how many the data workers should keep prefetched."""
        images = self.packer.rows * (self.packer.row_tokens // min(self.packer.lengths))
        return self.grad_accum * (-(-images // self.batch_size) + 1)

    def attach(self, *, loader: Any, dataset: Any, skip: Callable[[Any, int], Any], step: int) -> None:
        """Read from ``loader`` from the first image of ``step`` on."""
        batches, offset = divmod(self.consumed(step), self.batch_size)
        self._source = _epochs(loader, dataset, skip, len(loader), batches)
        self._take(offset)

    def attach_stream(self, open_at: Callable[[int], Iterator[Batch]], *, step: int) -> None:
        """Read an endless stream (``flexivit.data.streams``) from the first image of ``step``."""
        batches, offset = divmod(self.consumed(step), self.batch_size)
        self._source = open_at(batches)
        self._take(offset)

    def _take(self, positions: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """The images and labels at the next ``positions`` positions, and the loader's skipped count."""
        if self._source is None:
            raise RuntimeError("PackedStepBatches.attach(...) must be called before micro_batches(step)")
        images, labels, skipped = [], [], 0
        while positions > 0:
            if not self._held:
                batch = next(self._source)
                skipped += int(batch.get("skipped", 0))
                self._held = [batch["image"], batch["label"], self.batch_size]
            held_images, held_labels, held = self._held
            k = min(positions, held)
            images.append(held_images[:k])
            labels.append(held_labels[:k])
            self._held = [held_images[k:], held_labels[k:], held - k] if held > k else []
            positions -= k
        return images, labels, skipped

    def plan(self, step: int, micro: int) -> PackPlan:
        """This rank's plan for micro-batch ``micro`` of ``step``."""
        return self.stream.plan(step * self.grad_accum + micro)

    def micro_batches(self, step: int) -> Iterator[Batch]:
        """The ``train.grad_accum`` micro-batches of ``step``, read one at a time."""
        for micro in range(self.grad_accum):
            i = step * self.grad_accum + micro
            world = sum(s.plan(i).num_images for s in self.streams)
            plan = self.stream.plan(i)  # kept by the stream from the line above
            images, labels, skipped = self._take(plan.num_images)
            image, label = torch.cat(images), torch.cat(labels)
            if image.shape[0] < plan.num_images:  # corrupt images skipped: the plan's last images are missing
                plan = plan.first(image.shape[0])
            yield {"image": image, "label": label, "skipped": skipped, "plan": plan, "world_images": world}


def _epochs(loader: Any, dataset: Any, skip: Callable[[Any, int], Any], per_epoch: int, start: int) -> Iterator[Batch]:
    """Batches forever from global batch index ``start``."""
    epoch, offset = divmod(start, per_epoch)
    while True:
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        yield from (skip(loader, offset) if offset else loader)
        epoch, offset = epoch + 1, 0
