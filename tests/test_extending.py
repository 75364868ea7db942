"""docs/extending.md's examples run as written, and compute what the page says they do."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from flexivit import FlexiViT, PatchScheme

PAGE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)

Run = Callable[[str], dict[str, Any]]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    """Execute the one block that contains ``marker``, once, as a module of its own (registered in
    ``sys.modules``, as a user's file would be: dataclasses look their module up); return its namespace."""
    done: dict[int, dict[str, Any]] = {}

    def execute(marker: str) -> dict[str, Any]:
        (index,) = [i for i, block in enumerate(BLOCKS) if marker in block]
        if index not in done:
            module = types.ModuleType(f"extending_block_{index + 1}")
            sys.modules[module.__name__] = module
            code = compile(BLOCKS[index], f"docs/extending.md, python block {index + 1}", "exec", dont_inherit=True)
            exec(code, module.__dict__)
            done[index] = module.__dict__
        return done[index]

    yield execute
    for index in done:
        sys.modules.pop(f"extending_block_{index + 1}", None)


def test_page_has_the_four_examples():
    assert len(BLOCKS) == 4


def test_loss_term_is_added_with_its_weight_and_logged(run: Run):
    ns = run("LossTerm(")
    model, batch, loss, metrics = ns["model"], ns["batch"], ns["loss"], ns["metrics"]
    kernel = model.patch_embed.weight
    energy = (kernel.detach().double() ** 2).sum()  # independent of the example's own function
    with torch.no_grad():
        ce = F.cross_entropy(model(batch["image"], 4), batch["label"])
    torch.testing.assert_close(metrics["kernel_energy"].double(), energy)
    torch.testing.assert_close(loss.detach().double(), ce.double() + 1e-3 * energy)
    # The term reaches the kernel's gradient: the difference from the bare loss is 2 * 1e-3 * W.
    grad_with = torch.autograd.grad(loss, kernel, retain_graph=True)[0]
    grad_without = torch.autograd.grad(F.cross_entropy(model(batch["image"], 4), batch["label"]), kernel)[0]
    torch.testing.assert_close(grad_with - grad_without, 2e-3 * kernel.detach(), rtol=1e-4, atol=1e-6)


def test_ramp_distribution_moves_from_start_to_end(run: Run):
    ns = run("class Ramp")
    sampler, first, halfway, late = ns["sampler"], ns["first"], ns["halfway"], ns["late"]
    end = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    torch.testing.assert_close(first, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(halfway, (first + end) / 2)
    torch.testing.assert_close(late, end)
    assert ns["scheme"] == sampler.at(1234) and ns["scheme"].patch in (2, 4, 7, 14)


def test_ramp_draws_follow_its_probabilities_and_the_seed(run: Run):
    ns = run("class Ramp")
    sampler = ns["sampler"]
    n = 8000
    draws = [sampler.at(step).patch for step in range(1000, 1000 + n)]  # past the ramp: the end weights
    for patch, p in zip((2, 4, 7, 14), (0.7, 0.1, 0.1, 0.1)):
        share = draws.count(patch) / n
        assert abs(share - p) < 5 * (p * (1 - p) / n) ** 0.5, (patch, share, p)
    again = ns["PatchSizeSampler"](schemes=[2, 4, 7, 14], distribution=ns["ramp"], seed=0, image_size=28)
    other = ns["PatchSizeSampler"](schemes=[2, 4, 7, 14], distribution=ns["ramp"], seed=1, image_size=28)
    assert [again.at(s) for s in range(300)] == [sampler.at(s) for s in range(300)]
    assert [other.at(s) for s in range(300)] != [sampler.at(s) for s in range(300)]


def test_ramp_refuses_weights_that_do_not_fit_the_schemes(run: Run):
    ns = run("class Ramp")
    bad = ns["Ramp"](start=ns["Uniform"](), end=ns["Weighted"]((0.5, 0.5)), steps=10)
    with pytest.raises(ValueError, match="weights"):
        ns["PatchSizeSampler"](schemes=[2, 4, 7, 14], distribution=bad)


def _reference_agreement(model, batches, scheme: PatchScheme, reference: PatchScheme) -> float:
    """Image by image, with no batching and no shared state with the example."""
    agree = count = 0
    with torch.no_grad():
        for batch in batches:
            for image in batch["image"]:
                x = image[None]
                agree += int(model(x, scheme.patch).argmax() == model(x, reference.patch).argmax())
                count += 1
    return agree / count


def test_evaluator_rows_match_an_independent_count(run: Run):
    ns = run("def agreement")
    model, batches, schemes, rows = ns["model"], ns["batches"], ns["schemes"], ns["rows"]
    assert [r["patch_size"] for r in rows] == [2, 4, 8]
    for row, scheme in zip(rows, schemes):
        assert {"top1", "loss", "tokens", "agreement"} <= row.keys()
        assert row["agreement"] == pytest.approx(_reference_agreement(model, batches, scheme, PatchScheme(8)))
    assert rows[-1]["agreement"] == 1.0  # the reference scheme agrees with itself


def test_evaluator_reduce_sums_shards_like_one_process(run: Run):
    """Two shards whose totals are summed through ``reduce`` give the unsharded result."""
    ns = run("def agreement")
    agreement, model, schemes = ns["agreement"], ns["model"], ns["schemes"]
    batches = list(ns["batches"])
    shards = [batches[:1], batches[1:]]
    reference = PatchScheme(8)
    # What rank 1 contributes, computed first; rank 0's reduce adds it, as a sum over processes would.
    counts = [agreement(model, shards[1], [s], reference=reference)[0]["agreement"] * 8 * len(shards[1])
              for s in schemes]
    calls = iter(counts)
    merged = agreement(model, shards[0], schemes, reference=reference,
                       reduce=lambda t: t + torch.tensor([next(calls), 8.0 * len(shards[1])], dtype=t.dtype))
    whole = agreement(model, batches, schemes, reference=reference)
    assert [r["agreement"] for r in merged] == pytest.approx([r["agreement"] for r in whole])


def test_model_option_is_on_at_every_size_and_survives_a_file(run: Run, tmp_path):
    from flexivit import FlexiViTConfig
    from flexivit.model.weights import load_model, save_model

    ns = run("class ZeroHeadOption")
    model, config = ns["model"], ns["config"]
    for p, logits in ns["logits"].items():
        assert torch.count_nonzero(logits) == 0, p
    assert ns["stored"]["zero_head"] is True and config.option("zero_head") == ns["ZeroHeadFields"](True)
    assert "zero_head" not in FlexiViTConfig(img_size=28, patch_size=7).to_dict()  # off: plain config
    assert FlexiViTConfig.from_dict(ns["stored"]) == config
    model.reset_classifier(3)  # the hook zeroes the new head too
    assert torch.count_nonzero(model.head.weight) == 0 and model.head.out_features == 3
    save_model(model, tmp_path, class_names=["a", "b", "c"], preprocess={})
    loaded, _ = load_model(tmp_path)
    assert loaded.config.zero_head is True
    plain = FlexiViT(FlexiViTConfig.from_dict({**ns["stored"], "zero_head": False}))
    assert torch.count_nonzero(plain.head.weight) > 0  # without the option the head is initialised as usual
