//! Brokers Weir consumes from, behind one broker-neutral seam.
//!
//! A source knows nothing of Wasm or of the pipeline. It yields
//! [`Message`]s, each with an opaque *delivery* — the source's own record of
//! that message (Kafka: partition generation and offset; JetStream: the ack
//! handle) — and is told each message's final outcome ([`Settled`]). It turns
//! outcomes into its broker's acknowledgement:
//!
//! | broker | done / dead-lettered | released | no longer ours |
//! | --- | --- | --- | --- |
//! | Kafka | contiguous watermark per partition, stored for commit | not stored: the watermark stays below it | the partition was revoked (generation changed) |
//! | NATS JetStream | `ack` | `nak` (redelivered now) | the source stopped |
//! | RabbitMQ | `basic.ack` | `basic.nack` with requeue | the channel closed |
//! | Redis Streams | `XACK` | left pending (reclaimed) | another consumer claimed it |
//! | Amazon SQS | `DeleteMessage` | visibility set to 0 | the receipt expired |
//!
//! # Invariants a source keeps
//!
//! - **Acknowledge only what was settled.** Nothing is acknowledged to the
//!   broker unless the pipeline settled it `Done` or `DeadLettered` — which
//!   it does only once the outcome is durable (see `pipeline`). A log-shaped
//!   broker acknowledges a position only when every message below it is
//!   settled.
//! - **Never on someone else's behalf.** Once [`Source::owns`] returns
//!   `false` for a delivery it never returns `true` again, and settling it
//!   acknowledges nothing.
//! - **Hold what is held.** A message the pipeline holds (running, waiting
//!   for a retry, queued behind its key) is not redelivered by the broker
//!   underneath it: JetStream's ack wait is extended while it is held, a
//!   Redis entry's idle time is reset, an SQS message's visibility is
//!   extended; Kafka keeps a partition with its member and RabbitMQ an
//!   unacknowledged delivery with its channel.
//!
//! # Backpressure
//!
//! The pipeline holds at most `max_in_flight` messages; when it is full it
//! stops calling [`Source::recv`] and nothing is thrown away. Each source
//! bounds what it fetches ahead in its own way: librdkafka's per-partition
//! queue (`queued.max.messages.kbytes`), JetStream's `max_ack_pending` (set to
//! `max_in_flight`, so the server never hands out more than the pipeline may
//! hold), RabbitMQ's prefetch (`basic.qos` = `max_in_flight`), and Redis and
//! SQS reading only as many as there is room for.
//!
//! # Publishing
//!
//! Dead letters and the outbox go through a [`Publisher`]: a Kafka topic, a
//! JetStream subject, a RabbitMQ exchange and routing key, a Redis stream,
//! an SQS queue.

mod broker;
pub mod embedded;
pub mod kafka;
mod kind;
pub mod nats;
pub mod packed;
pub mod progress;
pub mod rabbitmq;
pub mod redis;
pub mod sqs;

use std::future::Future;

pub use crate::message::{Message, Position};
pub use broker::{Broker, NoArchive};
pub(crate) use broker::{no_archive, no_rewind};
pub use kind::BrokerKind;

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest retained message: nothing produced before the handler was
    /// deployed is skipped.
    #[default]
    Earliest,
    /// Only messages produced after the group first joins.
    Latest,
}

impl StartFrom {
    /// The librdkafka `auto.offset.reset` value.
    pub fn as_offset_reset(self) -> &'static str {
        match self {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        }
    }
}

/// What one handler's consumer consumes, for the brokers whose consumer
/// takes no more than this and its own manifest table (`S`).
#[derive(Debug, Clone)]
pub struct Subscription<S> {
    /// The handler's name.
    pub handler: String,
    /// Its consumer group (`group` in the manifest, `weir.<name>`).
    pub group: String,
    /// Topics (queues, streams) it consumes.
    pub topics: Vec<String>,
    /// Where a new consumer group starts (where the broker has positions).
    pub start: StartFrom,
    /// Most messages held at once: the bound on what the source fetches
    /// ahead.
    pub max_in_flight: usize,
    /// Where the consumer's progress is reported (see [`progress`]).
    pub progress: progress::Progress,
    /// The manifest's table for this broker (defaults when absent).
    pub settings: S,
}

/// A message's final outcome, as the pipeline reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Handled (or found to be a duplicate), and the outcome is durable.
    Done,
    /// Dead-lettered: the broker acknowledged the dead letter and the
    /// outcome is durable.
    DeadLettered,
    /// Not finished here (shutdown, or this process gave up on it): the
    /// broker should deliver it again, to this process or another.
    Released,
}

/// A consumer of one handler's topics.
pub trait Source: Send + Sync + 'static {
    /// The source's record of one delivered message; opaque to the
    /// pipeline.
    type Delivery: Send + Sync + 'static;

    /// The next message. Cancel-safe: dropping the future loses nothing.
    ///
    /// # Errors
    ///
    /// A consumer error in words (the broker being down, for example); the
    /// source keeps reconnecting, and the caller simply calls again.
    fn recv(&self) -> impl Future<Output = Result<(Message, Self::Delivery), String>> + Send;

    /// Whether the delivery is still this consumer's to work on. When it
    /// returns `false` the broker has given the message (or will give it)
    /// to another consumer: the pipeline stops working on it and produces
    /// nothing on its behalf.
    fn owns(&self, delivery: &Self::Delivery) -> bool;

    /// The message's outcome is final: acknowledge it (`Done`,
    /// `DeadLettered`) or let the broker deliver it again (`Released`).
    /// Called exactly once per delivery.
    fn settle(&self, delivery: &Self::Delivery, outcome: Settled);

    /// Commits what was acknowledged and leaves. Messages delivered but
    /// never settled are redelivered by the broker.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// A topic read from its start and trimmed: what the dead-letter tools
/// (`weir dlq`) need, apart from any consumer group. A message read this
/// way is never acknowledged; nothing here moves a consumer's position.
pub trait Archive: Send + Sync + 'static {
    /// Every message `topic` holds now, in order within each partition
    /// (`[]` when the topic does not exist).
    ///
    /// # Errors
    ///
    /// When the broker cannot be read.
    fn read_all(&self, topic: &str) -> impl Future<Output = anyhow::Result<Vec<Message>>> + Send;

    /// Removes the messages at `selected` from `topic`, as far as the
    /// broker allows, given everything `read` from it (as
    /// [`read_all`](Archive::read_all) returned it). Kafka can only remove
    /// a partition's oldest records: per partition, the selected ones before
    /// the first one that is not selected. JetStream removes each one.
    /// Returns how many were removed.
    ///
    /// # Errors
    ///
    /// When the broker refuses.
    fn remove(
        &self,
        topic: &str,
        selected: &[Position],
        read: &[Position],
    ) -> impl Future<Output = anyhow::Result<usize>> + Send;

    /// How many messages `topic` holds, and when the oldest was written
    /// (milliseconds since the Unix epoch), without reading them all.
    ///
    /// # Errors
    ///
    /// When the broker cannot be asked.
    fn depth(&self, topic: &str) -> impl Future<Output = anyhow::Result<Depth>> + Send;
}

/// Where a rewound consumer starts again (`weir rewind --from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewind {
    /// The oldest message each partition (subject) still holds.
    Earliest,
    /// The first message written at or after this time.
    Time(std::time::SystemTime),
    /// This offset in every partition (Kafka), this stream sequence
    /// (JetStream).
    Offset(i64),
}

impl Rewind {
    /// Parses `--from`: `earliest`, an RFC 3339 time, or an offset (Kafka) /
    /// stream sequence (JetStream).
    ///
    /// # Errors
    ///
    /// When it is none of these.
    pub fn parse(text: &str) -> Result<Rewind, String> {
        if text == "earliest" {
            return Ok(Rewind::Earliest);
        }
        if let Ok(offset) = text.parse::<i64>() {
            if offset < 0 {
                return Err(format!("--from {text}: an offset is 0 or more"));
            }
            return Ok(Rewind::Offset(offset));
        }
        humantime::parse_rfc3339_weak(text)
            .map(Rewind::Time)
            .map_err(|_| {
                format!(
                    "--from {text:?}: write `earliest`, a time like 2026-11-26T10:00:00Z, or an offset"
                )
            })
    }
}

/// The size of a topic, as [`Archive::depth`] reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Messages held.
    pub messages: u64,
    /// When the oldest was written, if any is held and its time is known.
    pub oldest_ms: Option<i64>,
}

/// A publish the broker refuses for good: the record is larger than it
/// takes (Kafka's `message.max.bytes`, RabbitMQ's `max_message_size`,
/// NATS's `max_payload`, SQS's 256 KiB), its destination's name is not
/// one it accepts (an invalid Kafka topic, an AMQP name over 255 bytes),
/// or its destination is not something it publishes to (a Redis key that
/// holds no stream). Sending the
/// same record again cannot succeed, so a [`Publisher`] returns this
/// (inside its `anyhow::Error`) for such refusals and every other error is
/// taken as passing; callers stop retrying a refused record (see
/// [`refusal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the broker refuses it for good: {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// Whether `err` is a refusal for good ([`Refused`]), and why.
pub fn refusal(err: &anyhow::Error) -> Option<&Refused> {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<Refused>())
}

/// Where the broker put a published record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Kafka: the partition; brokers without partitions: `0`.
    pub partition: i32,
    /// Kafka: the offset; JetStream: the stream sequence.
    pub offset: i64,
}

/// Somewhere records can be published: dead letters and emitted events.
pub trait Publisher: Send + Sync + 'static {
    /// Writes one record to `topic` (a Kafka topic, a JetStream subject)
    /// and returns once the broker acknowledged it durably, with where it
    /// put it.
    ///
    /// Records are handed to the broker in the order their futures are
    /// first polled, so polling several together (as the outbox relay does)
    /// keeps their order.
    ///
    /// `id` identifies the record across republications (an emitted
    /// event's deterministic id, a dead letter's handler and event id): a
    /// broker that deduplicates publications uses it (JetStream: as
    /// `Nats-Msg-Id`).
    ///
    /// # Errors
    ///
    /// When the broker did not acknowledge the record in time, or
    /// [`Refused`] when it refuses the record for good.
    fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
        id: Option<&str>,
    ) -> impl Future<Output = anyhow::Result<Receipt>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewind_is_earliest_a_time_or_an_offset() {
        assert_eq!(Rewind::parse("earliest"), Ok(Rewind::Earliest));
        assert_eq!(Rewind::parse("42"), Ok(Rewind::Offset(42)));
        assert!(matches!(
            Rewind::parse("2026-11-26T10:00:00Z"),
            Ok(Rewind::Time(_))
        ));
        assert!(Rewind::parse("-1").is_err());
        assert!(Rewind::parse("yesterday").is_err());
    }
}
