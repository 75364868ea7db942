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
from pathlib import Path
from typing import Any, Sequence

import torch
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from timm.layers import trunc_normal_
from timm.models import checkpoint, checkpoint_seq
from timm.models._features import feature_take_indices  # timm's own index rule for forward_intermediates
from timm.models.vision_transformer import Block
from torch import nn

from flexivit.model.config import FlexiViTConfig
from flexivit.model.patch_embed import FlexiPatchEmbed, PatchScheme
from flexivit.model.resize import pi_resize, resample_posemb
from flexivit.model.timm_interop import flexivit_to_timm, timm_to_flexivit
from flexivit.model.packed import forward_packed
from flexivit.model.packing import PackPlan

__all__ = ["FlexiViT", "FlexiViTConfig"]

Intermediates = list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]


class FlexiViT(nn.Module, PyTorchModelHubMixin, library_name="flexivit", paper_url="https://arxiv.org/abs/2212.08013",
               pipeline_tag="image-classification", tags=["image-classification", "vision-transformer", "flexivit"]):
    """A ViT whose ``forward(x, patch_size, stride)`` accepts any patch scheme that tiles the image.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` come from huggingface_hub's mixin with the
    FlexiViT parts in ``flexivit.model.hub``; ``from_big_vision`` reads the official weights (``flexivit.model.big_vision``).
    """

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
                act_layer=nn.GELU if cfg.act_layer == "gelu" else partial(nn.GELU, approximate="tanh"),
            )
            for i in range(cfg.depth)
        ]
        active = cfg.active()  # the options that are on (flexivit.model.options), in hook order
        wired: list[nn.Module] | nn.Module = blocks
        for option, values in active:  # an option may change the blocks, or wire them into its own container
            wired = option.build_blocks(values, cfg, wired)
        self.blocks = nn.Sequential(*wired) if isinstance(wired, list) else wired
        self.norm = norm_layer(dim) if cfg.final_norm and not cfg.use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(dim) if cfg.final_norm and cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = self._new_head(cfg.num_classes)
        for option, values in active:
            option.build(values, self)
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
        for option, values in active:
            option.finish(values, self)

    def _new_head(self, num_classes: int) -> nn.Module:
        """The classifier for ``num_classes`` outputs: ``nn.Linear``, or an option's own head."""
        if num_classes <= 0:
            return nn.Identity()
        for option, values in self.config.active():
            head = option.new_head(values, self.config, num_classes)
            if head is not None:
                return head
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
        for option, values in self.config.active():  # e.g. norms whose statistics depend on the token grid
            option.on_grid(values, self, scheme.patch, (gh, gw))
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
        if getattr(self.blocks, "wired", False):  # an option's block container runs (and checkpoints) itself
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
        if getattr(self.blocks, "wired", False):  # block i's output is node i + 1's; the last node's is final
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
        """Pool the tokens of ``forward_features`` and apply the classifier (a head with ``reads_tokens`` also
        sees the patch tokens)."""
        pooled = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)  # (B, D)
        pooled = self.head_drop(self.fc_norm(pooled))
        if pre_logits:
            return pooled
        if getattr(self.head, "reads_tokens", False):
            return self.head(pooled, x[:, self.num_prefix_tokens :])  # patch tokens (B, N, D)
        return self.head(pooled)

    def forward(
        self, x: torch.Tensor, patch_size: int | PatchScheme | PackPlan | None = None, stride: int | None = None
    ) -> torch.Tensor:
        """Logits ``(B, classes)`` at one patch size; with a ``PackPlan`` (a patch size per image, training with
        ``patch.per_image``), image ``i`` runs at ``plan.patch_sizes[i]`` in the plan's rows (``forward_packed``),
        through ``forward`` so that DDP and hooks on the model see the call."""
        if isinstance(patch_size, PackPlan):
            if stride is not None:
                raise ValueError("a PackPlan gives every image's patch size; do not pass a stride with it")
            return forward_packed(self, x, patch_size.patch_sizes, row_tokens=patch_size.row_tokens,
                                  rows=patch_size.rows)
        return self.forward_head(self.forward_features(x, patch_size, stride))

    def forward_packed(self, images: torch.Tensor | Sequence[torch.Tensor], patch_sizes: Sequence[int],
                       **kwargs: Any) -> torch.Tensor:
        """Logits ``(n_images, classes)``, each image at its own patch size, packed in token rows (flexivit.model.packed)."""
        return forward_packed(self, images, patch_sizes, **kwargs)

    def kernel_rank(self, patch_size: int) -> int:
        """Rank of the patch-embedding kernel at ``patch_size`` as a ``(D, C*p*p)`` matrix: how many
        independent directions of a patch the tokens can see, at most ``min(D, C*p*p, C*base**2)``."""
        return self.patch_embed.kernel_rank(patch_size)

    # ---- timm-style helpers ----------------------------------------------------------------------
    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's per-block feature metadata (``features_only``): the width and the default scheme's stride."""
        stride = self.scheme().stride
        return [dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=stride) for i in range(len(self.blocks))]

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head for ``num_classes`` outputs (0 removes it), e.g. before fine-tuning."""
        self.num_classes = num_classes
        self.config = FlexiViTConfig.from_dict({**self.config.to_dict(), "num_classes": num_classes})
        self.pretrained_cfg["num_classes"] = num_classes
        old = self.head
        self.head = self._new_head(num_classes)
        ref = next(old.parameters(), None)
        if ref is not None and type(self.head) is type(old):  # the new head lives where the old one did
            self.head.to(device=ref.device, dtype=ref.dtype)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for option, values in self.config.active():
            option.head_replaced(values, self, old)

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
        refusals = [r for option, values in self.config.active() if (r := option.refuses_grad_checkpointing(values))]
        if enable and refusals:
            raise ValueError(refusals[0])
        self.grad_checkpointing = enable

    # ---- interop (the conversions live in flexivit.model.timm_interop) -------------------------------
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

    # hub.py and big_vision.py build on checkpoint.py, which imports this module: imported when called.
    @classmethod
    def from_big_vision(cls, source: Any, **kwargs: Any) -> "FlexiViT":
        """A FlexiViT holding a big_vision ``.npz`` checkpoint, kernel and grid at their stored size
        (``flexivit.model.big_vision.load_big_vision``: ``prefix=`` and config overrides)."""
        from flexivit.model.big_vision import load_big_vision

        return load_big_vision(source, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "FlexiViT":
        """From a folder written by ``save_pretrained``, a run directory, a model file or a Hub repo id
        (``flexivit.model.hub.load_pretrained``)."""
        from flexivit.model.hub import load_pretrained

        return load_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> str | None:
        """Write a Hub folder (``flexivit.model.hub.save_pretrained``: atomic; ``push_to_hub=True`` also pushes it)."""
        from flexivit.model.hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        from flexivit.model.hub import write_folder  # the mixin's hook

        write_folder(self, save_directory)

    def non_plain_parts(self) -> list[str]:
        """What this model has that timm's ``VisionTransformer`` cannot hold (empty for a plain ViT, which
        ``to_fixed`` bakes; other models export through ONNX / ``torch.export``, ``flexivit.eval.export``)."""
        return [part for option, values in self.config.active() for part in option.non_plain(values)]

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with every option that folds (scale-invariant, tied weights) folded into the plain
        weights it computes with: what a plain ViT of the same function would hold."""
        state = self.state_dict()
        for option, values in self.config.active():
            state = option.fold(values, self, state)
        return state

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
        state = self.plain_state_dict()
        vit = flexivit_to_timm(cfg, state, kernel=kernel, pos_embed=pos_embed, img_size=img_size)
        return vit.train(self.training)
