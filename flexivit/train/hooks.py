"""Post-step hooks: work an option does after every ``optimizer.step()`` (a weight projection, a
re-clustering), with state that is saved in every training checkpoint so a resumed run stays exact.

A hook is any object with a ``name``, ``after_step(model, step)``, and ``state_dict()`` /
``load_state_dict(state)`` over a flat dict of tensors. ``Hooks`` runs them in order and stores their
state as ``hooks.safetensors`` in the training checkpoint (not through Accelerate's custom-object
checkpointing, which pickles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["PostStepHook", "Hooks", "HOOKS_FILE"]

HOOKS_FILE = "hooks.safetensors"
State = dict[str, torch.Tensor]


class PostStepHook(Protocol):
    name: str

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called on every rank after the optimizer update that ends step ``step`` (1-based)."""

    def state_dict(self) -> State: ...

    def load_state_dict(self, state: State) -> None: ...


class Hooks:
    """The run's post-step hooks; ``model`` is the unwrapped model (not the DDP/FSDP wrapper)."""

    def __init__(self, hooks: Sequence[PostStepHook] = ()) -> None:
        names = [h.name for h in hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"post-step hook names must be unique, got {names}")
        self.hooks = list(hooks)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def after_step(self, model: nn.Module, step: int) -> None:
        for hook in self.hooks:
            hook.after_step(model, step)

    def metrics(self) -> dict[str, float]:
        """Scalars hooks report for the log line (a hook may define ``metrics()``; averaged since its last
        call), e.g. the weight-norm ratio and rotation of fixed-norm updates."""
        return {k: v for h in self.hooks if hasattr(h, "metrics") for k, v in h.metrics().items()}

    def save(self, folder: Path) -> None:
        """Write every hook's state into ``folder`` (a training checkpoint being written)."""
        if self.hooks:
            state = {f"{h.name}/{k}": v.detach().cpu().contiguous() for h in self.hooks for k, v in h.state_dict().items()}
            save_file(state, str(folder / HOOKS_FILE))

    def load(self, folder: Path) -> None:
        """Restore every hook's state from a training checkpoint."""
        if not self.hooks:
            return
        file = folder / HOOKS_FILE
        if not file.is_file():
            raise ValueError(f"{folder} holds no {HOOKS_FILE}: it was written without the post-step hooks "
                             f"{[h.name for h in self.hooks]}; resume with the options that made it")
        state = load_file(str(file))
        for hook in self.hooks:
            prefix = f"{hook.name}/"
            hook.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
