"""``flexivit launch [accelerate launch options] COMMAND ...``: ``accelerate launch -m flexivit COMMAND ...``
with flexivit's exit status.

Under ``accelerate launch`` every rank of a run with a user error prints its one line and exits 2, and the
launcher then raises its own error (a traceback and exit status 1), which a rank cannot change. This command
runs the same launcher in-process (Accelerate's own parser and ``launch_command``, so every option and config
file means what it means there) and, when a rank fails, stays quiet if that rank already printed its one line
(exit 2) or prints one line naming the rank and its status otherwise, then exits with the rank's status.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Sequence

__all__ = ["launch", "split_command"]

USER_ERROR = 2  # what a flexivit rank exits with after printing a user error's one line (flexivit.cli.main)


def split_command(argv: Sequence[str], commands: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` cut at its first flexivit command name: (the launcher's options, the command and its args)."""
    at = next((i for i, a in enumerate(argv) if a in commands), None)
    if at is None:
        raise ValueError(f"flexivit launch needs a flexivit command after the launcher's options, one of "
                         f"{', '.join(commands)}: e.g. flexivit launch --num_processes 2 train fashion_mnist")
    return list(argv[:at]), list(argv[at:])


def launch(argv: Sequence[str], commands: Sequence[str]) -> int:
    """Run ``accelerate launch OPTIONS -m flexivit COMMAND ...`` and return the exit status of its ranks."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0].replace("``", ""))
        return 0
    try:
        options, command = split_command(argv, commands)
    except ValueError as err:
        print(f"flexivit launch: error: {err}", file=sys.stderr)
        return USER_ERROR
    args = launch_command_parser().parse_args([*options, "-m", "flexivit", *command])
    # The elastic agent logs every failed rank at ERROR before raising: the ranks' own lines say it already.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as err:  # several ranks (torchrun): the first that failed is the cause
        rank, failure = err.get_first_failure()
        return _report(failure.exitcode, f"rank {rank}", failure.message)
    except subprocess.CalledProcessError as err:  # one process (accelerate's simple launcher)
        return _report(err.returncode, "the process", "")
    return 0


def _report(status: int, who: str, message: object) -> int:
    if status == USER_ERROR:  # the rank printed its one line (and wrote it to the launcher's error file)
        return USER_ERROR
    text = message if isinstance(message, str) and message and "\n" not in message else "see its output above"
    print(f"flexivit launch: error: {who} exited with status {status}: {text}", file=sys.stderr)
    return status if status > 0 else 1  # a negative status is a signal: exit 1, as the launcher would
