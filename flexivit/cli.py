"""Command line.

    flexivit train RECIPE[:ARG] [--data SRC] [--out DIR] [--set k=v ...] [--resume]
    flexivit finetune CHECKPOINT RECIPE[:ARG] [--data SRC] [--patch-size N] [--out DIR] [--set k=v ...]
    flexivit eval CHECKPOINT [--data SRC] [--patch-sizes 4,7,14 | all] [--out DIR] [--baseline CKPT[:PATCH]]
                  [--max-latency-ms X] [--max-gflops X] [--min-accuracy X] [--compile] [--precision P]
    flexivit predict CHECKPOINT IMAGE... [--patch-size N | --budget-ms X] [--topk 5] [--json]
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

from .config import list_recipes

__all__ = ["main"]

# Errors a user can cause (a bad recipe key or value, a missing file, a size that does not fit) print as
# one line; anything else (an internal TypeError or KeyError, say) keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


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
    p = sub.add_parser("finetune", help="fine-tune a trained FlexiViT on a recipe's task (stays flexible)",
                       epilog=_recipe_help())
    p.add_argument("checkpoint", help="a run directory or a model .safetensors file")
    _add_run_args(p)
    p.add_argument("--patch-size", type=int, help="fine-tune at this one size (default: sample the recipe's sizes, "
                   "which keeps every size usable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p = sub.add_parser("compress", help="a compact model derived from a trained FlexiViT (LUT-Q, least-squares "
                       "bridges, trained on its quantised outputs)", epilog=_recipe_help())
    p.add_argument("base", help="the trained FlexiViT: a run directory or a model .safetensors file")
    _add_run_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    _add_search_parser(sub)
    _add_evolve_parser(sub)
    _add_eval_parser(sub)
    _add_predict_parser(sub)
    _add_export_parser(sub)
    _add_recalibrate_parser(sub)
    _add_fewshot_parser(sub)
    return parser


def _add_search_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="choose settings on the validation split: a grid of trials, resumable",
                       epilog=_recipe_help())
    _add_run_args(p)
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


def _add_evolve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evolve", help="evolve block graphs guided by their learned connection weights, scored on "
                       "the validation split, resumable (docs/evolve.md)", epilog=_recipe_help())
    _add_run_args(p)
    p.add_argument("--population", type=int, default=8, help="candidates alive at once: the chain and random "
                   "graphs at the start (default 8)")
    p.add_argument("--iterations", type=int, default=16, help="children trained after the initial population, one "
                   "per iteration (default 16)")
    p.add_argument("--tournament", type=int, default=3, help="members drawn each iteration: the best is the parent, "
                   "the worst leaves the population (default 3)")
    p.add_argument("--threshold", default="0.5", help="a parent's edge is kept iff its trained weight exceeds this: a "
                   "number in [0, 1] (default 0.5) or 'uniform' (drawn from U(0, 1) per edge)")
    p.add_argument("--unguided", action="store_true", help="the control: keep each edge with probability "
                   "--keep-rate whatever its weight")
    p.add_argument("--keep-rate", type=float, default=0.5, help="the coin of --unguided, and of a guided parent "
                   "with no untrained child (default 0.5; pass a guided run's mean keep-rate to compare with it)")
    p.add_argument("--steps", type=int, help="training steps of each candidate (default: the recipe's)")
    p.add_argument("--metric", default="worst", help="worst (default): the lowest validation top-1 over the "
                   "evaluated sizes; mean: their mean")
    p.add_argument("--seed", type=int, default=0, help="the search's seed (default 0); candidates train with the "
                   "recipe's train.seed")
    p.add_argument("--then-train", action="store_true", help="train the best graph at the recipe's budget into "
                   "OUT/final and report it on the test split")


CHECKPOINT_HELP = "a run directory, a model .safetensors file, or a folder written by `flexivit export`"


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
                   "first (flexivit.compile); accuracy, img/s and latency are then the compiled model's")
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
    which.add_argument("--budget-ms", type=float, help="use the most accurate patch size whose batch-1 latency "
                       "on this machine fits (from the run's eval.json, else measured now)")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a plain timm VisionTransformer at one patch size (+ ONNX, torch.export); "
                       "a model that is not a plain ViT (bridges) as ONNX / torch.export only")
    p.add_argument("checkpoint", help="a run directory or a model .safetensors file")
    p.add_argument("--patch-size", type=int, required=True, help="the size to bake in")
    p.add_argument("--out", type=Path, required=True, help="folder for config.json + model.safetensors")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs onnx and onnxscript); the "
                   "only way, with --torch-export, to export a model that is not a plain ViT")
    p.add_argument("--torch-export", action="store_true", help="also write model.pt2 (torch.export.save)")
    p.add_argument("--atol", type=float, default=1e-5, help="logit tolerance of the check (default 1e-5)")


def _add_recalibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recalibrate", help="running statistics of batch-statistics norms (model.norm=batchnorm|bgn) "
                       "for new patch sizes, estimated on training images without gradients (docs/batchnorm.md)")
    p.add_argument("checkpoint", help="a run directory or a model .safetensors file")
    p.add_argument("--patch-sizes", required=True, help="comma-separated new sizes, e.g. 3,5")
    p.add_argument("--data", help="where the training images come from (default: the run's dataset, else fashion-mnist)")
    p.add_argument("--images", type=int, default=512, help="training images to estimate on (default 512)")
    p.add_argument("--out", type=Path, help="model file or folder to write (default: over the checkpoint's model)")


def _add_fewshot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fewshot", help="few-shot accuracy of a frozen FlexiViT with class proxies built from each "
                       "episode's support set, per method, shot count and patch size (docs/proxies.md)")
    p.add_argument("checkpoint", help="a run directory or a model .safetensors file (its head is ignored)")
    p.add_argument("--data", required=True, help="fashion-mnist, an image folder or hf:NAME[:CONFIG]; episodes come "
                   "from its test split")
    p.add_argument("--classes", help="comma-separated class names to draw episodes from (default: every class)")
    p.add_argument("--ways", type=int, default=5, help="classes per episode (default 5)")
    p.add_argument("--shots", default="1,5", help="support images per class, comma-separated (default 1,5)")
    p.add_argument("--queries", type=int, default=15, help="query images per class and episode (default 15)")
    p.add_argument("--episodes", type=int, default=100, help="episodes (default 100)")
    p.add_argument("--patch-sizes", help="comma-separated sizes, or 'all' (default: the run's training sizes)")
    p.add_argument("--methods", default="global,local,global+local", help="comma-separated, among global, local and "
                   "global+local (default: all three)")
    p.add_argument("--local", default="16", help="local proxies per class (k-means of the support tokens), or 'all' "
                   "(every support token); default 16")
    p.add_argument("--mix", type=float, default=0.5, help="weight of the global proxies in global+local (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="episodes and k-means derive from it (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", type=Path, help="where fewshot.json/.md/.png go (default: the checkpoint's folder)")


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


def _finetune(args: argparse.Namespace) -> None:
    from .finetune import finetune, fixed_size

    cfg, out = _resolve(args)
    if args.patch_size is not None:
        cfg = fixed_size(cfg, args.patch_size)
    finetune(args.checkpoint, cfg, out_dir=out, resume=args.resume)


def _compress(args: argparse.Namespace) -> None:
    from .compress import compress

    cfg, out = _resolve(args)
    compress(args.base, cfg, out_dir=out, resume=args.resume)


def _search(args: argparse.Namespace) -> None:
    from .search import SearchError, run_search

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
    from .evolve import Settings, parse_threshold, run_evolve

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

    from .evaluate import default_device

    if name and name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if not name:
        return default_device()
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None


def _budget(args: argparse.Namespace) -> dict | None:
    from .deploy import parse_accuracy

    budget = {"max_latency_ms": args.max_latency_ms, "max_gflops": args.max_gflops,
              "min_accuracy": parse_accuracy(args.min_accuracy) if args.min_accuracy is not None else None}
    return budget if any(v is not None for v in budget.values()) else None


def _eval(args: argparse.Namespace) -> None:
    from .checkpoint import run_dir
    from .deploy import BudgetError, choose_patch_size
    from .evaluate import evaluate_checkpoint, format_table
    from .measure import MeasureSettings
    from .report import write_report

    settings = MeasureSettings(batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats)
    budget = _budget(args)  # parsed before the sweep, so a malformed flag fails fast
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
    out = args.out or run_dir(args.checkpoint)
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

    from .deploy import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, _device(args.device))
    patch, note = args.patch_size, None
    if args.budget_ms is not None:
        choice, source = predictor.choose_for_latency(args.budget_ms)
        patch, note = choice.patch_size, f"{choice.reason} ({source})"
    predictions = predictor.predict(args.images, patch, topk=args.topk)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "patch_size": predictions[0].patch_size, "choice": note,
                          "predictions": [p.to_dict() for p in predictions]}, indent=2))
        return
    if note:
        print(f"patch size {patch} for {args.budget_ms:g} ms: {note}")
    for p in predictions:
        print(f"{p.image} (patch {p.patch_size})")
        for _, name, prob in p.top:
            print(f"  {100 * prob:6.2f}%  {name}")


def _export(args: argparse.Namespace) -> None:
    from .export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.patch_size, args.out, onnx=args.onnx,
                               torch_export=args.torch_export, atol=args.atol)
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in result.max_abs_diff.items())
    print(f"exported patch size {args.patch_size} to {result.out_dir}: {', '.join(result.files)}")
    print(f"checked against the flexible model on a sample batch (max |logit diff|: {diffs})")
    if "model.safetensors" not in result.files:  # not a plain ViT: ONNX / torch.export only
        print("not a timm model: run model.onnx, or torch.export.load('model.pt2').module(); see docs/compress.md")
        return
    print("load with timm alone: VisionTransformer(**json.load(open('config.json'))['model_args']) + "
          "load_state_dict(safetensors.torch.load_file('model.safetensors')); see docs/deploy.md")


def _recalibrate(args: argparse.Namespace) -> None:
    from .bgn import recalibrate_checkpoint

    try:
        sizes = [int(s) for s in args.patch_sizes.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--patch-sizes takes comma-separated integers such as 3,5, got {args.patch_sizes!r}") from None
    file, new, images = recalibrate_checkpoint(args.checkpoint, sizes, data=args.data, images=args.images, out=args.out)
    print(f"running statistics for patch size(s) {', '.join(map(str, new))} from {images} training images; wrote {file}")


def _fewshot(args: argparse.Namespace) -> None:
    from .checkpoint import run_dir
    from .fewshot import FewShotSettings, markdown, parse_list, parse_local, run_fewshot, write_fewshot

    settings = FewShotSettings(ways=args.ways, shots=tuple(parse_list(args.shots, "--shots")), queries=args.queries,
                               episodes=args.episodes, methods=tuple(m.strip() for m in args.methods.split(",")),
                               local=parse_local(args.local), mix=args.mix, seed=args.seed)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    report = run_fewshot(args.checkpoint, data=args.data, settings=settings, classes=classes,
                         patch_sizes=args.patch_sizes, device=_device(args.device))
    files = write_fewshot(report, args.out or run_dir(args.checkpoint))
    print(markdown(report), end="")
    print(f"wrote {', '.join(str(f) for f in files.values())}")


def _user_errors(command: str) -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .transforms import CorruptImageError

    errors: tuple[type[BaseException], ...] = (*USER_ERRORS, CheckpointError, CorruptImageError)
    if command in ("train", "finetune", "compress"):
        from .run import TrainingError

        errors += (TrainingError,)
    return errors


COMMANDS = {"train": _train, "finetune": _finetune, "compress": _compress, "search": _search, "evolve": _evolve,
            "eval": _eval, "predict": _predict, "export": _export, "recalibrate": _recalibrate, "fewshot": _fewshot}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except _user_errors(args.command) as err:
        print(f"flexivit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
