"""Command line.

    flexivit train RECIPE[:ARG] [--data SRC] [--out DIR] [--set k=v ...] [--resume]
    flexivit finetune CHECKPOINT RECIPE[:ARG] [--data SRC] [--patch-size N] [--out DIR] [--set k=v ...]
    flexivit eval CHECKPOINT [--data SRC] [--patch-sizes 4,7,14 | all] [--out DIR] [--baseline CKPT[:PATCH]]
                  [--max-latency-ms X] [--max-gflops X] [--min-accuracy X] [--compile] [--precision P]
    flexivit predict CHECKPOINT IMAGE... [--patch-size N | --patch-sizes N,N,... | --budget-ms X] [--topk 5] [--json]
    flexivit export CHECKPOINT --patch-size N --out DIR [--onnx] [--torch-export]
    flexivit recalibrate CHECKPOINT --patch-sizes 3,5 [--data SRC] [--images N] [--out FILE_OR_DIR]
    flexivit fewshot CHECKPOINT --data SRC [--classes a,b] [--ways N] [--shots 1,5] [--queries Q] [--episodes E]
                     [--patch-sizes 4,7] [--methods global,local,global+local] [--local M|all] [--mix A] [--seed S]
                     [--out DIR]
    flexivit probe CHECKPOINT --data SRC [--classes a,b] [--sizes 2,4,7,14] [--fit 14,7,all] [--layers 0,1]
                   [--limit N] [--val-limit N] [--moved-from START] [--out STEM]
    flexivit search RECIPE[:ARG] --grid KEY=V1,V2 [--grid ...] [--seeds 0,1,2] [--steps N] [--metric worst|mean]
                    [--jobs N] [--init CKPT] [--then-train] [--data SRC] [--out DIR] [--set k=v ...]
    flexivit evolve RECIPE[:ARG] [--population N] [--iterations N] [--tournament N] [--threshold 0.5|uniform]
                    [--unguided] [--keep-rate R] [--steps N] [--metric worst|mean] [--seed S] [--then-train]
                    [--data SRC] [--out DIR] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import SimpleNamespace
from pathlib import Path
from typing import Any

from flexivit.cli.args import add_run_args, build_parser, option_commands, recipe_help
from flexivit.cli.errors import one_line, print_line, record_for_launcher
from flexivit.outdir import check_folder_target

__all__ = ["main"]

# Errors a user can cause (a bad recipe key or value, a missing file, a size that does not fit) print as
# one line; anything else (an internal TypeError or KeyError, say) keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


def _resolve(args: argparse.Namespace):
    from flexivit.train.config import load_recipe

    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.source={args.data}")
    cfg = load_recipe(args.recipe, overrides)
    out = args.out or Path("runs") / args.recipe.replace(":", "-").replace("/", "_").removesuffix(".py")
    return cfg, out


def _train(args: argparse.Namespace) -> None:
    from flexivit.train.loop import train

    cfg, out = _resolve(args)
    train(cfg, out_dir=out, resume=args.resume, overwrite=args.overwrite)


def _finetune(args: argparse.Namespace) -> None:
    from flexivit.train.finetune import finetune, fixed_size

    cfg, out = _resolve(args)
    if args.patch_size is not None:
        cfg = fixed_size(cfg, args.patch_size)
    finetune(args.checkpoint, cfg, out_dir=out, resume=args.resume, overwrite=args.overwrite)


def _search(args: argparse.Namespace) -> None:
    from flexivit.experiments.search import SearchError, run_search

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SearchError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    overrides = ([f"data.source={args.data}"] if args.data else []) + list(args.overrides)
    out = args.out or Path("runs") / ("search-" + args.recipe.replace(":", "-").replace("/", "_").removesuffix(".py"))
    best = run_search(recipe=args.recipe, grid_specs=args.grid, seeds=seeds or [0], steps=args.steps,
                      metric=args.metric, jobs=args.jobs, out=out, overrides=overrides, init=args.init,
                      then_train=args.then_train)
    print(f"best on validation ({best['metric']} size): {best['setting']} -> {100 * best['score']:.2f} %; "
          f"wrote {out / 'search.md'}, {out / 'search.png'}, {out / 'best.json'}")
    if "final" in best:
        print(f"final run {best['final']['run']}, test top-1: " +
              ", ".join(f"p={p} {100 * v:.2f}" for p, v in best["final"]["test"].items()))


def _device(name: str | None):
    import torch

    from flexivit.eval.evaluate import default_device

    if name and name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if not name:
        return default_device()
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None


def _budget(args: argparse.Namespace) -> dict | None:
    from flexivit.eval.deploy import parse_accuracy

    floor = args.min_accuracy
    budget = {"max_latency_ms": args.max_latency_ms, "max_gflops": args.max_gflops,
              "min_accuracy": parse_accuracy(floor, "--min-accuracy") if floor is not None else None}
    return budget if any(v is not None for v in budget.values()) else None


def _eval(args: argparse.Namespace) -> None:
    from flexivit.model.weights import run_dir
    from flexivit.eval.deploy import BudgetError, choose_patch_size
    from flexivit.eval.evaluate import evaluate_checkpoint, format_table
    from flexivit.eval.measure import MeasureSettings
    from flexivit.eval.report import write_report

    settings = MeasureSettings(batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats)
    budget = _budget(args)  # parsed before the sweep, so a malformed flag fails fast
    out = check_folder_target(args.out or run_dir(args.checkpoint))
    report = evaluate_checkpoint(
        args.checkpoint, data=args.data, patch_sizes=args.patch_sizes, baselines=args.baseline,
        settings=settings, device=_device(args.device), eval_batch_size=args.eval_batch_size, limit=args.limit,
        progress=not args.no_progress, precision=args.precision, compile=args.compile,
    )
    failure = None
    if budget:
        try:
            choice = choose_patch_size(report["results"], **budget)
            report["choice"] = {"patch_size": choice.patch_size, "reason": choice.reason, "budget": budget}
        except BudgetError as err:
            failure = err
    files = write_report(report, out)
    compiled = f", compiled ({report['compiled_graphs']} graphs)" if report["compile"] else ""
    print(f"{report['checkpoint']} on {report['data']} ({report['n']} test images, {report['device_name']}, "
          f"{report['precision']}{compiled}):")
    print(format_table(report["results"]))
    for b in report.get("baselines", []):
        print(f"\nbaseline {b['label']}:\n{format_table(b['results'])}")
    print(f"\nwrote {', '.join(str(f) for f in files.values())}")
    if failure is not None:
        raise failure
    if "choice" in report:
        print(f"chosen patch size: {report['choice']['patch_size']} — {report['choice']['reason']}")


def _predict(args: argparse.Namespace) -> None:
    import json

    from flexivit.eval.deploy import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, _device(args.device))
    patch, note = args.patch_size, None
    if args.patch_sizes is not None:
        patch = _per_image(args.patch_sizes, int, "--patch-sizes", "2,7,4", None)
    if args.budget_ms is not None:
        choice, source = predictor.choose_for_latency(args.budget_ms)
        patch, note = choice.patch_size, f"{choice.reason} ({source})"
    if args.budgets_ms is not None:
        budgets = _per_image(args.budgets_ms, float, "--budgets-ms", "5,20,2", len(args.images))
        choices, source = predictor.choose_for_latencies(budgets)
        patch = [c.patch_size for c in choices]
        note = f"per-image budgets {', '.join(f'{b:g} ms -> patch {c.patch_size}' for b, c in zip(budgets, choices))} ({source})"
    predictions = predictor.predict(args.images, patch, topk=args.topk)
    if args.json:
        mixed = len({p.patch_size for p in predictions}) > 1  # then each prediction names its own size
        print(json.dumps({"checkpoint": args.checkpoint, "patch_size": None if mixed else predictions[0].patch_size,
                          "choice": note, "predictions": [p.to_dict() for p in predictions]}, indent=2))
        return
    if note:
        print(f"patch size {patch} for {args.budget_ms:g} ms: {note}" if args.budget_ms is not None else note)
    for p in predictions:
        print(f"{p.image} (patch {p.patch_size})")
        for _, name, prob in p.top:
            print(f"  {100 * prob:6.2f}%  {name}")


def _per_image(text: str, kind: type, flag: str, example: str, images: int | None) -> list:
    """``flag``'s comma-separated values, one per image (``images`` of them when given)."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        noun = "integer" if kind is int else "number"
        raise ValueError(f"{flag} takes one {noun} per image, comma-separated, such as {example}; got "
                         f"{text!r}") from None
    if images is not None and len(values) != images:
        raise ValueError(f"{flag} gives {len(values)} values for {images} images; give one per image, in order")
    return values


def _export(args: argparse.Namespace) -> None:
    from flexivit.eval.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.patch_size, args.out, onnx=args.onnx,
                               torch_export=args.torch_export, atol=args.atol, overwrite=args.overwrite)
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in result.max_abs_diff.items())
    print(f"exported patch size {args.patch_size} to {result.out_dir}: {', '.join(result.files)}")
    print(f"checked against the flexible model on a sample batch (max |logit diff|: {diffs})")
    if "model.safetensors" not in result.files:  # not a plain ViT: ONNX / torch.export only
        print("not a timm model: run model.onnx, or torch.export.load('model.pt2').module(); see docs/deploy.md")
        return
    print("load with timm alone: VisionTransformer(**json.load(open('config.json'))['model_args']) + "
          "load_state_dict(safetensors.torch.load_file('model.safetensors')); see docs/deploy.md")


def _ints(text: str | None, flag: str) -> list[int] | None:
    try:
        return None if text is None else [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, such as 2,4,7,14; got {text!r}") from None


def _probe(args: argparse.Namespace) -> None:
    from flexivit.eval.probe import parameter_drift, probe_markdown, probe_transfer
    from flexivit.model.weights import run_dir
    from flexivit.provenance import write_result

    stem = args.out or run_dir(args.checkpoint) / "probe"
    if stem.suffix not in ("", ".json", ".md"):  # write_result would take ".075" of "scale0.075" for an extension
        raise ValueError(f"--out {stem} is a file stem (OUT.json and OUT.md are written): drop the dot from its "
                         f"last part, e.g. {stem.with_name(stem.name.replace('.', '_'))}")
    payload = probe_transfer(
        args.checkpoint, data=args.data, sizes=_ints(args.sizes, "--sizes"),
        fits=args.fit.split(",") if args.fit else None, classes=args.classes.split(",") if args.classes else None,
        layers=_ints(args.layers, "--layers"), train_limit=args.limit, val_limit=args.val_limit, seed=args.seed)
    if args.moved_from:
        payload.update(drift_from=args.moved_from, drift=parameter_drift(args.moved_from, args.checkpoint))
    files = write_result(stem.with_suffix(""), payload, probe_markdown(payload))
    print(probe_markdown(payload) + f"\nwrote {', '.join(map(str, files))}")


def _user_errors(command: str) -> tuple[type[BaseException], ...]:
    from flexivit.model.weights import CheckpointError
    from flexivit.data.transforms import CorruptImageError

    errors: tuple[type[BaseException], ...] = (*USER_ERRORS, CheckpointError, CorruptImageError)
    drivers = option_commands()
    if command in ("train", "finetune") or (command in drivers and getattr(_driver(command), "TRAINS", False)):
        from flexivit.train.assemble import TrainingError

        errors += (TrainingError,)
    return errors


COMMANDS = {"train": _train, "finetune": _finetune, "search": _search, "eval": _eval, "predict": _predict,
            "export": _export, "probe": _probe}


def _driver(command: str) -> Any:
    """The module of an option family's command (``flexivit.ext.COMMANDS``)."""
    return importlib.import_module(option_commands()[command][0])


def _cli() -> SimpleNamespace:
    """What an option command's driver may use of the CLI."""
    return SimpleNamespace(run_args=add_run_args, recipe_help=recipe_help, resolve=_resolve, device=_device)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # the launcher's own options follow: not parsed here (flexivit.cli.launch)
        from flexivit.cli.launch import launch

        return launch(argv[1:], [*COMMANDS, *option_commands()])
    command = next((a for a in argv if not a.startswith("-")), None)
    cli = _cli()
    args = build_parser(command, cli).parse_args(argv)
    try:
        if args.command in COMMANDS:
            COMMANDS[args.command](args)
        else:
            _driver(args.command).run(args, cli)
    except _user_errors(args.command) as err:
        message = f"flexivit {args.command}: error: {one_line(err)}"
        print_line(message)
        record_for_launcher(message)
        return 2
    return 0
