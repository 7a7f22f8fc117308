"""Structured logging into Weir's log, tagged with the handler and event.

Keyword arguments become fields: `weir.log.info("paid", order_id="o-1")`.
`print()` works too: the guest's stdout and stderr are captured line by
line into the same log.
"""

from typing import Any

from . import _host


def _log(level: str, message: str, fields: "dict[str, Any]") -> None:
    _host.log(level, message, [(k, str(v)) for k, v in fields.items()])


def trace(message: str, **fields: Any) -> None:
    """A trace record."""
    _log("trace", message, fields)


def debug(message: str, **fields: Any) -> None:
    """A debug record."""
    _log("debug", message, fields)


def info(message: str, **fields: Any) -> None:
    """An info record."""
    _log("info", message, fields)


def warn(message: str, **fields: Any) -> None:
    """A warning."""
    _log("warn", message, fields)


def error(message: str, **fields: Any) -> None:
    """An error record."""
    _log("error", message, fields)
