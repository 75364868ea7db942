"""Training throughput of the flexible trainer vs the same trainer at one fixed patch size.

    OMP_NUM_THREADS=1 python tools/bench_train.py      # writes docs/results/bench_train.{md,json}; ~27 min
    OMP_NUM_THREADS=1 python tools/bench_train.py --steps 12 --repeats 4   # ~10 min, the setting of the file
    python tools/bench_train.py --smoke --out /tmp/b

For each patch size p of the quickstart recipe, the img/s of the steps that drew p in a run sampling
all sizes is compared with the img/s of a run that trains only at p (no sampling), through the trainer
``flexivit train`` runs (``flexivit.train.loop.train``: data loading, sampler, objective, optimizer with
the recipe's parameter groups, logging). Runs are repeated in alternation and medians taken, since these
machines are shared and noisy. Also reported: the share of step time spent waiting for data. Target:
flexible / fixed >= 0.97 at every size. The result files go through ``flexivit.provenance.write_result``
and keep every log window's img/s, per repeat. Results: docs/results/bench_train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the checkout: default folder of results
DEFAULT_STEPS, DEFAULT_REPEATS = 40, 3


def _run(recipe: str, overrides: list[str], out: Path) -> list[dict[str, Any]]:
    """Train one configuration; returns its log windows (all but the first, which holds warm-up)."""
    from flexivit.train.config import load_recipe
    from flexivit.train.loop import train

    train(load_recipe(recipe, overrides), out_dir=out)
    windows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [w for w in windows if "per_patch" in w][1:]


def _img_s(windows: list[dict[str, Any]], patch: int) -> list[float]:
    return [w["per_patch"][str(patch)]["img_s"] for w in windows if str(patch) in w["per_patch"]]


def measure(*, recipe: str, sizes: list[int], steps: int, repeats: int, batch: int, work: Path) -> dict[str, Any]:
    # One batch per step for both, sizes drawn uniformly: the comparison is the cost of sampling, not of
    # token budgets or of the recipe's weights.
    common = [f"data.batch_size={batch}", "data.eval_limit=64", "train.checkpoint_every=1000000", "train.token_budget=0",
              f"train.log_every={max(steps // 8, 1)}", f"patch.sizes={','.join(map(str, sizes))}",
              "patch.distribution=uniform", "patch.weights=none"]
    # {patch: one list of log-window img/s per repeat (train.seed = repeat)}
    flexi: dict[int, list[list[float]]] = {p: [] for p in sizes}
    fixed: dict[int, list[list[float]]] = {p: [] for p in sizes}
    waits: list[float] = []
    for r in range(repeats):
        sampled = _run(recipe, common + [f"train.steps={steps * len(sizes)}", f"train.seed={r}"], work / f"flexi{r}")
        waits += [w["data_wait_share"] for w in sampled]
        for p in sizes:
            flexi[p].append(_img_s(sampled, p))
            single = _run(recipe, common + [f"patch.sizes={p}", f"patch.default={p}", f"train.steps={steps}",
                                            f"train.seed={r}"], work / f"fixed{p}-{r}")
            fixed[p].append(_img_s(single, p))
            waits += [w["data_wait_share"] for w in single]
    rows = []
    for p in sizes:
        f = statistics.median(v for per_repeat in flexi[p] for v in per_repeat)
        x = statistics.median(v for per_repeat in fixed[p] for v in per_repeat)
        per_repeat = [statistics.median(a) / statistics.median(b) for a, b in zip(flexi[p], fixed[p])]
        rows.append({"patch_size": p, "flexi_img_s": f, "fixed_img_s": x, "ratio": f / x,
                     "ratio_per_repeat": per_repeat, "windows": [sum(map(len, flexi[p])), sum(map(len, fixed[p]))],
                     "flexi_window_img_s": flexi[p], "fixed_window_img_s": fixed[p]})
    return {"rows": rows, "data_wait_share_median": statistics.median(waits), "data_wait_share_max": max(waits),
            "data_wait_shares": waits}


def markdown(result: dict[str, Any]) -> str:
    steps, repeats, sizes = result["steps"], result["repeats"], [r["patch_size"] for r in result["rows"]]
    smaller = ("" if (steps, repeats) == (DEFAULT_STEPS, DEFAULT_REPEATS) else
               f" This is a smaller setting than the tool's default ({DEFAULT_STEPS} steps, {DEFAULT_REPEATS} "
               "repeats), chosen so the run fits about 15 minutes on this machine; fewer windows, wider spread.")
    lines = [
        "# Trainer throughput: sampling patch sizes vs one fixed size",
        "",
        f"The quickstart recipe through `flexivit.train.loop.train`, batch {result['batch']} per step, no token budget, "
        f"sizes {', '.join(map(str, sizes))} drawn uniformly: per repeat, one run sampling every size for "
        f"{steps * len(sizes)} steps, then one run of {steps} steps at each size alone, alternating, {repeats} "
        f"repeats (train.seed = repeat). img/s: images over step time of the steps at that size, per log window "
        f"(every {max(steps // 8, 1)} steps, the first window of each run dropped as warm-up); medians over all "
        f"windows; ratio = flexible / fixed.{smaller} Wall time {result['wall_s']:.0f} s.",
        "",
        "| patch | flexible img/s | fixed img/s | ratio (target >= 0.97) | ratio per repeat | windows (flexible / fixed) |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        mark = "" if r["ratio"] >= 0.97 else " (miss)"
        lines.append(f"| {r['patch_size']} | {r['flexi_img_s']:.0f} | {r['fixed_img_s']:.0f} | {r['ratio']:.3f}{mark} | "
                     f"{', '.join(f'{x:.3f}' for x in r['ratio_per_repeat'])} | {r['windows'][0]} / {r['windows'][1]} |")
    lines += ["", f"Share of step time waiting for data: median {100 * result['data_wait_share_median']:.1f} %, "
                  f"max {100 * result['data_wait_share_max']:.1f} %."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget (for tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on shared CPUs)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per fixed run (flexible: x number of sizes)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from flexivit.provenance import write_result

    torch.set_num_threads(args.threads)
    sizes, steps, repeats, batch = ([4, 7], 16, 1, 32) if args.smoke else ([2, 4, 7, 14], args.steps, args.repeats, 128)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        result = measure(recipe="fashion_mnist", sizes=sizes, steps=steps, repeats=repeats, batch=batch, work=Path(work))
    result.update(
        seeds=list(range(repeats)), split="train (throughput of training steps; no accuracy is reported)",
        wall_s=time.perf_counter() - start, steps=steps, repeats=repeats, batch=batch, sizes=sizes,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )
    _, md_path = write_result(args.out / "bench_train", result, markdown(result),
                              command=["python", "tools/bench_train.py", *sys.argv[1:]])
    print(md_path.read_text())


if __name__ == "__main__":
    main()
