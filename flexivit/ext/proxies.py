"""Class proxies: a head that describes each class by one global proxy and ``M`` local proxies.

The global proxy of class ``k`` is matched to the pooled feature, its local proxies to the patch tokens,
all by cosine similarity. With pooled feature ``f`` ``(D,)``, patch tokens ``t_1..t_N`` ``(N, D)``, global
proxies ``g_k`` and local proxies ``q_k1..q_kM``:

    global_k = cos(f, g_k)
    local_k  = 1/M  sum_j  softmax_tau_n cos(t_n, q_kj)       softmax_tau_n s_n = tau log(1/N sum_n exp(s_n / tau))
    logit_k  = scale (alpha global_k + (1 - alpha) local_k)

The soft maximum over tokens is a log-mean-exp at temperature ``tau`` (``LOCAL_TEMPERATURE``). It lies
between the mean and the maximum of the similarities and equals ``s`` when every token has similarity
``s``, so it does not grow with the token count, which the patch size sets (4 tokens at patch 14, 196 at
patch 2 on 28 px); it does not depend on the order of the tokens; and its gradient with respect to a
token's similarity is that token's softmax weight ``w_n >= 0``, so every token gets a gradient (a hard
maximum gives it to one) and raising any similarity never lowers the score. The softmax-weighted mean
``sum_n w_n s_n`` has the same bounds, but its gradient ``w_n (1 + (s_n - S) / tau)`` (``S`` the weighted
mean) is negative for tokens more than ``tau`` below ``S``, hence the log-mean-exp. A class's local score is
the mean over its local proxies: an item of the class should contain every local portion the class is
described by.

A term whose weight is zero has no parameters (``alpha = 1``: no local proxies, ``M = 0``; ``alpha = 0``: no
global proxies), so every parameter of the head gets a gradient, as DDP requires.

``init_from_support`` sets a model's proxies from a support set: the global proxy of a class is the
normalised mean of its support images' pooled features, its local proxies the centres of a seeded spherical
k-means (cosine, the similarity they are matched with) of its support images' patch tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flexivit.model.options import ModelOption, register

if TYPE_CHECKING:
    from flexivit.model.vit import FlexiViT

__all__ = [
    "HEADS", "ProxyHead", "check_proxy_fields", "spherical_kmeans", "pooled_and_tokens", "support_proxies",
    "init_from_support", "global_similarity", "local_similarity", "soft_max_over_tokens", "LOCAL_TEMPERATURE",
]

HEADS = ("linear", "proxies")
# Cosines lie in [-1, 1]: at 0.1 a token 0.23 more similar than another weighs 10x more in the soft maximum.
LOCAL_TEMPERATURE = 0.1
KMEANS_ITERS = 50  # cap on Lloyd iterations; they stop earlier when no assignment changes
LOCAL_CHUNK = 2**25  # similarities made at once by local_similarity: 128 MB in float32


def check_proxy_fields(*, local: int, mix: float, scale: float) -> None:
    """Raise a ``ValueError`` that says what to change for proxy settings that cannot be used."""
    if not 0.0 <= mix <= 1.0:  # also refuses NaN
        raise ValueError(f"proxy_mix (the weight alpha of the global proxies; the local ones get 1 - alpha) must be "
                         f"in [0, 1], got {mix}")
    if local < 0:
        raise ValueError(f"proxy_local (local proxies per class) must be 0 or more, got {local}")
    if not scale > 0:
        raise ValueError(f"proxy_scale (the logit scale) must be positive, got {scale}")
    if local == 0 and mix < 1:
        raise ValueError(f"proxy_mix={mix} gives local proxies a weight but proxy_local=0; set proxy_local to 1 or "
                         "more, or proxy_mix=1 (global proxies only)")
    if local > 0 and mix == 1:
        raise ValueError(f"proxy_mix=1 gives the {local} local proxies per class no weight; set proxy_local=0, or "
                         "proxy_mix below 1")


def _unit_rows(shape: tuple[int, ...]) -> torch.Tensor:
    """Random unit vectors along the last dim (uniform directions): a proxy's norm never matters."""
    return F.normalize(torch.randn(shape), dim=-1)


def soft_max_over_tokens(sim: torch.Tensor, temperature: float = LOCAL_TEMPERATURE) -> torch.Tensor:
    """Log-mean-exp of ``sim`` over its last dim (the tokens) at ``temperature``: between mean and max."""
    return temperature * (torch.logsumexp(sim / temperature, dim=-1) - math.log(sim.shape[-1]))


def global_similarity(pooled: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """``cos(f, g_k)`` of pooled features ``(B, D)`` and global proxies ``(K, D)``: ``(B, K)``."""
    return F.normalize(pooled, dim=-1) @ F.normalize(proxies, dim=-1).T


def _local(tokens: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """``local_similarity`` of unit tokens ``(B, N, D)`` and unit proxies ``(k, M, D)``, all at once: ``(B, k)``."""
    sim = torch.einsum("bnd,kmd->bkmn", tokens, proxies)  # (B, k, M, N)
    return soft_max_over_tokens(sim).mean(dim=-1)  # (B, k)


def local_similarity(tokens: torch.Tensor, proxies: torch.Tensor, *, max_elements: int = LOCAL_CHUNK) -> torch.Tensor:
    """Patch tokens ``(B, N, D)`` against local proxies ``(K, M, D)``: the mean over each class's proxies of the
    soft maximum over tokens of their cosines, ``(B, K)``.

    The similarities ``(B, K, M, N)`` are made a block of classes at a time, each block at most
    ``max_elements`` values, and under autograd each block is recomputed in the backward pass instead of kept
    (``torch.utils.checkpoint``), so memory stays bounded for many classes and tokens (on the ``imagenet``
    recipe one all-at-once intermediate took 7.4 GB). Each class's value is computed as it would be all at
    once. A traced call (``torch.compile``, ``torch.export``) makes them all at once: the blocks would depend on
    a symbolic batch size."""
    t, p = F.normalize(tokens, dim=-1), F.normalize(proxies, dim=-1)
    b, n, _ = t.shape
    k, m, _ = p.shape
    if torch.compiler.is_compiling():  # traced (compile, torch.export): one block, the batch may be symbolic
        return _local(t, p)
    step = max(1, max_elements // max(1, b * m * n))  # classes per block
    if step >= k:
        return _local(t, p)
    grad = torch.is_grad_enabled() and (t.requires_grad or p.requires_grad)
    blocks = [checkpoint(_local, t, p[i : i + step], use_reentrant=False) if grad else _local(t, p[i : i + step])
              for i in range(0, k, step)]
    return torch.cat(blocks, dim=1)  # (B, K)


class ProxyHead(nn.Module):
    """Logits from global proxies ``(K, D)`` matched to the pooled feature and local proxies ``(K, M, D)``
    matched to the patch tokens; ``forward(pooled (B, D), tokens (B, N, D)) -> (B, K)``."""

    reads_tokens = True  # FlexiViT.forward_head passes the patch tokens too

    def __init__(self, *, dim: int, num_classes: int, local: int, mix: float, scale: float) -> None:
        super().__init__()
        check_proxy_fields(local=local, mix=mix, scale=scale)
        self.mix, self.scale, self.num_classes = mix, scale, num_classes
        self.global_proxies = nn.Parameter(_unit_rows((num_classes, dim))) if mix > 0 else None  # (K, D)
        self.local_proxies = nn.Parameter(_unit_rows((num_classes, local, dim))) if local else None  # (K, M, D)

    @property
    def local(self) -> int:
        return 0 if self.local_proxies is None else self.local_proxies.shape[1]

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.mix * global_similarity(pooled, self.global_proxies) if self.global_proxies is not None else 0.0
        if self.local_proxies is not None:
            logits = logits + (1.0 - self.mix) * local_similarity(tokens, self.local_proxies)
        return self.scale * logits

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, local={self.local}, mix={self.mix}, scale={self.scale}"


# ---- proxies from a support set -------------------------------------------------------------------------
def spherical_kmeans(points: torch.Tensor, k: int, *, seed: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """``k`` unit centres ``(k, D)`` of ``points`` ``(P, D)`` under cosine similarity: k-means++ seeding from a
    ``torch.Generator(seed)``, then Lloyd steps (assign to the most similar centre, centre = normalised sum);
    a centre left without points keeps its place. Deterministic for a seed. (Our own: the dependencies hold no
    k-means of vectors; ``flexivit.ext.lutq``'s is one-dimensional.)"""
    if not 1 <= k <= len(points):
        raise ValueError(f"k-means of {len(points)} points into {k} centres: k must be between 1 and the point count")
    x = F.normalize(points.detach().float().cpu(), dim=-1)  # (P, D)
    gen = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(x), (1,), generator=gen))]
    dist = (2 - 2 * x @ x[chosen[0]]).clamp_min(0)  # (P,) squared chord distance to the nearest centre
    for _ in range(1, k):
        weights = dist.clone()
        weights[chosen] = 0
        if not weights.sum() > 0:  # the remaining points repeat centres: draw among them uniformly
            weights = torch.ones(len(x))
            weights[chosen] = 0
        chosen.append(int(torch.multinomial(weights, 1, generator=gen)))
        dist = torch.minimum(dist, (2 - 2 * x @ x[chosen[-1]]).clamp_min(0))
    centres = x[chosen].clone()  # (k, D)
    assign = None
    for _ in range(iters):
        new = (x @ centres.T).argmax(dim=1)  # (P,)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, x)  # (k, D)
        filled = torch.bincount(assign, minlength=k) > 0
        centres[filled] = F.normalize(sums[filled], dim=-1)
    return centres


@torch.no_grad()
def pooled_and_tokens(model: "FlexiViT", images: torch.Tensor, patch_size: int,
                      batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled feature ``(B, D)`` (what the head sees) and the patch tokens ``(B, N, D)`` of ``images`` at
    ``patch_size``, in eval mode (running statistics, no dropout), on the CPU; the model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pooled, tokens = [], []
    for chunk in images.split(batch_size):
        feats = model.forward_features(chunk.to(device), patch_size)  # (b, prefix + N, D)
        pooled.append(model.forward_head(feats, pre_logits=True).float().cpu())
        tokens.append(feats[:, model.num_prefix_tokens:].float().cpu())
    model.train(was_training)
    return torch.cat(pooled), torch.cat(tokens)


def support_proxies(features: Sequence[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor, *, num_classes: int,
                    local: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global proxies ``(K, D)``: the normalised mean pooled feature of each class; local proxies ``(K, M, D)``:
    the spherical k-means centres of each class's support tokens (seed ``seed + k`` for class ``k``),
    ``local=None`` every token itself, ``local=0`` none. ``features``: ``(pooled (B, D), tokens (B, N, D))`` of
    the support images at one or more patch sizes (``pooled_and_tokens``), all labelled by ``labels (B,)`` in
    ``0..num_classes-1``."""
    labels = labels.cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    missing = [str(k) for k in range(num_classes) if counts[k] == 0]
    if missing or len(counts) > num_classes:
        raise ValueError(f"the support set must hold images of every class 0..{num_classes - 1} and of no other; "
                         f"missing {', '.join(missing) or 'none'}, labels up to {len(counts) - 1}")
    per_image = sum(tokens.shape[1] for _, tokens in features)  # tokens of one image over the sizes
    if local is not None and local > int(counts.min()) * per_image:
        k = int(counts.argmin())
        raise ValueError(f"class {k} has {int(counts[k]) * per_image} support tokens ({int(counts[k])} images "
                         f"x {per_image} tokens), fewer than the {local} local proxies per class; give more support "
                         "images, a smaller patch size, or fewer local proxies")
    pooled = torch.cat([p.float() for p, _ in features])  # (B * sizes, D)
    sums = torch.zeros(num_classes, pooled.shape[1]).index_add_(0, labels.repeat(len(features)), pooled)  # (K, D)
    global_proxies = F.normalize(sums, dim=-1)  # the mean's direction
    if local == 0:
        return global_proxies, None
    per_class = []
    for k in range(num_classes):
        points = torch.cat([tokens[labels == k].flatten(0, 1).float() for _, tokens in features])  # (S * N, D)
        per_class.append(F.normalize(points, dim=-1) if local is None
                         else spherical_kmeans(points, local, seed=seed + k))
    return global_proxies, torch.stack(per_class)  # (K, M, D)


@torch.no_grad()
def init_from_support(model: "FlexiViT", images: torch.Tensor, labels: torch.Tensor,
                      patch_size: int | Sequence[int], *, local: int | None = None, seed: int = 0) -> None:
    """Set the proxies of ``model`` (``head='proxies'``) from a support set: images ``(B, C, H, W)`` with
    labels ``(B,)`` covering every class of the model. With several patch sizes the features of every size
    are pooled (each image counts once per size). ``local`` (default: the model's ``proxy_local``) must equal
    the model's count. k-means is seeded with ``seed``: the same inputs give the same proxies."""
    head = model.head
    if not isinstance(head, ProxyHead):
        raise ValueError(f"init_from_support needs a model with head='proxies'; this one has a {type(head).__name__} "
                         "head (build it with --set model.head=proxies)")
    if local is not None and local != head.local:
        raise ValueError(f"the model holds {head.local} local proxies per class, not {local}; build it with "
                         f"proxy_local={local} or leave local unset")
    sizes = [patch_size] if isinstance(patch_size, int) else list(patch_size)
    features = [pooled_and_tokens(model, images, p) for p in sizes]
    global_proxies, local_proxies = support_proxies(features, labels, num_classes=head.num_classes,
                                                    local=head.local, seed=seed)
    if head.global_proxies is not None:
        head.global_proxies.copy_(global_proxies)
    if local_proxies is not None:
        head.local_proxies.copy_(local_proxies)


_PROXY_DEFAULTS = (16, 0.5, 16.0)
# proxy_local: the count in the calibration run (docs/proxies.md); proxy_mix: global and local weighed alike;
# proxy_scale: logits in [-16, 16]; with the true class at cosine 1 and nine others at 0, softmax gives it 1 - 1e-6.


@dataclass(frozen=True)
class ProxyFields:
    # "proxies" scores class k by cosine similarity to its global proxy (the pooled feature) and to its proxy_local
    # local proxies (the patch tokens, a soft maximum over tokens), weighed proxy_mix : 1 - proxy_mix, times
    # proxy_scale. "linear" is the plain ViT.
    head: str = "linear"
    proxy_local: int = _PROXY_DEFAULTS[0]
    proxy_mix: float = _PROXY_DEFAULTS[1]
    proxy_scale: float = _PROXY_DEFAULTS[2]


@register
class ProxyOption(ModelOption):
    """The class-proxy head (``model.head=proxies``); a fine-tune initialises it from the new task's images."""

    name = "proxies"
    fields = ProxyFields
    order = 60
    from_recipe = True
    needs_support = True

    def check(self, values: ProxyFields, config: Any) -> None:
        if values.head not in HEADS:
            raise ValueError(f"unknown head {values.head!r}; choose one of {', '.join(HEADS)}")
        check_proxy_fields(local=values.proxy_local, mix=values.proxy_mix, scale=values.proxy_scale)
        if values.head == "linear":
            raise ValueError("proxy_local, proxy_mix and proxy_scale apply to head='proxies' only; set "
                             "head='proxies' as well, or leave them unset")
        if config.scale_invariant == "head" or config.si_head_scale is not None:
            raise ValueError("the proxy head is scale-invariant already (cosine similarities); set its logit scale "
                             "with proxy_scale, and scale_invariant to 'none', 'linears' or 'all' without si_head_scale")
        if config.lutq_scope == "blocks+head":
            raise ValueError("lutq_scope='blocks+head' ties a linear head's weights; the proxy head has none: use "
                             "lutq_scope='blocks'")
        if values.proxy_mix == 0 and config.final_norm and config.use_fc_norm:
            raise ValueError("proxy_mix=0 ignores the pooled feature, so fc_norm (the norm after average pooling) would "
                             "get no gradient; set proxy_mix above 0, or fc_norm=false")

    def new_head(self, values: ProxyFields, config: Any, num_classes: int) -> nn.Module:
        return ProxyHead(dim=config.embed_dim, num_classes=num_classes, local=values.proxy_local,
                         mix=values.proxy_mix, scale=values.proxy_scale)

    def refuses_packing(self, values: ProxyFields) -> str | None:
        return "head='proxies': the proxy head scores each image's own patch tokens"

    def non_plain(self, values: ProxyFields) -> list[str]:
        return [f"a class-proxy head ({values.proxy_local} local proxies per class)"]

    def prepare_finetune(self, values: ProxyFields, model: nn.Module, support: Any, *, seed: int) -> None:
        if support is not None:
            images, labels, sizes = support
            init_from_support(model, images, labels, sizes, seed=seed)
