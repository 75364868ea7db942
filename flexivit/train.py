"""The one training loop (pretraining and fine-tuning), on Accelerate.

Every step draws one patch scheme from ``PatchSizeSampler.at(step)`` (the same on every rank), and every
random number derives from ``(seed, step, rank)`` (augmentations from ``(seed, epoch, sample)``), so a run
resumed from a checkpoint continues bit-identically on CPU without saving RNG states.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .builders import build_data, build_model, build_sampler, eval_loader, preprocess_meta, schemes_of
from .config import Config
from .data import make_loader
from .distill import Teacher, ViewSpec, distill_loss, load_teacher, student_from_teacher
from .evaluate import evaluate_schemes, format_table
from .model import FlexiViT
from .rng import mix, seed_all

__all__ = ["train", "TrainingError", "RunResult", "StepInfo", "loader_batches"]


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, incompatible checkpoint); the message says what to do."""


@dataclass
class StepInfo:
    """What a step callback sees after each optimizer step (and its checkpoint, if one was due)."""

    step: int
    scheme: Any
    loss: float
    model: torch.nn.Module
    process_index: int


@dataclass
class RunResult:
    out_dir: Path
    step: int
    eval: list[dict[str, Any]] = field(default_factory=list)


def _batches(loader, data, steps_per_epoch: int, start: int, skip: Callable) -> Iterator[dict]:
    """Yield batches forever, starting at global batch index ``start`` (mid-epoch after a resume)."""
    epoch, offset = divmod(start, steps_per_epoch)
    while True:
        data.set_epoch(epoch)
        loader.set_epoch(epoch)
        yield from (skip(loader, offset) if offset else loader)
        epoch, offset = epoch + 1, 0


class _Window:
    """Per-patch-size running means of the step metrics between two log lines."""

    def __init__(self) -> None:
        self.stats: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.wait = self.total = 0.0

    def add(self, patch: int, metrics: dict[str, float], images: int, seconds: float, wait: float) -> None:
        s = self.stats[patch]
        s["steps"] += 1
        for name, value in metrics.items():
            s[name] += value
        s["images"] += images
        s["seconds"] += seconds
        self.wait += wait
        self.total += seconds

    def summary(self) -> dict[str, Any]:
        per_patch = {}
        for p, s in sorted(self.stats.items()):
            row = {k: v / s["steps"] for k, v in s.items() if k not in ("steps", "images", "seconds")}
            per_patch[str(p)] = {**row, "img_s": s["images"] / max(s["seconds"], 1e-9), "steps": int(s["steps"])}
        return {"per_patch": per_patch, "data_wait_share": self.wait / max(self.total, 1e-9)}


def loader_batches(scheme: Any, image_hw: tuple[int, int], batch_size: int, token_budget: int) -> int:
    """Loader batches one micro-step of ``scheme`` takes: 1, or the token-budget share (``train.token_budget``)."""
    if token_budget <= 0:
        return 1
    gh, gw = scheme.grid_size(image_hw)
    return max(1, token_budget // (batch_size * gh * gw))


def _share_cores(accelerator: Accelerator, num_workers: int) -> int:
    """On CPU, leave the data workers their cores: torch's threads busy-wait for work, so a process with
    one thread per core starves its own workers. ``OMP_NUM_THREADS``, when set, wins. Returns the thread
    count to restore when training ends."""
    before = torch.get_num_threads()
    if accelerator.device.type != "cpu" or num_workers == 0 or "OMP_NUM_THREADS" in os.environ:
        return before
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // accelerator.num_processes - num_workers))
    return before


def _join(parts: list[dict]) -> dict:
    """Loader batches concatenated into one micro-batch (a token-budget step runs them as one forward)."""
    if len(parts) == 1:
        return parts[0]
    kept = [b for b in parts if b["label"].numel()]
    joined = {"skipped": sum(int(b.get("skipped", 0)) for b in parts)}
    if not kept:
        return {**parts[0], **joined}
    return {"image": torch.cat([b["image"] for b in kept]), "label": torch.cat([b["label"] for b in kept]), **joined}


def _resume_state(accelerator: Accelerator, out: Path, model_config: dict) -> int:
    """Load the newest good checkpoint; returns the step to continue from (0 if none)."""
    state = ckpt.latest_good_state(out / "state", warn=accelerator.print)
    if state is None:
        accelerator.print(f"no usable checkpoint under {out / 'state'}; starting from step 0")
        return 0
    saved = json.loads((state / "trainer_state.json").read_text())
    if saved["model_config"] != model_config:
        diff = {k: (saved["model_config"].get(k), v) for k, v in model_config.items() if saved["model_config"].get(k) != v}
        raise TrainingError(
            f"checkpoint {state} was made for another model shape (saved vs now: {diff}); resume with the "
            "recipe and overrides that made it, or train into a new --out directory"
        )
    accelerator.load_state(str(state))
    accelerator.print(f"resumed from {state} (step {saved['step']})")
    return int(saved["step"])


def _save_state(accelerator: Accelerator, out: Path, step: int, model_config: dict, keep: int) -> None:
    root = out / "state"
    tmp = root / f".tmp-step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.finalize_state_dir(tmp, root / f"step_{step}", {"step": step, "model_config": model_config})
        ckpt.prune_states(root, keep)
    accelerator.wait_for_everyone()


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from (they will be written again)."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= step]
        ckpt.atomic_write_text(path, "".join(l + "\n" for l in lines))


def train(
    cfg: Config,
    *,
    out_dir: str | Path,
    resume: bool = False,
    init: Callable[[FlexiViT], FlexiViT] | None = None,
    accelerator: Accelerator | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> RunResult:
    """Train ``cfg`` into ``out_dir``.

    ``init`` maps the freshly built model to the one to train (fine-tuning loads a checkpoint); ``on_step`` is called on every process
    after each step, e.g. for custom logging or to stop a run.
    """
    out, d = Path(out_dir), cfg.data
    accelerator = accelerator or Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with="tensorboard",
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt.find_states(out / "state"):
            raise TrainingError(f"{out} already holds checkpoints; pass --resume to continue it or choose a new --out")
        cfg.save(out / "config.json")
    seed_all(cfg.train.seed)  # identical initial weights on every rank

    data = build_data(cfg)
    model = build_model(cfg, channels=data.channels, num_classes=data.num_classes)
    teacher = load_teacher(cfg.distill.teacher, patch_size=cfg.distill.teacher_patch_size) if cfg.distill.teacher else None
    if teacher is not None and cfg.distill.init_from_teacher:
        model = student_from_teacher(model.config, teacher.model, keep_student_base=cfg.distill.keep_student_base)
    if init is not None:
        model = init(model)
    pre = preprocess_meta(cfg, data.channels)
    student_view = ViewSpec(d.image_size, data.channels, tuple(pre["mean"]), tuple(pre["std"]))
    model_config = model.config.to_dict()
    sampler = build_sampler(cfg)
    image_hw = (d.image_size, d.image_size)
    most = max(loader_batches(s, image_hw, d.batch_size, cfg.train.token_budget) for s in sampler.schemes)
    loader = make_loader(data.train, batch_size=d.batch_size, shuffle=True, seed=cfg.train.seed,
                         num_workers=d.num_workers, prefetch_batches=2 * most * cfg.train.grad_accum, drop_last=True)
    threads = _share_cores(accelerator, d.num_workers)
    optimizer = create_optimizer_v2(model, opt=cfg.optim.opt, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    # timm's scheduler is a pure function of the update count, so it needs no checkpointed state.
    scheduler = CosineLRScheduler(
        optimizer, t_initial=cfg.train.steps, lr_min=cfg.optim.min_lr, warmup_t=cfg.optim.warmup_steps,
        warmup_lr_init=cfg.optim.lr * 1e-3, t_in_epochs=False,
    )
    # Only the student is prepared: DDP/FSDP never wrap the teacher, and save_state never sees it.
    model, optimizer, loader, test_loader = accelerator.prepare(model, optimizer, loader, eval_loader(cfg, data))
    if teacher is not None:
        teacher.to(accelerator.device)
    # L2-SP anchor: the starting weights of everything but the (new) head.
    anchor = [(p, p.detach().clone()) for n, p in accelerator.unwrap_model(model).named_parameters()
              if not n.startswith("head.")] if cfg.optim.pull else []
    steps_per_epoch = len(loader)
    if steps_per_epoch < cfg.train.grad_accum:
        raise TrainingError(f"the training split gives {steps_per_epoch} batches per process; lower data.batch_size")

    step = _resume_state(accelerator, out, model_config) if resume else 0
    if accelerator.is_main_process:
        _trim_log(out / "log.jsonl", step)
    accelerator.init_trackers("tb", config={"name": cfg.name})

    mixup = (
        Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=d.label_smoothing, num_classes=data.num_classes)
        if d.mixup > 0 or d.cutmix > 0 else None
    )
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=d.label_smoothing)
    eval_schemes = schemes_of(cfg.patch, cfg.patch.eval_sizes) if cfg.patch.eval_sizes else list(sampler.schemes)

    def run_eval() -> list[dict[str, Any]]:
        return evaluate_schemes(model, test_loader, eval_schemes, image_hw=image_hw, gather=accelerator.gather_for_metrics)

    def per_micro(at: int) -> int:  # loader batches joined into each micro-batch of step ``at``
        return loader_batches(sampler.at(at), image_hw, d.batch_size, cfg.train.token_budget)

    # Loader batches the steps before ``step`` took: a function of the step numbers alone.
    consumed = cfg.train.grad_accum * sum(per_micro(s) for s in range(step))
    stream = _batches(loader, data.train, steps_per_epoch, consumed, accelerator.skip_first_batches)
    window, skipped, last_eval = _Window(), 0, []
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    model.train()
    while step < cfg.train.steps:
        scheme = sampler.at(step)
        t0 = time.perf_counter()
        wait = 0.0
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=accelerator.device))
        images_seen = 0
        accum, joined = cfg.train.grad_accum, per_micro(step)
        for micro in range(accum):
            tw = time.perf_counter()
            # A token-budget step's loader batches run as one forward: it holds about the budget's tokens,
            # so it needs no more memory than one batch at the budget's patch size, and is faster than
            # accumulating many small micro-batches.
            batch = _join([next(stream) for _ in range(joined)])
            wait += time.perf_counter() - tw
            seed_all(mix(cfg.train.seed, step, micro, accelerator.process_index))  # dropout, mixup
            images, labels = batch["image"], batch["label"]
            skipped += int(batch.get("skipped", 0))
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            # Accumulation by hand (no_sync + loss / accum) rather than accelerator.accumulate, whose
            # end-of-epoch sync would shift the update boundaries when epochs are not a multiple of accum.
            sync = micro == accum - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                with accelerator.autocast():
                    logits = model(images, scheme.patch, scheme.stride)
                    loss, metrics = _objective(cfg, logits, targets, labels, criterion, teacher, images, student_view)
                    if cfg.optim.pull:
                        loss = loss + cfg.optim.pull * sum(((p - p0) ** 2).sum() for p, p0 in anchor)
                accelerator.backward(loss / accum)
            for name, value in {"loss": loss.detach(), **metrics}.items():
                sums[name] += value.float() / accum
            images_seen += images.shape[0]
        names = sorted(sums)
        reduced = accelerator.reduce(torch.stack([sums[n] for n in names]), reduction="mean")
        step_metrics = {n: float(v) for n, v in zip(names, reduced)}
        mean_loss = reduced[names.index("loss")]
        if not torch.isfinite(mean_loss).all():
            good = ckpt.latest_good_state(out / "state", warn=lambda *_: None)
            raise TrainingError(
                f"the loss became {mean_loss.item()} at step {step} (patch {scheme.patch}); stopping. The last good "
                f"checkpoint is {good or 'none (no checkpoint yet)'}; lower optim.lr, keep optim.clip_grad on, or "
                "use train.mixed_precision=no, then --resume"
            )
        if cfg.optim.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        scheduler.step_update(step)
        window.add(scheme.patch, step_metrics, images_seen * accelerator.num_processes, time.perf_counter() - t0, wait)
        bar.update(1)
        bar.set_postfix(patch=scheme.patch, loss=f"{mean_loss.item():.3f}")

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"], "skipped": skipped, **window.summary()}
            _log(accelerator, out, record)
            window = _Window()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            last_eval = run_eval()
            _log(accelerator, out, {"step": step, "eval": last_eval})
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            _save_state(accelerator, out, step, model_config, cfg.train.keep_checkpoints)
        if on_step is not None:
            on_step(StepInfo(step, scheme, mean_loss.item(), model, accelerator.process_index))
    bar.close()

    last_eval = run_eval() if cfg.train.steps > 0 or not last_eval else last_eval
    if accelerator.is_main_process:
        _log(accelerator, out, {"step": step, "eval": last_eval})
        ckpt.save_model(accelerator.unwrap_model(model), out, class_names=data.splits.class_names, preprocess=pre)
        ckpt.atomic_write_text(out / "eval.json", json.dumps({"checkpoint": str(out), "data": d.source, "results": last_eval}, indent=2) + "\n")
        table = format_table(last_eval)
        ckpt.atomic_write_text(out / "eval.md", table + "\n")
        accelerator.print(f"\naccuracy at every patch size ({d.source}, {last_eval[0]['n'] if last_eval else 0} test images):\n{table}")
    accelerator.end_training()
    torch.set_num_threads(threads)
    return RunResult(out_dir=out, step=step, eval=last_eval)


def _objective(cfg: Config, logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, criterion,
               teacher: Teacher | None, images: torch.Tensor, view: ViewSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch and what is logged about it per patch size."""
    metrics: dict[str, torch.Tensor] = {}
    if labels.shape == targets.shape:  # hard labels (no mixup): training accuracy is meaningful
        metrics["acc"] = (logits.argmax(dim=1) == labels).float().mean().detach()
    if teacher is None:
        return criterion(logits, targets), metrics
    teacher_logits = teacher(images, view)
    kd = distill_loss(logits, teacher_logits, temperature=cfg.distill.temperature, quantize=cfg.distill.quantize)
    metrics["distill"] = kd.detach()
    metrics["agree"] = (logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean().detach()
    loss = kd + cfg.distill.label_weight * criterion(logits, targets) if cfg.distill.label_weight else kd
    return loss, metrics


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
        scalars[f"eval/top1_p{row['patch_size']}"] = row["top1"]
    if "data_wait_share" in record:
        scalars["train/data_wait_share"] = record["data_wait_share"]
    if scalars:
        accelerator.log(scalars, step=record["step"])
