"""Teacher for distillation: the quickstart's network trained at one small patch size (4, 49 tokens).

    flexivit train fashion_mnist_teacher        # writes runs/fashion_mnist_teacher
    flexivit train fashion_mnist_teacher:smoke

It is a plain fixed-patch ViT in function: every step uses patch 4 (its kernel is stored at the
quickstart's base size, 4x4, so a student initialised from it gets the same base kernel shape).
Measured results are in docs/distillation.md.
"""

from flexivit.config import Config, load_recipe


def get_config(arg: str | None = None) -> Config:
    cfg = load_recipe(f"fashion_mnist:{arg}" if arg else "fashion_mnist")
    cfg.name = "fashion_mnist_teacher" + (f"-{arg}" if arg else "")
    cfg.patch.sizes, cfg.patch.default = [4], 4
    cfg.patch.distribution, cfg.patch.weights = "uniform", None  # one size: nothing to weight
    cfg.patch.eval_sizes = [2, 4, 7, 14]  # to show how a fixed-size model fares elsewhere
    return cfg
