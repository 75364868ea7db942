"""ImageNet-1k run card for GPUs: FlexiViT-S or -B at 240 px over patch sizes 8..48, as in the paper.

    accelerate launch -m flexivit train imagenet:s --data hf:/path/to/imagenet-1k
    accelerate launch -m flexivit train imagenet:b --data hf:/path/to/imagenet-1k
    flexivit train imagenet:smoke --data path/to/folder   # 8 steps of the S card, for tests and tools/gpu_check.py

Meant for 8 GPUs with bf16 (global batch 8 x 128 = 1024). Not run in CI and not yet measured by us:
there is no GPU in our CI, so this card states a configuration, not a result. The data must be a local
copy or an HF cache of ImageNet-1k with `image`/`label` columns and `train`/`validation` splits.
"""

from flexivit.train.config import Config, DataConfig, ModelConfig, OptimConfig, PatchConfig, TrainConfig

# Every size divides 240, so each gives a whole token grid (240/8 = 30 ... 240/48 = 5 tokens a side).
SIZES = [8, 10, 12, 15, 16, 20, 24, 30, 40, 48]
EPOCHS = 90
IMAGES = 1_281_167
GLOBAL_BATCH = 8 * 128


def get_config(arg: str | None = None) -> Config:
    small = "flexi_vit_small"
    variant = {"s": small, "b": "flexi_vit_base", "smoke": small, None: small}.get(arg)
    if variant is None:
        raise ValueError(f"imagenet recipe takes 's', 'b' or 'smoke', got {arg!r}")
    cfg = Config(
        name=f"imagenet-{arg or 's'}",
        model=ModelConfig(variant=variant, base_patch_size=32, base_grid=7, drop_path_rate=0.1),
        data=DataConfig(
            source="hf:imagenet-1k", image_size=240, channels=3, batch_size=128, eval_batch_size=256,
            num_workers=8, split_train="train", split_test="validation", val_fraction=0.01, scale=(0.08, 1.0),
            randaugment="rand-m9-mstd0.5", crop_pct=0.875, mixup=0.2, label_smoothing=0.1,
        ),
        patch=PatchConfig(sizes=SIZES, distribution="uniform", default=16, eval_sizes=[8, 12, 16, 24, 30, 48]),
        optim=OptimConfig(lr=1e-3, weight_decay=0.05, warmup_steps=10_000, min_lr=1e-6, clip_grad=1.0),
        train=TrainConfig(
            steps=EPOCHS * IMAGES // GLOBAL_BATCH,  # 90 epochs: 112,602 steps at 1024 images a step
            mixed_precision="bf16", log_every=100, eval_every=5_000, checkpoint_every=2_000,
        ),
    )
    if arg == "smoke":  # the S card's data path, augmentation, sizes and precision; a few small steps
        cfg.name = "imagenet-smoke"
        cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.num_workers, cfg.data.eval_limit = 8, 16, 2, 64
        cfg.optim.warmup_steps = 2
        cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.train.checkpoint_every = 8, 2, 0, 4
    return cfg
