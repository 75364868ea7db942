"""flexivit.train.finetune_modes: the settings of `flexivit finetune --patch-size P` that keep the other sizes
(mostly-P sampling, the consistency term, the probe-fitted head), each against an independent reference, and
one fine-tune with all three that resumes bit-identically."""

import copy
import functools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.eval.probe import fit_probe
from flexivit.model.patch_embed import PatchScheme
from flexivit.model.weights import load_model, save_model
from flexivit.train.builders import build_sampler
from flexivit.train.config import ConfigError, check_config, load_recipe
from flexivit.train import finetune as finetune_module
from flexivit.train.finetune import finetune, fixed_size
from flexivit.train.finetune_modes import (ConsistencyTerm, consistency_images_by_patch, consistency_term,
                                           head_features, keep_other_sizes, probe_head)
from flexivit.train.loop import train
from flexivit.train.objective import Objective

RECIPE = "fashion_mnist_finetune"


def tiny(num_classes: int = 4, seed: int = 0) -> FlexiViT:
    torch.manual_seed(seed)
    return FlexiViT(FlexiViTConfig(img_size=28, patch_size=14, base_patch_size=14, base_grid=2, in_chans=1,
                                   num_classes=num_classes, embed_dim=16, depth=1, num_heads=2, class_token=False,
                                   global_pool="avg"))


# ---- mostly-P sampling ------------------------------------------------------------------------------
def test_mostly_p_keeps_the_recipes_sizes_at_the_share_and_the_sampler_draws_them():
    cfg = fixed_size(load_recipe(RECIPE, ["finetune.fixed_others=0.3"]), 14)
    assert cfg.patch.sizes == [2, 4, 7, 14] and cfg.patch.default == 14
    assert cfg.patch.weights == pytest.approx([0.1, 0.1, 0.1, 0.7])
    drawn = Counter(build_sampler(cfg).at(step).patch for step in range(4000))
    assert drawn[14] / 4000 == pytest.approx(0.7, abs=0.03)
    assert all(drawn[p] / 4000 == pytest.approx(0.1, abs=0.02) for p in (2, 4, 7))
    plain = fixed_size(load_recipe(RECIPE), 14)  # off by default: one size, as before
    assert plain.patch.sizes == [14] and plain.patch.weights is None


def test_mostly_p_needs_other_sizes_and_a_share_below_one():
    cfg = load_recipe(RECIPE, ["patch.sizes=[14]", "patch.weights=null", "patch.distribution=uniform",
                               "finetune.fixed_others=0.2"])
    with pytest.raises(ValueError, match="trains only patch 14; set finetune.fixed_others=0"):
        keep_other_sizes(cfg, 14, [])
    for bad in ("finetune.fixed_others=1", "finetune.consistency=-1", "finetune.consistency_share=0",
                "finetune.head_init=linear"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            check_config(load_recipe(RECIPE, [bad]))


# ---- consistency term -------------------------------------------------------------------------------
def term(**kw) -> ConsistencyTerm:
    args = dict(weight=0.5, share=0.4, anchor=14, others=[7, 2, 4], seed=3, image_size=28, token_budget=16 * 196)
    return ConsistencyTerm(**{**args, **kw})


def test_consistency_steps_and_sizes_are_a_share_of_the_steps_drawn_from_seed_and_step():
    t = term()
    drawn = [t.size_at(step) for step in range(3000)]
    assert drawn == [term().size_at(step) for step in range(3000)]  # a function of (seed, step): resumable
    assert drawn != [term(seed=4).size_at(step) for step in range(3000)]
    used = [s for s in drawn if s is not None]
    assert len(used) / 3000 == pytest.approx(0.4, abs=0.03)
    assert set(used) == {2, 4, 7} and all(n / len(used) == pytest.approx(1 / 3, abs=0.05) for n in Counter(used).values())


def test_the_second_forward_takes_as_many_images_as_the_step_has_tokens():
    t = term()  # token budget 3136 tokens at 28 px: 196 tokens at 2, 49 at 4, 16 at 7
    assert (t.images(784, 2), t.images(784, 4), t.images(784, 7)) == (16, 64, 196)
    assert t.images(10, 7) == 10  # never more than the batch
    no_budget = term(token_budget=0)  # the batch's own tokens: 32 images x 4 tokens at 14
    assert (no_budget.images(32, 7), no_budget.images(32, 2)) == (8, 1)


def test_the_term_is_kl_toward_the_stopped_anchor_logits_on_the_first_images():
    model = tiny()
    images = torch.randn(20, 1, 28, 28)
    t = term(token_budget=0)  # 20 images x 4 tokens = 80 tokens: 5 images at 7
    step = next(s for s in range(100) if t.size_at(s) == 7)
    logits = model(images, 14)
    value = t(model, images, logits, PatchScheme(14), step)
    other = model(images[:5], 7)
    reference = 0.5 * F.kl_div(F.log_softmax(other, 1), F.log_softmax(logits[:5], 1), log_target=True,
                               reduction="batchmean")
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    value.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    # Stop-gradient: the same gradient as the KL toward constant targets taken from the anchor logits.
    model.zero_grad()
    targets = F.softmax(logits.detach()[:5], 1)
    (0.5 * -(targets * F.log_softmax(model(images[:5], 7), 1)).sum(1).mean()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    skipped = next(s for s in range(100) if t.size_at(s) is None)
    assert t(model, images, logits, PatchScheme(14), skipped) is None
    assert t(model, images, model(images, 7), PatchScheme(7), step) is None  # only steps at the anchor size


def test_the_objective_adds_the_term_and_logs_it():
    model, t = tiny(), term(token_budget=0)
    objective = Objective(criterion=nn.CrossEntropyLoss(), consistency=t)
    batch = {"image": torch.randn(12, 1, 28, 28), "label": torch.randint(0, 4, (12,))}
    on = next(s for s in range(100) if t.size_at(s) is not None)
    off = next(s for s in range(100) if t.size_at(s) is None)
    ce = F.cross_entropy(model(batch["image"], 14), batch["label"])
    loss, metrics = objective(model, batch, PatchScheme(14), on)
    assert loss.item() == pytest.approx(ce.item() + metrics["consistency"].item(), rel=1e-5)
    assert metrics["consistency"].item() > 0
    loss, metrics = objective(model, batch, PatchScheme(14), off)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6) and metrics["consistency"].item() == 0


def test_the_run_builds_the_term_from_its_settings_and_counts_its_images():
    default = consistency_term(fixed_size(load_recipe(RECIPE), 14))  # --patch-size's default: every step, weight 1
    assert (default.weight, default.share, default.anchor, default.others) == (1, 1, 14, [2, 4, 7])
    assert consistency_term(fixed_size(load_recipe(RECIPE, ["finetune.consistency=0"]), 14)) is None  # plain
    cfg = fixed_size(load_recipe(RECIPE, ["finetune.consistency=2", "finetune.consistency_share=0.25",
                                          "train.steps=200"]), 14)
    t = consistency_term(cfg)
    assert (t.weight, t.share, t.anchor, t.others) == (2, 0.25, 14, [2, 4, 7])
    # Brute force: every step is at 14 (784 images under the token budget), the term's draw picks the size.
    expected = Counter()
    for step in range(200):
        if (size := t.size_at(step)) is not None:
            expected[size] += {2: 16, 4: 64, 7: 196}[size]
    assert consistency_images_by_patch(cfg) == dict(sorted(expected.items()))
    # Only a fine-tune fixed at one size (--patch-size) anchors the term: not pretraining nor the sampled fine-tune,
    assert consistency_term(load_recipe(RECIPE, ["finetune.consistency=1"])) is None
    assert consistency_term(load_recipe("fashion_mnist", ["finetune.consistency=1"])) is None
    # and a fixed fine-tune of a recipe that evaluates no other size has nothing to keep.
    one = ["patch.sizes=[14]", "patch.weights=null", "patch.default=14", "patch.eval_sizes=null", "finetune.consistency=1"]
    assert consistency_term(fixed_size(load_recipe(RECIPE, one), 14)) is None


# ---- probe head -------------------------------------------------------------------------------------
def test_probe_head_is_the_probe_fitted_on_every_size_folded_into_the_head():
    model = tiny(num_classes=3)
    images, labels = torch.randn(60, 1, 28, 28), torch.arange(60) % 3
    images[labels == 1, :, :14] += 2.0  # something to fit
    sizes = [14, 7]
    features = torch.cat([model.forward_head(model.forward_features(images, s), pre_logits=True) for s in sizes])
    torch.testing.assert_close(head_features(model, images, sizes, batch_size=7), features.detach())
    probe = fit_probe(features.detach(), labels.repeat(2), num_classes=3)
    probe_head(model, images, labels, sizes)
    with torch.no_grad():
        for i, s in enumerate(sizes):
            torch.testing.assert_close(model(images, s), probe(features[60 * i: 60 * (i + 1)].double()).float(),
                                       atol=1e-4, rtol=1e-4)
    model.head = nn.Sequential(nn.Linear(16, 3))
    with pytest.raises(ValueError, match="set finetune.head_init=fresh"):
        probe_head(model, images, labels, sizes)


# ---- end to end ---------------------------------------------------------------------------------------
TINY = ["train.log_every=2", "optim.warmup_steps=1", "data.batch_size=4", "data.eval_limit=40",
        "data.num_workers=0", "train.test_eval=false", "finetune.fixed_others=0.5", "finetune.consistency=1",
        "finetune.consistency_share=1", "finetune.head_init=probe"]


@pytest.mark.slow
def test_a_fine_tune_with_every_setting_resumes_bit_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    save_model(tiny(num_classes=10), tmp_path / "pre", class_names=[str(i) for i in range(10)],
               preprocess={"image_size": 28, "channels": 1, "crop_pct": 1.0, "mean": [0.5], "std": [0.5],
                           "interpolation": "bilinear"})

    cfg = fixed_size(load_recipe(RECIPE, [*TINY, "train.steps=6", "train.checkpoint_every=3"]), 14)

    class Killed(Exception):
        pass

    def kill(info) -> None:
        if info.step == 4:
            raise Killed

    finetune(tmp_path / "pre", copy.deepcopy(cfg), out_dir=tmp_path / "whole")
    monkeypatch.setattr(finetune_module, "train", functools.partial(train, on_step=kill))
    with pytest.raises(Killed):
        finetune(tmp_path / "pre", copy.deepcopy(cfg), out_dir=tmp_path / "parts")
    monkeypatch.setattr(finetune_module, "train", train)
    finetune(tmp_path / "pre", copy.deepcopy(cfg), out_dir=tmp_path / "parts", resume=True)
    whole, _ = load_model(tmp_path / "whole")
    parts, _ = load_model(tmp_path / "parts")
    for (name, a), b in zip(whole.state_dict().items(), parts.state_dict().values()):
        assert torch.equal(a, b), name
    logged = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    at14 = [r["per_patch"]["14"]["consistency"] for r in logged if "per_patch" in r and "14" in r["per_patch"]]
    assert at14 and all(v > 0 for v in at14)  # share 1: every step at 14 adds the term
    assert {p for r in logged if "per_patch" in r for p in r["per_patch"]} - {"14"}  # other sizes drawn too


@pytest.mark.slow
def test_the_default_fixed_fine_tune_trains_on_two_ranks(tmp_path):
    """--patch-size's default (the consistency term: a second forward before the backward) under DDP on two CPU
    ranks, through `flexivit launch`."""
    root = Path(__file__).resolve().parent.parent
    save_model(tiny(num_classes=10), tmp_path / "pre", class_names=[str(i) for i in range(10)],
               preprocess={"image_size": 28, "channels": 1, "crop_pct": 1.0, "mean": [0.5], "std": [0.5],
                           "interpolation": "bilinear"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(root), "ACCELERATE_USE_CPU": "1"}
    sets = [a for s in ["train.steps=4", "train.checkpoint_every=2", "train.log_every=1", "data.eval_limit=32",
                        "data.num_workers=0", "data.batch_size=4", "train.test_eval=false"] for a in ("--set", s)]
    result = subprocess.run([sys.executable, "-m", "flexivit", "launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "finetune",
                             str(tmp_path / "pre"), RECIPE, "--patch-size", "14", "--out", str(tmp_path / "ft"), *sets],
                            capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    terms = [r["per_patch"]["14"]["consistency"] for r in logged if "per_patch" in r]
    assert len(terms) == 4 and all(v > 0 for v in terms)


def test_a_fine_tune_saved_before_the_term_existed_reads_and_resumes_as_it_ran():
    from flexivit.train.assemble import config_changes
    from flexivit.train.config import Config, config_from_dict

    plain_now = fixed_size(load_recipe(RECIPE, ["finetune.consistency=0"]), 7).to_dict()
    old = json.loads(json.dumps(plain_now))
    del old["finetune"]["consistency"], old["finetune"]["consistency_share"], old["finetune"]["fixed_at"]
    read = config_from_dict(Config, old)
    assert read.finetune.consistency == 0 and read.finetune.fixed_at is None  # no term then, none now
    assert consistency_term(read) is None
    assert config_changes(read.to_dict(), plain_now) == {}  # resumes with --set finetune.consistency=0
    # Today's default (the term on) is a change a resume refuses, naming the setting.
    default_now = fixed_size(load_recipe(RECIPE), 7).to_dict()
    assert "finetune.consistency" in config_changes(read.to_dict(), default_now)
    # A run of this week with the term on, saved before fixed_at: the term anchored at the default patch.
    week = json.loads(json.dumps(fixed_size(load_recipe(RECIPE, ["finetune.consistency=1"]), 14).to_dict()))
    del week["finetune"]["fixed_at"]
    assert config_from_dict(Config, week).finetune.fixed_at == 14
