"""Atomic file writes: a file is written beside its target and renamed over it once complete, so a
reader (or a crash) never sees half of it, with the permissions a plain ``open`` would have given it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_write_bytes"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_file(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path``, to be renamed over it once complete."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")


def _publish(tmp: str, path: Path) -> None:
    """Rename ``tmp`` over ``path`` with the permissions a plain ``open`` would have given it (tempfile
    creates 0600, which would leave a model or eval.json unreadable by the user's group)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _temp_file(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _publish(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
