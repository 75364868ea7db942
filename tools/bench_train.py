"""Training throughput of the flexible trainer vs the same trainer at one fixed patch size.

    python tools/bench_train.py                 # writes docs/results/bench_train.{md,json}
    python tools/bench_train.py --smoke --out /tmp/b

For each patch size p of the quickstart recipe, the img/s of the steps that drew p in a run sampling
all sizes is compared with the img/s of a run that trains only at p (no sampling), through the real
trainer (data loading, sampler, logging, optimizer). Runs are repeated in alternation and medians
taken, since these machines are shared and noisy. Also reported: the share of step time spent waiting
for data. Target: flexible / fixed >= 0.97 at every size. Results: docs/results/bench_train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the checkout: default folder of results


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
    flexi: dict[int, list[float]] = {p: [] for p in sizes}
    fixed: dict[int, list[float]] = {p: [] for p in sizes}
    waits: list[float] = []
    for r in range(repeats):
        sampled = _run(recipe, common + [f"train.steps={steps * len(sizes)}", f"train.seed={r}"], work / f"flexi{r}")
        waits += [w["data_wait_share"] for w in sampled]
        for p in sizes:
            flexi[p] += _img_s(sampled, p)
            single = _run(recipe, common + [f"patch.sizes={p}", f"patch.default={p}", f"train.steps={steps}",
                                            f"train.seed={r}"], work / f"fixed{p}-{r}")
            fixed[p] += _img_s(single, p)
            waits += [w["data_wait_share"] for w in single]
    rows = []
    for p in sizes:
        f, x = statistics.median(flexi[p]), statistics.median(fixed[p])
        rows.append({"patch_size": p, "flexi_img_s": f, "fixed_img_s": x, "ratio": f / x,
                     "windows": [len(flexi[p]), len(fixed[p])]})
    return {"rows": rows, "data_wait_share_median": statistics.median(waits), "data_wait_share_max": max(waits)}


def write(result: dict[str, Any], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Trainer throughput: sampling patch sizes vs one fixed size",
        "",
        f"Command: `{command}`  ",
        f"Hardware: {result['hardware']}; wall time {result['wall_s']:.0f} s.",
        "",
        "| patch | flexible img/s | fixed img/s | ratio (target >= 0.97) |",
        "|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        mark = "" if r["ratio"] >= 0.97 else " (miss)"
        lines.append(f"| {r['patch_size']} | {r['flexi_img_s']:.0f} | {r['fixed_img_s']:.0f} | {r['ratio']:.3f}{mark} |")
    lines += ["", f"Share of step time waiting for data: median {100 * result['data_wait_share_median']:.1f} %, "
                  f"max {100 * result['data_wait_share_max']:.1f} %."]
    (out / "bench_train.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget (for tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on shared CPUs)")
    parser.add_argument("--steps", type=int, default=40, help="steps per fixed run (flexible: x number of sizes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    sizes, steps, repeats, batch = ([4, 7], 16, 1, 32) if args.smoke else ([2, 4, 7, 14], args.steps, args.repeats, 128)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        result = measure(recipe="fashion_mnist", sizes=sizes, steps=steps, repeats=repeats, batch=batch, work=Path(work))
    result.update(
        hardware=f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch threads = "
                 f"{args.threads}, torch {torch.__version__}, CPU only",
        wall_s=time.perf_counter() - start, steps=steps, repeats=repeats, batch=batch,
    )
    write(result, args.out, "python tools/bench_train.py" + (" --smoke" if args.smoke else ""))
    print((args.out / "bench_train.md").read_text())


if __name__ == "__main__":
    main()
