"""The flexibility reproduction's report arithmetic (``tools/reproduce_flexibility.py``): what each run was
made from and spent, means over seeds, the issue's targets, distillation vs labels, and the re-derivation
of a stored report from its own per-run records.

Every function takes the finished runs only, so a report can be made while other runs still train
(``--finished-only``): a curve whose run has not finished is absent, and a target or comparison that needs
it is left out rather than guessed. A report keeps, per run name, each seed's recipe, overrides, base and
budget (``budgets[name]["per_seed"]``) and, per curve, each seed's top-1 (``top1_per_seed``), so that
``rederive`` rebuilds every mean, target and comparison from them without training.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

from flexivit.experiments.budget import GFlops, images_by_patch, run_gflops
from flexivit.experiments.flexibility import Run, comparisons

__all__ = ["BASE_KEYS", "BUDGET_KEYS", "run_record", "planned_budget", "summarise", "target_checks",
           "distill_vs_labels", "merge_rerun", "rederive", "differences"]

BUDGET_KEYS = ("steps", "images_seen", "train_gflops", "train_seconds")


BASE_KEYS = ("base_patch_size", "base_grid", "kernel_resize", "kernel_lr_scale")  # the base a run trained


def run_record(run: Run) -> dict[str, Any]:
    """What ``run`` was made from: its recipe and overrides (they resolve its whole config) and its base."""
    cfg = run.config()
    return {"recipe": run.recipe, "overrides": list(run.overrides), "base_patch_size": cfg.model.base_patch_size,
            "base_grid": cfg.model.base_grid, "kernel_resize": cfg.model.kernel_resize,
            "kernel_lr_scale": cfg.optim.kernel_lr_scale}


def planned_budget(run: Run, runs: dict[str, Run], gflops: GFlops) -> dict[str, Any]:
    """What ``run``'s config alone says it spends: steps, images per size (sampler draws), training GFLOPs
    (``flexivit.experiments.budget.run_gflops``, teacher forwards included)."""
    cfg = run.config()
    teacher = runs[f"{run.teacher}-seed{run.seed}"].config() if run.teacher else None
    return {"steps": cfg.train.steps, "images_by_patch": {str(p): n for p, n in images_by_patch(cfg).items()},
            "train_gflops": run_gflops(cfg, gflops, teacher)}


def summarise(runs: list[Run], per_run: dict[str, dict[str, dict[str, float]]], spent: dict[str, dict[str, Any]],
              sizes: list[int], seeds: list[int]) -> dict[str, Any]:
    """Curves (top-1 mean ± std over seeds per size) and budgets (per run name: what each seed spent and
    the means); every curve carries its run's mean images seen, training GFLOPs and seconds."""
    budgets: dict[str, Any] = {}
    for run in runs:
        entry = budgets.setdefault(run.name, {
            "kind": run.kind, "train_patch_size": run.train_patch_size, "supervision": run.supervision,
            "teacher": run.teacher, "budget": run.budget, "per_seed": []})
        entry["per_seed"].append({"seed": run.seed, **spent[run.dir_name]})
    for entry in budgets.values():
        budget_means(entry)
    curves: dict[str, Any] = {}
    for run in runs:
        for name, top1 in per_run[run.dir_name].items():
            entry = curves.setdefault(name, {
                "kind": run.kind, "train_patch_size": run.train_patch_size,
                "resize": name.split("/")[1] if "/" in name else None, "run": run.name,
                **{k: budgets[run.name].get(k) for k in ("supervision", "teacher", "budget", *BUDGET_KEYS,
                                                          *BASE_KEYS)},
                "seeds": [], "top1_per_seed": {str(p): [] for p in sizes}})
            entry["seeds"].append(run.seed)  # the seeds behind this curve (fewer while runs still train)
            for p in sizes:
                entry["top1_per_seed"][str(p)].append(top1[str(p)])  # in the order of "seeds"
    for entry in curves.values():
        curve_means(entry)
    return {"patch_sizes": sizes, "seeds": seeds, "split": "test", "curves": curves, "budgets": budgets}


def budget_means(entry: dict[str, Any]) -> None:
    """A run name's means over its ``per_seed`` rows, and the base its seeds share."""
    rows = entry["per_seed"]
    entry.update({k: statistics.fmean(r[k] for r in rows) for k in BUDGET_KEYS})
    entry["images_by_patch"] = {p: statistics.fmean(r["images_by_patch"].get(p, 0) for r in rows)
                                for p in sorted({p for r in rows for p in r["images_by_patch"]}, key=int)}
    for key in BASE_KEYS:
        values = {r[key] for r in rows if key in r}
        if len(values) > 1:
            raise ValueError(f"the seeds of one run name trained other bases ({key}: {sorted(values)})")
        if values:
            entry[key] = values.pop()


def curve_means(entry: dict[str, Any]) -> None:
    """A curve's top-1 mean and sample std per size from its per-seed values."""
    values = entry["top1_per_seed"]
    entry["top1_mean"] = {p: statistics.fmean(v) for p, v in values.items()}
    # One seed has no spread: null, not a zero that reads as "no variance".
    entry["top1_std"] = {p: statistics.stdev(v) if len(v) > 1 else None for p, v in values.items()}


def target_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two targets, for each FlexiViT against each fixed ViT trained on the same images with
    the same supervision (labels with labels, distilled with distilled), through PI-resize."""
    sizes, curves, checks = result["patch_sizes"], result["curves"], []
    for flexi_name, flexi in curves.items():
        if flexi["kind"].startswith("fixed") or flexi["budget"] != "images":
            continue
        for base_name, base in curves.items():
            if (not base["kind"].startswith("fixed") or base["resize"] != "pi"
                    or base["supervision"] != flexi["supervision"]):
                continue
            p = base["train_patch_size"]
            gap = 100 * (base["top1_mean"][str(p)] - flexi["top1_mean"][str(p)])
            checks.append({"flexi": flexi_name, "baseline": base_name, "target": f"within 1.0 point at p={p}",
                           "value": -gap, "met": gap <= 1.0})
            i = sizes.index(p)
            for j in (i - 2, i + 2):
                if 0 <= j < len(sizes):
                    q = str(sizes[j])
                    lead = 100 * (flexi["top1_mean"][q] - base["top1_mean"][q])
                    checks.append({"flexi": flexi_name, "baseline": base_name,
                                   "target": f">= 30 points above at p={q}", "value": lead, "met": lead >= 30})
    return checks


def distill_vs_labels(result: dict[str, Any], pairs: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Top-1 gain (points) of each distilled model over its label-only counterpart, with what each spent.

    ``train_gflops`` counts the teacher's forwards only; ``teacher_train_gflops`` is what training the
    teacher cost (its own row), and ``train_gflops_ratio_with_teacher`` the FLOPs ratio with it counted."""
    curves, budgets, rows = result["curves"], result["budgets"], []
    for distilled, labels, equal in pairs:
        if distilled not in curves or labels not in curves:  # a run of the pair has not finished
            continue
        d, lab = curves[distilled], curves[labels]
        teacher = budgets[d["teacher"]]["train_gflops"] if d["teacher"] in budgets else None
        rows.append({"distilled": distilled, "labels": labels, "equal": equal,
                     "top1_gain": {p: 100 * (d["top1_mean"][p] - lab["top1_mean"][p]) for p in d["top1_mean"]},
                     **{f"{k}_ratio": d[k] / lab[k] for k in ("images_seen", "train_gflops", "train_seconds")},
                     "teacher_train_gflops": teacher,
                     "train_gflops_ratio_with_teacher": None if teacher is None
                     else (d["train_gflops"] + teacher) / lab["train_gflops"]})
    return rows


def merge_rerun(stored: dict[str, Any], fresh: dict[str, Any], names: list[str], record: dict[str, Any],
                pairs: list[tuple[str, str, str]]) -> dict[str, Any]:
    """``stored`` with the rows of the run names ``names`` (their budgets and curves) taken from ``fresh``, a
    report of those runs retrained; targets, comparisons and training minutes recomputed, and ``record``
    (command, code revision, machine) listed under ``reruns`` with the rows it replaced. Every other row
    stays as it was measured."""
    missing = [n for n in names if n not in fresh["budgets"]]
    if missing:
        raise ValueError(f"the rerun did not finish {missing}: nothing merged")
    result = copy.deepcopy(stored)
    result["budgets"] = {k: fresh["budgets"][k] if k in names else v for k, v in stored["budgets"].items()}
    result["budgets"].update({k: fresh["budgets"][k] for k in names if k not in stored["budgets"]})
    curves = {k: v for k, v in stored["curves"].items() if v["run"] not in names}
    order = list(stored["curves"]) + [k for k in fresh["curves"] if k not in stored["curves"]]
    curves.update({k: v for k, v in fresh["curves"].items() if v["run"] in names})
    result["curves"] = {k: curves[k] for k in order if k in curves}
    rows = [r for b in result["budgets"].values() for r in b["per_seed"]]
    result["train_minutes"] = sum(r["train_seconds"] for r in rows) / 60
    result["targets"] = target_checks(result)
    result["distill_vs_labels"] = distill_vs_labels(result, pairs)
    result["reruns"] = [*stored.get("reruns", []), {**record, "rows": list(names)}]
    return result


def rederive(stored: dict[str, Any], runs: list[Run], gflops: GFlops, small: int,
             large: int) -> tuple[dict[str, Any], list[str]]:
    """``stored`` rebuilt from its per-run records without training, and every value of it that differs.

    Each seed's steps, images per size and GFLOPs are re-planned from its config (``runs``: the plan of the
    recorded command) and its recipe, overrides and base recorded; means, targets and comparisons are
    recomputed from the per-seed rows (a curve's top-1 from ``top1_per_seed`` where the file holds it)."""
    by_dir = {run.dir_name: run for run in runs}
    result = copy.deepcopy(stored)
    for name, entry in result["budgets"].items():
        for row in entry["per_seed"]:
            run = by_dir.get(f"{name}-seed{row['seed']}")
            if run is None:
                raise ValueError(f"{name} seed {row['seed']} is not in the plan of the recorded command "
                                 f"{stored['command']!r}; rederive with the tool of the revision that made it")
            row.update({**planned_budget(run, by_dir, gflops), **run_record(run)})
        budget_means(entry)
    for entry in result["curves"].values():
        entry.update({k: result["budgets"][entry["run"]][k] for k in (*BUDGET_KEYS, *BASE_KEYS)})
        if "top1_per_seed" in entry:
            curve_means(entry)
    rows = [r for b in result["budgets"].values() for r in b["per_seed"]]
    result["train_minutes"] = sum(r["train_seconds"] for r in rows) / 60
    result["targets"] = target_checks(result)
    result["distill_vs_labels"] = distill_vs_labels(result, comparisons(small, large))
    return result, differences(stored, result)


def differences(stored: Any, rebuilt: Any, where: str = "") -> list[str]:
    """Where ``rebuilt`` disagrees with ``stored`` (numbers to a relative 1e-9: the sums run in another
    order); keys only ``rebuilt`` has are records added, not differences."""
    if isinstance(stored, dict) and isinstance(rebuilt, dict):
        return [d for k, v in stored.items()
                for d in differences(v, rebuilt.get(k, "(absent)"), f"{where}.{k}" if where else k)]
    if isinstance(stored, list) and isinstance(rebuilt, list) and len(stored) == len(rebuilt):
        return [d for i, (a, b) in enumerate(zip(stored, rebuilt)) for d in differences(a, b, f"{where}[{i}]")]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (stored, rebuilt))
    if numbers and math.isclose(stored, rebuilt, rel_tol=1e-9, abs_tol=1e-12) or stored == rebuilt:
        return []
    return [f"{where}: {stored!r} in the file, {rebuilt!r} re-derived"]
