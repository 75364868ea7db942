"""Issue #14's batch-size study: layernorm / batchnorm / bgn at 4, 16 and 64 images per step, and bgn's
power-of-two inference scale.

    python tools/bgn_study.py [--steps 1000] [--jobs 2] [--out runs/bgn_study]
    python tools/bgn_study.py --report-only
    python tools/bgn_study.py --smoke --out /tmp/bgn_smoke --results /tmp/bgn_smoke/bgn   # seconds, numbers meaningless

Every arm is one `flexivit train fashion_mnist` run (seed 0), the recipe as it is except: ``model.norm``
(unset for layernorm), ``data.batch_size``, ``train.token_budget=0`` (every step one loader batch, so the
images per step are the batch size at every patch size) and ``train.steps`` equal for all arms. One more
arm: bgn with ``model.pow2_scale=true`` at batch 16. Runs are resumable (``flexivit.experiments.runner``: a
finished run is skipped, an interrupted one resumed, one made with other settings refused), one data
process and one thread each, ``--jobs`` at a time.

After training, in this process with one thread: every inference scale of the pow2 model is read out of
its norms' own eval forward (running mean and bias zeroed on a copy, input ones, so the output is the
scale) and checked to be a power of two exactly; batch-1 latency of the layernorm, bgn and bgn + pow2
models at batch 16, the models interleaved round-robin, median per model and patch size.

Results: ``docs/results/bgn.{md,json,png}``; the issue's targets are judged on the test split. They were
measured 2026-11-30 (6bce2d6) with the recipe of then: base 14 ``area`` at 0.02x kernel lr, 54k/6k train/val
as now, but flips 0.5 (no flips since df79d0f), so a rerun today gives other numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexivit.experiments.results import maybe_results
from flexivit.experiments.runner import RunError, RunSpec, Study

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent  # the checkout: default folders of runs and results
RECIPE = "fashion_mnist"
COMMON = ["data.num_workers=0", "train.token_budget=0"]
# Seconds instead of minutes: a few steps, a few hundred evaluation images, one checkpoint.
SMOKE = ["optim.warmup_steps=2", "data.eval_limit=128", "train.log_every=5", "train.checkpoint_every=10"]
NORMS = {"layernorm": [], "batchnorm": ["model.norm=batchnorm"], "bgn": ["model.norm=bgn"]}
BATCHES = (4, 16, 64)
POW2 = "bgn_pow2-b16"
LATENCY_ARMS = ("layernorm-b16", "bgn-b16", POW2)


def plan() -> list[tuple[str, list[str]]]:
    """(run name, --set overrides) of every arm, the longest (largest batch) first so two jobs finish together."""
    runs = [(f"{norm}-b{b}", [*sets, f"data.batch_size={b}"]) for b in sorted(BATCHES, reverse=True)
            for norm, sets in NORMS.items()]
    return runs + [(POW2, ["model.norm=bgn", "model.pow2_scale=true", "data.batch_size=16"])]


def specs(*, steps: int, smoke: bool, eval_limit: int | None) -> list[RunSpec]:
    """The run of every arm of ``plan``."""
    tail = [f"train.steps={steps}", *(SMOKE if smoke else []),
            *([f"data.eval_limit={eval_limit}"] if eval_limit else [])]
    return [RunSpec(name=name, recipe=RECIPE, sets=(*COMMON, *sets, *tail)) for name, sets in plan()]


def _scales_wrong(wrong: torch.Tensor, idx: torch.Tensor, slots: int) -> int:
    """Scales (group slot, channel) wrong at any of their tokens: ``wrong`` ``(N, D)``, token slots ``idx`` ``(N,)``."""
    return int((wrong.new_zeros(slots, wrong.shape[1]).float().index_add_(0, idx, wrong.float()) > 0).sum())


def pow2_check(run: Path) -> dict[str, Any]:
    """Read every inference scale (norm layer x patch size x group slot x channel) of ``run``'s pow2 model out
    of the layer's eval forward; count those that are not an exact power of two, and those that differ from
    the layer's ``sign * 2^k``."""
    import copy

    import torch

    from flexivit.ext.bgn import batch_norms, token_regions
    from flexivit.model.weights import load_model

    model, _ = load_model(run)
    img = model.config.img_size
    checked = not_pow2 = differ = 0
    exponents: list[int] = []
    with torch.no_grad():
        for norm in batch_norms(model):
            probe = copy.deepcopy(norm).eval()
            probe.bias.zero_()
            for patch in probe.sizes:
                probe.stats(patch)[0].zero_()  # running mean 0, bias 0, input 1: the output is the scale
                grid = (1, 1) if probe.pooled else model.scheme(patch).grid_size((img, img))
                idx = token_regions(grid, regions=probe.regions, prefix=probe.prefix, prefix_region=probe.prefix_region)
                probe.set_grid(patch, grid)
                ones = torch.ones(1, probe.dim) if probe.pooled else torch.ones(1, len(idx), probe.dim)
                scales = probe(ones).reshape(len(idx), probe.dim)  # (N, D): each token's per-channel scale
                sign, k = probe.exponents(patch)  # (S, G, C) each
                stated = torch.ldexp(sign, k).reshape(probe.slots, probe.dim)[idx]  # (N, D)
                mantissa, _ = torch.frexp(scales)  # x = m 2^e with |m| = 1/2 exactly: a power of two
                not_pow2 += _scales_wrong(mantissa.abs() != 0.5, idx, probe.slots)
                differ += _scales_wrong(scales != stated, idx, probe.slots)
                checked += probe.slots * probe.dim
                exponents += k.flatten().tolist()
    return {"run": str(run), "layers": len(batch_norms(model)), "scales_checked": checked,
            "not_power_of_two": not_pow2, "differ_from_sign_2k": differ, "k_min": min(exponents),
            "k_max": max(exponents), "sizes": list(model.config.norm_sizes)}


def latency(out: Path, *, rounds: int, calls: int) -> dict[str, Any]:
    """Batch-1 forward time (ms) per model and patch size: the models interleaved ``rounds`` times, ``calls``
    timed calls per turn after one untimed; the median of every timed call."""
    import torch

    from flexivit.model.weights import load_model

    torch.set_num_threads(1)
    models = {name: load_model(out / name)[0].eval() for name in LATENCY_ARMS}
    sizes = list(models[POW2].config.norm_sizes)
    chans, img = models[POW2].config.in_chans, models[POW2].config.img_size
    x = torch.rand(1, chans, img, img, generator=torch.Generator().manual_seed(0))
    times: dict[str, dict[int, list[float]]] = {name: {p: [] for p in sizes} for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for p in sizes:
                for name, model in models.items():
                    model(x, p)  # untimed: caches (resized kernel) and the allocator warm
                    for _ in range(calls):
                        start = time.perf_counter()
                        model(x, p)
                        times[name][p].append(1000 * (time.perf_counter() - start))
    median = {name: {str(p): statistics.median(t) for p, t in per.items()} for name, per in times.items()}
    ratio = {name: {p: m[p] / median["layernorm-b16"][p] for p in m} for name, m in median.items()}
    return {"threads": 1, "rounds": rounds, "calls_per_round": calls, "median_ms": median, "ratio_vs_layernorm": ratio}


def _read(run: Path) -> dict[str, Any] | None:
    report = maybe_results(run)
    if report is None:
        return None
    val, test = report.percent("val"), report.percent("test")
    rows = [*report.rows["val"], *report.rows["test"]]
    return {"steps": report.steps, "val": val, "test": test,
            "worst_val": min(val.values()), "worst_test": min(test.values()) if test else None,
            "eval_images": {"val": report.images("val"), "test": report.images("test")},
            "images_seen": report.images_seen, "train_minutes": report.train_seconds / 60,
            "borrowed_stats_at": sorted({r["patch_size"] for r in rows if "norm_stats_from" in r})}


def spreads(arms: dict[str, dict[str, Any]], split: str) -> dict[str, dict[str, Any]]:
    """Per norm with every batch size done: accuracy at each batch size and its spread (max - min) over them,
    of the worst size and of each patch size, on ``split`` ("val" or "test")."""
    out = {}
    for norm in NORMS:
        rows = [arms.get(f"{norm}-b{b}") for b in BATCHES]
        if not all(r and r[split] for r in rows):
            continue
        worst = [min(r[split].values()) for r in rows]
        per_size = {p: [r[split][p] for r in rows] for p in rows[0][split]}
        out[norm] = {"worst": dict(zip(map(str, BATCHES), worst)), "worst_spread": max(worst) - min(worst),
                     "size_spread": {p: max(v) - min(v) for p, v in per_size.items()}}
    return out


def targets(result: dict[str, Any]) -> list[str]:
    """The issue's targets (test split), each met or missed with its numbers, where their runs exist."""
    arms, spread, lines = result["arms"], result["spreads"]["test"], []
    if "bgn" in spread and "batchnorm" in spread:
        b, n = spread["bgn"]["worst_spread"], spread["batchnorm"]["worst_spread"]
        lines.append(f"- worst-size spread over batch 4/16/64, bgn below batchnorm: {b:.1f} vs {n:.1f} points "
                     f"({'met' if b < n else 'missed'})")
        gain = spread["bgn"]["worst"]["4"] - spread["batchnorm"]["worst"]["4"]
        lines.append(f"- bgn at batch 4 >= batchnorm at batch 4 + 2 points (worst size): {gain:+.1f} "
                     f"({'met' if gain >= 2 else 'missed'})")
    if "layernorm" in spread:
        lines.append(f"- yardstick: layernorm's worst-size spread {spread['layernorm']['worst_spread']:.1f} points")
    pow2, bgn = arms.get(POW2), arms.get("bgn-b16")
    if pow2 and bgn and pow2["test"] and bgn["test"]:
        diffs = {p: pow2["test"][p] - bgn["test"][p] for p in bgn["test"]}
        far = max(abs(d) for d in diffs.values())
        lines.append(f"- pow2 within 1 point of plain bgn (batch 16) at every size: "
                     f"{', '.join(f'p={p} {d:+.1f}' for p, d in diffs.items())} ({'met' if far <= 1 else 'missed'})")
    check = result.get("pow2_check")
    if check:
        wrong = check["not_power_of_two"] + check["differ_from_sign_2k"]
        lines.append(f"- every inference scale exactly 2^k: of {check['scales_checked']}, {check['not_power_of_two']} "
                     f"not a power of two and {check['differ_from_sign_2k']} not the layer's sign * 2^k "
                     f"({'met' if wrong == 0 else 'missed'})")
    return lines


def collect(out: Path) -> dict[str, Any]:
    arms = {name: row for name, _ in plan() if (row := _read(out / name)) is not None}
    result: dict[str, Any] = {"recipe": RECIPE, "steps": sorted({r["steps"] for r in arms.values()}),
                              "overrides": COMMON, "arms": arms,
                              "spreads": {split: spreads(arms, split) for split in ("val", "test")}}
    for key in ("pow2_check", "latency"):
        if (out / f"{key}.json").exists():
            result[key] = json.loads((out / f"{key}.json").read_text())
    result["targets"] = targets(result)
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (norm, s) in enumerate(result["spreads"]["test"].items()):
        ax.plot(BATCHES, [s["worst"][str(b)] for b in BATCHES], marker="o", color=f"C{i}", label=norm)
    pow2 = result["arms"].get(POW2)
    if pow2 and pow2["worst_test"] is not None:
        ax.plot([16], [pow2["worst_test"]], marker="*", markersize=12, linestyle="", color="C3", label="bgn + pow2")
    ax.set_xscale("log", base=2)
    ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
    ax.minorticks_off()
    ax.set_xlabel("images per step (token budget off)")
    ax.set_ylabel("worst-size test top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{RECIPE}, {_steps(result)} steps, seed 0", fontsize=9)
    fig.savefig(str(path), dpi=120)


def _steps(result: dict[str, Any]) -> str:
    return "/".join(map(str, result["steps"])) or "no"


def _cells(values: dict[str, float]) -> str:
    return " | ".join(f"{values[p]:.1f}" for p in sorted(values, key=int))


def write(result: dict[str, Any], results: Path) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if result["spreads"]["test"]:
        _plot(result, results.with_suffix(".png"))
    arms = result["arms"]
    sizes = sorted(next(iter(arms.values()))["val"], key=int) if arms else []
    head = " | ".join(f"p={p}" for p in sizes)
    seen = sorted({(r["eval_images"]["val"], r["eval_images"]["test"]) for r in arms.values()})
    lines = ["# Batch-statistics norms at 4, 16 and 64 images per step (issue 14)", "",
             f"`python tools/bgn_study.py --steps {_steps(result)}`: recipe `{RECIPE}`, seed 0, {_steps(result)} steps "
             f"for every arm, overrides {', '.join(f'`{o}`' for o in result['overrides'])} and the arm's norm and batch "
             f"size. Top-1 (%) per patch size on {' or '.join(f'{v} validation and {t} test' for v, t in seen)} images. "
             "Training minutes: one thread each, two runs at a time on the 2 development cores.", "",
             f"| arm | split | {head} | worst | images seen | training min |", "|---|---|" + "---:|" * (len(sizes) + 3)]
    for name, r in arms.items():
        for split in ("val", "test"):
            if r[split]:
                lines.append(f"| {name} | {split} | {_cells(r[split])} | {min(r[split].values()):.1f} | "
                             f"{r['images_seen']} | {r['train_minutes']:.1f} |")
    for split, per_norm in result["spreads"].items():
        if per_norm:
            lines += ["", f"## Spread over batch 4 / 16 / 64 ({split}; max - min, points)", "",
                      f"| norm | worst at 4 / 16 / 64 | worst-size spread | {head} |",
                      "|---|---|---:|" + "---:|" * len(sizes)]
            for norm, s in per_norm.items():
                worst = " / ".join(f"{s['worst'][str(b)]:.1f}" for b in BATCHES)
                lines.append(f"| {norm} | {worst} | {s['worst_spread']:.1f} | {_cells(s['size_spread'])} |")
    check = result.get("pow2_check")
    if check:
        lines += ["", "## Power-of-two inference scale", "",
                  f"`{POW2}`: {check['scales_checked']} inference scales ({check['layers']} norm layers x patch sizes "
                  f"{check['sizes']} x group slots x channels), each read from the layer's eval forward; "
                  f"{check['not_power_of_two']} not an exact power of two, {check['differ_from_sign_2k']} not the "
                  f"layer's sign * 2^k; k from {check['k_min']} to {check['k_max']}."]
    lat = result.get("latency")
    if lat:
        lines += ["", "## Batch-1 latency (CPU, 1 thread)", "",
                  f"Models interleaved round-robin, {lat['rounds']} rounds x {lat['calls_per_round']} timed calls per "
                  "model and size; median ms (ratio to layernorm).", "",
                  f"| model | {' | '.join(f'p={p}' for p in next(iter(lat['median_ms'].values())))} |",
                  "|---|" + "---:|" * len(next(iter(lat["median_ms"].values())))]
        for name, per in lat["median_ms"].items():
            lines.append(f"| {name} | " + " | ".join(f"{ms:.2f} ({lat['ratio_vs_layernorm'][name][p]:.2f}x)"
                                                       for p, ms in per.items()) + " |")
    if result["targets"]:
        lines += ["", "## The issue's targets (test split)", "", *result["targets"]]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps of every arm (default 1000; --smoke 10)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, help="score the first N validation and N test images only "
                        "(default: all, 6000 and 10000); evaluation is about a third of the study's time")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bgn_study")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "bgn")
    parser.add_argument("--report-only", action="store_true", help="aggregate finished work, train nothing")
    parser.add_argument("--smoke", action="store_true", help="a few steps and 128 evaluation images per arm, to "
                        "check the tool in seconds; write it under /tmp (--out, --results)")
    args = parser.parse_args()
    steps = args.steps or (10 if args.smoke else 1000)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.report_only:
        try:
            Study(args.out, jobs=args.jobs).run_all(specs(steps=steps, smoke=args.smoke, eval_limit=args.eval_limit))
        except RunError as err:
            parser.exit(1, f"{parser.prog}: error: {err}\n")
        if not (args.out / "pow2_check.json").exists():
            (args.out / "pow2_check.json").write_text(json.dumps(pow2_check(args.out / POW2), indent=2) + "\n")
        if not (args.out / "latency.json").exists():
            timing = latency(args.out, rounds=2 if args.smoke else 10, calls=3 if args.smoke else 20)
            (args.out / "latency.json").write_text(json.dumps(timing, indent=2) + "\n")
    write(collect(args.out), args.results)


if __name__ == "__main__":
    main()
