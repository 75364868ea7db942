"""Evaluation of one model at many patch schemes."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .patch_embed import PatchScheme

__all__ = ["evaluate_schemes", "format_table"]

Gather = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate_schemes(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]] | Callable[[], Iterable[dict[str, torch.Tensor]]],
    schemes: Sequence[PatchScheme],
    *,
    image_hw: tuple[int, int],
    gather: Gather | None = None,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Top-1 (top-5 when there are more than 5 classes), mean loss and token count per scheme.

    ``batches`` is re-iterated for each scheme (pass a callable to build a fresh iterator each time).
    ``gather`` collects per-sample tensors across processes (``accelerator.gather_for_metrics``), so
    every rank returns the same numbers.
    """
    was_training = model.training
    model.eval()
    results = []
    for scheme in schemes:
        correct1 = correct5 = loss_sum = count = 0.0
        data = batches() if callable(batches) else batches
        for batch in data:
            images, labels = batch["image"], batch["label"]
            if device is not None:
                images, labels = images.to(device), labels.to(device)
            logits = model(images, scheme.patch, scheme.stride).float()
            losses = F.cross_entropy(logits, labels, reduction="none")
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices.eq(labels[:, None])  # (B, k)
            stats = torch.stack([hits[:, 0].float(), hits.any(dim=1).float(), losses], dim=1)  # (B, 3)
            if gather is not None:
                stats = gather(stats)
            correct1 += stats[:, 0].sum().item()
            correct5 += stats[:, 1].sum().item()
            loss_sum += stats[:, 2].sum().item()
            count += stats.shape[0]
            num_classes = logits.shape[1]
        gh, gw = scheme.grid_size(image_hw)
        row: dict[str, Any] = {
            "patch_size": scheme.patch,
            "stride": scheme.stride,
            "tokens": gh * gw,
            "top1": correct1 / max(count, 1),
            "loss": loss_sum / max(count, 1),
            "n": int(count),
        }
        if count and num_classes > 5:
            row["top5"] = correct5 / count
        results.append(row)
    model.train(was_training)
    return results


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of per-scheme results."""
    has_top5 = any("top5" in r for r in rows)
    head = "| patch | stride | tokens | top-1 (%) |" + (" top-5 (%) |" if has_top5 else "") + " loss |"
    sep = "|---:|---:|---:|---:|" + ("---:|" if has_top5 else "") + "---:|"
    lines = [head, sep]
    for r in rows:
        top5 = f" {100 * r['top5']:.2f} |" if has_top5 and "top5" in r else (" |" if has_top5 else "")
        lines.append(f"| {r['patch_size']} | {r['stride']} | {r['tokens']} | {100 * r['top1']:.2f} |{top5} {r['loss']:.4f} |")
    return "\n".join(lines)
