"""What one forward pass costs at a patch size: FLOPs (counted), parameters, latency, throughput, memory.

Every number here is measured on the machine that runs it, never derived from a formula:

- FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` on one image, after a warm-up call so that
  FlexiViT's cached kernel resize (a once-per-size cost) is not charged to every image. A multiply-add
  counts as 2 FLOPs. PyTorch has no formula for the CPU's fused attention kernel, so one is registered
  here (the same as for the CUDA kernels): attention is counted on every device.
- Latency: batch 1, ``warmup`` untimed calls, then the median of ``repeats`` timed calls.
- Throughput: images per second at ``batch_size``, from the median time of several timed batches.
- Peak memory of one forward at ``batch_size``: on CUDA ``torch.cuda.max_memory_allocated`` (kind
  ``"cuda_max_allocated"``: weights and input included). On the CPU (kind ``"cpu_tensor_peak"``) the
  high-water mark of the tensors allocated during the call (activations and outputs; weights and input
  excluded), tracked op by op with a ``TorchDispatchMode``. The process's RSS high-water mark is no use
  here: after the accuracy pass the allocator serves a forward from memory it already holds, so the RSS
  delta reads 0; the tensor count does not depend on what ran before. Scratch memory that kernels
  allocate outside tensors (e.g. inside fused attention) is not seen.
- Compiled models (``flexivit.model.compile``): timings run the compiled code. FLOPs, and the CPU tensor peak,
  are counted with compiled code run eagerly (``torch.compiler.set_stance("force_eager")``): the
  dispatch-level counters cannot see inside inductor's kernels; the arithmetic is the same.
- Precision: ``autocast(device, precision)`` runs a forward as it is deployed, ``"fp32"`` or
  ``"bf16"`` / ``"fp16"`` autocast (weights stay fp32); ``default_precision`` is bf16 on CUDA (fp16 on
  GPUs without bf16) and fp32 on the CPU.
"""

from __future__ import annotations

import statistics
import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "MeasureSettings", "count_gflops", "param_count", "latency_ms", "throughput", "peak_memory_mb",
    "peak_mem_kind", "measure_costs", "PRECISIONS", "default_precision", "autocast",
]

Forward = Callable[[torch.Tensor], torch.Tensor]
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device: torch.device) -> str:
    """What a model is deployed in on ``device``: bf16 autocast on CUDA (fp16 without bf16), else fp32."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """A fresh context running ops in ``precision`` on ``device`` (``torch.autocast``; fp32: nothing)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _eager() -> AbstractContextManager:
    """Compiled code runs eagerly inside (so dispatch-level counters see every op)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else nullcontext()


@dataclass(frozen=True)
class MeasureSettings:
    """How hard to measure; the defaults take a few seconds per patch size for a small model on a CPU."""

    batch_size: int = 64  # throughput and peak-memory batch
    warmup: int = 3  # untimed calls before each timing
    repeats: int = 20  # timed batch-1 calls for the latency median

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"batch_size and repeats must be >= 1 and warmup >= 0, got {self}")

    @property
    def throughput_repeats(self) -> int:
        return max(3, self.repeats // 4)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    """Flop formulas PyTorch lacks: its fused CPU attention (present in CPU builds of torch >= 2.1)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_flops} if op is not None else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _input(shape: tuple[int, int, int], batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator).to(device=device, dtype=dtype)  # (B, C, H, W)


@torch.no_grad()
def count_gflops(forward: Forward, x: torch.Tensor) -> float:
    """GFLOPs per image of ``forward`` on the batch ``x`` (counted, then divided by the batch size)."""
    with _eager():
        forward(x)  # warm per-size caches so that one-off work is not counted per image
        with flop_counter.FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
            forward(x)
    return counter.get_total_flops() / x.shape[0] / 1e9


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _times_ms(forward: Forward, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        forward(x)
    _sync(x.device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(x)
        _sync(x.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def latency_ms(forward: Forward, x1: torch.Tensor, settings: MeasureSettings) -> float:
    """Median milliseconds of a batch-1 call."""
    return statistics.median(_times_ms(forward, x1, settings.warmup, settings.repeats))


def throughput(forward: Forward, xb: torch.Tensor, settings: MeasureSettings) -> float:
    """Images per second at the batch size of ``xb`` (median batch time)."""
    times = _times_ms(forward, xb, min(settings.warmup, 1), settings.throughput_repeats)
    return xb.shape[0] / (statistics.median(times) / 1e3)


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while the mode is on: current and peak.

    Each new storage is counted once (views and in-place results share it) and uncounted by a weakref
    finalizer when it is freed, so ``peak`` is the high-water mark of memory allocated for tensors during
    the call; tensors that existed before (weights, the input) are not included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def peak_mem_kind(device: torch.device) -> str:
    """What ``peak_memory_mb`` reports on ``device`` (see the module docstring)."""
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_tensor_peak"


@torch.no_grad()
def peak_memory_mb(forward: Forward, xb: torch.Tensor) -> float:
    """Peak memory of one call on ``xb`` in MiB, of the kind ``peak_mem_kind(xb.device)`` names."""
    if xb.device.type == "cuda":
        _sync(xb.device)
        torch.cuda.reset_peak_memory_stats(xb.device)
        forward(xb)
        _sync(xb.device)
        return torch.cuda.max_memory_allocated(xb.device) / 2**20
    tracker = _LiveTensorBytes()
    with _eager(), tracker:
        forward(xb)
    return tracker.peak / 2**20


def measure_costs(
    forward: Forward, image_shape: tuple[int, int, int], settings: MeasureSettings, *,
    device: torch.device, dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """``gflops``, ``img_per_s``, ``latency_ms`` and ``peak_mem_mb`` of ``forward`` on ``image_shape``."""
    x1 = _input(image_shape, 1, device, dtype)  # (1, C, H, W)
    xb = _input(image_shape, settings.batch_size, device, dtype)  # (B, C, H, W)
    gflops = count_gflops(forward, x1)
    peak = peak_memory_mb(forward, xb)
    return {
        "gflops": gflops,
        "img_per_s": throughput(forward, xb, settings),
        "latency_ms": latency_ms(forward, x1, settings),
        "peak_mem_mb": peak,
    }
