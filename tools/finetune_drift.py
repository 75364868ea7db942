"""Issue 27, part 1: where a fixed-size fine-tune loses the other patch sizes. Fine-tunes a pretrained FlexiViT at
one patch size (``flexivit finetune --patch-size P``) at a few learning rates, logs validation top-1 at every
size every ``--eval-every`` steps, and measures how far each part of the network moved from the pretrained
weights (``flexivit.eval.probe.parameter_drift``: ||w - w0|| / ||w0|| per part).

    python tools/finetune_drift.py --pretrained runs/quickstart --mnist5k data/mnist5k --patch-size 14 \\
        --lr-scales 0.075 0.25 1 --steps 400 --eval-every 50 --out runs/drift --results docs/results/finetune_drift

The task is ``fashion_mnist_finetune`` (four upper-body garments), or with ``--mnist5k DIR`` the MNIST-5k digits
(``tools/make_mnist5k.py``), all ten classes. ``--lr-scales`` multiply the recipe's learning rate
(``finetune.fixed_lr_scale``; 0.075, i.e. 3e-4, was the recipe's plain `--patch-size` setting when it ran); the pull is
the recipe's. Validation split only (``train.test_eval=false``). Runs go through ``flexivit.experiments.runner``:
a finished run is skipped, an interrupted one resumed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flexivit.eval.probe import parameter_drift
from flexivit.experiments.results import eval_by_step
from flexivit.experiments.runner import Study
from flexivit.experiments.search import run_spec, task_sets
from flexivit.provenance import write_result
from flexivit.train.config import load_recipe
from flexivit.train.finetune import fixed_size

RECIPE = "fashion_mnist_finetune"


def run_sets(base: list[str], scale: float, steps: int, eval_every: int) -> list[str]:
    # consistency=0: the plain fixed fine-tune this tool measures (the consistency term became --patch-size's default)
    return [*base, "finetune.consistency=0", f"finetune.fixed_lr_scale={scale:g}", f"train.steps={steps}", f"train.eval_every={eval_every}",
            "train.checkpoint_every=1000000", "train.test_eval=false"]


def markdown(payload: dict[str, Any]) -> str:
    runs = payload["runs"]
    lines = [f"# Fixed fine-tune at patch {payload['patch_size']} from {payload['pretrained']}: where the other sizes "
             "go", "", f"Task: {payload['task']}; {payload['steps']} steps; validation top-1 (%) at each size every "
             f"{payload['eval_every']} steps.", ""]
    for run in runs:
        sizes = list(next(iter(run["val_by_step"].values())))
        lines += [f"## lr {run['lr']:g} (fixed_lr_scale {run['scale']:g})", "",
                  "| step | " + " | ".join(f"p={p}" for p in sizes) + " |", "|---:|" + "---:|" * len(sizes)]
        lines += [f"| {step} | " + " | ".join(f"{100 * v[p]:.1f}" for p in sizes) + " |"
                  for step, v in run["val_by_step"].items()]
        lines.append("")
    groups = [r["group"] for r in runs[0]["drift"]]
    lines += ["## Parameter drift ||w - w0|| / ||w0|| from the pretrained weights", "",
              "| part | " + " | ".join(f"lr {r['lr']:g}" for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    for i, group in enumerate(groups):
        cells = ["new head" if r["drift"][i]["rel_change"] is None else f"{r['drift'][i]['rel_change']:.4f}"
                 for r in runs]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", type=Path, required=True, help="the pretrained run to fine-tune")
    p.add_argument("--mnist5k", type=Path, help="the digits task's image folder (default: the recipe's tops task)")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--lr-scales", type=float, nargs="+", default=[0.075, 1.0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", type=Path, required=True, help="study folder: one run folder per learning rate")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="another recipe override for every run (repeatable)")
    p.add_argument("--results", type=Path, required=True, help="result stem: writes STEM.json and STEM.md")
    args = p.parse_args(argv)
    base = [*task_sets("digits" if args.mnist5k else "tops", args.mnist5k), *args.sets]
    specs, lrs = [], []
    for scale in args.lr_scales:
        sets = run_sets(base, scale, args.steps, args.eval_every)
        specs.append(run_spec(f"ft-p{args.patch_size}-scale{scale:g}", sets, recipe=RECIPE,
                              init=str(args.pretrained), args=["--patch-size", str(args.patch_size)]))
        lrs.append(fixed_size(load_recipe(RECIPE, sets), args.patch_size).optim.lr)
    study = Study(args.out, jobs=1)
    study.run_all(specs)
    runs = [{"run": str(args.out / s.name), "scale": scale, "lr": lr,
             "val_by_step": eval_by_step(args.out / s.name),
             "drift": parameter_drift(args.pretrained, args.out / s.name)}
            for s, scale, lr in zip(specs, args.lr_scales, lrs)]
    payload = {"pretrained": str(args.pretrained), "task": "MNIST-5k digits" if args.mnist5k else "tops",
               "patch_size": args.patch_size, "steps": args.steps, "eval_every": args.eval_every,
               "seeds": [0], "split": "val", "runs": runs}
    files = write_result(args.results, payload, markdown(payload), trained_at=study.trained_at(specs))
    print(f"wrote {', '.join(map(str, files))}")


if __name__ == "__main__":
    main()
