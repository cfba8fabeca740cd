"""The base of every exception the project raises, so a caller (the gRPC front door, the
command line, a Ray caller) can tell the project's own errors from bugs with one ``except``.
Each class keeps its builtin second base (``ValueError``, ``RuntimeError``...) so existing
handlers still work. serving/status_codes.py maps the classes to gRPC status codes.

This module imports nothing, so any layer may use it."""
from __future__ import annotations


def _rebuild(cls: type, args: tuple) -> BaseException:
    """Unpickles a CatcascadeError without calling its ``__init__`` (which may want other
    arguments than ``args``); pickle then restores its attributes from ``__dict__``."""
    return cls.__new__(cls, *args)


class CatcascadeError(Exception):
    """A project error: an expected failure with a message fit for the caller, as opposed to
    a bug. Pickles with its type and attributes whatever its ``__init__`` takes, so it
    crosses process boundaries (Ray) intact."""

    def __reduce__(self):
        return _rebuild, (type(self), self.args), (self.__dict__ or None)


class CommandError(CatcascadeError):
    """A user-facing error: printed without a traceback, exit code 2."""
