"""Batch-statistics norms (flexivit.ext.bgn): BatchNorm parity, per-group and per-size statistics, the power-of-two
inference scale, recalibration, save/load, export, defaults and bad inputs."""

import json

import datasets
import pytest
import torch
import torch.nn.functional as F

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.ext.bgn import (BatchGroupNorm, batch_norms, norm_stats_source, recalibrate, set_token_grid,
                          token_regions)
from flexivit.train.builders import build_model
from flexivit.model.weights import load_model, save_model
from flexivit.cli.main import main
from flexivit.train.config import load_recipe
from flexivit.data.sources import from_arrays
from flexivit.eval.evaluate import evaluate_schemes
from flexivit.eval.export import PROGRAM_FORMAT, ExportError, export_model
from flexivit.model.patch_embed import PatchScheme
from tiny_run import CLASSES, PREPROCESS, synthetic

TINY = dict(img_size=16, patch_size=4, base_patch_size=8, base_grid=4, in_chans=1, num_classes=6, embed_dim=16,
            depth=1, num_heads=2)
SIZES = (2, 4, 8)
NORM_KEYS = {"norm", "norm_groups", "norm_regions", "norm_sizes", "pow2_scale"}


def _model(norm: str = "bgn", **kw) -> FlexiViT:
    extra = dict(norm_groups=4, norm_regions=2) if norm == "bgn" else {}
    return FlexiViT(FlexiViTConfig(**{**TINY, "norm": norm, "norm_sizes": SIZES, **extra, **kw}))


def _train_steps(model: FlexiViT, sizes=SIZES, steps: int = 2) -> None:
    model.train()
    for step in range(steps):
        for p in sizes:
            x = torch.randn(6, 1, 16, 16) * (1 + step) + step
            model(x, p).sum().backward()
    model.zero_grad()


def _tokens(b: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(b, n, d) * torch.linspace(0.5, 3, d) + torch.linspace(-2, 2, d)  # (B, N, D)


@pytest.mark.parametrize("prefix, prefix_region", [(0, True), (1, False)])
def test_one_region_one_channel_per_group_is_batchnorm1d_over_tokens(prefix, prefix_region):
    """bgn with one region and one channel per group (no class token), and batchnorm with its class token
    pooled in, equal BatchNorm1d over every token, in training (outputs and running statistics) and eval."""
    d, grid = 8, (3, 3)
    norm = BatchGroupNorm(d, groups=d, regions=1, sizes=[4], prefix=prefix, prefix_region=prefix_region)
    ref = torch.nn.BatchNorm1d(d)
    with torch.no_grad():
        for layer in (norm, ref):
            layer.weight.copy_(torch.linspace(0.5, 2, d))
            layer.bias.copy_(torch.linspace(-1, 1, d))
    norm.set_grid(4, grid)
    for _ in range(3):
        x = _tokens(5, prefix + 9, d)
        torch.testing.assert_close(norm(x), ref(x.transpose(1, 2)).transpose(1, 2))
    mean, var = norm.stats(4)
    torch.testing.assert_close(mean[0], ref.running_mean)
    torch.testing.assert_close(var[0], ref.running_var)
    norm.eval(), ref.eval()
    x = _tokens(3, prefix + 9, d)
    torch.testing.assert_close(norm(x), ref(x.transpose(1, 2)).transpose(1, 2))


def test_regions_split_the_grid_by_token_centre():
    for gh, gw in [(2, 2), (4, 2), (7, 7), (8, 8), (14, 5)]:
        idx = token_regions((gh, gw), regions=2, prefix=1, prefix_region=True)
        assert idx[0] == 4 and set(idx[1:].tolist()) == {0, 1, 2, 3}  # the same regions at every grid
        for t, r in enumerate(idx[1:].tolist()):
            i, j = divmod(t, gw)
            assert r // 2 <= 2 * (i + 0.5) / gh < r // 2 + 1 and r % 2 <= 2 * (j + 0.5) / gw < r % 2 + 1


def test_every_group_has_zero_mean_and_unit_variance_before_the_affine():
    d, groups, grid = 16, 4, (4, 4)
    norm = BatchGroupNorm(d, groups=groups, regions=2, sizes=[4], prefix=1)
    norm.set_grid(4, grid)
    x = _tokens(6, 17, d)
    x[:, 1:5] += 10  # one region far off the rest: a norm over the whole grid would leave it off-centre
    y = norm(x)
    idx = token_regions(grid, regions=2, prefix=1, prefix_region=True)
    for r in range(5):
        for g in range(groups):
            values = y[:, idx == r, g * 4:(g + 1) * 4]
            assert abs(values.mean().item()) < 1e-5
            assert abs(values.var(unbiased=False).item() - 1) < 1e-3


@pytest.mark.parametrize("norm", ["batchnorm", "bgn"])
def test_eval_output_of_an_image_does_not_depend_on_the_batch(norm):
    model = _model(norm)
    _train_steps(model)
    model.eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        for p in SIZES:
            torch.testing.assert_close(model(x, p)[:1], model(x[:1], p), rtol=0, atol=1e-6)


def test_runs_at_every_grid_and_flags_borrowed_statistics():
    model = _model("bgn", pow2_scale=True)
    _train_steps(model)
    x = torch.randn(4, 1, 16, 16)
    batches = [{"image": x, "label": torch.arange(4)}]
    schemes = [PatchScheme(p) for p in (1, 2, 4, 8, 16)] + [PatchScheme(4, 2)]
    rows = evaluate_schemes(model, batches, schemes, image_hw=(16, 16))
    assert [r.get("norm_stats_from") for r in rows] == [2, None, None, None, 8, None]
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 1, 16, 8), 4)).all()  # a 4x2 grid
    norm = batch_norms(model)[0]
    assert [norm.stats_source(p) for p in (1, 3, 5, 6, 16)] == [2, 2, 4, 4, 8]  # nearest; ties to the smaller


def test_a_training_step_updates_only_its_own_sizes_statistics():
    model = _model("bgn")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model.train()
    model(torch.randn(4, 1, 16, 16) + 1, 4)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value) != key.endswith("_p4"), key
    model.eval()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(4, 1, 16, 16), 4)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_pow2_eval_is_ldexp_exactly():
    d, groups, grid = 16, 4, (4, 4)
    norm = BatchGroupNorm(d, groups=groups, regions=2, sizes=[4], prefix=1, pow2=True)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) * 3 + 0.1)
        norm.bias.copy_(torch.randn(d))
    norm.set_grid(4, grid)
    for _ in range(3):
        norm(_tokens(6, 17, d) * 5)
    norm.eval()
    mean, var = norm.stats(4)
    k = torch.round(torch.log2(norm.weight.detach().view(groups, -1) / torch.sqrt(var + norm.eps)[..., None]))
    sign, exponents = norm.exponents(4)
    assert torch.equal(exponents, k.to(torch.int32)) and torch.equal(sign, torch.ones_like(sign))
    assert k.min() < k.max()  # not a trivial scale
    scale = torch.ldexp(torch.ones_like(sign), exponents)
    assert torch.equal(torch.frexp(scale).mantissa, torch.full_like(scale, 0.5))  # every scale is exactly 2^k
    x = _tokens(3, 17, d)
    idx = token_regions(grid, regions=2, prefix=1, prefix_region=True)
    xg = x.view(3, 17, groups, -1)  # (B, N, G, C)
    expected = torch.ldexp(xg - mean[idx][None, :, :, None], exponents[idx]) + norm.bias.detach().view(groups, -1)
    assert torch.equal(norm(x), expected.view(3, 17, d))
    with torch.no_grad():  # the cached eval affine, twice: computed, then reused
        assert torch.equal(norm(x), expected.view(3, 17, d)) and torch.equal(norm(x), expected.view(3, 17, d))


@pytest.mark.parametrize("pow2", [False, True])
def test_cached_eval_affine_follows_every_change_of_weights_and_statistics(pow2):
    model = _model(pow2_scale=pow2)
    _train_steps(model)
    model.eval()
    x = torch.randn(3, 1, 16, 16)

    def uncached(p: int) -> torch.Tensor:  # with autograd on, every call computes the affine afresh
        return model(x, p).detach()

    with torch.no_grad():
        first = {p: model(x, p) for p in SIZES}
    assert all(torch.equal(first[p], uncached(p)) for p in SIZES)
    with torch.no_grad():
        model.blocks[0].norm1.weight.mul_(3)
        model.norm.bias.add_(1)
        model.blocks[0].norm2.stats(4)[1].mul_(4)
        changed = {p: model(x, p) for p in SIZES}
    assert all(torch.equal(changed[p], uncached(p)) and not torch.equal(changed[p], first[p]) for p in SIZES)
    model.load_state_dict(_model(pow2_scale=pow2).state_dict())
    with torch.no_grad():
        assert all(torch.equal(model(x, p), uncached(p)) for p in SIZES)


def test_pow2_training_uses_the_approximated_gamma_with_a_straight_through_gradient():
    d, groups = 8, 2
    norm = BatchGroupNorm(d, groups=groups, regions=1, sizes=[4], pow2=True)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) * 3 + 0.1)
    norm.set_grid(4, (2, 2))
    x = _tokens(5, 4, d) * 3
    y = norm(x)
    xg = x.view(5, 4, groups, -1)
    mean = xg.mean((0, 1, 3), keepdim=True)
    normed = (xg - mean) / torch.sqrt(xg.var((0, 1, 3), unbiased=False, keepdim=True) + norm.eps)
    _, running_var = norm.stats(4)  # updated by this batch
    sd = torch.sqrt(running_var + norm.eps)[0][:, None]  # (G, 1)
    gamma_hat = torch.exp2(torch.round(torch.log2(norm.weight.detach().view(groups, -1) / sd))) * sd
    torch.testing.assert_close(y, (normed * gamma_hat).view(5, 4, d))
    y.mul(torch.linspace(-1, 1, d)).sum().backward()
    torch.testing.assert_close(norm.weight.grad, (normed.view(5, 4, d) * torch.linspace(-1, 1, d)).sum((0, 1)))


@pytest.mark.parametrize("norm, pow2", [("batchnorm", False), ("bgn", False), ("bgn", True)])
@pytest.mark.parametrize("pool", [dict(), dict(class_token=False, global_pool="avg")])
def test_every_parameter_gets_a_gradient_at_every_trained_size(norm, pow2, pool):
    model = _model(norm, pow2_scale=pow2, **pool).train()
    for p in SIZES:
        model.zero_grad()
        F.cross_entropy(model(torch.randn(4, 1, 16, 16), p), torch.arange(4)).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name} at patch {p}"
            assert param.grad.abs().sum() > 0, f"{name} got a zero gradient at patch {p}"


@pytest.mark.parametrize("option", [dict(graph="0-1,0-2,1-2,2-h"), dict(lutq_k=4), dict(scale_invariant="all"),
                                    dict(bridges=("1:2",), bridge_sizes=(4,))])
def test_combines_with_other_model_options(option):
    model = _model("bgn", depth=2, **option)
    _train_steps(model, steps=1)
    assert "batch-statistics norms (bgn)" in model.non_plain_parts()
    with torch.no_grad():
        for p in (1, *SIZES, 16):
            assert torch.isfinite(model.eval()(torch.randn(2, 1, 16, 16), p)).all()


@pytest.mark.parametrize("norm", ["batchnorm", "bgn"])
def test_save_and_load_keep_logits_and_statistics(norm, tmp_path):
    model = _model(norm, pow2_scale=True)
    _train_steps(model)
    model.eval()
    file = save_model(model, tmp_path, class_names=CLASSES, preprocess=PREPROCESS)
    loaded, meta = load_model(file)
    assert meta["config"]["norm"] == norm and loaded.config == model.config
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        for p in (1, *SIZES):
            assert torch.equal(loaded(x, p), model(x, p))


def test_defaults_are_unchanged():
    assert not NORM_KEYS & set(FlexiViTConfig().to_dict())
    plain = FlexiViT(FlexiViTConfig(**TINY))
    assert plain.state_dict().keys() == FlexiViT(FlexiViTConfig(**TINY, norm="layernorm")).state_dict().keys()
    assert not any("running_" in k for k in plain.state_dict()) and not batch_norms(plain)
    assert plain.is_plain_vit()
    built = build_model(load_recipe("fashion_mnist:smoke"), channels=1, num_classes=10)
    assert not NORM_KEYS & set(built.config.to_dict()) and not batch_norms(built)
    assert set(_model("batchnorm").config.to_dict()) & NORM_KEYS == {"norm", "norm_sizes", "pow2_scale"}


def test_recipe_override_builds_a_bgn_model_with_the_training_sizes():
    cfg = load_recipe("fashion_mnist:smoke", ["model.norm=bgn", "model.norm_groups=4", "model.pow2_scale=true"])
    model = build_model(cfg, channels=1, num_classes=10)
    assert model.config.norm_sizes == tuple(sorted(cfg.patch.sizes)) and model.config.norm_groups == 4
    assert len(batch_norms(model)) == 2 * model.config.depth + 1 and not model.is_plain_vit()


@pytest.mark.parametrize("fields, match", [
    (dict(norm="groupnorm"), "unknown norm 'groupnorm'"),
    (dict(norm="bgn", norm_groups=5, norm_sizes=(4,)), "norm_groups=5 does not divide embed_dim=16"),
    (dict(norm="bgn", norm_regions=3, norm_sizes=(2, 8)), "norm_regions=3 .* between 1 and 2"),
    (dict(norm="bgn"), "set norm_sizes to the training patch sizes"),
    (dict(norm_sizes=(4,)), "apply to batch-statistics norms only"),
    (dict(pow2_scale=True), "apply to batch-statistics norms only"),
    (dict(norm="batchnorm", norm_regions=3, norm_sizes=(4,)), "apply to norm='bgn' only"),
    (dict(norm="batchnorm", norm_sizes=(5,)), "does not tile"),
])
def test_bad_configs_are_clear_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        FlexiViTConfig(**{**TINY, **fields})


def test_bad_calls_are_clear_errors():
    model = _model("bgn").train()
    with pytest.raises(ValueError, match="at least 2 per forward"):
        model(torch.randn(1, 1, 16, 16), 4)
    with pytest.raises(ValueError, match="patch size 16 has no running statistics.*recalibrate"):
        model(torch.randn(4, 1, 16, 16), 16)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="channel groups do not divide the width"):
        BatchGroupNorm(10, groups=4, regions=1, sizes=[4])
    with pytest.raises(RuntimeError, match="set_grid"):
        BatchGroupNorm(8, groups=2, regions=1, sizes=[4])(torch.randn(2, 4, 8))
    set_token_grid(model, 4, (3, 3))
    with pytest.raises(ValueError, match="17 tokens do not make a 3x3 token grid"):
        model.blocks[0].norm1(torch.randn(2, 17, 16))


def test_recalibrate_estimates_new_sizes_from_batches_without_changing_anything_else():
    model = _model("bgn")
    _train_steps(model, sizes=(4, 8))
    params = {k: v.clone() for k, v in model.named_parameters()}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    assert norm_stats_source(model, 1) == 2
    batches = [torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16) + 0.5]
    assert recalibrate(model.eval(), batches, [1]) == [1]
    assert model.config.norm_sizes == (1, 2, 4, 8) and norm_stats_source(model, 1) is None
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    # The first norm sees the embedded tokens: its statistics are the mean of the two batches' statistics.
    norm = model.blocks[0].norm1
    idx = token_regions((16, 16), regions=2, prefix=1, prefix_region=True)
    with torch.no_grad():
        means = []
        for images in batches:
            tokens, _ = model._embed(images, model.scheme(1))  # (B, N, D)
            grouped = tokens.view(8, -1, 4, 4)  # (B, N, G, C)
            means.append(torch.stack([grouped[:, idx == r].mean((0, 1, 3)) for r in range(5)]))  # (S, G)
    torch.testing.assert_close(norm.stats(1)[0], (means[0] + means[1]) / 2)
    assert not any(m.training for m in model.modules()) and norm.momentum == 0.1  # modes as they were


def test_recalibrate_errors():
    with pytest.raises(ValueError, match="nothing to recalibrate"):
        recalibrate(FlexiViT(FlexiViTConfig(**TINY)), [], [4])
    model = _model("bgn")
    with pytest.raises(ValueError, match="already has running statistics"):
        recalibrate(model, [], [4])
    with pytest.raises(ValueError, match="does not tile"):
        recalibrate(model, [], [5])
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="at least 2 per forward"):
        recalibrate(model, [torch.randn(1, 1, 16, 16)], [1])
    assert set(model.state_dict()) == keys and model.config.norm_sizes == SIZES  # left as it was


def test_recalibrate_command(tmp_path, capsys):
    data = tmp_path / "data"
    datasets.DatasetDict({"train": from_arrays(*synthetic(20, seed=3), CLASSES),
                          "test": from_arrays(*synthetic(8, seed=4), CLASSES)}).save_to_disk(str(data))
    model = _model("bgn", in_chans=1)
    _train_steps(model, sizes=(4, 8))
    run = tmp_path / "run"
    save_model(model.eval(), run, class_names=CLASSES, preprocess=PREPROCESS)
    (run / "config.json").write_text(json.dumps({"data": {"source": f"hf:{data}"}, "patch": {"sizes": [4, 8]}}))
    out = tmp_path / "recal.safetensors"
    assert main(["recalibrate", str(run), "--patch-sizes", "1", "--images", "16", "--out", str(out)]) == 0
    assert "from 16 training images" in capsys.readouterr().out
    loaded, _ = load_model(out)
    assert loaded.config.norm_sizes == (1, 2, 4, 8)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x, 4), model(x, 4))
    plain = tmp_path / "plain"
    save_model(FlexiViT(FlexiViTConfig(**TINY)), plain, class_names=CLASSES, preprocess=PREPROCESS)
    assert main(["recalibrate", str(plain), "--patch-sizes", "1"]) == 2
    assert main(["recalibrate", str(run), "--patch-sizes", "x"]) == 2
    assert "nothing to recalibrate" in capsys.readouterr().err


def test_export_refuses_timm_and_works_with_torch_export(tmp_path):
    model = _model("bgn", pow2_scale=True)
    _train_steps(model)
    meta = {"class_names": CLASSES, "preprocess": PREPROCESS}
    with pytest.raises(ExportError, match="batch-statistics norms"):
        export_model(model, meta, 4, tmp_path / "timm")
    result = export_model(model, meta, 4, tmp_path / "pt2", torch_export=True)
    assert sorted(result.files) == ["config.json", "model.pt2"]
    assert json.loads((tmp_path / "pt2" / "config.json").read_text())["format"] == PROGRAM_FORMAT
    program = torch.export.load(str(tmp_path / "pt2" / "model.pt2")).module()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model.eval()(x, 4))


def test_two_threads_calling_at_different_sizes_never_mix_grids():
    """The grid of a call is per thread: thread A sets patch 4, thread B sets patch 7 and runs, then A runs:
    each gets the logits of its own size (module state would have given A the 7's grid)."""
    import threading

    torch.manual_seed(0)
    model = FlexiViT(FlexiViTConfig(img_size=28, patch_size=7, base_patch_size=14, embed_dim=16, depth=1, num_heads=2,
                                    in_chans=1, num_classes=3, norm="bgn", norm_groups=2, norm_regions=1,
                                    norm_sizes=(4, 7))).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = {p: model(x, p) for p in (4, 7)}
    a_set, b_done, out, errors = threading.Event(), threading.Event(), {}, []

    def run(patch: int, first: threading.Event | None, then: threading.Event | None) -> None:
        try:
            tokens, grid = model._embed(x, model.scheme(patch))  # sets this thread's grid
            if then is not None:
                then.set()
            if first is not None:
                first.wait(10)
            with torch.no_grad():
                out[patch] = model.forward_head(model.norm(model.blocks(tokens)))
        except Exception as err:  # reported below: a thread's exception would vanish
            errors.append(err)
        finally:
            if patch == 7:
                b_done.set()

    a = threading.Thread(target=run, args=(4, b_done, a_set))
    b = threading.Thread(target=lambda: (a_set.wait(10), run(7, None, None)))
    a.start(), b.start(), a.join(20), b.join(20)
    assert not errors
    for p in (4, 7):
        torch.testing.assert_close(out[p], expected[p])


def test_a_fine_tune_at_one_size_drops_the_other_sizes_stale_statistics_and_eval_says_so():
    from flexivit.model.patch_embed import PatchScheme
    from flexivit.train.finetune import from_pretrained

    torch.manual_seed(0)
    core = dict(img_size=28, patch_size=7, base_patch_size=14, embed_dim=16, depth=1, num_heads=2, in_chans=1)
    pretrained = FlexiViT(FlexiViTConfig(**core, num_classes=10, norm="bgn", norm_groups=2, norm_regions=1,
                                         norm_sizes=(4, 7, 14)))
    fresh = FlexiViT(FlexiViTConfig(**core, num_classes=3))
    tuned = from_pretrained(pretrained, fresh, sizes=[7])
    assert tuned.config.norm_sizes == (7,) and all(n.sizes == [7] for n in batch_norms(tuned))
    assert not any("running_mean_p4" in k or "running_var_p14" in k for k in tuned.state_dict())
    torch.testing.assert_close(tuned.blocks[0].norm1.stats(7)[1], pretrained.blocks[0].norm1.stats(7)[1])
    batches = [{"image": torch.randn(4, 1, 28, 28), "label": torch.tensor([0, 1, 2, 0])}]
    rows = evaluate_schemes(tuned, batches, [PatchScheme(p) for p in (4, 7, 14)], image_hw=(28, 28))
    assert [r.get("norm_stats_from") for r in rows] == [7, None, 7]  # flagged where another size's are used
    whole = from_pretrained(pretrained, fresh, sizes=[4, 7, 14])  # a sampled fine-tune keeps every size
    assert whole.config.norm_sizes == (4, 7, 14)
