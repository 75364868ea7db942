"""The command line's arguments: one subparser per ``flexivit`` command (the commands are in ``cli.py``)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from flexivit.train.config import list_recipes

__all__ = ["build_parser", "add_run_args", "recipe_help", "option_commands"]


def recipe_help() -> str:
    return "recipes: " + ", ".join(list_recipes()) + " (or a path to a recipe .py file); add :ARG, e.g. fashion_mnist:smoke"


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="RECIPE[:ARG] — " + recipe_help())
    p.add_argument("--data", help="fashion-mnist (default), a local image folder, hf:NAME[:CONFIG], or a stream: "
                   "wds:SHARDS or hf-stream:NAME[:CONFIG] (docs/streaming.md)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<recipe>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")


CHECKPOINT_HELP = "a run directory, a model .safetensors file, or a folder written by `flexivit export`"


def option_commands() -> dict[str, tuple[str, str]]:
    """The option families' commands: name -> (driver module, one-line help) (``flexivit.ext.COMMANDS``)."""
    return importlib.import_module("flexivit.ext").COMMANDS


def build_parser(command: str | None = None, cli: Any = None) -> argparse.ArgumentParser:
    """Every subcommand; an option command's arguments only when ``command`` is it, from its driver, which
    gets ``cli`` (the CLI's shared pieces: ``run_args``, ``resolve``, ``device``)."""
    parser = argparse.ArgumentParser(
        prog="flexivit", description="Train and use FlexiViT models (one ViT, every patch size).",
        epilog=recipe_help(),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe", epilog=recipe_help())
    add_run_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a model or "
                   "checkpoints: they, the log and the report are removed first (refused without it)")
    p = sub.add_parser("finetune", help="fine-tune a trained FlexiViT on a recipe's task (stays flexible)",
                       epilog=recipe_help())
    p.add_argument("checkpoint", help="a run directory or a model .safetensors file")
    add_run_args(p)
    p.add_argument("--patch-size", type=int, help="fine-tune at this one size, keeping the others with a consistency "
                   "term (--set finetune.consistency=0: the plain fixed fine-tune); default: sample the recipe's sizes")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a model or "
                   "checkpoints: they, the log and the report are removed first (refused without it)")
    _add_search_parser(sub)
    _add_eval_parser(sub)
    _add_predict_parser(sub)
    _add_export_parser(sub)
    _add_probe_parser(sub)
    sub.add_parser("launch", help="accelerate launch -m flexivit COMMAND, exiting with the ranks' status "
                   "(2 for a user error): flexivit launch [accelerate launch options] COMMAND ...")
    for name, (module, help) in option_commands().items():  # the option families' commands (flexivit.ext)
        p = sub.add_parser(name, help=help, epilog=recipe_help())
        if name == command:  # its arguments only when it runs: the driver's imports are heavy
            importlib.import_module(module).add_arguments(p, cli)
    return parser


def _add_search_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="choose settings on the validation split: a grid of trials, resumable",
                       epilog=recipe_help())
    add_run_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values to try (repeatable: the grid is their product); a list "
                   "value goes in brackets, e.g. patch.sizes=[2,4],[4,8]; without --grid, the recipe's SEARCH_GRID")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every grid point runs once per seed "
                   "(default 0)")
    p.add_argument("--steps", type=int, help="training steps of each trial (default: the recipe's)")
    p.add_argument("--metric", default="worst", help="worst (default): the lowest validation top-1 over the "
                   "evaluated sizes; mean: their mean")
    p.add_argument("--jobs", type=int, default=1, help="trials at a time (default 1)")
    p.add_argument("--init", help="a FlexiViT checkpoint: every trial fine-tunes from it (flexivit finetune)")
    p.add_argument("--then-train", action="store_true", help="train the winner at the recipe's budget into "
                   "OUT/final and report it on the test split")


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy and measured cost at every patch size (eval.json/.md/.png)")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--data", help="fashion-mnist, an image folder or hf:NAME[:CONFIG] (default: the run's "
                   "dataset, else fashion-mnist); its test split is evaluated")
    p.add_argument("--patch-sizes", help="comma-separated sizes, or 'all' (every size that tiles the image); "
                   "default: the run's training sizes")
    p.add_argument("--out", type=Path, help="where eval.json/.md/.png go (default: the checkpoint's folder)")
    p.add_argument("--baseline", action="append", default=[], metavar="CKPT[:PATCH]",
                   help="also sweep a fixed-size model at PATCH (default: its own size); repeatable")
    p.add_argument("--limit", type=int, help="evaluate the first N test images only")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="batch for img/s and peak memory (default 64)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="batch for the accuracy pass")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each timing (default 3)")
    p.add_argument("--repeats", type=int, default=20, help="timed batch-1 calls per latency median (default 20)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="run and measure in this precision (bf16/fp16: autocast); default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model once for every patch size "
                   "first (flexivit.model.compile); accuracy, img/s and latency are then the compiled model's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_budget_args(p)


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget", "print the patch size to deploy: the most accurate within the cost "
                             "limits, or (accuracy floor alone) the cheapest that reaches it")
    g.add_argument("--max-latency-ms", type=float, help="batch-1 latency limit in ms")
    g.add_argument("--max-gflops", type=float, help="GFLOPs-per-image limit")
    g.add_argument("--min-accuracy", help="top-1 floor: a fraction (0.85) or a percentage (85%%)")


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size, any mode)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--patch-size", type=int, help="patch size to run at (default: the model's)")
    which.add_argument("--patch-sizes", help="one patch size per image, comma-separated in IMAGE order (2,7,4): "
                       "the images run in one packed call (docs/packed.md)")
    which.add_argument("--budget-ms", type=float, help="use the most accurate patch size whose batch-1 latency "
                       "on this machine fits (from the run's eval.json, else measured now)")
    which.add_argument("--budgets-ms", help="one latency budget per image, comma-separated in IMAGE order (5,20,2): "
                       "each image at the most accurate size within its budget, all in one packed call")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a plain timm VisionTransformer at one patch size (+ ONNX, torch.export); "
                       "a model that is not a plain ViT (an option timm cannot hold) as ONNX / torch.export only")
    p.add_argument("checkpoint", help="a run directory or a model .safetensors file")
    p.add_argument("--patch-size", type=int, required=True, help="the size to bake in")
    p.add_argument("--out", type=Path, required=True, help="folder for config.json + model.safetensors")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs onnx and onnxscript); the "
                   "only way, with --torch-export, to export a model that is not a plain ViT")
    p.add_argument("--torch-export", action="store_true", help="also write model.pt2 (torch.export.save)")
    p.add_argument("--atol", type=float, default=1e-5, help="logit tolerance of the check (default 1e-5)")
    p.add_argument("--overwrite", action="store_true", help="replace the model files of an --out that already holds "
                   "a model or a training run (refused without it)")


def _add_probe_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="do the features agree across patch sizes? linear probe fitted at one size and "
                       "scored at each, CKA per layer, on a dataset's validation split (docs/flexible_finetune.md)")
    p.add_argument("checkpoint", help="a run directory or a model .safetensors file")
    p.add_argument("--data", required=True, help="fashion-mnist, an image folder or hf:NAME[:CONFIG]: its train "
                   "split fits the probes, its validation split scores them")
    p.add_argument("--classes", help="comma-separated class names: a subset of the source's classes")
    p.add_argument("--sizes", help="comma-separated patch sizes (default: the run's evaluated sizes)")
    p.add_argument("--fit", help="comma-separated sizes to fit a probe at, and/or 'all' (one probe on every size's "
                   "features); default: each size and all")
    p.add_argument("--layers", help="comma-separated block indices for the CKA (default: every block)")
    p.add_argument("--limit", type=int, help="fit the probes on the first N training images only")
    p.add_argument("--val-limit", type=int, help="score on the first N validation images only")
    p.add_argument("--seed", type=int, default=0, help="the split's seed, as a fine-tune with train.seed=SEED "
                   "draws it (default 0)")
    p.add_argument("--moved-from", metavar="CKPT", help="also measure how far each part of the network moved from "
                   "CKPT (the checkpoint this one was fine-tuned from)")
    p.add_argument("--out", type=Path, help="result files OUT.json and OUT.md (default: CHECKPOINT's folder/probe)")
