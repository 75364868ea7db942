"""Every recipe in recipes/ loads with every argument it offers, and builds its patch-size sampler."""

from __future__ import annotations

import re

import pytest

from flexivit.train.builders import build_sampler, schemes_of
from flexivit.train.config import RECIPES_DIR, Config, list_recipes, load_recipe
from flexivit.model.patch_embed import check_patch_sizes

# The arguments each recipe's get_config accepts (None: no argument). A recipe added to recipes/ must be
# listed here, and every `NAME:ARG` its docstring shows must be among them.
ARGUMENTS: dict[str, list[str | None]] = {
    "fashion_mnist": [None, "smoke"],
    "fashion_mnist_compress": [None, "lutq", "bridge", "smoke"],
    "fashion_mnist_distill": [None, "smoke"],
    "fashion_mnist_finetune": [None, "smoke"],
    "fashion_mnist_fixednorm": [None, "smoke"],
    "fashion_mnist_teacher": [None, "smoke"],
    "imagenet": [None, "s", "b", "smoke"],
}
CASES = [(name, arg) for name, args in ARGUMENTS.items() for arg in args]


def test_every_recipe_is_covered() -> None:
    assert sorted(ARGUMENTS) == list_recipes()


@pytest.mark.parametrize("name", sorted(ARGUMENTS))
def test_docstring_arguments_are_accepted(name: str) -> None:
    doc = (RECIPES_DIR / f"{name}.py").read_text()
    shown = set(re.findall(rf"\b{name}:(\w+)", doc))
    assert shown <= set(ARGUMENTS[name]), f"{name}'s docstring shows arguments {shown - set(ARGUMENTS[name])}"


@pytest.mark.parametrize("name,arg", CASES)
def test_recipe_loads_and_builds_its_sampler(name: str, arg: str | None) -> None:
    cfg = load_recipe(f"{name}:{arg}" if arg else name)
    assert isinstance(cfg, Config) and cfg.train.steps > 0
    sampler = build_sampler(cfg)  # checks that every training scheme tiles data.image_size
    assert sorted({s.patch for s in sampler.schemes}) == sorted(set(cfg.patch.sizes))
    image_hw = (cfg.data.image_size, cfg.data.image_size)
    check_patch_sizes(schemes_of(cfg.patch, cfg.patch.eval_sizes or cfg.patch.sizes), image_hw)  # eval sizes too


def test_smoke_arguments_shrink_the_run() -> None:
    for name, args in ARGUMENTS.items():
        if "smoke" in args:
            assert load_recipe(f"{name}:smoke").train.steps < load_recipe(name).train.steps, name


def test_compress_card_arguments_pick_the_parts() -> None:
    parts = {arg: load_recipe(f"fashion_mnist_compress:{arg}" if arg else "fashion_mnist_compress").compress
             for arg in (None, "lutq", "bridge")}
    assert (parts[None].bridges, parts[None].lutq_k) == (["2:4"], 4)
    assert (parts["lutq"].bridges, parts["lutq"].lutq_k) == ([], 4)
    assert (parts["bridge"].bridges, parts["bridge"].lutq_k) == (["2:4"], None)


def test_imagenet_card_arguments_pick_the_model() -> None:
    small, base = load_recipe("imagenet:s"), load_recipe("imagenet:b")
    assert load_recipe("imagenet") == small
    assert (small.model.variant, base.model.variant) == ("flexi_vit_small", "flexi_vit_base")


@pytest.mark.parametrize("name", sorted(ARGUMENTS))
def test_a_bad_argument_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match=r"recipe takes .*got 'no-such-arg'"):
        load_recipe(f"{name}:no-such-arg")
