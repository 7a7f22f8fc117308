"""Write Weir event handlers in Python.

A handler is a function decorated with `@weir.handler`. Build it into a
WebAssembly component with componentize-py, put the `.wasm` beside a
manifest naming its topics, and Weir calls it once per message, from
whichever broker it consumes (components built with this SDK use the
contract `weir:handler@0.2.0`)::

    import weir

    @weir.handler
    def handle(event: weir.Event) -> None:
        order = event.json()              # malformed JSON: weir.Permanent, category "validation"
        if order.get("amount_cents", 0) <= 0:
            raise weir.Permanent("an order must have a positive amount",
                                 category=weir.Category.VALIDATION)
        weir.log.info("order accepted", order_id=order["order_id"], broker=event.broker)

    # The component's export: componentize-py looks for `WitWorld`.
    WitWorld = weir.WitWorld

Returning normally marks the event done. Raise `weir.Retryable` for a
transient failure (retried with the manifest's backoff, dead-lettered after
the last attempt; pass `delay_ms` to choose the delay), and
`weir.Permanent` for an event that can never succeed (dead-lettered at
once); either takes a `category=` (a `weir.Category`, or a kebab-case name
of your own) so that operators can count failures by cause. Any other
exception is logged with its traceback and treated as retryable (category
`internal`), like a panic in a Rust handler.

`event.position` says where the message sits in its broker, in that
broker's terms (`weir.KafkaPosition`, `weir.JetStreamPosition`, …), and
`event.broker` which broker it is.

`weir.state` is a key-value store private to the handler, `weir.emit` sends
events through an outbox and `weir.config` reads the manifest's `[config]`
table. State writes and emitted events of one call are committed with the
event's outcome in one transaction, or discarded if the call fails.
"""

import enum as _enum
import json as _json
import traceback as _traceback
from dataclasses import dataclass as _dataclass
from typing import Any, Callable, ClassVar, List, Optional, Tuple, Union

from . import _host, config, log, state
from ._host import HostError, IN_WEIR

__all__ = [
    "CONTRACT",
    "Event",
    "Category",
    "Retryable",
    "Permanent",
    "HostError",
    "KafkaPosition",
    "JetStreamPosition",
    "RabbitMQPosition",
    "RedisPosition",
    "SQSPosition",
    "PulsarPosition",
    "Position",
    "handler",
    "emit",
    "state",
    "config",
    "log",
    "WitWorld",
    "IN_WEIR",
]

#: The version of the `weir:handler` contract this SDK builds components for.
CONTRACT = "weir:handler@0.2.0"


class Category(str, _enum.Enum):
    """What kind of failure a handler met, so that operators can count and
    alert on failures by cause (Weir records it with the failure, e.g. in
    the dead letter). It does not change whether the event is retried.

    Pass a member, its value (`"service-unavailable"`), or a short
    kebab-case name of your own (`"payment-declined"`), which Weir records
    as it is (lowercased; other characters than letters, digits and `-`
    become `-`).
    """

    #: A dependency did not answer in time.
    TIMEOUT = "timeout"
    #: A dependency (a database, a service, the state store) is down,
    #: unreachable or refused the connection.
    SERVICE_UNAVAILABLE = "service-unavailable"
    #: A dependency or quota throttled the handler.
    RATE_LIMITED = "rate-limited"
    #: The event is malformed or breaks a rule (bad JSON, a missing field).
    VALIDATION = "validation"
    #: The event is well-formed but of a type, shape or schema version the
    #: handler does not understand.
    SCHEMA_MISMATCH = "schema-mismatch"
    #: Something the event refers to does not exist (or not yet).
    NOT_FOUND = "not-found"
    #: The event conflicts with the current state (a duplicate, a
    #: concurrent change, a failed precondition).
    CONFLICT = "conflict"
    #: Credentials were missing or refused, or lack the permission.
    UNAUTHORIZED = "unauthorized"
    #: The handler's settings (the manifest's `[config]`) are missing or
    #: invalid.
    CONFIGURATION = "configuration"
    #: A bug or an unexpected condition in the handler itself.
    INTERNAL = "internal"

    def __str__(self) -> str:
        return self.value


def _category(category: Union[Category, str, None]) -> Optional[str]:
    if category is None:
        return None
    if isinstance(category, Category):
        return category.value
    return str(category)


class Retryable(Exception):
    """A transient failure: the event is tried again after a backoff.

    `delay_ms` chooses the delay before the next attempt instead of the
    manifest's backoff (for example from a rate limiter's answer).
    `category` says what kind of failure it was (see `Category`).
    """

    def __init__(
        self,
        reason: str,
        delay_ms: Optional[int] = None,
        *,
        category: Union[Category, str, None] = None,
    ):
        super().__init__(reason)
        self.reason = reason
        self.delay_ms = delay_ms
        #: The category's kebab-case name, or None.
        self.category: Optional[str] = _category(category)


class Permanent(Exception):
    """The event can never succeed: it is dead-lettered without retries.

    `category` says what kind of failure it was (see `Category`).
    """

    def __init__(self, reason: str, *, category: Union[Category, str, None] = None):
        super().__init__(reason)
        self.reason = reason
        #: The category's kebab-case name, or None.
        self.category: Optional[str] = _category(category)


# Positions: where a message sits in its broker, in that broker's terms.
# `wit/handler.wit` documents every field.


@_dataclass(frozen=True)
class KafkaPosition:
    """A Kafka record: partition and offset."""

    broker: ClassVar[str] = "kafka"
    partition: int
    offset: int


@_dataclass(frozen=True)
class JetStreamPosition:
    """A NATS JetStream message: its stream, stream sequence, and how often
    the server has delivered it (this delivery included)."""

    broker: ClassVar[str] = "jetstream"
    stream: str
    sequence: int
    delivered: int = 1


@_dataclass(frozen=True)
class RabbitMQPosition:
    """A RabbitMQ (AMQP 0-9-1) delivery; the event's topic is the queue."""

    broker: ClassVar[str] = "rabbitmq"
    exchange: str
    routing_key: str
    delivery_tag: int
    redelivered: bool = False


@_dataclass(frozen=True)
class RedisPosition:
    """A Redis Streams entry: the stream's key and the entry ID."""

    broker: ClassVar[str] = "redis"
    stream: str
    entry_id: str


@_dataclass(frozen=True)
class SQSPosition:
    """An Amazon SQS message; the event's topic is the queue's name."""

    broker: ClassVar[str] = "sqs"
    queue: str
    message_id: str
    receive_count: int = 1
    sequence_number: Optional[str] = None


@_dataclass(frozen=True)
class PulsarPosition:
    """An Apache Pulsar message: the parts of its message ID."""

    broker: ClassVar[str] = "pulsar"
    ledger_id: int
    entry_id: int
    partition: Optional[int] = None
    batch_index: Optional[int] = None
    redelivery_count: int = 0


Position = Union[KafkaPosition, JetStreamPosition, RabbitMQPosition, RedisPosition, SQSPosition, PulsarPosition]

_POSITIONS = {
    "Position_Kafka": KafkaPosition,
    "Position_Jetstream": JetStreamPosition,
    "Position_Rabbitmq": RabbitMQPosition,
    "Position_Redis": RedisPosition,
    "Position_Sqs": SQSPosition,
    "Position_Pulsar": PulsarPosition,
}


def _position_from_wit(p: Any) -> Position:
    """`Position_Kafka(value=KafkaPosition(...))` -> `weir.KafkaPosition(...)`."""
    cls = _POSITIONS[type(p).__name__]
    return cls(**vars(p.value))


class Event:
    """One message from the broker. Bytes stay bytes; helpers decode them."""

    __slots__ = ("id", "topic", "key", "payload", "headers", "position", "timestamp_ms", "attempt")

    def __init__(
        self,
        payload: Union[bytes, str] = b"",
        *,
        id: str = "test/0/0",
        topic: str = "test",
        key: Union[bytes, str, None] = None,
        headers: Optional[List[Tuple[str, bytes]]] = None,
        position: Optional[Position] = None,
        timestamp_ms: Optional[int] = None,
        attempt: int = 1,
    ):
        #: Stable identity, used for deduplication.
        self.id = id
        #: Where the message was consumed from: a Kafka topic, a NATS
        #: subject, a queue or a stream, in the broker's terms.
        self.topic = topic
        #: Message key, if any (not necessarily UTF-8).
        self.key: Optional[bytes] = key.encode() if isinstance(key, str) else key
        #: Message value; empty for tombstones.
        self.payload: bytes = payload.encode() if isinstance(payload, str) else payload
        #: Headers in broker order; names may repeat.
        self.headers: List[Tuple[str, bytes]] = list(headers or [])
        #: Where the message sits in its broker (default: Kafka partition 0,
        #: offset 0).
        self.position: Position = KafkaPosition(0, 0) if position is None else position
        #: Producer or broker timestamp, ms since the Unix epoch.
        self.timestamp_ms = timestamp_ms
        #: 1 on the first call, 2 on the first retry, and so on.
        self.attempt = attempt

    @property
    def broker(self) -> str:
        """Which broker delivered the message: `kafka`, `jetstream`,
        `rabbitmq`, `redis`, `sqs` or `pulsar`."""
        return self.position.broker

    @classmethod
    def _from_wit(cls, e: Any) -> "Event":
        return cls(
            e.payload,
            id=e.id,
            topic=e.topic,
            key=e.key,
            headers=e.headers,
            position=_position_from_wit(e.position),
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
        """The payload as text; raises `Permanent` (category `validation`)
        when it is not UTF-8."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Permanent(f"payload is not UTF-8: {e}", category=Category.VALIDATION) from None

    def json(self) -> Any:
        """The payload parsed as JSON; raises `Permanent` (category
        `validation`) when it is not."""
        try:
            return _json.loads(self.payload)
        except ValueError as e:
            raise Permanent(f"payload is not valid JSON: {e}", category=Category.VALIDATION) from None

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
        return (
            f"Event(id={self.id!r}, topic={self.topic!r}, key={self.key!r}, "
            f"position={self.position!r}, attempt={self.attempt})"
        )


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


_CATEGORIES = {
    "timeout": "ErrorCategory_Timeout",
    "service-unavailable": "ErrorCategory_ServiceUnavailable",
    "rate-limited": "ErrorCategory_RateLimited",
    "validation": "ErrorCategory_Validation",
    "schema-mismatch": "ErrorCategory_SchemaMismatch",
    "not-found": "ErrorCategory_NotFound",
    "conflict": "ErrorCategory_Conflict",
    "unauthorized": "ErrorCategory_Unauthorized",
    "configuration": "ErrorCategory_Configuration",
    "internal": "ErrorCategory_Internal",
}


def _wit_category(types: Any, category: Optional[str]) -> Any:
    if category is None:
        return None
    name = _CATEGORIES.get(category)
    if name is None:
        return types.ErrorCategory_Other(category)
    return getattr(types, name)()


def _failure(e: BaseException) -> Tuple[str, str, Optional[str], Optional[int]]:
    """(kind, reason, category, delay_ms) of what `handle` raised."""
    if isinstance(e, Permanent):
        return ("permanent", e.reason, e.category, None)
    if isinstance(e, Retryable):
        kind = "retryable" if e.delay_ms is None else "retry-after"
        return (kind, e.reason, e.category, e.delay_ms)
    if isinstance(e, HostError):
        # An unavailable store is transient; a limit is the handler's own
        # doing and will not change on retry.
        if e.kind == "Unavailable":
            return ("retryable", str(e), Category.SERVICE_UNAVAILABLE.value, None)
        return ("permanent", str(e), Category.INTERNAL.value, None)
    return ("retryable", f"{type(e).__name__}: {e}", Category.INTERNAL.value, None)


def _to_wit_error(e: BaseException) -> Any:
    from wit_world.imports import types

    kind, reason, category, delay_ms = _failure(e)
    wit_category = _wit_category(types, category)
    if kind == "permanent":
        return types.HandlerError_Permanent(types.Failure(reason, wit_category))
    if kind == "retry-after":
        return types.HandlerError_RetryAfter(types.RetryAfter(int(delay_ms or 0), reason, wit_category))
    return types.HandlerError_Retryable(types.Failure(reason, wit_category))


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
