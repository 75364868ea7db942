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
    flexivit search RECIPE[:ARG] --grid KEY=V1,V2 [--grid ...] [--seeds 0,1,2] [--steps N] [--metric worst|mean]
                    [--jobs N] [--init CKPT] [--then-train] [--data SRC] [--out DIR] [--set k=v ...]
    flexivit evolve RECIPE[:ARG] [--population N] [--iterations N] [--tournament N] [--threshold 0.5|uniform]
                    [--unguided] [--keep-rate R] [--steps N] [--metric worst|mean] [--seed S] [--then-train]
                    [--data SRC] [--out DIR] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexivit.cli.args import build_parser
from flexivit.cli.errors import one_line, record_for_launcher
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


def _compress(args: argparse.Namespace) -> None:
    from flexivit.ext.compress import compress

    cfg, out = _resolve(args)
    compress(args.base, cfg, out_dir=out, resume=args.resume, overwrite=args.overwrite)


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


def _evolve(args: argparse.Namespace) -> None:
    from flexivit.ext.evolve import Settings, parse_threshold, run_evolve

    settings = Settings(population=args.population, iterations=args.iterations, tournament=args.tournament,
                        threshold=parse_threshold(args.threshold), unguided=args.unguided, keep_rate=args.keep_rate,
                        seed=args.seed, metric=args.metric)
    overrides = ([f"data.source={args.data}"] if args.data else []) + list(args.overrides)
    out = args.out or Path("runs") / ("evolve-" + args.recipe.replace(":", "-").replace("/", "_").removesuffix(".py"))
    best = run_evolve(recipe=args.recipe, settings=settings, steps=args.steps, out=out, overrides=overrides,
                      then_train=args.then_train)
    print(f"best on validation ({best['metric']} size): candidate {best['id']}, {best['graph']} -> "
          f"{100 * best['score']:.2f} %; wrote {out / 'evolve.md'}, {out / 'evolve.png'}, {out / 'best_graph.json'}")
    print(f"train it: {best['command']}")
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
        try:
            patch = [int(s) for s in args.patch_sizes.split(",")]
        except ValueError:
            raise ValueError(f"--patch-sizes takes one integer per image, comma-separated, such as 2,7,4; got "
                             f"{args.patch_sizes!r}") from None
    if args.budget_ms is not None:
        choice, source = predictor.choose_for_latency(args.budget_ms)
        patch, note = choice.patch_size, f"{choice.reason} ({source})"
    predictions = predictor.predict(args.images, patch, topk=args.topk)
    if args.json:
        mixed = len({p.patch_size for p in predictions}) > 1  # then each prediction names its own size
        print(json.dumps({"checkpoint": args.checkpoint, "patch_size": None if mixed else predictions[0].patch_size,
                          "choice": note, "predictions": [p.to_dict() for p in predictions]}, indent=2))
        return
    if note:
        print(f"patch size {patch} for {args.budget_ms:g} ms: {note}")
    for p in predictions:
        print(f"{p.image} (patch {p.patch_size})")
        for _, name, prob in p.top:
            print(f"  {100 * prob:6.2f}%  {name}")


def _export(args: argparse.Namespace) -> None:
    from flexivit.eval.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.patch_size, args.out, onnx=args.onnx,
                               torch_export=args.torch_export, atol=args.atol, overwrite=args.overwrite)
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in result.max_abs_diff.items())
    print(f"exported patch size {args.patch_size} to {result.out_dir}: {', '.join(result.files)}")
    print(f"checked against the flexible model on a sample batch (max |logit diff|: {diffs})")
    if "model.safetensors" not in result.files:  # not a plain ViT: ONNX / torch.export only
        print("not a timm model: run model.onnx, or torch.export.load('model.pt2').module(); see docs/compress.md")
        return
    print("load with timm alone: VisionTransformer(**json.load(open('config.json'))['model_args']) + "
          "load_state_dict(safetensors.torch.load_file('model.safetensors')); see docs/deploy.md")


def _recalibrate(args: argparse.Namespace) -> None:
    from flexivit.ext.recalibrate import recalibrate_checkpoint

    try:
        sizes = [int(s) for s in args.patch_sizes.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--patch-sizes takes comma-separated integers such as 3,5, got {args.patch_sizes!r}") from None
    file, new, images = recalibrate_checkpoint(args.checkpoint, sizes, data=args.data, images=args.images, out=args.out)
    print(f"running statistics for patch size(s) {', '.join(map(str, new))} from {images} training images; wrote {file}")


def _fewshot(args: argparse.Namespace) -> None:
    from flexivit.model.weights import run_dir
    from flexivit.ext.fewshot import FewShotSettings, markdown, parse_list, parse_local, run_fewshot, write_fewshot

    settings = FewShotSettings(ways=args.ways, shots=tuple(parse_list(args.shots, "--shots")), queries=args.queries,
                               episodes=args.episodes, methods=tuple(m.strip() for m in args.methods.split(",")),
                               local=parse_local(args.local), mix=args.mix, seed=args.seed)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    out = check_folder_target(args.out or run_dir(args.checkpoint))
    report = run_fewshot(args.checkpoint, data=args.data, settings=settings, classes=classes,
                         patch_sizes=args.patch_sizes, device=_device(args.device))
    files = write_fewshot(report, out)
    print(markdown(report), end="")
    print(f"wrote {', '.join(str(f) for f in files.values())}")


def _user_errors(command: str) -> tuple[type[BaseException], ...]:
    from flexivit.model.weights import CheckpointError
    from flexivit.data.transforms import CorruptImageError

    errors: tuple[type[BaseException], ...] = (*USER_ERRORS, CheckpointError, CorruptImageError)
    if command in ("train", "finetune", "compress"):
        from flexivit.train.assemble import TrainingError

        errors += (TrainingError,)
    return errors


COMMANDS = {"train": _train, "finetune": _finetune, "compress": _compress, "search": _search, "evolve": _evolve,
            "eval": _eval, "predict": _predict, "export": _export, "recalibrate": _recalibrate, "fewshot": _fewshot}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except _user_errors(args.command) as err:
        message = f"flexivit {args.command}: error: {one_line(err)}"
        print(message, file=sys.stderr)
        record_for_launcher(message)
        return 2
    return 0
