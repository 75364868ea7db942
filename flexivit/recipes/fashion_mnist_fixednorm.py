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

How the numbers were chosen (`tools/fixednorm_study.py`, `docs/results/fixednorm.md`, from the quickstart
model, validation split, seed 0): `optim.elr` = 0.03 won the five-value `SEARCH_GRID` below (100x in
half-decade steps) at the worst size, 70.9 %, tying the best of a 15-trial AdamW grid (lr 1e-3, weight
decay 0.3: 70.9 %); over seeds 0/1/2 on the test split it gave 69.2 ± 0.3 % at the worst size against
AdamW's 68.8 ± 0.2 %. The head's S: 1 / 2 / 4 gave 70.4 / 70.9 / 71.2 % (one seed; S = 4's lead is within
the seed spread, so the default stays 2, the value the test rows were measured with). Measured 2026-11-29
(54123b8) with the quickstart of then (base 14 area at 0.02x kernel lr, 10 % of train held out, as now, but
flips 0.5) and the fine-tune recipe's size weights of then (0.4 / 0.25 / 0.25 / 0.1); this recipe now
inherits no flips and the weights 0.2 / 0.2 / 0.4 / 0.2, so a rerun gives other numbers. Its `optim.lr` is
pinned at the 1e-3 of then.
"""

from flexivit.train.config import Config, load_recipe

SEARCH_GRID = ["optim.elr=0.001,0.003,0.01,0.03,0.1"]


def get_config(arg: str | None = None) -> Config:
    cfg = load_recipe(f"fashion_mnist_finetune:{arg}" if arg else "fashion_mnist_finetune")
    cfg.name = "fashion_mnist_fixednorm" + (f"-{arg}" if arg else "")
    cfg.model.scale_invariant, cfg.model.si_norm, cfg.model.si_head_scale = "all", "matrix", 2.0
    cfg.optim.fixed_norm, cfg.optim.elr = True, 0.03
    cfg.optim.lr = 1e-3  # the tensors outside the fixed norm: the lr the ELR was searched with (the parent's is 4e-3)
    return cfg
