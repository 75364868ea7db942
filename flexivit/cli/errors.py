"""How the command line reports an error a user caused: one line, in a data worker or under a launcher.

- An exception raised inside a DataLoader worker reaches the main process as the same class, with torch's
  whole worker traceback as its message ("Caught X in DataLoader worker process 0. Original Traceback
  ..."); ``one_line`` gives back the worker's own message, the last line of that text.
- Under ``accelerate launch`` / ``torchrun`` every rank prints the line and exits 2, and the launcher then
  reports the failed ranks itself. The ranks share one stderr, so ``print_line`` writes each line whole:
  ``print`` writes the text and its newline separately, and two ranks' lines then ran together as one.
  ``record_for_launcher`` writes the line where the launcher looks for a rank's error
  (``TORCHELASTIC_ERROR_FILE``), so its report names the cause instead of a documentation link. The
  launcher's own exit status (1) and its report are its own: a rank cannot change them.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

__all__ = ["one_line", "print_line", "record_for_launcher"]

_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"
_QUALIFIED_NAME = re.compile(r"^[\w.]+: ")  # "flexivit.transforms.CorruptImageError: " before the message


def one_line(err: BaseException) -> str:
    """``err``'s message, or for an error re-raised from a data worker the worker's own message."""
    text = str(err)
    if _WORKER_TRACEBACK not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    return _QUALIFIED_NAME.sub("", last, count=1)


def print_line(message: str) -> None:
    """``message`` and its newline on stderr in one write. ``print`` makes two writes, and with stderr
    unbuffered (``PYTHONUNBUFFERED``, as under the study runner) each is its own system call: ranks erring
    at once then wrote ``line0line1\n\n``. One write of a line under ``PIPE_BUF`` (4096 bytes) is never
    interleaved with another process's."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def record_for_launcher(message: str) -> None:
    """Write ``message`` as this rank's error for a torch elastic launcher, when one started this process.

    Written by hand in the format ``torch.distributed.elastic`` reads: its own ``ErrorHandler`` records the
    Python traceback, which is what a user error must not show."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                             "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:  # the launcher's report then falls back to its own text; the line was printed anyway
        pass
