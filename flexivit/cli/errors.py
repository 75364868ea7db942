"""How the command line reports an error a user caused: one line, in a data worker or under a launcher.

- An exception raised inside a DataLoader worker reaches the main process as the same class, with torch's
  whole worker traceback as its message ("Caught X in DataLoader worker process 0. Original Traceback
  ..."); ``one_line`` gives back the worker's own message, the last line of that text.
- Under ``accelerate launch`` / ``torchrun`` every rank prints the line and exits 2, and the launcher then
  reports the failed ranks itself. ``record_for_launcher`` writes the line where the launcher looks for a
  rank's error (``TORCHELASTIC_ERROR_FILE``), so its report names the cause instead of a documentation
  link. The launcher's own exit status (1) and its report are its own: a rank cannot change them. The
  launcher stops every rank as soon as one exits, so a rank waits a moment before exiting
  (``LAUNCHER_GRACE_S``) to let the others print their line too.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

__all__ = ["one_line", "record_for_launcher", "LAUNCHER_GRACE_S"]

# Seconds a rank of several waits after recording its error: the launcher SIGTERMs the others once one rank
# exits, and a rank a few milliseconds behind (they agree on a user error by a broadcast) lost its line once.
LAUNCHER_GRACE_S = 2.0

_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"
_QUALIFIED_NAME = re.compile(r"^[\w.]+: ")  # "flexivit.transforms.CorruptImageError: " before the message


def one_line(err: BaseException) -> str:
    """``err``'s message, or for an error re-raised from a data worker the worker's own message."""
    text = str(err)
    if _WORKER_TRACEBACK not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    return _QUALIFIED_NAME.sub("", last, count=1)


def record_for_launcher(message: str) -> None:
    """Write ``message`` as this rank's error for a torch elastic launcher, when one started this process,
    then, with other ranks, wait ``LAUNCHER_GRACE_S`` so that they print theirs before the launcher stops them.

    Written by hand in the format ``torch.distributed.elastic`` reads: its own ``ErrorHandler`` records the
    Python traceback, which is what a user error must not show."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    _write_record(path, message)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stderr.flush()
        time.sleep(LAUNCHER_GRACE_S)


def _write_record(path: str, message: str) -> None:
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                             "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:  # the launcher's report then falls back to its own text; the line was printed anyway
        pass
