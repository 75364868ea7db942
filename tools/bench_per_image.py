"""Training speed with a patch size per image (``patch.per_image``) against one per step, side by side.

The quickstart's run (``recipes/fashion_mnist.py``: ``flexi_vit_micro``, 28 px, p = 2 / 4 / 7 / 14 drawn
0.4 / 0.25 / 0.25 / 0.1 per step, 16 x 196 tokens a step) is stepped both ways in one process on random
pixels (forward, backward, AdamW step): per step, a step at each size with the images the token budget
joins; per image, ``PackStream`` plans of the same run's builder (``build_step_batches``). Timed in rounds
(see ``measure``), in alternating order, so drift from other processes on the shared cores hits both; the
ratio is the median over rounds of the same round's images/s ratio, by wall time and by this process's CPU
time.

    OMP_NUM_THREADS=1 python tools/bench_per_image.py                 # a few minutes
    python tools/bench_per_image.py --smoke --out /tmp/bpi             # seconds (tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from flexivit.provenance import write_result
from flexivit.train.builders import build_model, build_sampler, build_step_batches
from flexivit.train.step_batches import loader_batches
from flexivit.train.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def _arms(recipe_sets: list[str]) -> tuple[dict[int, Callable[[], float]], list[float], Callable[[int], int]]:
    """``(one-size steps by patch, their step probabilities, per-image step(i))``: each one-size step returns
    its image count, as does the per-image step of plan ``i``."""
    per_step_cfg = load_recipe("fashion_mnist", recipe_sets)
    per_image_cfg = load_recipe("fashion_mnist", [*recipe_sets, "patch.per_image=true"])
    torch.manual_seed(0)
    model = build_model(per_step_cfg, channels=1, num_classes=10).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = build_sampler(per_step_cfg)
    per_image = build_step_batches(per_image_cfg, build_sampler(per_image_cfg), model, rank=0, ranks=1)
    hw, batch, budget = (28, 28), per_step_cfg.data.batch_size, per_step_cfg.train.token_budget

    def train(images: torch.Tensor, call: Callable[[torch.Tensor], torch.Tensor]) -> int:
        loss = F.cross_entropy(call(images), torch.randint(0, 10, (images.shape[0],)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return images.shape[0]

    def one_size(scheme) -> Callable[[], int]:
        n = batch * loader_batches(scheme, hw, batch, budget)
        return lambda: train(torch.randn(n, 1, 28, 28), lambda x: model(x, scheme.patch))

    def step_per_image(i: int) -> int:
        plan = per_image.plan(i, 0)
        return train(torch.randn(plan.num_images, 1, 28, 28), lambda x: model(x, plan))

    sizes = {s.patch: one_size(s) for s in sampler.schemes}
    return sizes, sampler.probs(0).tolist(), step_per_image


def _timed(fn: Callable[[], int]) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    images = fn()
    return {"images": images, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def measure(*, rounds: int, steps: int, recipe_sets: list[str]) -> dict[str, Any]:
    """Per round: one step at each size (the per-step run's rate is its mix of those, weighted by how often
    each size is drawn: images and seconds per step in expectation), and the per-image run's first
    ``steps`` plans. A short window of per-step draws would be dominated by whichever sizes it drew (a
    patch-14 step takes 784 images, a patch-2 one 16), which the expectation removes."""
    sizes, probs, per_image = _arms(recipe_sets)
    for fn in (*sizes.values(), lambda: per_image(0)):  # warm up: allocator, first-call costs
        fn()
    per_round = []
    for r in range(rounds):
        measured: dict[str, Any] = {}
        order = ["sizes", "per image"] if r % 2 == 0 else ["per image", "sizes"]
        for arm in order:
            if arm == "sizes":
                measured["sizes"] = {str(p): _timed(fn) for p, fn in sizes.items()}
            else:
                plans = [_timed(lambda i=i: per_image(i)) for i in range(steps)]
                measured["per image"] = {k: sum(p[k] for p in plans) for k in ("images", "wall_s", "cpu_s")}
        expected = {k: sum(q * measured["sizes"][str(p)][k] for q, p in zip(probs, sizes)) for k in ("images", "wall_s", "cpu_s")}
        measured["per step"] = expected  # one expected per-step step
        per_round.append(measured)
    ratio = {clock: statistics.median((m["per image"]["images"] / m["per image"][clock])
                                      / (m["per step"]["images"] / m["per step"][clock]) for m in per_round)
             for clock in ("wall_s", "cpu_s")}
    return {"rounds": per_round, "ratio_per_image_over_per_step": ratio, "steps_per_round": steps,
            "step_probs": dict(zip(map(str, sizes), probs)), "threads": torch.get_num_threads()}


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for r, m in enumerate(result["rounds"]):
        rate = {a: m[a]["images"] / m[a]["wall_s"] for a in ("per step", "per image")}
        sizes = " / ".join(f"{v['images'] / v['wall_s']:.0f}" for v in m["sizes"].values())
        rows.append(f"| {r} | {sizes} | {rate['per step']:.0f} | {rate['per image']:.0f} | {rate['per image'] / rate['per step']:.2f} |")
    ratio = result["ratio_per_image_over_per_step"]
    patches = " / ".join(result["step_probs"])
    return "\n".join([
        "# Training speed: a patch size per image vs one per step (quickstart run)", "",
        f"`python tools/bench_per_image.py`: per round, one training step at each patch size ({patches}) and "
        f"the per-image run's first {result['steps_per_round']} steps, on random pixels, {result['threads']} torch "
        "thread(s), in alternating order. The per-step rate is the expectation over the recipe's step "
        "probabilities (images and seconds per step), which a full run approaches. Per image / per step, "
        f"images per second, median over rounds: **{ratio['wall_s']:.2f}x** by wall time, **{ratio['cpu_s']:.2f}x** "
        "by CPU time.", "",
        f"| round | one size, img/s at p = {patches} | per step (expected), img/s | per image, img/s | ratio |",
        "|---:|---|---:|---:|---:|", *rows, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="2 rounds of 2 steps of a 1-block model (tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    rounds, steps, sets = args.rounds, args.steps, []
    if args.smoke:
        rounds, steps, sets = 2, 2, ["model.depth=1", "model.embed_dim=32"]
    result = measure(rounds=rounds, steps=steps, recipe_sets=sets)
    payload = {**result, "seeds": [], "split": "none (random pixels; a timing)", "smoke": args.smoke}
    json_path, md_path = write_result(args.out / "bench_per_image", payload, markdown(result), command=" ".join(sys.argv))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
