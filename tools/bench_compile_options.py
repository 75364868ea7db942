"""How many graphs ``torch.compile`` builds for a model with each option, over the quickstart's sizes.

A plain FlexiViT builds one graph for training at every patch size and one more for evaluation
(``docs/benchmarks.md``). An option whose forward reads Python state per call (batch-statistics norms: the
call's grid; bridges: a map chosen by token count) breaks that. For each option this trains one step at
every quickstart size (patch 2/4/7/14 at the quickstart's token-budget batches, scaled down), evaluates
each size, and counts dynamo's graphs (``flexivit.model.compile.graph_count``), compiled with ``aot_eager``
(the graphs are dynamo's, whichever backend lowers them). Counts, not timings: the machine's load does not
change them.

    python tools/bench_compile_options.py [--out docs/results/compile_options]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.compile import compile_model, graph_count
from flexivit.provenance import write_result

SIZES = {2: 4, 4: 16, 7: 48, 14: 196}  # patch -> batch: the quickstart's token budget at a quarter
BASE = dict(img_size=28, patch_size=7, base_patch_size=14, base_grid=7, in_chans=1, num_classes=10, embed_dim=32,
            depth=2, num_heads=2)
OPTIONS = {  # the plain model, then each option as a recipe would switch it on
    "plain": {},
    "scale_invariant=all": {"scale_invariant": "all"},
    "lutq_k=4": {"lutq_k": 4},
    "graph (all edges)": {"graph": "0-1,0-2,1-2,0-h,1-h,2-h"},
    "bridges 0:1 per size": {"bridges": ("0:1",), "bridge_sizes": tuple(SIZES)},
    "norm=batchnorm": {"norm": "batchnorm", "norm_sizes": tuple(SIZES)},
    "norm=bgn": {"norm": "bgn", "norm_groups": 4, "norm_regions": 2, "norm_sizes": tuple(SIZES)},
    "head=proxies": {"head": "proxies", "proxy_local": 4},
}


def count(fields: dict) -> dict[str, int]:
    """Graphs after a training step at every size, then after evaluating every size."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = compile_model(FlexiViT(FlexiViTConfig(**BASE, **fields)), backend="aot_eager")
    start = graph_count()
    model.train()
    for patch, batch in SIZES.items():
        model.zero_grad()
        F.cross_entropy(model(torch.randn(batch, 1, 28, 28), patch), torch.randint(0, 10, (batch,))).backward()
    train = graph_count() - start
    model.eval()
    with torch.no_grad():
        for patch in SIZES:
            model(torch.randn(8, 1, 28, 28), patch)
    return {"train": train, "train_and_eval": graph_count() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/compile_options"))
    args = parser.parse_args()
    rows = {name: count(fields) for name, fields in OPTIONS.items()}
    lines = ["# Compiled graphs per option over the quickstart's sizes", "",
             f"Each model ({BASE['embed_dim']} wide, {BASE['depth']} blocks, 28 px) trains one step at patch "
             f"{', '.join(map(str, SIZES))} and then evaluates each; dynamo's graph count (`aot_eager`).", "",
             "| model | graphs after training | after training + eval |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['train']} | {r['train_and_eval']} |" for name, r in rows.items()]
    payload = {"seeds": [0], "split": "none (random inputs)", "sizes": SIZES, "model": BASE,
               "options": {name: fields for name, fields in OPTIONS.items()}, "graphs": rows}
    for path in write_result(args.out, payload, "\n".join(lines)):
        print(f"wrote {path}")
    print("\n".join(lines[4:]))


if __name__ == "__main__":
    main()
