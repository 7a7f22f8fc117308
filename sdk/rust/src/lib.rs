//! Write [Weir](https://example.invalid/weir) event handlers in Rust.
//!
//! A handler is a type with one method, exported with one macro. Build it for
//! `wasm32-wasip2`, put the `.wasm` beside a manifest naming its topics, and
//! Weir calls it once per message.
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
//!         // Fields as &str pairs …
//!         log::info("order accepted", &[("order_id", &order.order_id)]);
//!         // … or any Display value through the macros.
//!         weir_sdk::debug!(
//!             "order details";
//!             "order_id" => order.order_id,
//!             "amount_cents" => order.amount_cents,
//!             "attempt" => event.attempt(),
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
//! # Errors and retries
//!
//! Return [`HandlerError::retryable`] for transient failures (retried with the
//! manifest's backoff, dead-lettered after the last attempt),
//! [`HandlerError::retry_after`] to choose the delay yourself, and
//! [`HandlerError::permanent`] for events that can never succeed
//! (dead-lettered at once). A panic traps the component, which Weir treats
//! like a retryable error.
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

/// One message from the broker. Bytes are passed through untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    inner: wit::Event,
}

impl Event {
    /// Builds an event, e.g. for unit-testing a handler natively: no key, no
    /// headers, partition 0, offset 0, attempt 1, no timestamp, and the id
    /// Weir gives events without an id header, `<topic>/0/0`.
    ///
    /// ```
    /// use weir_sdk::Event;
    ///
    /// let event = Event::new("orders", br#"{"id": 1}"#.to_vec())
    ///     .with_key("customer-7")
    ///     .with_header("ce_type", "OrderPlaced")
    ///     .with_position(3, 42)
    ///     .with_attempt(2);
    /// assert_eq!(event.id(), "orders/3/42");
    /// assert_eq!(event.header_str("ce_type"), Some("OrderPlaced"));
    /// ```
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

    /// Sets partition and offset (builder style, for tests), and the id to
    /// `<topic>/<partition>/<offset>` as Weir does without an id header; call
    /// [`with_id`](Self::with_id) afterwards to choose another id.
    pub fn with_position(mut self, partition: i32, offset: i64) -> Self {
        self.inner.partition = partition;
        self.inner.offset = offset;
        self.inner.id = format!("{}/{partition}/{offset}", self.inner.topic);
        self
    }

    /// Sets the event id (builder style, for tests).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.inner.id = id.into();
        self
    }

    /// Sets the timestamp in milliseconds since the Unix epoch (builder
    /// style, for tests).
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.inner.timestamp_ms = Some(timestamp_ms);
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

    /// Takes the payload out of the event without copying it.
    pub fn into_payload(self) -> Vec<u8> {
        self.inner.payload
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
///     "offset" => event.offset(),
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
    fn builders_set_every_field() {
        let e = Event::new("orders", b"x".to_vec())
            .with_position(2, 40)
            .with_timestamp_ms(1_700_000_000_000)
            .with_attempt(3);
        assert_eq!(e.id(), "orders/2/40");
        assert_eq!((e.partition(), e.offset()), (2, 40));
        assert_eq!(e.timestamp_ms(), Some(1_700_000_000_000));
        assert_eq!(e.attempt(), 3);
        assert_eq!(e.headers(), &[]);
        assert_eq!(e.key(), None);
        let e = e.with_id("ce-1");
        assert_eq!(e.id(), "ce-1");
        assert_eq!(e.text(), Ok("x"));
        assert_eq!(e.into_payload(), b"x".to_vec());
        let binary = Event::new("t", vec![0xff]);
        assert!(matches!(binary.text(), Err(HandlerError::Permanent(m)) if m.contains("UTF-8")));
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
