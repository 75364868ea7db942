"""Reading the JSON-lines files a run appends to (``log.jsonl``, ``search.jsonl``), after a crash too.

A process killed while it appends a line leaves that line cut short. ``read_jsonl`` drops every line that
does not parse (in practice the torn last one), says so naming the file and the line, and writes the file
back without it, so the next append starts on a line of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from flexivit.files import atomic_write_text

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path, say: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """The records of ``path`` (none when it does not exist); unreadable lines are dropped from the file, each
    with a message through ``say``."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    kept, records = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            where = "its last line" if number == len(lines) else f"line {number}"
            say(f"{path}: dropped {where}, which is not a whole JSON record ({len(line)} characters; a process "
                "stopped while writing it)")
            continue
        kept.append(line)
    if len(kept) != sum(1 for line in lines if line.strip()):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return records
