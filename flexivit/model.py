"""FlexiViT: one vision transformer that runs at any patch size.

The transformer is built from timm's ``Block``s and mirrors timm's ``VisionTransformer`` module names
(``cls_token``, ``norm_pre``, ``blocks``, ``norm``, ``fc_norm``, ``head``) so weights move between the two
by renaming two keys. What differs is the stem: one base patch-embedding kernel, PI-resized to the patch
size of each call, and one learned position-embedding grid, resampled bilinearly to the token grid.
timm's model API is there too (``group_matcher``, ``set_grad_checkpointing``, ``forward_intermediates``,
``no_weight_decay``), so ``timm.optim.create_optimizer_v2(model, layer_decay=...)`` works.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models import checkpoint, checkpoint_seq
from timm.models._features import feature_take_indices  # timm's own index rule for forward_intermediates
from timm.models.vision_transformer import Block
from torch import nn

from .architecture import FlexiViTConfig
from .bgn import install_norms, set_token_grid
from .bridge import bridge_blocks
from .graph import GraphBlocks
from .lutq import LutqLinear, apply_lutq, fold_lutq
from .packed import forward_packed
from .patch_embed import FlexiPatchEmbed, PatchScheme
from .proxies import ProxyHead
from .resize import pi_resize, resample_posemb
from .scale_invariant import convert_layers, fold_state_dict
from .timm_interop import flexivit_to_timm, timm_to_flexivit

__all__ = ["FlexiViT", "FlexiViTConfig"]

Intermediates = list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]


class FlexiViT(nn.Module):
    """A ViT whose ``forward(x, patch_size, stride)`` accepts any patch scheme that tiles the image."""

    def __init__(self, config: FlexiViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = config if config is not None else FlexiViTConfig()
        if overrides:
            cfg = FlexiViTConfig.from_dict({**cfg.to_dict(), **overrides})
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = int(cfg.class_token)
        self.global_pool = cfg.global_pool
        dim = cfg.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = FlexiPatchEmbed(
            base_patch_size=cfg.base_patch_size,
            in_chans=cfg.in_chans,
            embed_dim=dim,
            bias=not cfg.pre_norm,
            resize=cfg.kernel_resize,
            pad=cfg.pad,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        g = cfg.base_grid
        if cfg.posemb == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, g, g, dim))  # (1, H, W, D)
        else:
            self.pos_embed_h = nn.Parameter(torch.zeros(1, g, 1, dim))  # (1, H, 1, D)
            self.pos_embed_w = nn.Parameter(torch.zeros(1, 1, g, dim))  # (1, 1, W, D)
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.norm_pre = norm_layer(dim) if cfg.pre_norm else nn.Identity()
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()  # stochastic depth per block
        blocks = [
            Block(
                dim=dim,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                qk_norm=cfg.qk_norm,
                init_values=cfg.init_values,
                proj_drop=cfg.drop_rate,
                attn_drop=cfg.attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
            )
            for i in range(cfg.depth)
        ]
        if cfg.bridges:  # least-squares bridges (flexivit.bridge): one linear map in place of each span
            blocks = bridge_blocks(blocks, cfg)
        # A block graph (flexivit.graph) keeps the blocks at their indices and adds its connection logits.
        self.blocks = nn.Sequential(*blocks) if cfg.graph is None else GraphBlocks(blocks, graph=cfg.block_graph)
        self.norm = norm_layer(dim) if cfg.final_norm and not cfg.use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(dim) if cfg.final_norm and cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = self._new_head(cfg.num_classes)
        if cfg.norm != "layernorm":  # batch-statistics norms (flexivit.bgn) in the blocks and at the end
            install_norms(self, cfg)
        # timm-style metadata so timm.data.resolve_data_config(model=...) works.
        self.pretrained_cfg = {
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": (0.5,) * cfg.in_chans,
            "std": (0.5,) * cfg.in_chans,
            "num_classes": cfg.num_classes,
        }
        self._posemb_cache: dict[tuple[int, int], tuple[tuple, torch.Tensor]] = {}
        self.grad_checkpointing = False
        self._init_weights()
        if cfg.scale_invariant != "none":
            convert_layers(self, scope=cfg.scale_invariant, norm=cfg.si_norm, head_scale=cfg.si_head_scale)
        if cfg.lutq_k is not None:
            apply_lutq(self, k=cfg.lutq_k, scope=cfg.lutq_scope, pow2=cfg.lutq_pow2)

    def _new_head(self, num_classes: int) -> nn.Module:
        """The classifier for ``num_classes`` outputs: ``nn.Linear``, or class proxies (``flexivit.proxies``)."""
        cfg = self.config
        if num_classes <= 0:
            return nn.Identity()
        if cfg.head == "proxies":
            return ProxyHead(dim=self.embed_dim, num_classes=num_classes, local=cfg.proxy_local, mix=cfg.proxy_mix,
                             scale=cfg.proxy_scale)
        return nn.Linear(self.embed_dim, num_classes)

    def _init_weights(self) -> None:
        for p in self._posemb_params():
            trunc_normal_(p, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _posemb_params(self) -> list[nn.Parameter]:
        return [self.pos_embed] if self.config.posemb == "learn" else [self.pos_embed_h, self.pos_embed_w]

    # ---- schemes ---------------------------------------------------------------------------------
    def scheme(self, patch_size: int | PatchScheme | None = None, stride: int | None = None) -> PatchScheme:
        """The scheme for a call: ``None`` means the configured default."""
        if isinstance(patch_size, PatchScheme):
            if stride is not None and stride != patch_size.stride:
                raise ValueError(f"stride {stride} given with a PatchScheme of stride {patch_size.stride}")
            return patch_size
        if patch_size is None:
            patch_size = self.config.patch_size
            stride = self.config.stride if stride is None else stride
        return PatchScheme(int(patch_size), stride)

    def posemb_grid(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The position embedding resampled to ``grid_hw`` tokens: ``(1, gh, gw, D)``."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._resample_posemb(grid_hw)
        params = self._posemb_params()
        key = tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in params)
        hit = self._posemb_cache.get(grid_hw)
        if hit is None or hit[0] != key:
            hit = (key, self._resample_posemb(grid_hw))
            self._posemb_cache[grid_hw] = hit
        return hit[1]

    def _resample_posemb(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        aa = self.config.posemb_antialias
        if self.config.posemb == "learn":
            return resample_posemb(self.pos_embed, grid_hw, antialias=aa)
        gh, gw = grid_hw
        rows = resample_posemb(self.pos_embed_h, (gh, 1), antialias=aa)  # (1, gh, 1, D)
        cols = resample_posemb(self.pos_embed_w, (1, gw), antialias=aa)  # (1, 1, gw, D)
        return rows + cols  # (1, gh, gw, D)

    # ---- forward ---------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor, scheme: PatchScheme) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens entering the blocks ``(B, prefix + gh*gw, D)`` and the token grid ``(gh, gw)``."""
        tokens = self.patch_embed(x, scheme)  # (B, gh, gw, D)
        b, gh, gw, _ = tokens.shape
        if self.config.norm != "layernorm":  # the norms' statistics depend on the patch size and token grid
            set_token_grid(self, scheme.patch, (gh, gw))
        tokens = (tokens + self.posemb_grid((gh, gw))).flatten(1, 2)  # (B, N, D); per step, so not einops
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)  # (B, 1 + N, D)
        return self.norm_pre(self.pos_drop(tokens)), (gh, gw)

    def forward_features(
        self, x: torch.Tensor, patch_size: int | PatchScheme | None = None, stride: int | None = None
    ) -> torch.Tensor:
        """Tokens after the final norm: ``(B, prefix + gh*gw, D)``."""
        tokens, _ = self._embed(x, self.scheme(patch_size, stride))
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        if isinstance(self.blocks, GraphBlocks):
            tokens = self.blocks(tokens, checkpointing=use_ckpt)
        elif use_ckpt:
            tokens = checkpoint_seq(self.blocks, tokens)
        else:
            tokens = self.blocks(tokens)
        return self.norm(tokens)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        *,
        patch_size: int | PatchScheme | None = None,
        stride: int | None = None,
    ) -> Intermediates | tuple[torch.Tensor, Intermediates]:
        """Block outputs as timm's ``VisionTransformer.forward_intermediates`` gives them, at any scheme.

        ``indices``: the last n blocks (int), every block (None) or these blocks (negative from the end).
        ``norm`` applies the final norm to each; ``output_fmt`` is ``NCHW`` ``(B, D, gh, gw)`` or ``NLC``
        ``(B, gh*gw, D)`` (patch tokens only; ``return_prefix_tokens`` pairs each with its ``(B, 1, D)``
        class token). Returns ``(forward_features(x), intermediates)``, or the list alone with
        ``intermediates_only``; ``stop_early`` skips the blocks after the last one taken.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        tokens, (gh, gw) = self._embed(x, self.scheme(patch_size, stride))
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        if isinstance(self.blocks, GraphBlocks):  # block i's output is node i + 1's; the last node's is final
            nodes = self.blocks.nodes(tokens, last=last + 1 if stop_early or intermediates_only else None,
                                      checkpointing=use_ckpt)
            tokens, taken = nodes[-1], [self.norm(nodes[i + 1]) if norm else nodes[i + 1] for i in take]
        else:
            blocks = self.blocks[: last + 1] if stop_early or intermediates_only else self.blocks
            taken = []
            for i, block in enumerate(blocks):
                tokens = checkpoint(block, tokens) if use_ckpt else block(tokens)
                if i in take:
                    taken.append(self.norm(tokens) if norm else tokens)
        n = self.num_prefix_tokens
        spatial = [t[:, n:] for t in taken]  # (B, gh*gw, D) each
        if output_fmt == "NCHW":
            spatial = [rearrange(t, "b (h w) d -> b d h w", h=gh, w=gw).contiguous() for t in spatial]
        out: Intermediates = list(zip(spatial, [t[:, :n] for t in taken])) if return_prefix_tokens and n else spatial
        return out if intermediates_only else (self.norm(tokens), out)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens of ``forward_features`` and apply the classifier (a proxy head also sees the patch
        tokens)."""
        pooled = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)  # (B, D)
        pooled = self.head_drop(self.fc_norm(pooled))
        if pre_logits:
            return pooled
        if isinstance(self.head, ProxyHead):
            return self.head(pooled, x[:, self.num_prefix_tokens :])  # patch tokens (B, N, D)
        return self.head(pooled)

    def forward(
        self, x: torch.Tensor, patch_size: int | PatchScheme | None = None, stride: int | None = None
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, patch_size, stride))

    def forward_packed(self, images: torch.Tensor | Sequence[torch.Tensor], patch_sizes: Sequence[int],
                       **kwargs: Any) -> torch.Tensor:
        """Logits ``(n_images, classes)``, each image at its own patch size, packed in token rows (flexivit.packed)."""
        return forward_packed(self, images, patch_sizes, **kwargs)

    def kernel_rank(self, patch_size: int) -> int:
        """Rank of the patch-embedding kernel at ``patch_size`` as a ``(D, C*p*p)`` matrix: how many
        independent directions of a patch the tokens can see, at most ``min(D, C*p*p, C*base**2)``."""
        return self.patch_embed.kernel_rank(patch_size)

    # ---- timm-style helpers ----------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head for ``num_classes`` outputs (0 removes it), e.g. before fine-tuning."""
        self.num_classes = num_classes
        self.config = FlexiViTConfig.from_dict({**self.config.to_dict(), "num_classes": num_classes})
        self.pretrained_cfg["num_classes"] = num_classes
        old = self.head
        self.head = self._new_head(num_classes)
        if isinstance(self.head, ProxyHead) and isinstance(old, ProxyHead):
            ref = next(old.parameters())
            self.head.to(device=ref.device, dtype=ref.dtype)
        if isinstance(self.head, nn.Linear):
            if isinstance(old, nn.Linear):
                self.head.to(device=old.weight.device, dtype=old.weight.dtype)
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            if self.config.scale_invariant != "none":
                convert_layers(self, scope="head", norm=self.config.si_norm, head_scale=self.config.si_head_scale)
            if self.config.lutq_k is not None and self.config.lutq_scope == "blocks+head":
                self.head = LutqLinear.from_linear(self.head, k=self.config.lutq_k, pow2=self.config.lutq_pow2,
                                                   name="head.weight")

    def make_scale_invariant(self, scope: str, *, norm: str = "matrix", head_scale: float | None = None) -> "FlexiViT":
        """Reparametrise this plain model in place (``flexivit.scale_invariant``): the layers in ``scope``
        (``head``, ``linears`` or ``all``) compute ``S * W / ||W||`` with ``S`` their norm now, so the model
        computes what it did, but for the head when ``head_scale`` sets its ``S``. Returns the model."""
        if self.config.scale_invariant != "none":
            raise ValueError(f"the model is scale-invariant already ({self.config.scale_invariant}); build a "
                             "plain one from fold_state_dict(model) first")
        config = FlexiViTConfig.from_dict({**self.config.to_dict(), "scale_invariant": scope, "si_norm": norm,
                                           "si_head_scale": head_scale})
        convert_layers(self, scope=scope, norm=norm, head_scale=head_scale)
        self.config = config
        return self

    def make_lutq(self, k: int, *, scope: str = "blocks", pow2: bool = False) -> "FlexiViT":
        """Tie this plain model's weights in place (``flexivit.lutq``, training form): each Linear in ``scope``
        (``blocks`` or ``blocks+head``) computes with ``k`` shared values (powers of two with ``pow2``),
        fitted by k-means to its weights now (post-hoc clustering). Returns the model."""
        fields = {"lutq_k": k, "lutq_scope": scope, "lutq_pow2": pow2}
        config = FlexiViTConfig.from_dict({**self.config.to_dict(), **fields})
        apply_lutq(self, k=k, scope=scope, pow2=pow2)
        self.config = config
        return self

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters timm's optimizer factory keeps out of weight decay (as timm's ViT)."""
        names = {"cls_token", "pos_embed", "pos_embed_h", "pos_embed_w"}
        return {n for n, _ in self.named_parameters() if n in names}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise learning-rate decay, as timm's ``VisionTransformer``:
        the stem, then one group per block (the final norm joins the last), then the head."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed|norm_pre",  # pos_embed also matches pos_embed_h/_w
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        if enable and self.config.norm != "layernorm":
            raise ValueError("gradient checkpointing recomputes each block in the backward pass, which would update the "
                             f"running statistics of the {self.config.norm} norms twice per step; set "
                             "train.grad_checkpointing=false, or use model.norm=layernorm")
        self.grad_checkpointing = enable

    # ---- interop (the conversions live in flexivit.timm_interop) -------------------------------
    @classmethod
    def from_timm(
        cls,
        model_or_state_dict: nn.Module | dict[str, torch.Tensor],
        base_patch_size: int | None = None,
        base_grid: int | None = None,
        **overrides: Any,
    ) -> "FlexiViT":
        """A FlexiViT with the weights of a timm ``VisionTransformer`` (or its state_dict).

        By default the timm kernel and position grid become the base kernel and base grid unchanged, so
        the FlexiViT at the timm patch size reproduces the timm model's logits. ``base_patch_size`` /
        ``base_grid`` move them to another base (PI-resize / bilinear), which changes the model at its
        own size: resize round trips are lossy. ``overrides`` set other config fields (for a state_dict,
        ``num_heads`` defaults to ``embed_dim // 64`` and ``global_pool`` to what the keys suggest).
        """
        config, state = timm_to_flexivit(
            model_or_state_dict, base_patch_size=base_patch_size, base_grid=base_grid, **overrides
        )
        model = cls(config)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                "timm weights do not match the FlexiViT built from them: "
                f"missing {result.missing_keys}, unexpected {result.unexpected_keys}"
            )
        return model

    def non_plain_parts(self) -> list[str]:
        """What this model has that timm's ``VisionTransformer`` cannot hold (empty for a plain ViT, which
        ``to_fixed`` bakes; other models export through ONNX / ``torch.export``, ``flexivit.export``)."""
        cfg = self.config
        parts = [f"bridges {', '.join(cfg.bridges)}"] if cfg.bridges else []
        parts += [f"a block graph ({cfg.graph})"] if cfg.graph is not None else []
        parts += [f"batch-statistics norms ({cfg.norm})"] if cfg.norm != "layernorm" else []
        return parts + ([f"a class-proxy head ({cfg.proxy_local} local proxies per class)"] if cfg.head == "proxies"
                        else [])

    def is_plain_vit(self) -> bool:
        """Whether ``to_fixed`` can bake this model into a plain timm ``VisionTransformer``."""
        return not self.non_plain_parts()

    def to_fixed(self, patch_size: int | None = None, *, img_size: int | None = None) -> nn.Module:
        """A plain timm ``VisionTransformer`` at ``patch_size`` whose outputs equal this model's there."""
        cfg = self.config
        if not self.is_plain_vit():
            raise ValueError(f"this model has {' and '.join(self.non_plain_parts())}, which timm's VisionTransformer "
                             "cannot hold, so to_fixed cannot bake it; export it with `flexivit export --onnx` or "
                             "`--torch-export` instead")
        if patch_size is None:
            patch_size = cfg.patch_size
            if cfg.stride is not None and cfg.stride != cfg.patch_size:
                raise ValueError("to_fixed cannot bake an overlapping scheme (stride < patch) into a timm ViT")
        img_size = img_size or cfg.img_size
        grid = PatchScheme(int(patch_size)).grid_size((img_size, img_size))
        with torch.no_grad():
            kernel = pi_resize(self.patch_embed.base_kernel(), int(patch_size), cfg.kernel_resize)  # (D, C, p, p)
            pos_embed = self._resample_posemb(grid)  # (1, gh, gw, D)
        # Scale-invariant and LUT-Q layers fold into the plain weights they compute with: the export is a plain ViT.
        state = fold_lutq(self, fold_state_dict(self))
        vit = flexivit_to_timm(cfg, state, kernel=kernel, pos_embed=pos_embed, img_size=img_size)
        return vit.train(self.training)
