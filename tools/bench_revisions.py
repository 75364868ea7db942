"""Training speed of this checkout against another git revision, side by side in one run.

    python tools/bench_revisions.py --base 0ded764 [--recipe fashion_mnist] [--steps 300] [--repeats 3]
        [--set k=v ...] [--out docs/results/bench_revisions]

The base revision is checked out into a temporary git worktree; both trees train the same recipe for
``--steps`` steps on this machine, alternating (base, head, base, head, ...) so that a noisy shared
machine slows both alike, and the training loop's img/s per patch size (from each run's log.jsonl, the
first log window dropped as warm-up) is compared as the median ratio head / base. Writes ``OUT.json`` and
``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUN = "import sys; from flexivit.train.config import load_recipe; from flexivit.train.loop import train; " \
      "train(load_recipe(sys.argv[1], sys.argv[3:]), out_dir=sys.argv[2])"


def _img_s(tree: Path, recipe: str, overrides: list[str], out: Path) -> dict[str, float]:
    """Train once in ``tree``; the mean img/s per patch size over the log windows after the first."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-c", RUN, recipe, str(out), *overrides], cwd=tree, env=env, check=True,
                   capture_output=True, text=True)
    windows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "per_patch" in w][1:]
    patches = sorted({p for w in windows for p in w["per_patch"]}, key=int)
    return {p: statistics.mean(w["per_patch"][p]["img_s"] for w in windows if p in w["per_patch"]) for p in patches}


def measure(*, base: str, recipe: str, steps: int, repeats: int, overrides: list[str]) -> dict[str, Any]:
    sets = [f"train.steps={steps}", f"train.log_every={max(steps // 6, 1)}", "train.checkpoint_every=1000000",
            "data.eval_limit=256", *overrides]
    runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for i in range(repeats):
                for name, where in (("base", tree), ("head", ROOT)):
                    runs[name].append(_img_s(where, recipe, sets, Path(tmp) / f"{name}-{i}"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    patches = sorted(runs["head"][0], key=int)
    ratios = {p: statistics.median(h[p] / b[p] for h, b in zip(runs["head"], runs["base"])) for p in patches}
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"base": base, "head": f"{head} + working tree", "recipe": recipe, "steps": steps, "repeats": repeats,
            "user_overrides": overrides, "overrides": sets, "img_s": runs, "ratio_head_over_base": ratios}


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Training speed: {result['head']} vs {result['base']}", "",
             f"`python tools/bench_revisions.py --base {result['base']} --recipe {result['recipe']} --steps "
             f"{result['steps']} --repeats {result['repeats']}"
             + "".join(f" --set {o}" for o in result.get("user_overrides", [])) + "`; runs alternate base/head on "
             "one machine; img/s of the training loop per patch size, first log window dropped.", "",
             "| patch | base img/s (median) | head img/s (median) | head / base (median of paired ratios) |",
             "|---:|---:|---:|---:|"]
    for p, ratio in result["ratio_head_over_base"].items():
        b = statistics.median(r[p] for r in result["img_s"]["base"])
        h = statistics.median(r[p] for r in result["img_s"]["head"])
        lines.append(f"| {p} | {b:.0f} | {h:.0f} | {ratio:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--recipe", default="fashion_mnist")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_revisions")
    args = parser.parse_args()
    result = measure(base=args.base, recipe=args.recipe, steps=args.steps, repeats=args.repeats, overrides=args.overrides)
    write(result, args.out)
    print(json.dumps(result["ratio_head_over_base"], indent=2))


if __name__ == "__main__":
    main()
