"""The seam through which model options (``flexivit.ext``) plug into the core, and the registry of them.

An option family subclasses ``ModelOption``, declares the frozen dataclass of its config fields (their
defaults mean "off"), overrides the hooks it needs and registers itself with ``@register``. The core
never names an option: it asks the registry which options a config turns on and calls their hooks at
fixed places (building the blocks and the head, the token grid of a call, folding into plain weights,
the weight file, evaluation rows, parameter groups, post-step hooks). Option fields are stored flat in
``FlexiViTConfig.to_dict()`` (only when the option is on), so model files stay what they were.

The registry imports the modules ``flexivit.ext.OPTION_MODULES`` lists, and those of the ``flexivit.options``
entry-point group (a package of your own registers its options there: docs/extending.md), the first time a
config names a field that is not a core one: ``import flexivit`` loads no option.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import typing
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

if TYPE_CHECKING:
    from flexivit.model.config import FlexiViTConfig
    from flexivit.model.patch_embed import PatchScheme

__all__ = ["ModelOption", "register", "registered", "option_for_key", "option_named", "load_options",
           "ENTRY_POINTS", "RunField", "run_fields", "loading_weights", "is_loading_weights"]

ENTRY_POINTS = "flexivit.options"
BUILTIN = "flexivit.ext"  # the package whose OPTION_MODULES are the built-in options (imported by name: it sits above)

_REGISTRY: dict[str, "ModelOption"] = {}
_KEYS: dict[str, "ModelOption"] = {}
_loaded = False
_LOADING = contextvars.ContextVar("flexivit_loading_weights", default=False)


@contextmanager
def loading_weights() -> Iterator[None]:
    """While a model is built to be filled by a weight file: an option may skip work whose result every
    loaded tensor overwrites (a fitted dictionary, say), so loading costs what a plain model's does."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def is_loading_weights() -> bool:
    return _LOADING.get()


class ModelOption:
    """One option family. Every hook gets the option's own field values (``values``, an instance of
    ``fields``); the defaults do nothing, so an option overrides only the seams it uses."""

    name: ClassVar[str]
    fields: ClassVar[type]  # a frozen dataclass; its defaults are the option switched off
    order: ClassVar[int] = 0  # hooks of several options run in ascending order (initialisation depends on it)
    # The run config: ``fields`` are also ``model.*`` keys (unset: None); ``run_fields`` adds keys to other
    # sections (section name -> dataclass of them, e.g. ``{"optim": ...}``); ``run_sections`` whole sections
    # (name -> dataclass, e.g. a command's settings). All are read, set and ``--set`` like the core ones.
    run_fields: ClassVar[dict[str, type]] = {}
    run_sections: ClassVar[dict[str, type]] = {}

    # ---- config -----------------------------------------------------------------------------------
    def normalize(self, values: Any, config: "FlexiViTConfig") -> Any:
        """One spelling of the values (sorted tuples, canonical strings); values equal to the defaults
        afterwards mean the option is off."""
        return values

    def check(self, values: Any, config: "FlexiViTConfig") -> None:
        """Raise ``ValueError`` (one line saying what to set) for values that do not fit the config, other
        options' included."""

    def from_run(self, fields: dict[str, Any], run: Any) -> dict[str, Any]:
        """A run's flat model fields (``model.*`` of the run config, the option's among them) with what this
        option takes from the rest of the run filled in (e.g. the training patch sizes)."""
        return fields

    def stored(self, values: Any) -> dict[str, Any]:
        """The flat keys ``FlexiViTConfig.to_dict`` writes for this option (JSON types)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(values).items()}

    # ---- building the model -----------------------------------------------------------------------
    def build_blocks(self, values: Any, config: "FlexiViTConfig", blocks: list[nn.Module]) -> list[nn.Module] | nn.Module:
        """The transformer blocks, changed (a list), or wired into a container of their own (a module)."""
        return blocks

    def new_head(self, values: Any, config: "FlexiViTConfig", num_classes: int) -> nn.Module | None:
        """A classifier of the option's own for ``num_classes`` outputs, or None for the linear head."""
        return None

    def build(self, values: Any, model: nn.Module) -> None:
        """Change the built model before its weights are initialised (e.g. swap its norms)."""

    def finish(self, values: Any, model: nn.Module) -> None:
        """Change the model after its weights are initialised (e.g. reparametrise its layers)."""

    def head_replaced(self, values: Any, model: nn.Module, old: nn.Module) -> None:
        """``reset_classifier`` made a new head: adapt it as ``finish`` adapted the first one."""

    def on_grid(self, values: Any, model: nn.Module, patch: int, grid: tuple[int, int]) -> None:
        """Called by every forward with the call's patch size and token grid, before the blocks."""

    def refuses_packing(self, values: Any) -> str | None:
        """Why the packed forward (``flexivit.model.packed``: several images, each at its own patch size, in
        one token row) cannot reproduce this option's computation (``setting: reason``), or None."""
        return None

    def refuses_grad_checkpointing(self, values: Any) -> str | None:
        """Why gradient checkpointing cannot run with this option (one line), or None."""
        return None

    # ---- export and the weight file ------------------------------------------------------------------
    def non_plain(self, values: Any) -> list[str]:
        """What the option adds that timm's VisionTransformer cannot hold (empty: it folds into plain weights)."""
        return []

    def fold(self, values: Any, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with the option's parameters folded into the plain weights they compute with."""
        return state

    def for_loading(self, values: Any, model: nn.Module) -> nn.Module:
        """The model as a weight file's state dict fills it (e.g. a frozen form)."""
        return model

    def pack_state(self, values: Any, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors written to a weight file (e.g. packed indices)."""
        return state

    def unpack_state(self, values: Any, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``pack_state`` undone, for ``load_state_dict``."""
        return state

    # ---- evaluation ----------------------------------------------------------------------------------
    def eval_notes(self, values: Any, model: nn.Module, scheme: "PatchScheme", image_hw: tuple[int, int]) -> dict[str, Any]:
        """Extra fields of an evaluation row that qualify its numbers (e.g. statistics borrowed from
        another size); each key appears as a column of the printed table when any row has it."""
        return {}

    eval_columns: ClassVar[tuple[tuple[str, str], ...]] = ()  # (column title, row key) for eval_notes' keys

    # ---- training (consulted for every registered option: run-config switches need no model field) -------
    def check_run(self, run: Any) -> None:
        """Raise ``ValueError`` naming the key (``optim.x=-1: must be ...``) for a run-config value of this
        option's that cannot work."""

    def lr_scales(self, run: Any, model: nn.Module) -> dict[str, float]:
        """Learning-rate multipliers by parameter name."""
        return {}

    def no_weight_decay(self, run: Any, model: nn.Module) -> set[str]:
        """Parameters whose weight decay must be off."""
        return set()

    def post_step_hooks(self, run: Any, model: nn.Module, *, sharded: bool, say: Callable[[str], None]) -> list[Any]:
        """Hooks run after each optimizer step (``flexivit.train.hooks.PostStepHook``), state checkpointed."""
        return []

    # ---- fine-tuning -----------------------------------------------------------------------------------
    from_recipe: ClassVar[bool] = False  # a fine-tune takes this option's fields from the recipe, not the checkpoint
    folds: ClassVar[bool] = False  # a fine-tune starts from the weights folded (``fold``), the option off
    needs_support: ClassVar[bool] = False  # prepare_finetune wants examples of the new task's classes

    def finetune_sizes(self, values: Any, model: nn.Module, sizes: list[int]) -> None:
        """A fine-tune keeps this option from the checkpoint and trains at ``sizes`` only (e.g. drop state
        measured at the other sizes, now stale)."""

    def prepare_finetune(self, values: Any, model: nn.Module, support: Any, *, seed: int) -> None:
        """After a fine-tune's model took the pretrained weights, for an option the recipe turns on
        (``support``: (images, labels, patch sizes) of the new task when ``needs_support``, else None)."""


def register(cls: type[ModelOption]) -> type[ModelOption]:
    """Class decorator: add an option to the registry (its name and field names must be new)."""
    from flexivit.model.config import CORE_FIELDS  # the config module imports this one

    option = cls()
    if option.name in _REGISTRY and type(_REGISTRY[option.name]) is not cls:
        raise ValueError(f"an option named {option.name!r} is registered already")
    for f in dataclasses.fields(cls.fields):
        if f.name in CORE_FIELDS:
            raise ValueError(f"option {option.name!r} declares {f.name!r}, a core FlexiViTConfig field")
        owner = _KEYS.get(f.name)
        if owner is not None and owner.name != option.name:
            raise ValueError(f"options {owner.name!r} and {option.name!r} both declare the field {f.name!r}")
        _KEYS[f.name] = option
    _REGISTRY[option.name] = option
    return cls


def load_options() -> None:
    """Import the built-in option modules and those named in the ``flexivit.options`` entry points (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    modules = [*importlib.import_module(BUILTIN).OPTION_MODULES, *(ep.value for ep in entry_points(group=ENTRY_POINTS))]
    for module in dict.fromkeys(modules):
        importlib.import_module(module)


def registered() -> list[ModelOption]:
    """Every option, in hook order."""
    load_options()
    return sorted(_REGISTRY.values(), key=lambda o: (o.order, o.name))


def option_for_key(key: str) -> ModelOption | None:
    """The option that owns the config field ``key`` (loading the registry if needed), or None."""
    if key not in _KEYS:
        load_options()
    return _KEYS.get(key)


def option_named(name: str) -> ModelOption:
    if name not in _REGISTRY:
        load_options()
    if name not in _REGISTRY:
        raise ValueError(f"no model option named {name!r}; registered: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class RunField:
    """A run-config key an option adds: its type, its default (for a whole section: the section's class)."""

    type: Any
    default: Any
    option: str


def run_fields(section: str) -> dict[str, RunField]:
    """The keys the registered options add to the run config's ``section`` (``""``: whole sections)."""
    out: dict[str, RunField] = {}
    for option in registered():
        if section == "model":
            hints = typing.get_type_hints(option.fields)
            for f in dataclasses.fields(option.fields):
                out[f.name] = RunField(hints[f.name] | None, None, option.name)
        elif section == "":
            out.update({name: RunField(cls, cls, option.name) for name, cls in option.run_sections.items()})
        elif section in option.run_fields:
            cls = option.run_fields[section]
            hints = typing.get_type_hints(cls)
            out.update({f.name: RunField(hints[f.name], f.default, option.name) for f in dataclasses.fields(cls)})
    return out


def field_names() -> Iterable[str]:
    load_options()
    return sorted(_KEYS)
