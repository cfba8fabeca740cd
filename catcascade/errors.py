"""The user-facing error every layer's commands raise; the command line prints it without a
traceback and exits with code 2. This module imports nothing, so any layer may use it."""
from __future__ import annotations


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""
