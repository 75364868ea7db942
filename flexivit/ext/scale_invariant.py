"""Scale-invariant layers, fixed-norm updates and the equivalent learning rate (docs/scale_invariant.md).

A scale-invariant layer computes ``S * W x / ||W|| + b`` with ``S`` a constant buffer: multiplying ``W``
by any ``c > 0`` leaves its output unchanged, so only the direction of ``W`` matters and its gradient is
orthogonal to it. ``S`` defaults to ``||W||`` at the moment the layer is made scale-invariant, so
converting a trained layer keeps its function; the head's ``S`` may instead be set (a logit scale). The
norm is the whole matrix's (``matrix``) or each output row's (``row``: ``S`` is then one value per row).
The patch embedding's base kernel enters PI-resize as ``S * W / ||W||``: one norm, taken at the base
size, for every patch size.

Training: ``FixedNormHook`` scales every scale-invariant weight back to its initial norm ``N0`` after each
optimizer step (``optim.fixed_norm``), with weight decay off on those tensors, and ``optim.elr`` (the
equivalent learning rate) sets each such tensor's learning rate so that its angle moves by about the same
amount per step whatever its norm and size (``elr_scales``; the formulas are in the docs page).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from flexivit.model.config import FlexiViTConfig
from flexivit.model.options import ModelOption, register
from flexivit.model.patch_embed import FlexiPatchEmbed

Config = Any  # the run config (flexivit.train.config.Config), read by attribute: this layer sits below train/

__all__ = [
    "ScaleInvariantLinear", "ScaleInvariantPatchEmbed", "unit_norms", "convert_layers", "scale_invariant_layers",
    "fold_state_dict", "FixedNormHook", "elr_scales", "fixed_norm_names", "option_hooks", "ELR_RULES", "SI_BUFFER",
    "SI_SCOPES", "SI_NORMS", "ScaleInvariantFields", "make_scale_invariant",
]

SI_SCOPES = ("none", "head", "linears", "all")
SI_NORMS = ("matrix", "row")

SI_BUFFER = "si_scale"
# How each timm optimizer's step scales with the gradient, which decides the equivalent-learning-rate rule.
# "sgd": the step is lr times the gradient; "adam": every element moves by about lr (normalised steps).
ELR_RULES = {
    **dict.fromkeys(("sgd", "momentum", "nesterov", "sgdw", "nesterovw", "fusedsgd"), "sgd"),
    **dict.fromkeys(("adam", "adamw", "nadam", "nadamw", "radam", "radamw", "adamax", "lion", "fusedadam",
                     "fusedadamw"), "adam"),
}


def _units(weight: torch.Tensor, norm: str) -> torch.Tensor:
    """``weight`` as the vectors that are normalised: ``(1, numel)`` or ``(rows, numel / rows)``."""
    return weight.reshape(1, -1) if norm == "matrix" else weight.flatten(1)


def unit_norms(weight: torch.Tensor, norm: str) -> torch.Tensor:
    """``||W||``: a scalar (``matrix``) or one norm per output row, shaped ``(rows, 1, ...)`` to broadcast."""
    if norm == "matrix":
        return torch.linalg.vector_norm(weight)
    return torch.linalg.vector_norm(weight.flatten(1), dim=1).reshape(-1, *[1] * (weight.ndim - 1))


def _normalised(weight: torch.Tensor, scale: torch.Tensor, norm: str) -> torch.Tensor:
    """``S * W / ||W||``: what the layer computes with, and what folding writes as a plain weight."""
    return weight * (scale / unit_norms(weight, norm))


def _check_norm(norm: str) -> str:
    if norm not in SI_NORMS:
        raise ValueError(f"unknown si_norm {norm!r}; choose one of {', '.join(SI_NORMS)}")
    return norm


def _nonzero(name: str, weight: torch.Tensor, norm: str, when: str) -> torch.Tensor:
    """``unit_norms(weight)``, or an error naming the tensor if a norm is zero (its direction is undefined)."""
    norms = unit_norms(weight.detach(), norm)
    zero = (norms.flatten() == 0).nonzero().flatten().tolist()
    if zero:
        where = f" (rows {zero[:5]}{'...' if len(zero) > 5 else ''})" if norm == "row" else ""
        raise ValueError(
            f"the scale-invariant weight {name} has zero norm{where} {when}: a scale-invariant layer uses only "
            "its direction, which is then undefined. Initialise it with nonzero values (a zero-initialised "
            "layer cannot be made scale-invariant) or leave it out of model.scale_invariant"
        )
    return norms


def _scale_of(norms: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The ``si_scale`` buffer: the norms themselves (the function kept), or ``scale`` in their shape."""
    return norms.detach().clone() if scale is None else torch.full_like(norms, float(scale))


def _initial_scale(name: str, weight: torch.Tensor, norm: str, scale: float | None) -> torch.Tensor:
    return _scale_of(_nonzero(name, weight, norm, "when made scale-invariant"), scale)


def _equalise_rows(weight: torch.Tensor) -> None:
    """Give every row the same norm (the RMS of the row norms) in place. A row-normalised layer does not
    change, and one learning rate per tensor then turns every row by the same angle."""
    with torch.no_grad():
        norms = unit_norms(weight, "row")  # (rows, 1, ...)
        weight.mul_(norms.square().mean().sqrt() / norms)


class ScaleInvariantLinear(nn.Linear):
    """A drop-in for ``nn.Linear`` computing ``S * W x / ||W|| + b`` (``S`` the buffer ``si_scale``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 norm: str = "matrix", scale: float | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.norm = _check_norm(norm)
        self.register_buffer(SI_BUFFER, _scale_of(unit_norms(self.weight, norm), scale))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, norm: str = "matrix", scale: float | None = None,
                    name: str = "weight") -> "ScaleInvariantLinear":
        """The scale-invariant form of ``linear``, sharing its parameters: with ``scale=None`` it computes
        what ``linear`` did (row mode first gives every row the same norm, which changes nothing)."""
        with torch.device("meta"):  # no memory and no random draws for weights that are replaced below
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, norm=norm)
        return _adopt(layer, linear, name=name, norm=norm, scale=scale)

    def effective_weight(self) -> torch.Tensor:
        return _normalised(self.weight, getattr(self, SI_BUFFER), self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm={self.norm}"


def _adopt(layer: nn.Module, source: nn.Module, *, name: str, norm: str, scale: float | None) -> nn.Module:
    """Give a scale-invariant ``layer`` (built on the meta device) ``source``'s parameters and the scale
    that keeps its function; row mode first gives every row the same norm."""
    layer.weight, layer.bias = source.weight, source.bias
    setattr(layer, SI_BUFFER, _initial_scale(name, source.weight, norm, scale))
    if norm == "row":
        _equalise_rows(layer.weight)
    return layer


class ScaleInvariantPatchEmbed(FlexiPatchEmbed):
    """``FlexiPatchEmbed`` whose base kernel enters PI-resize as ``S * W / ||W||``: tokens are scale-invariant
    in ``W`` at every patch size, with one norm for all sizes."""

    def __init__(self, *, norm: str = "matrix", **kwargs) -> None:
        super().__init__(**kwargs)
        self.norm = _check_norm(norm)
        self.register_buffer(SI_BUFFER, _scale_of(unit_norms(self.weight, norm), None))

    @classmethod
    def from_patch_embed(cls, embed: FlexiPatchEmbed, *, norm: str = "matrix",
                         name: str = "patch_embed.weight") -> "ScaleInvariantPatchEmbed":
        """The scale-invariant form of ``embed``, sharing its parameters and computing the same tokens."""
        with torch.device("meta"):
            layer = cls(base_patch_size=embed.base_patch_size, in_chans=embed.in_chans, embed_dim=embed.embed_dim,
                        bias=embed.bias is not None, resize=embed.resize, pad=embed.pad, norm=norm)
        return _adopt(layer, embed, name=name, norm=norm, scale=None)

    def base_kernel(self) -> torch.Tensor:
        return _normalised(self.weight, getattr(self, SI_BUFFER), self.norm)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm={self.norm}"


ScaleInvariant = (ScaleInvariantLinear, ScaleInvariantPatchEmbed)


def convert_layers(model: nn.Module, *, scope: str, norm: str = "matrix", head_scale: float | None = None) -> list[str]:
    """Make ``model``'s layers in ``scope`` scale-invariant in place, sharing their parameters; returns
    their weights' names. ``head``: the module named ``head``; ``linears``: every ``nn.Linear``; ``all``:
    those and the ``FlexiPatchEmbed``. ``S`` is each layer's norm now (its function kept), the head's
    ``head_scale`` when given."""
    if scope not in SI_SCOPES[1:]:
        raise ValueError(f"unknown scale_invariant scope {scope!r}; choose one of {', '.join(SI_SCOPES[1:])}")
    _check_norm(norm)
    converted = []
    for name, module in list(model.named_modules()):
        weight = f"{name}.weight"
        if isinstance(module, ScaleInvariant):
            raise ValueError(f"{name} is scale-invariant already; fold the model first (fold_state_dict)")
        if isinstance(module, nn.Linear) and (scope != "head" or name == "head"):
            new: nn.Module = ScaleInvariantLinear.from_linear(
                module, norm=norm, scale=head_scale if name == "head" else None, name=weight)
        elif isinstance(module, FlexiPatchEmbed) and scope == "all":
            new = ScaleInvariantPatchEmbed.from_patch_embed(module, norm=norm, name=weight)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        converted.append(weight)
    return converted


def scale_invariant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every scale-invariant layer of ``model`` by its weight's name (``blocks.0.mlp.fc1.weight``)."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, ScaleInvariant)}


@torch.no_grad()
def fold_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``state`` (default ``model.state_dict()``) with each scale-invariant weight replaced by the plain
    weight ``S * W / ||W||`` it computes with and the ``si_scale`` buffers left out: the state of the same
    function, plain layers."""
    state = model.state_dict() if state is None else dict(state)
    for name, layer in scale_invariant_layers(model).items():
        prefix = name[: -len("weight")]
        state[name] = _normalised(layer.weight, getattr(layer, SI_BUFFER), layer.norm).detach()
        del state[prefix + SI_BUFFER]
    return state


class FixedNormHook:
    """Post-step hook (``flexivit.train.hooks``): after every optimizer step each scale-invariant weight is scaled
    back to its norm at the start, ``N0`` (per row in row mode). Its state is ``N0`` per tensor, saved in
    every checkpoint. ``metrics()`` gives the mean ``||W|| / N0`` after the projection (1) and the mean
    angle each tensor turned per step (radians) since its last call."""

    name = "fixed_norm"

    def __init__(self, *, layers: dict[str, nn.Module]) -> None:
        self.weights = {name: layer.weight for name, layer in layers.items()}
        self.modes = {name: layer.norm for name, layer in layers.items()}
        self.n0 = {name: _nonzero(name, w, self.modes[name], "at the start of fixed-norm training").clone()
                   for name, w in self.weights.items()}
        self._snapshot()

    def _snapshot(self) -> None:
        """The weights as they are now: where the next step's rotation is measured from (not saved)."""
        self._prev = {name: w.detach().clone() for name, w in self.weights.items()}
        device = next(iter(self.weights.values())).device
        self._sums = torch.zeros(2, dtype=torch.float64, device=device)  # (norm ratio, rotation) summed
        self._steps = 0

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Project every weight (the parameters this hook was built on, which are ``model``'s) onto ``N0``."""
        ratio, angle = 0.0, 0.0
        for name, w in self.weights.items():
            mode = self.modes[name]
            w.mul_(self.n0[name] / unit_norms(w, mode))
            ratio = ratio + (unit_norms(w, mode) / self.n0[name]).double().mean()
            a, b = F.normalize(_units(self._prev[name], mode), dim=1), F.normalize(_units(w, mode), dim=1)
            # The angle between unit vectors, accurate for tiny angles (acos of a cosine near 1 is not).
            turn = 2 * torch.atan2(torch.linalg.vector_norm(a - b, dim=1), torch.linalg.vector_norm(a + b, dim=1))
            angle = angle + turn.double().mean()
            self._prev[name].copy_(w)
        self._sums += torch.stack([ratio, angle]) / len(self.weights)
        self._steps += 1

    def metrics(self) -> dict[str, float]:
        """``si_norm_ratio`` and ``si_rotation`` (radians per step), averaged over the steps since the last
        call; empty if there were none. One device sync."""
        if not self._steps:
            return {}
        ratio, rotation = (self._sums / self._steps).tolist()
        self._sums.zero_()
        self._steps = 0
        return {"si_norm_ratio": ratio, "si_rotation": rotation}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"n0.{name}": n for name, n in self.n0.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = {k.removeprefix("n0."): v for k, v in state.items()}
        if saved.keys() != self.n0.keys():
            raise ValueError(f"the checkpoint's fixed-norm state covers {sorted(saved)}, but this model's "
                             f"scale-invariant weights are {sorted(self.n0)}; resume with the options that made it")
        self.n0 = {name: saved[name].to(device=w.device, dtype=w.dtype) for name, w in self.weights.items()}
        self._snapshot()  # the weights were restored before the hooks: rotation counts from them


def _check(cfg: Config, model: nn.Module) -> dict[str, nn.Module]:
    """The model's scale-invariant layers, after checking that the optimizer options fit them."""
    o, layers = cfg.optim, scale_invariant_layers(model)
    if o.fixed_norm and not layers:
        raise ValueError("optim.fixed_norm=true keeps the norm of scale-invariant weights fixed, but the model has "
                         f"none: set model.scale_invariant to one of {', '.join(SI_SCOPES[1:])}")
    if o.elr is not None:
        if not o.fixed_norm:
            raise ValueError("optim.elr (the equivalent learning rate) is defined for fixed-norm training: set "
                             "optim.fixed_norm=true as well, or leave optim.elr unset and use optim.lr")
        if not o.elr > 0 or not math.isfinite(o.elr):
            raise ValueError(f"optim.elr must be a positive number, got {o.elr}")
        if not o.lr > 0:
            raise ValueError(f"optim.lr must be positive (the other parameters' rate), got {o.lr}")
        if _rule(o.opt) is None:
            raise ValueError(f"optim.elr has no rule for optimizer {o.opt!r}; use one of {', '.join(sorted(ELR_RULES))}")
    for name, layer in layers.items():
        _nonzero(name, layer.weight, layer.norm, "at the start of training")
    return layers


def _rule(opt: str) -> str | None:
    return ELR_RULES.get(opt.lower().split("_")[-1])  # timm's "lookahead_adamw" steps as adamw


def elr_scales(cfg: Config, model: nn.Module) -> dict[str, float]:
    """Learning-rate multipliers (relative to ``optim.lr``) that give each scale-invariant weight the rate
    ``optim.elr`` asks for, from its norm now (``N0``): ``elr * N0 / sqrt(numel)`` for Adam-type optimizers,
    ``elr * N0**2`` (``N0`` per row in row mode, their mean square) for SGD-type ones. Empty without ``elr``."""
    layers, o = _check(cfg, model), cfg.optim
    if o.elr is None:
        return {}
    scales = {}
    for name, layer in layers.items():
        w = layer.weight.detach().double()
        if _rule(o.opt) == "adam":
            lr = o.elr * float(torch.linalg.vector_norm(w)) / math.sqrt(w.numel())
        else:
            lr = o.elr * float(unit_norms(w, layer.norm).square().mean())
        scales[name] = lr / o.lr
    return scales


def fixed_norm_names(cfg: Config, model: nn.Module) -> set[str]:
    """The weights that get no weight decay: the fixed-norm ones (the projection would undo it)."""
    layers = _check(cfg, model)
    return set(layers) if cfg.optim.fixed_norm else set()


def option_hooks(cfg: Config, model: nn.Module, *, sharded: bool = False,
                 say: Callable[[str], None] = print) -> list[FixedNormHook]:
    """The post-step hooks the config's options need (the fixed-norm projection), for the unwrapped
    ``model`` as training starts; says once that weight decay is off on fixed-norm weights."""
    layers = _check(cfg, model)
    if not cfg.optim.fixed_norm:
        return []
    if sharded:
        raise ValueError("optim.fixed_norm projects whole tensors after each step and does not run under FSDP, "
                         "whose ranks hold shards; train with DDP (the default) or set optim.fixed_norm=false")
    if cfg.optim.weight_decay:
        say(f"optim.fixed_norm: weight decay is off on the {len(layers)} fixed-norm weights (projecting them back "
            f"to their norm would undo it); optim.weight_decay={cfg.optim.weight_decay:g} applies to the others")
    return [FixedNormHook(layers=layers)]


def make_scale_invariant(model: nn.Module, scope: str, *, norm: str = "matrix",
                         head_scale: float | None = None) -> nn.Module:
    """Reparametrise a plain FlexiViT in place: the layers in ``scope`` (``head``, ``linears`` or ``all``)
    compute ``S * W / ||W||`` with ``S`` their norm now, so the model computes what it did, but for the head
    when ``head_scale`` sets its ``S``. Returns the model."""
    if model.config.option("scale_invariant") is not None:
        raise ValueError(f"the model is scale-invariant already ({model.config.scale_invariant}); build a plain one "
                         "from fold_state_dict(model) first")
    config = FlexiViTConfig.from_dict({**model.config.to_dict(), "scale_invariant": scope, "si_norm": norm,
                                       "si_head_scale": head_scale})
    convert_layers(model, scope=scope, norm=norm, head_scale=head_scale)
    model.config = config
    return model


@dataclass(frozen=True)
class ScaleInvariantFields:
    # "head", every Linear ("linears"), or every Linear and the base patch kernel ("all") compute S*W/||W||
    # with a constant S; "none" is the plain ViT.
    scale_invariant: str = "none"
    si_norm: str = "matrix"  # ||W|| over the whole matrix or per output row ("row")
    si_head_scale: float | None = None  # the head's S (a logit scale); None: ||W|| when made scale-invariant


@dataclass(frozen=True)
class FixedNormRunFields:
    # Fixed-norm training of scale-invariant weights (optim.fixed_norm): after each step they are scaled back to
    # their norm at the start, without weight decay; optim.elr (the equivalent learning rate) then sets their
    # rate from their norm and size, and the other parameters keep optim.lr.
    fixed_norm: bool = False
    elr: float | None = None


@register
class ScaleInvariantOption(ModelOption):
    """Scale-invariant layers (``model.scale_invariant``) and, in training, fixed-norm updates and the
    equivalent learning rate (``optim.fixed_norm``, ``optim.elr``)."""

    name = "scale_invariant"
    fields = ScaleInvariantFields
    order = 10
    run_fields = {"optim": FixedNormRunFields}
    from_recipe = True  # a fine-tune reparametrises the checkpoint as the recipe asks ...
    folds = True  # ... after loading its plain (folded) weights, so every pretrained layer keeps its function

    def check(self, values: ScaleInvariantFields, config: FlexiViTConfig) -> None:
        if values.scale_invariant not in SI_SCOPES:
            raise ValueError(f"unknown scale_invariant scope {values.scale_invariant!r}; choose one of "
                             f"{', '.join(SI_SCOPES)}")
        if values.si_norm not in SI_NORMS:
            raise ValueError(f"unknown si_norm {values.si_norm!r}; choose one of {', '.join(SI_NORMS)}")
        if values.scale_invariant == "none":
            raise ValueError("si_norm and si_head_scale apply to scale-invariant layers only; set scale_invariant "
                             f"to one of {', '.join(SI_SCOPES[1:])} as well, or leave them unset")
        if values.si_head_scale is not None and not values.si_head_scale > 0:
            raise ValueError(f"si_head_scale must be positive (a logit scale), got {values.si_head_scale}")

    def finish(self, values: ScaleInvariantFields, model: nn.Module) -> None:
        convert_layers(model, scope=values.scale_invariant, norm=values.si_norm, head_scale=values.si_head_scale)

    def head_replaced(self, values: ScaleInvariantFields, model: nn.Module, old: nn.Module) -> None:
        if isinstance(model.head, nn.Linear):
            convert_layers(model, scope="head", norm=values.si_norm, head_scale=values.si_head_scale)

    def fold(self, values: ScaleInvariantFields, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return fold_state_dict(model, state)

    def lr_scales(self, run: Config, model: nn.Module) -> dict[str, float]:
        return elr_scales(run, model)

    def no_weight_decay(self, run: Config, model: nn.Module) -> set[str]:
        return fixed_norm_names(run, model)

    def post_step_hooks(self, run: Config, model: nn.Module, *, sharded: bool, say: Callable[[str], None]) -> list[Any]:
        return option_hooks(run, model, sharded=sharded, say=say)

    def prepare_finetune(self, values: ScaleInvariantFields, model: nn.Module, support: Any, *, seed: int) -> None:
        make_scale_invariant(model, values.scale_invariant, norm=values.si_norm, head_scale=values.si_head_scale)
