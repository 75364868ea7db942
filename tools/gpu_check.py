"""One command for the first GPU: FlexiViT-B against timm's ViT-B at patch 8, 16 and 32, and the trainer.

    python tools/gpu_check.py                                 # one H100/H200, <= 8 min: docs/results/gpu_check.*
    python tools/gpu_check.py --cpu-smoke --out /tmp/check    # tiny model on the CPU, seconds (tests)

Images are 224 px, which 8, 16 and 32 all tile (240, the paper's size, is not a multiple of 32).
``flexi_vit_base`` (``flexivit.model.variants``, at 224 px) races ``timm.create_model("vit_base_patch16_224",
patch_size=p, img_size=224)`` at each size p, same width, depth and heads, with the training and eval
steps, timed blocks and FLOP counter of ``tools/bench.py`` (bf16 autocast on CUDA). Sections, each
recorded as ok / error / skipped (``--time-limit``) so one failure never hides the others:

- ``flops``: FLOPs of one training image (forward + backward, ``FlopCounterMode``), per model and size;
- ``eager`` and ``compiled``: training img/s of both models and their ratio, TFLOP/s and model FLOPs
  utilisation (MFU: counted FLOPs x img/s / the device's dense bf16 peak, ``PEAK_BF16_TFLOPS``), eval
  img/s and ratio, and peak memory of one training step. ``compiled`` compiles both models in place with
  ``flexivit.model.compile.compile_model`` (blocks only, dynamic shapes) and counts dynamo's graphs over all
  sizes, training then eval, FlexiViT first and timm after it;
- ``ddp``: the real trainer, ``flexivit train imagenet:smoke`` on a generated 224-px JPEG folder
  (``flexivit/data/standin.py``), through ``accelerate launch --num_processes 1`` with torch's rendezvous
  variables set, so that Accelerate wraps the model in DDP on one GPU (checked in torch's own log).

Batches keep the tokens per step about equal: ``--batch`` images at the middle size, scaled by
``(p / middle)^2``. ``--cpu-smoke`` runs the same code on a 32-px, 1-block, 32-wide pair of models at
patch 2, 4 and 8, in fp32, compiled with ``aot_eager`` (dynamo + AOTAutograd without inductor's C++ code
generation) and writes only where ``--out`` says; its numbers mean nothing. Exit status 1 if a section
failed. See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent

import timm  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from timm.layers import use_fused_attn  # noqa: E402
from torch import nn  # noqa: E402

from flexivit.experiments.results import read_jsonl, read_results  # noqa: E402
from flexivit.eval.timing import Settings, count_flops, eval_step, peak_mem_mb, race, train_step  # noqa: E402
from flexivit.model.compile import compile_model, graph_count  # noqa: E402
from flexivit.provenance import write_result  # noqa: E402
from flexivit.data.standin import write_imagenet_standin  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; first match of the name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))
SECTIONS = ("flops", "eager", "ddp", "compiled")
MODELS = ("flexi", "timm")
MEMORY = {True: "CUDA's `max_memory_allocated`", False: "the process's peak RSS (approximate)"}  # tools/bench.py
DDP_SIGN = "DDP Initialized with"  # torch's C++ log line (TORCH_DISTRIBUTED_DEBUG=INFO) when DDP wraps a model


@dataclass
class Check:
    """What runs and where; ``deadline`` is a ``time.perf_counter()`` value."""

    device: torch.device
    smoke: bool
    img_size: int
    patch_sizes: tuple[int, ...]
    batches: dict[int, int]
    classes: int
    dims: dict[str, int]  # width, depth, heads of both models
    base: dict[str, int]  # FlexiViT's base kernel and grid
    settings: Settings
    backend: str
    peak_tflops: float | None
    deadline: float
    models: dict[str, Any] = field(default_factory=dict)  # "flexi": model, "timm": {p: model}
    flops: dict[int, dict[str, float]] = field(default_factory=dict)  # per size: FLOPs per training image

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()


def peak_for(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of the device called ``name``, or None if it is not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def build_check(args: argparse.Namespace) -> Check:
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # shared cores: see tools/bench.py
        img, sizes, middle_batch, classes = 32, (2, 4, 8), args.batch or 8, 10
        dims, base = {"embed_dim": 32, "depth": 1, "num_heads": 2}, {"base_patch_size": 8, "base_grid": 4}
        settings = Settings(device=device, amp=False, compile=False, repeats=3, block_s=0.01, phase_s=0.1, warmup=1)
    else:
        img, sizes, middle_batch, classes = 224, (8, 16, 32), args.batch or 256, 1000
        dims, base = {"embed_dim": 768, "depth": 12, "num_heads": 12}, {}
        settings = Settings(device=device, amp=True, compile=False, repeats=5, block_s=0.25, phase_s=4.0, warmup=3)
    middle = sizes[len(sizes) // 2]
    batches = {p: max(1, round(middle_batch * (p / middle) ** 2)) for p in sizes}
    name = torch.cuda.get_device_name(device) if cuda else ""
    peak = args.peak_tflops if args.peak_tflops is not None else (peak_for(name) if cuda else None)
    return Check(device=device, smoke=args.cpu_smoke, img_size=img, patch_sizes=sizes, batches=batches,
                 classes=classes, dims=dims, base=base, settings=settings,
                 backend=args.backend or ("aot_eager" if args.cpu_smoke else "inductor"), peak_tflops=peak,
                 deadline=time.perf_counter() + args.time_limit)


def build_models(c: Check) -> None:
    """``flexi_vit_base`` and one timm ViT-B per patch size (with the smoke's dims on the CPU)."""
    torch.manual_seed(0)
    c.models["flexi"] = timm.create_model("flexi_vit_base", img_size=c.img_size, num_classes=c.classes,
                                          **c.dims, **c.base).to(c.device)
    c.models["timm"] = {p: timm.create_model("vit_base_patch16_224", patch_size=p, img_size=c.img_size,
                                             num_classes=c.classes, **c.dims).to(c.device) for p in c.patch_sizes}


def _pair(c: Check, p: int) -> tuple[dict[str, nn.Module], dict[str, Callable]]:
    flexi, vit = c.models["flexi"], c.models["timm"][p]
    return {"flexi": flexi, "timm": vit}, {"flexi": lambda t: flexi(t, p), "timm": vit}


def _inputs(c: Check, p: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(p)
    b = n or c.batches[p]
    x = torch.randn(b, 3, c.img_size, c.img_size, generator=g)  # (B, 3, H, W)
    return x.to(c.device), torch.randint(0, c.classes, (b,), generator=g).to(c.device)


def _per_size(c: Check, fn: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """``fn(p)`` for every size, each failure recorded in its own row; sizes past the deadline skipped."""
    rows = {}
    for p in c.patch_sizes:
        if c.remaining() <= 0:
            rows[str(p)] = {"status": "skipped", "reason": "time limit reached"}
            continue
        try:
            rows[str(p)] = {"status": "ok", **fn(p)}
        except Exception as err:  # recorded, and the other sizes still run
            rows[str(p)] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
            if c.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  p={p}: {json.dumps(rows[str(p)], default=str)[:300]}", flush=True)
    return rows


def section_flops(c: Check) -> dict[str, Any]:
    """FLOPs of one training image, forward + backward, counted on a 2-image step (FLOPs are linear in it)."""
    def one(p: int) -> dict[str, Any]:
        models, fwd = _pair(c, p)
        x, y = _inputs(c, p, 2)
        for m in models.values():
            m.train()
        c.flops[p] = {k: count_flops(train_step(models[k], fwd[k], x, y, c.settings)) / 2 for k in MODELS}
        return {f"{k}_gflop_per_train_image": v / 1e9 for k, v in c.flops[p].items()}

    return _per_size(c, one)


def _ratios(img_s: dict[str, list[float]], phase: str) -> dict[str, Any]:
    paired = sorted(a / b for a, b in zip(img_s["flexi"], img_s["timm"]))  # neighbouring blocks
    row = {f"{k}_{phase}_img_s": statistics.median(v) for k, v in img_s.items()}
    row[f"{phase}_ratio"] = row[f"flexi_{phase}_img_s"] / row[f"timm_{phase}_img_s"]
    row[f"{phase}_ratio_paired_range"] = [paired[0], paired[-1]]
    row[f"{phase}_blocks"] = len(paired)
    return row


def measure_size(c: Check, p: int) -> dict[str, Any]:
    """Training and eval img/s of both models at ``p``, their ratios, TFLOP/s, MFU and peak memory."""
    models, fwd = _pair(c, p)
    x, y = _inputs(c, p)
    for m in models.values():
        m.train()
    steps = {k: train_step(models[k], fwd[k], x, y, c.settings) for k in MODELS}
    row: dict[str, Any] = {"tokens": (c.img_size // p) ** 2, "batch": c.batches[p],
                           **_ratios(race(steps, c.batches[p], c.settings), "train")}
    for k in MODELS:
        row[f"{k}_peak_mem_mb"] = peak_mem_mb(steps[k], c.device)
        if p in c.flops:
            row[f"{k}_train_tflop_s"] = c.flops[p][k] * row[f"{k}_train_img_s"] / 1e12
            row[f"{k}_mfu"] = row[f"{k}_train_tflop_s"] / c.peak_tflops if c.peak_tflops else None
    for m in models.values():
        m.eval()
    row.update(_ratios(race({k: eval_step(fwd[k], x, c.settings) for k in MODELS}, c.batches[p], c.settings), "eval"))
    return row


def section_eager(c: Check) -> dict[str, Any]:
    return _per_size(c, lambda p: measure_size(c, p))


def _first_calls(c: Check, name: str, train: bool) -> dict[str, Any]:
    """Each size's first call (compilation included) for model ``name``; graphs built by them all."""
    before, seconds = graph_count(), {}
    for p in c.patch_sizes:
        models, fwd = _pair(c, p)
        x, y = _inputs(c, p)
        models[name].train(train)
        s = c.settings
        step = train_step(models[name], fwd[name], x, y, s) if train else eval_step(fwd[name], x, s)
        start = time.perf_counter()
        step()
        if c.device.type == "cuda":
            torch.cuda.synchronize(c.device)
        seconds[str(p)] = time.perf_counter() - start
    return {"graphs": graph_count() - before, "first_call_s": seconds}


def section_compiled(c: Check) -> dict[str, Any]:
    """Compile both models in place, count graphs over every size (train, then eval), then measure."""
    compile_model(c.models["flexi"], backend=c.backend)
    for vit in c.models["timm"].values():
        compile_model(vit, backend=c.backend)
    first = {f"{k}_{phase}": _first_calls(c, k, phase == "train") for k in MODELS for phase in ("train", "eval")}
    graphs = {k: first[f"{k}_train"]["graphs"] + first[f"{k}_eval"]["graphs"] for k in MODELS}
    print(f"  graphs over sizes {list(c.patch_sizes)}: {graphs}", flush=True)
    sizes = _per_size(c, lambda p: measure_size(c, p))
    return {"backend": c.backend, "graphs": graphs, "first_calls": first, "sizes": sizes}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_ddp(c: Check) -> dict[str, Any]:
    """``flexivit train imagenet:smoke`` on a generated JPEG folder, one process, DDP through Accelerate."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        return _ddp_run(c, Path(tmp))


def _ddp_run(c: Check, work: Path) -> dict[str, Any]:
    counts = write_imagenet_standin(work / "data")
    # torch's rendezvous variables: Accelerate then sets up a process group of one and wraps the model in DDP
    # (`accelerate launch --multi_gpu` refuses a single process; plain `--num_processes 1` runs without DDP).
    rendezvous = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env = {**os.environ, **rendezvous, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_CACHE": str(work / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_DISTRIBUTED_DEBUG": "INFO", "TORCH_CPP_LOG_LEVEL": "INFO"}
    sets = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"] if c.smoke else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", *(["--cpu"] if c.device.type == "cpu" else []),
           "-m", "flexivit", "train", "imagenet:smoke", "--data", str(work / "data"), "--out", str(work / "run"),
           *[a for s in sets for a in ("--set", s)]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=max(30.0, min(300.0, c.remaining())))
    out: dict[str, Any] = {"command": " ".join(cmd[1:]), "env": rendezvous, "overrides": sets, "images": counts,
                           "returncode": proc.returncode, "seconds": time.perf_counter() - start,
                           "ddp": DDP_SIGN in proc.stdout + proc.stderr}
    if proc.returncode != 0:
        raise RuntimeError(f"flexivit train exited {proc.returncode}: {proc.stderr[-1500:]}")
    if not out["ddp"]:
        raise RuntimeError(f"the run finished but torch logged no {DDP_SIGN!r}: the model was not wrapped in DDP")
    train = [r for r in read_jsonl(work / "run" / "log.jsonl") if "per_patch" in r]
    report = read_results(work / "run")
    out.update(steps=train[-1]["step"], last_losses={p: v["loss"] for p, v in train[-1]["per_patch"].items()},
               images_seen=report.images_seen, test_top1=report.top1("test"))
    return out


def run_sections(c: Check, wanted: list[str]) -> dict[str, dict[str, Any]]:
    """Every wanted section in order, each recorded as ok (with its result), error or skipped."""
    runners = {"flops": section_flops, "eager": section_eager, "ddp": section_ddp, "compiled": section_compiled}
    done: dict[str, dict[str, Any]] = {}
    try:
        build_models(c)
        done["models"] = {"status": "ok", "params": {
            "flexi": sum(p.numel() for p in c.models["flexi"].parameters()),
            "timm": sum(p.numel() for p in next(iter(c.models["timm"].values())).parameters())}}
    except Exception as err:
        done["models"] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
    for name in (s for s in SECTIONS if s in wanted):
        if c.remaining() <= 0:
            done[name] = {"status": "skipped", "reason": "time limit reached"}
            continue
        if name != "ddp" and done["models"]["status"] != "ok":
            done[name] = {"status": "skipped", "reason": "the models could not be built"}
            continue
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        try:
            result = runners[name](c)
            rows = result.get("sizes", result) if name != "ddp" else {}
            failed = [p for p, r in rows.items() if r.get("status") == "error"]
            done[name] = {"status": "error" if failed else "ok", "result": result}
            if failed:
                done[name]["error"] = f"failed at sizes {failed}"
        except Exception as err:  # recorded; the next section still runs
            done[name] = {"status": "error", "error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc(limit=-4)}
        done[name]["seconds"] = time.perf_counter() - start
        print(f"  {name}: {done[name]['status']} ({done[name]['seconds']:.0f} s)"
              + (f": {done[name]['error'][:400]}" if "error" in done[name] else ""), flush=True)
        if c.device.type == "cuda":
            torch.cuda.empty_cache()
    return done


# ---- report ---------------------------------------------------------------------------------------
def environment(c: Check) -> dict[str, Any]:
    cuda = c.device.type == "cuda"
    props = torch.cuda.get_device_properties(c.device) if cuda else None
    return {"device": torch.cuda.get_device_name(c.device) if cuda else "CPU",
            "cuda": torch.version.cuda if cuda else None,
            "gpu_memory_gib": props.total_memory / 2**30 if props else None, "torch": torch.__version__,
            "timm": timm.__version__, "fused_attn": use_fused_attn(),
            "precision": "bf16 autocast" if c.settings.amp else "fp32", "peak_bf16_tflops": c.peak_tflops,
            "compile_backend": c.backend, "img_size": c.img_size, "patch_sizes": list(c.patch_sizes),
            "batches": {str(p): b for p, b in c.batches.items()}, "dims": c.dims, "flexi_base": c.base or "32x32, 7x7"}


def _f(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _note(record: dict[str, Any]) -> str:
    """An error or skip reason fit for one table cell."""
    text = record.get("error") or record.get("reason") or ""
    return " ".join(text.replace("|", "/").split())[:200]


def _size_rows(mode: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for p, r in rows.items():
        if r["status"] != "ok":
            lines.append(f"| {mode} | {p} | {r['status']}: {_note(r)} |" + " |" * 8)
            continue
        lo, hi = r["train_ratio_paired_range"]
        lines.append(" | ".join([
            f"| {mode} | {p} | {r['tokens']} | {r['batch']}",
            f"{r['flexi_train_img_s']:.1f} / {r['timm_train_img_s']:.1f}",
            f"**{r['train_ratio']:.3f}** [{lo:.2f}, {hi:.2f}]",
            f"{_f(r.get('flexi_train_tflop_s'), '.3g')} / {_f(r.get('timm_train_tflop_s'), '.3g')}",
            f"{_f(r.get('flexi_mfu'), '.1%')} / {_f(r.get('timm_mfu'), '.1%')}",
            f"{r['flexi_eval_img_s']:.1f} / {r['timm_eval_img_s']:.1f}", f"**{r['eval_ratio']:.3f}**",
            f"{_f(r['flexi_peak_mem_mb'], '.4g')} / {_f(r['timm_peak_mem_mb'], '.4g')} |"]))
    return lines


def markdown(res: dict[str, Any]) -> str:
    env, sec = res["environment"], res["sections"]
    lines = ["# GPU check: FlexiViT-B vs timm ViT-B at patch 8, 16 and 32 (224 px)", ""]
    if res["cpu_smoke"]:
        lines += ["**CPU smoke** (a 32-px, 1-block, 32-wide model pair at patch 2, 4, 8; fp32): it shows that the "
                  "tool runs, and no number in it is a GPU measurement.", ""]
    lines += [f"Device: {env['device']} (CUDA {env['cuda']}); torch {env['torch']}, timm {env['timm']}; "
              f"{env['precision']}, fused attention {env['fused_attn']}; MFU against "
              f"{_f(env['peak_bf16_tflops'], '.0f')} dense bf16 TFLOP/s; compile backend {env['compile_backend']}; "
              f"batches {env['batches']}. "
              f"Wall time {res['wall_s']:.0f} s.", "", "| section | status | seconds | note |", "|---|---|---:|---|"]
    for name, s in sec.items():
        lines.append(f"| {name} | {s['status']} | {_f(s.get('seconds'), '.0f')} | {_note(s)} |")
    lines += ["", "Ratios are FlexiViT / timm of the median img/s, with the range of the ratios of neighbouring "
              "timed blocks; TFLOP/s and MFU count forward + backward FLOPs (`FlopCounterMode`); peak memory is "
              f"{MEMORY[env['cuda'] is not None]} above the pre-step level in one training step (MB).", "",
              "| mode | p | tokens | batch | train img/s flexi / timm | train ratio | TFLOP/s flexi / timm | "
              "MFU flexi / timm | eval img/s flexi / timm | eval ratio | peak MB flexi / timm |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    for mode in ("eager", "compiled"):
        result = sec.get(mode, {}).get("result")
        if result:
            lines += _size_rows(mode, result["sizes"] if mode == "compiled" else result)
    compiled = sec.get("compiled", {}).get("result")
    if compiled:
        g = compiled["graphs"]
        lines += ["", f"Compiled graphs over all sizes (`compile_model`, {compiled['backend']}, dynamo's unique "
                  f"graphs, training then eval): FlexiViT {g['flexi']}; timm's models afterwards {g['timm']} more.",
                  "First calls (s, compilation included): " + "; ".join(
                      f"{k} " + ", ".join(f"p{p} {s:.1f}" for p, s in v["first_call_s"].items())
                      for k, v in compiled["first_calls"].items()) + "."]
    ddp = sec.get("ddp", {}).get("result")
    if ddp:
        lines += ["", f"DDP smoke: `{ddp['command']}` with {ddp['env']}: DDP wrapped the model: {ddp['ddp']}; "
                  f"{ddp['steps']} steps in {ddp['seconds']:.0f} s (start-up included); test top-1 per size on the "
                  f"generated stand-in: {ddp['test_top1']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, seconds; needs --out")
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json/.md (default docs/results, GPU runs only)")
    ap.add_argument("--time-limit", type=float, default=450.0, help="seconds; sections past it are skipped (450)")
    ap.add_argument("--batch", type=int, help="images per step at the middle patch size (256; smoke 8)")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: PEAK_BF16_TFLOPS by name)")
    ap.add_argument("--backend", help="torch.compile backend (inductor; smoke aot_eager)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, among {', '.join(SECTIONS)}")
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose among {', '.join(SECTIONS)}")
    if args.cpu_smoke and args.out is None:
        ap.error("--cpu-smoke needs --out DIR: a CPU smoke never writes to docs/results")
    if not args.cpu_smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here; on a machine without a GPU run --cpu-smoke --out DIR to check the tool")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)  # never fall back to eager silently on a new shape
    c = build_check(args)
    env = environment(c)
    print(json.dumps(env), flush=True)
    sections = run_sections(c, args.sections.split(","))
    payload = {"seeds": [0], "split": "none: random inputs (throughput); the generated stand-in's train/val/test "
               "folders (ddp)", "cpu_smoke": c.smoke, "environment": env, "sections": sections,
               "wall_s": time.perf_counter() - start}
    text = markdown(payload)
    print(text)
    out = args.out or ROOT / "docs" / "results"
    command = ["python", "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
    paths = write_result(out / "gpu_check", payload, text, command=command)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 1 if any(s["status"] == "error" for s in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
