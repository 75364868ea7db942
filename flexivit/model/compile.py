"""``torch.compile`` once for every patch size: the token part compiled with dynamic shapes.

A FlexiViT call has two parts. The stem (PI-resize of the base kernel to ``p × p``, a stride-``p``
convolution, the position grid resampled to ``gh × gw``) changes its shapes, and its kernel size, with
every patch size; it is a handful of small ops. The blocks see tokens ``(B, N, D)`` whose ``B`` and ``N``
change with the patch size and the token budget while everything else stays put. So ``compile_model``
compiles the blocks alone, with ``dynamic=True``: ``B`` and ``N`` are symbols from the first call and
one graph serves every patch size and batch. The stem, the final norm and the head stay eager.

Graphs built (dynamo's ``unique_graphs``, counted by ``graph_count``; ``tests/test_compile.py`` and
``tools/bench_compile.py`` measure them on the quickstart sizes): one for training (autograd on),
one for evaluation (``no_grad``, a different grad mode), and one more for batch-1 calls, since dynamo
specialises dimensions of size 1. Training with a patch size per image (``patch.per_image``) runs the
packed trunk instead, compiled with static shapes: one graph for the run's row bucket. Models of the same architecture share their graphs (parameters are
graph inputs), so a baseline of the same dims compiles nothing new.

Compilation is in place (``nn.Module.compile``): parameter names and ``state_dict`` keys stay what they
were (``torch.compile(model)`` would wrap it and prefix every key with ``_orig_mod.``), checkpoints load
either way, and DDP / Accelerate wrap the model as usual. Each block is compiled as well, so the blocks
stay compiled when they are called one by one (gradient checkpointing, ``forward_intermediates``);
inside the trunk's graph those inner compiles are traced through and add nothing.
"""

from __future__ import annotations

from typing import Callable

import torch.fx.experimental._config as fx_config
from torch import nn
from torch._dynamo.utils import counters

__all__ = ["compile_model", "graph_count", "token_trunk"]

Backend = str | Callable


def token_trunk(model: nn.Module) -> nn.Sequential:
    """The ``blocks`` of ``model``: a FlexiViT, a timm ``VisionTransformer``, or a module holding one."""
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.Sequential):
            return blocks
    raise ValueError(
        f"cannot compile a {type(model).__name__}: compile_model needs a ViT whose transformer blocks are an "
        "nn.Sequential named `blocks` (FlexiViT, timm's VisionTransformer); use torch.compile on it directly"
    )


def compile_model(model: nn.Module, *, backend: Backend = "inductor", mode: str | None = None) -> nn.Module:
    """Compile ``model``'s blocks in place with dynamic shapes; returns ``model`` (same object, same keys).

    ``backend`` and ``mode`` are ``torch.compile``'s (e.g. ``mode="max-autotune"`` on a GPU). Nothing is
    compiled until the first call; that call and each new graph (see the module docstring) take seconds
    to minutes, later calls run the compiled code.

    Turns off dynamo's duck sizing for the process: with it, a first call whose batch equals its token
    count (64 images of 64 tokens) ties the two sizes together and the next size builds another graph.
    """
    trunk = token_trunk(model)
    fx_config.use_duck_shape = False
    trunk.compile(backend=backend, mode=mode, dynamic=True)
    for block in trunk:
        block.compile(backend=backend, mode=mode, dynamic=True)
    # The packed forward (a patch size per image) runs the blocks' submodules itself, so it compiles its own
    # trunk with these settings (flexivit.model.packed.run_packed); a plain attribute, not in state_dict.
    model.compile_options = (backend, mode)
    return model


def graph_count() -> int:
    """Graphs dynamo has built in this process so far (take differences around the code to measure)."""
    return int(counters["stats"]["unique_graphs"])
