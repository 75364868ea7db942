"""LUT-Q weight tying (docs/compress.md): each linear weight is an index matrix into K shared values.

A ``LutqLinear`` computes with the tied weight ``values[indices]``: ``values`` is a dictionary of K numbers
(a buffer ``(K,)``), ``indices`` a ``(out, in)`` uint8 buffer (so K <= 256). Its **training form** also keeps
a float shadow ``weight`` (the parameter the optimizer updates, under the name a plain ``nn.Linear`` gives
it, so parameter groups, weight decay and timm's ``group_matcher`` see it as before); the forward pass
uses the tied weight, and the gradient reaches the shadow straight through. After every optimizer step
``LutqHook`` runs exactly one clustering iteration (``cluster_step``) per layer: each shadow weight is
assigned to its nearest value, then each value becomes the mean of its assigned shadows. The **frozen
form** (``freeze``) drops the shadow: values, indices and bias only. Model files store the indices packed
to 1, 2, 4 or 8 bits (``pack_state``); ``fold_lutq`` gives the plain dense weights for export.

With ``pow2`` the dictionary is multiplier-less: every value is 0 or ``±2^e``; the mean step then moves a
value to the power of two nearest its cluster's mean in value (not in log space), which is the power of
two with the least squared error for that cluster, so one iteration still never increases
``||W - tied||^2`` (a value is 0 only when its cluster's mean is exactly 0, or underflows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from flexivit.model.config import FlexiViTConfig
from flexivit.model.options import ModelOption, is_loading_weights, register

__all__ = [
    "LutqLinear", "LutqHook", "LUTQ_SCOPES", "MAX_K", "PACK_BITS", "PACKED_KEY", "check_k", "index_bits",
    "apply_lutq", "lutq_layers", "cluster_step", "tying_error", "nearest_pow2", "pack_indices", "unpack_indices",
    "pack_state", "unpack_state", "freeze", "fold_lutq", "lutq_hooks", "make_lutq", "LutqFields",
]

LUTQ_SCOPES = ("blocks", "blocks+head")
MAX_K = 256  # indices are uint8
PACK_BITS = (1, 2, 4, 8)  # index widths that tile a byte
PACKED_KEY = "packed_indices"  # the state-dict key of a layer's packed indices in a model file
KMEANS_ITERS = 100  # cap on the fitting iterations; 1-D k-means on a layer's weights converges well before


def check_k(k: int) -> int:
    """``k`` itself if it is a usable dictionary size, else a ``ValueError`` that says what to use."""
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_K:
        raise ValueError(f"LUT-Q needs 2 <= K <= {MAX_K} values per tensor (indices are stored as uint8), got {k!r}")
    return k


def _check_size(k: int, numel: int, name: str) -> None:
    if k >= numel:
        raise ValueError(f"K={k} LUT-Q values for {name}, which has only {numel} elements: tying would not share "
                         f"anything; choose K below {numel} or leave this tensor out of the scope")


def index_bits(k: int) -> int:
    """Bits per stored index: ``ceil(log2 K)`` rounded up to 1, 2, 4 or 8."""
    need = (check_k(k) - 1).bit_length()
    return next(b for b in PACK_BITS if b >= need)


def nearest_pow2(x: torch.Tensor) -> torch.Tensor:
    """Each element replaced by the signed power of two nearest to it in value (0 stays 0; ties go down)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, 0.5 <= |mantissa| < 1
    up = (mantissa.abs() > 0.75).to(exponent.dtype)  # above the midpoint 1.5 * 2^(exponent-1) of the two
    return torch.sign(x) * torch.ldexp(torch.ones_like(x), exponent - 1 + up)


class LutqLinear(nn.Module):
    """A linear layer whose weight is ``values[indices]`` (K shared values). ``frozen=False`` (training
    form) keeps a float shadow ``weight``, initialised as ``nn.Linear``'s and clustered by k-means;
    ``frozen=True`` builds the empty inference form that a saved state fills (see ``from_linear`` to
    convert a trained layer)."""

    def __init__(self, *, in_features: int, out_features: int, bias: bool = True, k: int, pow2: bool = False,
                 frozen: bool = False) -> None:
        super().__init__()
        _check_size(check_k(k), in_features * out_features, "weight")
        self.in_features, self.out_features, self.k, self.pow2 = in_features, out_features, k, pow2
        shape = (out_features, in_features)
        self.weight = None if frozen else nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("values", torch.zeros(k))
        self.register_buffer("indices", torch.zeros(shape, dtype=torch.uint8))
        if self.weight is not None and not self.weight.is_meta:
            plain = nn.Linear(in_features, out_features, bias)  # nn.Linear's own initialisation
            with torch.no_grad():
                self.weight.copy_(plain.weight)
                if bias:
                    self.bias.copy_(plain.bias)
            fit_dictionary(self)

    @property
    def frozen(self) -> bool:
        return self.weight is None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, k: int, pow2: bool = False, name: str = "weight") -> "LutqLinear":
        """The training form of ``linear``, sharing its parameters (its weight becomes the shadow), with a
        dictionary fitted by k-means on its weights: on its own, this is post-hoc clustering."""
        _check_size(check_k(k), linear.weight.numel(), name)
        with torch.device("meta"):  # no memory and no random draws for tensors replaced below
            layer = cls(in_features=linear.in_features, out_features=linear.out_features,
                        bias=linear.bias is not None, k=k, pow2=pow2)
        w = linear.weight
        layer.weight, layer.bias = w, linear.bias
        layer.values = torch.zeros(k, device=w.device, dtype=w.dtype)
        layer.indices = torch.zeros(w.shape, device=w.device, dtype=torch.uint8)
        fit_dictionary(layer)
        return layer

    def tied_weight(self) -> torch.Tensor:
        return self.values[self.indices.int()]  # (out, in); uint8 would index as a mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.tied_weight()
        if self.weight is not None:
            # Straight-through: the value is exactly the tied weight (shadow - shadow is exactly 0, which
            # shadow + (tied - shadow).detach() would not give in floating point, so the frozen form could
            # not reproduce the logits bit for bit), and the gradient of w reaches the shadow unchanged.
            w = w + (self.weight - self.weight.detach())
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        form = "frozen" if self.frozen else "training"
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, pow2={self.pow2}, {form}"


def _assign(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The index of the value nearest to each element of ``w``, flattened (ties go to the smaller value).
    Midpoints are compared in float64, where those of float32 values are exact."""
    order = torch.argsort(values, stable=True)
    ordered = values[order].double()
    mids = (ordered[1:] + ordered[:-1]) / 2  # (K - 1,)
    return order[torch.bucketize(w.flatten().double(), mids)]


def _means(w: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, pow2: bool) -> torch.Tensor:
    """Each value replaced by the mean of its assigned elements (its nearest power of two with ``pow2``);
    a value no element is assigned to keeps its value."""
    counts = torch.bincount(idx, minlength=values.numel())
    sums = torch.zeros(values.numel(), dtype=torch.float64, device=w.device).index_add_(0, idx, w.flatten().double())
    means = sums / counts.clamp(min=1)
    if pow2:
        means = nearest_pow2(means)
    return torch.where(counts > 0, means.to(values.dtype), values)


@torch.no_grad()
def cluster_step(layer: LutqLinear) -> None:
    """Exactly one clustering iteration on a training-form layer: assign every shadow weight to its nearest
    value, then move each value to the mean of its shadows (empty clusters keep their value). Neither
    half can increase ``||W - values[indices]||^2``: the old assignment is one of those the first considers,
    and the mean (or, with ``pow2``, the best power of two; the old value was one) minimises a cluster's
    squared error, also after rounding to the value dtype, in which the old value is representable."""
    if layer.weight is None:
        raise ValueError("cluster_step needs the training form (a shadow weight); this LUT-Q layer is frozen")
    w = layer.weight.detach()
    idx = _assign(w, layer.values)
    layer.indices.copy_(idx.view(layer.indices.shape))
    layer.values.copy_(_means(w, idx, layer.values, layer.pow2))


@torch.no_grad()
def fit_dictionary(layer: LutqLinear, iters: int = KMEANS_ITERS) -> None:
    """k-means of the shadow weights into K values: quantile-spaced start (deterministic), then
    ``cluster_step`` until the assignment stops changing or ``iters`` iterations. With ``pow2`` duplicates
    can arise (two quantiles rounding to one power of two); they are kept: both share a value, the nearest-
    value assignment splits the weights at that value between them, and later steps may pull them apart."""
    flat = layer.weight.detach().flatten().double().sort().values
    n, k = flat.numel(), layer.k
    start = flat[((torch.arange(k, dtype=torch.float64, device=flat.device) + 0.5) * n / k).long()]
    layer.values.copy_((nearest_pow2(start) if layer.pow2 else start).to(layer.values.dtype))
    previous = None
    for _ in range(iters):
        cluster_step(layer)
        if previous is not None and torch.equal(previous, layer.indices):
            break
        previous = layer.indices.clone()


def tying_error(layer: LutqLinear) -> torch.Tensor:
    """``||W - values[indices]|| / ||W||`` of a training-form layer (float64, on its device)."""
    w = layer.weight.detach().double()
    return torch.linalg.vector_norm(w - layer.tied_weight().double()) / torch.linalg.vector_norm(w).clamp(min=1e-300)


def lutq_layers(model: nn.Module) -> dict[str, LutqLinear]:
    """Every LUT-Q layer of ``model`` by its module name (``blocks.0.mlp.fc1``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LutqLinear)}


def apply_lutq(model: nn.Module, *, k: int, scope: str = "blocks", pow2: bool = False, frozen: bool = False) -> list[str]:
    """Tie the weights of ``model``'s linear layers in ``scope`` in place (training form, dictionaries fitted
    by k-means, parameters shared); returns the converted module names. ``blocks``: every ``nn.Linear`` in
    ``model.blocks`` (attention qkv and projection, both MLP layers); ``blocks+head``: those and ``head``.
    The patch-embedding kernel stays float: it is PI-resized to each patch size, and a resized kernel is a
    linear map of the base kernel that would not take its values from the dictionary. ``frozen`` builds the
    empty frozen form instead (no shadow weight, no fitting), for a saved state to fill."""
    if scope not in LUTQ_SCOPES:
        raise ValueError(f"unknown LUT-Q scope {scope!r}; choose one of {', '.join(LUTQ_SCOPES)}")
    check_k(k)
    tied = lutq_layers(model)
    if tied:
        raise ValueError(f"the model has LUT-Q layers already ({', '.join(tied)}); it cannot be tied twice. Start "
                         "from a plain model, or from fold_lutq(model) loaded into one")
    targets = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and (name.startswith("blocks.") or (scope == "blocks+head" and name == "head"))}
    if not targets:
        raise ValueError(f"the model has no nn.Linear in LUT-Q scope {scope!r}")
    for name, m in targets.items():
        if type(m) is not nn.Linear:
            raise ValueError(f"{name} is a {type(m).__name__}, not a plain nn.Linear: LUT-Q ties plain weights "
                             "(fold scale-invariant layers first: fold_state_dict)")
        _check_size(k, m.weight.numel(), f"{name}.weight")  # every tensor checked before any is converted
    for name, m in targets.items():
        parent, _, child = name.rpartition(".")
        if frozen:
            new = LutqLinear(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None, k=k,
                             pow2=pow2, frozen=True).to(m.weight.device)
        else:
            new = LutqLinear.from_linear(m, k=k, pow2=pow2, name=f"{name}.weight")
        setattr(model.get_submodule(parent), child, new)
    return list(targets)


def freeze(model: nn.Module) -> nn.Module:
    """Turn every LUT-Q layer of ``model`` into its frozen form in place (the shadow weights are dropped;
    the model computes exactly what it did). Returns the model."""
    for layer in lutq_layers(model).values():
        layer.weight = None
    return model


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """``indices`` (any shape, each < 2^bits) as a flat uint8 tensor, ``8 // bits`` indices per byte (the
    first in the low bits; the last byte padded with zeros)."""
    if bits not in PACK_BITS:
        raise ValueError(f"indices pack to one of {PACK_BITS} bits, got {bits}")
    flat = indices.flatten().to(torch.int32)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise ValueError(f"index {int(flat.max())} does not fit in {bits} bits")
    per = 8 // bits
    flat = F.pad(flat, (0, -flat.numel() % per))
    shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
    return (flat.view(-1, per) << shifts).sum(dim=1).to(torch.uint8)  # (ceil(n / per),); disjoint bits: sum = or


def unpack_indices(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The uint8 indices of ``shape`` that ``pack_indices(indices, bits)`` packed into ``packed``."""
    if bits not in PACK_BITS:
        raise ValueError(f"indices pack to one of {PACK_BITS} bits, got {bits}")
    per, n = 8 // bits, math.prod(shape)
    need = -(-n // per)  # ceil(n / per) bytes
    if packed.ndim != 1 or packed.numel() != need:
        raise ValueError(f"{packed.numel()} packed bytes do not hold {n} indices of {bits} bits ({need} bytes do)")
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    fields = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)  # (bytes, per)
    return fields.flatten()[:n].to(torch.uint8).reshape(tuple(shape))


def pack_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (``model``'s state dict) as a model file stores it: each LUT-Q layer's ``values`` and its
    indices packed under ``packed_indices``, without the shadow weight. Plain models pass unchanged."""
    state = dict(state)
    for name, layer in lutq_layers(model).items():
        state.pop(f"{name}.weight", None)
        state[f"{name}.{PACKED_KEY}"] = pack_indices(state.pop(f"{name}.indices"), index_bits(layer.k))
    return state


def unpack_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``pack_state``'s inverse for a frozen ``model`` of the same config: the state dict it loads."""
    state = dict(state)
    for name, layer in lutq_layers(model).items():
        key = f"{name}.{PACKED_KEY}"
        if key not in state:
            raise ValueError(f"no {key} in the saved weights: they were not written for this LUT-Q model")
        state[f"{name}.indices"] = unpack_indices(state.pop(key), index_bits(layer.k), layer.indices.shape)
    return state


@torch.no_grad()
def fold_lutq(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``state`` (default ``model.state_dict()``) with each LUT-Q layer's entries replaced by the plain dense
    weight ``values[indices]`` it computes with: the state of the same function, plain ``nn.Linear``s."""
    state = model.state_dict() if state is None else dict(state)
    for name, layer in lutq_layers(model).items():
        state[f"{name}.weight"] = layer.tied_weight().detach()
        del state[f"{name}.values"], state[f"{name}.indices"]
    return state


class LutqHook:
    """Post-step hook (``flexivit.train.hooks``): one ``cluster_step`` per training-form LUT-Q layer after every
    optimizer step. Its state is empty: the dictionaries and assignments are model buffers, saved with the
    model in every training checkpoint, so a resumed run continues bit-identically (on CPU).
    ``metrics()`` gives the mean ``||W - tied|| / ||W||`` after the step since its last call."""

    name = "lutq"

    def __init__(self, *, layers: dict[str, LutqLinear]) -> None:
        if not layers or any(layer.frozen for layer in layers.values()):
            raise ValueError("LutqHook re-clusters training-form LUT-Q layers (with shadow weights); got "
                             f"{'none' if not layers else 'frozen ones'}")
        self.layers = layers
        self._sum = torch.zeros((), dtype=torch.float64, device=next(iter(layers.values())).values.device)
        self._steps = 0

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        for layer in self.layers.values():
            cluster_step(layer)
            self._sum += tying_error(layer) / len(self.layers)
        self._steps += 1

    def metrics(self) -> dict[str, float]:
        """``lutq_rel_error`` averaged over the steps since the last call; empty if there were none."""
        if not self._steps:
            return {}
        error = float(self._sum) / self._steps
        self._sum.zero_()
        self._steps = 0
        return {"lutq_rel_error": error}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"the LUT-Q hook keeps no state, but the checkpoint holds {sorted(state)}")


def lutq_hooks(model: nn.Module, *, sharded: bool = False) -> list[LutqHook]:
    """The re-clustering hook if ``model`` (unwrapped) has training-form LUT-Q layers, else none."""
    layers = {name: m for name, m in lutq_layers(model).items() if not m.frozen}
    if not layers:
        return []
    if sharded:
        raise ValueError("LUT-Q re-clusters whole weight tensors after each step and does not run under FSDP, "
                         "whose ranks hold shards; train with DDP (the default)")
    return [LutqHook(layers=layers)]


def make_lutq(model: nn.Module, k: int, *, scope: str = "blocks", pow2: bool = False) -> nn.Module:
    """Tie a plain FlexiViT's weights in place (training form): each Linear in ``scope`` (``blocks`` or
    ``blocks+head``) computes with ``k`` shared values (powers of two with ``pow2``), fitted by k-means to
    its weights now (post-hoc clustering). Returns the model."""
    config = FlexiViTConfig.from_dict({**model.config.to_dict(), "lutq_k": k, "lutq_scope": scope, "lutq_pow2": pow2})
    apply_lutq(model, k=k, scope=scope, pow2=pow2)
    model.config = config
    return model


@dataclass(frozen=True)
class LutqFields:
    # The Linears in lutq_scope ("blocks" or "blocks+head") compute with lutq_k shared values per tensor (powers
    # of two with lutq_pow2); None is the plain ViT.
    lutq_k: int | None = None
    lutq_scope: str = "blocks"
    lutq_pow2: bool = False


@register
class LutqOption(ModelOption):
    """LUT-Q weight tying (``model.lutq_k``; usually set by ``flexivit compress``)."""

    name = "lutq"
    fields = LutqFields
    order = 20
    folds = True  # a fine-tune trains the dense weights it computes with (compress the result to tie it again)

    def check(self, values: LutqFields, config: Any) -> None:
        if values.lutq_k is None:
            raise ValueError("lutq_scope and lutq_pow2 apply to LUT-Q weight tying only; set lutq_k (the number of "
                             "values per tensor) as well, or leave them unset")
        check_k(values.lutq_k)
        if values.lutq_scope not in LUTQ_SCOPES:
            raise ValueError(f"unknown lutq_scope {values.lutq_scope!r}; choose one of {', '.join(LUTQ_SCOPES)}")
        if config.option("scale_invariant") is not None:
            raise ValueError("LUT-Q weight tying and scale-invariant layers do not combine (a tied weight's norm is "
                             "not free); set scale_invariant='none' or leave lutq_k unset")

    def finish(self, values: LutqFields, model: nn.Module) -> None:
        # Built for a weight file: the frozen form, which the file fills (k-means on random weights would be
        # thrown away: it cost 42 s for a flexi_vit_tiny and minutes for a flexi_vit_small).
        apply_lutq(model, k=values.lutq_k, scope=values.lutq_scope, pow2=values.lutq_pow2, frozen=is_loading_weights())

    def head_replaced(self, values: LutqFields, model: nn.Module, old: nn.Module) -> None:
        if values.lutq_scope == "blocks+head" and isinstance(model.head, nn.Linear):
            model.head = LutqLinear.from_linear(model.head, k=values.lutq_k, pow2=values.lutq_pow2, name="head.weight")

    def fold(self, values: LutqFields, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return fold_lutq(model, state)

    def for_loading(self, values: LutqFields, model: nn.Module) -> nn.Module:
        return freeze(model)

    def pack_state(self, values: LutqFields, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return pack_state(model, state)

    def unpack_state(self, values: LutqFields, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return unpack_state(model, state)

    def post_step_hooks(self, run: Any, model: nn.Module, *, sharded: bool, say: Callable[[str], None]) -> list[Any]:
        return lutq_hooks(model, sharded=sharded)
