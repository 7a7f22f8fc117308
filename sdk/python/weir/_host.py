"""The host calls, or in-memory stand-ins when not running inside Weir.

Inside a component (built with componentize-py) the generated `wit_world`
bindings are importable and every call goes to the runtime. In a plain
Python interpreter they are not, and the same functions work on in-memory
data instead, so handlers can be unit-tested with `python -m unittest`
(see `weir.testing`).
"""

from typing import Dict, List, Optional, Tuple

try:
    from componentize_py_types import Err
    from wit_world.imports import config as _config
    from wit_world.imports import emit as _emit
    from wit_world.imports import log as _log
    from wit_world.imports import state as _state

    IN_WEIR = True
except ImportError:  # a plain interpreter: unit tests
    IN_WEIR = False


class HostError(Exception):
    """A state or emit call refused by the host: `kind` names the case."""

    def __init__(self, kind: str, detail: object, message: str):
        super().__init__(message)
        self.kind = kind
        self.detail = detail


_MESSAGES = {
    # state-error
    "KeyTooLong": "state key longer than {} bytes",
    "ValueTooLarge": "state value larger than {} bytes",
    "TooManyWrites": "more than {} state writes in one call",
    "TransactionTooLarge": "writes and emitted events over {} bytes in one call",
    "Unavailable": "state unavailable: {}",
    # emit-error
    "InvalidTopic": "invalid topic name: {!r}",
    "TooLarge": "emitted event larger than {} bytes",
    "TooMany": "more than {} emitted events in one call",
}


def _host_error(value: object) -> HostError:
    """A WIT error variant (e.g. `StateError_KeyTooLong(1024)`) as a HostError."""
    kind = type(value).__name__.split("_", 1)[-1]
    detail = getattr(value, "value", None)
    message = _MESSAGES.get(kind, "host error: " + kind + " {}").format(detail)
    return HostError(kind, detail, message)


# In-memory stand-ins (used only outside Weir).
memory_state: Dict[str, bytes] = {}
memory_config: Dict[str, str] = {}
memory_sent: List[Tuple[str, Optional[bytes], bytes, List[Tuple[str, bytes]]]] = []
memory_logs: List[Tuple[str, str, List[Tuple[str, str]]]] = []

LEVELS = ("trace", "debug", "info", "warn", "error")


def log(level: str, message: str, fields: List[Tuple[str, str]]) -> None:
    if IN_WEIR:
        _log.log(_log.Level[level.upper()], message, fields)
    else:
        memory_logs.append((level, message, fields))


def state_get(key: str) -> Optional[bytes]:
    if not IN_WEIR:
        return memory_state.get(key)
    try:
        return _state.get(key)
    except Err as e:
        raise _host_error(e.value) from None


def state_set(key: str, value: bytes) -> None:
    if not IN_WEIR:
        memory_state[key] = bytes(value)
        return
    try:
        _state.set(key, value)
    except Err as e:
        raise _host_error(e.value) from None


def state_delete(key: str) -> None:
    if not IN_WEIR:
        memory_state.pop(key, None)
        return
    try:
        _state.delete(key)
    except Err as e:
        raise _host_error(e.value) from None


def state_list(prefix: str, start_after: Optional[str], limit: int) -> List[Tuple[str, bytes]]:
    if not IN_WEIR:
        keys = sorted(k for k in memory_state if k.startswith(prefix))
        if start_after is not None:
            keys = [k for k in keys if k.encode() > start_after.encode()]
        return [(k, memory_state[k]) for k in keys[: min(limit, 1000)]]
    try:
        return _state.list_prefix(prefix, start_after, limit)
    except Err as e:
        raise _host_error(e.value) from None


def emit_send(topic: str, key: Optional[bytes], payload: bytes, headers: List[Tuple[str, bytes]]) -> None:
    if not IN_WEIR:
        memory_sent.append((topic, key, payload, headers))
        return
    try:
        _emit.send(topic, key, payload, headers)
    except Err as e:
        raise _host_error(e.value) from None


def config_get(key: str) -> Optional[str]:
    if not IN_WEIR:
        return memory_config.get(key)
    return _config.get(key)


def config_all() -> List[Tuple[str, str]]:
    if not IN_WEIR:
        return sorted(memory_config.items())
    return _config.get_all()
