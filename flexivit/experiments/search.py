"""``flexivit search``: choose settings on the validation split by running ordinary trials.

A search is a grid of ``--set`` values (the cartesian product of every ``--grid KEY=V1,V2,…``) times a
list of seeds (without ``--grid``, the recipe's module-level ``SEARCH_GRID``). Each trial is a normal run directory under ``OUT/trials/`` (``flexivit train`` of the
recipe, or ``flexivit finetune`` from ``--init``), trained for ``--steps`` and scored on the validation
split only: trials never evaluate the test split. Every finished trial is one line of
``OUT/search.jsonl``; a rerun skips those (and says how many), and an interrupted trial resumes from its
last checkpoint (``flexivit.experiments.runner``: every attempt is a line of ``OUT/runs.jsonl``, its output
``OUT/trials/<trial>.log``). ``search.md``/``search.png`` summarise the grid, ``best.json`` names the setting with
the highest metric (mean over seeds), and ``--then-train`` trains it at the recipe's own budget into
``OUT/final`` and reports it on the test split.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from flexivit.experiments.results import read_results
from flexivit.experiments.runner import Outcome, RunSpec, Study
from flexivit.model.weights import atomic_write_text, read_model_meta
from flexivit.train.config import ConfigError, apply_overrides, load_recipe, recipe_search_grid
from flexivit.jsonl import read_jsonl

__all__ = ["Trial", "SearchError", "parse_grid", "plan", "run_search", "run_spec", "check_data", "score_of",
           "task_sets", "METRICS"]

METRICS = ("worst", "mean")


class SearchError(ValueError):
    """A search that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class Trial:
    values: tuple[tuple[str, str], ...]  # (key, value) in grid order
    seed: int

    @property
    def name(self) -> str:
        parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.values] + [f"seed={self.seed}"]
        return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", "__".join(parts))

    @property
    def setting(self) -> str:
        """The grid point without the seed: what seeds are averaged over."""
        return " ".join(f"{k}={v}" for k, v in self.values) or "(recipe)"

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values] + [f"train.seed={self.seed}"]


def parse_grid(specs: Sequence[str], base_overrides: Sequence[str], recipe: str) -> list[tuple[str, list[str]]]:
    """``KEY=V1,V2`` strings → ``[(key, [values])]``, each value checked against the config's types.

    A value holding commas (a list field) is written in JSON brackets: ``patch.sizes=[2,4],[4,8]``.
    """
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SearchError(f"--grid {spec!r} must look like KEY=V1,V2,... (e.g. optim.lr=1e-3,3e-3)")
        values = [v.strip() for v in re.findall(r"\[[^\]]*\]|[^,]+", raw) if v.strip()]
        if not values:
            raise SearchError(f"--grid {key} has no values; give at least one, e.g. {key}=V1,V2")
        if key in (k for k, _ in grid):
            raise SearchError(f"--grid {key} is given twice; list all its values in one --grid")
        if key == "train.seed":
            raise SearchError("seeds are not a grid key: use --seeds 0,1,2")
        if len(set(values)) != len(values):
            raise SearchError(f"--grid {key} repeats a value: {values}")
        for value in values:  # unknown keys and mistyped values fail here, before any trial runs
            try:
                apply_overrides(load_recipe(recipe, list(base_overrides)), [f"{key}={value}"])
            except ConfigError as err:
                raise SearchError(f"--grid {key}: {err}") from None
        grid.append((key, values))
    return grid


def plan(grid: list[tuple[str, list[str]]], seeds: Sequence[int]) -> list[Trial]:
    keys = [k for k, _ in grid]
    return [Trial(tuple(zip(keys, combo)), seed)
            for combo in itertools.product(*(values for _, values in grid)) for seed in seeds]


def score_of(val: dict[str, float], metric: str) -> float:
    return min(val.values()) if metric == "worst" else statistics.mean(val.values())


def run_spec(name: str, sets: Sequence[str], *, recipe: str, init: str | None = None,
             args: Sequence[str] = ()) -> RunSpec:
    """A ``flexivit train`` (``finetune`` from ``init``) run of ``recipe`` with ``sets`` and the further
    command-line ``args`` (e.g. ``--patch-size 7``), for ``flexivit.experiments.runner``."""
    return RunSpec(name=name, command="finetune" if init else "train", recipe=recipe, inputs=(init,) if init else (),
                   sets=tuple(sets), args=tuple(args))


def _trial_spec(trial: Trial, *, recipe: str, init: str | None, overrides: list[str], steps: int | None) -> RunSpec:
    sets = [*overrides, *trial.overrides(), "train.test_eval=false", *([f"train.steps={steps}"] if steps else [])]
    return run_spec(f"trials/{trial.name}", sets, recipe=recipe, init=init)


def _trial_record(trial: Trial, run: Path) -> dict[str, Any]:
    """A finished trial's line of ``search.jsonl``: its setting and seed, validation top-1 and cost."""
    report = read_results(run)
    return {"trial": trial.name, "setting": trial.setting, "values": dict(trial.values), "seed": trial.seed,
            "val": report.top1("val"), "train_seconds": report.train_seconds, "images_seen": report.images_seen}


def summarise(records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per setting: the metric's mean and spread over seeds, and per-size validation accuracy."""
    rows = []
    for setting, group in itertools.groupby(sorted(records, key=lambda r: r["setting"]), key=lambda r: r["setting"]):
        group = list(group)
        scores = [score_of(r["val"], metric) for r in group]
        sizes = sorted(group[0]["val"], key=int)
        rows.append({
            "setting": setting, "values": group[0]["values"], "seeds": [r["seed"] for r in group],
            "metric": statistics.mean(scores), "metric_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "val": {p: statistics.mean(r["val"][p] for r in group) for p in sizes},
            "train_seconds": sum(r.get("train_seconds") or 0 for r in group),
        })
    return sorted(rows, key=lambda r: -r["metric"])


def write_report(rows: list[dict[str, Any]], grid: list[tuple[str, list[str]]], out: Path, *, metric: str,
                 title: str) -> None:
    """``search.md`` (every setting, best first) and ``search.png`` (the metric against the first grid
    key's values, one line per combination of the others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({p for r in rows for p in r["val"]}, key=int)
    lines = [f"# {title}", "", f"Validation top-1 (%), mean over seeds; ranked by the {metric} size. "
             "Trials never see the test split.", "",
             f"| setting | seeds | {metric} (± std) | " + " | ".join(f"p={p}" for p in sizes) + " | train min |",
             "|---|---:|---:|" + "---:|" * len(sizes) + "---:|"]
    for r in rows:
        cells = " | ".join(f"{100 * r['val'][p]:.2f}" if p in r["val"] else "–" for p in sizes)
        lines.append(f"| {r['setting']} | {len(r['seeds'])} | {100 * r['metric']:.2f} ± {100 * r['metric_std']:.2f} | "
                     f"{cells} | {r['train_seconds'] / 60:.1f} |")
    atomic_write_text(out / "search.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    key, values = grid[0] if grid else ("(recipe)", [""])
    others = sorted({tuple((k, v) for k, v in r["values"].items() if k != key) for r in rows})
    for rest in others:
        points = [(values.index(r["values"][key]), r) for r in rows if grid and
                  tuple((k, v) for k, v in r["values"].items() if k != key) == rest]
        points.sort(key=lambda pr: pr[0])
        label = " ".join(f"{k}={v}" for k, v in rest) or metric
        ax.errorbar([values[i] for i, _ in points], [100 * r["metric"] for _, r in points],
                    yerr=[100 * r["metric_std"] for _, r in points], marker="o", capsize=3, label=label)
    ax.set_xlabel(key)
    ax.set_ylabel(f"validation top-1, {metric} size (%)")
    ax.set_title(title)
    if len(others) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "search.png", dpi=120)
    plt.close(fig)


def check_init(init: str) -> None:
    try:
        read_model_meta(init)
    except Exception as err:  # a missing file, a non-safetensors file, or another framework's weights
        raise SearchError(f"--init {init} is not a FlexiViT checkpoint ({err})") from None


def run_search(*, recipe: str, grid_specs: Sequence[str], seeds: Sequence[int], steps: int | None, metric: str,
               jobs: int, out: Path, overrides: Sequence[str] = (), init: str | None = None,
               then_train: bool = False, say=print) -> dict[str, Any]:
    """Run (or continue) a search; returns ``best.json``'s content."""
    if metric not in METRICS:
        raise SearchError(f"--metric must be one of {METRICS}, got {metric!r}")
    if jobs < 1 or (steps is not None and steps < 1):
        raise SearchError("--jobs and --steps must be positive")
    if init:
        check_init(init)
    if not grid_specs:
        grid_specs = recipe_search_grid(recipe)
        if grid_specs:
            say(f"search: no --grid given; the recipe's SEARCH_GRID: {' '.join(grid_specs)}")
    grid = parse_grid(grid_specs, overrides, recipe)
    check_data(recipe, overrides)
    trials = plan(grid, seeds)
    (out / "trials").mkdir(parents=True, exist_ok=True)
    log_path = out / "search.jsonl"
    done = {r["trial"]: r for r in read_jsonl(log_path, say) if r}
    todo = {f"trials/{t.name}": t for t in trials if t.name not in done}
    say(f"search: {len(trials)} trials, {len(trials) - len(todo)} already finished (skipped), {len(todo)} to run")
    failed: list[Outcome] = []

    def finished(outcome: Outcome) -> None:  # called once per trial as it ends, one at a time
        if not outcome.ok:
            failed.append(outcome)
            return
        trial = todo[outcome.name]
        record = _trial_record(trial, out / outcome.name)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        done[trial.name] = record
        say(f"  {trial.name}: validation {metric} {score_of(record['val'], metric):.4f}")

    specs = [_trial_spec(t, recipe=recipe, init=init, overrides=list(overrides), steps=steps) for t in todo.values()]
    if specs:
        Study(out, jobs=jobs, say=say).run_all(specs, on_done=finished, strict=False)
    records = [done[t.name] for t in trials if t.name in done]
    if not records:
        raise SearchError(f"no trial finished ({len(failed)} failed; see {failed[0].log if failed else out}), so "
                          "there is no best setting" + (" and nothing for --then-train to train" if then_train else ""))
    rows = summarise(records, metric)
    best = {"setting": rows[0]["setting"], "values": rows[0]["values"], "metric": metric,
            "score": rows[0]["metric"], "val": rows[0]["val"], "seeds": rows[0]["seeds"], "steps": steps,
            "recipe": recipe, "overrides": list(overrides), "trials": len(records),
            "failed": [todo[f.name].name for f in failed],
            "train_seconds": sum(r["train_seconds"] for r in records),
            "images_seen": sum(r["images_seen"] for r in records)}
    write_report(rows, grid, out, metric=metric, title=f"flexivit search {recipe}")
    if then_train:
        best["final"] = _final(best, recipe=recipe, init=init, overrides=list(overrides), out=out, say=say)
    atomic_write_text(out / "best.json", json.dumps(best, indent=2) + "\n")
    if failed:
        raise SearchError(f"{len(failed)} of {len(trials)} trials failed ({', '.join(str(f.log) for f in failed)}); "
                          "the others are summarised in search.md; fix the cause and rerun to run only those")
    return best


def task_sets(task: str, folder: Path | None) -> list[str]:
    """The ``--set`` values that make ``task`` out of the fine-tune recipe the study tools share: ``tops`` is the
    recipe's own task, ``digits`` every class of the image folder ``folder`` (``tools/make_mnist5k.py``)."""
    if task == "tops":
        return []
    if folder is None:
        raise SearchError(f"the {task} task needs --mnist5k DIR (an image folder: python tools/make_mnist5k.py DIR)")
    return [f"data.source={folder.resolve()}", "data.classes=null"]


def check_data(recipe: str, overrides: Sequence[str]) -> None:
    """Load the data once before any trial, so a missing source or a split too small to hold out a
    validation split is one clear error rather than a failure per trial."""
    from flexivit.train.builders import build_data

    build_data(load_recipe(recipe, list(overrides)))


def _final(best: dict[str, Any], *, recipe: str, init: str | None, overrides: list[str], out: Path,
           say) -> dict[str, Any]:
    """Train the winning setting at the recipe's own budget and report it on the test split."""
    sets = [*overrides, *(f"{k}={v}" for k, v in best["values"].items())]
    outcome = Study(out, say=say).run(run_spec("final", sets, recipe=recipe, init=init))
    if not outcome.ok:
        raise SearchError(f"the final run of {best['setting']}: {outcome.error}")
    return {"run": str(out / "final"), "test": read_results(out / "final").top1("scored")}
