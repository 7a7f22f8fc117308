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
    /// A RabbitMQ delivery: a queue has no positions, so these are the
    /// delivery's properties.
    Rabbit {
        /// The exchange it was published to (empty: the default exchange).
        exchange: String,
        /// The routing key it was published with.
        routing_key: String,
        /// The delivery tag: this delivery on its channel only.
        delivery_tag: u64,
        /// Whether the broker delivered it before without an
        /// acknowledgement.
        redelivered: bool,
        /// The `message_id` property, if the publisher set one: the only
        /// identity a queued message keeps across redeliveries.
        message_id: Option<String>,
    },
    /// A Redis Streams entry.
    Redis {
        /// The stream's key.
        stream: String,
        /// The entry ID, `<ms>-<seq>`.
        entry_id: String,
    },
    /// An Amazon SQS message: its id and how often it was received.
    Sqs {
        /// The queue's URL.
        queue: String,
        /// The id SQS assigned when the message was sent.
        message_id: String,
        /// `ApproximateReceiveCount`, this receipt included.
        receive_count: u32,
        /// FIFO queues: the sequence number within the message group.
        sequence_number: Option<String>,
    },
}

impl Position {
    /// The broker's name as operators write it: `kafka`, `nats`.
    pub fn broker(&self) -> &'static str {
        match self {
            Position::Kafka { .. } => "kafka",
            Position::JetStream { .. } => "nats",
            Position::Rabbit { .. } => "rabbitmq",
            Position::Redis { .. } => "redis",
            Position::Sqs { .. } => "sqs",
        }
    }

    /// An id for a message that carries none: unique within the broker for
    /// as long as the message is retained (`<topic>/<partition>/<offset>`,
    /// `<stream>/<sequence>`, `<stream>/<entry-id>`, `<queue>/<message-id>`;
    /// RabbitMQ: the `message_id` property as it is).
    /// A RabbitMQ message has an identity only if its publisher gave it a
    /// `message_id`; without one, `<queue>/<exchange>/<routing key>/<delivery
    /// tag>` names this delivery only, so a redelivery is not recognised as
    /// a duplicate (`source/rabbitmq` says so to the operator).
    pub fn fallback_id(&self, topic: &str) -> String {
        match self {
            Position::Kafka { partition, offset } => format!("{topic}/{partition}/{offset}"),
            Position::JetStream {
                stream, sequence, ..
            } => format!("{stream}/{sequence}"),
            Position::Rabbit {
                message_id: Some(id),
                ..
            } => id.clone(),
            Position::Rabbit {
                exchange,
                routing_key,
                delivery_tag,
                ..
            } => format!("{topic}/{exchange}/{routing_key}/{delivery_tag}"),
            Position::Redis { stream, entry_id } => format!("{stream}/{entry_id}"),
            Position::Sqs { message_id, .. } => format!("{topic}/{message_id}"),
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
            Position::Rabbit {
                exchange,
                routing_key,
                message_id,
                ..
            } => {
                let mut headers = vec![
                    ("weir.origin.exchange", exchange.clone()),
                    ("weir.origin.routing_key", routing_key.clone()),
                ];
                if let Some(id) = message_id {
                    headers.push(("weir.origin.message_id", id.clone()));
                }
                headers
            }
            Position::Redis { stream, entry_id } => vec![
                ("weir.origin.stream", stream.clone()),
                ("weir.origin.entry_id", entry_id.clone()),
            ],
            Position::Sqs {
                queue, message_id, ..
            } => vec![
                ("weir.origin.queue_url", queue.clone()),
                ("weir.origin.message_id", message_id.clone()),
            ],
        }
    }
}

impl std::fmt::Display for Position {
    /// `2@41`, `orders#7`, `orders:1526919030474-55`, `orders/<message id>`:
    /// for log lines.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Kafka { partition, offset } => write!(f, "{partition}@{offset}"),
            Position::JetStream {
                stream, sequence, ..
            } => write!(f, "{stream}#{sequence}"),
            Position::Rabbit {
                routing_key,
                delivery_tag,
                ..
            } => write!(f, "{routing_key}~{delivery_tag}"),
            Position::Redis { stream, entry_id } => write!(f, "{stream}:{entry_id}"),
            Position::Sqs { message_id, .. } => write!(f, "{message_id}"),
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
