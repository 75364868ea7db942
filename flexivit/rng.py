"""Seeds derived from integers, so every random draw is a function of (seed, step, rank) or
(seed, epoch, sample): runs resume bit-identically without saving generator states."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

__all__ = ["mix", "seed_all"]


def mix(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes, platforms and Python runs."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generators (what timm's transforms and Mixup draw from) and
    the current CUDA device's (what dropout and drop-path draw from on a GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # The CPU generator and the current device's only: torch.manual_seed would seed every CUDA device in
    # the process, ~100x slower, and each rank uses one.
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
