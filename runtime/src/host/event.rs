//! The event handed to a handler, as the host holds it: one shape for every
//! contract version, converted to the version a component was built for
//! when it is called.

use std::sync::Arc;

use crate::message::Position;

/// One message as a handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Stable identity, used for deduplication.
    pub id: String,
    /// Topic (or subject) it was consumed from.
    pub topic: String,
    /// Message key, if any. Not necessarily UTF-8.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Vec<u8>,
    /// Headers in broker order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Milliseconds since the Unix epoch, if the message carries one.
    pub timestamp_ms: Option<i64>,
    /// Where the message sits in its broker.
    pub position: Position,
    /// 1 on the first call, 2 on the first retry, and so on.
    pub attempt: u32,
    /// The business flow the event belongs to, as its producer named it
    /// (a `correlation_id` or `ce_correlationid` header, or a JSON
    /// envelope's `metadata.correlation_id`); tags the log records of its
    /// handling and travels to what that handling produces.
    pub correlation_id: Option<String>,
}

impl Event {
    /// Where the event came from, for tagging log records.
    pub(crate) fn origin(&self) -> Arc<Origin> {
        Arc::new(Origin {
            topic: self.topic.clone(),
            position: self.position.clone(),
            event_id: self.id.clone(),
            correlation_id: self.correlation_id.clone(),
            traceparent: self
                .headers
                .iter()
                .find(|(name, _)| name == "traceparent")
                .and_then(|(_, value)| std::str::from_utf8(value).ok())
                .map(str::to_string),
        })
    }
}

/// The event being handled, as its handler's log records are tagged: where
/// it came from (topic or subject, and position), its id, and the flow it
/// belongs to (correlation id, W3C `traceparent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// Topic or subject.
    pub(crate) topic: String,
    /// Position in the broker.
    pub(crate) position: Position,
    /// The event's id.
    pub(crate) event_id: String,
    /// See [`Event::correlation_id`].
    pub(crate) correlation_id: Option<String>,
    /// The event's `traceparent` header, when it is UTF-8.
    pub(crate) traceparent: Option<String>,
}
