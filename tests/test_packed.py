"""The packed forward (flexivit.model.packed): each image's logits in a packed row equal its logits alone."""

import random
from collections import Counter

import pytest
import torch
from timm.layers import DropPath

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.packed import _drop_path, forward_packed, pack, packed_trunk, run_packed
from flexivit.model.packing import RowPacker
from flexivit.model.patch_embed import valid_patch_sizes

IMAGE = 12
SIZES = valid_patch_sizes(IMAGE)  # 1, 2, 3, 4, 6, 12: every size that tiles the image
BASE = dict(img_size=IMAGE, patch_size=4, base_patch_size=6, base_grid=4, in_chans=2, num_classes=5, embed_dim=16,
            depth=2, num_heads=2)
CONFIGS = {
    "cls-token": dict(class_token=True, global_pool="token"),
    "cls-avg": dict(class_token=True, global_pool="avg"),
    "no-cls-avg": dict(class_token=False, global_pool="avg"),
    "qknorm-layerscale-factorized-prenorm": dict(class_token=True, global_pool="token", qk_norm=True,
                                                 init_values=0.5, posemb="factorized", pre_norm=True),
    "scale-invariant": dict(class_token=False, global_pool="avg", scale_invariant="all"),
    "lutq": dict(class_token=True, global_pool="token", lutq_k=4, lutq_scope="blocks+head"),
}


def _model(**overrides) -> FlexiViT:
    model = FlexiViT(FlexiViTConfig(**{**BASE, **overrides}))
    with torch.no_grad():  # a non-trivial class token and layer scale, not their near-zero init
        for name, p in model.named_parameters():
            if name == "cls_token" or name.endswith(".gamma"):
                p.normal_()
    return model.eval()


def _alone(model: FlexiViT, images, sizes) -> torch.Tensor:
    """The reference: every image through the ordinary forward, one call each."""
    return torch.cat([model(x[None], p) for x, p in zip(images, sizes)])


@pytest.mark.parametrize("attention", ["grouped", "sdpa"])
@pytest.mark.parametrize("name", CONFIGS)
def test_packed_logits_equal_each_image_alone_at_every_size(name, attention):
    model = _model(**CONFIGS[name])
    rng = random.Random(name)
    uniform = mixed = 0
    for _ in range(3):
        n = rng.randint(len(SIZES), 14)
        sizes = SIZES + [rng.choice(SIZES) for _ in range(n - len(SIZES))]  # every size, then a random mix
        rng.shuffle(sizes)
        images = torch.randn(n, 2, IMAGE, IMAGE)
        with torch.no_grad():
            batch = pack(model, images, sizes)
            packed = run_packed(model, batch, attention=attention)
            alone = _alone(model, images, sizes)
        assert batch.num_rows < n  # several images share rows
        assert packed.shape == (n, 5)
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
        segments = Counter(first for first, end, *_ in batch.runs for first in range(first, end))  # per row
        uniform += sum(1 for r in range(batch.num_rows) if segments[r] == 1)
        mixed += sum(1 for r in range(batch.num_rows) if segments[r] > 1)
        covered = sum((end - first) * n * c for first, end, _, n, c in batch.runs)
        assert covered == sum(length for _, _, length in batch.slots)  # the runs cover every image token once
    assert uniform and mixed  # grouped attention met rows of one image length and rows of several


def test_images_of_different_resolutions_in_one_call():
    model = _model(class_token=True, global_pool="avg")
    images = [torch.randn(2, 12, 12), torch.randn(2, 8, 8), torch.randn(2, 12, 8), torch.randn(2, 4, 16)]
    sizes = [3, 2, 4, 4]
    with torch.no_grad():
        packed = forward_packed(model, images, sizes)
        torch.testing.assert_close(packed, _alone(model, images, sizes), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_gives_the_same_logits():
    model = _model(class_token=True, global_pool="token")
    images, sizes = torch.randn(9, 2, IMAGE, IMAGE), [1, 2, 3, 4, 6, 12, 3, 6, 12]
    with torch.no_grad():  # flex attention on CPU runs eagerly and forward only
        flex = forward_packed(model, images, sizes, attention="flex")
        torch.testing.assert_close(flex, _alone(model, images, sizes), atol=1e-5, rtol=0)


def test_a_packers_plan_with_longer_rows_and_an_empty_row():
    model = _model(class_token=False, global_pool="avg")
    plan = RowPacker(sizes=[2, 3, 4, 6], image_size=IMAGE, rows=3, row_tokens=60, seed=1).plan(step=4, rank=1)
    rows = [*plan.rows, ()]  # an extra all-padding row, as a caller fixing the row count would add
    images = torch.randn(plan.num_images, 2, IMAGE, IMAGE)
    with torch.no_grad():
        batch = pack(model, images, plan.patch_sizes, row_tokens=plan.row_tokens, rows=rows)
        assert batch.tokens.shape == (4, 60, 16) and batch.padding > 0
        assert (batch.image_ids[3] == -1).all() and (batch.tokens[3] == 0).all()
        alone = _alone(model, images, plan.patch_sizes)
        for attention in ("grouped", "sdpa"):
            torch.testing.assert_close(run_packed(model, batch, attention=attention), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["grouped", "sdpa"])
def test_gradients_equal_those_of_the_images_alone(attention):
    model = _model(class_token=True, global_pool="token", qk_norm=True, init_values=0.5)
    images, sizes = torch.randn(7, 2, IMAGE, IMAGE), [1, 2, 2, 3, 4, 6, 12]
    weights = torch.randn(7, 5)

    def grads(logits: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        (logits * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = grads(model.forward_packed(images, sizes, attention=attention))
    alone = grads(_alone(model, images, sizes))
    assert all(g.abs().sum() > 0 for g in packed.values())  # every parameter gets a gradient
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-5, rtol=1e-4, msg=name)
    model.set_grad_checkpointing(True)
    for name, g in grads(model.forward_packed(images, sizes, attention=attention)).items():
        torch.testing.assert_close(g, packed[name], atol=1e-6, rtol=1e-5, msg=name)


def test_stochastic_depth_keeps_or_drops_whole_images():
    module = DropPath(0.5).train()
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, -1, -1]])  # (R, L); -1 padding
    kept = torch.zeros(200, 4, dtype=torch.bool)
    for trial in range(200):
        out = _drop_path(module, torch.ones(2, 6, 3), ids)  # (R, L, D)
        for image in range(4):
            values = out[ids == image].unique()
            assert values.numel() == 1 and values.item() in (0.0, 2.0)  # one decision per image, scaled 1 / keep
            kept[trial, image] = values.item() > 0
    assert 0.4 < kept.float().mean() < 0.6
    assert (kept[:, 0] != kept[:, 1]).any() and (kept[:, 1] != kept[:, 2]).any()  # images of one row: independent


def test_a_compiled_trunk_builds_one_graph_for_a_whole_run():
    from flexivit.model.compile import graph_count

    torch._dynamo.reset()
    model = _model(class_token=False, global_pool="avg")
    packer = RowPacker(sizes=[2, 3, 4, 6], image_size=IMAGE, rows=2, seed=0)
    trunk = torch.compile(packed_trunk, backend="eager")
    before = graph_count()
    with torch.no_grad():
        for step in range(6):  # image counts and layouts change every step, the shape (rows, row_tokens) does not
            plan = packer.plan(step)
            batch = pack(model, torch.randn(plan.num_images, 2, IMAGE, IMAGE), plan.patch_sizes,
                         row_tokens=plan.row_tokens, rows=plan.rows)
            compiled = trunk(model, batch.tokens, batch.image_ids, attention="sdpa")
            eager = packed_trunk(model, batch.tokens, batch.image_ids, attention="grouped", runs=batch.runs)
            real = batch.image_ids >= 0
            torch.testing.assert_close(compiled[real], eager[real], atol=1e-5, rtol=0)
    assert graph_count() - before == 1


@pytest.mark.parametrize(
    "images,sizes,kwargs,message",
    [
        (torch.randn(3, 2, 12, 12), [4, 5, 6], {}, "image 1: patch size 5 does not tile a 12x12 image"),
        (torch.randn(3, 2, 12, 12), [4, 1, 6], {"row_tokens": 50}, "image 1 has 144 tokens, more than a row of 50"),
        ([], [], {}, "no images given"),
        (torch.randn(3, 2, 12, 12), [4, 4], {}, "image 2 has no patch size"),
        (torch.randn(2, 2, 12, 12), [4, 4, 4], {}, "image 2 has no image"),
        ([torch.randn(2, 12, 12), torch.randn(12, 12)], [4, 4], {}, "image 1: expected a (C, H, W) tensor"),
        ([torch.randn(2, 12, 12), torch.randn(3, 12, 12)], [4, 4], {}, "image 1: expected 2 channels, got 3"),
        (torch.randn(2, 2, 12, 12), [4, 0], {}, "image 1: patch size must be a positive integer"),
        (torch.randn(2, 2, 12, 12), [4, 4], {"rows": [[0], [0, 1]], "row_tokens": 18}, "image 0 is placed 2 times"),
        (torch.randn(2, 2, 12, 12), [4, 4], {"attention": "dense"}, "attention must be one of auto, grouped, sdpa"),
    ],
)
def test_bad_input_is_one_line_naming_the_image(images, sizes, kwargs, message):
    model = _model(class_token=False, global_pool="avg")
    with pytest.raises(ValueError) as error:
        forward_packed(model, images, sizes, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides,option",
    [
        (dict(norm="batchnorm", norm_sizes=(3, 4)), "norm='batchnorm'"),
        (dict(head="proxies", class_token=False, global_pool="avg"), "head='proxies'"),
        (dict(graph="0-1,0-2,1-2,2-h"), "graph='0-1,0-2,1-2,2-h'"),
        (dict(bridges=("0:1",)), "bridges=['0:1']"),
    ],
)
def test_models_packing_cannot_reproduce_are_refused_naming_the_option(overrides, option):
    model = FlexiViT(FlexiViTConfig(**{**BASE, **overrides})).eval()
    with pytest.raises(ValueError, match="the packed forward cannot run a model with") as error:
        model.forward_packed(torch.randn(2, 2, 12, 12), [4, 6])
    assert option in str(error.value) and "\n" not in str(error.value)


# ---- serving: Predictor and `flexivit predict` with a patch size per image ------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tiny_run import make_run

    return make_run(tmp_path_factory.getbasetemp())


def _files(folder, count: int) -> list[str]:
    from tiny_run import CLASSES, class_image

    paths = []
    for i in range(count):
        path = folder / f"image{i}.png"
        class_image(i % len(CLASSES), (16 + 8 * (i % 3),) * 2, "L").save(path)
        paths.append(str(path))
    return paths


def test_predictor_runs_mixed_sizes_in_one_packed_call_with_each_images_own_result(run, tmp_path, monkeypatch):
    from flexivit.eval import deploy
    from flexivit.eval.deploy import Predictor

    files, sizes = _files(tmp_path, 6), [2, 8, 4, 4, 2, 16]
    predictor = Predictor.from_checkpoint(run)
    calls = []
    monkeypatch.setattr(deploy, "forward_packed", lambda *a, **k: calls.append(a[2]) or forward_packed(*a, **k))
    mixed = predictor.predict(files, patch_size=sizes, topk=3)
    assert calls == [sizes]  # one packed call for the batch
    for prediction, file, p in zip(mixed, files, sizes):
        alone = predictor.predict([file], patch_size=p, topk=3)[0]
        assert prediction.patch_size == p and prediction.image == file
        assert [i for i, _, _ in prediction.top] == [i for i, _, _ in alone.top]
        assert [v for _, _, v in prediction.top] == pytest.approx([v for _, _, v in alone.top], abs=1e-5)
    assert [p.patch_size for p in predictor.predict(files[:2], patch_size=[4, 4])] == [4, 4]  # one size: no packing
    assert len(calls) == 1
    with pytest.raises(ValueError, match="got 2 patch sizes for 3 images"):
        predictor.predict(files[:3], patch_size=[2, 4])
    with pytest.raises(ValueError, match="image 1: .*valid patch sizes: 1, 2, 4, 8, 16"):
        predictor.predict(files[:2], patch_size=[2, 5])


def test_predict_cli_takes_a_patch_size_per_image(run, tmp_path, capsys):
    import json

    from flexivit.cli.main import main

    files = _files(tmp_path, 3)
    assert main(["predict", str(run), *files, "--patch-sizes", "2,8,4", "--topk", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["patch_size"] is None and [p["patch_size"] for p in out["predictions"]] == [2, 8, 4]
    assert main(["predict", str(run), *files, "--patch-sizes", "2,x"]) == 2
    assert "--patch-sizes takes one integer per image" in capsys.readouterr().err
