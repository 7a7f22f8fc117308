//! What a broker delivers, in terms every broker shares.
//!
//! A [`Message`] is produced by a source and read by the pipeline; its
//! [`Position`] travels on into the event a handler sees. Neither knows a
//! broker's client library, so the sources, the pipeline and the host all
//! depend on this module and on nothing of each other.

/// Where a message sits in its broker, in that broker's own terms. A broker
/// that has no partitions or offsets gets no fake ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// A Kafka record: partition and offset.
    Kafka {
        /// Partition within the topic.
        partition: i32,
        /// Offset within the partition.
        offset: i64,
    },
    /// A NATS JetStream message: the stream holding it and its sequence
    /// there, and how often the server has delivered it.
    JetStream {
        /// Stream name.
        stream: String,
        /// Stream sequence number (unique within the stream).
        sequence: u64,
        /// Deliveries so far, this one included (1 on the first).
        delivered: u64,
    },
}

impl Position {
    /// The broker's name as operators write it: `kafka`, `nats`.
    pub fn broker(&self) -> &'static str {
        match self {
            Position::Kafka { .. } => "kafka",
            Position::JetStream { .. } => "nats",
        }
    }

    /// An id for a message that carries none: unique within the broker for
    /// as long as the message is retained (`<topic>/<partition>/<offset>`,
    /// `<stream>/<sequence>`).
    pub fn fallback_id(&self, topic: &str) -> String {
        match self {
            Position::Kafka { partition, offset } => format!("{topic}/{partition}/{offset}"),
            Position::JetStream {
                stream, sequence, ..
            } => format!("{stream}/{sequence}"),
        }
    }

    /// The position as dead-letter headers (`weir.origin.*`), after
    /// `weir.origin.topic`.
    pub fn origin_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Position::Kafka { partition, offset } => vec![
                ("weir.origin.partition", partition.to_string()),
                ("weir.origin.offset", offset.to_string()),
            ],
            Position::JetStream {
                stream, sequence, ..
            } => vec![
                ("weir.origin.stream", stream.clone()),
                ("weir.origin.sequence", sequence.to_string()),
            ],
        }
    }
}

impl std::fmt::Display for Position {
    /// `partition 2 offset 41`, `stream orders seq 7`: for log lines.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Kafka { partition, offset } => write!(f, "{partition}@{offset}"),
            Position::JetStream {
                stream, sequence, ..
            } => write!(f, "{stream}#{sequence}"),
        }
    }
}

/// One consumed message, owned, with bytes untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Where it was consumed from: a Kafka topic, a NATS subject.
    pub topic: String,
    /// Its key: the Kafka record key; for brokers without keys, what the
    /// source documents (NATS: the `ce-partitionkey` header, else the
    /// subject). Not necessarily UTF-8.
    pub key: Option<Vec<u8>>,
    /// Value bytes (empty for a tombstone).
    pub payload: Vec<u8>,
    /// Headers in broker order; a header without a value has empty bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Timestamp in milliseconds since the Unix epoch, if known.
    pub timestamp_ms: Option<i64>,
    /// Where it sits in the broker.
    pub position: Position,
    /// Messages keep their order only within one scope (a Kafka partition;
    /// a JetStream consumer): keys of different scopes never share a lane.
    /// Chosen by the source; the pipeline only compares it.
    pub scope: u64,
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
