"""Command line: ``flexivit train RECIPE[:ARG] [--data SRC] [--out DIR] [--set k=v ...] [--resume]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import list_recipes

__all__ = ["main"]

USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, NotADirectoryError)


def _recipe_help() -> str:
    return "recipes: " + ", ".join(list_recipes()) + " (or a path to a recipe .py file); add :ARG, e.g. fashion_mnist:smoke"


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="RECIPE[:ARG] — " + _recipe_help())
    p.add_argument("--data", help="fashion-mnist (default), a local image folder, or hf:NAME[:CONFIG]")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<recipe>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexivit", description="Train and use FlexiViT models (one ViT, every patch size).",
        epilog=_recipe_help(),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe", epilog=_recipe_help())
    _add_run_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    return parser


def _resolve(args: argparse.Namespace):
    from .config import load_recipe

    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.source={args.data}")
    cfg = load_recipe(args.recipe, overrides)
    out = args.out or Path("runs") / args.recipe.replace(":", "-").replace("/", "_").removesuffix(".py")
    return cfg, out


def _train(args: argparse.Namespace) -> None:
    from .train import train

    cfg, out = _resolve(args)
    train(cfg, out_dir=out, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .train import TrainingError

    try:
        {"train": _train}[args.command](args)
    except (*USER_ERRORS, CheckpointError, TrainingError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"flexivit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
