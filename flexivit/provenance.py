"""Where a published number came from: one helper every tool writes its result files through.

``write_result(stem, payload, markdown)`` writes ``stem.json`` and ``stem.md`` atomically; both carry a
``provenance`` record (the command, the git revision and whether the tree was clean, the machine, torch's
version) beside the seeds, the split and the per-seed values the payload itself holds, so a reader can
re-derive every mean ± std from the file alone.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from flexivit.files import atomic_write_text

__all__ = ["cpu_model", "machine", "git_revision", "provenance", "provenance_markdown", "write_result"]

REQUIRED = ("seeds", "split")  # what every result payload states besides its values


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The CPU model, its logical CPUs, torch's threads and the GPU (or None)."""
    import torch  # here, not at import time: tools that only format results need no torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__}


def git_revision(root: str | Path | None = None) -> dict[str, Any]:
    """The commit checked out at ``root`` (the package's own tree by default) and whether it was clean."""
    cwd = Path(root) if root is not None else Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "clean": None if status is None else status == ""}


def provenance(*, command: Sequence[str] | str | None = None, root: str | Path | None = None) -> dict[str, Any]:
    """The record a result file carries: command line, code revision, machine, torch version."""
    if command is None:
        command = [Path(sys.argv[0]).name, *sys.argv[1:]]
    text = command if isinstance(command, str) else shlex.join(command)
    return {"command": text, "git": git_revision(root), "machine": machine()}


def provenance_markdown(record: dict[str, Any], *, seeds: Sequence[int], split: str) -> str:
    git, m = record["git"], record["machine"]
    state = {True: "clean", False: "uncommitted changes", None: "unknown"}[git["clean"]]
    device = m["gpu"] or f"CPU only: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads"
    trained = record.get("trained_at")
    return "\n".join([
        f"- command: `{record['command']}`",
        f"- code: {git['commit'] or 'not a git checkout'} ({state})",
        *(["- runs trained at: " + "; ".join(f"{code} ({len(runs)} runs)" for code, runs in trained.items())]
          if trained else []),
        f"- machine: {device}; torch {m['torch']}, Python {m['python']}",
        f"- seeds: {', '.join(map(str, seeds)) or 'none'}; split: {split}",
    ])


def write_result(stem: str | Path, payload: dict[str, Any], markdown: str, *,
                 command: Sequence[str] | str | None = None, root: str | Path | None = None,
                 trained_at: dict[str, list[str]] | None = None) -> tuple[Path, Path]:
    """Write ``stem.json`` (``payload`` + ``provenance``) and ``stem.md`` (``markdown`` + how it was made).

    ``payload`` must say which ``seeds`` and which ``split`` its numbers come from (an empty list of seeds
    for a measurement without randomness); per-seed values belong in it, not only their means.
    ``trained_at`` (a study's ``Study.trained_at``: code revision -> the runs it trained) goes into the
    provenance beside the revision that wrote the file, which may be a later one (a report of finished runs).
    """
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"a result payload must state {', '.join(missing)}; add them before writing {stem}")
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    record = {**provenance(command=command, root=root), **({"trained_at": trained_at} if trained_at else {})}
    data = {**payload, "provenance": record}
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    atomic_write_text(json_path, json.dumps(data, indent=2, default=str) + "\n")
    how = provenance_markdown(record, seeds=payload["seeds"], split=payload["split"])
    atomic_write_text(md_path, markdown.rstrip() + f"\n\n## How this file was made\n{how}\n"
                      f"- data: `{json_path.name}` holds every value above, per seed\n")
    return json_path, md_path
