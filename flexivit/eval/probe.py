"""Do a FlexiViT's features agree across patch sizes? A linear probe fitted at one size and scored at the
others, the linear CKA between sizes per layer, and how far fine-tuning moved each part of the network.

``probe_transfer`` extracts frozen pooled features (the head's input, and each block's output averaged
over its patch tokens) at every size on the train and validation splits of a dataset source, fits a
multinomial logistic-regression probe on the train split at one size (or on all sizes at once), scores it
on the validation split at every size, and computes the linear CKA (Kornblith et al. 2019) between the
sizes' features of the same validation images, per layer. A probe that transfers, and a CKA near 1, mean a
new head trained at one size reads directions the other sizes share: what a fixed-size fine-tune needs to
stay flexible. ``parameter_drift`` compares two checkpoints (a pretrained run and a fine-tune of it) part
by part: ``||w - w0|| / ||w0||`` for the patch kernel, the position grid, each block, the norms and the head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flexivit.data.sources import TransformedDataset, load_source, make_loader, select_classes
from flexivit.data.transforms import eval_transform
from flexivit.eval.subjects import run_config_of
from flexivit.model.patch_embed import check_patch_sizes
from flexivit.model.vit import FlexiViT
from flexivit.model.weights import load_model

__all__ = ["HEAD_INPUT", "Probe", "block_name", "pooled_features", "linear_cka", "head_space_cka", "fit_probe",
           "probe_accuracy",
           "probe_transfer", "parameter_drift", "probe_markdown"]

HEAD_INPUT = "head_input"  # the pooled, normed features the classifier reads
L2 = 1e-3  # probe weight decay on standardised features: mild, the features have ~64-768 dimensions


def block_name(index: int) -> str:
    return f"block{index}"


@torch.no_grad()
def pooled_features(model: FlexiViT, data: torch.utils.data.Dataset, patch_sizes: Sequence[int], *,
                    layers: Sequence[int] | None = None, batch_size: int = 256
                    ) -> tuple[dict[int, dict[str, torch.Tensor]], torch.Tensor]:
    """``{size: {layer name: (n, D)}}`` and the ``(n,)`` labels of ``data``, in its order.

    Per block in ``layers`` (default every block): its output averaged over the patch tokens (the class
    token when the model pools it); ``HEAD_INPUT``: what the head reads (``forward_head(pre_logits=True)``).
    """
    model.eval()
    take = list(range(len(model.blocks))) if layers is None else [int(i) % len(model.blocks) for i in layers]
    loader = make_loader(data, batch_size=batch_size, shuffle=False, seed=0, drop_last=False)
    batches = list(loader)  # decoded once, run at every size
    labels = torch.cat([b["label"] for b in batches])
    out: dict[int, dict[str, torch.Tensor]] = {}
    for patch in patch_sizes:
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in batches:
            final, inter = model.forward_intermediates(batch["image"], take, return_prefix_tokens=True,
                                                       output_fmt="NLC", patch_size=int(patch))
            for i, item in zip(take, inter):
                spatial, prefix = item if isinstance(item, tuple) else (item, None)  # (B, N, D), (B, 1, D)
                pooled = prefix[:, 0] if model.global_pool == "token" and prefix is not None else spatial.mean(1)
                parts.setdefault(block_name(i), []).append(pooled.float())  # (B, D)
            parts.setdefault(HEAD_INPUT, []).append(model.forward_head(final, pre_logits=True).float())
        out[int(patch)] = {name: torch.cat(chunks) for name, chunks in parts.items()}
    return out, labels


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two ``(n, d)`` / ``(n, e)`` feature matrices of the same ``n`` examples: 1 when one is an
    orthogonal transform plus isotropic scaling of the other, near 0 for independent features."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same examples: got {x.shape[0]} and {y.shape[0]} rows")
    x, y = x.double(), y.double()
    x = x - x.mean(0)  # (n, d), centred
    y = y - y.mean(0)  # (n, e), centred
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2  # HSIC(XX^T, YY^T) up to a shared factor
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def head_space_cka(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> dict[str, float]:
    """Linear CKA of ``(n, D)`` features inside the row space of a linear head's ``(C, D)`` ``weight`` (the
    directions its logits read) and inside the rest of the feature space, the two parts of ``x`` and ``y``
    split by the same orthogonal projection."""
    basis, _ = torch.linalg.qr(weight.double().T)  # (D, C), orthonormal columns spanning the head's rows
    inside = lambda f: f.double() @ basis  # (n, C)
    rest = lambda f: f.double() - (f.double() @ basis) @ basis.T  # (n, D)
    return {"head": linear_cka(inside(x), inside(y)), "rest": linear_cka(rest(x), rest(y))}


class Probe(nn.Module):
    """A linear classifier on features standardised with the fit set's mean and std (an affine map folded
    into the linear one: the same probe on raw features)."""

    def __init__(self, *, mean: torch.Tensor, std: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, l2: float = L2,
              max_iter: int = 500) -> Probe:
    """Multinomial logistic regression on ``(n, D)`` features, full batch, L-BFGS.

    Written with torch rather than scikit-learn: sklearn is not a dependency of the package, and the
    full-batch problem (a few thousand rows, D <= 1024) converges in a few hundred L-BFGS iterations."""
    x = features.double()
    std = x.std(0).clamp_min(1e-6)
    probe = Probe(mean=x.mean(0), std=std, num_classes=num_classes).double()
    nn.init.zeros_(probe.linear.weight)
    nn.init.zeros_(probe.linear.bias)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), labels) + 0.5 * l2 * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: Probe, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probe(features.double()).argmax(1) == labels).double().mean())


def _parse_fits(fits: Sequence[str | int], sizes: Sequence[int]) -> list[str]:
    out = []
    for f in fits:
        f = str(f).strip()
        if f != "all" and (not f.isdigit() or int(f) not in sizes):
            raise ValueError(f"a probe is fitted at one of the probed sizes {list(sizes)} or at 'all', not {f!r}")
        out.append(f)
    return out


def probe_transfer(checkpoint: str | Path, *, data: str, sizes: Sequence[int] | None = None,
                   fits: Sequence[str | int] | None = None, classes: Sequence[str] | None = None,
                   layers: Sequence[int] | None = None, train_limit: int | None = None,
                   val_limit: int | None = None, seed: int = 0, val_fraction: float = 0.1,
                   l2: float = L2, batch_size: int = 256) -> dict[str, Any]:
    """The probe-transfer and CKA payload of ``checkpoint`` on ``data``'s train and validation splits.

    ``sizes``: patch sizes (default: those the run trained, else the model's own); ``fits``: sizes to fit
    a probe at, and/or ``"all"`` (one probe on every size's features at once), default each size and
    ``"all"``; ``classes``: a subset of the source's classes; ``seed``/``val_fraction``: the split, as a
    ``flexivit finetune`` with ``train.seed=seed`` draws it; ``train_limit``/``val_limit``: first N images.
    """
    if any(n is not None and n < 1 for n in (train_limit, val_limit)):
        raise ValueError(f"image limits must be positive, got {train_limit} (train) and {val_limit} (validation)")
    model, meta = load_model(checkpoint)
    sizes = [int(s) for s in (sizes or _trained_sizes(checkpoint, model))]
    check_patch_sizes(sizes, model.config.img_size)
    fit_specs = _parse_fits(fits if fits is not None else [*map(str, sizes), "all"], sizes)
    splits = load_source(data, seed=seed, val_fraction=val_fraction)
    if classes:
        splits = select_classes(splits, list(classes))
    transform = eval_transform(meta["preprocess"])
    feats: dict[str, tuple[dict[int, dict[str, torch.Tensor]], torch.Tensor]] = {}
    for split, ds, limit in (("train", splits.train, train_limit), ("val", splits.val, val_limit)):
        ds = ds if limit is None else ds.select(range(min(limit, len(ds))))
        feats[split] = pooled_features(model, TransformedDataset(ds, transform), sizes, layers=layers,
                                       batch_size=batch_size)
    (train, y_train), (val, y_val) = feats["train"], feats["val"]
    num_classes = len(splits.class_names)
    probes = []
    for spec in fit_specs:
        fit_at = sizes if spec == "all" else [int(spec)]
        x = torch.cat([train[p][HEAD_INPUT] for p in fit_at])  # (len(fit_at) * n, D)
        probe = fit_probe(x, y_train.repeat(len(fit_at)), num_classes=num_classes, l2=l2)
        probes.append({"fit": spec, "train_top1": probe_accuracy(probe, x, y_train.repeat(len(fit_at))),
                       "val_top1": {str(p): probe_accuracy(probe, val[p][HEAD_INPUT], y_val) for p in sizes}})
    names = list(val[sizes[0]])
    cka = {name: {str(a): {str(b): linear_cka(val[a][name], val[b][name]) for b in sizes} for a in sizes}
           for name in names}
    head = getattr(model.head, "weight", None)  # a linear head reads its weight's row space of the features
    if isinstance(head, torch.Tensor) and head.ndim == 2 and head.shape[1] == val[sizes[0]][HEAD_INPUT].shape[1]:
        cka_head = {str(a): {str(b): head_space_cka(val[a][HEAD_INPUT], val[b][HEAD_INPUT], head.detach())
                             for b in sizes} for a in sizes}
    else:
        cka_head = None
    return {"checkpoint": str(checkpoint), "data": data, "classes": list(splits.class_names), "split": "val",
            "seeds": [seed], "sizes": sizes, "n_train": len(y_train), "n_val": len(y_val), "l2": l2,
            "probes": probes, "cka": cka, "cka_head_space": cka_head}


def _trained_sizes(checkpoint: str | Path, model: FlexiViT) -> list[int]:
    """The sizes the checkpoint's run evaluated (its recipe's ``patch.eval_sizes`` or ``patch.sizes``), else
    the model's own."""
    patch = (run_config_of(checkpoint) or {}).get("patch") or {}
    return list(patch.get("eval_sizes") or patch.get("sizes") or [model.config.patch_size])


def parameter_drift(start: str | Path, end: str | Path) -> list[dict[str, Any]]:
    """How far ``end`` moved from ``start``, per part: ``{"group", "params", "rel_change", "start_norm"}``
    with ``rel_change = ||w - w0|| / ||w0||`` over the group's tensors (blocks one group each, the rest by
    module: ``patch_embed``, ``pos_embed``, ``fc_norm``, ``head``...). A tensor whose shape changed (a head
    for other classes) counts as replaced: ``rel_change`` is None for its group."""
    w0 = load_model(start)[0].plain_state_dict()
    w1 = load_model(end)[0].plain_state_dict()
    if set(w0) != set(w1):
        raise ValueError(f"{start} and {end} have different parameters ({sorted(set(w0) ^ set(w1))[:4]}...): "
                         "compare a fine-tune with the checkpoint it started from")
    groups: dict[str, list[str]] = {}
    for key in w0:
        parts = key.split(".")
        groups.setdefault(".".join(parts[:2]) if parts[0] == "blocks" else parts[0], []).append(key)
    rows = []
    for group, keys in groups.items():
        replaced = any(w0[k].shape != w1[k].shape for k in keys)
        diff = sum(float((w1[k].double() - w0[k].double()).pow(2).sum()) for k in keys) if not replaced else 0.0
        norm0 = sum(float(w0[k].double().pow(2).sum()) for k in keys) ** 0.5
        rows.append({"group": group, "params": sum(w0[k].numel() for k in keys), "start_norm": norm0,
                     "rel_change": None if replaced else diff ** 0.5 / max(norm0, 1e-12)})
    return rows


def probe_markdown(payload: dict[str, Any], *, reference: int | None = None) -> str:
    """Tables: probe top-1 at every size per fit, CKA of ``reference`` (default the largest size) with each
    size per layer, and the parameter drift when the payload has one."""
    sizes = payload["sizes"]
    ref = reference if reference is not None else max(sizes)
    lines = [f"# Probe transfer: {payload['checkpoint']} on {payload['data']}", "",
             f"Validation split, {payload['n_val']} images ({payload['n_train']} train images for the probe); "
             f"{len(payload['classes'])} classes; logistic-regression probe, l2 {payload['l2']:g}.", "",
             "## Linear probe on the head's input: validation top-1 (%) at each size", "",
             "| fitted at | train top-1 | " + " | ".join(f"p={p}" for p in sizes) + " |",
             "|---|---:|" + "---:|" * len(sizes)]
    for r in payload["probes"]:
        cells = " | ".join(f"{100 * r['val_top1'][str(p)]:.1f}" for p in sizes)
        lines.append(f"| {r['fit']} | {100 * r['train_top1']:.1f} | {cells} |")
    others = [p for p in sizes if p != ref]
    lines += ["", f"## Linear CKA between patch {ref} and each size, same validation images", "",
              "| layer | " + " | ".join(f"{ref} vs {p}" for p in others) + " |", "|---|" + "---:|" * len(others)]
    for name, table in payload["cka"].items():
        lines.append(f"| {name} | " + " | ".join(f"{table[str(ref)][str(p)]:.3f}" for p in others) + " |")
    if payload.get("cka_head_space"):
        table = payload["cka_head_space"][str(ref)]
        lines += ["", f"## The head's input split by the checkpoint's own head: CKA between patch {ref} and each size",
                  "", "inside: the row space of the head's weight (the directions its logits read); rest: the "
                  "orthogonal complement, where a new task's head may read.", "",
                  "| part | " + " | ".join(f"{ref} vs {p}" for p in others) + " |", "|---|" + "---:|" * len(others),
                  "| inside the head's rows | " + " | ".join(f"{table[str(p)]['head']:.3f}" for p in others) + " |",
                  "| rest | " + " | ".join(f"{table[str(p)]['rest']:.3f}" for p in others) + " |"]
    if payload.get("drift"):
        lines += ["", f"## Parameter drift from {payload['drift_from']}: ||w - w0|| / ||w0||", "",
                  "| part | params | rel. change |", "|---|---:|---:|"]
        for r in payload["drift"]:
            change = "replaced" if r["rel_change"] is None else f"{r['rel_change']:.4f}"
            lines.append(f"| {r['group']} | {r['params']:,} | {change} |")
    return "\n".join(lines) + "\n"
