"""``FlexiViTConfig``: everything that defines a FlexiViT's architecture, stored next to its weights.

The core fields are this dataclass's own; an option (``flexivit.ext``, registered in
``flexivit.model.options``) adds its fields as a sub-config, given and stored flat like the core ones
(``FlexiViTConfig(depth=4, <option field>=...)``, ``to_dict()`` / ``from_dict()``), and read as
``config.option(<option name>)`` (its values, None when off) or, for convenience, ``config.<field>``. A plain model's config, and
every file that stores it, holds the core fields only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flexivit.model import options as registry
from flexivit.model.patch_embed import PatchScheme, check_patch_sizes
from flexivit.model.resize import check_method

__all__ = ["FlexiViTConfig", "GLOBAL_POOLS", "CORE_FIELDS"]

GLOBAL_POOLS = ("token", "avg")
ACT_LAYERS = ("gelu", "gelu_tanh")


@dataclass(frozen=True, init=False)
class FlexiViTConfig:
    """Everything that defines a FlexiViT's architecture; stored next to its weights."""

    img_size: int = 224
    patch_size: int = 16  # the default for forward(); any size that tiles the image works
    stride: int | None = None  # default stride (None = patch_size, non-overlapping)
    base_patch_size: int = 32  # stored kernel size
    base_grid: int = 7  # stored position-embedding grid (base_grid x base_grid)
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    act_layer: str = "gelu"  # the MLP's GELU: "gelu" (exact, as timm) or "gelu_tanh" (flax's, in big_vision weights)
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # layer scale
    class_token: bool = True
    global_pool: str = "token"  # "token" (class token) or "avg" (mean of patch tokens)
    fc_norm: bool | None = None  # None: as timm, norm after pooling iff global_pool == "avg"
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP-style; disables the patch bias)
    final_norm: bool = True
    posemb: str = "learn"  # "learn" (one H x W grid) or "factorized" (one row + one column)
    posemb_antialias: bool = False
    # The image resize the kernel's PI-resize is matched to: "bilinear" (the official weights),
    # "bilinear_aa" (antialiased bilinear, a tent filter when downsampling) or "area" (box filter).
    kernel_resize: str = "bilinear"
    pad: bool = False  # pad images whose size the patch does not tile (instead of an error)
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # The options that are on, as (name, field values) sorted by name; given flat (see the module doc).
    options: tuple[tuple[str, Any], ...] = ()

    def __init__(self, **values: Any) -> None:
        given = dict(values.pop("options", ()))
        flat = {k: values.pop(k) for k in list(values) if k not in CORE_FIELDS}
        for f in dataclasses.fields(self):
            if f.name != "options":
                object.__setattr__(self, f.name, values.pop(f.name) if f.name in values else f.default)
        by_option: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            owner = registry.option_for_key(key)
            if owner is None:
                known = sorted(CORE_FIELDS | set(registry.field_names()))
                raise ValueError(f"unknown FlexiViT config keys {sorted(k for k in flat if registry.option_for_key(k) is None)}; "
                                 f"valid keys: {known}")
            by_option.setdefault(owner.name, {})[key] = value
        merged = {name: dataclasses.replace(given[name], **by_option.pop(name, {})) if name in given
                  else registry.option_named(name).fields(**by_option.pop(name)) for name in {*given, *by_option}}
        object.__setattr__(self, "options", ())
        self._check_core()
        on = []
        for option in sorted((registry.option_named(n) for n in merged), key=lambda o: (o.order, o.name)):
            values_ = option.normalize(merged[option.name], self)
            if values_ != option.fields():
                on.append((option.name, values_))
        object.__setattr__(self, "options", tuple(sorted(on, key=lambda item: item[0])))
        for option, values_ in self.active():
            option.check(values_, self)

    def _check_core(self) -> None:
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without it")
        if self.posemb not in ("learn", "factorized"):
            raise ValueError(f"posemb must be 'learn' or 'factorized', got {self.posemb!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        check_method(self.kernel_resize)
        if self.act_layer not in ACT_LAYERS:
            raise ValueError(f"act_layer must be one of {', '.join(ACT_LAYERS)}, got {self.act_layer!r}")
        check_patch_sizes([PatchScheme(self.patch_size, self.stride)], self.img_size)

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def option(self, name: str) -> Any | None:
        """The field values of the option ``name`` when it is on, else None."""
        return dict(self.options).get(name)

    def active(self) -> list[tuple[registry.ModelOption, Any]]:
        """The options that are on, with their values, in hook order."""
        pairs = [(registry.option_named(name), values) for name, values in self.options]
        return sorted(pairs, key=lambda pair: (pair[0].order, pair[0].name))

    def __getattr__(self, key: str) -> Any:
        """An option's field read like a core one (its default when the option is off)."""
        if key.startswith("_") or key == "options":
            raise AttributeError(key)
        owner = registry.option_for_key(key)
        if owner is None:
            raise AttributeError(f"FlexiViTConfig has no field {key!r}")
        return getattr(self.option(owner.name) or owner.fields(), key)

    def to_dict(self) -> dict[str, Any]:
        """The core fields, then each option's fields while it is on (so a plain model's config, and every
        file that stores it, is what it was before the options existed)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        if self.act_layer == "gelu":  # the default, left out so files written before the field stay the same
            del values["act_layer"]
        for option, option_values in self.active():
            values.update(option.stored(option_values))
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlexiViTConfig":
        """From ``to_dict``'s output, also as saved by older versions (``kernel_antialias`` is read as
        ``kernel_resize``: true → ``bilinear_aa``, false → ``bilinear``)."""
        values = dict(values)
        if "kernel_antialias" in values:
            antialias = values.pop("kernel_antialias")
            values.setdefault("kernel_resize", "bilinear_aa" if antialias else "bilinear")
        return cls(**values)


CORE_FIELDS = frozenset(f.name for f in dataclasses.fields(FlexiViTConfig)) - {"options"}
