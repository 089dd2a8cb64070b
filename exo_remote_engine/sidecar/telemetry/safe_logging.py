"""Log records that a client cannot forge or inflate.

Request ids, model names and node names come from callers. Written to a log as they are,
a newline in one forges a log line and a 15 MiB one writes 15 MiB per line. The sidecar's
loggers therefore carry :class:`OneLineFilter`, which renders each record's message with
every argument made printable (control characters escaped, so a record is one line) and
bounded, and indents traceback lines so nothing in an exception's text starts a line of
its own. :func:`printable` is the one function doing it; messages sent to clients that
quote a client's string use it too.
"""

from __future__ import annotations

import logging
from typing import Any

MAX_ARG_CHARS = 1024  # room for a redacted provider message; a request id rarely needs 40
MAX_MESSAGE_CHARS = 8192
MAX_TRACEBACK_CHARS = 32768

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def printable(value: object, limit: int = MAX_ARG_CHARS) -> str:
    """``value`` as one printable line of at most about ``limit`` characters."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = text.translate(_ESCAPES)
    return f"{text}...[{cut} more characters]" if cut > 0 else text


def _safe_arg(arg: Any) -> Any:
    # Numbers keep their type so %d and %.2f still format them; everything else is text.
    return arg if isinstance(arg, int | float) else printable(arg)


class OneLineFilter(logging.Filter):
    """Renders a record's message safely once; later filters and handlers see plain text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args
            if isinstance(args, dict):
                safe: Any = {k: _safe_arg(v) for k, v in args.items()}
            else:
                safe = tuple(_safe_arg(a) for a in args)
            try:
                message = str(record.msg) % safe
            except (TypeError, ValueError):
                message = f"{record.msg} {safe!r}"
        else:
            message = str(record.msg)
        record.msg = printable(message, MAX_MESSAGE_CHARS)
        record.args = None
        if record.exc_info and not record.exc_text:
            rendered = logging.Formatter().formatException(record.exc_info)
            record.exc_text = _indented(rendered)
        elif record.exc_text and not record.exc_text.startswith("    "):
            record.exc_text = _indented(record.exc_text)
        return True


def _indented(traceback: str) -> str:
    """Each line printable and indented, so an exception's text cannot start a log line."""
    lines = traceback[:MAX_TRACEBACK_CHARS].splitlines()
    return "\n".join("    " + printable(line, MAX_MESSAGE_CHARS) for line in lines)


_FILTER = OneLineFilter()


def safe_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with :class:`OneLineFilter` attached (once)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


def protect_handlers() -> None:
    """Attach the filter to every handler of the process's loggers (the root's, and those
    a library such as LiteLLM set up for itself), so all their records are one bounded
    line too. Call again after importing a library that adds handlers."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
