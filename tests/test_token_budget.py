"""Token-budget batches (``train.token_budget``): how many loader batches a step takes per patch size."""

from flexivit.config import load_recipe
from flexivit.patch_embed import PatchScheme
from flexivit.train import loader_batches


def test_token_budget_gives_large_patches_more_batches_for_the_same_tokens():
    budget = 128 * 49  # one batch of 128 images at patch 4 (7x7 tokens) on 28 px images
    counts = {p: loader_batches(PatchScheme(p), (28, 28), 128, budget) for p in (2, 4, 7, 14)}
    assert counts == {2: 1, 4: 1, 7: 3, 14: 12}  # 196, 49, 16, 4 tokens per image
    assert all(counts[p] * 128 * (28 // p) ** 2 <= max(budget, 128 * (28 // p) ** 2) for p in counts)


def test_token_budget_off_is_one_batch_and_the_quickstart_uses_one_patch4_batch():
    from flexivit.config import Config

    assert Config().train.token_budget == 0  # off unless a recipe asks for it
    assert loader_batches(PatchScheme(14), (28, 28), 128, 0) == 1
    budget = load_recipe("fashion_mnist").train.token_budget
    assert budget == 128 * 49
    assert [loader_batches(PatchScheme(p), (28, 28), 128, budget) for p in (2, 4, 7, 14)] == [1, 1, 3, 12]
    assert load_recipe("fashion_mnist", ["train.token_budget=0"]).train.token_budget == 0
