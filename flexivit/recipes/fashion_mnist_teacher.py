"""Teacher for distillation: the quickstart's network trained at one small patch size (4, 49 tokens).

    flexivit train fashion_mnist_teacher        # writes runs/fashion_mnist_teacher
    flexivit train fashion_mnist_teacher:smoke

It is a plain ViT/4: every step uses patch 4, and its kernel is stored at 4x4 with a 7x7 position grid,
so nothing is ever resized and its kernel learns at the full rate.
Measured results are in docs/distillation.md.
"""

from flexivit.train.config import Config, load_recipe


def get_config(arg: str | None = None) -> Config:
    cfg = load_recipe(f"fashion_mnist:{arg}" if arg else "fashion_mnist")
    cfg.name = "fashion_mnist_teacher" + (f"-{arg}" if arg else "")
    cfg.patch.sizes, cfg.patch.default = [4], 4
    cfg.patch.distribution, cfg.patch.weights = "uniform", None  # one size: nothing to weight
    cfg.patch.eval_sizes = [2, 4, 7, 14]  # to show how a fixed-size model fares elsewhere
    cfg.model.base_patch_size, cfg.model.base_grid, cfg.optim.kernel_lr_scale = 4, 7, 1.0
    return cfg
