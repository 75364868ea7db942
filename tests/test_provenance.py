"""Result files carry how they were made (command, revision, machine, seeds, split)."""

import json
import subprocess

import pytest

from flexivit.provenance import git_revision, write_result


def test_write_result_records_provenance(tmp_path):
    payload = {"seeds": [0, 1, 2], "split": "val", "values": {"0": 81.5, "1": 82.0, "2": 80.9}}
    js, md = write_result(tmp_path / "r", payload, "# A result\n", command=["tool", "--x", "a b"])
    data = json.loads(js.read_text())
    assert data["values"] == payload["values"] and data["seeds"] == [0, 1, 2]
    prov = data["provenance"]
    assert prov["command"] == "tool --x 'a b'"
    assert prov["machine"]["torch"] and prov["machine"]["logical_cpus"] >= 1
    text = md.read_text()
    assert text.startswith("# A result") and "seeds: 0, 1, 2; split: val" in text and "`tool --x 'a b'`" in text


def test_write_result_names_the_revisions_that_trained_the_runs(tmp_path):
    trained = {"1111111": ["a/seed0", "a/seed1"], "2222222+uncommitted": ["b/seed0"]}
    js, md = write_result(tmp_path / "r", {"seeds": [0], "split": "val"}, "# x\n", trained_at=trained)
    assert json.loads(js.read_text())["provenance"]["trained_at"] == trained
    assert "- runs trained at: 1111111 (2 runs); 2222222+uncommitted (1 runs)" in md.read_text()
    js, md = write_result(tmp_path / "s", {"seeds": [0], "split": "val"}, "# x\n")
    assert "trained_at" not in json.loads(js.read_text())["provenance"] and "trained at" not in md.read_text()


def test_write_result_refuses_a_payload_without_seeds_or_split(tmp_path):
    with pytest.raises(ValueError, match="seeds, split"):
        write_result(tmp_path / "r", {"values": {}}, "# x")
    assert not list(tmp_path.iterdir())


def test_git_revision_sees_a_dirty_tree(tmp_path):
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f").write_text("1")
    run("add", "f")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    clean = git_revision(tmp_path)
    assert clean["clean"] is True and len(clean["commit"]) == 40
    (tmp_path / "f").write_text("2")
    assert git_revision(tmp_path) == {"commit": clean["commit"], "clean": False}
