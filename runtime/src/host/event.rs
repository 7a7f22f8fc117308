//! The event handed to a handler, as the host holds it: one shape for every
//! contract version, converted to the version a component was built for
//! when it is called.

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
}

impl Event {
    /// Where the event came from, for tagging log records.
    pub(crate) fn origin(&self) -> Origin {
        Origin {
            topic: self.topic.clone(),
            position: self.position.clone(),
        }
    }
}

/// Where the event being handled came from: its topic (or subject) and
/// position, which its handler's log records are tagged with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// Topic or subject.
    pub(crate) topic: String,
    /// Position in the broker.
    pub(crate) position: Position,
}
