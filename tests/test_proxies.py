"""Class proxies (flexivit.ext.proxies) and `flexivit fewshot` (flexivit.ext.fewshot): the head's formulas, gradients at
every patch size, support initialisation, fine-tuning, episodes, the command, defaults and bad inputs."""

import copy
import json

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.train.builders import build_model
from flexivit.model.weights import load_model, save_model
from flexivit.cli.main import main
from flexivit.train.config import load_recipe
from flexivit.data.sources import from_arrays
from flexivit.eval.export import ExportError, export_model
from flexivit.ext.fewshot import FewShotSettings, draw_episodes, run_fewshot, score_episode
from flexivit.train.builders import task_support
from flexivit.train.finetune import from_pretrained
from flexivit.ext.proxies import ProxyHead, init_from_support, pooled_and_tokens, soft_max_over_tokens, spherical_kmeans
from tiny_run import CLASSES, PREPROCESS, make_run, synthetic

TINY = dict(img_size=28, patch_size=7, base_patch_size=14, base_grid=4, in_chans=1, num_classes=3, embed_dim=16,
            depth=1, num_heads=2)
SIZES = (2, 4, 7, 14)
PROXY_KEYS = {"head", "proxy_local", "proxy_mix", "proxy_scale"}


def _model(**kw) -> FlexiViT:
    return FlexiViT(FlexiViTConfig(**{**TINY, "head": "proxies", "proxy_local": 2, **kw}))


def _support(classes: int = 3, per_class: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable images: one random template per class plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 1, 1, 28, 28, generator=gen)
    images = (templates + 0.05 * torch.randn(classes, per_class, 1, 28, 28, generator=gen)).flatten(0, 1)
    return images, torch.arange(classes).repeat_interleave(per_class)


def test_no_local_proxies_and_mix_one_is_a_cosine_classifier():
    head = ProxyHead(dim=8, num_classes=5, local=0, mix=1.0, scale=7.0)
    pooled, tokens = torch.randn(4, 8), torch.randn(4, 9, 8)
    expected = 7.0 * F.normalize(pooled, dim=1) @ F.normalize(head.global_proxies, dim=1).T
    torch.testing.assert_close(head(pooled, tokens), expected)
    assert head.local_proxies is None and [n for n, _ in head.named_parameters()] == ["global_proxies"]
    model = _model(proxy_local=0, proxy_mix=1.0, proxy_scale=3.0).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x, 4), pre_logits=True)
        cosine = F.normalize(feats, dim=1) @ F.normalize(model.head.global_proxies, dim=1).T
        torch.testing.assert_close(model(x, 4), 3.0 * cosine)


def test_logits_are_invariant_to_permuting_patch_tokens():
    head = ProxyHead(dim=8, num_classes=4, local=3, mix=0.3, scale=16.0)
    pooled, tokens = torch.randn(2, 8), torch.randn(2, 25, 8)
    permuted = tokens[:, torch.randperm(25)]
    torch.testing.assert_close(head(pooled, permuted), head(pooled, tokens))
    assert not torch.allclose(head(pooled, tokens[:, :5]), head(pooled, tokens))  # the tokens do count


def test_soft_maximum_over_tokens_lies_between_mean_and_max_whatever_the_count():
    sim = torch.rand(3, 50) * 2 - 1
    soft = soft_max_over_tokens(sim)
    assert (soft >= sim.mean(-1) - 1e-6).all() and (soft <= sim.amax(-1) + 1e-6).all()
    for n in (4, 196):  # equal similarities give that similarity at every token count (patch size)
        torch.testing.assert_close(soft_max_over_tokens(torch.full((2, n), 0.3)), torch.full((2,), 0.3))


@pytest.mark.parametrize("local, mix", [(0, 1.0), (3, 0.5), (3, 0.0)])
@pytest.mark.parametrize("patch", SIZES)
def test_support_initialised_proxies_classify_their_own_separable_support(local, mix, patch):
    model = _model(proxy_local=local, proxy_mix=mix)
    images, labels = _support()
    init_from_support(model, images, labels, patch, seed=0)
    with torch.no_grad():
        assert torch.equal(model.eval()(images, patch).argmax(1), labels)
        pooled, _ = pooled_and_tokens(model, images, patch)
    if mix > 0:
        means = F.normalize(torch.stack([pooled[labels == k].mean(0) for k in range(3)]), dim=1)
        torch.testing.assert_close(model.head.global_proxies.detach(), means)
    again = copy.deepcopy(model)
    with torch.no_grad():
        for param in again.head.parameters():
            param.normal_()
    init_from_support(again, images, labels, patch, seed=0)  # deterministic: the same proxies again
    assert all(torch.equal(a, b) for a, b in zip(model.head.parameters(), again.head.parameters()))


def test_spherical_kmeans_finds_separated_directions_deterministically():
    directions = F.normalize(torch.randn(3, 8), dim=1)
    points = (directions.repeat_interleave(20, 0) + 0.02 * torch.randn(60, 8)) * torch.rand(60, 1).add(0.5)
    centres = spherical_kmeans(points, 3, seed=5)
    assert torch.equal(centres, spherical_kmeans(points, 3, seed=5))
    assert (centres @ directions.T).amax(0).min() > 0.99  # every direction has its centre
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(3))
    as_many = spherical_kmeans(points[:4], 4, seed=0)  # as many centres as points: the points themselves
    assert torch.cdist(F.normalize(points[:4]), as_many).amin(dim=1).max() < 1e-6


@pytest.mark.parametrize("pool", [dict(), dict(class_token=False, global_pool="avg")])
@pytest.mark.parametrize("local, mix", [(2, 0.5), (0, 1.0), (2, 0.0)])
def test_every_parameter_gets_a_gradient_at_every_patch_size(pool, local, mix):
    no_fc_norm = dict(fc_norm=False) if mix == 0 and pool else {}  # the pooled feature is unused at mix 0
    model = _model(proxy_local=local, proxy_mix=mix, **pool, **no_fc_norm).train()
    for p in SIZES:
        model.zero_grad()
        F.cross_entropy(model(torch.randn(4, 1, 28, 28), p), torch.tensor([0, 1, 2, 0])).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name} at patch {p}"
            assert param.grad.abs().sum() > 0, f"{name} got a zero gradient at patch {p}"


def test_save_and_load_keep_logits(tmp_path):
    model = _model(proxy_local=3, proxy_mix=0.25, proxy_scale=10.0)
    init_from_support(model, *_support(), 7)
    file = save_model(model.eval(), tmp_path, class_names=CLASSES[:3], preprocess={**PREPROCESS, "image_size": 28})
    loaded, meta = load_model(file)
    assert meta["config"]["head"] == "proxies" and loaded.config == model.config
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for p in SIZES:
            assert torch.equal(loaded(x, p), model(x, p))


def test_defaults_are_unchanged_and_the_recipe_switch_builds_proxies():
    assert not PROXY_KEYS & set(FlexiViTConfig().to_dict())
    plain = FlexiViT(FlexiViTConfig(**TINY))
    assert isinstance(plain.head, torch.nn.Linear) and plain.is_plain_vit()
    assert {k for k in plain.state_dict() if k.startswith("head.")} == {"head.weight", "head.bias"}
    built = build_model(load_recipe("fashion_mnist:smoke"), channels=1, num_classes=10)
    assert not PROXY_KEYS & set(built.config.to_dict()) and isinstance(built.head, torch.nn.Linear)
    cfg = load_recipe("fashion_mnist:smoke", ["model.head=proxies", "model.proxy_local=4", "model.proxy_mix=0.25"])
    model = build_model(cfg, channels=1, num_classes=10)
    assert isinstance(model.head, ProxyHead) and model.head.local_proxies.shape == (10, 4, model.embed_dim)
    assert "a class-proxy head (4 local proxies per class)" in model.non_plain_parts()
    assert PROXY_KEYS <= set(model.config.to_dict())
    assert FlexiViTConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))) == model.config


@pytest.mark.parametrize("fields, match", [
    (dict(head="mlp"), "unknown head 'mlp'; choose one of linear, proxies"),
    (dict(head="proxies", proxy_mix=1.5), r"proxy_mix .* must be in \[0, 1\], got 1.5"),
    (dict(head="proxies", proxy_mix=-0.1), r"must be in \[0, 1\]"),
    (dict(head="proxies", proxy_local=0), "gives local proxies a weight but proxy_local=0"),
    (dict(head="proxies", proxy_mix=1.0), "gives the 16 local proxies per class no weight"),
    (dict(head="proxies", proxy_scale=0.0), "proxy_scale .* must be positive"),
    (dict(proxy_local=4), "apply to head='proxies' only"),
    (dict(head="proxies", scale_invariant="head"), "scale-invariant already"),
    (dict(head="proxies", lutq_k=4, lutq_scope="blocks+head"), "lutq_scope='blocks'"),
    (dict(head="proxies", proxy_mix=0.0, class_token=False, global_pool="avg"), "fc_norm .* would get no gradient"),
])
def test_bad_configs_are_clear_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        FlexiViTConfig(**{**TINY, **fields})


def test_init_from_support_errors():
    images, labels = _support()
    with pytest.raises(ValueError, match="needs a model with head='proxies'"):
        init_from_support(FlexiViT(FlexiViTConfig(**TINY)), images, labels, 7)
    with pytest.raises(ValueError, match="missing 2"):
        init_from_support(_model(), images[:8], labels[:8], 7)
    with pytest.raises(ValueError, match=r"class 0 has 16 support tokens \(4 images x 4 tokens\), fewer than the 17"):
        init_from_support(_model(proxy_local=17), images, labels, 14)
    with pytest.raises(ValueError, match="holds 2 local proxies per class, not 5"):
        init_from_support(_model(), images, labels, 7, local=5)


def test_finetuning_reinitialises_the_proxies_for_the_new_task():
    pretrained = FlexiViT(FlexiViTConfig(**{**TINY, "num_classes": 6}))
    fresh = _model(proxy_local=3)
    images, labels = _support()
    model = from_pretrained(pretrained, fresh, support=(images, labels, [4, 7]), seed=3)
    assert isinstance(model.head, ProxyHead) and model.head.num_classes == 3
    body = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    reference = _model(proxy_local=3)
    reference.load_state_dict({**model.state_dict()})
    init_from_support(reference, images, labels, [4, 7], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.head.parameters(), reference.head.parameters()))
    linear = from_pretrained(model, FlexiViT(FlexiViTConfig(**TINY)))  # a linear recipe gets a linear head back
    assert isinstance(linear.head, torch.nn.Linear) and linear.is_plain_vit()


def test_episodes_are_deterministic_by_seed_and_never_reuse_a_support_image_as_a_query():
    labels = np.random.default_rng(0).integers(0, 6, size=300)
    kw = dict(ways=4, shots=5, queries=7, episodes=20, class_names=CLASSES)
    episodes = draw_episodes(labels, seed=1, **kw)
    again, other = draw_episodes(labels, seed=1, **kw), draw_episodes(labels, seed=2, **kw)
    assert all(a.classes == b.classes and np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query)
               for a, b in zip(episodes, again))
    assert any(not np.array_equal(a.support, b.support) for a, b in zip(episodes, other))
    for e in episodes:
        assert len(set(e.classes)) == 4 and e.support.shape == (4, 5) and e.query.shape == (4, 7)
        assert not set(e.support.flat) & set(e.query.flat)
        assert len(set(e.support.flat) | set(e.query.flat)) == 4 * 12
        for i, c in enumerate(e.classes):
            assert (labels[e.support[i]] == c).all() and (labels[e.query[i]] == c).all()


def test_score_episode_prefers_the_matching_class():
    pooled = torch.eye(3)[:, None, :].repeat(1, 4, 1) + 0.01 * torch.randn(3, 4, 3)  # (ways, S + Q, D)
    tokens = pooled[:, :, None, :].repeat(1, 1, 5, 1)  # (ways, S + Q, N, D)
    settings = FewShotSettings(ways=3, shots=(1, 2), queries=2, local=8)
    scores = score_episode(pooled, tokens, settings, seed=0)
    assert set(scores) == {("global", s, None) for s in (1, 2)} | {(m, s, 8) for m in ("local", "global+local")
                                                                  for s in (1, 2)}
    assert all(acc == 1.0 for acc, _ in scores.values())
    assert scores[("local", 1, 8)][1] == 5 and scores[("local", 2, 8)][1] == 8  # capped at 1 shot x 5 tokens
    every_token = score_episode(pooled, tokens, FewShotSettings(ways=3, shots=(1, 2), queries=2, local=None), seed=0)
    assert every_token[("local", 2, "all")] == (1.0, 10)  # --local all: 2 shots x 5 tokens per class


def test_fewshot_errors_are_clear(tmp_path_factory, tmp_path):
    labels = np.repeat(np.arange(6), [30, 30, 30, 30, 30, 9])
    with pytest.raises(ValueError, match="--ways 7 is above the 6 classes"):
        draw_episodes(labels, ways=7, shots=1, queries=1, episodes=1, seed=0, class_names=CLASSES)
    too_few = r"5 shots \+ 5 queries need 10 images per class, but class 'cell-5' has only 9 test images"
    with pytest.raises(ValueError, match=too_few):
        draw_episodes(labels, ways=2, shots=5, queries=5, episodes=1, seed=0, class_names=CLASSES)
    with pytest.raises(ValueError, match=r"--mix .* must be in \[0, 1\], got 1.5"):
        FewShotSettings(mix=1.5)
    with pytest.raises(ValueError, match="unknown --methods"):
        FewShotSettings(methods=("cosine",))
    with pytest.raises(ValueError, match="need local proxies"):
        FewShotSettings(local=0)
    run = make_run(tmp_path_factory.getbasetemp())
    gray, classes = synthetic(40, seed=5)
    rgb = from_arrays(np.repeat(gray[..., None], 3, axis=-1), classes, CLASSES)  # (N, H, W, 3) images
    datasets.DatasetDict({"train": rgb, "test": rgb}).save_to_disk(str(tmp_path / "rgb"))
    with pytest.raises(ValueError, match="has 3-channel images but the backbone takes 1-channel ones"):
        run_fewshot(run, data=f"hf:{tmp_path / 'rgb'}", settings=FewShotSettings(ways=2, episodes=1, queries=1))


def test_fewshot_command(tmp_path_factory, tmp_path, capsys):
    run = make_run(tmp_path_factory.getbasetemp())
    data = f"hf:{tmp_path_factory.getbasetemp() / 'synthetic'}"
    args = ["fewshot", str(run), "--data", data, "--classes", "cell-0,cell-2,cell-3,cell-5", "--ways", "3",
            "--shots", "1,2", "--queries", "3", "--episodes", "3", "--patch-sizes", "4,8", "--local", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "| 4 | 16 | 1 | global |" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "fewshot.json").read_text())
    assert report["classes"] == ["cell-0", "cell-2", "cell-3", "cell-5"] and report["patch_sizes"] == [4, 8]
    assert len(report["results"]) == 2 * 2 * 3 and len(report["paired_gain_over_global"]) == 2 * 2
    assert report["local"] == 2  # one M: a single value, as before --local took a list
    assert [(r["patch_size"], r["shots"], r["method"]) for r in report["results"]] == [
        (p, s, m) for p in (4, 8) for s in (1, 2) for m in ("global", "local", "global+local")]
    keys = {"patch_size", "tokens", "shots", "method", "local_proxies", "top1", "std", "ci95", "episodes_top1"}
    for row in report["results"]:
        assert len(row["episodes_top1"]) == 3 and 0 <= row["top1"] <= 1 and row["ci95"] >= 0
        assert row["local_proxies"] == (0 if row["method"] == "global" else 2)
        assert set(row) == (keys if row["method"] == "global" else keys | {"local"}) and row.get("local", 2) == 2
    assert all(set(g) == {"patch_size", "shots", "local", "gain", "ci95"} and g["local"] == 2
               for g in report["paired_gain_over_global"])
    assert "(M=" not in (tmp_path / "a" / "fewshot.md").read_text()  # one M: methods named as before
    assert (tmp_path / "a" / "fewshot.png").stat().st_size > 0 and (tmp_path / "a" / "fewshot.md").exists()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # deterministic by seed
    assert json.loads((tmp_path / "b" / "fewshot.json").read_text())["results"] == report["results"]
    assert main([*args[:-2], "--local", "x"]) == 2
    assert main(["fewshot", str(run), "--data", data, "--ways", "9"]) == 2
    assert "--ways 9 is above the 6 classes" in capsys.readouterr().err


def test_task_support_draws_each_class_of_the_task(tmp_path):
    datasets.DatasetDict({"train": from_arrays(*synthetic(90, seed=3), CLASSES),
                          "test": from_arrays(*synthetic(30, seed=4), CLASSES)}).save_to_disk(str(tmp_path / "d"))
    cfg = load_recipe("fashion_mnist:smoke", [f"data.source=hf:{tmp_path / 'd'}", "data.image_size=16",
                                              "data.classes=cell-1,cell-4", "model.head=proxies"])
    images, labels = task_support(cfg, per_class=3)
    assert images.shape == (6, 1, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    again, _ = task_support(cfg, per_class=3)
    assert torch.equal(images, again)


def test_export_goes_through_torch_export(tmp_path):
    model = _model()
    meta = {"class_names": CLASSES[:3], "preprocess": {**PREPROCESS, "image_size": 28}}
    with pytest.raises(ExportError, match="class-proxy head"):
        export_model(model, meta, 7, tmp_path / "timm")
    export_model(model, meta, 7, tmp_path / "pt2", torch_export=True)
    program = torch.export.load(str(tmp_path / "pt2" / "model.pt2")).module()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model.eval()(x, 7))


def test_local_similarity_in_class_blocks_equals_all_at_once_and_bounds_its_largest_tensor():
    from torch.utils._python_dispatch import TorchDispatchMode

    from flexivit.ext.proxies import local_similarity

    torch.manual_seed(0)
    tokens = torch.randn(3, 10, 8, requires_grad=True)  # (B, N, D)
    proxies = torch.randn(7, 4, 8, requires_grad=True)  # (K, M, D)
    whole = local_similarity(tokens, proxies)
    g_whole = torch.autograd.grad(whole.square().sum(), (tokens, proxies))

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor):
                    self.most = max(self.most, o.numel())
            return out

    budget = 3 * 4 * 10 * 2  # two classes' (B, M, N) similarities per block
    with Largest() as mode:
        blocks = local_similarity(tokens, proxies, max_elements=budget)
        g_blocks = torch.autograd.grad(blocks.square().sum(), (tokens, proxies))
    torch.testing.assert_close(blocks, whole)
    for a, b in zip(g_blocks, g_whole):
        torch.testing.assert_close(a, b)
    assert mode.most <= budget  # no tensor held all (B, K, M, N) = 840 similarities, backward included
    with Largest() as mode:
        local_similarity(tokens, proxies)
    assert mode.most == 3 * 7 * 4 * 10  # the default budget makes small heads all at once
