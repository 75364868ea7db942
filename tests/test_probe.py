"""flexivit.eval.probe and ``flexivit probe``: linear CKA against its kernel definition, the logistic probe on
separable features, the pooled features against the model's own logits, the parameter drift against known
edits, and the command end to end on real Fashion-MNIST images."""

import json

import numpy as np
import pytest
import torch

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.cli.main import main
from flexivit.data.sources import TransformedDataset, from_arrays
from flexivit.data.transforms import eval_transform
from flexivit.eval.probe import (
    HEAD_INPUT, block_name, fit_probe, head_space_cka, linear_cka, parameter_drift, pooled_features, probe_accuracy,
)
from flexivit.model.weights import save_model

PREPROCESS = {"image_size": 28, "channels": 1, "crop_pct": 1.0, "mean": [0.5], "std": [0.5],
              "interpolation": "bilinear"}


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from its definition on n x n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), with the
    centring matrix H = I - 11^T / n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def test_cka_matches_the_gram_matrix_definition_on_correlated_features():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 12, generator=g)
    y = x @ torch.randn(12, 7, generator=g) + 0.8 * torch.randn(60, 7, generator=g) + 3.0
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-10)
    assert 0.05 < linear_cka(x, y) < 0.99  # a value between the extremes, so the comparison means something


def test_cka_is_one_under_rotation_scaling_and_shift_and_near_zero_for_independent_features():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated columns
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.7 * (x.double() @ q) - 5.0) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, x * torch.linspace(0.1, 3.0, 16)) < 0.999  # an anisotropic scaling is not invariant
    noise = torch.randn(4000, 4, generator=g)
    assert linear_cka(torch.randn(4000, 4, generator=g), noise) < 0.01
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, x[:10])


def test_head_space_cka_splits_what_the_head_reads_from_the_rest():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 10, generator=g)  # a head reading a 3-dim subspace of 10
    x = torch.randn(800, 10, generator=g)
    basis, _ = torch.linalg.qr(weight.T)  # (10, 3)
    inside = x @ basis @ basis.T
    y = inside + (torch.randn(800, 10, generator=g) @ (torch.eye(10) - basis @ basis.T))  # same head part only
    parts = head_space_cka(x, y, weight)
    assert parts["head"] == pytest.approx(1.0, abs=1e-10)
    assert parts["rest"] < 0.05
    assert head_space_cka(x, x, weight) == pytest.approx({"head": 1.0, "rest": 1.0}, abs=1e-10)


def test_probe_separates_separable_features_and_scores_held_out_ones():
    g = torch.Generator().manual_seed(4)
    centres = 6.0 * torch.randn(5, 32, generator=g)
    labels = torch.randint(0, 5, (600,), generator=g)
    feats = centres[labels] + torch.randn(600, 32, generator=g)
    probe = fit_probe(feats[:300], labels[:300], num_classes=5)
    assert probe_accuracy(probe, feats[300:], labels[300:]) >= 0.99
    shuffled = labels[300:][torch.randperm(300, generator=g)]  # the same features, labels unrelated to them
    assert probe_accuracy(probe, feats[300:], shuffled) < 0.4


def tiny_model(num_classes: int = 3) -> FlexiViT:
    return FlexiViT(FlexiViTConfig(img_size=28, patch_size=14, base_patch_size=14, base_grid=2, in_chans=1,
                                   num_classes=num_classes, embed_dim=24, depth=2, num_heads=2, class_token=False,
                                   global_pool="avg"))


def test_pooled_features_are_what_the_head_reads_at_every_size():
    model = tiny_model().eval()
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (20, 28, 28), dtype=np.uint8), rng.integers(0, 3, 20)
    data = TransformedDataset(from_arrays(images, labels, ["a", "b", "c"]), eval_transform(PREPROCESS))
    feats, got_labels = pooled_features(model, data, [7, 14], batch_size=8)
    assert got_labels.tolist() == labels.tolist()
    x = torch.stack([data[i]["image"] for i in range(20)])  # (20, 1, 28, 28)
    for p in (7, 14):
        assert set(feats[p]) == {block_name(0), block_name(1), HEAD_INPUT}
        torch.testing.assert_close(model.head(feats[p][HEAD_INPUT]), model(x, p), atol=1e-5, rtol=1e-5)
        # with average pooling the final norm is fc_norm, after the pool: the last block's pooled output is its input
        assert isinstance(model.norm, torch.nn.Identity)
        torch.testing.assert_close(model.fc_norm(feats[p][block_name(1)]), feats[p][HEAD_INPUT])


def test_parameter_drift_measures_known_edits(tmp_path):
    start = tiny_model()
    save_model(start, tmp_path / "start", class_names=["a", "b", "c"], preprocess=PREPROCESS)
    end = tiny_model()
    end.load_state_dict(start.state_dict())
    with torch.no_grad():
        for name, p in end.named_parameters():
            if name.startswith("blocks.1."):
                p.mul_(1.25)  # every tensor of block 1 moves by a quarter of itself
        end.patch_embed.weight.add_(0.01)
    save_model(end, tmp_path / "end", class_names=["a", "b", "c"], preprocess=PREPROCESS)
    rows = {r["group"]: r for r in parameter_drift(tmp_path / "start", tmp_path / "end")}
    assert rows["blocks.1"]["rel_change"] == pytest.approx(0.25, rel=1e-6)
    kernel = start.patch_embed.weight.detach().double()
    bias = start.patch_embed.bias.detach().double()
    expected = (0.01 * kernel.numel() ** 0.5) / float(torch.cat([kernel.flatten(), bias]).norm())
    assert rows["patch_embed"]["rel_change"] == pytest.approx(expected, rel=1e-5)
    assert rows["blocks.0"]["rel_change"] == 0 and rows["head"]["rel_change"] == 0
    assert rows["blocks.1"]["params"] == sum(p.numel() for p in start.blocks[1].parameters())
    other = tiny_model(num_classes=5)
    other.load_state_dict({k: v for k, v in start.state_dict().items() if not k.startswith("head.")}, strict=False)
    save_model(other, tmp_path / "other", class_names=list("abcde"), preprocess=PREPROCESS)
    rows = {r["group"]: r for r in parameter_drift(tmp_path / "start", tmp_path / "other")}
    assert rows["head"]["rel_change"] is None and rows["blocks.1"]["rel_change"] == 0


@pytest.mark.slow
def test_probe_command_end_to_end_on_fashion_mnist(tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_model(num_classes=10)
    save_model(model, tmp_path / "start", class_names=[str(i) for i in range(10)], preprocess=PREPROCESS)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(1.1)
    save_model(model, tmp_path / "ft", class_names=[str(i) for i in range(10)], preprocess=PREPROCESS)
    out = tmp_path / "res" / "probe"
    assert main(["probe", str(tmp_path / "ft"), "--data", "fashion-mnist", "--classes", "Trouser,Bag,Sneaker",
                 "--sizes", "7,14", "--fit", "14,all", "--limit", "300", "--val-limit", "150",
                 "--moved-from", str(tmp_path / "start"), "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["split"] == "val" and payload["seeds"] == [0] and payload["n_train"] == 300
    assert payload["n_val"] == 150 and payload["classes"] == ["Trouser", "Bag", "Sneaker"]
    assert [p["fit"] for p in payload["probes"]] == ["14", "all"]
    assert payload["probes"][0]["val_top1"]["14"] > 0.7  # three easy classes, even on random features
    for layer, table in payload["cka"].items():
        assert table["7"]["7"] == pytest.approx(1.0) and table["7"]["14"] == pytest.approx(table["14"]["7"])
    drift = {r["group"]: r["rel_change"] for r in payload["drift"]}
    assert drift["blocks.1"] == 0 and drift["blocks.0"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| 14 |" in md and "How this file was made" in md and "blocks.0" in md
    assert main(["probe", str(tmp_path / "ft"), "--data", "fashion-mnist", "--sizes", "5"]) == 2
    assert "tile" in capsys.readouterr().err
    assert main(["probe", str(tmp_path / "ft"), "--data", "fashion-mnist", "--out", str(tmp_path / "lr0.075")]) == 2
    assert "drop the dot" in capsys.readouterr().err
