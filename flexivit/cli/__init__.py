"""The ``flexivit`` command: one function per subcommand (``main``), user errors as one line."""

from flexivit.cli.main import main

__all__ = ["main"]
