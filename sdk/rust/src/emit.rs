//! Events sent to the broker through Weir's transactional outbox.
//!
//! An emitted event is stored with the handler's state writes and published
//! only if `handle` returns `Ok`, after the transaction is durable. Each
//! carries an `event_id` header that is the same on every publication
//! (derived from the handled event's id, the handler and the emit's
//! position), so a consumer that deduplicates by it sees each event once.
//!
//! ```
//! use weir_sdk::emit;
//!
//! # fn main() -> Result<(), weir_sdk::HandlerError> {
//! emit::to("payments")
//!     .key("order-17")
//!     .header("ce_type", "PaymentCaptured")
//!     .json(&serde_json::json!({"order_id": "order-17", "amount_cents": 1200}))?
//!     .send()?;
//! let sent = emit::take_sent();
//! assert_eq!(sent[0].topic, "payments");
//! # Ok(())
//! # }
//! ```
//!
//! Natively (in `cargo test`) events are kept per thread: [`take_sent`]
//! returns them.

use std::fmt;

use serde::Serialize;

use crate::{Category, HandlerError};

/// Largest event (key, payload and headers), in bytes.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Why an event could not be emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmitError {
    /// Not a valid topic name; says why.
    InvalidTopic(String),
    /// The event is larger than the limit (bytes).
    TooLarge(u32),
    /// The call already emitted the most events allowed.
    TooMany(u32),
    /// The call's writes and emitted events exceed the limit (bytes).
    TransactionTooLarge(u32),
    /// The payload could not be serialized.
    Serialize(String),
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidTopic(m) => write!(f, "invalid topic: {m}"),
            Self::TooLarge(n) => write!(f, "emitted event larger than {n} bytes"),
            Self::TooMany(n) => write!(f, "more than {n} events emitted in one call"),
            Self::TransactionTooLarge(n) => {
                write!(f, "writes and emitted events exceed {n} bytes in one call")
            }
            Self::Serialize(m) => write!(f, "cannot serialize the payload: {m}"),
        }
    }
}

impl std::error::Error for EmitError {}

/// A bad topic or an oversized event never succeeds on retry: permanent,
/// category `internal` (the handler's own doing).
impl From<EmitError> for HandlerError {
    fn from(err: EmitError) -> Self {
        HandlerError::permanent(err.to_string()).category(Category::Internal)
    }
}

/// An event to emit: build it with [`to`], then [`send`](Outgoing::send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Destination topic.
    pub topic: String,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Vec<u8>,
    /// Headers (Weir adds `event_id`, `weir.source-event-id` and
    /// `weir.handler`).
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Starts an event for `topic`, with no key, an empty payload and no headers.
pub fn to(topic: impl Into<String>) -> Outgoing {
    Outgoing {
        topic: topic.into(),
        key: None,
        payload: Vec::new(),
        headers: Vec::new(),
    }
}

impl Outgoing {
    /// Sets the key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the payload bytes.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Sets the payload to `value` as JSON.
    ///
    /// # Errors
    ///
    /// When `value` cannot be serialized.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, EmitError> {
        self.payload =
            serde_json::to_vec(value).map_err(|e| EmitError::Serialize(e.to_string()))?;
        Ok(self)
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Stores the event in the outbox, to be published if `handle`
    /// succeeds.
    ///
    /// # Errors
    ///
    /// An invalid topic, an oversized event, or too many events.
    pub fn send(self) -> Result<(), EmitError> {
        send(
            &self.topic,
            self.key.as_deref(),
            &self.payload,
            &self.headers,
        )
    }
}

/// Stores an event for `topic`, to be published if `handle` succeeds.
///
/// # Errors
///
/// An invalid topic, an oversized event, or too many events.
pub fn send(
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: &[(String, Vec<u8>)],
) -> Result<(), EmitError> {
    backend::send(topic, key, payload, headers)
}

/// Takes the events emitted so far on this thread (native builds, for unit
/// tests; always empty in a component).
pub fn take_sent() -> Vec<Outgoing> {
    backend::take()
}

#[cfg(target_arch = "wasm32")]
mod backend {
    use super::{EmitError, Outgoing};
    use crate::bindings::weir::handler::emit as wit;

    pub(super) fn send(
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> Result<(), EmitError> {
        wit::send(topic, key, payload, headers).map_err(|err| match err {
            wit::EmitError::InvalidTopic(m) => EmitError::InvalidTopic(m),
            wit::EmitError::TooLarge(n) => EmitError::TooLarge(n),
            wit::EmitError::TooMany(n) => EmitError::TooMany(n),
            wit::EmitError::TransactionTooLarge(n) => EmitError::TransactionTooLarge(n),
        })
    }

    pub(super) fn take() -> Vec<Outgoing> {
        Vec::new()
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod backend {
    use std::cell::RefCell;

    use super::{EmitError, MAX_EVENT_BYTES, Outgoing};

    thread_local! {
        static SENT: RefCell<Vec<Outgoing>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn send(
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> Result<(), EmitError> {
        let valid = !topic.is_empty()
            && topic.len() <= 249
            && topic != "."
            && topic != ".."
            && topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            return Err(EmitError::InvalidTopic(format!(
                "{topic:?}: use 1-249 ASCII letters, digits, '.', '_' and '-'"
            )));
        }
        let size = key.map_or(0, <[u8]>::len)
            + payload.len()
            + headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>();
        if size > MAX_EVENT_BYTES {
            return Err(EmitError::TooLarge(MAX_EVENT_BYTES as u32));
        }
        SENT.with(|s| {
            s.borrow_mut().push(Outgoing {
                topic: topic.to_string(),
                key: key.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                headers: headers.to_vec(),
            })
        });
        Ok(())
    }

    pub(super) fn take() -> Vec<Outgoing> {
        SENT.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }
}
