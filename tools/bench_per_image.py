"""Training speed with a patch size per image (``patch.per_image``) against one per step, side by side.

The quickstart's run (``recipes/fashion_mnist.py``: ``flexi_vit_micro``, 28 px, p = 2 / 4 / 7 / 14 drawn
0.4 / 0.25 / 0.25 / 0.1 per step, 16 x 196 tokens a step) is stepped both ways in one process on random
pixels (forward, backward, AdamW step): per step, each step's images at the step's size as the token budget
joins them; per image, each step one ``PackStream`` plan of the same run's builder (``build_step_batches``).
Timed in rounds of the same ``--steps`` steps of each (steps 0 .. steps-1, the run's first), in alternating order, so drift from other processes on the
shared cores hits both; the ratio is the median over rounds of the same round's images/s ratio, by wall
time and by this process's CPU time.

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
from flexivit.train.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def _steppers(recipe_sets: list[str]) -> dict[str, Callable[[int], int]]:
    """``arm -> step(i)``: one training step of the arm at index ``i``; returns its image count."""
    per_step_cfg = load_recipe("fashion_mnist", recipe_sets)
    per_image_cfg = load_recipe("fashion_mnist", [*recipe_sets, "patch.per_image=true"])
    torch.manual_seed(0)
    model = build_model(per_step_cfg, channels=1, num_classes=10).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = build_sampler(per_step_cfg)
    per_step = build_step_batches(per_step_cfg, sampler, model, rank=0, ranks=1)
    per_image = build_step_batches(per_image_cfg, build_sampler(per_image_cfg), model, rank=0, ranks=1)
    batch = per_step_cfg.data.batch_size

    def train(images: torch.Tensor, call: Callable[[torch.Tensor], torch.Tensor]) -> int:
        loss = F.cross_entropy(call(images), torch.randint(0, 10, (images.shape[0],)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return images.shape[0]

    def step_one_size(i: int) -> int:
        scheme = sampler.at(i)
        n = batch * per_step.joined(i)
        return train(torch.randn(n, 1, 28, 28), lambda x: model(x, scheme.patch))

    def step_per_image(i: int) -> int:
        plan = per_image.plan(i, 0)
        return train(torch.randn(plan.num_images, 1, 28, 28), lambda x: model(x, plan))

    return {"per step": step_one_size, "per image": step_per_image}


def measure(*, rounds: int, steps: int, recipe_sets: list[str]) -> dict[str, Any]:
    arms = _steppers(recipe_sets)
    for step in arms.values():  # warm up: allocator, first-call costs
        step(0)
    per_round: list[dict[str, dict[str, float]]] = []
    for r in range(rounds):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        measured = {}
        for arm in order:
            wall, cpu = time.perf_counter(), time.process_time()
            images = sum(arms[arm](i) for i in range(steps))  # the same steps every round: only the timing varies
            measured[arm] = {"images": images, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        per_round.append(measured)
    ratio = {clock: statistics.median((m["per image"]["images"] / m["per image"][clock])
                                      / (m["per step"]["images"] / m["per step"][clock]) for m in per_round)
             for clock in ("wall_s", "cpu_s")}
    return {"rounds": per_round, "ratio_per_image_over_per_step": ratio, "steps_per_round": steps,
            "threads": torch.get_num_threads()}


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for r, m in enumerate(result["rounds"]):
        cells = [f"{m[a]['images'] / m[a]['wall_s']:.0f}" for a in ("per step", "per image")]
        rows.append(f"| {r} | {cells[0]} | {cells[1]} | {m['per image']['images'] / m['per image']['wall_s'] / (m['per step']['images'] / m['per step']['wall_s']):.2f} |")
    ratio = result["ratio_per_image_over_per_step"]
    return "\n".join([
        "# Training speed: a patch size per image vs one per step (quickstart run)", "",
        f"`python tools/bench_per_image.py`: {result['steps_per_round']} training steps of each arm per round on "
        f"random pixels, {result['threads']} torch thread(s). Per image / per step, images per second, median over "
        f"rounds: **{ratio['wall_s']:.2f}x** by wall time, **{ratio['cpu_s']:.2f}x** by CPU time.", "",
        "| round | per step, img/s | per image, img/s | ratio |", "|---:|---:|---:|---:|", *rows, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
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
