"""``torch.compile`` once for every patch size, measured on the quickstart model.

For each of the quickstart's patch sizes (``flexi_vit_micro`` as ``recipes/fashion_mnist.py`` builds it
through the trainer's own builders: 28 px, a 14x14 base kernel resized by the area operator, p = 2, 4, 7, 14,
a step's batch from the recipe's token budget) this records, in one process:
- the graphs dynamo builds when that size first trains, then first evaluates (batch 64, then batch 1),
  and how long those first calls take (compile time = first call minus a steady call);
- steady train-step time (the trainer's step: the recipe's objective, backward, gradient clipping and its
  AdamW with the recipe's parameter groups, the kernel's learning-rate scale included) and eval-forward time (``no_grad``,
  batch 64 and batch 1), compiled (``flexivit.model.compile.compile_model``) vs eager, as speedups
  (eager time / compiled time) from timed blocks that alternate (ABBA) between the compiled model, the
  eager one and a second eager model; the second one's ratio to the first is the noise floor (A/A).
Compile times are cold: inductor gets a fresh cache directory unless ``TORCHINDUCTOR_CACHE_DIR`` is set.
Inputs are random tensors of the recipe's shapes (no data is read). The result files go through
``flexivit.provenance.write_result`` and keep every timed block's time, per model, beside the medians.

    OMP_NUM_THREADS=1 python tools/bench_compile.py                       # a few minutes on 2 shared cores
    python tools/bench_compile.py --smoke --backend aot_eager --out /tmp/bc   # seconds (tests)
"""

from __future__ import annotations

import os
import shutil
import tempfile

_CACHE = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="bench_compile_")
if _CACHE:  # set before torch is imported, so that inductor reads it
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch import nn  # noqa: E402

from flexivit.model.compile import compile_model, graph_count  # noqa: E402
from flexivit.model.patch_embed import PatchScheme  # noqa: E402
from flexivit.provenance import write_result  # noqa: E402
from flexivit.train.builders import build_model  # noqa: E402
from flexivit.train.config import Config, load_recipe  # noqa: E402
from flexivit.train.distill import ViewSpec  # noqa: E402
from flexivit.train.objective import Objective, build_objective  # noqa: E402
from flexivit.train.optim import build_optimizer  # noqa: E402
from flexivit.train.step_batches import loader_batches  # noqa: E402

Step = Callable[[], None]
MODELS = ("compiled", "eager", "twin")  # twin: a second eager model, the A/A control
EVAL_BATCHES = (64, 1)  # flexivit eval's throughput and latency batches


def quickstart(smoke: bool) -> tuple[Config, nn.Module, dict[int, int]]:
    """The recipe, its model (built as ``flexivit train`` builds it) and ``{patch: images per training step}``."""
    overrides = ["data.image_size=16", "patch.sizes=2,4,8", "patch.distribution=uniform", "patch.weights=none",
                 "model.embed_dim=32", "model.depth=1", "model.base_grid=4", "train.token_budget=256"] if smoke else []
    cfg = load_recipe("fashion_mnist", overrides)
    hw = (cfg.data.image_size,) * 2
    batches = {p: cfg.data.batch_size * loader_batches(PatchScheme(p), hw, cfg.data.batch_size, cfg.train.token_budget)
               for p in cfg.patch.sizes}
    return cfg, build_model(cfg, channels=1, num_classes=10), batches


def seconds(fn: Step, n: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - start


def train_step(cfg: Config, model: nn.Module, x: torch.Tensor, y: torch.Tensor, patch: int) -> Step:
    """One optimizer step as ``flexivit.train.loop`` takes it (one micro-batch, no accelerator)."""
    optimizer, _ = build_optimizer(cfg, model)
    objective = objective_of(cfg, x)
    batch, scheme = {"image": x, "label": y}, PatchScheme(patch)

    def step() -> None:
        loss, _ = objective(model, batch, scheme)
        loss.backward()
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def objective_of(cfg: Config, x: torch.Tensor) -> Objective:
    """The recipe's objective (no teacher, so the view only records the input's shape)."""
    view = ViewSpec(cfg.data.image_size, x.shape[1], (0.0,), (1.0,))
    return build_objective(cfg, num_classes=10, teacher=None, view=view, terms=[])


def eval_step(model: nn.Module, x: torch.Tensor, patch: int) -> Step:
    def step() -> None:
        with torch.no_grad():
            model(x, patch)

    return step


def first_call(steps: dict[str, Step]) -> dict[str, float]:
    """The first call's seconds per model, and the graphs it built (compiled model only)."""
    before = graph_count()
    out = {f"{k}_first_s": seconds(steps[k]) for k in ("compiled", "eager")}
    return {**out, "graphs": graph_count() - before}


def race(steps: dict[str, Step], repeats: int, block_s: float) -> dict[str, float]:
    """Seconds per call of each step from ``repeats`` ABBA-ordered timed blocks of about ``block_s``;
    the speedup (eager / compiled) and A/A (eager / twin) as medians of neighbouring blocks' ratios."""
    for fn in steps.values():
        fn()
    n = max(1, round(block_s / max(seconds(steps["eager"]), 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats):
        for k in MODELS[:: 1 if r % 2 == 0 else -1]:
            times[k].append(seconds(steps[k], n) / n)
    speedups = [e / c for e, c in zip(times["eager"], times["compiled"])]
    quartiles = statistics.quantiles(speedups, n=4, method="inclusive")
    return {
        **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
        "speedup": statistics.median(speedups), "speedup_iqr": [quartiles[0], quartiles[2]],
        "aa": statistics.median(e / t for e, t in zip(times["eager"], times["twin"])), "blocks": repeats,
        "calls_per_block": n, "block_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg, eager, batches = quickstart(args.smoke)
    img = cfg.data.image_size
    models = {"eager": eager, "twin": copy.deepcopy(eager),
              "compiled": compile_model(copy.deepcopy(eager), backend=args.backend)}
    data = {p: (torch.randn(b, 1, img, img), torch.randint(0, 10, (b,))) for p, b in batches.items()}
    rows: dict[int, dict[str, Any]] = {p: {"patch_size": p, "tokens": (img // p) ** 2, "train_batch": b}
                                       for p, b in batches.items()}
    for m in models.values():
        m.train()
    train = {p: {k: train_step(cfg, m, *data[p], p) for k, m in models.items()} for p in batches}
    for p in batches:  # training first, every size, as a run does; then evaluation
        rows[p]["train_first"] = first_call(train[p])
    for m in models.values():
        m.eval()
    evals = {(p, b): {k: eval_step(m, torch.randn(b, 1, img, img), p) for k, m in models.items()}
             for p in batches for b in EVAL_BATCHES}
    for (p, b), steps in evals.items():
        rows[p][f"eval{b}_first"] = first_call(steps)
    for p in batches:
        for m in models.values():
            m.train()
        rows[p]["train"] = race(train[p], args.repeats, args.block_s)
        for m in models.values():
            m.eval()
        for b in EVAL_BATCHES:
            rows[p][f"eval{b}"] = race(evals[(p, b)], args.repeats, args.block_s)
        for phase in ("train", *(f"eval{b}" for b in EVAL_BATCHES)):
            first = rows[p][f"{phase}_first"]
            first["compile_s"] = first["compiled_first_s"] - rows[p][phase]["compiled_ms"] / 1e3
        print(f"p={p:>2}: train x{rows[p]['train']['speedup']:.2f} (A/A {rows[p]['train']['aa']:.2f}), eval64 "
              f"x{rows[p]['eval64']['speedup']:.2f}, eval1 x{rows[p]['eval1']['speedup']:.2f}", flush=True)
    return {"rows": list(rows.values()), "config": {"variant": cfg.model.variant, **models["eager"].config.to_dict()}}


def markdown(res: dict[str, Any]) -> str:
    rows, graphs, cfg = res["rows"], res["graphs"], res["config"]
    lines = [
        "# torch.compile once for every patch size (quickstart model)", "",
        f"Model: `{cfg['variant']}` as the quickstart recipe builds it ({cfg['embed_dim']} wide, {cfg['depth']} blocks, "
        f"{cfg['base_patch_size']}x{cfg['base_patch_size']} base kernel, `{cfg['kernel_resize']}` resize, "
        f"{cfg['img_size']} px); inputs are random tensors of the recipe's shapes. Backend {res['backend']}, fp32; "
        f"inductor cache {res['inductor_cache']}; {res['settings']['repeats']} timed blocks of about "
        f"{res['settings']['block_s']} s per model and phase; wall time {res['wall_s']:.0f} s.", "",
        f"Graphs built (dynamo `unique_graphs`): training {graphs['train']} for all sizes, evaluation at batch 64 "
        f"{graphs['eval64']}, at batch 1 {graphs['eval1']}; total {graphs['total']}. Compile time (first calls "
        f"minus steady calls): {res['compile_s']:.1f} s in all.", "",
        "Speedup = eager time / compiled time per call (> 1: compiled is faster), median of neighbouring "
        "timed blocks [25th-75th percentile]; A/A = eager / a second eager model, the noise floor. Geometric "
        "mean over sizes: " + ", ".join(f"{k} {v:.2f}" for k, v in res["geomean_speedup"].items()) + ".", "",
        "| p | tokens | train batch | graphs built (train / eval 64 / eval 1) | compile s (train / eval 64 / eval 1) "
        "| train step ms eager → compiled | train speedup | A/A | eval b64 speedup | A/A | eval b1 speedup | A/A |",
        "|---:|---:|---:|---|---|---|---|---:|---|---:|---|---:|",
    ]
    for r in rows:
        t, e64, e1 = r["train"], r["eval64"], r["eval1"]
        g = " / ".join(str(r[f"{k}_first"]["graphs"]) for k in ("train", "eval64", "eval1"))
        c = " / ".join(f"{r[f'{k}_first']['compile_s']:.1f}" if r[f"{k}_first"]["graphs"] else "–"
                       for k in ("train", "eval64", "eval1"))

        def sp(x: dict) -> str:
            return f"{x['speedup']:.2f} [{x['speedup_iqr'][0]:.2f}, {x['speedup_iqr'][1]:.2f}]"

        lines.append(f"| {r['patch_size']} | {r['tokens']} | {r['train_batch']} | {g} | {c} | "
                     f"{t['eager_ms']:.1f} → {t['compiled_ms']:.1f} | {sp(t)} | {t['aa']:.2f} | {sp(e64)} | "
                     f"{e64['aa']:.2f} | {sp(e1)} | {e1['aa']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="16 px, 1 block, 32 wide, p = 2, 4, 8; few repeats")
    ap.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for compile.json/.md")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see docs/benchmarks.md)")
    ap.add_argument("--repeats", type=int, default=None, help="timed blocks per model and phase (default 8)")
    ap.add_argument("--block-s", type=float, default=None, help="seconds per timed block (default 0.4)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.repeats = args.repeats or (3 if args.smoke else 8)
    args.block_s = args.block_s or (0.01 if args.smoke else 0.4)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch._dynamo.reset()
    try:
        result = bench(args)
    finally:
        if _CACHE:
            shutil.rmtree(_CACHE, ignore_errors=True)
    rows = result["rows"]
    graphs = {k: sum(r[f"{k}_first"]["graphs"] for r in rows) for k in ("train", "eval64", "eval1")}
    result.update({
        "seeds": [0], "split": "none: random inputs of the recipe's shapes, model initialised from torch seed 0",
        "backend": args.backend, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "inductor_cache": "cold (a fresh directory)" if _CACHE else f"as set, maybe warm: {os.environ['TORCHINDUCTOR_CACHE_DIR']}",
        "graphs": {**graphs, "total": sum(graphs.values())},
        "geomean_speedup": {k: statistics.geometric_mean(r[k]["speedup"] for r in rows)
                            for k in ("train", "eval64", "eval1")},
        "compile_s": sum(r[f"{k}_first"]["compile_s"] for r in rows for k in ("train", "eval64", "eval1")
                         if r[f"{k}_first"]["graphs"]),
        "settings": {"repeats": args.repeats, "block_s": args.block_s, "eval_batches": list(EVAL_BATCHES)},
        "wall_s": time.perf_counter() - start,
    })
    command = ["python", "tools/bench_compile.py", *(sys.argv[1:] if argv is None else argv)]
    json_path, md_path = write_result(args.out / "compile", result, markdown(result), command=command)
    print(f"wrote {json_path} and {md_path} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
