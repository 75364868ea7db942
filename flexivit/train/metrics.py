"""Training metrics kept on the device between log lines, so a step never waits for the host.

Each step adds its per-patch-size loss and metrics as device tensors, plus a device flag for the first
non-finite loss. ``summary`` (at ``train.log_every``, and before every checkpoint) is the one place that
gathers across ranks and copies to the host: one collective and one transfer per log line.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch

__all__ = ["MetricWindow", "MIXED"]

MIXED = "mixed"  # the log key of steps with a patch size per image (patch 0 in ``add``)

Gather = Callable[[torch.Tensor], torch.Tensor]  # (K,) on each rank -> (ranks * K,) on every rank


class MetricWindow:
    """Per-patch-size sums of step metrics, and the host-side counts (steps, images, seconds)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        self.counts: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.wait = self.total = 0.0
        # The first step (1-based) whose loss was not finite, 0 while all were: a device scalar.
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        self.bad_patch = torch.zeros((), dtype=torch.long, device=device)

    def add(self, *, step: int, patch: int, metrics: dict[str, torch.Tensor], images: int, seconds: float,
            wait: float) -> None:
        """Record step ``step`` (1-based) at ``patch`` (0: a patch size per image); ``metrics`` are this rank's
        device scalars."""
        sums = self.sums[patch]
        for name, value in metrics.items():
            value = value.detach().float()
            sums[name] = sums[name] + value if name in sums else value
        bad = ~torch.isfinite(metrics["loss"].detach()) & (self.first_bad == 0)
        self.first_bad = torch.where(bad, step, self.first_bad)
        self.bad_patch = torch.where(bad, patch, self.bad_patch)
        c = self.counts[patch]
        c["steps"] += 1
        c["images"] += images
        c["seconds"] += seconds
        self.wait += wait
        self.total += seconds

    def summary(self, gather: Gather) -> tuple[dict[str, Any], tuple[int, int] | None]:
        """The window as a log record (means across steps and ranks), and ``(step, patch)`` of the first
        non-finite loss on any rank, or ``None``. Collective: every rank must call it together."""
        keys = [(p, n) for p in sorted(self.sums) for n in sorted(self.sums[p])]
        local = torch.stack([*(self.sums[p][n] for p, n in keys), self.first_bad.float(), self.bad_patch.float()])
        ranks = gather(local).reshape(-1, len(keys) + 2).tolist()  # (ranks, K + 2) on the host
        per_patch: dict[str, dict[str, float]] = {}
        for i, (p, name) in enumerate(keys):
            mean = sum(r[i] for r in ranks) / len(ranks)
            per_patch.setdefault(_key(p), {})[name] = mean / self.counts[p]["steps"]
        for p, c in self.counts.items():
            row = per_patch.setdefault(_key(p), {})
            row["img_s"] = c["images"] / max(c["seconds"], 1e-9)
            row["steps"] = int(c["steps"])
        record = {"per_patch": dict(sorted(per_patch.items(), key=lambda kv: (kv[0] == MIXED, kv[0].zfill(8)))),
                  "data_wait_share": self.wait / max(self.total, 1e-9)}
        bad = sorted((int(r[-2]), int(r[-1])) for r in ranks if r[-2] > 0)
        return record, bad[0] if bad else None


def _key(patch: int) -> str:
    return str(patch) if patch else MIXED
