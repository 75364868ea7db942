"""The README's Python examples run as written, and compute what their comments say."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)

Run = Callable[[int], dict[str, Any]]


@pytest.fixture(scope="module")
def run() -> Run:
    """Execute block ``index`` once, each in a fresh namespace; return that namespace."""
    done: dict[int, dict[str, Any]] = {}

    def execute(index: int) -> dict[str, Any]:
        if index not in done:
            namespace: dict[str, Any] = {"__name__": f"readme_block_{index + 1}"}
            exec(compile(BLOCKS[index], f"README.md, python block {index + 1}", "exec"), namespace)
            done[index] = namespace
        return done[index]

    return execute


def test_readme_has_python_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, run: Run) -> None:
    run(index)


def test_model_example_computes_what_its_comments_say(run: Run) -> None:
    (index,) = [i for i, block in enumerate(BLOCKS) if "FlexiViT.from_timm" in block]
    block, ns = BLOCKS[index], run(index)
    model, x = ns["model"], ns["x"]
    for name in ("logits_fast", "logits_best"):  # e.g. "model(x, patch_size=48)  # 25 tokens"
        patch, tokens = map(int, re.search(rf"{name} = model\(x, patch_size=(\d+)\) +# (\d+) tokens", block).groups())
        gh, gw = model.scheme(patch).grid_size(tuple(x.shape[-2:]))
        assert gh * gw == tokens
        assert ns[name].shape == (len(x), model.num_classes)
    shape = re.search(r"overlapping tiles: (\(.*\))", block).group(1)  # e.g. "(1, 1 + 29*29, 384)"
    assert tuple(ns["tokens"].shape) == eval(shape, {"__builtins__": {}})  # arithmetic from our own README
    vit, flexi, fixed = ns["vit"].eval(), ns["flexi"].eval(), ns["fixed"].eval()
    with torch.no_grad():
        torch.testing.assert_close(flexi(x, 16), vit(x))  # "flexi(x, 16) equals vit(x)"
        torch.testing.assert_close(fixed(x), flexi(x, 24))  # "at patch 24, same logits"
