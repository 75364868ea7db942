"""Fixed-norm fine-tuning with one knob, the equivalent learning rate (docs/scale_invariant.md).

    flexivit finetune runs/fashion_mnist fashion_mnist_fixednorm             # at the recipe's ELR
    flexivit search fashion_mnist_fixednorm --init runs/fashion_mnist         # the ELR grid below, on validation
    flexivit search fashion_mnist_fixednorm --init runs/fashion_mnist --then-train   # ... then the winner on test

The task, schedule and patch sizes of `fashion_mnist_finetune` (the four upper-body garments, 400 steps,
sizes 2, 4, 7, 14 sampled). Every Linear and the base patch kernel of the checkpoint become
scale-invariant with S = their trained norm, so training starts from the checkpoint's own function; the
new head's S is 2 (the trained 10-class head of the model below has a Frobenius norm of 2.5, about 1.6
for four of its rows). AdamW keeps every scale-invariant weight at its starting norm, without weight
decay, and turns it by about `optim.elr` radians per update or less; the remaining tensors (biases, norms,
position grid) keep `optim.lr`.

How the numbers were chosen (a calibration, not issue #12's measurement): in a 1200-step Fashion-MNIST
FlexiViT of the quickstart's shape the Linear weights have an RMS of 0.03-0.06 and the base kernel 0.24,
so the AdamW fine-tune's lr 1e-3 turns them by about 0.02 and 0.004 radians per step; `optim.elr` = 0.01
lies between, and `SEARCH_GRID` spans 100x around it in five values, as wide as an AdamW grid of five
learning rates over 100x. A 100-step sanity check from that model (`--set train.steps=100`, one seed,
4000 test images, 2 shared CPU cores, 0.5 min of training): 56.1 / 62.9 / 64.9 / 61.5 % at patch
2 / 4 / 7 / 14, against 58.7 / 64.4 / 66.7 / 62.1 % for `fashion_mnist_finetune` (AdamW) at the same budget.
"""

from flexivit.config import Config, load_recipe

SEARCH_GRID = ["optim.elr=0.001,0.003,0.01,0.03,0.1"]


def get_config(arg: str | None = None) -> Config:
    cfg = load_recipe(f"fashion_mnist_finetune:{arg}" if arg else "fashion_mnist_finetune")
    cfg.name = "fashion_mnist_fixednorm" + (f"-{arg}" if arg else "")
    cfg.model.scale_invariant, cfg.model.si_norm, cfg.model.si_head_scale = "all", "matrix", 2.0
    cfg.optim.fixed_norm, cfg.optim.elr = True, 0.01
    return cfg
