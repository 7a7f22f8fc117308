"""Write Weir event handlers in Python.

A handler is a function decorated with `@weir.handler`. Build it into a
WebAssembly component with componentize-py, put the `.wasm` beside a
manifest naming its topics, and Weir calls it once per message::

    import weir

    @weir.handler
    def handle(event: weir.Event) -> None:
        order = event.json()              # malformed JSON: weir.Permanent
        if order.get("amount_cents", 0) <= 0:
            raise weir.Permanent("an order must have a positive amount")
        weir.log.info("order accepted", order_id=order["order_id"])

    # The component's export: componentize-py looks for `WitWorld`.
    WitWorld = weir.WitWorld

Returning normally marks the event done. Raise `weir.Retryable` for a
transient failure (retried with the manifest's backoff, dead-lettered after
the last attempt; pass `delay_ms` to choose the delay), and
`weir.Permanent` for an event that can never succeed (dead-lettered at
once). Any other exception is logged with its traceback and treated as
retryable, like a panic in a Rust handler.

`weir.state` is a key-value store private to the handler, `weir.emit` sends
events through an outbox and `weir.config` reads the manifest's `[config]`
table. State writes and emitted events of one call are committed with the
event's outcome in one transaction, or discarded if the call fails.
"""

import json as _json
import traceback as _traceback
from typing import Any, Callable, List, Optional, Tuple, Union

from . import _host, config, log, state
from ._host import HostError, IN_WEIR

__all__ = [
    "Event",
    "Retryable",
    "Permanent",
    "HostError",
    "handler",
    "emit",
    "state",
    "config",
    "log",
    "WitWorld",
    "IN_WEIR",
]


class Retryable(Exception):
    """A transient failure: the event is tried again after a backoff.

    `delay_ms` chooses the delay before the next attempt instead of the
    manifest's backoff (for example from a rate limiter's answer).
    """

    def __init__(self, reason: str, delay_ms: Optional[int] = None):
        super().__init__(reason)
        self.reason = reason
        self.delay_ms = delay_ms


class Permanent(Exception):
    """The event can never succeed: it is dead-lettered without retries."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Event:
    """One message from the broker. Bytes stay bytes; helpers decode them."""

    __slots__ = ("id", "topic", "key", "payload", "headers", "partition", "offset", "timestamp_ms", "attempt")

    def __init__(
        self,
        payload: Union[bytes, str] = b"",
        *,
        id: str = "test/0/0",
        topic: str = "test",
        key: Union[bytes, str, None] = None,
        headers: Optional[List[Tuple[str, bytes]]] = None,
        partition: int = 0,
        offset: int = 0,
        timestamp_ms: Optional[int] = None,
        attempt: int = 1,
    ):
        #: Stable identity, used for deduplication.
        self.id = id
        #: Topic the message was consumed from.
        self.topic = topic
        #: Message key, if any (not necessarily UTF-8).
        self.key: Optional[bytes] = key.encode() if isinstance(key, str) else key
        #: Message value; empty for tombstones.
        self.payload: bytes = payload.encode() if isinstance(payload, str) else payload
        #: Headers in broker order; names may repeat.
        self.headers: List[Tuple[str, bytes]] = list(headers or [])
        self.partition = partition
        self.offset = offset
        #: Producer or broker timestamp, ms since the Unix epoch.
        self.timestamp_ms = timestamp_ms
        #: 1 on the first call, 2 on the first retry, and so on.
        self.attempt = attempt

    @classmethod
    def _from_wit(cls, e: Any) -> "Event":
        return cls(
            e.payload,
            id=e.id,
            topic=e.topic,
            key=e.key,
            headers=e.headers,
            partition=e.partition,
            offset=e.offset,
            timestamp_ms=e.timestamp_ms,
            attempt=e.attempt,
        )

    def key_str(self) -> Optional[str]:
        """The key as text, or None when there is no key or it is not UTF-8."""
        if self.key is None:
            return None
        try:
            return self.key.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def text(self) -> str:
        """The payload as text; raises `Permanent` when it is not UTF-8."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Permanent(f"payload is not UTF-8: {e}") from None

    def json(self) -> Any:
        """The payload parsed as JSON; raises `Permanent` when it is not."""
        try:
            return _json.loads(self.payload)
        except ValueError as e:
            raise Permanent(f"payload is not valid JSON: {e}") from None

    def header(self, name: str) -> Optional[bytes]:
        """The first header called `name` (case-sensitive), if any."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def header_str(self, name: str) -> Optional[str]:
        """The first header called `name` as text, if present and UTF-8."""
        value = self.header(name)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, topic={self.topic!r}, key={self.key!r}, attempt={self.attempt})"


def _bytes(value: Union[bytes, str, None]) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def emit(
    topic: str,
    payload: Any,
    *,
    key: Union[bytes, str, None] = None,
    headers: Optional[List[Tuple[str, Union[bytes, str]]]] = None,
) -> None:
    """Sends an event to `topic` if this call succeeds (through the outbox).

    `payload` may be bytes, a string, or any other value, which is sent as
    JSON. Weir adds an `event_id` header that is the same on every
    publication of this event. Raises `HostError` (a permanent failure
    when not caught) for a bad topic or an event over the size limits.
    """
    if isinstance(payload, (bytes, bytearray, memoryview, str)):
        body = _bytes(payload)
    else:
        body = _json.dumps(payload, separators=(",", ":")).encode("utf-8")
    hs = [(n, _bytes(v) or b"") for n, v in (headers or [])]
    _host.emit_send(topic, _bytes(key), body or b"", hs)


_registered: Optional[Callable[[Event], None]] = None


def handler(fn: Callable[[Event], None]) -> Callable[[Event], None]:
    """Registers `fn` as the component's handler (one per component)."""
    global _registered
    _registered = fn
    return fn


def _to_wit_error(e: BaseException) -> Any:
    from wit_world.imports import types

    if isinstance(e, Permanent):
        return types.HandlerError_Permanent(e.reason)
    if isinstance(e, Retryable):
        if e.delay_ms is not None:
            return types.HandlerError_RetryAfter(types.RetryAfter(int(e.delay_ms), e.reason))
        return types.HandlerError_Retryable(e.reason)
    if isinstance(e, HostError):
        # An unavailable store is transient; a limit is the handler's own
        # doing and will not change on retry.
        if e.kind == "Unavailable":
            return types.HandlerError_Retryable(str(e))
        return types.HandlerError_Permanent(str(e))
    return types.HandlerError_Retryable(f"{type(e).__name__}: {e}")


def run(event: Event) -> None:
    """Calls the registered handler the way Weir does, for unit tests:
    exceptions propagate unchanged."""
    if _registered is None:
        raise RuntimeError("no handler registered: decorate a function with @weir.handler")
    _registered(event)


class WitWorld:
    """The component's export. Assign it in the app module:
    `WitWorld = weir.WitWorld`."""

    def handle(self, event: Any) -> None:
        from componentize_py_types import Err

        if _registered is None:
            raise Err(_to_wit_error(Permanent("no handler registered: decorate a function with @weir.handler")))
        try:
            _registered(Event._from_wit(event))
        except Err:
            raise  # already a handler-error, raised through the raw bindings
        except (Retryable, Permanent, HostError) as e:
            raise Err(_to_wit_error(e)) from None
        except Exception as e:  # noqa: BLE001 - any bug is a retryable failure
            _host.log("error", "handler raised", [("exception", repr(e)), ("traceback", _traceback.format_exc())])
            raise Err(_to_wit_error(e)) from None
