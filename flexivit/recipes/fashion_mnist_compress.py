"""A compact model derived from the quickstart model (docs/compress.md).

    flexivit compress runs/fashion_mnist fashion_mnist_compress           # bridge + LUT-Q 4 + 4-bit targets
    flexivit compress runs/fashion_mnist fashion_mnist_compress:lutq      # LUT-Q 4 only (every block kept)
    flexivit compress runs/fashion_mnist fashion_mnist_compress:bridge    # the bridge only (float weights)
    flexivit compress runs/fashion_mnist fashion_mnist_compress:smoke     # both, 20 steps (CI)

The quickstart's data, patch sampling and token budget; the derived model starts from the base with its
last two blocks (of four) replaced by one least-squares bridge, one map per patch size, and every block
Linear tied to 4 values, and trains 400 steps on the base's outputs at patch 7 (its most accurate size)
quantised to 4 bits per class probability. Learning rate and warmup are a fine-tune's: the derived model
starts close to a trained one. Add ``--set train.steps=0`` for the training-free derived model.
"""

from flexivit.train.config import Config, load_recipe


def get_config(arg: str | None = None) -> Config:
    cfg = load_recipe("fashion_mnist")
    cfg.name = "fashion_mnist_compress" + (f"-{arg}" if arg else "")
    cfg.train.steps, cfg.train.checkpoint_every = 400, 200
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 50
    cfg.distill.teacher_patch_size, cfg.distill.quantize = 7, "bits:4"
    c = cfg.compress
    c.bridges, c.bridge_per_size, c.lutq_k = ["2:4"], True, 4
    if arg == "lutq":
        c.bridges = []
    elif arg == "bridge":
        c.lutq_k = None
    elif arg == "smoke":
        cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 20, 10, 10
        cfg.optim.warmup_steps = 5
        cfg.data.eval_limit = 500
        c.calib_images = 128
    elif arg is not None:
        raise ValueError(f"fashion_mnist_compress recipe takes no argument, 'lutq', 'bridge' or 'smoke', got {arg!r}")
    return cfg
