"""Logging set-up: human text by default, JSON lines (with request ids) for log pipelines."""
from __future__ import annotations

import logging


def escape_unprintable(text: str) -> str:
    """Control characters, line and paragraph separators as escapes (``\\n``, ``\\x1b``,
    ``\\u2028``): text from a client can then never start a line of its own in a log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class OneLineFormatter(logging.Formatter):
    """The text format with one record per line: the message is escaped (a request id or an
    error message carrying a newline cannot forge a record), and traceback lines are indented
    under it with ``|`` so they never read as records either."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_unprintable(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(block: str) -> str:
    return "\n".join("    | " + escape_unprintable(line) for line in block.splitlines())


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":  # JSON strings escape control characters themselves
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"levelname": "level", "asctime": "time"}))
    else:
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))  # one line per VLM call otherwise
