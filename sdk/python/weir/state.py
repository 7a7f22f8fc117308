"""Durable key-value state, private to the handler.

Writes are buffered during the call and committed with the event's outcome
in one transaction (or discarded if the call fails); reads see the
committed state plus the call's own writes. Keys are strings up to 1024
bytes, values bytes up to 1 MiB. Failures raise `weir.HostError`: a limit
is permanent, an unavailable store retryable, when not caught.
"""

import json as _json
from typing import Any, List, Optional, Tuple, Union

from . import _host


def get(key: str) -> Optional[bytes]:
    """The value stored under `key`, or None."""
    return _host.state_get(key)


def set(key: str, value: Union[bytes, str]) -> None:  # noqa: A001 - mirrors the WIT
    """Stores `value` (bytes, or a string stored as UTF-8) under `key`."""
    _host.state_set(key, value.encode("utf-8") if isinstance(value, str) else bytes(value))


def delete(key: str) -> None:
    """Removes `key`; removing a missing key is not an error."""
    _host.state_delete(key)


def list(prefix: str = "", *, start_after: Optional[str] = None, limit: int = 1000) -> "List[Tuple[str, bytes]]":  # noqa: A001
    """Entries whose key starts with `prefix`, in key order, after
    `start_after` when given, at most `limit` (and never more than 1000)."""
    return _host.state_list(prefix, start_after, limit)


def get_json(key: str, default: Any = None) -> Any:
    """The JSON value stored under `key`, or `default`."""
    raw = _host.state_get(key)
    return default if raw is None else _json.loads(raw)


def set_json(key: str, value: Any) -> None:
    """Stores `value` as compact JSON under `key`."""
    _host.state_set(key, _json.dumps(value, separators=(",", ":")).encode("utf-8"))
