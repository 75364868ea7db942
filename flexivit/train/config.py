"""Typed run configuration: recipes are Python run cards returning a ``Config``.

``load_recipe("fashion_mnist:smoke", ["optim.lr=3e-4"])`` imports ``recipes/fashion_mnist.py`` (or a
file path), calls ``get_config("smoke")``, applies ``--set`` overrides with type checks, and returns the
resolved ``Config``. Unknown keys are errors that name the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.machinery
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from flexivit.model.options import run_fields
from flexivit.train.config_checks import ConfigError, check_config

__all__ = [
    "ConfigError", "Config", "ModelConfig", "DataConfig", "PatchConfig", "StageConfig", "OptimConfig", "TrainConfig",
    "DistillConfig", "FinetuneConfig", "load_recipe", "apply_overrides", "config_from_dict", "list_recipes", "RECIPES_DIR",
    "recipe_search_grid", "check_config", "flat_keys",
]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"  # flexivit/recipes, shipped in the package


class _WithOptions:
    """A section whose keys include those the registered model options add (``flexivit.model.options``):
    read, set, ``--set`` and saved like its own fields, kept in its ``options`` dict."""

    _section: ClassVar[str]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key == "options":
            raise AttributeError(key)
        spec = run_fields(self._section).get(key)
        if spec is None:
            raise AttributeError(f"the {self._section or 'run'} config has no key {key!r}")
        options = self.__dict__.setdefault("options", {})
        if key not in options and isinstance(spec.default, type):  # a whole section: made once, then edited
            options[key] = spec.default()
        return options.get(key, spec.default)

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.__dataclass_fields__ or key.startswith("_"):
            object.__setattr__(self, key, value)
        elif key in run_fields(self._section):
            self.options[key] = value
        else:
            raise _unknown_key(f"{self._section + '.' if self._section else ''}{key}",
                               list(_keys_of(type(self))))

    def option_values(self) -> dict[str, Any]:
        """Every option key of this section with its value (set or default), as saved."""
        return {key: (dataclasses.asdict(v) if dataclasses.is_dataclass(v := getattr(self, key)) else v)
                for key in run_fields(self._section)
                if self.options.get(key) is not None or self._section != "model"}  # model: what is set

    def __eq__(self, other: object) -> bool:
        """Equal fields and equal option values, an option key left at its default counting as its default."""
        if type(other) is not type(self):
            return NotImplemented
        own = [f.name for f in dataclasses.fields(self) if f.name != "options"]
        return all(getattr(self, n) == getattr(other, n) for n in own) and self.option_values() == other.option_values()


@dataclass(eq=False)
class ModelConfig(_WithOptions):
    """Architecture; input channels and classes come from the data."""

    _section: ClassVar[str] = "model"

    variant: str = "flexi_vit_micro"  # a registered variant whose defaults the fields below override
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    base_patch_size: int | None = None
    base_grid: int | None = None
    class_token: bool | None = None
    global_pool: str | None = None
    posemb: str | None = None
    kernel_resize: str | None = None  # "bilinear" | "bilinear_aa" | "area" (see flexivit.model.resize)
    posemb_antialias: bool | None = None
    drop_path_rate: float | None = None
    # Model options' fields (flexivit.model.options: e.g. model.norm=bgn) are keys of this section too, kept
    # in `options` while set; unset they are None (the option's own default).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # "fashion-mnist", a folder, "hf:NAME[:CONFIG]", or a stream (docs/streaming.md)
    image_size: int = 28
    channels: int | None = None  # None: the source's own channel count
    batch_size: int = 128  # per process
    eval_batch_size: int = 512
    num_workers: int = 0
    val_fraction: float = 0.1  # share of train held out as validation (and first as test, if none shipped)
    split_train: str = "train"
    split_test: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    classes: list[str] | None = None  # keep only these classes (relabelled in this order)
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    hflip: float = 0.5
    randaugment: str | None = None  # timm string, e.g. "rand-m9-mstd0.5"
    crop_pct: float = 1.0
    mixup: float = 0.0  # timm Mixup alpha (0 = off)
    cutmix: float = 0.0  # timm CutMix alpha (0 = off)
    label_smoothing: float = 0.0
    on_corrupt: str = "error"  # "error" (stop, naming the file) or "skip" (drop and count)
    eval_limit: int | None = None  # evaluate on the first N validation and test images only (smoke runs)
    stream_mix: int = 8  # streams: shards a data worker reads at once, their records interleaved at random


@dataclass
class StageConfig:
    """One curriculum stage: a distribution used for the steps before ``until``."""

    until: int
    distribution: str = "uniform"
    weights: list[float] | None = None
    center: float | None = None
    width: float | None = None


@dataclass
class PatchConfig:
    sizes: list[int] = field(default_factory=lambda: [2, 4, 7, 14])
    strides: list[int] | None = None  # one per size (stride < size overlaps); None: stride = size
    distribution: str = "uniform"  # "uniform" | "weighted" | "gaussian" | "curriculum"
    weights: list[float] | None = None
    center: float | None = None
    width: float | None = None
    curriculum: list[StageConfig] = field(default_factory=list)
    default: int | None = None  # the model's default (deployment) size; None: the median size
    eval_sizes: list[int] | None = None  # None: every training size
    # A patch size per image instead of per step: each step packs images of mixed sizes into token rows
    # (flexivit.train.step_batches.PackedStepBatches; docs/packed.md). Rows: train.token_budget // row_tokens
    # (data.batch_size rows without a budget); row_tokens: None = the longest image's.
    per_image: bool = False
    row_tokens: int | None = None
    pack_patience: int = 2  # draws that may miss in a row before a step's rows are closed (they wait, not lost)


@dataclass(eq=False)
class OptimConfig(_WithOptions):
    _section: ClassVar[str] = "optim"
    opt: str = "adamw"  # any timm optimizer name
    lr: float = 1e-3  # for the global batch (batch_size x processes x accumulation)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr: float = 1e-5
    clip_grad: float | None = 1.0
    pull: float = 0.0  # L2-SP: weight of ||theta - theta_start||^2 (fine-tuning keeps near the start)
    layer_decay: float | None = None  # timm's layer-wise lr decay: head at lr, each block below x decay
    # Learning-rate multiplier of the base patch kernel. Adam moves every base weight by about lr a step,
    # and a PI-resize that averages (area, bilinear_aa) sums up to (base/p)^2 of those moves into one
    # weight of a small patch's kernel; a scale below 1 keeps a large base kernel's small-patch steps sane.
    kernel_lr_scale: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # model options' optimizer keys (see ModelConfig)


@dataclass
class DistillConfig:
    teacher: str | None = None  # a flexivit run dir / model file, or "timm:NAME=WEIGHTS_FILE"
    teacher_patch_size: int | None = None  # for a FlexiViT teacher; None: its default size
    temperature: float = 1.0
    label_weight: float = 0.0  # weight of label cross-entropy added to the distillation loss
    quantize: str = "none"  # "none" | "hard" | "topk:K" | "bits:B"
    init_from_teacher: bool = True  # the student starts from the teacher's weights
    keep_student_base: bool = False  # resize the teacher's kernel/grid into model.base_* (lossy)
    # A student base larger than the teacher's kernel (keep_student_base) also keeps the part of its fresh
    # initialisation that no resized teacher kernel can reach (upsampled alone, a 14x14 base from a 4x4 kernel has
    # rank <= 16); where the base is the teacher's own size nothing is out of reach and nothing changes.
    full_rank_base: bool = False


@dataclass
class FinetuneConfig:
    """Adjustments for `flexivit finetune --patch-size N` (fine-tuning at one fixed size)."""

    fixed_lr_scale: float = 1.0  # multiplies optim.lr
    fixed_pull: float = 0.0  # becomes optim.pull (L2-SP toward the pretrained weights)
    # Keeping the other sizes (flexivit.train.finetune_modes, docs/flexible_finetune.md). The default, chosen on
    # validation over three pretrained seeds (docs/results/finetune_keep_round4.md): the consistency term on every
    # step, which keeps every evaluated size at about 2x the compute; finetune.consistency=0 is the plain fine-tune.
    fixed_others: float = 0.0  # share of steps at the recipe's other sizes (evenly), the rest at --patch-size
    consistency: float = 1.0  # weight of KL(logits at --patch-size, stop-gradient || logits at another size)
    consistency_share: float = 1.0  # share of the --patch-size steps that add the consistency term
    head_init: str = "fresh"  # "fresh" (random) | "probe" (a linear probe on frozen features at every size)
    fixed_at: int | None = None  # set by --patch-size: the fine-tune's size, where the consistency term anchors


@dataclass
class TrainConfig:
    steps: int = 1600
    seed: int = 0
    grad_accum: int = 1
    # Token-budget batches (0 = off): a step whose batch holds fewer tokens than this joins
    # max(1, budget // (batch_size * tokens per image)) loader batches into one forward (per grad_accum
    # micro-step), so large patches see more images per step for about the same compute and memory;
    # e.g. 128 * 49 = 6272 gives patch 4 one batch, 7 three, 14 twelve.
    token_budget: int = 0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute
    compile: bool = False  # torch.compile the model once for every patch size (flexivit.model.compile)
    test_eval: bool = True  # score the test split at the end (searches turn it off: they select on val)


@dataclass(eq=False)
class Config(_WithOptions):
    _section: ClassVar[str] = ""  # options add whole sections here (e.g. a command's settings)

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    options: dict[str, Any] = field(default_factory=dict)  # sections the model options add

    def to_dict(self) -> dict[str, Any]:
        """Every section as saved in ``config.json``: the options' keys flat among each section's own."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _WithOptions):
                out[f.name] = {**{g.name: getattr(value, g.name) for g in dataclasses.fields(value)
                                  if g.name != "options"}, **value.option_values()}
                out[f.name] = json.loads(json.dumps(out[f.name], default=list))  # tuples as lists, as asdict+JSON
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            elif f.name != "options":
                out[f.name] = value
        return {**out, **self.option_values()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def flat_keys(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict (``Config.to_dict()``, a saved ``config.json``) as dotted keys: ``{"optim.lr": ...}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ---- typed conversion ------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    """A section's keys and their types: its own fields, and for a section the model options extend, theirs."""
    hints = {k: v for k, v in typing.get_type_hints(cls).items() if k not in ("options", "_section")}
    if isinstance(cls, type) and issubclass(cls, _WithOptions):
        hints.update({key: spec.type for key, spec in run_fields(cls._section).items()})
    return hints


def _keys_of(cls: type) -> list[str]:
    return list(_hints(cls))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from JSON or a ``--set`` string) to type ``tp``, or raise naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: cannot read {value!r} as {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if not value.startswith("[") else json.loads(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        items = [_coerce(v, args[0], key) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def config_from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict such as a saved ``config.json``; strict on keys."""
    hints = _hints(cls)
    if cls is ModelConfig and "kernel_antialias" in values:  # saved before kernel_resize replaced it
        values = dict(values)
        antialias = values.pop("kernel_antialias")
        if antialias is not None:
            values.setdefault("kernel_resize", "bilinear_aa" if antialias else "bilinear")
    if cls is FinetuneConfig and "consistency" not in values:  # saved before the term existed: it did not act
        values = {**values, "consistency": 0.0}
    if cls is Config and isinstance(values.get("finetune"), dict) and "fixed_at" not in values["finetune"]:
        # Saved before finetune.fixed_at: a consistency term, if on, anchored at the default patch (fixed_size's P).
        f = values["finetune"]
        anchor = (values.get("patch") or {}).get("default") if f.get("consistency") else None
        values = {**values, "finetune": {**f, "fixed_at": anchor}}
    for key in values:
        if key not in hints:
            raise _unknown_key(prefix + key, [prefix + k for k in hints])
    own = set(typing.get_type_hints(cls)) - {"options", "_section"}
    obj = cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in values.items() if k in own})
    for key, value in values.items():  # the options' keys; a model option's unset field is saved as null
        if key not in own and not (value is None and cls is ModelConfig):
            setattr(obj, key, _coerce(value, hints[key], prefix + key))
    return obj


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{name}."))
    return keys


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``a.b=value`` strings in order; values are parsed to the field's type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        target: Any = config
        for depth, part in enumerate(parts):
            hints = _hints(type(target))
            if part not in hints:
                raise _unknown_key(path.strip(), _all_keys(Config))
            if depth == len(parts) - 1:
                setattr(target, part, _coerce(raw.strip(), hints[part], path.strip()))
            else:
                target = getattr(target, part)
                if not dataclasses.is_dataclass(target):
                    raise _unknown_key(path.strip(), _all_keys(Config))
    return config


# ---- recipes ---------------------------------------------------------------------------------------
def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.name.startswith("_"))


def _import_recipe(name: str) -> types.ModuleType:
    path = Path(name)
    # A built-in recipe's bare name is the built-in recipe, whatever the working folder holds by that name.
    builtin = path.suffix != ".py" and path.name == name and name in list_recipes()
    if not builtin and (path.suffix == ".py" or path.exists()):
        if path.is_dir():
            raise ConfigError(f"recipe {path} is a folder, not a recipe file (a .py file with get_config(arg))")
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        # An explicit loader: spec_from_file_location finds none for a file without the .py extension.
        loader = importlib.machinery.SourceFileLoader(f"flexivit_recipe_{path.stem}", str(path))
        spec = importlib.util.spec_from_loader(loader.name, loader)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if name not in list_recipes():
        close = difflib.get_close_matches(name, list_recipes(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r} (available: {', '.join(list_recipes())}){hint}")
    return _import_recipe(str(RECIPES_DIR / f"{name}.py"))


def load_recipe(spec: str, overrides: list[str] | None = None) -> Config:
    """``NAME[:ARG]`` or ``path/to/recipe.py[:ARG]`` → resolved ``Config``."""
    name, _, arg = spec.partition(":")
    module = _import_recipe(name)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"recipe {name!r} has no get_config(arg) function")
    config = module.get_config(arg or None)
    if not isinstance(config, Config):
        raise ConfigError(f"recipe {name!r}: get_config must return flexivit.train.config.Config, got {type(config).__name__}")
    return check_config(apply_overrides(config, overrides or []))


def recipe_search_grid(spec: str) -> list[str]:
    """The default grid of ``flexivit search`` for recipe ``NAME[:ARG]``: its module-level ``SEARCH_GRID``, a
    list of ``KEY=V1,V2,...`` strings (empty if it has none)."""
    name = spec.partition(":")[0]
    grid = getattr(_import_recipe(name), "SEARCH_GRID", [])
    if not isinstance(grid, (list, tuple)) or not all(isinstance(item, str) for item in grid):
        raise ConfigError(f"recipe {name!r}: SEARCH_GRID must be a list of 'KEY=V1,V2,...' strings, got {grid!r}")
    return list(grid)
