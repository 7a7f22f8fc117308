//! Rust types generated from the `weir:handler` WIT packages, one module per
//! released version (`wit/0.1.0/handler.wit`, `wit/handler.wit`), and the
//! conversions between them and the host's version-neutral types: the
//! [`Event`] handed in and the [`Failure`] handed back.
//!
//! Everything that differs between versions is here; the imported
//! interfaces (log, state, emit, config) mean the same in every version and
//! are implemented once, in [`imports`](crate::host::imports).

use std::fmt;
use std::time::Duration;

use super::event::Event;
use super::instance::{Failure, FailureKind};
use crate::message::Position;

/// `weir:handler@0.1.0`, frozen: the event has a Kafka partition and offset.
pub mod v0_1 {
    // Generated code: documented by the WIT file it is generated from.
    #![allow(missing_docs)]

    wasmtime::component::bindgen!({
        path: "../wit/0.1.0",
        world: "weir:handler/handler",
        // Called on the async runtime; see "Calls" in `host/mod.rs`.
        exports: { default: async },
        // State reads may wait on the network (a shared store).
        imports: { "weir:handler/state": async },
    });
}

/// `weir:handler@0.2.0`: a broker-tagged position and error categories.
pub mod v0_2 {
    // Generated code: documented by the WIT file it is generated from.
    #![allow(missing_docs)]

    wasmtime::component::bindgen!({
        path: "../wit",
        world: "weir:handler/handler",
        additional_derives: [PartialEq],
        exports: { default: async },
        imports: { "weir:handler/state": async },
    });
}

/// The package and version of the newest contract this runtime serves (the
/// one the SDKs and `weir new` build against).
pub const WORLD_PACKAGE: &str = "weir:handler@0.2.0";

/// A released version of the `weir:handler` contract. The runtime serves
/// all of them: a component is called through the world it was built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Contract {
    /// `weir:handler@0.1.0`: Kafka partition and offset, errors without a
    /// category.
    V0_1,
    /// `weir:handler@0.2.0`: a broker-tagged position, error categories.
    V0_2,
}

impl Contract {
    /// Every version served, oldest first.
    pub const ALL: [Contract; 2] = [Contract::V0_1, Contract::V0_2];

    /// The newest version, the one [`WORLD_PACKAGE`] names.
    pub const LATEST: Contract = Contract::V0_2;

    /// The version number, e.g. `0.2.0`.
    pub fn version(self) -> &'static str {
        match self {
            Contract::V0_1 => "0.1.0",
            Contract::V0_2 => "0.2.0",
        }
    }

    /// The version that an import's `@version` suffix names, if served.
    pub fn from_version(version: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.version() == version)
    }

    /// Every version served, as `weir:handler@0.1.0, weir:handler@0.2.0`.
    pub fn served() -> String {
        Self::ALL
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Contract {
    /// The package: `weir:handler@0.2.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "weir:handler@{}", self.version())
    }
}

// ---------------------------------------------------------------------------
// 0.1.0

/// The milliseconds part of a Redis entry ID (`<ms>-<seq>`), or 0.
fn entry_millis(entry_id: &str) -> i64 {
    entry_id
        .split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

impl From<&Event> for v0_1::weir::handler::types::Event {
    /// The 0.1.0 event has a partition and an offset at top level. A Kafka
    /// position gives its own; any other broker has none, and gets the
    /// compatibility mapping documented in `wit/README.md`: partition 0
    /// and, for JetStream, the stream sequence as offset.
    fn from(event: &Event) -> Self {
        let (partition, offset) = match &event.position {
            Position::Kafka { partition, offset } => (*partition, *offset),
            Position::JetStream { sequence, .. } => {
                (0, i64::try_from(*sequence).unwrap_or(i64::MAX))
            }
            Position::Rabbit { delivery_tag, .. } => {
                (0, i64::try_from(*delivery_tag).unwrap_or(i64::MAX))
            }
            Position::Redis { entry_id, .. } => (0, entry_millis(entry_id)),
            Position::Sqs { receive_count, .. } => (0, i64::from(*receive_count)),
        };
        Self {
            id: event.id.clone(),
            topic: event.topic.clone(),
            key: event.key.clone(),
            payload: event.payload.clone(),
            headers: event.headers.clone(),
            partition,
            offset,
            timestamp_ms: event.timestamp_ms,
            attempt: event.attempt,
        }
    }
}

impl From<v0_1::weir::handler::types::HandlerError> for Failure {
    /// 0.1.0 errors carry no category.
    fn from(err: v0_1::weir::handler::types::HandlerError) -> Self {
        use v0_1::weir::handler::types::HandlerError as E;
        let (kind, message) = match err {
            E::Retryable(reason) => (FailureKind::Retryable, reason),
            E::RetryAfter(r) => (
                FailureKind::RetryAfter(Duration::from_millis(r.delay_ms)),
                r.reason,
            ),
            E::Permanent(reason) => (FailureKind::Permanent, reason),
        };
        Failure {
            kind,
            message: bounded_reason(message),
            poisoned: false,
            category: None,
        }
    }
}

// ---------------------------------------------------------------------------
// 0.2.0

impl From<&Position> for v0_2::weir::handler::types::Position {
    fn from(position: &Position) -> Self {
        use v0_2::weir::handler::types as wit;
        match position {
            Position::Kafka { partition, offset } => wit::Position::Kafka(wit::KafkaPosition {
                partition: *partition,
                offset: *offset,
            }),
            Position::JetStream {
                stream,
                sequence,
                delivered,
            } => wit::Position::Jetstream(wit::JetstreamPosition {
                stream: stream.clone(),
                sequence: *sequence,
                delivered: *delivered,
            }),
            Position::Rabbit {
                exchange,
                routing_key,
                delivery_tag,
                redelivered,
                ..
            } => wit::Position::Rabbitmq(wit::RabbitmqPosition {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                delivery_tag: *delivery_tag,
                redelivered: *redelivered,
            }),
            Position::Redis { stream, entry_id } => wit::Position::Redis(wit::RedisPosition {
                stream: stream.clone(),
                entry_id: entry_id.clone(),
            }),
            Position::Sqs {
                queue,
                message_id,
                receive_count,
                sequence_number,
            } => wit::Position::Sqs(wit::SqsPosition {
                queue: queue.clone(),
                message_id: message_id.clone(),
                receive_count: *receive_count,
                sequence_number: sequence_number.clone(),
            }),
        }
    }
}

impl From<&Event> for v0_2::weir::handler::types::Event {
    fn from(event: &Event) -> Self {
        Self {
            id: event.id.clone(),
            topic: event.topic.clone(),
            key: event.key.clone(),
            payload: event.payload.clone(),
            headers: event.headers.clone(),
            position: (&event.position).into(),
            timestamp_ms: event.timestamp_ms,
            attempt: event.attempt,
        }
    }
}

impl From<v0_2::weir::handler::types::HandlerError> for Failure {
    fn from(err: v0_2::weir::handler::types::HandlerError) -> Self {
        use v0_2::weir::handler::types::HandlerError as E;
        let (kind, message, category) = match err {
            E::Retryable(f) => (FailureKind::Retryable, f.reason, f.category),
            E::RetryAfter(r) => (
                FailureKind::RetryAfter(Duration::from_millis(r.delay_ms)),
                r.reason,
                r.category,
            ),
            E::Permanent(f) => (FailureKind::Permanent, f.reason, f.category),
        };
        Failure {
            kind,
            message: bounded_reason(message),
            poisoned: false,
            category: category.as_ref().map(category_name),
        }
    }
}

/// Longest failure reason kept, in bytes: it goes into every log line of
/// the attempt and into the dead letter's `weir.error` header, which must
/// stay well inside every broker's message size limit.
pub const MAX_REASON: usize = 8 << 10;

/// A guest's failure reason, cut to [`MAX_REASON`] bytes (at a character
/// boundary) with the number of bytes left out said at the end.
fn bounded_reason(mut reason: String) -> String {
    if reason.len() <= MAX_REASON {
        return reason;
    }
    let mut cut = MAX_REASON;
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let left_out = reason.len() - cut;
    reason.truncate(cut);
    reason.push_str(&format!("… ({left_out} more bytes left out)"));
    reason
}

/// Longest category name kept from `other(…)`.
const MAX_CATEGORY: usize = 64;

/// The category's kebab-case name, as in the WIT (`service-unavailable`);
/// `other(s)` gives `s`, sanitized.
fn category_name(category: &v0_2::weir::handler::types::ErrorCategory) -> String {
    use v0_2::weir::handler::types::ErrorCategory as C;
    match category {
        C::Timeout => "timeout",
        C::ServiceUnavailable => "service-unavailable",
        C::RateLimited => "rate-limited",
        C::Validation => "validation",
        C::SchemaMismatch => "schema-mismatch",
        C::NotFound => "not-found",
        C::Conflict => "conflict",
        C::Unauthorized => "unauthorized",
        C::Configuration => "configuration",
        C::Internal => "internal",
        C::Other(name) => return sanitize_category(name),
    }
    .to_string()
}

/// A handler-chosen category name made safe for headers, logs and metric
/// labels: ASCII letters lowercased, every run of other characters turned
/// into one `-`, no `-` at either end, at most [`MAX_CATEGORY`] characters;
/// `other` when nothing is left.
fn sanitize_category(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(MAX_CATEGORY));
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            if out.len() == MAX_CATEGORY {
                break;
            }
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            if out.len() + 1 >= MAX_CATEGORY {
                break;
            }
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("other");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_REASON);
        let cut = bounded_reason(long.clone());
        assert!(cut.len() < MAX_REASON + 64, "{}", cut.len());
        assert!(cut.ends_with(&format!(
            "({} more bytes left out)",
            long.len() - MAX_REASON
        )));
        assert_eq!(bounded_reason("short\nreason".into()), "short\nreason");
    }

    use super::v0_2::weir::handler::types as wit;
    use super::*;

    fn event(position: Position) -> Event {
        Event {
            id: "e".into(),
            topic: "orders".into(),
            key: Some(b"k".to_vec()),
            payload: b"p".to_vec(),
            headers: vec![("h".into(), b"v".to_vec())],
            timestamp_ms: Some(7),
            position,
            attempt: 2,
            correlation_id: None,
        }
    }

    #[test]
    fn versions_are_named_and_found() {
        assert_eq!(Contract::LATEST.to_string(), WORLD_PACKAGE);
        assert_eq!(Contract::from_version("0.1.0"), Some(Contract::V0_1));
        assert_eq!(Contract::from_version("0.2.0"), Some(Contract::V0_2));
        assert_eq!(Contract::from_version("0.3.0"), None);
        assert_eq!(Contract::served(), "weir:handler@0.1.0, weir:handler@0.2.0");
    }

    #[test]
    fn a_0_1_event_maps_jetstream_to_partition_0_and_the_sequence() {
        let kafka = v0_1::weir::handler::types::Event::from(&event(Position::Kafka {
            partition: 3,
            offset: 41,
        }));
        assert_eq!((kafka.partition, kafka.offset), (3, 41));
        let nats = v0_1::weir::handler::types::Event::from(&event(Position::JetStream {
            stream: "ORDERS".into(),
            sequence: 9,
            delivered: 2,
        }));
        assert_eq!((nats.partition, nats.offset), (0, 9));
        assert_eq!(
            (nats.id.as_str(), nats.topic.as_str(), nats.attempt),
            ("e", "orders", 2)
        );
        let huge = v0_1::weir::handler::types::Event::from(&event(Position::JetStream {
            stream: "S".into(),
            sequence: u64::MAX,
            delivered: 1,
        }));
        assert_eq!(huge.offset, i64::MAX);
    }

    #[test]
    fn a_0_2_event_keeps_the_position_in_its_broker_s_terms() {
        let nats = v0_2::weir::handler::types::Event::from(&event(Position::JetStream {
            stream: "ORDERS".into(),
            sequence: 9,
            delivered: 2,
        }));
        assert_eq!(
            nats.position,
            wit::Position::Jetstream(wit::JetstreamPosition {
                stream: "ORDERS".into(),
                sequence: 9,
                delivered: 2
            })
        );
        assert_eq!(nats.headers, vec![("h".to_string(), b"v".to_vec())]);
        assert_eq!(nats.timestamp_ms, Some(7));
    }

    #[test]
    fn categories_arrive_by_name_and_0_1_errors_have_none() {
        let failure = Failure::from(wit::HandlerError::Retryable(wit::Failure {
            reason: "db down".into(),
            category: Some(wit::ErrorCategory::ServiceUnavailable),
        }));
        assert_eq!(failure.kind, FailureKind::Retryable);
        assert_eq!(failure.message, "db down");
        assert_eq!(failure.category.as_deref(), Some("service-unavailable"));
        let failure = Failure::from(wit::HandlerError::RetryAfter(wit::RetryAfter {
            delay_ms: 250,
            reason: "slow down".into(),
            category: Some(wit::ErrorCategory::Other(" Payment_Declined!! ".into())),
        }));
        assert_eq!(
            failure.kind,
            FailureKind::RetryAfter(Duration::from_millis(250))
        );
        assert_eq!(failure.category.as_deref(), Some("payment-declined"));
        let failure = Failure::from(wit::HandlerError::Permanent(wit::Failure {
            reason: "bad".into(),
            category: None,
        }));
        assert_eq!(
            (failure.kind, failure.category),
            (FailureKind::Permanent, None)
        );
        let old = Failure::from(v0_1::weir::handler::types::HandlerError::Permanent(
            "bad".into(),
        ));
        assert_eq!((old.kind, old.category), (FailureKind::Permanent, None));
    }

    #[test]
    fn every_named_category_is_kebab_case() {
        use wit::ErrorCategory as C;
        let names: Vec<String> = [
            C::Timeout,
            C::ServiceUnavailable,
            C::RateLimited,
            C::Validation,
            C::SchemaMismatch,
            C::NotFound,
            C::Conflict,
            C::Unauthorized,
            C::Configuration,
            C::Internal,
        ]
        .iter()
        .map(category_name)
        .collect();
        for name in &names {
            assert_eq!(&sanitize_category(name), name);
        }
        assert_eq!(names[1], "service-unavailable");
    }

    #[test]
    fn other_categories_are_sanitized() {
        assert_eq!(sanitize_category("payment-declined"), "payment-declined");
        assert_eq!(sanitize_category("Out Of Stock"), "out-of-stock");
        assert_eq!(sanitize_category("--a__b--"), "a-b");
        assert_eq!(sanitize_category(""), "other");
        assert_eq!(sanitize_category("ünïcødé"), "n-c-d");
        assert_eq!(sanitize_category("€€€"), "other");
        let long = sanitize_category(&"ab-".repeat(100));
        assert!(long.len() <= MAX_CATEGORY, "{long}");
        assert!(!long.ends_with('-'), "{long}");
    }
}
