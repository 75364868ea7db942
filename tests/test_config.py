"""Recipes, typed overrides, and the saved config round trip."""

import json

import pytest

from flexivit.train.config import Config, ConfigError, apply_overrides, config_from_dict, list_recipes, load_recipe


def test_recipes_load_and_smoke_shrinks():
    assert "fashion_mnist" in list_recipes()
    full, smoke = load_recipe("fashion_mnist"), load_recipe("fashion_mnist:smoke")
    assert smoke.train.steps < full.train.steps


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), [
        "optim.lr=3e-4", "train.steps=7", "patch.sizes=2,4", "data.channels=3", "data.randaugment=none",
        "model.kernel_resize=area", "data.scale=0.5,1", "optim.clip_grad=none", "patch.weights=[1, 2.5]",
    ])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.patch.sizes == [2, 4]
    assert cfg.data.channels == 3 and cfg.data.randaugment is None and cfg.model.kernel_resize == "area"
    assert cfg.data.scale == (0.5, 1.0) and cfg.optim.clip_grad is None and cfg.patch.weights == [1.0, 2.5]


@pytest.mark.parametrize(
    "override,error,match",
    [
        ("optim.lrr=1", ConfigError, "did you mean optim.lr"),
        ("optimm.lr=1", ConfigError, "did you mean optim"),
        ("train.steps=1.5", ConfigError, "expected an integer"),
        ("train.steps=true", ConfigError, "expected an integer"),
        ("model.posemb_antialias=maybe", ConfigError, "true/false"),
        ("data.scale=1", ConfigError, "expected 2 values"),
        ("optim.lr", ValueError, "section.key=value"),
        ("optim.lr.x=1", ConfigError, "unknown config key"),
    ],
)
def test_bad_overrides(override, error, match):
    with pytest.raises(error, match=match):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize("flag,method", [(True, "bilinear_aa"), (False, "bilinear"), (None, None)])
def test_configs_saved_with_kernel_antialias_still_load(flag, method):
    saved = Config().to_dict()
    del saved["model"]["kernel_resize"]
    saved["model"]["kernel_antialias"] = flag
    assert config_from_dict(Config, saved).model.kernel_resize == method


def test_saved_config_round_trips(tmp_path):
    cfg = apply_overrides(load_recipe("fashion_mnist"), ["patch.distribution=curriculum",
                          'patch.curriculum=[{"until": 10, "distribution": "gaussian", "center": 4, "width": 1}]'])
    cfg.save(tmp_path / "config.json")
    loaded = config_from_dict(Config, json.loads((tmp_path / "config.json").read_text()))
    assert loaded == cfg
    assert loaded.patch.curriculum[0].center == 4.0


def test_recipe_errors(tmp_path):
    with pytest.raises(ValueError, match="did you mean fashion_mnist"):
        load_recipe("fashion_mnst")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg):\n    return {}\n")
    with pytest.raises(ConfigError, match="must return flexivit.train.config.Config"):
        load_recipe(str(bad))
    with pytest.raises(FileNotFoundError):
        load_recipe(str(tmp_path / "missing.py"))
