//! Brokers Weir consumes from. A source knows nothing of Wasm: it yields
//! [`Message`]s and takes acknowledgements ("everything below this offset is
//! done") that it turns into committed positions.

pub mod embedded;
pub mod kafka;

use std::future::Future;

/// What the pipeline needs from a broker consumer.
///
/// Ownership of partitions is reported to the [`Ledger`](crate::pipeline::offsets::Ledger)
/// the source was created with: `assign` before any message of a partition
/// is returned, `revoke` (committing the returned watermark) before the
/// partition is released.
pub trait Source: Send + Sync + 'static {
    /// The next message. Cancel-safe: dropping the future loses nothing.
    fn recv(&self) -> impl Future<Output = Result<Message, String>> + Send;
    /// Everything of `topic`/`partition` below `next_offset` is finished.
    fn ack(&self, topic: &str, partition: i32, next_offset: i64);
    /// Stop delivering messages of this partition (backpressure).
    fn pause(&self, topic: &str, partition: i32);
    /// Deliver messages of this partition again.
    fn resume(&self, topic: &str, partition: i32);
    /// Commit what was acknowledged and leave.
    fn close(self);
}

/// One consumed message, owned, with bytes untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic it was consumed from.
    pub topic: String,
    /// Partition within the topic.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Key bytes, if any.
    pub key: Option<Vec<u8>>,
    /// Value bytes (empty for a tombstone).
    pub payload: Vec<u8>,
    /// Headers in broker order; a header without a value has empty bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Timestamp in milliseconds since the Unix epoch, if known.
    pub timestamp_ms: Option<i64>,
}

impl Message {
    /// The first header called `name`, if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}
