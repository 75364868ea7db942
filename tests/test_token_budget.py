"""Token-budget batches (``train.token_budget``): how many loader batches a step takes per patch size."""

from flexivit.train.config import load_recipe
from flexivit.model.patch_embed import PatchScheme
from flexivit.train.step_batches import loader_batches


def test_token_budget_gives_large_patches_more_batches_for_the_same_tokens():
    budget = 128 * 49  # one batch of 128 images at patch 4 (7x7 tokens) on 28 px images
    counts = {p: loader_batches(PatchScheme(p), (28, 28), 128, budget) for p in (2, 4, 7, 14)}
    assert counts == {2: 1, 4: 1, 7: 3, 14: 12}  # 196, 49, 16, 4 tokens per image
    # Tokens are counted on the scheme's grid: overlapping tiles make more of them than the patch size says.
    assert loader_batches(PatchScheme(14, 7), (28, 28), 128, budget) == 5  # 3 x 3 tokens, not 2 x 2
    assert loader_batches(PatchScheme(4, 2), (28, 28), 128, budget) == 1  # 13 x 13 tokens: over budget, one batch


def test_token_budget_off_is_one_batch_and_the_quickstart_uses_one_patch2_batch():
    from flexivit.train.config import Config

    assert Config().train.token_budget == 0  # off unless a recipe asks for it
    assert loader_batches(PatchScheme(14), (28, 28), 128, 0) == 1
    cfg = load_recipe("fashion_mnist")
    assert cfg.train.token_budget == cfg.data.batch_size * 196 == 16 * 196
    counts = [loader_batches(PatchScheme(p), (28, 28), 16, cfg.train.token_budget) for p in (2, 4, 7, 14)]
    assert counts == [1, 4, 12, 49]  # 16, 64, 192, 784 images: the same 3136 tokens per step
    assert load_recipe("fashion_mnist", ["train.token_budget=0"]).train.token_budget == 0


def test_join_concatenates_loader_batches_and_counts_skipped():
    import torch

    from flexivit.train.step_batches import _join

    a = {"image": torch.randn(3, 1, 4, 4), "label": torch.tensor([0, 1, 2]), "skipped": 1}
    empty = {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long), "skipped": 2}
    b = {"image": torch.randn(2, 1, 4, 4), "label": torch.tensor([3, 4]), "skipped": 0}
    joined = _join([a, empty, b])
    assert joined["image"].equal(torch.cat([a["image"], b["image"]]))
    assert joined["label"].tolist() == [0, 1, 2, 3, 4]
    assert joined["skipped"] == 3
    assert _join([a]) is a
    assert _join([empty, empty])["skipped"] == 4 and _join([empty, empty])["label"].numel() == 0


def test_a_token_budget_step_runs_its_loader_batches_as_one_forward(tmp_path):
    """Every training forward holds budget // tokens images (joined), never one loader batch at a time."""
    from flexivit.train.loop import train

    seen: list[tuple[int, int]] = []  # (patch, images) of every training forward

    def record(model):
        def hook(module, args, kwargs):
            if module.training:
                seen.append((args[1] if len(args) > 1 else kwargs["patch_size"], args[0].shape[0]))
        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    cfg = load_recipe("fashion_mnist:smoke", [
        "model.embed_dim=16", "model.depth=1", "data.batch_size=8", "train.token_budget=392",  # 8 x 49
        "train.steps=8", "train.checkpoint_every=100", "data.eval_limit=16", "patch.eval_sizes=14",
    ])
    train(cfg, out_dir=tmp_path / "run", init=record)
    assert len(seen) == 8  # one forward per step
    expected = {2: 8, 4: 8, 7: 24, 14: 96}  # 8 images x max(1, 392 // (8 x tokens))
    assert all(n == expected[p] for p, n in seen), seen


def test_cpu_training_with_workers_leaves_them_a_core(monkeypatch):
    """torch's threads busy-wait: with data workers on CPU the trainer takes cores minus workers."""
    import os

    import torch
    from accelerate import Accelerator

    from flexivit.train.assemble import _share_cores

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(cores + 2)
        assert _share_cores(Accelerator(cpu=True), num_workers=1) == cores + 2  # to restore afterwards
        assert torch.get_num_threads() == max(1, cores - 1)
        torch.set_num_threads(cores + 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        _share_cores(Accelerator(cpu=True), num_workers=1)  # the user's choice wins
        assert torch.get_num_threads() == cores + 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        _share_cores(Accelerator(cpu=True), num_workers=0)  # no workers: nothing to leave room for
        assert torch.get_num_threads() == cores + 2
    finally:
        torch.set_num_threads(before)
