"""Scale-invariant layers, fixed-norm updates and the equivalent learning rate (flexivit.ext.scale_invariant)."""

from __future__ import annotations

import copy
import json
import types
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.experiments import search
from flexivit.ext.scale_invariant import SI_NORMS, make_scale_invariant
from flexivit.train.builders import build_model
from flexivit.model.weights import load_model, save_model
from flexivit.train.config import Config, ConfigError, apply_overrides, load_recipe, recipe_search_grid
from flexivit.eval.export import export_model, load_export
from flexivit.train.finetune import from_pretrained
from flexivit.train.optim import build_optimizer
from flexivit.model.patch_embed import valid_patch_sizes
from flexivit.train.assemble import RESUMABLE_CHANGES, config_changes
from flexivit.ext.scale_invariant import (
    SI_BUFFER, fold_state_dict, option_hooks, scale_invariant_layers, unit_norms,
)
from tiny_run import make_run, subprocess_env

SMALL = FlexiViTConfig(img_size=16, patch_size=4, base_patch_size=8, base_grid=4, in_chans=1, num_classes=6,
                       embed_dim=32, depth=1, num_heads=2, class_token=False, global_pool="avg")
SIZES = valid_patch_sizes(16)  # 1, 2, 4, 8, 16: every size, untrained ones included
SCOPES = ("head", "linears", "all")
LINEARS = {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
           "blocks.0.mlp.fc2.weight", "head.weight"}
IN_SCOPE = {"head": {"head.weight"}, "linears": LINEARS, "all": LINEARS | {"patch_embed.weight"}}


def _model(scope: str = "none", norm: str = "matrix", dtype: torch.dtype = torch.float64, **fields) -> FlexiViT:
    torch.manual_seed(0)
    return FlexiViT(replace(SMALL, scale_invariant=scope, si_norm=norm, **fields)).to(dtype)


def _cfg(*sets: str) -> Config:
    return apply_overrides(Config(), ["optim.warmup_steps=0", "optim.clip_grad=none", *sets])


def _batches(n: int, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 16, 16, generator=g, dtype=dtype), torch.randint(0, 6, (8,), generator=g), (2, 4, 8)[i % 3])
            for i in range(n)]


def _direction(w: torch.Tensor, norm: str) -> torch.Tensor:
    return w / unit_norms(w, norm)


def _flat(w: torch.Tensor, norm: str) -> torch.Tensor:
    """The vectors that are normalised: the whole tensor ``(1, n)`` or its rows ``(rows, n / rows)``."""
    return w.reshape(1, -1) if norm == "matrix" else w.flatten(1)


def _scaled_copy(model: FlexiViT, factor: float, per_row: bool = False, names: set[str] | None = None) -> FlexiViT:
    """``model`` with every scale-invariant weight (or ``names``) times ``factor`` (and a random positive
    factor per row)."""
    scaled = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in scale_invariant_layers(scaled) if names is None else names:
            w = scaled.get_parameter(name)
            rows = torch.rand(w.shape[0], *[1] * (w.ndim - 1), generator=g, dtype=w.dtype) * 9 + 1 if per_row else 1
            w.mul_(factor * rows)
    return scaled


def _train(model: FlexiViT, cfg: Config, steps: int) -> None:
    """``steps`` optimizer steps as the trainer takes them: step, schedule, post-step hooks."""
    optimizer, scheduler = build_optimizer(cfg, model)
    hooks = option_hooks(cfg, model, say=lambda _: None)
    model.train()
    for step, (x, y, patch) in enumerate(_batches(steps), 1):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, patch), y).backward()
        optimizer.step()
        scheduler.step_update(step)
        for hook in hooks:
            hook.after_step(model, step)


# ---- the layers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", SI_NORMS)
@pytest.mark.parametrize("scope", SCOPES)
def test_logits_do_not_depend_on_the_norm_of_scale_invariant_weights(scope, norm):
    model = _model(scope, norm).eval()
    assert set(scale_invariant_layers(model)) == IN_SCOPE[scope]
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        before = {p: model(x, p) for p in SIZES}
        for c in (1e-3, 1.0, 1e3):
            scaled = _scaled_copy(model, c, per_row=norm == "row")
            for p in SIZES:
                torch.testing.assert_close(scaled(x, p), before[p], rtol=1e-10, atol=1e-12)
        plain = FlexiViT(replace(SMALL)).double().eval()  # the same tensors scaled in a plain model do matter
        plain.load_state_dict(fold_state_dict(model))
        assert not torch.allclose(_scaled_copy(plain, 3.0, names=IN_SCOPE[scope])(x, 4), before[4], rtol=1e-3)


@pytest.mark.parametrize("norm", SI_NORMS)
@pytest.mark.parametrize("scope", SCOPES)
def test_gradient_is_orthogonal_to_each_scale_invariant_weight(scope, norm):
    model = _model(scope, norm).train()
    x, y = torch.randn(4, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for p in SIZES:
        model.zero_grad()
        F.cross_entropy(model(x, p), y).backward()
        for name, layer in scale_invariant_layers(model).items():
            cos = F.cosine_similarity(_flat(layer.weight.detach(), norm), _flat(layer.weight.grad, norm), dim=1)
            assert layer.weight.grad.norm() > 0 and cos.abs().max() < 1e-10, (name, p)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> FlexiViT:
    model, _ = load_model(make_run(tmp_path_factory.getbasetemp()))
    return model.eval()


@pytest.mark.parametrize("norm", SI_NORMS)
@pytest.mark.parametrize("scope", SCOPES)
def test_converting_a_trained_model_keeps_its_logits(trained, scope, norm):
    x = torch.randn(5, 1, 16, 16)
    converted = make_scale_invariant(copy.deepcopy(trained), scope, norm=norm)
    assert converted.config.scale_invariant == scope and set(scale_invariant_layers(converted)) == IN_SCOPE[scope]
    with torch.no_grad():
        for p in SIZES:
            torch.testing.assert_close(converted(x, p), trained(x, p), rtol=1e-5, atol=1e-5)
    if norm == "row":  # every row of a converted weight has the same norm: one rate turns them all alike
        for layer in scale_invariant_layers(converted).values():
            rows = unit_norms(layer.weight.detach(), "row").flatten()
            torch.testing.assert_close(rows, rows.mean().expand_as(rows))


def test_the_head_scale_sets_the_logit_scale(trained):
    model = make_scale_invariant(copy.deepcopy(trained), "head", norm="row", head_scale=3.0)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        features = trained.forward_head(trained.forward_features(x, 4), pre_logits=True)
        w = trained.head.weight
        want = F.linear(features, 3.0 * w / w.norm(dim=1, keepdim=True), trained.head.bias)  # cosine head
        torch.testing.assert_close(model(x, 4), want, rtol=1e-5, atol=1e-5)


def test_plain_models_are_as_before():
    model = FlexiViT(SMALL)
    assert not any(SI_BUFFER in k for k in model.state_dict()) and not scale_invariant_layers(model)
    assert not {"scale_invariant", "si_norm", "si_head_scale"} & set(SMALL.to_dict())
    si = replace(SMALL, scale_invariant="all", si_norm="row", si_head_scale=2.0)
    assert FlexiViTConfig.from_dict(si.to_dict()) == si


def test_a_scale_invariant_model_file_reloads_as_saved(tmp_path):
    model = _scaled_copy(_model("all", "row", dtype=torch.float32, si_head_scale=2.0), 5.0).eval()
    save_model(model, tmp_path / "m", class_names=[str(i) for i in range(6)], preprocess={})
    loaded, _ = load_model(tmp_path / "m")
    x = torch.randn(2, 1, 16, 16)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, 2), model(x, 2))


@pytest.mark.parametrize("scope,norm", [("head", "row"), ("linears", "matrix"), ("all", "row")])
def test_folded_export_is_a_plain_vit_with_the_same_logits(scope, norm, tmp_path):
    model = _scaled_copy(_model(scope, norm, dtype=torch.float32, si_head_scale=4.0), 7.0)  # S != ||W|| now
    export_model(model, {"class_names": [str(i) for i in range(6)]}, 4, tmp_path / "e")  # checks logits itself
    vit, config = load_export(tmp_path / "e")
    assert not any(SI_BUFFER in k for k in vit.state_dict())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), model.eval()(x, 4), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.to_fixed(8).eval()(x), model(x, 8), rtol=1e-5, atol=1e-5)


def test_finetune_reparametrises_the_checkpoint_and_keeps_its_features():
    pretrained = _model(dtype=torch.float32).eval()
    x = torch.randn(3, 1, 16, 16)

    def features(m: FlexiViT, p: int) -> torch.Tensor:
        return m.forward_head(m.forward_features(x, p), pre_logits=True)

    fresh = FlexiViT(replace(SMALL, num_classes=3, scale_invariant="all", si_head_scale=2.0))
    model = from_pretrained(pretrained, fresh).eval()
    assert (model.config.scale_invariant, model.config.num_classes) == ("all", 3)
    assert set(scale_invariant_layers(model)) == IN_SCOPE["all"] and float(model.head.si_scale) == 2.0
    back = from_pretrained(model, FlexiViT(replace(SMALL, num_classes=3))).eval()  # a plain fine-tune folds it
    assert back.config.scale_invariant == "none" and not scale_invariant_layers(back)
    with torch.no_grad():
        for p in SIZES:
            torch.testing.assert_close(features(model, p), features(pretrained, p), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(features(back, p), features(pretrained, p), rtol=1e-5, atol=1e-5)


# ---- fixed-norm training and the equivalent learning rate ----------------------------------------------
def _angle(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Mean angle between the units (the whole tensor, or each row) of ``a`` and ``b``."""
    cos = F.cosine_similarity(_flat(a, norm), _flat(b, norm), dim=1)
    return torch.arccos(cos.clamp(max=1)).mean()


@pytest.mark.parametrize("norm", SI_NORMS)
def test_fixed_norm_keeps_each_norm_and_leaves_the_rest_to_the_optimizer(norm):
    """Each step equals the base optimizer's step from the same state, then the scale-invariant weights alone
    are scaled back to their starting norms; the hook's metrics read 1 and the angle each weight turned."""
    cfg = _cfg("optim.fixed_norm=true", "optim.lr=0.01")
    model = _model("linears", norm).train()  # the patch kernel stays plain and is decayed
    optimizer, scheduler = build_optimizer(cfg, model)
    said: list[str] = []
    (hook,) = option_hooks(cfg, model, say=said.append)
    assert len(said) == 1 and "weight decay is off on the 5 fixed-norm weights" in said[0]
    layers = scale_invariant_layers(model)
    n0 = {name: unit_norms(layer.weight.detach(), norm).clone() for name, layer in layers.items()}
    drifted = False
    for step, (x, y, patch) in enumerate(_batches(6), 1):
        reference = copy.deepcopy(model)
        ref_optimizer, _ = build_optimizer(cfg, reference)
        ref_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # Adam's step counter is shared
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, patch), y).backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            q.grad = p.grad.clone()
        before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        optimizer.step()
        ref_optimizer.step()
        scheduler.step_update(step)
        hook.after_step(model, step)
        turned = []
        for name, p in model.named_parameters():
            p, q = p.detach(), reference.get_parameter(name).detach()
            if name not in layers:
                assert torch.equal(p, q), name
                continue
            torch.testing.assert_close(unit_norms(p, norm), n0[name], rtol=1e-12, atol=0)
            torch.testing.assert_close(p, q * (n0[name] / unit_norms(q, norm)), rtol=1e-12, atol=1e-15)
            drifted |= not torch.allclose(unit_norms(q, norm), n0[name], rtol=1e-6)
            turned.append(_angle(before[name], p, norm))
        metrics = hook.metrics()
        assert metrics["si_norm_ratio"] == pytest.approx(1.0, abs=1e-12)
        assert metrics["si_rotation"] == pytest.approx(float(torch.stack(turned).mean()), rel=1e-6)
    assert drifted  # the base step did move the norms: the projection was needed
    assert hook.metrics() == {}  # nothing since the last read


# Two models equal but for the norms of their scale-invariant weights (x4) turn them alike at one ELR.
# SGD (Nesterov momentum): the rule makes every step of the x4 model exactly 4x, and scaling by 4 is exact in
# binary floating point, so the runs are identical (tolerance 0). AdamW: its epsilon (1e-8) is added to
# sqrt(v), which is 4x smaller in the x4 model, so elements with tiny gradients step differently (the key
# bias, whose true gradient is zero, differs most): measured after 6 steps, directions within 0.4 % and
# logits within 0.2 % of their largest value; without the ELR rule both differ by ~100 %. Tolerance 1 %.
ELR_TOLERANCE = {"sgd": 0.0, "adamw": 1e-2}


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("norm", SI_NORMS)
@pytest.mark.parametrize("opt", sorted(ELR_TOLERANCE))
def test_the_norm_does_not_matter_at_one_equivalent_learning_rate(opt, norm):
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    tol = ELR_TOLERANCE[opt]
    base = _model("all", norm)
    for elr in ["optim.elr=0.02"], []:
        a, b = copy.deepcopy(base), _scaled_copy(base, 4.0)
        for model in (a, b):
            _train(model, _cfg(f"optim.opt={opt}", "optim.fixed_norm=true", "optim.lr=0.01", *elr), steps=6)
        layers = scale_invariant_layers(a)
        gaps = {}
        for name, p in a.named_parameters():
            p, q = p.detach(), b.get_parameter(name).detach()
            if name in layers:
                torch.testing.assert_close(unit_norms(q, norm), 4 * unit_norms(p, norm), rtol=1e-12, atol=0)
                gaps[name] = _relative_gap(_direction(p, norm), _direction(q, norm))
            elif opt == "sgd":
                gaps[name] = _relative_gap(p, q)
        with torch.no_grad():
            gaps |= {f"logits p={p}": _relative_gap(a.eval()(x, p), b.eval()(x, p)) for p in SIZES}
        if elr:
            assert max(gaps.values()) <= tol, {k: v for k, v in gaps.items() if v > tol}
        else:  # at one plain learning rate the x4 weights turn far less, and the models part
            assert max(gaps[k] for k in layers) > 0.1


def test_weight_decay_is_inert_on_fixed_norm_weights():
    weights = {}
    for decay in (0.0, 0.3):
        model = _model("all")
        layers = scale_invariant_layers(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name in layers)  # only the fixed-norm weights train
        _train(model, _cfg("optim.fixed_norm=true", "optim.elr=0.02", f"optim.weight_decay={decay}"), steps=5)
        weights[decay] = {name: layer.weight.detach() for name, layer in layers.items()}
    for name, w in weights[0.0].items():
        assert torch.equal(weights[0.3][name], w), name
    model = _model("head")
    optimizer, _ = build_optimizer(_cfg("optim.fixed_norm=true", "optim.weight_decay=0.3"), model)
    decay = {name: g["weight_decay"] for g in optimizer.param_groups for name, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert decay["head.weight"] == 0.0 and decay["blocks.0.mlp.fc1.weight"] == 0.3


def test_elr_sets_each_rate_from_the_norm_and_size():
    """Adam-type: lr = elr * ||W0|| / sqrt(numel); SGD-type: lr = elr * ||W0||^2 (row mode: per row)."""
    for opt, norm in (("adamw", "matrix"), ("sgd", "matrix"), ("sgd", "row")):
        model = _model("all", norm)
        cfg = _cfg(f"optim.opt={opt}", "optim.fixed_norm=true", "optim.elr=0.05", "optim.lr=0.01")
        optimizer, _ = build_optimizer(cfg, model)
        rates = {name: g["lr"] for g in optimizer.param_groups for name, p in model.named_parameters()
                 if any(p is q for q in g["params"])}
        for name, layer in scale_invariant_layers(model).items():
            w = layer.weight.detach()
            rows = w.shape[0] if norm == "row" else 1
            want = 0.05 * (w.norm() / math.sqrt(w.numel()) if opt == "adamw" else w.norm() ** 2 / rows)
            assert rates[name] == pytest.approx(float(want), rel=1e-9), (opt, norm, name)
        assert rates["patch_embed.bias"] == pytest.approx(0.01) and rates["pos_embed"] == pytest.approx(0.01)


# ---- bad inputs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope,sets,message", [
    ("none", ["optim.fixed_norm=true"], "set model.scale_invariant"),
    ("all", ["optim.elr=0.01"], "set optim.fixed_norm=true as well"),
    ("all", ["optim.fixed_norm=true", "optim.elr=0"], "optim.elr must be a positive number"),
    ("all", ["optim.fixed_norm=true", "optim.elr=-1"], "optim.elr must be a positive number"),
    ("all", ["optim.fixed_norm=true", "optim.elr=0.01", "optim.opt=lamb"], "no rule for optimizer 'lamb'"),
])
def test_bad_options_are_refused(scope, sets, message):
    model = FlexiViT(replace(SMALL, scale_invariant=scope))
    for build in (build_optimizer, option_hooks):
        with pytest.raises(ValueError, match=message):
            build(_cfg(*sets), model)


@pytest.mark.parametrize("sets,message", [
    (["model.scale_invariant=heads"], "unknown scale_invariant scope 'heads'; choose one of none, head"),
    (["model.scale_invariant=all", "model.si_norm=column"], "unknown si_norm 'column'; choose one of matrix, row"),
    (["model.si_norm=row"], "apply to scale-invariant layers only"),
    (["model.scale_invariant=head", "model.si_head_scale=0"], "si_head_scale must be positive"),
])
def test_bad_model_options_are_refused(sets, message):
    with pytest.raises(ValueError, match=message):
        build_model(load_recipe("fashion_mnist:smoke", sets), channels=1, num_classes=10)


@pytest.mark.parametrize("norm", SI_NORMS)
def test_a_zero_scale_invariant_weight_is_named(norm):
    model = _model("linears", norm)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[3].zero_()
        if norm == "matrix":
            model.blocks[0].mlp.fc1.weight.zero_()
    for build in (build_optimizer, option_hooks):
        with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight has zero norm" + (r" \(rows \[3\]\)" if norm == "row" else "")):
            build(_cfg("optim.fixed_norm=true"), model)
    plain = _model()
    with torch.no_grad():
        plain.head.weight.zero_()
    with pytest.raises(ValueError, match="head.weight has zero norm when made scale-invariant"):
        make_scale_invariant(plain, "head")


def test_other_misuse_is_refused():
    model = _model("all")
    with pytest.raises(ValueError, match="does not run under FSDP"):
        option_hooks(_cfg("optim.fixed_norm=true"), model, sharded=True)
    with pytest.raises(ValueError, match="scale-invariant already"):
        make_scale_invariant(model, "head")
    (hook,) = option_hooks(_cfg("optim.fixed_norm=true"), _model("head"), say=lambda _: None)
    with pytest.raises(ValueError, match="resume with the options that made it"):
        hook.load_state_dict({"n0.blocks.0.mlp.fc1.weight": torch.ones(())})


def test_resuming_with_these_options_changed_is_refused():
    saved = Config().to_dict()
    now = load_recipe("fashion_mnist_fixednorm").to_dict()
    changed = config_changes(saved, now)
    for key in ("model.scale_invariant", "model.si_norm", "model.si_head_scale", "optim.fixed_norm", "optim.elr"):
        assert key in changed and key not in RESUMABLE_CHANGES


# ---- the recipe and its search grid ---------------------------------------------------------------------
def test_search_without_a_grid_runs_the_recipes_grid(tmp_path, monkeypatch):
    assert recipe_search_grid("fashion_mnist_fixednorm:smoke") == ["optim.elr=0.001,0.003,0.01,0.03,0.1"]
    assert recipe_search_grid("fashion_mnist") == []

    def fake_record(trial, run):  # a validation score that grows with the ELR: the largest must win
        elr = float(dict(trial.values)["optim.elr"])
        return {"trial": trial.name, "setting": trial.setting, "values": dict(trial.values), "seed": trial.seed,
                "val": {"7": elr}, "train_seconds": 1.0, "images_seen": 1}

    class FakeStudy:  # every planned trial "finishes" without training
        def __init__(self, *args, **kwargs):
            pass

        def run_all(self, specs, *, on_done, strict):
            for spec in specs:
                on_done(types.SimpleNamespace(ok=True, name=spec.name))

    monkeypatch.setattr(search, "check_data", lambda *_: None)
    monkeypatch.setattr(search, "_trial_record", fake_record)
    monkeypatch.setattr(search, "Study", FakeStudy)
    said: list[str] = []
    best = search.run_search(recipe="fashion_mnist_fixednorm", grid_specs=[], seeds=[0], steps=2, metric="worst",
                             jobs=1, out=tmp_path, say=said.append)
    assert best["trials"] == 5 and best["values"] == {"optim.elr": "0.1"}
    assert "SEARCH_GRID" in said[0] and json.loads((tmp_path / "best.json").read_text())["trials"] == 5


def test_a_malformed_search_grid_is_a_clear_error(tmp_path):
    recipe = tmp_path / "bad.py"
    recipe.write_text("from flexivit.train.config import Config\nSEARCH_GRID = 'optim.lr=1e-3'\n"
                      "def get_config(arg=None):\n    return Config()\n")
    with pytest.raises(ConfigError, match="SEARCH_GRID must be a list of 'KEY=V1,V2,...' strings"):
        recipe_search_grid(str(recipe))


# ---- end to end -----------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
FIXED = ["model.scale_invariant=all", "optim.fixed_norm=true", "optim.elr=0.01"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**subprocess_env(), "PYTHONPATH": str(ROOT)})


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical_with_fixed_norms(tmp_path):
    from test_train import PROBE, TINY

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    sets = _sets(TINY + FIXED)
    assert _run([str(PROBE), str(straight), *sets]).returncode == 0
    assert _run([str(PROBE), str(killed), "--kill-after", "6", *sets]).returncode == -9
    changed = _run([str(PROBE), str(killed), "--resume", *sets, "--set", "optim.elr=0.02"])
    assert changed.returncode != 0 and "optim.elr: 0.01 -> 0.02" in changed.stderr
    resumed = _run([str(PROBE), str(killed), "--resume", *sets])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith(SI_BUFFER) for k in a)
    for name in a:
        assert a[name].equal(b[name]), f"{name} differs after kill + resume"
    n0 = load_file(str(killed / "state" / "step_12" / "hooks.safetensors"))
    model, _ = load_model(killed)
    for name, layer in scale_invariant_layers(model).items():
        torch.testing.assert_close(unit_norms(layer.weight.detach(), "matrix"), n0[f"fixed_norm/n0.{name}"])
    logged = [json.loads(l)["hooks"] for l in (killed / "log.jsonl").read_text().splitlines() if "per_patch" in l]
    assert len(logged) == 3 and all(h["si_norm_ratio"] == pytest.approx(1.0, abs=1e-5) and h["si_rotation"] > 0
                                    for h in logged)  # the hook's metrics reach every log line


@pytest.mark.slow
def test_fixed_norm_finetune_of_a_trained_run_exports_a_plain_vit(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "ft"
    sets = ["train.steps=8", "train.checkpoint_every=4", "train.log_every=4", "train.token_budget=0",
            "data.batch_size=32", "data.eval_limit=256"]
    done = _run(["-m", "flexivit", "finetune", str(run), "fashion_mnist_fixednorm:smoke", "--out", str(out), *_sets(sets)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("weight decay is off on the 6 fixed-norm weights") == 1
    model, _ = load_model(out)
    assert (model.config.scale_invariant, model.config.si_head_scale, float(model.head.si_scale)) == ("all", 2.0, 2.0)
    start, _ = load_model(run)
    make_scale_invariant(start, "all")  # the checkpoint's norms are the body's N0
    for name, layer in scale_invariant_layers(model).items():
        if name != "head.weight":
            torch.testing.assert_close(layer.weight.detach().norm(), start.get_parameter(name).detach().norm())
            assert not torch.equal(layer.weight, start.get_parameter(name))  # it trained
    exported = _run(["-m", "flexivit", "export", str(out), "--patch-size", "7", "--out", str(tmp_path / "e")])
    assert exported.returncode == 0, exported.stderr[-3000:]
