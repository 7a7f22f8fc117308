//! Write [Weir](https://example.invalid/weir) event handlers in Rust.
//!
//! A handler is a type with one method, exported with one macro. Build it for
//! `wasm32-wasip2`, put the `.wasm` beside a manifest naming its topics, and
//! Weir calls it once per message, from whichever broker it consumes.
//! Components built with this SDK use the contract `weir:handler@0.2.0`
//! (`wit/handler.wit`).
//!
//! ```toml
//! # Cargo.toml
//! [package]
//! name = "orders"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]  # cdylib: the component; rlib: native unit tests
//!
//! [dependencies]
//! weir-sdk = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! ```no_run
//! use serde::Deserialize;
//! use weir_sdk::{Category, Event, Handler, HandlerError, export_handler, log};
//!
//! #[derive(Deserialize)]
//! struct Order {
//!     order_id: String,
//!     amount_cents: u64,
//! }
//!
//! struct Orders;
//!
//! impl Handler for Orders {
//!     fn handle(event: Event) -> Result<(), HandlerError> {
//!         // Malformed JSON becomes a permanent error (category `validation`):
//!         // dead-lettered, not retried.
//!         let order: Order = event.json()?;
//!         if order.amount_cents == 0 {
//!             return Err(HandlerError::permanent("an order must have a positive amount")
//!                 .category(Category::Validation));
//!         }
//!         // Fields as &str pairs …
//!         log::info("order accepted", &[("order_id", &order.order_id)]);
//!         // … or any Display value through the macros.
//!         weir_sdk::debug!(
//!             "order details";
//!             "order_id" => order.order_id,
//!             "amount_cents" => order.amount_cents,
//!             "attempt" => event.attempt(),
//!             "position" => event.position(),
//!         );
//!         Ok(())
//!     }
//! }
//!
//! export_handler!(Orders);
//! ```
//!
//! Build and check it, then deploy the component with its manifest
//! (`orders.toml`: `topics = ["orders"]`, plus optional retry, limits and
//! dead-letter settings):
//!
//! ```text
//! cargo build --release --target wasm32-wasip2
//! weir check target/wasm32-wasip2/release/orders.wasm
//! cp target/wasm32-wasip2/release/orders.wasm orders.toml /path/to/handlers/
//! ```
//!
//! # Errors, retries and categories
//!
//! Return [`HandlerError::retryable`] for transient failures (retried with the
//! manifest's backoff, dead-lettered after the last attempt),
//! [`HandlerError::retry_after`] to choose the delay yourself, and
//! [`HandlerError::permanent`] for events that can never succeed
//! (dead-lettered at once). A panic traps the component, which Weir treats
//! like a retryable error.
//!
//! Add a [`Category`] with [`HandlerError::category`] so that operators can
//! count failures by cause (the dead letter and the log carry it); it does
//! not change what Weir does next:
//!
//! ```
//! use std::time::Duration;
//! use weir_sdk::{Category, HandlerError};
//!
//! let down = HandlerError::retryable("orders database unreachable")
//!     .category(Category::ServiceUnavailable);
//! let throttled = HandlerError::retry_after(Duration::from_secs(2), "payment API says 429")
//!     .category(Category::RateLimited);
//! let declined = HandlerError::permanent("card declined").category(Category::other("payment-declined"));
//! assert_eq!(down.category, Some(Category::ServiceUnavailable));
//! assert_eq!(declined.to_string(), "permanent (payment-declined): card declined");
//! # let _ = throttled;
//! ```
//!
//! # Where a message comes from
//!
//! [`Event::position`] says where the message sits in its broker, in that
//! broker's own terms: a Kafka partition and offset, a JetStream stream and
//! sequence, and so on. Brokers without offsets get none.
//!
//! ```
//! use weir_sdk::{Event, Position};
//!
//! let event = Event::new("orders", b"{}".to_vec()).with_position(Position::kafka(3, 42));
//! match event.position() {
//!     Position::Kafka { partition, offset } => assert_eq!((*partition, *offset), (3, 42)),
//!     Position::JetStream { stream, sequence, .. } => println!("{stream} #{sequence}"),
//!     other => println!("from {}", other.broker()),
//! }
//! ```
//!
//! # State, emitted events and settings
//!
//! [`state`] is a key-value store private to the handler, [`emit`] sends
//! events through an outbox, and [`config`] reads the manifest's `[config]`
//! table. State writes and emitted events of one call are committed with the
//! event's outcome in one transaction, only if `handle` returns `Ok`: a crash
//! never leaves half of them, and a redelivered event never applies them
//! twice.
//!
//! ```
//! use weir_sdk::{Event, Handler, HandlerError, config, emit, state};
//!
//! struct Totals;
//! impl Handler for Totals {
//!     fn handle(event: Event) -> Result<(), HandlerError> {
//!         let key = format!("total/{}", event.key_str().unwrap_or("-"));
//!         let total: u64 = state::get_json(&key)?.unwrap_or(0) + 1;
//!         state::set_json(&key, &total)?;
//!         emit::to(config::get_or("topic", "totals"))
//!             .json(&serde_json::json!({ "key": key, "total": total }))?
//!             .send()?;
//!         Ok(())
//!     }
//! }
//!
//! Totals::handle(Event::new("t", b"{}".to_vec()).with_key("a")).expect("ok");
//! assert_eq!(state::get_json::<u64>("total/a").expect("state"), Some(1));
//! assert_eq!(emit::take_sent()[0].topic, "totals");
//! ```
//!
//! # Testing natively
//!
//! The crate also builds for the host, so `cargo test` can call a handler
//! directly. [`Event::new`] and its `with_*` builders make events, and
//! [`log::take_records`] returns what the handler logged on this thread:
//!
//! ```
//! use weir_sdk::{Event, Handler, HandlerError, log};
//!
//! struct Echo;
//! impl Handler for Echo {
//!     fn handle(event: Event) -> Result<(), HandlerError> {
//!         weir_sdk::info!("seen"; "key" => event.key_str().unwrap_or("-"));
//!         Ok(())
//!     }
//! }
//!
//! assert_eq!(Echo::handle(Event::new("t", b"x".to_vec()).with_key("k1")), Ok(()));
//! let records = log::take_records();
//! assert_eq!(records[0].message, "seen");
//! assert_eq!(records[0].field("key"), Some("k1"));
//! ```

use std::fmt;
use std::time::Duration;

pub mod config;
pub mod emit;
pub mod state;

#[doc(hidden)]
pub mod bindings {
    //! Generated from `wit/handler.wit`. Use the types at the crate root.
    #![allow(missing_docs, unsafe_code, clippy::too_many_arguments)]

    wit_bindgen::generate!({
        path: "../../wit",
        world: "weir:handler/handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler_world",
        default_bindings_module: "weir_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

use bindings::weir::handler::types as wit;

/// The version of the `weir:handler` contract this SDK builds components
/// for.
pub const CONTRACT: &str = "weir:handler@0.2.0";

/// Which broker a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Broker {
    /// Apache Kafka, or a Kafka-protocol broker.
    Kafka,
    /// NATS JetStream.
    JetStream,
    /// RabbitMQ, or another AMQP 0-9-1 broker.
    RabbitMq,
    /// Redis Streams.
    Redis,
    /// Amazon SQS.
    Sqs,
    /// Apache Pulsar.
    Pulsar,
}

impl Broker {
    /// The lowercase name, as the contract's `position` cases spell it:
    /// `kafka`, `jetstream`, `rabbitmq`, `redis`, `sqs`, `pulsar`.
    pub fn as_str(self) -> &'static str {
        match self {
            Broker::Kafka => "kafka",
            Broker::JetStream => "jetstream",
            Broker::RabbitMq => "rabbitmq",
            Broker::Redis => "redis",
            Broker::Sqs => "sqs",
            Broker::Pulsar => "pulsar",
        }
    }
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a message sits in its broker, in that broker's own terms. The
/// variant says which broker delivered it; see `wit/handler.wit` for each
/// field's exact meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Position {
    /// A Kafka record.
    Kafka {
        /// Partition of the topic.
        partition: i32,
        /// Offset within the partition.
        offset: i64,
    },
    /// A NATS JetStream message.
    JetStream {
        /// The stream holding it (the event's topic is its subject).
        stream: String,
        /// Its stream sequence number.
        sequence: u64,
        /// Deliveries by the server so far, this one included.
        delivered: u64,
    },
    /// A RabbitMQ (AMQP 0-9-1) delivery; the event's topic is the queue.
    RabbitMq {
        /// The exchange it was published to (empty: the default exchange).
        exchange: String,
        /// The routing key it was published with.
        routing_key: String,
        /// The delivery tag (identifies the delivery on its channel).
        delivery_tag: u64,
        /// Whether it was delivered before without an acknowledgement.
        redelivered: bool,
    },
    /// A Redis Streams entry.
    Redis {
        /// The stream's key.
        stream: String,
        /// The entry ID, `<milliseconds>-<sequence>`.
        entry_id: String,
    },
    /// An Amazon SQS message; the event's topic is the queue's name.
    Sqs {
        /// The queue's URL.
        queue: String,
        /// The message ID.
        message_id: String,
        /// `ApproximateReceiveCount`, this receipt included.
        receive_count: u32,
        /// FIFO queues: the sequence number.
        sequence_number: Option<String>,
    },
    /// An Apache Pulsar message: the parts of its message ID.
    Pulsar {
        /// The ledger.
        ledger_id: u64,
        /// The entry within the ledger.
        entry_id: u64,
        /// The partition of a partitioned topic.
        partition: Option<i32>,
        /// The index within a batched entry.
        batch_index: Option<i32>,
        /// Redeliveries to this subscription so far (0 on the first).
        redelivery_count: u32,
    },
}

impl Position {
    /// A Kafka position.
    pub fn kafka(partition: i32, offset: i64) -> Self {
        Position::Kafka { partition, offset }
    }

    /// A JetStream position, delivered once.
    pub fn jetstream(stream: impl Into<String>, sequence: u64) -> Self {
        Position::JetStream {
            stream: stream.into(),
            sequence,
            delivered: 1,
        }
    }

    /// Which broker this position belongs to.
    pub fn broker(&self) -> Broker {
        match self {
            Position::Kafka { .. } => Broker::Kafka,
            Position::JetStream { .. } => Broker::JetStream,
            Position::RabbitMq { .. } => Broker::RabbitMq,
            Position::Redis { .. } => Broker::Redis,
            Position::Sqs { .. } => Broker::Sqs,
            Position::Pulsar { .. } => Broker::Pulsar,
        }
    }

    /// The id Weir gives a message without an id header, where it derives
    /// one from the position: Kafka `<topic>/<partition>/<offset>`,
    /// JetStream `<stream>/<sequence>`, Redis `<stream>/<entry-id>`, SQS
    /// `<queue name>/<message-id>`.
    fn fallback_id(&self, topic: &str) -> Option<String> {
        match self {
            Position::Kafka { partition, offset } => Some(format!("{topic}/{partition}/{offset}")),
            Position::JetStream {
                stream, sequence, ..
            } => Some(format!("{stream}/{sequence}")),
            Position::Redis { stream, entry_id } => Some(format!("{stream}/{entry_id}")),
            Position::Sqs { message_id, .. } => Some(format!("{topic}/{message_id}")),
            _ => None,
        }
    }
}

impl fmt::Display for Position {
    /// Compact, for log fields: `kafka 3@42`, `jetstream ORDERS#7`,
    /// `rabbitmq orders-ex tag 5`, `redis orders 1526919030474-55`,
    /// `sqs <message id>`, `pulsar 12:7`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Kafka { partition, offset } => write!(f, "kafka {partition}@{offset}"),
            Position::JetStream {
                stream, sequence, ..
            } => write!(f, "jetstream {stream}#{sequence}"),
            Position::RabbitMq {
                exchange,
                delivery_tag,
                ..
            } => write!(f, "rabbitmq {exchange} tag {delivery_tag}"),
            Position::Redis { stream, entry_id } => write!(f, "redis {stream} {entry_id}"),
            Position::Sqs { message_id, .. } => write!(f, "sqs {message_id}"),
            Position::Pulsar {
                ledger_id,
                entry_id,
                ..
            } => write!(f, "pulsar {ledger_id}:{entry_id}"),
        }
    }
}

impl From<wit::Position> for Position {
    fn from(position: wit::Position) -> Self {
        match position {
            wit::Position::Kafka(p) => Position::Kafka {
                partition: p.partition,
                offset: p.offset,
            },
            wit::Position::Jetstream(p) => Position::JetStream {
                stream: p.stream,
                sequence: p.sequence,
                delivered: p.delivered,
            },
            wit::Position::Rabbitmq(p) => Position::RabbitMq {
                exchange: p.exchange,
                routing_key: p.routing_key,
                delivery_tag: p.delivery_tag,
                redelivered: p.redelivered,
            },
            wit::Position::Redis(p) => Position::Redis {
                stream: p.stream,
                entry_id: p.entry_id,
            },
            wit::Position::Sqs(p) => Position::Sqs {
                queue: p.queue,
                message_id: p.message_id,
                receive_count: p.receive_count,
                sequence_number: p.sequence_number,
            },
            wit::Position::Pulsar(p) => Position::Pulsar {
                ledger_id: p.ledger_id,
                entry_id: p.entry_id,
                partition: p.partition,
                batch_index: p.batch_index,
                redelivery_count: p.redelivery_count,
            },
        }
    }
}

/// One message from the broker. Bytes are passed through untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    id: String,
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    position: Position,
    timestamp_ms: Option<i64>,
    attempt: u32,
}

impl Event {
    /// Builds an event, e.g. for unit-testing a handler natively: no key, no
    /// headers, Kafka partition 0 offset 0, attempt 1, no timestamp, and the
    /// id Weir gives such an event without an id header, `<topic>/0/0`.
    ///
    /// ```
    /// use weir_sdk::{Event, Position};
    ///
    /// let event = Event::new("orders", br#"{"id": 1}"#.to_vec())
    ///     .with_key("customer-7")
    ///     .with_header("ce_type", "OrderPlaced")
    ///     .with_position(Position::kafka(3, 42))
    ///     .with_attempt(2);
    /// assert_eq!(event.id(), "orders/3/42");
    /// assert_eq!(event.header_str("ce_type"), Some("OrderPlaced"));
    /// ```
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        let topic = topic.into();
        Self {
            id: format!("{topic}/0/0"),
            topic,
            key: None,
            payload: payload.into(),
            headers: Vec::new(),
            position: Position::kafka(0, 0),
            timestamp_ms: None,
            attempt: 1,
        }
    }

    /// Sets the key (builder style, for tests).
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (builder style, for tests).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the attempt number (builder style, for tests).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Sets the position (builder style, for tests), and for Kafka and
    /// JetStream the id Weir gives a message without an id header
    /// (`<topic>/<partition>/<offset>`, `<stream>/<sequence>`); call
    /// [`with_id`](Self::with_id) afterwards to choose another id.
    ///
    /// ```
    /// use weir_sdk::{Broker, Event, Position};
    ///
    /// let event = Event::new("orders.placed", b"{}".to_vec())
    ///     .with_position(Position::jetstream("ORDERS", 7));
    /// assert_eq!(event.id(), "ORDERS/7");
    /// assert_eq!(event.broker(), Broker::JetStream);
    /// ```
    pub fn with_position(mut self, position: Position) -> Self {
        if let Some(id) = position.fallback_id(&self.topic) {
            self.id = id;
        }
        self.position = position;
        self
    }

    /// Sets the event id (builder style, for tests).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the timestamp in milliseconds since the Unix epoch (builder
    /// style, for tests).
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// Stable identity used for deduplication: the `ce_id` or `event_id`
    /// header, else derived from the position (Kafka
    /// `<topic>/<partition>/<offset>`, JetStream `<stream>/<sequence>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the message was consumed from: a Kafka topic, a NATS subject,
    /// a queue or a stream, in the broker's terms.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Key bytes, if the message has a key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The key as UTF-8, if there is a key and it is valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// Value bytes (empty for a tombstone).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload as UTF-8.
    ///
    /// # Errors
    ///
    /// A permanent error (category [`Category::Validation`]) if the payload
    /// is not valid UTF-8.
    pub fn text(&self) -> Result<&str, HandlerError> {
        std::str::from_utf8(self.payload()).map_err(|e| {
            HandlerError::permanent(format!("payload is not UTF-8: {e}"))
                .category(Category::Validation)
        })
    }

    /// Takes the payload out of the event without copying it.
    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }

    /// Parses the payload as JSON into `T`.
    ///
    /// # Errors
    ///
    /// A permanent error (category [`Category::Validation`]) naming what is
    /// wrong (line, column, missing field) when the payload is not valid
    /// JSON for `T`: such an event can never succeed, so it is
    /// dead-lettered without retries.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(self.payload()).map_err(|e| {
            HandlerError::permanent(format!("payload is not valid JSON for this event: {e}"))
                .category(Category::Validation)
        })
    }

    /// All headers in broker order; names may repeat.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The first header called `name`, if it is valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Where the message sits in its broker, in that broker's terms.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// Which broker delivered the message.
    pub fn broker(&self) -> Broker {
        self.position.broker()
    }

    /// Timestamp in milliseconds since the Unix epoch, if known.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.timestamp_ms
    }

    /// 1 on the first delivery, 2 on the first retry, …
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl From<wit::Event> for Event {
    fn from(e: wit::Event) -> Self {
        Self {
            id: e.id,
            topic: e.topic,
            key: e.key,
            payload: e.payload,
            headers: e.headers,
            position: e.position.into(),
            timestamp_ms: e.timestamp_ms,
            attempt: e.attempt,
        }
    }
}

/// What Weir does with a failed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Transient: retried with the handler's backoff policy, dead-lettered
    /// after the last attempt.
    Retryable,
    /// Transient, retried after this delay (chosen by the handler).
    RetryAfter(Duration),
    /// The event can never succeed: dead-lettered at once.
    Permanent,
}

/// What kind of failure a handler met, so that operators can count and
/// alert on failures by cause. Weir records it with the failure (the
/// dead letter's `weir.error.category` header, the log); it does not change
/// whether the event is retried.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Category {
    /// A dependency did not answer in time.
    Timeout,
    /// A dependency (a database, a service, the state store) is down,
    /// unreachable or refused the connection.
    ServiceUnavailable,
    /// A dependency or quota throttled the handler.
    RateLimited,
    /// The event is malformed or breaks a rule (bad JSON, a missing field,
    /// a value out of range).
    Validation,
    /// The event is well-formed but of a type, shape or schema version the
    /// handler does not understand.
    SchemaMismatch,
    /// Something the event refers to does not exist (or not yet).
    NotFound,
    /// The event conflicts with the current state (a duplicate, a
    /// concurrent change, a failed precondition).
    Conflict,
    /// Credentials were missing or refused, or lack the permission.
    Unauthorized,
    /// The handler's settings (its manifest's `[config]`) are missing or
    /// invalid.
    Configuration,
    /// A bug or an unexpected condition in the handler itself.
    Internal,
    /// A category of the handler's own; use [`Category::other`]. Weir keeps
    /// lowercase ASCII letters, digits and single `-` of the name.
    Other(String),
}

impl Category {
    /// A category of the handler's own, e.g. `payment-declined`: a short
    /// kebab-case name.
    pub fn other(name: impl Into<String>) -> Self {
        Category::Other(name.into())
    }

    /// The kebab-case name Weir records: `service-unavailable`, … or the
    /// name given to [`Category::other`].
    pub fn as_str(&self) -> &str {
        match self {
            Category::Timeout => "timeout",
            Category::ServiceUnavailable => "service-unavailable",
            Category::RateLimited => "rate-limited",
            Category::Validation => "validation",
            Category::SchemaMismatch => "schema-mismatch",
            Category::NotFound => "not-found",
            Category::Conflict => "conflict",
            Category::Unauthorized => "unauthorized",
            Category::Configuration => "configuration",
            Category::Internal => "internal",
            Category::Other(name) => name,
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Category> for wit::ErrorCategory {
    fn from(category: Category) -> Self {
        match category {
            Category::Timeout => wit::ErrorCategory::Timeout,
            Category::ServiceUnavailable => wit::ErrorCategory::ServiceUnavailable,
            Category::RateLimited => wit::ErrorCategory::RateLimited,
            Category::Validation => wit::ErrorCategory::Validation,
            Category::SchemaMismatch => wit::ErrorCategory::SchemaMismatch,
            Category::NotFound => wit::ErrorCategory::NotFound,
            Category::Conflict => wit::ErrorCategory::Conflict,
            Category::Unauthorized => wit::ErrorCategory::Unauthorized,
            Category::Configuration => wit::ErrorCategory::Configuration,
            Category::Internal => wit::ErrorCategory::Internal,
            Category::Other(name) => wit::ErrorCategory::Other(name),
        }
    }
}

/// Why handling failed: what Weir does next (`kind`), why (`reason`) and,
/// optionally, what kind of failure it was (`category`).
///
/// Make one with [`retryable`](Self::retryable),
/// [`retry_after`](Self::retry_after) or [`permanent`](Self::permanent),
/// then add a category with [`category`](Self::category()):
///
/// ```
/// use weir_sdk::{Category, ErrorKind, HandlerError};
///
/// let err = HandlerError::retryable("db down").category(Category::ServiceUnavailable);
/// assert_eq!(err.kind, ErrorKind::Retryable);
/// assert_eq!(err.reason, "db down");
/// assert!(matches!(err, HandlerError { kind: ErrorKind::Retryable, .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerError {
    /// What Weir does next: retry, retry after a delay, or dead-letter.
    pub kind: ErrorKind,
    /// Human-readable reason, logged and recorded with the message.
    pub reason: String,
    /// What kind of failure it was, if the handler says.
    pub category: Option<Category>,
}

impl HandlerError {
    /// A transient failure, retried with backoff.
    pub fn retryable(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::Retryable, reason)
    }

    /// A transient failure; retry after `delay`.
    pub fn retry_after(delay: Duration, reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::RetryAfter(delay), reason)
    }

    /// A failure no retry can fix; the event is dead-lettered.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, reason)
    }

    fn new(kind: ErrorKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
            category: None,
        }
    }

    /// The same error, with `category` saying what kind of failure it was.
    #[must_use]
    pub fn category(mut self, category: Category) -> Self {
        self.category = Some(category);
        self
    }

    /// Whether Weir retries the event (after a backoff or a chosen delay).
    pub fn is_retryable(&self) -> bool {
        !self.is_permanent()
    }

    /// Whether the event is dead-lettered without retries.
    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }
}

impl fmt::Display for HandlerError {
    /// `retryable: …`, `retry after 250 ms: …`, `permanent: …`, with the
    /// category in parentheses when there is one: `permanent (validation): …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::Retryable => f.write_str("retryable")?,
            ErrorKind::RetryAfter(d) => write!(f, "retry after {} ms", d.as_millis())?,
            ErrorKind::Permanent => f.write_str("permanent")?,
        }
        if let Some(category) = &self.category {
            write!(f, " ({category})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for HandlerError {}

impl From<HandlerError> for wit::HandlerError {
    fn from(err: HandlerError) -> Self {
        let category = err.category.map(Into::into);
        match err.kind {
            ErrorKind::Retryable => wit::HandlerError::Retryable(wit::Failure {
                reason: err.reason,
                category,
            }),
            ErrorKind::RetryAfter(d) => wit::HandlerError::RetryAfter(wit::RetryAfter {
                delay_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                reason: err.reason,
                category,
            }),
            ErrorKind::Permanent => wit::HandlerError::Permanent(wit::Failure {
                reason: err.reason,
                category,
            }),
        }
    }
}

/// What a handler implements.
pub trait Handler {
    /// Handles one event. `Ok(())` marks it done; an error schedules a retry
    /// or a dead letter (see [`HandlerError`]).
    ///
    /// # Errors
    ///
    /// Whatever the handler decides; see [`HandlerError`].
    fn handle(event: Event) -> Result<(), HandlerError>;
}

/// Exports a [`Handler`] as the component's `handle` function.
///
/// Use it once per crate, at module level, in a crate built as a `cdylib`
/// for `wasm32-wasip2`. It also compiles natively, where it does nothing
/// useful, so handler crates can be unit-tested with `cargo test`.
///
/// ```no_run
/// use weir_sdk::{Event, Handler, HandlerError};
///
/// struct Accept;
///
/// impl Handler for Accept {
///     fn handle(_event: Event) -> Result<(), HandlerError> {
///         Ok(())
///     }
/// }
///
/// weir_sdk::export_handler!(Accept);
/// ```
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        #[doc(hidden)]
        struct __WeirExport;

        impl $crate::bindings::Guest for __WeirExport {
            fn handle(
                event: $crate::bindings::weir::handler::types::Event,
            ) -> ::core::result::Result<(), $crate::bindings::weir::handler::types::HandlerError>
            {
                <$handler as $crate::Handler>::handle($crate::Event::from(event))
                    .map_err(::core::convert::Into::into)
            }
        }

        $crate::bindings::__export_handler_world!(__WeirExport);
    };
}

/// Structured logging into Weir's log, tagged with the handler's name and
/// the event being handled.
///
/// Each record has a level, a message and `key = value` fields, which Weir
/// writes as structured fields (JSON) or `key=value` (human-readable):
///
/// ```
/// use weir_sdk::log;
///
/// log::info("order accepted", &[("order_id", "o-17"), ("amount_cents", "1200")]);
/// ```
///
/// The macros [`trace!`](crate::trace), [`debug!`](crate::debug),
/// [`info!`](crate::info), [`warn!`](crate::warn) and [`error!`](crate::error)
/// take any [`Display`](std::fmt::Display) value and do the `to_string` for
/// you:
///
/// ```
/// let amount_cents = 1200;
/// weir_sdk::info!("order accepted"; "order_id" => "o-17", "amount_cents" => amount_cents);
/// ```
///
/// # Outside Wasm
///
/// Built for the host (unit tests), records are not sent anywhere: they are
/// printed to stderr (which the test harness captures) and kept per thread,
/// so a test can check what a handler logged with [`take_records`](crate::log::take_records).
pub mod log {
    /// Severity of a log record.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum Level {
        /// Very detailed tracing.
        Trace,
        /// Diagnostic detail.
        Debug,
        /// Normal operation.
        Info,
        /// Something unexpected that the handler coped with.
        Warn,
        /// A failure.
        Error,
    }

    impl Level {
        /// The lowercase name: `trace`, `debug`, `info`, `warn` or `error`.
        pub fn as_str(self) -> &'static str {
            match self {
                Level::Trace => "trace",
                Level::Debug => "debug",
                Level::Info => "info",
                Level::Warn => "warn",
                Level::Error => "error",
            }
        }
    }

    impl std::fmt::Display for Level {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.as_str())
        }
    }

    /// Writes one record at `level`. The level functions below and the
    /// logging macros call this.
    pub fn write(level: Level, message: &str, fields: &[(&str, &str)]) {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        sink::write(level, message, fields);
    }

    /// Logs at trace level.
    pub fn trace(message: &str, fields: &[(&str, &str)]) {
        write(Level::Trace, message, fields);
    }

    /// Logs at debug level.
    pub fn debug(message: &str, fields: &[(&str, &str)]) {
        write(Level::Debug, message, fields);
    }

    /// Logs at info level.
    pub fn info(message: &str, fields: &[(&str, &str)]) {
        write(Level::Info, message, fields);
    }

    /// Logs at warn level.
    pub fn warn(message: &str, fields: &[(&str, &str)]) {
        write(Level::Warn, message, fields);
    }

    /// Logs at error level.
    pub fn error(message: &str, fields: &[(&str, &str)]) {
        write(Level::Error, message, fields);
    }

    /// One log record, as kept by native (non-Wasm) builds for
    /// [`take_records`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Record {
        /// Severity.
        pub level: Level,
        /// The message.
        pub message: String,
        /// Fields in the order they were given.
        pub fields: Vec<(String, String)>,
    }

    impl Record {
        /// The value of the first field called `key`.
        pub fn field(&self, key: &str) -> Option<&str> {
            self.fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    /// Takes the records logged so far on this thread, for unit tests of
    /// native (non-Wasm) builds. In a component records go to Weir, and this
    /// always returns nothing.
    pub fn take_records() -> Vec<Record> {
        sink::take()
    }

    #[cfg(target_arch = "wasm32")]
    mod sink {
        use super::Level;
        use crate::bindings::weir::handler::log as wit_log;

        pub(super) fn write(level: Level, message: &str, fields: Vec<(String, String)>) {
            let level = match level {
                Level::Trace => wit_log::Level::Trace,
                Level::Debug => wit_log::Level::Debug,
                Level::Info => wit_log::Level::Info,
                Level::Warn => wit_log::Level::Warn,
                Level::Error => wit_log::Level::Error,
            };
            wit_log::log(level, message, &fields);
        }

        pub(super) fn take() -> Vec<super::Record> {
            Vec::new()
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod sink {
        use std::cell::RefCell;

        use super::{Level, Record};

        thread_local! {
            static RECORDS: RefCell<Vec<Record>> = const { RefCell::new(Vec::new()) };
        }

        pub(super) fn write(level: Level, message: &str, fields: Vec<(String, String)>) {
            let rendered: String = fields.iter().map(|(k, v)| format!(" {k}={v:?}")).collect();
            eprintln!("{level:>5} {message}{rendered}");
            RECORDS.with(|records| {
                records.borrow_mut().push(Record {
                    level,
                    message: message.to_string(),
                    fields,
                });
            });
        }

        pub(super) fn take() -> Vec<Record> {
            RECORDS.with(|records| std::mem::take(&mut *records.borrow_mut()))
        }
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log {
    ($level:ident, $message:expr $(,)?) => {
        $crate::log::write(
            $crate::log::Level::$level,
            ::core::convert::AsRef::<str>::as_ref(&$message),
            &[],
        )
    };
    ($level:ident, $message:expr; $($key:expr => $value:expr),+ $(,)?) => {
        $crate::log::write(
            $crate::log::Level::$level,
            ::core::convert::AsRef::<str>::as_ref(&$message),
            &[$((
                ::core::convert::AsRef::<str>::as_ref(&$key),
                ::std::string::ToString::to_string(&$value).as_str(),
            )),+],
        )
    };
}

/// Logs at trace level: `trace!("message"; "key" => value, …)`.
///
/// Values are anything that implements [`Display`](std::fmt::Display). See
/// [`info!`](crate::info) for the full syntax.
#[macro_export]
macro_rules! trace {
    ($($body:tt)+) => { $crate::__log!(Trace, $($body)+) };
}

/// Logs at debug level: `debug!("message"; "key" => value, …)`.
///
/// See [`info!`](crate::info) for the full syntax.
#[macro_export]
macro_rules! debug {
    ($($body:tt)+) => { $crate::__log!(Debug, $($body)+) };
}

/// Logs at info level: `info!("message"; "key" => value, …)`.
///
/// The message is a `&str` or `String` expression (use `format!` for a
/// computed one, though a fixed message with fields is easier to search).
/// Field keys are `&str`/`String`; values are anything that implements
/// [`Display`](std::fmt::Display). The fields (and the `;`) are optional.
///
/// ```
/// # let event = weir_sdk::Event::new("orders", b"{}".to_vec());
/// weir_sdk::info!("started");
/// weir_sdk::info!(
///     "event received";
///     "topic" => event.topic(),
///     "position" => event.position(),
///     "attempt" => event.attempt(),
/// );
/// ```
#[macro_export]
macro_rules! info {
    ($($body:tt)+) => { $crate::__log!(Info, $($body)+) };
}

/// Logs at warn level: `warn!("message"; "key" => value, …)`.
///
/// See [`info!`](crate::info) for the full syntax.
#[macro_export]
macro_rules! warn {
    ($($body:tt)+) => { $crate::__log!(Warn, $($body)+) };
}

/// Logs at error level: `error!("message"; "key" => value, …)`.
///
/// See [`info!`](crate::info) for the full syntax.
#[macro_export]
macro_rules! error {
    ($($body:tt)+) => { $crate::__log!(Error, $($body)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Order {
        id: u32,
    }

    #[test]
    fn json_parses_and_malformed_is_permanent() {
        let ok = Event::new("orders", br#"{"id": 7}"#.to_vec());
        assert_eq!(ok.json::<Order>(), Ok(Order { id: 7 }));
        let bad = Event::new("orders", b"{".to_vec());
        let err = bad.json::<Order>().expect_err("malformed");
        assert!(err.is_permanent() && err.reason.contains("JSON"), "{err}");
        assert_eq!(err.category, Some(Category::Validation));
        let missing = Event::new("orders", b"{}".to_vec());
        let err = missing.json::<Order>().expect_err("missing field");
        assert!(err.is_permanent() && err.reason.contains("id"), "{err}");
    }

    #[test]
    fn headers_by_name_first_match() {
        let e = Event::new("t", Vec::new())
            .with_header("a", b"1".to_vec())
            .with_header("a", b"2".to_vec())
            .with_header("bin", vec![0xff]);
        assert_eq!(e.header("a"), Some(&b"1"[..]));
        assert_eq!(e.header_str("a"), Some("1"));
        assert_eq!(e.header_str("bin"), None);
        assert_eq!(e.header("zzz"), None);
    }

    #[test]
    fn keys_may_be_binary() {
        let e = Event::new("t", Vec::new()).with_key(vec![0xff, 0x00]);
        assert_eq!(e.key(), Some(&[0xff, 0x00][..]));
        assert_eq!(e.key_str(), None);
        assert_eq!(
            Event::new("t", Vec::new()).with_key("k").key_str(),
            Some("k")
        );
    }

    #[test]
    fn builders_set_every_field() {
        let e = Event::new("orders", b"x".to_vec())
            .with_position(Position::kafka(2, 40))
            .with_timestamp_ms(1_700_000_000_000)
            .with_attempt(3);
        assert_eq!(e.id(), "orders/2/40");
        assert_eq!(e.position(), &Position::kafka(2, 40));
        assert_eq!(e.broker(), Broker::Kafka);
        assert_eq!(e.timestamp_ms(), Some(1_700_000_000_000));
        assert_eq!(e.attempt(), 3);
        assert_eq!(e.headers(), &[]);
        assert_eq!(e.key(), None);
        let e = e.with_id("ce-1");
        assert_eq!(e.id(), "ce-1");
        assert_eq!(e.text(), Ok("x"));
        assert_eq!(e.into_payload(), b"x".to_vec());
        let binary = Event::new("t", vec![0xff]);
        let err = binary.text().expect_err("not UTF-8");
        assert!(err.is_permanent() && err.reason.contains("UTF-8"), "{err}");
        assert_eq!(err.category, Some(Category::Validation));
    }

    #[test]
    fn positions_come_in_each_broker_s_terms() {
        let nats = Event::new("orders.placed", Vec::new())
            .with_position(Position::jetstream("ORDERS", 7))
            .with_id("ce-1");
        assert_eq!(nats.id(), "ce-1");
        assert_eq!(nats.broker(), Broker::JetStream);
        assert_eq!(nats.position().to_string(), "jetstream ORDERS#7");
        let rabbit = Event::new("q", Vec::new()).with_position(Position::RabbitMq {
            exchange: "ex".into(),
            routing_key: "rk".into(),
            delivery_tag: 5,
            redelivered: false,
        });
        assert_eq!(rabbit.id(), "q/0/0", "no id is derived for other brokers");
        assert_eq!(rabbit.broker().as_str(), "rabbitmq");
        let wit_position = wit::Position::Sqs(wit::SqsPosition {
            queue: "https://sqs/q".into(),
            message_id: "m-1".into(),
            receive_count: 2,
            sequence_number: None,
        });
        assert_eq!(Position::from(wit_position).broker(), Broker::Sqs);
        let wit_event = wit::Event {
            id: "i".into(),
            topic: "t".into(),
            key: None,
            payload: b"p".to_vec(),
            headers: Vec::new(),
            position: wit::Position::Pulsar(wit::PulsarPosition {
                ledger_id: 12,
                entry_id: 7,
                partition: None,
                batch_index: Some(1),
                redelivery_count: 0,
            }),
            timestamp_ms: None,
            attempt: 1,
        };
        let event = Event::from(wit_event);
        assert_eq!(event.position().to_string(), "pulsar 12:7");
        assert_eq!(event.payload(), b"p");
    }

    #[test]
    fn log_functions_and_macros_record_natively() {
        let _ = log::take_records();
        log::warn("plain", &[("k", "v")]);
        crate::info!("no fields");
        let offset: i64 = 42;
        let owned_key = String::from("owned");
        crate::error!(format!("computed {}", 1); "offset" => offset, owned_key => 'c',);
        crate::debug!("trailing"; "a" => 1.5);
        crate::trace!("last",);
        let records = log::take_records();
        let record = |level, message: &str, fields: &[(&str, &str)]| log::Record {
            level,
            message: message.to_string(),
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        };
        assert_eq!(
            records,
            [
                record(log::Level::Warn, "plain", &[("k", "v")]),
                record(log::Level::Info, "no fields", &[]),
                record(
                    log::Level::Error,
                    "computed 1",
                    &[("offset", "42"), ("owned", "c")]
                ),
                record(log::Level::Debug, "trailing", &[("a", "1.5")]),
                record(log::Level::Trace, "last", &[]),
            ]
        );
        assert_eq!(records[2].field("offset"), Some("42"));
        assert!(log::take_records().is_empty());
    }

    #[test]
    fn errors_map_onto_the_wit_variant() {
        let wit: wit::HandlerError =
            HandlerError::retry_after(Duration::from_millis(1500), "slow down")
                .category(Category::RateLimited)
                .into();
        assert_eq!(
            wit,
            wit::HandlerError::RetryAfter(wit::RetryAfter {
                delay_ms: 1500,
                reason: "slow down".into(),
                category: Some(wit::ErrorCategory::RateLimited),
            })
        );
        assert_eq!(
            wit::HandlerError::from(HandlerError::permanent("x")),
            wit::HandlerError::Permanent(wit::Failure {
                reason: "x".into(),
                category: None
            })
        );
        assert_eq!(
            wit::HandlerError::from(
                HandlerError::retryable("y").category(Category::other("payment-declined"))
            ),
            wit::HandlerError::Retryable(wit::Failure {
                reason: "y".into(),
                category: Some(wit::ErrorCategory::Other("payment-declined".into()))
            })
        );
    }

    #[test]
    fn errors_say_kind_category_and_reason() {
        let err = HandlerError::retryable("db down").category(Category::ServiceUnavailable);
        assert_eq!(err.to_string(), "retryable (service-unavailable): db down");
        assert!(err.is_retryable() && !err.is_permanent());
        let err = HandlerError::retry_after(Duration::from_millis(250), "later");
        assert_eq!(err.to_string(), "retry after 250 ms: later");
        assert!(err.is_retryable());
        assert_eq!(err.kind, ErrorKind::RetryAfter(Duration::from_millis(250)));
        let err = HandlerError::permanent("bad").category(Category::SchemaMismatch);
        assert_eq!(err.to_string(), "permanent (schema-mismatch): bad");
        assert!(err.is_permanent());
        for (category, name) in [
            (Category::Timeout, "timeout"),
            (Category::NotFound, "not-found"),
            (Category::Conflict, "conflict"),
            (Category::Unauthorized, "unauthorized"),
            (Category::Configuration, "configuration"),
            (Category::Internal, "internal"),
        ] {
            assert_eq!(category.as_str(), name);
        }
    }
}
