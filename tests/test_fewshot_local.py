"""`flexivit fewshot --local 4,16,all`: several local-proxy counts M scored in one run, on one backbone pass per
patch size, each M exactly as a run with that M alone scores it."""

import json

import pytest
import torch

from flexivit import FlexiViT
from flexivit.ext import fewshot
from flexivit.model.weights import load_model, save_model
from flexivit.cli.main import main
from flexivit.ext.fewshot import FewShotSettings, parse_local, run_fewshot, score_episode, write_fewshot
from tiny_run import CLASSES, PREPROCESS, make_run

LOCALS = (2, 3, None)  # 2 and 3: k-means centres; None: every support token
EPISODE = dict(ways=3, shots=(1, 2), queries=3, episodes=3)


def test_score_episode_gives_each_m_of_a_list_its_single_m_scores():
    gen = torch.Generator().manual_seed(3)
    pooled = torch.randn(4, 2 + 40, 8, generator=gen)  # (ways, S + Q, D): noise, so proxies decide every query
    tokens = torch.randn(4, 2 + 40, 6, 8, generator=gen)  # (ways, S + Q, N, D)
    settings = dict(ways=4, shots=(1, 2), queries=40)
    together = score_episode(pooled, tokens, FewShotSettings(**settings, local=LOCALS), seed=11)
    label = {2: 2, 3: 3, None: "all"}
    for m in LOCALS:
        alone = score_episode(pooled, tokens, FewShotSettings(**settings, local=m), seed=11)
        assert alone == {k: v for k, v in together.items() if k[2] in (None, label[m])}
    assert len(together) == 2 * (1 + 2 * len(LOCALS))  # per shot count: global once, local and global+local per M
    assert len({together[("local", 2, m)] for m in label.values()}) > 1  # the M's give different scores here


def test_a_list_run_shares_the_backbone_pass_and_matches_single_m_runs(tmp_path_factory, tmp_path, monkeypatch):
    trained, _ = load_model(make_run(tmp_path_factory.getbasetemp()))
    torch.manual_seed(4)
    run = save_model(FlexiViT(trained.config), tmp_path / "untrained", class_names=CLASSES, preprocess=PREPROCESS)
    data = f"hf:{tmp_path_factory.getbasetemp() / 'synthetic'}"  # an untrained backbone: the proxies decide
    calls = []
    backbone = fewshot.pooled_and_tokens
    monkeypatch.setattr(fewshot, "pooled_and_tokens", lambda model, images, p: calls.append(p) or backbone(
        model, images, p))
    kw = dict(data=data, patch_sizes="4,8", device=torch.device("cpu"), progress=False)
    report = run_fewshot(run, settings=FewShotSettings(**EPISODE, local=LOCALS), **kw)
    assert sorted(calls) == [4] * 3 + [8] * 3  # one pass per episode and patch size, whatever the number of M
    assert report["local"] == [2, 3, "all"]
    rows = {(r["patch_size"], r["shots"], r["method"], r.get("local")): r for r in report["results"]}
    assert len(rows) == len(report["results"]) == 2 * 2 * (1 + 2 * 3)  # global once per (patch, shots)
    gains = {(g["patch_size"], g["shots"], g["local"]): g for g in report["paired_gain_over_global"]}
    assert len(gains) == len(report["paired_gain_over_global"]) == 2 * 2 * 3
    for m in LOCALS:
        single = run_fewshot(run, settings=FewShotSettings(**EPISODE, local=m), **kw)
        for r in single["results"]:
            assert rows[(r["patch_size"], r["shots"], r["method"], r.get("local"))] == r  # every episode equal
        for g in single["paired_gain_over_global"]:
            assert gains[(g["patch_size"], g["shots"], g["local"])] == g
    assert len(calls) == 4 * 3 * 2
    assert len({rows[(4, 2, "local", m)]["top1"] for m in (2, 3, "all")}) > 1  # the M's differ here
    files = write_fewshot(report, tmp_path)
    text = files["md"].read_text()
    assert "| 4 | 16 | 2 | local (M=3) |" in text and "| 4 | 2 | all |" in text and files["png"].stat().st_size > 0
    assert json.loads(files["json"].read_text())["results"] == report["results"]


@pytest.mark.parametrize("spec, message", [
    ("4,4", "lists M=4 more than once"), ("all,16,ALL", "lists M=all more than once"),
    ("0", "need local proxies"), ("4,-1", "need local proxies"), ("x", "--local takes local proxies per class"),
    ("4,sixteen", "such as 4,16,all"), (",", "such as 16 or 4,16,all; got \\[\\]")])
def test_bad_local_lists_are_refused_clearly(spec, message):
    with pytest.raises(ValueError, match=message):
        FewShotSettings(local=parse_local(spec))


def test_the_command_refuses_a_bad_local_list(tmp_path_factory, capsys):
    run = make_run(tmp_path_factory.getbasetemp())
    data = f"hf:{tmp_path_factory.getbasetemp() / 'synthetic'}"
    assert main(["fewshot", str(run), "--data", data, "--local", "16,4,16"]) == 2
    assert "--local lists M=16 more than once" in capsys.readouterr().err
    assert parse_local(" 4, 16 ,all ") == (4, 16, None) and FewShotSettings(local=16).local == (16,)
