"""One training at a time per run folder: an exclusive lock held from the run's setup to its end.

The lock is ``fcntl.flock`` on ``OUT/.flexivit-lock``, taken by the main process only (the other ranks
learn of a refusal through ``flexivit.run``'s rank agreement). The file records its holder (pid, host,
command, start time), so a second run into the same folder is refused naming it. The kernel drops the
lock when its process ends, however it ends: a holder record found in a free lock is one a killed run
left behind, and it is taken over with a message. ``release`` empties the record, so a run that ended
normally leaves nothing to report.

Written on ``fcntl`` rather than the ``filelock`` package: its lock file carries no holder, which the
refusal has to name. ``flock`` is POSIX (the project targets Linux); on a network filesystem it holds
only where the filesystem supports it (NFS v4 does).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["LOCK_FILE", "RunLock", "describe_holder"]

LOCK_FILE = ".flexivit-lock"


def _command() -> str:
    """This process's command line, as ``flexivit ...`` when it is the command line tool."""
    if Path(sys.argv[0]).name in ("flexivit", "__main__.py"):
        return shlex.join(["flexivit", *sys.argv[1:]])
    return shlex.join([Path(sys.executable).name, *sys.argv])


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host (flexivit train ..., since 2026-12-06 02:44:17)``."""
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', 'unknown command')}, "
            f"since {holder.get('since', '?')})")


def _read(file: IO[str]) -> dict[str, Any] | None:
    file.seek(0)
    text = file.read().strip()
    try:
        record = json.loads(text) if text else None
    except ValueError:  # a record cut short by a crash while it was written: still a sign of a holder
        return {"command": "a run whose lock record is unreadable"}
    return record if isinstance(record, dict) else None


class RunLock:
    """The lock on one run folder; a context manager that releases it (if taken) on exit."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self, say: Callable[[str], Any] = print) -> str | None:
        """Take the lock: ``None`` once held, else the one-line refusal naming the run that holds it. The
        folder must exist."""
        if self._file is not None:
            return None
        file = open(self.folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(file)
            file.close()
            who = describe_holder(holder) if holder else "another process (it has not written its record yet)"
            return (f"{self.folder} is in use by another training: {who}; wait for it to end, or train into "
                    "another --out")
        left = _read(file)
        if left:
            say(f"taking over the lock on {self.folder} from {describe_holder(left)}, which ended without "
                "releasing it (killed?)")
        file.seek(0)
        file.truncate()
        file.write(json.dumps(_holder()) + "\n")
        file.flush()
        self._file = file
        return None

    def release(self) -> None:
        """Empty the holder record and drop the lock (a no-op when not held)."""
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            file.seek(0)
            file.truncate()
            file.flush()
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)
            file.close()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
