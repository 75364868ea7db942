"""Timed training and eval steps for benchmarks: side-by-side races, FLOP counts and peak memory.

Shared by ``tools/bench.py`` and ``tools/gpu_check.py``: a ``Step`` is a zero-argument callable that runs one
training or eval step; ``race`` times several of them in rotated blocks so a noisy machine slows each alike.
"""

from __future__ import annotations

import ctypes
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

__all__ = ["Step", "Settings", "timed", "race", "autocast", "train_step", "eval_step", "peak_mem_mb", "count_flops"]

Step = Callable[[], None]



@dataclass(frozen=True)
class Settings:
    device: torch.device
    amp: bool
    compile: bool
    repeats: int  # least number of timed blocks per model and phase
    block_s: float  # target duration of one timed block
    phase_s: float  # target duration of one phase (train or eval race of one patch size)
    warmup: int


def timed(fn: Step, n: int, device: torch.device) -> float:
    """Seconds for ``n`` calls of ``fn``, device work included."""
    sync: Step = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return time.perf_counter() - start


def race(steps: dict[str, Step], batch: int, s: Settings) -> dict[str, list[float]]:
    """Images/s of each step in alternating (ABBA) timed blocks of about ``s.block_s``: at least
    ``s.repeats`` per model, more while the race stays within ``s.phase_s`` seconds."""
    for fn in steps.values():
        timed(fn, s.warmup, s.device)
    slowest = max(timed(fn, 1, s.device) for fn in steps.values())
    n = max(1, min(1000, round(s.block_s / max(slowest, 1e-6))))
    repeats = max(s.repeats, min(4 * s.repeats, round(s.phase_s / (len(steps) * n * slowest))))
    img_s: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats):
        for name in list(steps)[:: 1 if r % 2 == 0 else -1]:
            img_s[name].append(n * batch / timed(steps[name], n, s.device))
    return img_s


# ---- training and eval steps ---------------------------------------------------------------------
def autocast(s: Settings) -> AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if s.amp else nullcontext()


def train_step(model: nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor, s: Settings) -> Step:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:  # the mode (train) is set by the caller, once
        opt.zero_grad(set_to_none=True)
        with autocast(s):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()

    return step


def eval_step(forward: Callable, x: torch.Tensor, s: Settings) -> Step:
    def step() -> None:
        with torch.no_grad(), autocast(s):
            forward(x)

    return step


# ---- memory and FLOPs ----------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[field].split()[0])


def peak_mem_mb(step: Step, device: torch.device) -> float | None:
    """Peak memory above the pre-step level during one call of ``step`` (MB), or None."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        timed(step, 1, device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed arenas back so the baseline is honest
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
        step()
        return (_status_kb("VmHWM") - base) / 1024
    except (OSError, KeyError, AttributeError):
        return None


def count_flops(step: Step) -> int:
    """FLOPs of one call; FlopCounterMode knows only the CUDA attention kernels, so add the CPU ones."""
    aten, fc = torch.ops.aten, flop_counter
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, **__: fc.sdpa_backward_flop_count(g, q, k, v),
    } if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward") else {}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        step()
    return int(counter.get_total_flops())
