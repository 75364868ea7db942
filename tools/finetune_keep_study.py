"""Issue 27, part 2 (screening): which setting of ``flexivit finetune CKPT RECIPE --patch-size P`` keeps every
trained size. Fine-tunes a pretrained FlexiViT with each candidate at one or two learning rates, scores every
run on the validation split at every trained size, states each run's compute (images per size, fine-tuning
GFLOPs, training seconds) and applies the selection rule written in docs/flexible_finetune.md before the runs:

    python tools/finetune_keep_study.py --pretrained runs/quickstart --mnist5k data/mnist5k --patch-size 14 \\
        --steps 400 --out runs/keep --results docs/results/finetune_keep
    python tools/finetune_keep_study.py --combine keep_seed0.json keep_seed1.json keep_seed2.json --results STEM

Candidates (``CANDIDATES``): the plain fixed fine-tune (the reference), the flexible default (sizes sampled,
no ``--patch-size``), mostly-P sampling (``finetune.fixed_others``), a consistency term toward the logits at P
(``finetune.consistency``) and a probe-fitted head (``finetune.head_init=probe``); all are described in
``flexivit.train.finetune_modes``. The rule: the worst size's top-1 scores a run, a run whose top-1 at P is more
than ``--margin`` points below the plain fixed fine-tune's best is not eligible, each candidate keeps its best
eligible learning rate, and scores within ``--tie`` points tie, the tie going to fewer GFLOPs.
Runs go through ``flexivit.experiments.runner`` (finished runs are skipped, interrupted ones resumed).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from flexivit.eval.measure import count_gflops
from flexivit.experiments.budget import FWD_BWD, images_by_patch
from flexivit.experiments.results import eval_by_step, read_results
from flexivit.experiments.runner import Study
from flexivit.experiments.search import run_spec, task_sets
from flexivit.model.weights import load_model
from flexivit.provenance import write_result
from flexivit.train.builders import load_splits
from flexivit.train.config import Config, load_recipe
from flexivit.train.finetune import fixed_size
from flexivit.train.finetune_modes import HEAD_PROBE_PER_CLASS, consistency_images_by_patch

RECIPE = "fashion_mnist_finetune"
PLAIN_BEFORE = ("finetune.consistency=0", "finetune.consistency_share=0.5")


@dataclass(frozen=True)
class Candidate:
    """One setting: its ``--set`` overrides, whether it fine-tunes at ``--patch-size`` (``fixed``) and the
    ``finetune.fixed_lr_scale`` values it runs at (the flexible default runs at the recipe's lr)."""

    name: str
    sets: tuple[str, ...]
    scales: tuple[float, ...]
    fixed: bool = True
    changes: int = 0  # settings changed from the plain fixed fine-tune (the tie's second key)


CANDIDATES = (
    Candidate("fixed", (), (0.075, 1.0, 2.0)),
    Candidate("flexible", (), (1.0,), fixed=False, changes=1),
    Candidate("others0.25", ("finetune.fixed_others=0.25",), (0.25, 1.0), changes=1),
    Candidate("others0.5", ("finetune.fixed_others=0.5",), (0.25, 1.0, 2.0), changes=1),
    Candidate("others0.75", ("finetune.fixed_others=0.75",), (1.0, 2.0), changes=1),
    Candidate("consistency", ("finetune.consistency=1", "finetune.consistency_share=0.5"), (0.25, 1.0), changes=2),
    Candidate("probehead", ("finetune.head_init=probe",), (0.075, 1.0), changes=1),
    # Second round, after the first showed mostly-P at 0.5 eligible with the best worst size: each other idea on
    # top. Third round: their second lr (and others0.5's third) at 2x, as every lower lr had lost at 14.
    Candidate("others0.5-consistency", ("finetune.fixed_others=0.5", "finetune.consistency=1",
                                        "finetune.consistency_share=0.5"), (1.0, 2.0), changes=3),
    Candidate("others0.5-probehead", ("finetune.fixed_others=0.5", "finetune.head_init=probe"), (1.0, 2.0),
              changes=2),
    # Fourth round, after 3 pretrained seeds showed others0.5-consistency losing 1.4-3.3 points at 14: every step
    # at P for the loss, the consistency term on every one of them (share 1), alone or with a quarter of the
    # steps at the other sizes; the plain reference gets 2x too (finetune.md chose 8e-3 for a fixed fine-tune at 14).
    Candidate("consistency-all", ("finetune.consistency=1", "finetune.consistency_share=1"), (1.0, 2.0), changes=2),
    Candidate("others0.25-consistency-all", ("finetune.fixed_others=0.25", "finetune.consistency=1",
                                             "finetune.consistency_share=1"), (1.0, 2.0), changes=3),
)


def run_sets(base: Sequence[str], candidate: Candidate, scale: float, steps: int, eval_every: int) -> list[str]:
    lr = [f"finetune.fixed_lr_scale={scale:g}"] if candidate.fixed else []
    # The screen's settings as they were before the consistency term became --patch-size's default: a candidate
    # without the term is a fine-tune without it, and the share is 0.5 unless the candidate names its own.
    return [*base, *PLAIN_BEFORE, *candidate.sets, *lr, f"train.steps={steps}", f"train.eval_every={eval_every}",
            "train.checkpoint_every=1000000", "train.test_eval=false"]


def resolved(sets: Sequence[str], candidate: Candidate, patch_size: int) -> Config:
    """The config the run trains with (what ``flexivit finetune`` resolves)."""
    cfg = load_recipe(RECIPE, list(sets))
    return fixed_size(cfg, patch_size) if candidate.fixed else cfg


def probe_images(cfg: Config) -> int:
    """Training images the probe head is fitted on (``task_support``: up to ``HEAD_PROBE_PER_CLASS`` per class)."""
    labels = torch.as_tensor(load_splits(cfg).train.with_format("numpy", columns=["label"])[:]["label"])
    return int(labels.bincount().clamp_max(HEAD_PROBE_PER_CLASS).sum())


def compute(cfg: Config, forward: Any) -> dict[str, Any]:
    """Images per size and fine-tuning GFLOPs: ``FWD_BWD`` × forward GFLOPs per trained image, plus the
    consistency term's second forward and backward, plus the probe head's forward-only feature pass."""
    trained = images_by_patch(cfg)
    paired = consistency_images_by_patch(cfg)
    probed = probe_images(cfg) if cfg.finetune.head_init == "probe" else 0
    sizes = cfg.patch.eval_sizes or cfg.patch.sizes
    gflops = (sum(n * FWD_BWD * forward(p) for p, n in trained.items())
              + sum(n * FWD_BWD * forward(p) for p, n in paired.items())
              + sum(probed * forward(p) for p in sizes))
    return {"images": {str(p): n for p, n in trained.items()},
            "consistency_images": {str(p): n for p, n in paired.items()}, "probe_images_per_size": probed,
            "gflops": gflops}


def select(rows: list[dict[str, Any]], *, patch_size: int, margin: float, tie: float) -> dict[str, Any]:
    """The rule of docs/flexible_finetune.md over ``rows`` (top-1 in percent per size)."""
    p = str(patch_size)
    reference = max(r["val"][p] for r in rows if r["candidate"] == "fixed")
    for r in rows:  # a row combined over pretrained seeds (``combine``) scores the mean of each seed's worst size
        r["worst"] = statistics.fmean(r["seed_worst"]) if "seed_worst" in r else min(r["val"].values())
        r["eligible"] = r["val"][p] >= reference - margin
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["eligible"] and (r["candidate"] not in best or r["worst"] > best[r["candidate"]]["worst"]):
            best[r["candidate"]] = r
    ranked = sorted(best.values(), key=lambda r: -r["worst"])
    top = ranked[0]["worst"] if ranked else None
    tied = [r for r in ranked if r["worst"] >= top - tie] if ranked else []
    changes = {c.name: c.changes for c in CANDIDATES}
    fixed_only = [r for r in tied if r["candidate"] != "flexible"]  # the flexible default is a reference point
    winner = min(fixed_only, key=lambda r: (r["gflops"], changes.get(r["candidate"], 0)), default=None)
    return {"reference_top1_at_p": reference, "per_candidate": {c: r["run"] for c, r in best.items()},
            "out": sorted({r["candidate"] for r in rows} - set(best)), "tied": [r["run"] for r in tied],
            "winner": winner["run"] if winner else None}


def markdown(payload: dict[str, Any]) -> str:
    rows, sel, p = payload["runs"], payload["selection"], payload["patch_size"]
    sizes = list(rows[0]["val"])
    base = next(r["gflops"] for r in rows if r["run"] == sel["per_candidate"].get("fixed", rows[0]["run"]))
    lines = [f"# A fine-tune at patch {p} that keeps every size: screen ({payload['task']}, validation)", "",
             f"From {payload['pretrained']} (seed 0), {payload['steps']} steps each, validation top-1 (%). "
             f"Reference top-1 at {p} (plain fixed, best lr): {sel['reference_top1_at_p']:.1f}; eligible: within "
             f"{payload['margin']:g} point of it. Score: the worst size. GFLOPs: fine-tuning compute "
             "(3 x forward per trained image, plus extra forwards); x fixed: ratio to the plain fixed run. train s: the "
             "trainer's loop wall time, on cores shared with other jobs: not a speed comparison.", "",
             "| candidate | lr | " + " | ".join(f"p={s}" for s in sizes) + " | worst | eligible | images per size "
             "| GFLOPs | x fixed | train s |", "|---|---:|" + "---:|" * len(sizes) + "---:|:-:|---|---:|---:|---:|"]
    for r in rows:
        mark = "**" if r["run"] == sel["winner"] else ""
        images = ", ".join(f"{s}: {n}" for s, n in r["images"].items())
        extra = "".join(f"; +{n} at {s} (consistency)" for s, n in r["consistency_images"].items())
        extra += f"; +{r['probe_images_per_size']} per size (probe)" if r["probe_images_per_size"] else ""
        lines.append(f"| {mark}{r['candidate']}{mark} | {r['lr']:g} | " + " | ".join(f"{r['val'][s]:.1f}" for s in sizes)
                     + f" | {r['worst']:.1f} | {'yes' if r['eligible'] else 'no'} | {images}{extra} | "
                     f"{r['gflops']:.0f} | {r['gflops'] / base:.2f} | {r['train_seconds']:.0f} |")
    lines += ["", f"Each candidate's chosen lr: {', '.join(f'{c}: {n}' for c, n in sel['per_candidate'].items())}. "
              f"Not eligible at any lr: {', '.join(sel['out']) or 'none'}. Tied within {payload['tie']:g} point of the "
              f"best: {', '.join(sel['tied'])}. Winner (fixed-size candidates; tie to fewer GFLOPs): {sel['winner']}.",
              "", f"A plain fixed fine-tune of {payload['steps']} steps at each size would cost (GFLOPs, not run): "
              + ", ".join(f"{s}: {g:.0f}" for s, g in payload["fixed_gflops_at"].items())
              + " (the token budget gives every size's step about the same tokens)."]
    return "\n".join(lines) + "\n"


def combine(payloads: list[dict[str, Any]], *, margin: float, tie: float) -> dict[str, Any]:
    """The screens of several pretrained seeds as one (same candidates, task and steps): each run that every seed
    has becomes one row of mean top-1 per size (its std and per-seed values beside), scored by the mean of each
    seed's worst size; the rule of ``select`` then applies to those rows (docs/LOG.md, round 4)."""
    names = [r["run"] for r in payloads[0]["runs"]]
    common = [n for n in names if all(any(r["run"] == n for r in pl["runs"]) for pl in payloads)]
    rows = []
    for name in common:
        per = [next(r for r in pl["runs"] if r["run"] == name) for pl in payloads]
        sizes = list(per[0]["val"])
        rows.append({**{k: per[0][k] for k in ("candidate", "run", "scale", "lr", "sets", "images",
                                                "consistency_images", "probe_images_per_size")},
                     "val": {s: statistics.fmean(r["val"][s] for r in per) for s in sizes},
                     "val_std": {s: statistics.stdev([r["val"][s] for r in per]) for s in sizes},
                     "per_seed": [r["val"] for r in per], "seed_worst": [min(r["val"].values()) for r in per],
                     "gflops": statistics.fmean(r["gflops"] for r in per),
                     "train_seconds": statistics.fmean(r["train_seconds"] for r in per)})
    first = payloads[0]
    payload = {"pretrained": [pl["pretrained"] for pl in payloads], "task": first["task"],
               "patch_size": first["patch_size"], "steps": first["steps"], "margin": margin, "tie": tie,
               "gflops_forward": first["gflops_forward"], "fixed_gflops_at": first["fixed_gflops_at"],
               "seeds": first["seeds"], "split": "val", "runs": rows,
               "left_out": sorted(set(names) - set(common))}
    payload["selection"] = select(rows, patch_size=first["patch_size"], margin=margin, tie=tie)
    return payload


def combined_markdown(payload: dict[str, Any]) -> str:
    rows, sel, p = payload["runs"], payload["selection"], payload["patch_size"]
    sizes = list(rows[0]["val"])
    base = next(r["gflops"] for r in rows if r["run"] == sel["per_candidate"]["fixed"])
    lines = [f"# A fine-tune at patch {p} that keeps every size: {len(payload['pretrained'])} pretrained seeds "
             f"({payload['task']}, validation)", "",
             f"Pretrained runs {', '.join(payload['pretrained'])}; each fine-tuned {payload['steps']} steps with "
             "fine-tune seed 0. Validation top-1 (%), mean ± sample std over the pretrained seeds; worst: the mean of "
             f"each seed's worst size. Reference at {p} (plain fixed, best lr, mean): "
             f"{sel['reference_top1_at_p']:.2f}; eligible: mean at {p} within {payload['margin']:g} point of it. "
             "GFLOPs: fine-tuning compute (3 × forward per trained image, plus the consistency term's forwards); "
             "× fixed: ratio to the plain fixed run.", "",
             "| candidate | lr | " + " | ".join(f"p={s}" for s in sizes) + " | worst | eligible | GFLOPs | × fixed |",
             "|---|---:|" + "---:|" * len(sizes) + "---:|:-:|---:|---:|"]
    for r in rows:
        mark = "**" if r["run"] == sel["winner"] else ""
        lines.append(f"| {mark}{r['candidate']}{mark} | {r['lr']:g} | "
                     + " | ".join(f"{r['val'][s]:.1f} ± {r['val_std'][s]:.1f}" for s in sizes)
                     + f" | {r['worst']:.1f} | {'yes' if r['eligible'] else 'no'} | {r['gflops']:.0f} | "
                     f"{r['gflops'] / base:.2f} |")
    lines += ["", "Per seed (p = " + " / ".join(sizes) + "):", ""]
    lines += [f"- {r['run']}: " + "; ".join(" / ".join(f"{v[s]:.1f}" for s in sizes) for v in r["per_seed"])
              for r in rows]
    lines += ["", f"Each candidate's chosen lr: {', '.join(f'{c}: {n}' for c, n in sel['per_candidate'].items())}. "
              f"Not eligible at any lr: {', '.join(sel['out']) or 'none'}. Tied within {payload['tie']:g} point of the "
              f"best: {', '.join(sel['tied'])}. Winner (fixed-size candidates; tie to fewer GFLOPs): {sel['winner']}."
              + (f" Runs not on every seed, left out: {', '.join(payload['left_out'])}." if payload["left_out"] else "")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", type=Path, help="the pretrained run to fine-tune")
    ap.add_argument("--mnist5k", type=Path, help="the digits task's image folder (default: the recipe's tops task)")
    ap.add_argument("--patch-size", type=int, default=14)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--only", nargs="+", choices=[c.name for c in CANDIDATES], help="run these candidates only")
    ap.add_argument("--margin", type=float, default=1.0, help="points the fine-tune size may lose (eligibility)")
    ap.add_argument("--tie", type=float, default=1.0, help="scores within this many points tie")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, help="study folder: one run folder per candidate and lr")
    ap.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                    help="instead of running: combine these screens' result files (one per pretrained seed)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="another recipe override for every run (repeatable)")
    ap.add_argument("--results", type=Path, required=True, help="result stem: writes STEM.json and STEM.md")
    args = ap.parse_args(argv)
    if args.combine:
        payload = combine([json.loads(f.read_text()) for f in args.combine], margin=args.margin, tie=args.tie)
        files = write_result(args.results, payload, combined_markdown(payload))
        print(f"wrote {', '.join(map(str, files))}")
        return
    if args.pretrained is None or args.out is None:
        ap.error("--pretrained and --out are needed (or --combine)")
    base = [*task_sets("digits" if args.mnist5k else "tops", args.mnist5k), *args.sets]
    plan = []
    for cand in CANDIDATES:
        if args.only and cand.name not in args.only and cand.name != "fixed":
            continue
        for scale in cand.scales:
            sets = run_sets(base, cand, scale, args.steps, args.eval_every)
            name = f"{cand.name}-p{args.patch_size}-scale{scale:g}" if cand.fixed else f"{cand.name}-lr-recipe"
            extra = ["--patch-size", str(args.patch_size)] if cand.fixed else []
            plan.append((cand, scale, run_spec(name, sets, recipe=RECIPE, init=str(args.pretrained), args=extra),
                         resolved(sets, cand, args.patch_size)))
    study, runs = Study(args.out, jobs=args.jobs), [spec for _, _, spec, _ in plan]
    study.run_all(runs)
    model, _ = load_model(args.out / plan[0][2].name)
    size = plan[0][3].data.image_size
    x = torch.zeros(1, model.config.in_chans, size, size)  # (1, C, H, W): FLOPs do not depend on values

    @functools.cache
    def forward(patch: int) -> float:
        with torch.no_grad():
            return count_gflops(lambda t: model(t, patch_size=patch), x)

    rows = []
    for cand, scale, spec, cfg in plan:
        run = args.out / spec.name
        report = read_results(run)
        rows.append({"candidate": cand.name, "run": spec.name, "scale": scale, "lr": cfg.optim.lr,
                     "sets": list(spec.sets), "args": list(spec.args),
                     "val": report.percent("val"), "val_by_step": eval_by_step(run),
                     "train_seconds": report.train_seconds, "images_seen": report.images_seen,
                     **compute(cfg, forward)})
    payload = {"pretrained": str(args.pretrained), "task": "MNIST-5k digits" if args.mnist5k else "tops",
               "patch_size": args.patch_size, "steps": args.steps, "margin": args.margin, "tie": args.tie,
               "gflops_forward": {str(p): forward(p) for p in sorted({int(s) for r in rows for s in r["val"]})},
               "seeds": [0], "split": "val", "runs": rows}
    # What a plain fixed fine-tune of the same steps would cost at each size (not run: the cost target).
    fixed = next(c for c in CANDIDATES if c.name == "fixed")
    payload["fixed_gflops_at"] = {
        s: compute(resolved(run_sets(base, fixed, 1.0, args.steps, args.eval_every), fixed, int(s)), forward)["gflops"]
        for s in payload["gflops_forward"]}
    payload["selection"] = select(rows, patch_size=args.patch_size, margin=args.margin, tie=args.tie)
    files = write_result(args.results, payload, markdown(payload), trained_at=study.trained_at(runs))
    print(f"wrote {', '.join(map(str, files))}")


if __name__ == "__main__":
    main()
