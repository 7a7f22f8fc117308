//! Write [Weir](https://example.invalid/weir) event handlers in Rust.
//!
//! A handler is a type with one method, exported with one macro. Build it for
//! `wasm32-wasip2`, put the `.wasm` beside a manifest naming its topics, and
//! Weir calls it once per message.
//!
//! ```no_run
//! use serde::Deserialize;
//! use weir_sdk::{Event, Handler, HandlerError, export_handler, log};
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
//!         // Malformed JSON becomes a permanent error: dead-lettered, not retried.
//!         let order: Order = event.json()?;
//!         if order.amount_cents == 0 {
//!             return Err(HandlerError::permanent("an order must have a positive amount"));
//!         }
//!         log::info(
//!             "order accepted",
//!             &[("order_id", &order.order_id), ("attempt", &event.attempt().to_string())],
//!         );
//!         Ok(())
//!     }
//! }
//!
//! export_handler!(Orders);
//! ```
//!
//! Build and check it:
//!
//! ```text
//! cargo build --release --target wasm32-wasip2
//! weir check target/wasm32-wasip2/release/orders.wasm
//! ```
//!
//! # Errors and retries
//!
//! Return [`HandlerError::retryable`] for transient failures (retried with the
//! manifest's backoff, dead-lettered after the last attempt),
//! [`HandlerError::retry_after`] to choose the delay yourself, and
//! [`HandlerError::permanent`] for events that can never succeed
//! (dead-lettered at once). A panic is treated like a retryable error.

use std::fmt;
use std::time::Duration;

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

use bindings::weir::handler::log as wit_log;
use bindings::weir::handler::types as wit;

/// One message from the broker. Bytes are passed through untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    inner: wit::Event,
}

impl Event {
    /// Builds an event, e.g. for unit-testing a handler natively.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        let topic = topic.into();
        Self {
            inner: wit::Event {
                id: format!("{topic}/0/0"),
                topic,
                key: None,
                payload: payload.into(),
                headers: Vec::new(),
                partition: 0,
                offset: 0,
                timestamp_ms: None,
                attempt: 1,
            },
        }
    }

    /// Sets the key (builder style, for tests).
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.inner.key = Some(key.into());
        self
    }

    /// Adds a header (builder style, for tests).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.inner.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the attempt number (builder style, for tests).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.inner.attempt = attempt;
        self
    }

    /// Stable identity used for deduplication: the `ce_id` or `event_id`
    /// header, else `<topic>/<partition>/<offset>`.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Topic the message came from.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// Key bytes, if the producer set a key.
    pub fn key(&self) -> Option<&[u8]> {
        self.inner.key.as_deref()
    }

    /// The key as UTF-8, if there is a key and it is valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// Value bytes (empty for a tombstone).
    pub fn payload(&self) -> &[u8] {
        &self.inner.payload
    }

    /// The payload as UTF-8.
    ///
    /// # Errors
    ///
    /// A permanent error if the payload is not valid UTF-8.
    pub fn text(&self) -> Result<&str, HandlerError> {
        std::str::from_utf8(self.payload())
            .map_err(|e| HandlerError::permanent(format!("payload is not UTF-8: {e}")))
    }

    /// Parses the payload as JSON into `T`.
    ///
    /// # Errors
    ///
    /// A permanent error naming what is wrong (line, column, missing field)
    /// when the payload is not valid JSON for `T`: such an event can never
    /// succeed, so it is dead-lettered without retries.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(self.payload()).map_err(|e| {
            HandlerError::permanent(format!("payload is not valid JSON for this event: {e}"))
        })
    }

    /// All headers in broker order; names may repeat.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.inner.headers
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.inner
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The first header called `name`, if it is valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Partition the message came from.
    pub fn partition(&self) -> i32 {
        self.inner.partition
    }

    /// Offset within the partition.
    pub fn offset(&self) -> i64 {
        self.inner.offset
    }

    /// Timestamp in milliseconds since the Unix epoch, if known.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.inner.timestamp_ms
    }

    /// 1 on the first delivery, 2 on the first retry, …
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }
}

impl From<wit::Event> for Event {
    fn from(inner: wit::Event) -> Self {
        Self { inner }
    }
}

/// Why handling failed; decides whether Weir retries or dead-letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Transient: retried with the handler's backoff policy.
    Retryable(String),
    /// Transient, with the delay before the next attempt chosen by the
    /// handler.
    RetryAfter(Duration, String),
    /// The event can never succeed: dead-lettered at once.
    Permanent(String),
}

impl HandlerError {
    /// A transient failure, retried with backoff.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable(message.into())
    }

    /// A transient failure; retry after `delay`.
    pub fn retry_after(delay: Duration, message: impl Into<String>) -> Self {
        Self::RetryAfter(delay, message.into())
    }

    /// A failure no retry can fix; the event is dead-lettered.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent(message.into())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retryable(m) => write!(f, "retryable: {m}"),
            Self::RetryAfter(d, m) => write!(f, "retry after {} ms: {m}", d.as_millis()),
            Self::Permanent(m) => write!(f, "permanent: {m}"),
        }
    }
}

impl std::error::Error for HandlerError {}

impl From<HandlerError> for wit::HandlerError {
    fn from(err: HandlerError) -> Self {
        match err {
            HandlerError::Retryable(m) => wit::HandlerError::Retryable(m),
            HandlerError::RetryAfter(d, reason) => wit::HandlerError::RetryAfter(wit::RetryAfter {
                delay_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                reason,
            }),
            HandlerError::Permanent(m) => wit::HandlerError::Permanent(m),
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
/// ```ignore
/// struct MyHandler;
/// impl weir_sdk::Handler for MyHandler { /* … */ }
/// weir_sdk::export_handler!(MyHandler);
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
pub mod log {
    use super::wit_log;

    fn write(level: wit_log::Level, message: &str, fields: &[(&str, &str)]) {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        wit_log::log(level, message, &fields);
    }

    /// Logs at trace level.
    pub fn trace(message: &str, fields: &[(&str, &str)]) {
        write(wit_log::Level::Trace, message, fields);
    }

    /// Logs at debug level.
    pub fn debug(message: &str, fields: &[(&str, &str)]) {
        write(wit_log::Level::Debug, message, fields);
    }

    /// Logs at info level.
    pub fn info(message: &str, fields: &[(&str, &str)]) {
        write(wit_log::Level::Info, message, fields);
    }

    /// Logs at warn level.
    pub fn warn(message: &str, fields: &[(&str, &str)]) {
        write(wit_log::Level::Warn, message, fields);
    }

    /// Logs at error level.
    pub fn error(message: &str, fields: &[(&str, &str)]) {
        write(wit_log::Level::Error, message, fields);
    }
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
        assert!(
            matches!(bad.json::<Order>(), Err(HandlerError::Permanent(m)) if m.contains("JSON"))
        );
        let missing = Event::new("orders", b"{}".to_vec());
        assert!(
            matches!(missing.json::<Order>(), Err(HandlerError::Permanent(m)) if m.contains("id"))
        );
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
    fn errors_map_onto_the_wit_variant() {
        let wit: wit::HandlerError =
            HandlerError::retry_after(Duration::from_millis(1500), "slow down").into();
        assert_eq!(
            wit,
            wit::HandlerError::RetryAfter(wit::RetryAfter {
                delay_ms: 1500,
                reason: "slow down".into()
            })
        );
        assert_eq!(
            wit::HandlerError::from(HandlerError::permanent("x")),
            wit::HandlerError::Permanent("x".into())
        );
    }
}
