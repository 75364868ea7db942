"""flexivit.experiments.budget: images per step and per patch size, equal-image and equal-FLOP steps and
training FLOPs, against hand counts (the arithmetic behind tools/reproduce_flexibility.py and the
fine-tuning study's GFLOPs column)."""

import itertools

import pytest

from flexivit.experiments import budget
from flexivit.model.patch_embed import PatchScheme
from flexivit.model.weights import save_model
from flexivit.train.builders import build_model, build_sampler, preprocess_meta
from flexivit.train.config import load_recipe

ONE_SIZE = ["patch.distribution=uniform", "patch.weights=none"]


def _hand_images(batch: int, accum: int, budget_tokens: int, patch: int) -> int:
    """A step's images by hand: loader batches of ``batch`` joined up to the token budget (at least one)."""
    tokens = (28 // patch) ** 2
    return batch * accum * max(1, budget_tokens // (batch * tokens) if budget_tokens else 1)


@pytest.mark.parametrize("sets,batch,accum,tokens", [
    ([], 16, 1, 16 * 196),  # the recipe: batch 16, a token budget of 16 images at patch 2
    (["train.grad_accum=2", "data.batch_size=8"], 8, 2, 16 * 196),
    (["train.token_budget=0"], 16, 1, 0),  # no budget: one loader batch per step
])
def test_images_per_step_join_loader_batches_up_to_the_token_budget(sets, batch, accum, tokens):
    cfg = load_recipe("fashion_mnist", sets)
    assert cfg.train.token_budget == tokens
    for p in (2, 4, 7, 14):
        assert budget.images_per_step(cfg, PatchScheme(p)) == _hand_images(batch, accum, tokens, p)


def test_images_by_patch_add_up_the_samplers_draws():
    cfg = load_recipe("fashion_mnist", ["train.steps=40", "train.seed=3"])
    draws = [build_sampler(cfg).at(step).patch for step in range(40)]  # the sampler's own sequence
    hand = {p: draws.count(p) * _hand_images(16, 1, 16 * 196, p) for p in sorted(set(draws))}
    assert budget.images_by_patch(cfg) == hand and len(hand) > 1
    assert list(itertools.islice(budget.step_images(cfg), 3)) == [(p, _hand_images(16, 1, 16 * 196, p))
                                                                    for p in draws[:3]]
    with pytest.raises(ValueError, match="drop patch.strides"):
        next(budget.step_images(load_recipe("fashion_mnist", ["patch.sizes=4,7", "patch.strides=2,7", *ONE_SIZE])))


def test_equal_image_steps_come_within_half_a_step():
    fixed = load_recipe("fashion_mnist", ["patch.sizes=7", "patch.default=7", *ONE_SIZE])
    per_step = _hand_images(16, 1, 16 * 196, 7)
    for images in (1, per_step // 2, per_step, 10_000, 123_457):
        steps = budget.equal_image_steps(fixed, images)
        assert steps >= 1 and (steps == 1 or abs(steps * per_step - images) <= per_step / 2)
        assert abs(steps * per_step - images) <= abs((steps + 1) * per_step - images)
        assert steps == 1 or abs(steps * per_step - images) <= abs((steps - 1) * per_step - images)


def test_training_flops_hand_checked():
    # 640 images at p=4 (1 GFLOP forward), 1536 at p=14 (0.1), a 0.5-GFLOP teacher forward on each of the
    # 2176 images: 3 x (640 x 1 + 1536 x 0.1) + 0.5 x 2176 = 2380.8 + 1088.
    assert budget.train_gflops({4: 640, 14: 1536}, {4: 1.0, 14: 0.1}.get, 0.5) == pytest.approx(3468.8)
    assert budget.train_gflops({4: 640, 14: 1536}, {4: 1.0, 14: 0.1}.get) == pytest.approx(2380.8)


def test_equal_flop_steps_are_the_fewest_that_reach_the_target():
    cfg = load_recipe("fashion_mnist", ["train.steps=1000"])
    cost = {2: 4.0, 4: 1.0, 7: 0.3, 14: 0.08}.get  # a stand-in forward cost per image
    spent = list(itertools.accumulate(3 * cost(p) * n for p, n in itertools.islice(budget.step_images(cfg), 1000)))
    for target in (1.0, spent[0], spent[0] + 1e-6, spent[57], spent[999]):
        steps = budget.equal_gflops_steps(cfg, cost, target)
        assert spent[steps - 1] >= target and (steps == 1 or spent[steps - 2] < target)


def _vit_gflops(cfg, patch: int) -> float:
    """A ViT forward by hand (multiply-add = 2 FLOPs, matmuls only): patch embedding, per block qkv (3 D²
    per token), scores and weighted sum (2 T² D), projection (D²) and MLP (2 r D²), then the head."""
    model = build_model(cfg, channels=1, num_classes=10).config
    grid, d, r = 28 // patch, model.embed_dim, model.mlp_ratio
    tokens = grid * grid + int(model.class_token)
    embed = 2 * grid * grid * patch * patch * d
    block = 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d + 2 * 2 * tokens * d * r * d
    return (embed + model.depth * block + 2 * d * 10) / 1e9


def test_counted_forward_and_run_flops_match_a_hand_count():
    fixed = load_recipe("fashion_mnist", ["patch.sizes=14", "patch.default=14", *ONE_SIZE, "train.steps=6"])
    teacher = load_recipe("fashion_mnist_teacher")
    counter = budget.ForwardCounter(channels=1, num_classes=10)
    for p in (2, 4, 7, 14):
        assert counter(fixed, p) == pytest.approx(_vit_gflops(fixed, p), rel=1e-9)
    # 6 steps x 784 images (16-image batches, 49 joined per p=14 step), forward + backward = 3 forwards.
    assert budget.run_gflops(fixed, counter) == pytest.approx(6 * 784 * 3 * _vit_gflops(fixed, 14), rel=1e-9)
    distilled = load_recipe("fashion_mnist_distill", ["patch.sizes=14", "patch.default=14", *ONE_SIZE,
                                                         "train.steps=6"])
    with_teacher = 6 * 784 * (3 * _vit_gflops(fixed, 14) + _vit_gflops(teacher, 4))  # the teacher runs at p=4
    assert budget.run_gflops(distilled, counter, teacher) == pytest.approx(with_teacher, rel=1e-9)


def test_a_finished_runs_training_flops_come_from_its_own_model_and_config(tmp_path):
    cfg = load_recipe("fashion_mnist", ["model.embed_dim=32", "model.depth=1", "train.steps=9"])
    save_model(build_model(cfg, channels=1, num_classes=10), tmp_path, class_names=[str(c) for c in range(10)],
               preprocess=preprocess_meta(cfg, 1))
    cfg.save(tmp_path / "config.json")
    images = budget.images_by_patch(cfg)
    hand = sum(n * 3 * _vit_gflops(cfg, p) for p, n in images.items())
    assert budget.trained_gflops(tmp_path) == pytest.approx(hand, rel=1e-9)
