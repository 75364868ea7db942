"""Quickstart: one FlexiViT on Fashion-MNIST at 28 px that works at patch sizes 2, 4, 7 and 14.

    flexivit train fashion_mnist            # full run
    flexivit train fashion_mnist:smoke      # a few steps, for tests

Hardware and results are filled in from measured runs (see README, "Quickstart").
"""

from flexivit.config import Config, DataConfig, ModelConfig, OptimConfig, PatchConfig, TrainConfig


def get_config(arg: str | None = None) -> Config:
    cfg = Config(
        name="fashion_mnist",
        model=ModelConfig(variant="flexi_vit_micro", base_patch_size=14, base_grid=7, kernel_antialias=True),
        data=DataConfig(source="fashion-mnist", image_size=28, batch_size=128, scale=(0.8, 1.0)),
        patch=PatchConfig(sizes=[2, 4, 7, 14], distribution="uniform"),
        optim=OptimConfig(lr=3e-3, weight_decay=0.05, warmup_steps=100),
        train=TrainConfig(steps=1600, log_every=50, checkpoint_every=400),
    )
    if arg == "smoke":
        cfg.name = "fashion_mnist-smoke"
        cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 200, 25, 100
        cfg.data.batch_size = 64
        cfg.optim.warmup_steps = 10
        cfg.data.eval_limit = 1000
    elif arg is not None:
        raise ValueError(f"fashion_mnist recipe takes no argument or 'smoke', got {arg!r}")
    return cfg
