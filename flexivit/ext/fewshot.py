"""``flexivit fewshot``: few-shot classification with class proxies on a frozen FlexiViT, at every patch size.

Episodes come from the test split of ``--data`` (optionally only its ``--classes``). Episode ``e`` draws, with
a generator seeded by ``(seed, e)``, ``ways`` classes and, per class, ``max(shots) + queries`` distinct images:
the first ``max(shots)`` are the support, the rest the queries, so no support image is ever a query. For
each patch size the backbone (any FlexiViT; its own head ignored; eval mode, no gradients) gives every
episode image's pooled feature and patch tokens; for each shot count the first ``shots`` support images of
each class make the episode's proxies (``flexivit.ext.proxies.support_proxies``) and every query is classified by
each method:

- ``global``: cosine to the class means of the pooled features (the global proxies alone);
- ``local``: the local proxies alone (``--local M`` k-means centres of each class's support tokens, capped at
  its token count; ``--local all``: every support token);
- ``global+local``: ``mix * global + (1 - mix) * local`` (``--mix``, default 0.5).

``--local`` may list several M (``4,16,all``): the backbone pass is shared and each M is scored on it exactly as
a run with that M alone would score it (k-means seeds depend on the episode, shots and class, not on M);
``global`` does not use local proxies and is reported once. Every method, M, shot count and patch size sees
the same episodes and queries, so their differences are paired.
An episode's accuracy is over its ``ways * queries`` queries; ``fewshot.json`` holds each episode's, their
mean and a 95 % confidence interval ``1.96 * std / sqrt(episodes)`` (normal approximation, sample std), and
the paired gain of ``global+local`` over ``global`` (per M) with its interval. Deterministic for a seed.

"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from flexivit.model.weights import atomic_write_text, run_dir
from flexivit.outdir import check_folder_target
from flexivit.data.sources import TransformedDataset, collate, select_classes
from flexivit.eval.evaluate import default_device, load_eval_splits
from flexivit.model.vit import FlexiViT
from flexivit.ext.proxies import LOCAL_TEMPERATURE, global_similarity, local_similarity, pooled_and_tokens, support_proxies
from flexivit.rng import mix
from flexivit.eval.subjects import load_subject, resolve_patch_sizes
from flexivit.data.transforms import eval_transform

__all__ = ["METHODS", "FewShotSettings", "Episode", "draw_episodes", "run_fewshot", "write_fewshot",
           "parse_local", "parse_list", "local_label", "markdown", "score_episode"]

METHODS = ("global", "local", "global+local")
Z95 = 1.96  # two-sided 95 % quantile of the normal distribution
QUERY_CHUNK = 16  # queries scored at once against the local proxies: bounds the (B, K, M, N) similarities


@dataclass(frozen=True)
class FewShotSettings:
    """What an episode is and how it is scored. ``local``: the local proxies per class M to score, each a count
    or ``None`` (every support token a local proxy), no M twice; a single M (``local=16``) stands for ``(16,)``."""

    ways: int = 5
    shots: tuple[int, ...] = (1, 5)
    queries: int = 15
    episodes: int = 100
    methods: tuple[str, ...] = METHODS
    local: tuple[int | None, ...] = (16,)
    mix: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.local, tuple):  # one M, as callers gave it before --local took a list
            object.__setattr__(self, "local", tuple(self.local) if isinstance(self.local, list) else (self.local,))
        if self.ways < 2:
            raise ValueError(f"--ways {self.ways}: an episode needs 2 or more classes (with one, every query is "
                             "trivially right); pass --ways 2 or more")
        for name in ("queries", "episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be 1 or more, got {getattr(self, name)}")
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"--shots must be positive integers such as 1,5, got {list(self.shots)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown --methods {unknown}; choose among {', '.join(METHODS)}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"--mix (the weight of the global proxies in global+local) must be in [0, 1], got "
                             f"{self.mix}")
        if not self.local or any(m is not None and not isinstance(m, int) for m in self.local):
            raise ValueError(f"--local takes counts of local proxies per class or 'all', such as 16 or 4,16,all; got "
                             f"{list(self.local)}")
        twice = [local_label(m) for i, m in enumerate(self.local) if m in self.local[:i]]
        if twice:
            raise ValueError(f"--local lists M={twice[0]} more than once; give each M once, such as 4,16,all")
        low = [m for m in self.local if m is not None and m < 1]
        if low and set(self.methods) - {"global"}:
            raise ValueError(f"--local {low[0]}: the local and global+local methods need local proxies; pass "
                             "--local 1 or more (or all), or --methods global")


def local_label(m: int | None) -> int | str:
    """How reports name a requested M: the count, or ``"all"`` for every support token (``None``)."""
    return "all" if m is None else m


def parse_list(spec: str, what: str) -> list[int]:
    """``"1,5"`` → ``[1, 5]``, or an error naming ``what``."""
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{what} takes comma-separated integers such as 1,5, got {spec!r}") from None


def parse_local(spec: str) -> tuple[int | None, ...]:
    """``--local``: comma-separated counts or ``all`` (every support token, ``None``): ``"4,16,all"`` →
    ``(4, 16, None)``."""
    try:
        return tuple(None if s.strip().lower() == "all" else int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--local takes local proxies per class, a count or 'all', or several comma-separated such "
                         f"as 4,16,all; got {spec!r}") from None


@dataclass(frozen=True)
class Episode:
    """Rows of the test split: ``support`` ``(ways, max shots)`` and ``query`` ``(ways, queries)``, row ``i``
    of both from class ``classes[i]`` (a label of the data)."""

    classes: tuple[int, ...]
    support: np.ndarray
    query: np.ndarray


def draw_episodes(labels: np.ndarray, *, ways: int, shots: int, queries: int, episodes: int, seed: int,
                  class_names: Sequence[str]) -> list[Episode]:
    """``episodes`` episodes of ``ways`` classes with ``shots`` support and ``queries`` query rows per class,
    all distinct; episode ``e`` depends only on ``(labels, seed, e)`` and the sizes."""
    if ways > len(class_names):
        raise ValueError(f"--ways {ways} is above the {len(class_names)} classes of the data; pass --ways "
                         f"{len(class_names)} or fewer, or more --classes")
    rows = {c: np.flatnonzero(labels == c) for c in range(len(class_names))}
    smallest = min(rows, key=lambda c: len(rows[c]))
    if shots + queries > len(rows[smallest]):
        raise ValueError(f"{shots} shots + {queries} queries need {shots + queries} images per class, but class "
                         f"{class_names[smallest]!r} has only {len(rows[smallest])} test images; lower --shots or "
                         "--queries, or leave that class out with --classes")
    drawn = []
    for e in range(episodes):
        rng = np.random.default_rng(mix(seed, e))
        classes = tuple(int(c) for c in rng.choice(len(class_names), ways, replace=False))
        picked = np.stack([rng.choice(rows[c], shots + queries, replace=False) for c in classes])  # (ways, S + Q)
        drawn.append(Episode(classes, picked[:, :shots], picked[:, shots:]))
    return drawn


def _method_scores(method: str, alpha: float, glob: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    return loc if method == "local" else alpha * glob + (1 - alpha) * loc


def score_episode(pooled: torch.Tensor, tokens: torch.Tensor, settings: FewShotSettings, *, seed: int,
                  ) -> dict[tuple[str, int, int | str | None], tuple[float, int | None]]:
    """Accuracy of each (method, shots, M) on one episode, and the local proxies per class it used; M is
    ``local_label`` of a requested count for ``local`` and ``global+local``, ``None`` for ``global`` (scored
    once: it does not depend on M). ``pooled`` ``(ways, S + Q, D)`` and ``tokens`` ``(ways, S + Q, N, D)``: the
    support (first ``S = max shots``) and query images of each class."""
    ways, n = pooled.shape[0], tokens.shape[2]
    top = max(settings.shots)
    q_pooled, q_tokens = pooled[:, top:].flatten(0, 1), tokens[:, top:].flatten(0, 1)  # (ways * Q, D), (ways * Q, N, D)
    q_labels = torch.arange(ways).repeat_interleave(settings.queries)
    local_methods = [m for m in settings.methods if m != "global"]
    out = {}
    for shots in settings.shots:
        support = [(pooled[:, :shots].flatten(0, 1), tokens[:, :shots].flatten(0, 1))]  # (W*s, D), (W*s, N, D)
        labels = torch.arange(ways).repeat_interleave(shots)
        glob = None
        for i, m in enumerate(settings.local if local_methods else (0,)):
            local = None if m is None else min(m, shots * n)
            # the seed does not depend on M: each M gets the proxies a run with that M alone gets
            g, l = support_proxies(support, labels, num_classes=ways, local=local, seed=mix(seed, shots))
            if glob is None:  # the global proxies (class means) do not depend on M
                glob = global_similarity(q_pooled, g)  # (ways * Q, ways)
            loc = torch.cat([local_similarity(c, l) for c in q_tokens.split(QUERY_CHUNK)]) if l is not None else None
            used = None if l is None else l.shape[1]
            if i == 0 and "global" in settings.methods:
                out[("global", shots, None)] = (_accuracy(glob, q_labels), 0)
            for method in local_methods:
                scores = _method_scores(method, settings.mix, glob, loc)
                out[(method, shots, local_label(m))] = (_accuracy(scores, q_labels), used)
    return out


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return scores.argmax(dim=1).eq(labels).float().mean().item()


def _summary(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, sample std and the half-width of the 95 % CI of the mean."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return float(arr.mean()), std, Z95 * std / math.sqrt(len(arr))


def run_fewshot(checkpoint: str | Path, *, data: str, settings: FewShotSettings, classes: Sequence[str] | None = None,
                patch_sizes: str | Sequence[int] | None = None, device: torch.device | None = None,
                progress: bool = True) -> dict[str, Any]:
    """The ``fewshot.json`` report of ``checkpoint``'s backbone on episodes from ``data``'s test split."""
    subject = load_subject(checkpoint)
    model = subject.model
    if not isinstance(model, FlexiViT):
        raise ValueError(f"{checkpoint} is a timm export at one patch size; fewshot needs a FlexiViT run directory or "
                         "model file")
    sizes = resolve_patch_sizes(patch_sizes, subject.valid_sizes, subject.default_sizes,
                                image_size=model.config.img_size)
    source, splits = load_eval_splits(data, subject.run_config)
    if splits.channels != model.config.in_chans:
        raise ValueError(f"{source} has {splits.channels}-channel images but the backbone takes {model.config.in_chans}"
                         f"-channel ones; pass data with {model.config.in_chans}-channel images")
    if classes:
        splits = select_classes(splits, list(classes))
    labels = np.asarray(splits.test.with_format("numpy", columns=["label"])[:]["label"])
    s = settings
    episodes = draw_episodes(labels, ways=s.ways, shots=max(s.shots), queries=s.queries, episodes=s.episodes,
                             seed=s.seed, class_names=splits.class_names)
    dataset = TransformedDataset(splits.test, eval_transform(subject.preprocess))
    device = device or default_device()
    model.to(device).eval()
    accuracy: dict[tuple[int, str, int, int | str | None], list[float]] = {}
    used: dict[tuple[int, str, int, int | str | None], int | None] = {}
    tokens_at: dict[int, int] = {}
    for e, episode in enumerate(tqdm(episodes, desc="fewshot", disable=not progress, leave=False)):
        rows = np.concatenate([episode.support, episode.query], axis=1)  # (ways, S + Q)
        images = collate(dataset.__getitems__(rows.flatten().tolist()))["image"]  # (ways * (S + Q), C, H, W)
        for p in sizes:
            pooled, tokens = pooled_and_tokens(model, images, p)  # (B, D), (B, N, D): once for every M
            tokens_at[p] = tokens.shape[1]
            pooled, tokens = pooled.unflatten(0, rows.shape), tokens.unflatten(0, rows.shape)
            for (method, shots, m), (acc, count) in score_episode(pooled, tokens, s, seed=mix(s.seed, e)).items():
                accuracy.setdefault((p, method, shots, m), []).append(acc)
                used[(p, method, shots, m)] = count
    labels = [local_label(m) for m in s.local]
    results, paired = [], []
    for p in sizes:
        for shots in s.shots:
            for method in s.methods:
                for m in [None] if method == "global" else labels:
                    key = (p, method, shots, m)
                    top1, std, ci95 = _summary(accuracy[key])
                    results.append({"patch_size": p, "tokens": tokens_at[p], "shots": shots, "method": method,
                                    **({} if m is None else {"local": m}), "local_proxies": used[key], "top1": top1,
                                    "std": std, "ci95": ci95, "episodes_top1": accuracy[key]})
            if {"global", "global+local"} <= set(s.methods):
                for m in labels:
                    both = accuracy[(p, "global+local", shots, m)], accuracy[(p, "global", shots, None)]
                    gain, _, ci95 = _summary(np.subtract(*both))
                    paired.append({"patch_size": p, "shots": shots, "local": m, "gain": gain, "ci95": ci95})
    trained_on = set(subject.meta.get("class_names") or [])
    return {
        "checkpoint": str(checkpoint), "data": source, "split": "test", "classes": list(splits.class_names),
        "backbone_classes_in_episodes": [c for c in splits.class_names if c in trained_on],
        "ways": s.ways, "shots": list(s.shots), "queries": s.queries, "episodes": s.episodes,
        "methods": list(s.methods), "local": labels[0] if len(labels) == 1 else labels, "mix": s.mix, "seed": s.seed,
        "temperature": LOCAL_TEMPERATURE, "patch_sizes": sizes, "device": str(device),
        "results": results, "paired_gain_over_global": paired,
    }


def _several(report: dict[str, Any]) -> bool:
    """Whether the report scores several M (its ``local`` is a list), so that rows must name their M."""
    return isinstance(report["local"], list)


def _name(row: dict[str, Any], several: bool) -> str:
    """A row's method, with its M (``local (M=16)``) when the report scores several."""
    return row["method"] + (f" (M={row['local']})" if several and "local" in row else "")


def markdown(report: dict[str, Any]) -> str:
    """``fewshot.md``: the settings, accuracy per patch size, shots, method and M, and the paired gains."""
    r = report
    several = _several(r)
    m = ", ".join(map(str, r["local"])) if several else r["local"]
    lines = [f"# Few-shot: {r['checkpoint']} on {r['data']} ({r['split']} split)", "",
             f"{r['episodes']} episodes of {r['ways']} ways from classes {', '.join(r['classes'])}, {r['queries']} "
             f"queries per class, seed {r['seed']}; local proxies per class: {m} (k-means of the support "
             f"tokens, capped at their count), global+local mix {r['mix']}, token temperature {r['temperature']}. "
             "Accuracy: mean over episodes ± 95 % CI (1.96 std / sqrt(episodes)).", ""]
    if r["backbone_classes_in_episodes"]:
        lines += [f"Note: the backbone was trained on {', '.join(r['backbone_classes_in_episodes'])} (not new "
                  "classes).", ""]
    lines += ["| patch | tokens | shots | method | top-1 (%) | ± 95 % CI | local proxies |",
              "|---:|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {x['patch_size']} | {x['tokens']} | {x['shots']} | {_name(x, several)} | {100 * x['top1']:.2f} | "
              f"{100 * x['ci95']:.2f} | {x['local_proxies']} |" for x in r["results"]]
    if r["paired_gain_over_global"]:
        lines += ["", "Paired gain of global+local over global (points, same episodes and queries):", "",
                  "| patch | shots | " + ("M | " if several else "") + "gain | ± 95 % CI |",
                  "|---:|---:|" + ("---:|" if several else "") + "---:|---:|"]
        lines += [f"| {x['patch_size']} | {x['shots']} | " + (f"{x['local']} | " if several else "")
                  + f"{100 * x['gain']:+.2f} | {100 * x['ci95']:.2f} |" for x in r["paired_gain_over_global"]]
    return "\n".join(lines) + "\n"


def save_plot(report: dict[str, Any], path: str | Path) -> None:
    """Accuracy vs patch size, one line (with its 95 % CI) per method (and M, when several) and shot count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    styles = ("-", "--", ":", "-.")
    several = _several(report)
    names = list(dict.fromkeys(_name(x, several) for x in report["results"]))  # methods (and M), in order
    for i, name in enumerate(names):
        for j, shots in enumerate(report["shots"]):
            rows = [x for x in report["results"] if _name(x, several) == name and x["shots"] == shots]
            ax.errorbar([x["patch_size"] for x in rows], [100 * x["top1"] for x in rows],
                        yerr=[100 * x["ci95"] for x in rows], color=f"C{i % 10}", linestyle=styles[j % len(styles)],
                        marker="o", capsize=3, label=f"{name}, {shots}-shot")
    ax.set_xscale("log")
    ax.set_xticks(report["patch_sizes"], [str(p) for p in report["patch_sizes"]])
    ax.minorticks_off()
    ax.set_xlabel("patch size")
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{report['ways']}-way few-shot, {report['episodes']} episodes ({report['data']})", fontsize=9)
    fig.savefig(str(path), dpi=110)


def write_fewshot(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``fewshot.json``, ``fewshot.md`` and ``fewshot.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "fewshot.json", "md": out / "fewshot.md", "png": out / "fewshot.png"}
    atomic_write_text(files["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(files["md"], markdown(report))
    save_plot(report, files["png"])
    return files


# ---- the `flexivit fewshot` command (flexivit.ext.COMMANDS) --------------------------------------------
def add_arguments(p: Any, cli: Any) -> None:
    """``flexivit fewshot CHECKPOINT --data SRC ...``."""
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
    p.add_argument("--local", default="16", help="local proxies per class M (k-means of the support tokens), or 'all' "
                   "(every support token); several comma-separated (4,16,all) score each M on the same episodes and "
                   "share one backbone pass per patch size; default 16")
    p.add_argument("--mix", type=float, default=0.5, help="weight of the global proxies in global+local (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="episodes and k-means derive from it (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", type=Path, help="where fewshot.json/.md/.png go (default: the checkpoint's folder)")


def run(args: Any, cli: Any) -> None:
    settings = FewShotSettings(ways=args.ways, shots=tuple(parse_list(args.shots, "--shots")), queries=args.queries,
                               episodes=args.episodes, methods=tuple(m.strip() for m in args.methods.split(",")),
                               local=parse_local(args.local), mix=args.mix, seed=args.seed)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    out = check_folder_target(args.out or run_dir(args.checkpoint))
    report = run_fewshot(args.checkpoint, data=args.data, settings=settings, classes=classes,
                         patch_sizes=args.patch_sizes, device=cli.device(args.device))
    files = write_fewshot(report, out)
    print(markdown(report), end="")
    print(f"wrote {', '.join(str(f) for f in files.values())}")
