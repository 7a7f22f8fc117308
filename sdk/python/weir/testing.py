"""Unit-testing handlers in a plain Python interpreter.

Outside Weir the SDK keeps state, settings, emitted events and log records
in memory. Reset them before each test and inspect them after::

    import weir, weir.testing
    import app  # registers the handler

    weir.testing.reset(config={"output_topic": "points"})
    weir.run(weir.Event(b'{"event_type": "OrderPlaced", ...}', key="c-1"))
    assert weir.testing.sent()[0].topic == "points"

Note that a failing call's writes are *not* rolled back here, as they are
in Weir: test failure paths with a fresh `reset()`.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

from . import _host


class Sent(NamedTuple):
    """An event the handler emitted."""

    topic: str
    key: Optional[bytes]
    payload: bytes
    headers: List[Tuple[str, bytes]]


def reset(config: Optional[Dict[str, str]] = None) -> None:
    """Empties the state, the emitted events and the log; sets the settings."""
    if _host.IN_WEIR:
        raise RuntimeError("weir.testing is for unit tests outside Weir")
    _host.memory_state.clear()
    _host.memory_sent.clear()
    _host.memory_logs.clear()
    _host.memory_config.clear()
    _host.memory_config.update(config or {})


def state() -> Dict[str, bytes]:
    """The handler's state, as a dict (a copy)."""
    return dict(_host.memory_state)


def sent() -> List[Sent]:
    """The events emitted since the last reset, in order."""
    return [Sent(*s) for s in _host.memory_sent]


def logs() -> List[Tuple[str, str, List[Tuple[str, str]]]]:
    """The log records since the last reset: (level, message, fields)."""
    return list(_host.memory_logs)
