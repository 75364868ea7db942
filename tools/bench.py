"""FlexiViT vs timm VisionTransformer: the price of flexibility, measured side by side.

Per patch size, one FlexiViT (kernel PI-resized, position grid resampled on every training call) races
a timm ``VisionTransformer`` of the same dims built for that fixed size, and a second identical timm
model (A/A control: the noise floor), in one process, in alternating timed blocks so a shared machine's
load hits all alike. Medians are reported, with ratios flexi / timm:
- training step (forward + backward + AdamW) img/s, ``train_ratio`` (target >= 0.97, reported only);
- eval forward (``no_grad``, FlexiViT's per-size kernel/posemb cache warm) img/s, ``eval_ratio`` (>= 0.99);
- peak memory above the pre-step level in one training step: CUDA ``max_memory_allocated``, or on the
  CPU peak RSS (``VmHWM`` after ``/proc/self/clear_refs``), null where unreadable;
- ``pi_resize`` with its matrix cache cold (``resize.clear_cache()``) and warm; FlexiViT's extra stem work
  per training call; FLOPs (``FlopCounterMode``), TFLOP/s, MFU (``--peak-tflops``); step time vs tokens.
On CUDA: bf16 autocast, SDPA (timm's fused attention), ``--compile`` (one graph per patch size). On the
CPU, one torch thread by default: on shared cores a descheduled second OpenMP thread stalls every
parallel region (10-100x slowdowns seen here while another job ran).

    python tools/bench.py                  # 28 px quickstart model (64 wide, 4 deep), p = 2, 4, 7, 14
    python tools/bench.py --tiny           # + ViT-Tiny shapes at 32 px and 64 px
    python tools/bench.py --device cuda --compile --peak-tflops 989
    python tools/bench.py --smoke --out /tmp/bench   # seconds; what tests/test_bench.py runs
docs/results/ holds ``python tools/bench.py`` on a shared 2-vCPU AMD EPYC VM (CPU only, 1 thread, torch
2.14.1, timm 1.0.31; 167 s): train ratios 0.95-1.04, eval 0.98-1.03, inside the run's own A/A noise
(paired spreads of +-4-8%); FlexiViT's measured extra stem work is <= 0.3% of a step. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import use_fused_attn
from timm.models.vision_transformer import VisionTransformer

from flexivit.model import resize
from flexivit.model.vit import FlexiViT, FlexiViTConfig
from flexivit.model.timm_interop import timm_vit_kwargs
from flexivit.model.variants import VARIANTS
from flexivit.eval.timing import Settings, count_flops, eval_step, peak_mem_mb, race, timed, train_step

TARGETS = {"train": 0.97, "eval": 0.99}


@dataclass(frozen=True)
class Sweep:
    name: str
    config: FlexiViTConfig
    patch_sizes: tuple[int, ...]
    batch: int

def build_sweeps(smoke: bool, tiny: bool, cuda: bool, batch: int | None) -> list[Sweep]:
    """The sweep(s) to run; batches sized so one CPU step of the largest token count takes ~1 s."""
    if smoke:
        cfg = FlexiViTConfig(**{**VARIANTS["flexi_vit_micro"], "img_size": 16, "patch_size": 4, "base_patch_size": 8,
                                "base_grid": 4, "embed_dim": 32, "depth": 1, "in_chans": 1, "num_classes": 10})
        return [Sweep("smoke", cfg, (2, 4, 8), batch or 8)]
    micro = FlexiViTConfig(**{**VARIANTS["flexi_vit_micro"], "in_chans": 1, "num_classes": 10})
    sweeps = [Sweep("micro@28", micro, (2, 4, 7, 14), batch or (512 if cuda else 128))]
    if tiny:
        for img, sizes in ((32, (4, 8, 16)), (64, (8, 16, 32))):
            cfg = FlexiViTConfig(**{**VARIANTS["flexi_vit_tiny"], "img_size": img, "num_classes": 10})
            sweeps.append(Sweep(f"tiny@{img}", cfg, sizes, batch or (256 if cuda else 16)))
    return sweeps


# ---- timing primitives ---------------------------------------------------------------------------
def time_pi_resize(kernel: torch.Tensor, sizes: tuple[int, ...], s: Settings) -> dict[str, Any]:
    """Milliseconds per ``pi_resize`` call with the pinv-factor cache cleared (cold) and warm (cached)."""
    per_size: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for p in sizes:
            if p == kernel.shape[-1]:
                continue  # the base size is returned as is
            cold = [timed(lambda: (resize.clear_cache(), resize.pi_resize(kernel, p)), 1, s.device)
                    for _ in range(9)]
            warm = [timed(lambda: resize.pi_resize(kernel, p), 20, s.device) / 20 for _ in range(9)]
            per_size[str(p)] = {"cold_ms": statistics.median(cold) * 1e3, "cached_ms": statistics.median(warm) * 1e3}
    resize.clear_cache()
    return {"kernel_shape": list(kernel.shape), "per_size": per_size,
            **{k: statistics.median(v[k] for v in per_size.values()) for k in ("cold_ms", "cached_ms")}}


def stem_overhead_ms(flexi: FlexiViT, patch: int, s: Settings) -> float:
    """What a FlexiViT training call does beyond timm's: PI-resize the kernel and resample the position
    grid, forward and backward (median ms of many calls; a noise-robust bound on the train ratio)."""
    grid = (flexi.config.img_size // patch,) * 2
    params = [p for n, p in flexi.named_parameters() if n == "patch_embed.weight" or n.startswith("pos_embed")]

    def extra() -> None:
        outs = (resize.pi_resize(flexi.patch_embed.weight, patch), flexi.posemb_grid(grid))
        torch.autograd.grad(outs, params, [torch.ones_like(o) for o in outs], allow_unused=True)

    extra()
    return statistics.median(timed(extra, 5, s.device) / 5 * 1e3 for _ in range(5 * s.repeats))


# ---- one patch size ------------------------------------------------------------------------------
def bench_size(sweep: Sweep, flexi: FlexiViT, patch: int, s: Settings, peak_tflops: float | None) -> dict:
    cfg, dev, batch = sweep.config, s.device, sweep.batch
    vit, twin = (VisionTransformer(**timm_vit_kwargs(cfg, patch, cfg.img_size)).to(dev) for _ in range(2))
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=dev)
    y = torch.randint(0, cfg.num_classes, (batch,), device=dev)
    # "twin", a second timm model, races too: twin / timm is an A/A control, the noise floor of the ratios.
    models = {"flexi": flexi.train(), "timm": vit.train(), "twin": twin.train()}
    eager = {"flexi": lambda t: flexi(t, patch), "timm": vit}
    pair = tuple(eager)
    flops = {k: count_flops(train_step(models[k], eager[k], x, y, s)) for k in pair}
    run = {k: torch.compile(m, dynamic=False) if s.compile else m for k, m in models.items()}  # a graph per size
    fwd = {"flexi": lambda t: run["flexi"](t, patch), "timm": run["timm"], "twin": run["twin"]}
    trains = {k: train_step(models[k], fwd[k], x, y, s) for k in models}
    train = race(trains, batch, s)
    mem = {k: [peak_mem_mb(trains[k], dev) for _ in range(3)] for k in pair}
    for m in models.values():
        m.eval()
    ev = race({k: eval_step(fwd[k], x, s) for k in models}, batch, s)
    flexi.train()
    row: dict[str, Any] = {"sweep": sweep.name, "img_size": cfg.img_size, "patch_size": patch,
                           "tokens": (cfg.img_size // patch) ** 2, "batch": batch}
    for phase, img_s in (("train", train), ("eval", ev)):
        for k in models:
            row[f"{k}_{phase}_img_s"] = statistics.median(img_s[k])
        row[f"{phase}_ratio"] = row[f"flexi_{phase}_img_s"] / row[f"timm_{phase}_img_s"]
        row[f"{phase}_ratio_aa"] = row[f"twin_{phase}_img_s"] / row[f"timm_{phase}_img_s"]
        paired = [a / b for a, b in zip(img_s["flexi"], img_s["timm"])]  # neighbours in time
        row[f"{phase}_ratio_paired"] = statistics.median(paired)
        q = statistics.quantiles(paired, n=4, method="inclusive") if len(paired) > 1 else paired * 3
        row[f"{phase}_ratio_iqr"] = (q[0], q[2])
        row[f"{phase}_target_met"] = row[f"{phase}_ratio"] >= TARGETS[phase]
        row[f"{phase}_repeats"] = len(paired)
    for k in pair:
        row[f"{k}_train_step_ms"] = 1e3 * batch / row[f"{k}_train_img_s"]
        row[f"peak_mem_mb_{k}"] = None if None in mem[k] else statistics.median(mem[k])
        row[f"{k}_train_gflop_step"] = flops[k] / 1e9
        row[f"{k}_train_tflop_s"] = flops[k] / batch * row[f"{k}_train_img_s"] / 1e12
        if peak_tflops:
            row[f"{k}_mfu"] = row[f"{k}_train_tflop_s"] / peak_tflops
    row["stem_overhead_ms"] = stem = stem_overhead_ms(flexi, patch, s)
    row["train_ratio_from_stem"] = row["timm_train_step_ms"] / (row["timm_train_step_ms"] + stem)
    return row


def scaling(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per sweep, train step time against tokens, and its log-log slope (1: linear, 2: quadratic)."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["sweep"] for r in rows):
        rs = sorted((r for r in rows if r["sweep"] == name), key=lambda r: r["tokens"])
        out[name] = {"tokens": [r["tokens"] for r in rs]}
        for k in ("flexi", "timm"):
            ms = [r[f"{k}_train_step_ms"] for r in rs]
            logs = ([math.log(r["tokens"]) for r in rs], [math.log(v) for v in ms])
            slope = statistics.linear_regression(*logs).slope if len(set(logs[0])) > 1 else None
            out[name].update({f"{k}_step_ms": ms, f"{k}_loglog_slope": slope})
    return out


# ---- reporting -----------------------------------------------------------------------------------
def hardware(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    name = names[0] if names else platform.processor() or platform.machine()
    return f"CPU only: {name}, {os.cpu_count()} logical CPUs, torch threads = {threads}"


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    st = res["settings"]
    lines = [
        "# FlexiViT vs timm ViT: throughput at each patch size", "",
        f"Command: `{res['command']}`  ",
        f"Hardware: {res['hardware']}; torch {res['torch']}, timm {res['timm']}; {st['precision']}, "
        f"compile={st['compile']}, fused SDPA={st['fused_attn']}.  ",
        f"Peak memory: {res['memory_method']}.", "",
        "Ratio cells: flexi / timm of the median img/s (target miss marked); *paired*: median and 25th-75th "
        "percentiles of the ratios of neighbouring blocks; *A/A*: a second, identical timm model / timm, "
        "i.e. the noise floor. *stem*: FlexiViT's extra work per training call (PI-resize + posemb "
        "resample, fwd + bwd) and the train ratio it alone would give.", "",
        "| sweep | p | tokens | batch | train img/s flexi / timm | train ratio | eval img/s flexi / timm "
        "| eval ratio | stem ms (ratio) | peak MB flexi / timm | GFLOP/step | TFLOP/s flexi / timm |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        cells = [r["sweep"], r["patch_size"], r["tokens"], r["batch"]]
        for ph in ("train", "eval"):
            lo, hi = r[f"{ph}_ratio_iqr"]
            mark = "" if r[f"{ph}_target_met"] else " (miss)"
            cells += [f"{r[f'flexi_{ph}_img_s']:.0f} / {r[f'timm_{ph}_img_s']:.0f}",
                      f"**{r[f'{ph}_ratio']:.3f}**{mark}; paired {r[f'{ph}_ratio_paired']:.3f} [{lo:.2f}, {hi:.2f}]; "
                      f"A/A {r[f'{ph}_ratio_aa']:.3f}"]
        cells += [f"{r['stem_overhead_ms']:.2f} ({r['train_ratio_from_stem']:.3f})",
                  f"{_fmt(r['peak_mem_mb_flexi'], '.1f')} / {_fmt(r['peak_mem_mb_timm'], '.1f')}",
                  f"{r['flexi_train_gflop_step']:.2f} / {r['timm_train_gflop_step']:.2f}",
                  f"{r['flexi_train_tflop_s']:.4f} / {r['timm_train_tflop_s']:.4f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    pr = res["pi_resize"]
    lines += ["", f"`pi_resize` of a {tuple(pr['kernel_shape'])} kernel: cold (cache cleared) "
              f"{pr['cold_ms']:.3f} ms, cached {pr['cached_ms']:.3f} ms (medians over patch sizes)."]
    for name, sc in res["scaling"].items():
        lines.append(f"Train step time vs tokens ({name}), log-log slope: flexi "
                     f"{_fmt(sc['flexi_loglog_slope'], '.2f')}, timm {_fmt(sc['timm_loglog_slope'], '.2f')}.")
    lines.append(f"Targets: train ratio >= {TARGETS['train']}, eval ratio >= {TARGETS['eval']} "
                 f"(reported, not asserted). Wall time {res['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few iterations (seconds)")
    ap.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for bench.json/bench.md")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="add ViT-Tiny shapes at 32 and 64 px")
    ap.add_argument("--batch", type=int, default=None, help="override every sweep's batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, both models (CPU default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="least timed blocks per model (default 7)")
    ap.add_argument("--block-s", type=float, default=None, help="seconds per timed block (default 0.3)")
    ap.add_argument("--phase-s", type=float, default=None, help="seconds per race when steps are fast (15)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (one graph per size)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 on CUDA instead of bf16 autocast")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s, for MFU")
    return ap.parse_args(argv)


def settings(args: argparse.Namespace, device: torch.device) -> Settings:
    smoke = args.smoke
    return Settings(device=device, amp=device.type == "cuda" and not args.no_amp, compile=args.compile,
                    repeats=args.repeats or (3 if smoke else 7), block_s=args.block_s or (0.01 if smoke else 0.3),
                    phase_s=args.phase_s or (0.1 if smoke else 15.0), warmup=(1 if smoke else 2) + 3 * args.compile)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    cuda = args.device == "cuda" and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("CUDA requested but not available: running on the CPU", file=sys.stderr)
    device = torch.device("cuda" if cuda else "cpu")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)  # one setting, shared by both models (see the docstring)
    if args.compile:  # room for one graph per (model, patch size, train/eval)
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, 64)
    s = settings(args, device)
    hw = hardware(device, torch.get_num_threads())
    print(hw, flush=True)
    torch.manual_seed(0)
    sweeps = build_sweeps(args.smoke, args.tiny, cuda, args.batch)
    rows, pi = [], {}
    for sweep in sweeps:
        flexi = FlexiViT(sweep.config).to(device)
        pi = pi or time_pi_resize(flexi.patch_embed.weight.detach(), sweep.patch_sizes, s)
        for p in sweep.patch_sizes:
            r = bench_size(sweep, flexi, p, s, args.peak_tflops)
            rows.append(r)
            print(f"{sweep.name} p={p:>2} tokens={r['tokens']:>4}: ratio train {r['train_ratio']:.3f}, eval "
                  f"{r['eval_ratio']:.3f}; train img/s {r['flexi_train_img_s']:.0f} vs {r['timm_train_img_s']:.0f}",
                  flush=True)
    result = {
        "hardware": hw, "cpu_only": not cuda, "torch": torch.__version__, "timm": timm.__version__,
        "python": platform.python_version(), "command": " ".join(["python tools/bench.py", *(argv or sys.argv[1:])]),
        "settings": {**{k: v for k, v in vars(s).items() if k != "device"}, "device": str(device),
                     "threads": torch.get_num_threads(), "precision": "bf16 autocast" if s.amp else "fp32",
                     "fused_attn": use_fused_attn(), "peak_tflops": args.peak_tflops},
        "memory_method": ("CUDA max_memory_allocated above the pre-step level, one training step" if cuda else
                          "peak process RSS above the pre-step level during one training step (VmHWM after "
                          "clear_refs, glibc arenas trimmed first); approximate, null where /proc forbids it"),
        "targets": TARGETS, "rows": rows, "pi_resize": pi, "scaling": scaling(rows),
        "config": {sw.name: {**sw.config.to_dict(), "patch_sizes": list(sw.patch_sizes), "batch": sw.batch}
                   for sw in sweeps},
        "wall_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench.md").write_text(markdown(result))
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
