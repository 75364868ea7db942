"""``FlexiViTConfig``: everything that defines a FlexiViT's architecture, stored next to its weights.

A module of its own so that ``model.py`` and ``timm_interop.py`` can both use it without importing
each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .bridge import parse_spans, format_span
from .graph import BlockGraph, chain
from .lutq import LUTQ_SCOPES, check_k
from .patch_embed import PatchScheme, check_patch_sizes
from .proxies import HEADS, check_proxy_fields
from .resize import check_method

__all__ = ["FlexiViTConfig", "GLOBAL_POOLS", "SI_SCOPES", "SI_NORMS", "NORMS", "HEADS"]

GLOBAL_POOLS = ("token", "avg")
ACT_LAYERS = ("gelu", "gelu_tanh")
SI_SCOPES = ("none", "head", "linears", "all")  # see flexivit.scale_invariant
SI_NORMS = ("matrix", "row")
_SI_FIELDS = ("scale_invariant", "si_norm", "si_head_scale")
_LUTQ_FIELDS = ("lutq_k", "lutq_scope", "lutq_pow2")
NORMS = ("layernorm", "batchnorm", "bgn")  # see flexivit.bgn
_NORM_FIELDS = ("norm", "norm_groups", "norm_regions", "norm_sizes", "pow2_scale")
_BGN_FIELDS = ("norm_groups", "norm_regions")
_BGN_DEFAULTS = (8, 2)  # norm_groups (8 divides every registered width), norm_regions (a 2x2 split)
_PROXY_FIELDS = ("proxy_local", "proxy_mix", "proxy_scale")
# proxy_local: the count in issue 14's calibration run; proxy_mix: global and local weighed alike; proxy_scale:
# logits in [-16, 16]; with the true class at cosine 1 and nine others at 0, softmax gives it 1 - 1e-6.
_PROXY_DEFAULTS = (16, 0.5, 16.0)


@dataclass(frozen=True)
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
    # Scale-invariant layers (flexivit.scale_invariant): "head", every Linear ("linears"), or every Linear
    # and the base patch kernel ("all") compute S*W/||W|| with a constant S; "none" is the plain ViT.
    scale_invariant: str = "none"
    si_norm: str = "matrix"  # ||W|| over the whole matrix or per output row ("row")
    si_head_scale: float | None = None  # the head's S (a logit scale); None: ||W|| when made scale-invariant
    # LUT-Q weight tying (flexivit.lutq): the Linears in lutq_scope ("blocks" or "blocks+head") compute with
    # lutq_k shared values per tensor (powers of two with lutq_pow2); None is the plain ViT.
    lutq_k: int | None = None
    lutq_scope: str = "blocks"
    lutq_pow2: bool = False
    # The blocks wired as a DAG (flexivit.graph, e.g. "0-1,0-2,1-2,2-h"); None, or the chain written out
    # (stored as None), is the plain ViT.
    graph: str | None = None
    # Least-squares bridges (flexivit.bridge): "a:b" replaces blocks a..b-1 (0-based, of `depth`) by one
    # token-wise linear map; bridge_sizes: the patch sizes with a map of their own (others use the pooled one).
    bridges: tuple[str, ...] = ()
    bridge_sizes: tuple[int, ...] = ()
    # Batch-statistics norms (flexivit.bgn) in place of the blocks' norm1/norm2 and the final norm: "batchnorm"
    # (per channel) or "bgn" (norm_groups channel groups x norm_regions^2 regions of the token grid, the class
    # token a region of its own), with running statistics per patch size in norm_sizes (the training sizes);
    # pow2_scale: the inference scale of every norm is a power of two. "layernorm" is the plain ViT.
    norm: str = "layernorm"
    norm_groups: int = _BGN_DEFAULTS[0]
    norm_regions: int = _BGN_DEFAULTS[1]
    norm_sizes: tuple[int, ...] = ()
    pow2_scale: bool = False
    # Class-proxy head (flexivit.proxies): "proxies" scores class k by cosine similarity to its global proxy (the
    # pooled feature) and to its proxy_local local proxies (the patch tokens, a soft maximum over tokens), weighed
    # proxy_mix : 1 - proxy_mix, times proxy_scale. "linear" is the plain ViT.
    head: str = "linear"
    proxy_local: int = _PROXY_DEFAULTS[0]
    proxy_mix: float = _PROXY_DEFAULTS[1]
    proxy_scale: float = _PROXY_DEFAULTS[2]

    def __post_init__(self) -> None:
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
        self._check_scale_invariance()
        self._check_lutq()
        self._check_graph()
        self._check_bridges()
        self._check_norm()
        self._check_head()
        check_patch_sizes([PatchScheme(self.patch_size, self.stride)], self.img_size)

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def _check_scale_invariance(self) -> None:
        if self.scale_invariant not in SI_SCOPES:
            raise ValueError(f"unknown scale_invariant scope {self.scale_invariant!r}; choose one of {', '.join(SI_SCOPES)}")
        if self.si_norm not in SI_NORMS:
            raise ValueError(f"unknown si_norm {self.si_norm!r}; choose one of {', '.join(SI_NORMS)}")
        if self.scale_invariant == "none" and (self.si_norm != "matrix" or self.si_head_scale is not None):
            raise ValueError("si_norm and si_head_scale apply to scale-invariant layers only; set scale_invariant "
                             f"to one of {', '.join(SI_SCOPES[1:])} as well, or leave them unset")
        if self.si_head_scale is not None and not self.si_head_scale > 0:
            raise ValueError(f"si_head_scale must be positive (a logit scale), got {self.si_head_scale}")

    def _check_graph(self) -> None:
        if self.graph is not None:
            graph = BlockGraph.parse(self.graph, self.depth)  # raises naming the node and why
            object.__setattr__(self, "graph", None if graph.is_chain() else graph.format())  # one spelling
        if self.graph is not None and self.lutq_k is not None:
            raise ValueError("LUT-Q weight tying and a block graph are not combined in this version; set one of "
                             "lutq_k and graph")

    def _check_bridges(self) -> None:
        if isinstance(self.bridge_sizes, (str, int)):
            raise ValueError(f"bridge_sizes must be a list of patch sizes such as [4, 7], got {self.bridge_sizes!r}")
        spans = parse_spans(self.bridges, self.depth)  # raises naming the bad spec
        object.__setattr__(self, "bridges", tuple(map(format_span, spans)))  # one spelling, sorted; lists from JSON
        object.__setattr__(self, "bridge_sizes", tuple(sorted(int(p) for p in self.bridge_sizes)))
        if self.bridge_sizes and not spans:
            raise ValueError("bridge_sizes apply to bridges only; set bridges (e.g. ['2:4']) as well, or leave it empty")
        if len(set(self.bridge_sizes)) != len(self.bridge_sizes):
            raise ValueError(f"bridge_sizes {list(self.bridge_sizes)} repeat a size")
        if self.bridge_sizes:
            check_patch_sizes(self.bridge_sizes, self.img_size, hint=" (bridge_sizes)")
        if spans and self.graph is not None:
            raise ValueError("bridges and a block graph do not combine; set one of bridges and graph")

    def _check_norm(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if isinstance(self.norm_sizes, (str, int)):
            raise ValueError(f"norm_sizes must be a list of patch sizes such as [4, 7], got {self.norm_sizes!r}")
        sizes = tuple(sorted(int(p) for p in self.norm_sizes))
        object.__setattr__(self, "norm_sizes", sizes)  # one spelling, sorted; lists from JSON
        if self.norm == "layernorm":
            if sizes or self.pow2_scale or (self.norm_groups, self.norm_regions) != _BGN_DEFAULTS:
                raise ValueError("norm_groups, norm_regions, norm_sizes and pow2_scale apply to batch-statistics norms "
                                 "only; set norm to 'batchnorm' or 'bgn' as well, or leave them unset")
            return
        if self.norm == "batchnorm" and (self.norm_groups, self.norm_regions) != _BGN_DEFAULTS:
            raise ValueError("norm_groups and norm_regions apply to norm='bgn' only (batchnorm keeps one statistic "
                             "per channel over every token); set norm='bgn' or leave them unset")
        if not sizes:
            raise ValueError(f"norm={self.norm!r} keeps running statistics per patch size: set norm_sizes to the "
                             "training patch sizes (a recipe's builder fills them from patch.sizes)")
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"norm_sizes {list(sizes)} repeat a size")
        if not self.pad:
            check_patch_sizes(sizes, self.img_size, hint=" (norm_sizes)")
        if self.norm == "bgn":
            if self.norm_groups < 1 or self.embed_dim % self.norm_groups:
                divisors = [g for g in range(1, self.embed_dim + 1) if self.embed_dim % g == 0]
                raise ValueError(f"norm_groups={self.norm_groups} does not divide embed_dim={self.embed_dim}; choose "
                                 f"one of {', '.join(map(str, divisors))}")
            smallest = -(-self.img_size // max(sizes))  # token rows (= columns) of the largest trained patch
            if not 1 <= self.norm_regions <= smallest:
                raise ValueError(f"norm_regions={self.norm_regions} (regions per side of the token grid) must be between "
                                 f"1 and {smallest}, the grid side at the largest patch in norm_sizes ({max(sizes)} on "
                                 f"{self.img_size} px): every region needs tokens in training")

    def _check_head(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        check_proxy_fields(local=self.proxy_local, mix=self.proxy_mix, scale=self.proxy_scale)
        if self.head == "linear":
            if (self.proxy_local, self.proxy_mix, self.proxy_scale) != _PROXY_DEFAULTS:
                raise ValueError("proxy_local, proxy_mix and proxy_scale apply to head='proxies' only; set "
                                 "head='proxies' as well, or leave them unset")
            return
        if self.scale_invariant == "head" or self.si_head_scale is not None:
            raise ValueError("the proxy head is scale-invariant already (cosine similarities); set its logit scale "
                             "with proxy_scale, and scale_invariant to 'none', 'linears' or 'all' without si_head_scale")
        if self.lutq_scope == "blocks+head":
            raise ValueError("lutq_scope='blocks+head' ties a linear head's weights; the proxy head has none: use "
                             "lutq_scope='blocks'")
        if self.proxy_mix == 0 and self.final_norm and self.use_fc_norm:
            raise ValueError("proxy_mix=0 ignores the pooled feature, so fc_norm (the norm after average pooling) would "
                             "get no gradient; set proxy_mix above 0, or fc_norm=false")

    @property
    def block_graph(self) -> BlockGraph:
        """The blocks' graph: ``graph`` parsed, or the chain."""
        return chain(self.depth) if self.graph is None else BlockGraph.parse(self.graph, self.depth)

    def _check_lutq(self) -> None:
        if self.lutq_k is None:
            if self.lutq_scope != "blocks" or self.lutq_pow2:
                raise ValueError("lutq_scope and lutq_pow2 apply to LUT-Q weight tying only; set lutq_k (the "
                                 "number of values per tensor) as well, or leave them unset")
            return
        check_k(self.lutq_k)
        if self.lutq_scope not in LUTQ_SCOPES:
            raise ValueError(f"unknown lutq_scope {self.lutq_scope!r}; choose one of {', '.join(LUTQ_SCOPES)}")
        if self.scale_invariant != "none":
            raise ValueError("LUT-Q weight tying and scale-invariant layers do not combine (a tied weight's norm is "
                             "not free); set scale_invariant='none' or leave lutq_k unset")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; those of scale-invariant layers, LUT-Q, the graph, bridges, batch-statistics
        norms and the proxy head only when they are on, so a plain model's config (and every file that stores
        it) is what it was before the options existed."""
        values = asdict(self)
        if self.act_layer == "gelu":
            del values["act_layer"]
        if self.scale_invariant == "none":
            for key in _SI_FIELDS:
                del values[key]
        if self.lutq_k is None:
            for key in _LUTQ_FIELDS:
                del values[key]
        if self.graph is None:
            del values["graph"]
        for key in ("bridges", "bridge_sizes"):
            if not values[key]:
                del values[key]
        for key in _NORM_FIELDS if self.norm == "layernorm" else _BGN_FIELDS if self.norm == "batchnorm" else ():
            del values[key]
        for key in ("head", *_PROXY_FIELDS) if self.head == "linear" else ():
            del values[key]
        for key in ("norm_sizes", "bridges", "bridge_sizes"):  # as JSON reads them back: a resumed run compares
            if key in values:                                  # the saved config with the current one
                values[key] = list(values[key])
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlexiViTConfig":
        """From ``to_dict``'s output, also as saved by older versions (``kernel_antialias`` is read as
        ``kernel_resize``: true → ``bilinear_aa``, false → ``bilinear``)."""
        values = dict(values)
        if "kernel_antialias" in values:
            antialias = values.pop("kernel_antialias")
            values.setdefault("kernel_resize", "bilinear_aa" if antialias else "bilinear")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FlexiViT config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)
