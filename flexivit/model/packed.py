"""The packed forward: several images, each at its own patch size, in fixed-length token rows.

``forward_packed(model, images, patch_sizes)`` returns one row of logits per image, equal (fp32, to
1e-5) to ``model(image[None], patch_size=p)`` for each image alone. It

1. embeds each image at its own patch size through the model's own stem (``FlexiViT._embed``: the
   PI-resized kernel, the position grid resampled to that image's token grid, the class token), one
   call per group of images that share a size and resolution;
2. lays the images' tokens into ``R`` rows of ``row_tokens`` tokens (``pack``; default layout
   ``flexivit.model.packing.first_fit_decreasing``, or the rows of a ``PackPlan``), padding the rest;
3. runs the model's timm ``Block``s on the rows with attention restricted to each image (block
   diagonal) and the final norm (``packed_trunk``); ``block_forward`` calls the block's own submodules,
   since a timm ``Block`` takes at most a dense mask (older timm releases none) and no flex block mask;
4. pools each image over its own tokens (class token, or the mean of its patch tokens) and applies
   ``fc_norm`` and the head.

Attention (``attention=``), all exact:
- ``grouped`` (``auto`` off CUDA): a row's images lie longest first, so each row is a few segments of
  equal-length images; a segment shared by consecutive rows (first-fit decreasing repeats rows) is viewed
  as one unmasked ``scaled_dot_product_attention`` call: no mask, no gather, no score between images;
- ``sdpa``: one call with an additive ``(R, 1, L, L)`` mask (same image id): every row's ``L x L`` scores
  are computed and those between images discarded; fixed shapes, so it is the one to compile on CPU;
- ``flex`` (``auto`` on CUDA): ``flex_attention`` with a block mask, which skips the blocks between images;
  compiled on CUDA; eager, unfused and forward only on CPU.
Stochastic depth drops whole images, as it drops whole samples unpacked.

Refused, in one line naming the option, for a model option whose computation packing cannot reproduce
(``ModelOption.refuses_packing``: e.g. statistics pooled across images, a head that reads each image's
patch tokens, blocks wired or replaced by the option).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import checkpoint
from timm.models.vision_transformer import Attention, Block

from flexivit.model.packing import check_lengths, first_fit_decreasing
from flexivit.model.patch_embed import PatchScheme, check_patch_sizes

if TYPE_CHECKING:
    from flexivit.model.vit import FlexiViT

__all__ = ["PackedBatch", "ATTENTION", "check_packable", "pack", "packed_trunk", "block_forward", "run_packed",
           "forward_packed"]

ATTENTION = ("auto", "grouped", "sdpa", "flex")
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
Run = tuple[int, int, int, int, int]  # (first, end, offset, n, c): rows [first, end) each hold c images of n tokens from token offset
Images = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class PackedBatch:
    """Embedded images in token rows; image ``i`` holds ``slots[i] = (row, start, length)``."""

    tokens: torch.Tensor  # (R, L, D): tokens entering the blocks, zeros at padding
    image_ids: torch.Tensor  # (R, L) long: the image of each token, -1 at padding
    positions: torch.Tensor  # (R, L) long: the token's index in its image (prefix tokens first), -1 at padding
    slots: tuple[tuple[int, int, int], ...]
    patch_sizes: tuple[int, ...]
    num_prefix_tokens: int
    runs: tuple[Run, ...] = ()  # segments of equal-length images shared by consecutive rows, for the grouped attention

    @property
    def num_images(self) -> int:
        return len(self.slots)

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def row_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def padding(self) -> float:
        """The fraction of token slots that hold no image."""
        return 1.0 - sum(n for _, _, n in self.slots) / (self.num_rows * self.row_tokens)


def check_packable(model: FlexiViT) -> None:
    """Raise ``ValueError`` (one line, naming the option) for a model the packed forward cannot reproduce
    (``ModelOption.refuses_packing``)."""
    for option, values in model.config.active():
        why = option.refuses_packing(values)
        if why:
            raise ValueError(f"the packed forward cannot run a model with {why}; use forward() one patch size "
                             "per call for this model")
    if not all(isinstance(b, Block) and isinstance(b.attn, Attention) for b in model.blocks):
        raise ValueError("the packed forward runs timm Blocks with their Attention only; this model's blocks differ")


def _image_list(images: Images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected a batch (B, C, H, W) or a list of (C, H, W) images, got shape "
                             f"{tuple(images.shape)}")
        return list(images.unbind(0))
    out = list(images)
    for i, image in enumerate(out):
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image {i}: expected a (C, H, W) tensor, got {shape}")
    return out


def _scheme_and_length(model: FlexiViT, image: torch.Tensor, patch: int, index: int) -> tuple[PatchScheme, int]:
    """Image ``index``'s scheme and token count; raises one line naming the image."""
    hw = (image.shape[1], image.shape[2])
    try:
        if image.shape[0] != model.config.in_chans:
            raise ValueError(f"expected {model.config.in_chans} channels, got {image.shape[0]} "
                             f"(shape {tuple(image.shape)})")
        scheme = PatchScheme.of(patch)
        if model.config.pad:
            ph, pw = scheme.padding_for(hw)
            hw = (hw[0] + ph, hw[1] + pw)
        elif not scheme.tiles(hw):
            check_patch_sizes([scheme], hw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"image {index}: {error}") from None
    gh, gw = scheme.grid_size(hw)
    return scheme, model.num_prefix_tokens + gh * gw


def _check_rows(rows: Sequence[Sequence[int]], lengths: Sequence[int], row_tokens: int) -> None:
    seen = [0] * len(lengths)
    for r, row in enumerate(rows):
        for i in row:
            if not 0 <= i < len(lengths):
                raise ValueError(f"row {r} names image {i}, but there are {len(lengths)} images")
            seen[i] += 1
        held = sum(lengths[i] for i in row)
        if held > row_tokens:
            raise ValueError(f"row {r} holds {held} tokens, more than row_tokens={row_tokens}")
    for i, count in enumerate(seen):
        if count != 1:
            raise ValueError(f"image {i} is placed {count} times in rows; place every image exactly once")


def pack(model: FlexiViT, images: Images, patch_sizes: Sequence[int], *, row_tokens: int | None = None,
         rows: Sequence[Sequence[int]] | None = None) -> PackedBatch:
    """Embed image ``i`` at ``patch_sizes[i]`` and lay the tokens into rows of ``row_tokens`` (default: the
    longest image's). ``rows`` (image indices per row, e.g. a ``PackPlan``'s) fixes the layout; empty rows
    are allowed (all padding), so a caller can keep the row count fixed."""
    check_packable(model)
    images = _image_list(images)
    patch_sizes = list(patch_sizes)
    if not images:
        raise ValueError("no images given; pass at least one image")
    if len(patch_sizes) != len(images):
        first = min(len(images), len(patch_sizes))
        raise ValueError(f"got {len(images)} images and {len(patch_sizes)} patch sizes: image {first} has "
                         f"{'no patch size' if first < len(images) else 'no image'}; give one patch size per image")
    schemes, lengths = zip(*(_scheme_and_length(model, x, p, i) for i, (x, p) in enumerate(zip(images, patch_sizes))))
    row_tokens = int(row_tokens) if row_tokens is not None else max(lengths)
    check_lengths(lengths, row_tokens)
    if rows is None:
        rows = first_fit_decreasing(lengths, row_tokens)
    else:
        _check_rows(rows, lengths, row_tokens)
    rows = [sorted(row, key=lambda i: -lengths[i]) for row in rows]  # a row's equal-length images side by side
    slots = _slots(rows, lengths)
    groups: dict[tuple[PatchScheme, tuple[int, ...]], list[int]] = {}  # images sharing a size and a resolution
    for i, (image, scheme) in enumerate(zip(images, schemes)):
        groups.setdefault((scheme, tuple(image.shape)), []).append(i)
    size = len(rows) * row_tokens
    tokens = ids = positions = None
    for (scheme, _), members in groups.items():
        embedded, _ = model._embed(torch.stack([images[i] for i in members]), scheme)  # (b, n, D), n = prefix + gh*gw
        b, n, dim = embedded.shape
        if tokens is None:
            tokens = embedded.new_zeros(size, dim)  # (R * L, D); padding stays zero
            ids = torch.full((size,), -1, dtype=torch.long, device=embedded.device)  # (R * L,)
            positions = torch.full((size,), -1, dtype=torch.long, device=embedded.device)  # (R * L,)
        starts = torch.tensor([slots[i][0] * row_tokens + slots[i][1] for i in members], device=embedded.device)
        index = (starts[:, None] + torch.arange(n, device=embedded.device)).flatten()  # (b * n,) slots in the rows
        tokens.index_copy_(0, index, embedded.flatten(0, 1))
        ids.index_copy_(0, index, torch.tensor(members, device=embedded.device).repeat_interleave(n))
        positions.index_copy_(0, index, torch.arange(n, device=embedded.device).repeat(b))
    shape = (len(rows), row_tokens)
    return PackedBatch(tokens.view(*shape, -1), ids.view(shape), positions.view(shape), tuple(slots),
                       tuple(s.patch for s in schemes), model.num_prefix_tokens, _runs(rows, lengths))


def _slots(rows: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` per image, the images of a row back to back in the row's order."""
    slots = [(0, 0, 0)] * len(lengths)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            slots[i] = (r, start, lengths[i])
            start += lengths[i]
    return slots


def _runs(rows: Sequence[Sequence[int]], lengths: Sequence[int]) -> tuple[Run, ...]:
    """Segments of equal-length images, merged over consecutive rows with the same segment: ``(first, end,
    offset, n, c)``. A row's images lie longest first (``pack``), so a row is a few segments; first-fit
    decreasing layouts repeat the same rows, so a handful of runs cover a whole batch."""
    runs: list[Run] = []
    open_runs: dict[tuple[int, int, int], int] = {}  # (offset, n, c) -> index in runs of the run ending at row r
    for r, row in enumerate(rows):
        offset, extended = 0, {}
        for n, members in itertools.groupby(lengths[i] for i in row):
            key = (offset, n, len(list(members)))
            k = open_runs.get(key)
            if k is None:
                runs.append((r, r + 1, *key))
                k = len(runs) - 1
            else:
                runs[k] = (runs[k][0], r + 1, *key)
            extended[key] = k
            offset += n * key[2]
        open_runs = extended  # a run continues only into the next row
    return tuple(runs)


@cache
def _flex(device_type: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled on CUDA, where it becomes a fused kernel; eager elsewhere (unfused, for checking).
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401 (only whether it imports)
    except ImportError:
        return False
    return True


def _masked(image_ids: torch.Tensor, dtype: torch.dtype) -> Attend:
    """One SDPA call over whole rows ``(R, L)`` with a same-image mask: every ``L x L`` score is computed."""
    # Padding tokens (id -1) attend to each other, so no query row is fully masked (no NaN).
    same = image_ids[:, None, :, None] == image_ids[:, None, None, :]  # (R, 1, L, L)
    # Additive, made once: SDPA would convert a boolean mask on every call (every block). Under autocast the
    # queries have another dtype and get the boolean mask.
    additive = torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(~same, -torch.inf)

    def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        mask = additive if q.dtype == additive.dtype else same
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2)  # (R, L, H, hd)

    return masked


def _grouped(runs: Sequence[Run]) -> Attend:
    """Each run's segment (``c`` images of ``n`` tokens from token ``offset`` in each of rows ``[first, end)``)
    as ``(end - first) * c`` unmasked sequences of ``n``: views, no gather, no score between images or with
    padding. The runs cover every image token of the batch."""

    def grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        out = q.new_zeros(q.shape)  # (R, L, H, hd); padding stays zero (garbage would reach the weight gradients)
        for first, end, offset, n, c in runs:
            m, span = end - first, slice(offset, offset + c * n)
            parts = (t[first:end, span].reshape(m * c, n, *t.shape[2:]).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(*parts, dropout_p=p)  # (m * c, H, n, hd)
            out[first:end, span] = o.transpose(1, 2).reshape(m, c * n, *q.shape[2:])
        return out

    return grouped


def _attend_fn(image_ids: torch.Tensor, attention: str, dropout: bool, dtype: torch.dtype,
               runs: Sequence[Run] | None) -> Attend:
    """Attention within each image, on ``q, k, v`` of shape ``(R, L, H, hd)``; returns ``(R, L, H, hd)``."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if attention == "auto":
        attention = ("flex" if image_ids.is_cuda and not dropout and _has_flex()
                     else "grouped" if runs is not None else "sdpa")
    if attention == "grouped":
        if runs is None:
            raise ValueError("attention='grouped' needs the rows' runs (PackedBatch.runs); pass runs=, or use 'sdpa'")
        return _grouped(runs)
    if attention == "sdpa":
        return _masked(image_ids, dtype)
    if dropout:
        raise ValueError("flex attention has no attention dropout; use attention='grouped' or 'sdpa' when training "
                         "with attn_drop_rate > 0")
    from torch.nn.attention.flex_attention import create_block_mask

    def same_image(b, h, q, kv):
        return image_ids[b, q] == image_ids[b, kv]

    r, length = image_ids.shape
    block_mask = create_block_mask(same_image, B=r, H=None, Q_LEN=length, KV_LEN=length, device=image_ids.device)
    flex = _flex(image_ids.device.type)
    return lambda q, k, v, p: flex(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=block_mask).transpose(1, 2)


def _attention(attn: Attention, x: torch.Tensor, attend: Attend) -> torch.Tensor:
    """timm's ``Attention`` computation with ``attend`` in place of its unmasked SDPA call."""
    r, length, _ = x.shape
    q, k, v = attn.qkv(x).reshape(r, length, 3, attn.num_heads, attn.head_dim).unbind(2)  # (R, L, H, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attend(q, k, v, attn.attn_drop.p if attn.training else 0.0)  # (R, L, H, hd)
    return attn.proj_drop(attn.proj(out.reshape(r, length, attn.num_heads * attn.head_dim)))  # (R, L, D)


def _drop_path(module: torch.nn.Module, x: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Stochastic depth per image: every token of an image is kept or dropped together."""
    if not (isinstance(module, DropPath) and module.training and module.drop_prob > 0):
        return module(x)
    keep_prob = 1.0 - module.drop_prob
    # One draw per possible image id (ids < R * L), so the shape does not depend on the image count.
    keep = x.new_empty(image_ids.numel()).bernoulli_(keep_prob)  # (R * L,)
    if module.scale_by_keep:
        keep = keep / keep_prob
    return x * keep[image_ids.clamp(min=0)].unsqueeze(-1)  # (R, L, D)


def block_forward(block: Block, x: torch.Tensor, attend: Attend, image_ids: torch.Tensor) -> torch.Tensor:
    """A timm ``Block`` on packed rows ``(R, L, D)``, through its own submodules, attention by ``attend``."""
    x = x + _drop_path(block.drop_path1, block.ls1(_attention(block.attn, block.norm1(x), attend)), image_ids)
    return x + _drop_path(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), image_ids)


def packed_trunk(model: FlexiViT, tokens: torch.Tensor, image_ids: torch.Tensor, *, attention: str = "auto",
                 runs: Sequence[Run] | None = None) -> torch.Tensor:
    """The blocks and the final norm on packed rows: ``(R, L, D)`` → ``(R, L, D)``. ``auto`` attention is
    ``flex`` on CUDA, else ``grouped`` given the batch's ``runs``, else ``sdpa``. With ``sdpa`` or ``flex``
    the shapes depend on ``(R, L)`` alone, so a compiled trunk builds one graph per row bucket
    (``flexivit.model.packing``)."""
    dropout = model.training and any(b.attn.attn_drop.p > 0 for b in model.blocks)
    attend = _attend_fn(image_ids, attention, dropout, tokens.dtype, runs)
    use_ckpt = model.grad_checkpointing and torch.is_grad_enabled()
    for block in model.blocks:
        tokens = (checkpoint(block_forward, block, tokens, attend, image_ids) if use_ckpt
                  else block_forward(block, tokens, attend, image_ids))
    return model.norm(tokens)


def _pool(model: FlexiViT, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """One feature per image ``(n, D)``: its class token, or the mean of its own patch tokens."""
    flat = x.flatten(0, 1)  # (R * L, D)
    length = batch.row_tokens
    if model.global_pool == "token":
        first = torch.tensor([r * length + start for r, start, _ in batch.slots], device=x.device)
        return flat[first]  # (n, D)
    ids, positions = batch.image_ids.flatten(), batch.positions.flatten()
    patch = positions >= batch.num_prefix_tokens  # padding has position -1
    sums = flat.new_zeros(batch.num_images, flat.shape[-1]).index_add(0, ids[patch], flat[patch])  # (n, D)
    counts = torch.tensor([n - batch.num_prefix_tokens for _, _, n in batch.slots], device=x.device, dtype=x.dtype)
    return sums / counts[:, None]


@cache
def _compiled_trunk(backend: object, mode: str | None) -> Callable[..., torch.Tensor]:
    """``packed_trunk`` compiled once per process and settings; static shapes, since a run's rows keep one
    ``(rows, row_tokens)`` bucket (``flexivit.model.packing``)."""
    return torch.compile(packed_trunk, backend=backend, mode=mode, dynamic=False)


def run_packed(model: FlexiViT, batch: PackedBatch, *, attention: str = "auto") -> torch.Tensor:
    """Logits ``(n_images, num_classes)`` of a packed batch (features ``(n, D)`` for a model without head).

    A model compiled by ``flexivit.model.compile.compile_model`` runs its rows through a compiled trunk
    with ``sdpa`` attention (``auto`` on CPU), whose shapes depend on ``(rows, row_tokens)`` alone: one
    graph per row bucket and grad mode, where ``grouped`` would build one per layout of runs."""
    check_packable(model)
    compiled = getattr(model, "compile_options", None)
    if compiled is not None and attention in ("auto", "sdpa") and not batch.tokens.is_cuda:
        trunk = _compiled_trunk(*compiled)
        x = trunk(model, batch.tokens, batch.image_ids, attention="sdpa")
    else:
        x = packed_trunk(model, batch.tokens, batch.image_ids, attention=attention, runs=batch.runs)
    return model.head(model.head_drop(model.fc_norm(_pool(model, x, batch))))


def forward_packed(model: FlexiViT, images: Images, patch_sizes: Sequence[int], *, row_tokens: int | None = None,
                   rows: Sequence[Sequence[int]] | None = None, attention: str = "auto") -> torch.Tensor:
    """Logits ``(n_images, num_classes)``: image ``i`` (a list of ``(C, H, W)`` or a ``(B, C, H, W)``
    batch) at ``patch_sizes[i]``, packed into rows of ``row_tokens`` tokens (see ``pack``), in one call."""
    return run_packed(model, pack(model, images, patch_sizes, row_tokens=row_tokens, rows=rows), attention=attention)
