"""The one training loop (pretraining, distillation and fine-tuning), on Accelerate.

``flexivit.train.assemble.assemble`` builds every part of a run once; the loop below only runs it. Every step draws
one patch scheme from ``PatchSizeSampler.at(step)`` (the same on every rank), and every random number
derives from ``(seed, step, micro-batch, rank)`` (augmentations from ``(seed, epoch, sample)``), so a run
resumed from a checkpoint continues bit-identically on CPU without saving RNG states. Metrics stay on the
device and are gathered once per log line; a non-finite loss is caught there, before any checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from flexivit.eval.evaluate import BatchCache, evaluate_schemes, format_table
from flexivit.files import atomic_write_text
from flexivit.jsonl import read_jsonl
from flexivit.model.patch_embed import PatchScheme
from flexivit.model.vit import FlexiViT
from flexivit.model.weights import save_model
from flexivit.rng import mix, seed_all
from flexivit.train.assemble import Run, TrainingError, assemble
from flexivit.train.config import Config
from flexivit.train.hooks import PostStepHook
from flexivit.train.metrics import MIXED, MetricWindow
from flexivit.train.runlock import RunLock
from flexivit.train.state import finalize_state_dir, latest_good_state, prune_states

__all__ = ["train", "TrainingError", "RunResult", "StepInfo"]


@dataclass
class StepInfo:
    """What a step callback sees after each optimizer step (and its checkpoint, if one was due).

    ``loss`` and ``metrics`` are this rank's device tensors for the step (reading them syncs the device).
    """

    step: int
    scheme: PatchScheme | None  # None with patch.per_image: the step's images have their own sizes
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    model: torch.nn.Module
    process_index: int


@dataclass
class Progress:
    """How far a run has come; saved in every checkpoint so a resumed run keeps counting."""

    step: int
    images_seen: int  # training images over all ranks (a token-budget step counts every joined image)
    train_seconds: float  # wall time inside the training loop, evaluation and checkpoints excluded
    skipped: int = 0  # corrupt images skipped since this process started

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds}


@dataclass
class RunResult:
    out_dir: Path
    step: int
    eval: list[dict[str, Any]] = field(default_factory=list)  # test split, every evaluated scheme
    val: list[dict[str, Any]] = field(default_factory=list)  # validation split, the same schemes


def train(
    cfg: Config,
    *,
    out_dir: str | Path,
    resume: bool = False,
    init: Callable[[FlexiViT], FlexiViT] | None = None,
    accelerator: Accelerator | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    hooks: Sequence[PostStepHook] = (),
    overwrite: bool = False,
) -> RunResult:
    """Train ``cfg`` into ``out_dir``.

    ``init`` maps the freshly built model to the one to train (fine-tuning loads a checkpoint); ``hooks``
    run after every optimizer step, their state saved in checkpoints; ``on_step`` is called on every
    process after each step, e.g. for custom logging or to stop a run.

    A folder that holds a model or another run's checkpoints is refused unless ``resume`` (continue it) or
    ``overwrite`` (start over: its checkpoints, model, log and report are removed first); one training at a
    time holds the folder's lock (``flexivit.train.runlock``).
    """
    with RunLock(out_dir) as lock:  # taken on the main process in assemble; released however the run ends
        run = assemble(cfg, out=Path(out_dir), resume=resume, init=init, accelerator=accelerator, hooks=hooks,
                       lock=lock, overwrite=overwrite)
        try:
            if run.accelerator.is_main_process:
                _trim_log(run.out / "log.jsonl", run.start["step"])
            run.accelerator.init_trackers("tb", config={"name": cfg.name})
            return _finish(run, _loop(run, on_step))
        finally:
            torch.set_num_threads(run.threads)


def _loop(run: Run, on_step: Callable[[StepInfo], None] | None) -> Progress:
    cfg, acc, model, t = run.cfg, run.accelerator, run.model, run.cfg.train
    done = Progress(**run.start)
    window = MetricWindow(acc.device)
    bar = tqdm(total=t.steps, initial=done.step, disable=not acc.is_local_main_process, desc="train")
    model.train()
    while done.step < t.steps:
        step = done.step
        scheme, t0 = run.batches.scheme_at(step), time.perf_counter()
        patch = scheme.patch if scheme is not None else 0  # 0: a patch size per image (logged as "mixed")
        metrics, images, wait = _accumulate(run, step, scheme, done)
        if cfg.optim.clip_grad:
            acc.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        step = done.step = step + 1
        run.scheduler.step_update(step)
        run.hooks.after_step(run.raw_model, step)
        seconds = time.perf_counter() - t0
        done.images_seen += images
        done.train_seconds += seconds
        window.add(step=step, patch=patch, metrics=metrics, images=images, seconds=seconds, wait=wait)
        bar.update(1)
        bar.set_postfix(patch=patch or MIXED)
        checkpoint_due = step % t.checkpoint_every == 0 or step == t.steps
        if step % t.log_every == 0 or checkpoint_due:  # never checkpoint an unchecked loss
            record, bad = window.summary(acc.gather)
            if bad is not None:
                _diverged(run, *bad)
            hooks = run.hooks.metrics()
            _log(acc, run.out, {"step": step, "lr": run.optimizer.param_groups[0]["lr"], "skipped": done.skipped, **record,
                                **({"hooks": hooks} if hooks else {})})
            window = MetricWindow(acc.device)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            _log(acc, run.out, {"step": step, "split": "val", "eval": _evaluate(run, "val")})
        if checkpoint_due:
            _save_state(run, done)
        if on_step is not None:
            on_step(StepInfo(step, scheme, metrics["loss"], metrics, model, acc.process_index))
    bar.close()
    return done


def _accumulate(run: Run, step: int, scheme: PatchScheme | None,
                done: Progress) -> tuple[dict[str, torch.Tensor], int, float]:
    """Forward and backward every micro-batch of ``step``; returns the step's metrics (device tensors), the
    step's images on all ranks and the seconds spent waiting for data."""
    acc, accum, seed = run.accelerator, run.cfg.train.grad_accum, run.cfg.train.seed
    metrics: dict[str, torch.Tensor] = {}
    images, wait = 0, 0.0
    micro_batches = run.batches.micro_batches(step)
    for micro in range(accum):
        tw = time.perf_counter()
        batch = next(micro_batches)
        wait += time.perf_counter() - tw
        seed_all(mix(seed, step, micro, acc.process_index))  # dropout, drop-path, mixup
        done.skipped += batch["skipped"]
        # Accumulation by hand (no_sync + loss / accum) rather than accelerator.accumulate, whose
        # end-of-epoch sync would shift the update boundaries when epochs are not a multiple of accum.
        with acc.no_sync(run.model) if micro < accum - 1 else contextlib.nullcontext():
            with acc.autocast():
                loss, micro_metrics = run.objective(run.model, batch, scheme, step)
            acc.backward(loss / accum)
        for name, value in {"loss": loss.detach(), **micro_metrics}.items():
            metrics[name] = metrics.get(name, 0) + value.float() / accum
        images += batch.get("world_images", batch["label"].shape[0] * acc.num_processes)
    return metrics, images, wait


def _diverged(run: Run, step: int, patch: int) -> None:
    good = latest_good_state(run.out / "state", warn=lambda *_: None)
    raise TrainingError(
        f"the loss became non-finite at step {step} ({f'patch {patch}' if patch else f'{MIXED} patch sizes'}); stopping. The last good checkpoint is "
        f"{good or 'none (no checkpoint yet)'}; lower optim.lr, keep optim.clip_grad on, or use "
        "train.mixed_precision=no, then --resume"
    )


def _evaluate(run: Run, split: str) -> list[dict[str, Any]]:
    """Top-1 and loss at every evaluated scheme on ``split``; the same numbers on every rank."""
    acc = run.accelerator
    return evaluate_schemes(run.model, BatchCache(run.eval_loaders[split]), run.eval_schemes,
                            image_hw=(run.cfg.data.image_size,) * 2, device=acc.device,
                            reduce=lambda t: acc.reduce(t, reduction="sum"))


def _finish(run: Run, done: Progress) -> RunResult:
    """Score validation (and test, unless ``train.test_eval`` is off), write the model and the report,
    and close the trackers."""
    acc, cfg, step = run.accelerator, run.cfg, done.step
    val = _evaluate(run, "val")
    test = _evaluate(run, "test") if cfg.train.test_eval else []
    state = acc.get_state_dict(run.model)  # a collective under FSDP: every rank takes part
    if acc.is_main_process:
        _log(acc, run.out, {"step": step, "split": "val", "eval": val})
        if test:
            _log(acc, run.out, {"step": step, "split": "test", "eval": test})
        save_model(run.raw_model, run.out, class_names=run.data.splits.class_names, preprocess=run.preprocess,
                        state_dict=state)
        split, rows = ("test", test) if test else ("val", val)
        report = {"checkpoint": str(run.out), "data": cfg.data.source, "split": split, "results": rows, "val": val,
                  **done.to_dict()}
        atomic_write_text(run.out / "eval.json", json.dumps(report, indent=2) + "\n")
        table = format_table(rows)
        atomic_write_text(run.out / "eval.md", table + "\n")
        acc.print(f"\naccuracy at every patch size ({cfg.data.source}, {split} split, {rows[0]['n'] if rows else 0} "
                  f"images; {done.images_seen} training images in {done.train_seconds / 60:.1f} min):\n{table}")
    acc.end_training()
    return RunResult(out_dir=run.out, step=step, eval=test, val=val)


def _save_state(run: Run, done: Progress) -> None:
    """Write ``state/step_N`` in three parts, each agreed on by every rank before the next (the agreement is
    the barrier between them): a write that fails on any rank (a folder made unwritable, a full disk) stops
    every rank with one message naming the folder, and the checkpoints already there are kept."""
    acc, root, step = run.accelerator, run.out / "state", done.step
    tmp = root / f".tmp-step_{step}"

    def prepare() -> None:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)

    def seal() -> None:
        if acc.is_main_process:
            run.hooks.save(tmp)
            trainer_state = {**done.to_dict(), "model_config": run.raw_model.config.to_dict(),
                             "config": run.cfg.to_dict(), "data": run.data_fingerprint}
            finalize_state_dir(tmp, root / f"step_{step}", trainer_state)
            prune_states(root, run.cfg.train.keep_checkpoints)

    for part in (prepare, lambda: acc.save_state(str(tmp)), seal):
        problem = _on_every_rank(acc, part)
        if problem is not None:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            good = latest_good_state(root, warn=lambda *_: None)
            raise TrainingError(f"cannot write the step-{step} checkpoint into {root} ({problem}); the last good "
                                f"checkpoint is {good or 'none (none was written yet)'}: make {root} writable (or free "
                                "space), then --resume")


def _on_every_rank(acc: Accelerator, part: Callable[[], None]) -> str | None:
    """Run this rank's ``part`` of a write, then agree with the other ranks (a collective, so also a barrier):
    the first failing rank's ``OSError`` as text, or ``None`` when every rank succeeded."""
    try:
        part()
        problem = None
    except OSError as err:
        problem = f"{type(err).__name__}: {err}"
    problems = gather_object([problem]) if acc.num_processes > 1 else [problem]
    return next((p for p in problems if p is not None), None)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from (they will be written again), and a line
    cut short by a crash (``flexivit.jsonl``)."""
    if path.exists():
        records = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _log(accelerator: Accelerator, out: Path, record: dict[str, Any]) -> None:
    if not accelerator.is_main_process:
        return
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    scalars: dict[str, float] = {}
    for p, s in record.get("per_patch", {}).items():
        for name, value in s.items():
            if name != "steps":
                scalars[f"train/{name}_p{p}"] = value
    for row in record.get("eval", []):
        scalars[f"{record.get('split', 'eval')}/top1_p{row['patch_size']}"] = row["top1"]
    for name, value in record.get("hooks", {}).items():
        scalars[f"train/{name}"] = value
    if "data_wait_share" in record:
        scalars["train/data_wait_share"] = record["data_wait_share"]
    if scalars:
        accelerator.log(scalars, step=record["step"])
