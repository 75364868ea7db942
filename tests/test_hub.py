"""The Hugging Face Hub: save_pretrained / from_pretrained / push_to_hub on local folders, offline (the upload
API is replaced by a local stand-in that records what would be uploaded)."""

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.weights import CheckpointError, load_model, read_model_meta
from flexivit.cli.main import main
from flexivit.eval.export import default_preprocess, export_checkpoint
from flexivit.model.hub import HUB_FORMAT
from tiny_run import CLASSES, PREPROCESS, make_run

CONFIG = FlexiViTConfig(img_size=16, patch_size=4, base_patch_size=8, base_grid=4, in_chans=1, num_classes=6,
                        embed_dim=16, depth=2, num_heads=2)
NAMES = [f"class-{i}" for i in range(6)]
PRE = {**PREPROCESS, "crop_pct": 0.875, "interpolation": "bicubic"}


def _model(**overrides) -> FlexiViT:
    return FlexiViT(FlexiViTConfig.from_dict({**CONFIG.to_dict(), **overrides})).eval()


def _logits(model: FlexiViT, patch: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), patch)


def _same_weights(a: FlexiViT, b: FlexiViT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_and_load_round_trip(tmp_path):
    model = _model(act_layer="gelu_tanh", posemb_antialias=True, drop_path_rate=0.1)
    model.save_pretrained(tmp_path / "hub", class_names=NAMES, preprocess=PRE)
    assert {p.name for p in (tmp_path / "hub").iterdir()} == {"model.safetensors", "model.json", "config.json",
                                                              "README.md"}
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["format"] == HUB_FORMAT and config["model_config"] == model.config.to_dict()
    assert config["label_names"] == NAMES and config["pretrained_cfg"]["crop_pct"] == 0.875
    loaded = FlexiViT.from_pretrained(tmp_path / "hub")
    assert not loaded.training and loaded.config == model.config and _same_weights(loaded, model)
    assert torch.equal(_logits(loaded, 4), _logits(model, 4)) and torch.equal(_logits(loaded, 8), _logits(model, 8))
    assert loaded.pretrained_cfg["label_names"] == NAMES and loaded.pretrained_cfg["interpolation"] == "bicubic"
    # What load_model reads (the CLI's loader) is what was saved; a second save keeps the names unasked.
    _, meta = load_model(tmp_path / "hub")
    assert meta["class_names"] == NAMES and meta["preprocess"] == PRE
    loaded.save_pretrained(tmp_path / "again")
    assert read_model_meta(tmp_path / "again")["class_names"] == NAMES
    assert read_model_meta(tmp_path / "again")["preprocess"] == PRE


def test_a_fresh_model_saves_the_default_preprocessing(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "hub")
    meta = read_model_meta(tmp_path / "hub")
    assert meta["class_names"] == [] and meta["preprocess"] == default_preprocess(model)


def test_overrides_when_loading(tmp_path):
    _model().save_pretrained(tmp_path / "hub")
    assert FlexiViT.from_pretrained(tmp_path / "hub", drop_path_rate=0.2).config.drop_path_rate == 0.2
    with pytest.raises(CheckpointError, match="size mismatch for head") as err:
        FlexiViT.from_pretrained(tmp_path / "hub", num_classes=3)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("hub"))


def test_a_run_and_its_model_file_load_and_are_not_overwritten(run, tmp_path):
    from_dir, from_file = FlexiViT.from_pretrained(run), FlexiViT.from_pretrained(run / "model.safetensors")
    reference, _ = load_model(run)
    assert _same_weights(from_dir, reference) and _same_weights(from_file, reference)
    assert from_dir.pretrained_cfg["label_names"] == CLASSES
    recipe = (run / "config.json").read_bytes()
    with pytest.raises(CheckpointError, match="config.json that save_pretrained did not write") as err:
        from_dir.save_pretrained(run)
    assert "\n" not in str(err.value) and (run / "config.json").read_bytes() == recipe
    assert not list(run.glob("README.md")) and not list(run.parent.glob(f".{run.name}.tmp-*"))


def test_a_saved_folder_evaluates_like_its_run(run, tmp_path, capsys):
    FlexiViT.from_pretrained(run).save_pretrained(tmp_path / "hub")
    data = json.loads((run / "config.json").read_text())["data"]["source"]
    args = ["--data", data, "--patch-sizes", "4,8", "--warmup", "0", "--repeats", "1", "--batch-size", "4",
            "--no-progress"]
    assert main(["eval", str(tmp_path / "hub"), *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", str(run), *args, "--out", str(tmp_path / "b")]) == 0
    top1 = [{row["patch_size"]: row["top1"] for row in json.loads((tmp_path / d / "eval.json").read_text())["results"]}
            for d in ("a", "b")]
    assert top1[0] == top1[1] and min(top1[0].values()) > 0.5


def test_folders_without_a_config_are_refused_in_one_line(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(bare / "model.safetensors"))
    (tmp_path / "empty").mkdir()
    export_checkpoint(run, 4, tmp_path / "export")
    for folder, message in ((bare, "no 'flexivit' metadata"), (tmp_path / "empty", "holds no model.safetensors"),
                            (tmp_path / "export", "is a `flexivit export` folder")):
        with pytest.raises(CheckpointError, match=message) as err:
            FlexiViT.from_pretrained(folder)
        assert "\n" not in str(err.value)


def test_a_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    first = _model()
    first.save_pretrained(tmp_path / "hub", class_names=NAMES)
    before = {p.name: p.read_bytes() for p in (tmp_path / "hub").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("flexivit.model.hub.atomic_write_text", fail)  # after the weights, before config.json
    for target in (tmp_path / "hub", tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            _model(depth=1).save_pretrained(target)
    assert {p.name: p.read_bytes() for p in (tmp_path / "hub").iterdir()} == before
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".*.tmp-*"))


def _cache_repo(cache: Path, repo_id: str, folder: Path) -> None:
    """``folder`` as huggingface_hub's cache holds a downloaded repo (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_a_repo_id_loads_from_the_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = _model()
    model.save_pretrained(tmp_path / "hub", class_names=NAMES)
    _cache_repo(tmp_path / "cache", "someone/flexi-tiny", tmp_path / "hub")
    loaded = FlexiViT.from_pretrained("someone/flexi-tiny", cache_dir=tmp_path / "cache")
    assert _same_weights(loaded, model) and loaded.pretrained_cfg["label_names"] == NAMES
    for name, message in (("someone/absent", "cannot get model.safetensors of Hub repo someone/absent"),
                          ("not a repo!", "neither a local folder or file nor a Hub repo id")):
        with pytest.raises(CheckpointError, match=message) as err:
            FlexiViT.from_pretrained(name, cache_dir=tmp_path / "cache")
        assert "\n" not in str(err.value)


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        full = repo_id if "/" in repo_id else f"someone/{repo_id}"  # the Hub puts a bare name under the user
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = repo_id
        shutil.copytree(folder_path, tmp_path / "uploaded" / repo_id)
        return "https://huggingface.co/someone/flexi-tiny/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = _model()
    model.save_pretrained(tmp_path / "local", class_names=NAMES)
    pushed = FlexiViT.from_pretrained(tmp_path / "local")
    assert pushed.push_to_hub("someone/flexi-tiny").endswith("/commit/0")
    assert calls == {"create_repo": "someone/flexi-tiny", "upload_folder": "someone/flexi-tiny"}
    uploaded = tmp_path / "uploaded" / "someone" / "flexi-tiny"
    assert {p.name for p in uploaded.iterdir()} == {"model.safetensors", "model.json", "config.json", "README.md"}
    card = (uploaded / "README.md").read_text()
    assert "library_name: flexivit" in card and "image-classification" in card
    assert _same_weights(FlexiViT.from_pretrained(uploaded), model)
    assert read_model_meta(uploaded)["class_names"] == NAMES
    # save_pretrained(push_to_hub=True) names the repo after the folder, as the mixin does (not the temporary one).
    pushed.save_pretrained(tmp_path / "named", push_to_hub=True)
    assert calls["create_repo"] == "named" and (tmp_path / "uploaded" / "someone" / "named" / "config.json").is_file()
    assert (tmp_path / "named" / "model.safetensors").is_file()
