"""Evaluation of one model at many patch schemes: accuracy, and what each size costs on this machine.

``evaluate_schemes`` (used by the trainer) computes top-1, top-5 and loss per scheme. ``sweep`` adds the
measured costs of ``flexivit.eval.measure`` (GFLOPs, parameters, img/s, latency, peak memory), and
``evaluate_checkpoint`` runs it for a run directory, a model file or a timm export folder (plus
fixed-size baselines) on a dataset's test split; ``flexivit.eval.report`` writes the results. The sweep runs
in the precision the model is deployed in (``flexivit.eval.measure.default_precision``: bf16 autocast on
CUDA, fp32 on the CPU, or as asked) and, with ``compile``, on the model compiled once for every size
(``flexivit.model.compile``): accuracy, img/s and latency are then those of the compiled model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flexivit.data.sources import Splits, TransformedDataset, load_source, make_loader, select_classes
from flexivit.model.compile import compile_model, graph_count
from flexivit.eval.measure import MeasureSettings, autocast, default_precision, measure_costs, param_count, peak_mem_kind
from flexivit.model.config import FlexiViTConfig
from flexivit.provenance import cpu_model
from flexivit.model.options import ModelOption, registered
from flexivit.model.vit import FlexiViT
from flexivit.model.patch_embed import PatchScheme
from flexivit.eval.subjects import EvalSubject, fixed_param_count, load_subject, parse_baseline, resolve_patch_sizes
from flexivit.data.transforms import eval_transform

__all__ = [
    "BatchCache", "evaluate_schemes", "format_table", "load_eval_splits", "eval_dataset", "sweep",
    "evaluate_checkpoint", "default_device",
]

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor across processes
CACHE_BYTES = 512 * 2**20  # keep decoded test batches in memory between patch sizes up to this size


@torch.no_grad()
def evaluate_schemes(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]] | Callable[[], Iterable[dict[str, torch.Tensor]]],
    schemes: Sequence[PatchScheme],
    *,
    image_hw: tuple[int, int],
    reduce: Reduce | None = None,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Top-1 (top-5 when there are more than 5 classes), mean loss and token count per scheme, and the notes
    the model's options add to qualify a row (``ModelOption.eval_notes``: e.g. which size's running statistics
    a norm borrowed, or that a layer ran without the map fitted at that size).

    ``batches`` is re-iterated for each scheme (pass a callable to build a fresh iterator each time).
    Sums stay on the device until a scheme is done; with several processes, each evaluates its own shard
    and ``reduce`` sums the totals across them (one collective per scheme, whatever each shard holds, so
    a rank whose batches were all skipped as corrupt still takes part), and every rank returns the same
    numbers.
    """
    was_training = model.training
    model.eval()
    options = _options_of(model)
    results = []
    for scheme in schemes:
        # top-1 hits, top-5 hits, loss sum, images, and whether there are over 5 classes (top-5 reported)
        totals = torch.zeros(5, dtype=torch.float64, device=device)
        data = batches() if callable(batches) else batches
        for batch in data:
            images, labels = batch["image"], batch["label"]
            if labels.numel() == 0:  # every image of the batch was skipped as corrupt
                continue
            if device is not None:
                images, labels = images.to(device), labels.to(device)
            logits = model(images, scheme.patch, scheme.stride).float()
            losses = F.cross_entropy(logits, labels, reduction="none")
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices.eq(labels[:, None])  # (B, k)
            many = torch.full_like(losses[0], float(logits.shape[1] > 5))
            counted = torch.full_like(losses[0], labels.numel())
            parts = (hits[:, 0].sum(), hits.any(dim=1).sum(), losses.sum(), counted, many)
            stats = torch.stack([v.double() for v in parts])  # (5,)
            totals = totals.to(stats.device) + stats
        if reduce is not None:
            totals = reduce(totals)
        correct1, correct5, loss_sum, count, many_classes = totals.tolist()
        gh, gw = scheme.grid_size(image_hw)
        row: dict[str, Any] = {
            "patch_size": scheme.patch,
            "stride": scheme.stride,
            "tokens": gh * gw,
            "top1": correct1 / max(count, 1),
            "loss": loss_sum / max(count, 1),
            "n": int(count),
        }
        if count and many_classes:
            row["top5"] = correct5 / count
        for option, values in options:
            row.update(option.eval_notes(values, model, scheme, image_hw))
        results.append(row)
    model.train(was_training)
    return results


def _options_of(model: nn.Module) -> list[tuple[ModelOption, Any]]:
    """The options of the FlexiViT in ``model`` (which may be wrapped: DDP, compiled), in hook order."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, FlexiViTConfig):
            return config.active()
    return []


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("patch", "patch_size", str), ("stride", "stride", str), ("tokens", "tokens", str),
    ("top-1 (%)", "top1", _pct), ("top-5 (%)", "top5", _pct), ("loss", "loss", "{:.4f}".format),
    ("GFLOPs", "gflops", "{:.4g}".format), ("params", "params", "{:,}".format),
    ("img/s", "img_per_s", "{:.1f}".format), ("latency (ms)", "latency_ms", "{:.3g}".format),
    ("peak mem (MB)", "peak_mem_mb", "{:.1f}".format),
]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of per-scheme results; cost columns appear when the rows have them."""
    known = {key for _, key, _ in _COLUMNS}
    extra = [(title, key, str) for option in registered() for title, key in option.eval_columns] \
        if any(set(r) - known for r in rows) else []  # options' notes that have a column of their own
    columns = [c for c in [*_COLUMNS, *extra] if any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---:|" * len(columns)]
    for r in rows:
        cells = [fmt(r[key]) if r.get(key) is not None else "" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- data --------------------------------------------------------------------------------------------
def load_eval_splits(source: str | None, run_config: dict[str, Any] | None) -> tuple[str, Splits]:
    """The dataset to evaluate on: ``source``, else the run's, else Fashion-MNIST; split as in training."""
    data = (run_config or {}).get("data") or {}
    seed = ((run_config or {}).get("train") or {}).get("seed", 0)
    source = source or data.get("source") or "fashion-mnist"
    same = source == data.get("source")
    options = {k: data[k] for k in ("split_train", "split_test", "image_column", "label_column", "val_fraction")
               if same and data.get(k) is not None}
    return source, load_source(source, seed=seed, validation=False, **options)


def eval_dataset(subject: EvalSubject, splits: Splits, limit: int | None = None) -> TransformedDataset:
    """The test split with ``subject``'s stored evaluation preprocessing.

    The model's classes must be the data's, or some of them (a fine-tuned model on its source dataset:
    the images of its classes are kept and relabelled as in ``data.classes``).
    """
    names = list(subject.meta.get("class_names") or [])
    if names and names != list(splits.class_names) and set(names) < set(splits.class_names):
        splits = select_classes(splits, names)
    if names and names != list(splits.class_names):
        raise ValueError(
            f"{subject.checkpoint} was trained on classes {list(names)[:10]} ({len(names)}) but the data has "
            f"{list(splits.class_names)[:10]} ({len(splits.class_names)}); pass the matching --data"
        )
    transform = eval_transform(subject.preprocess)
    test = splits.test if limit is None else splits.test.select(range(min(limit, len(splits.test))))
    on_corrupt = ((subject.run_config or {}).get("data") or {}).get("on_corrupt", "error")
    return TransformedDataset(test, transform, on_corrupt=on_corrupt)


class BatchCache:
    """Re-iterable batches: kept in memory after the first pass if they fit in ``max_bytes``.

    Evaluation transforms are deterministic, so later patch sizes reuse the decoded batches: the trainer's
    end-of-run and periodic evaluations and ``sweep`` decode each split once, not once per patch size.
    """

    def __init__(self, loader: Iterable[dict[str, Any]], max_bytes: int = CACHE_BYTES) -> None:
        self.loader = loader
        self.max_bytes = max_bytes
        self.kept: list[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[dict[str, Any]] | None = []
        size = 0
        for batch in self.loader:
            if kept is not None:
                size += batch["image"].numel() * batch["image"].element_size()
                if size <= self.max_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self.kept = kept


def _ticking(batches: Iterable[dict[str, Any]], bar: tqdm) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield batch
        bar.update(1)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sweep(
    subject: EvalSubject, data: torch.utils.data.Dataset, patch_sizes: Sequence[int], *,
    settings: MeasureSettings = MeasureSettings(), device: torch.device | None = None,
    eval_batch_size: int = 256, progress: bool = True, precision: str | None = None, compile: bool = False,
) -> list[dict[str, Any]]:
    """Accuracy and measured costs of ``subject`` at each patch size, one row per size.

    ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast), default ``default_precision(device)``;
    ``compile``: compile ``subject.model`` in place first (``flexivit.model.compile.compile_model``).
    """
    device = device or default_device()
    precision = precision or default_precision(device)
    model = subject.model.to(device).eval()
    if compile:
        compile_model(model)

    def forward(x: torch.Tensor, patch: int) -> torch.Tensor:
        with autocast(device, precision):
            return model(x, patch)

    pre = subject.preprocess
    shape = (pre["channels"], pre["image_size"], pre["image_size"])
    loader = make_loader(data, batch_size=eval_batch_size, shuffle=False, seed=0, drop_last=False)
    batches = BatchCache(loader)
    rows = []
    with tqdm(total=len(patch_sizes) * (len(loader) + 1), desc=f"eval {subject.label}", disable=not progress,
              unit="step", leave=False) as bar:
        for patch in patch_sizes:
            bar.set_postfix(patch=patch)
            scheme = PatchScheme(int(patch))
            with autocast(device, precision):
                row = evaluate_schemes(model, _ticking(batches, bar), [scheme], image_hw=shape[1:],
                                       device=device)[0]
            row.update(measure_costs(lambda x: forward(x, scheme.patch), shape, settings, device=device))
            row["params"] = param_count(model)
            if isinstance(model, FlexiViT):
                row["params_fixed"] = fixed_param_count(model, scheme.patch)
            rows.append(row)
            bar.update(1)
    return rows


def _baseline(spec: str) -> EvalSubject:
    """A ``CKPT[:PATCH]`` baseline, evaluated at PATCH (default: the size the model was configured for)."""
    path, patch = parse_baseline(spec)
    return load_subject(path, patch, single=True)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def evaluate_checkpoint(
    checkpoint: str | Path, *, data: str | None = None, patch_sizes: str | Sequence[int] | None = None,
    baselines: Sequence[str] = (), settings: MeasureSettings = MeasureSettings(),
    device: torch.device | None = None, eval_batch_size: int = 256, limit: int | None = None,
    progress: bool = True, precision: str | None = None, compile: bool = False,
) -> dict[str, Any]:
    """The ``eval.json`` report of ``checkpoint`` (and of ``CKPT[:PATCH]`` baselines) on a test split.

    ``precision`` and ``compile`` as in ``sweep`` (for every model swept); the report records both, the
    graphs compiled during the sweeps, the device and the thread settings.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of test images, got {limit}")
    if eval_batch_size < 1:
        raise ValueError(f"--eval-batch-size must be a positive integer, got {eval_batch_size}")
    device = device or default_device()
    precision = precision or default_precision(device)
    subject = load_subject(checkpoint)
    sizes = resolve_patch_sizes(patch_sizes, subject.valid_sizes, subject.default_sizes,
                                image_size=subject.preprocess["image_size"])
    others = [_baseline(spec) for spec in baselines]
    source, splits = load_eval_splits(data, subject.run_config)

    def run(s: EvalSubject, s_sizes: Sequence[int]) -> list[dict[str, Any]]:
        return sweep(s, eval_dataset(s, splits, limit), s_sizes, settings=settings, device=device,
                     eval_batch_size=eval_batch_size, progress=progress, precision=precision, compile=compile)

    graphs_before = graph_count()
    results = run(subject, sizes)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "data": source,
        "split": "test",
        "n": results[0]["n"] if results else 0,
        "device": str(device),
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "precision": precision,
        "compile": compile,
        "torch": torch.__version__,
        "batch_size": settings.batch_size,
        "latency_batch_size": 1,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "peak_mem_kind": peak_mem_kind(device),
        "image_size": subject.preprocess["image_size"],
        "num_classes": len(subject.meta.get("class_names") or []),
        "results": results,
    }
    if others:
        report["baselines"] = [
            {"checkpoint": o.checkpoint, "label": o.label, "results": run(o, o.default_sizes)} for o in others
        ]
    if compile:
        report["compiled_graphs"] = graph_count() - graphs_before
    return report
