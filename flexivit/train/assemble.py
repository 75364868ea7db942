"""Setting up a training run: every part assembled once, so the loop in ``train.py`` only runs.

``assemble`` turns a resolved ``Config`` into a ``Run``: data, model (and teacher), sampler, the step
batches, the optimizer with its parameter groups, the objective, the post-step hooks, per-rank evaluation
loaders, and the step to start from. Errors a user can cause are found here, agreed on by every rank
(the main process decides, everyone raises the same message), so no rank is left waiting in a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader

from flexivit.data.identity import data_changes, data_fingerprint
from flexivit.data.sources import make_loader
from flexivit.data.streams import TrainStream
from flexivit.model.options import registered
from flexivit.model.patch_embed import PatchScheme
from flexivit.model.vit import FlexiViT
from flexivit.outdir import check_folder_target, clear_run, train_out_problem
from flexivit.rng import seed_all
from flexivit.train import state as ckpt
from flexivit.train.builders import RunData, build_data, build_model, build_sampler, build_step_batches, eval_loader, preprocess_meta, schemes_of
from flexivit.train.config import Config, check_config, config_from_dict, flat_keys
from flexivit.train.distill import Teacher, ViewSpec, load_teacher, student_from_teacher
from flexivit.train.hooks import Hooks, PostStepHook
from flexivit.train.objective import LossTerm, Objective, build_objective, l2_sp_term
from flexivit.train.optim import build_optimizer
from flexivit.train.runlock import RunLock
from flexivit.train.sampler import PatchSizeSampler
from flexivit.train.step_batches import PackedStepBatches, StepBatches

__all__ = ["Run", "TrainingError", "assemble", "RESUMABLE_CHANGES"]

# Config fields a resumed run may change: its length and its logging / evaluation / checkpoint cadence.
# Anything else (sampler, token budget, batch size, accumulation, data, model, optimizer) would shift
# the data stream or the update rule the checkpoint was made with.
RESUMABLE_CHANGES = frozenset({
    "name", "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.test_eval", "data.num_workers", "data.eval_batch_size", "data.eval_limit",
})


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, incompatible checkpoint); the message says what to do."""


@dataclass
class Run:
    cfg: Config
    out: Path
    accelerator: Accelerator
    data: RunData
    model: nn.Module  # as prepared by Accelerate (DDP-wrapped on several ranks)
    teacher: Teacher | None
    sampler: PatchSizeSampler
    batches: StepBatches | PackedStepBatches
    optimizer: torch.optim.Optimizer
    scheduler: Any
    objective: Objective
    hooks: Hooks
    eval_loaders: dict[str, DataLoader]  # "val" and "test": this rank's shard of each
    eval_schemes: list[PatchScheme]
    preprocess: dict[str, Any]
    start: dict[str, Any]  # where training starts: step, images_seen, train_seconds (from a checkpoint or 0)
    threads: int  # torch's thread count before the run, restored at its end
    data_fingerprint: dict[str, Any]  # the data and split membership it trains on (flexivit.data.identity)

    @property
    def raw_model(self) -> FlexiViT:
        return self.accelerator.unwrap_model(self.model)


def _agree(accelerator: Accelerator, check: Callable[[], str | None]) -> Any:
    """Run ``check`` on the main process and raise its message (if any) on every rank."""
    message: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            message = [check()]
        except Exception as err:  # an unexpected failure must not leave the other ranks waiting
            message = [f"{type(err).__name__}: {err}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if message[0]:
        raise TrainingError(message[0])


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


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields (dotted) whose values differ between a checkpoint's config and this run's, except those a
    resumed run may change. ``finetune.fixed_at`` only anchors the consistency term: without the term on
    either side it changes nothing (a fine-tune saved before it existed resumes)."""
    a, b = flat_keys(saved), flat_keys(now)
    if not a.get("finetune.consistency") and not b.get("finetune.consistency"):
        a.pop("finetune.fixed_at", None)
        b.pop("finetune.fixed_at", None)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES}


FRESH = {"step": 0, "images_seen": 0, "train_seconds": 0.0}


def _resume(accelerator: Accelerator, out: Path, cfg: Config, model_config: dict, hooks: Hooks,
            fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load the newest good checkpoint; returns where it left off (``FRESH`` if there is none)."""
    chosen: list[Any] = [None]
    if accelerator.is_main_process:  # verifying hashes every file: once, then shared
        state = ckpt.latest_good_state(out / "state", warn=accelerator.print)
        chosen = [str(state) if state else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    if chosen[0] is None:
        accelerator.print(f"no usable checkpoint under {out / 'state'}; starting from step 0")
        return dict(FRESH)
    state = Path(chosen[0])
    saved = ckpt.read_trainer_state(state)
    if saved["model_config"] != model_config:
        diff = {k: (saved["model_config"].get(k), v) for k, v in model_config.items() if saved["model_config"].get(k) != v}
        raise TrainingError(
            f"checkpoint {state} was made for another model shape (saved vs now: {diff}); resume with the "
            "recipe and overrides that made it, or train into a new --out directory"
        )
    # Read back through the config classes, so renamed fields (model.kernel_antialias) compare as today's.
    before = config_from_dict(Config, saved["config"]).to_dict() if "config" in saved else None
    changed = config_changes(before, cfg.to_dict()) if before is not None else {}
    if changed:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
        raise TrainingError(
            f"checkpoint {state} was made with another config ({listed}); a resumed run may change only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))}. Resume with the settings that made it, or train into a new --out"
        )
    changes = data_changes(saved["data"], fingerprint) if "data" in saved else []
    if changes:
        raise TrainingError(
            f"checkpoint {state} was made on other data: {'; '.join(changes)}. A resumed run must read the same images "
            "in the same splits (its validation and test splits would be drawn again); restore the data as it was, "
            "or train into a new --out"
        )
    if "data" not in saved:
        accelerator.print(f"{state} predates data fingerprints: the data could not be checked against it")
    accelerator.load_state(str(state))
    hooks.load(state)
    accelerator.print(f"resumed from {state} (step {saved['step']})")
    return {key: saved.get(key, default) for key, default in FRESH.items()}


def _eval_loaders(cfg: Config, data: RunData, accelerator: Accelerator) -> dict[str, DataLoader]:
    """This rank's shard of the validation and test splits: evaluation needs one reduction per scheme."""
    rank, world = accelerator.process_index, accelerator.num_processes
    return {split: eval_loader(cfg, data, split, rank=rank, world=world) for split in ("val", "test")}


def _model(cfg: Config, data: RunData, teacher: Teacher | None, init: Callable[[FlexiViT], FlexiViT] | None) -> FlexiViT:
    model = build_model(cfg, channels=data.channels, num_classes=data.num_classes)
    if teacher is not None and cfg.distill.init_from_teacher:
        model = student_from_teacher(model.config, teacher.model, keep_student_base=cfg.distill.keep_student_base,
                                     full_rank_base=cfg.distill.full_rank_base)
    if init is not None:
        model = init(model)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.train.compile:
        from flexivit.model.compile import compile_model

        model = compile_model(model)
    return model


def _loss_terms(cfg: Config, model: FlexiViT, accelerator: Accelerator) -> list[LossTerm]:
    if not cfg.optim.pull:
        return []
    if accelerator.distributed_type == DistributedType.FSDP:
        raise TrainingError("optim.pull (L2-SP) needs every full parameter on every rank and does not run under "
                            "FSDP; train with DDP (the default) or set optim.pull=0")
    return [l2_sp_term(model, cfg.optim.pull)]


def assemble(
    cfg: Config,
    *,
    out: Path,
    resume: bool,
    init: Callable[[FlexiViT], FlexiViT] | None = None,
    accelerator: Accelerator | None = None,
    hooks: Sequence[PostStepHook] = (),
    lock: RunLock | None = None,
    overwrite: bool = False,
) -> Run:
    d = check_config(cfg).data  # a config built in Python is checked like a recipe
    accelerator = accelerator or Accelerator(
        mixed_precision=cfg.train.mixed_precision, log_with="tensorboard", project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
    )

    def fresh_out_dir() -> str | None:
        out.mkdir(parents=True, exist_ok=True)
        problem = (lock.acquire(say=accelerator.print) if lock is not None else None) or train_out_problem(
            out, resume=resume, overwrite=overwrite, has_states=bool(ckpt.find_states(out / "state")))
        if problem:
            return problem
        if overwrite and (removed := clear_run(out)):
            accelerator.print(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")
        cfg.save(out / "config.json")
        return None

    check_folder_target(out)
    _agree(accelerator, fresh_out_dir)
    seed_all(cfg.train.seed)  # identical initial weights on every rank

    data = build_data(cfg)
    fingerprint = data_fingerprint(data.splits, d.source)
    teacher = load_teacher(cfg.distill.teacher, patch_size=cfg.distill.teacher_patch_size) if cfg.distill.teacher else None
    model = _model(cfg, data, teacher, init)
    pre = preprocess_meta(cfg, data.channels)
    model_config = model.config.to_dict()
    sampler = build_sampler(cfg)
    batches = build_step_batches(cfg, sampler, model, rank=accelerator.process_index, ranks=accelerator.num_processes)
    stream = data.train if isinstance(data.train, TrainStream) else None  # each rank reads its own shards
    loader = None if stream is not None else make_loader(
        data.train, batch_size=d.batch_size, shuffle=True, seed=cfg.train.seed, num_workers=d.num_workers,
        prefetch_batches=2 * batches.most(), drop_last=True)
    threads = _share_cores(accelerator, d.num_workers)
    try:
        terms = _loss_terms(cfg, model, accelerator)  # anchors taken before DDP/FSDP wrap the model
        optimizer, scheduler = build_optimizer(cfg, model)
        # Only the student is prepared: DDP/FSDP never wrap the teacher, and save_state never sees it.
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        if teacher is not None:
            teacher.to(accelerator.device)
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        raw = accelerator.unwrap_model(model)
        run_hooks = Hooks([*hooks, *(hook for option in registered()  # e.g. a norm projection, re-clustering
                                     for hook in option.post_step_hooks(cfg, raw, sharded=fsdp, say=accelerator.print))])
        start = _resume(accelerator, out, cfg, model_config, run_hooks, fingerprint) if resume else dict(FRESH)
        if stream is not None:
            ranks, workers = accelerator.num_processes, max(1, d.num_workers)
            _agree(accelerator, lambda: stream.check_run(out, step=start["step"], ranks=ranks, workers=workers))
            batches.attach_stream(stream.opener(rank=accelerator.process_index, ranks=ranks, num_workers=d.num_workers,
                                                device=accelerator.device, prefetch_batches=2 * batches.most()),
                                  step=start["step"])
        else:
            batches.attach(loader=loader, dataset=data.train, skip=accelerator.skip_first_batches, step=start["step"])
        view = ViewSpec(d.image_size, data.channels, tuple(pre["mean"]), tuple(pre["std"]))
        objective = build_objective(cfg, num_classes=data.num_classes, teacher=teacher, view=view, terms=terms)
        eval_schemes = schemes_of(cfg.patch, cfg.patch.eval_sizes) if cfg.patch.eval_sizes else list(sampler.schemes)
        return Run(cfg=cfg, out=out, accelerator=accelerator, data=data, model=model, teacher=teacher, sampler=sampler,
                   batches=batches, optimizer=optimizer, scheduler=scheduler, objective=objective, hooks=run_hooks,
                   eval_loaders=_eval_loaders(cfg, data, accelerator), eval_schemes=eval_schemes, preprocess=pre,
                   start=start, threads=threads, data_fingerprint=fingerprint)
    except BaseException:  # a setup error (a refused resume, say) leaves the caller's threads as they were
        torch.set_num_threads(threads)
        raise

