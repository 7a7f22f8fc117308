//! One face for every broker Weir consumes from, so that a delivery test is
//! written once and run against each (`tests/tests/conformance.rs`).
//!
//! A [`TestBroker`] is a running broker process plus an independent client
//! for it: it writes a `weir.toml` pointing at itself, produces records,
//! reads what Weir wrote (dead letters, emitted events), and says whether a
//! consumer group has acknowledged everything produced.
//!
//! | | Kafka (tansu, kafka-python) | NATS JetStream (nats-server, nats-py) |
//! |---|---|---|
//! | topic | topic | subject; its stream is [`stream_name`]`(topic)` |
//! | record key | record key | header `ce-partitionkey` (UTF-8 only) |
//! | partition | honoured | ignored: one stream, one sequence |
//! | position | partition, offset | stream, sequence |
//! | group | consumer group | durable consumer [`nats_durable`]`(group, topic, 1)` |
//! | caught up | committed offsets = end offsets | nothing pending, nothing unacknowledged, ack floor at the last sequence |

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::nats::{NatsMessage, NatsServer, NatsTool, Stream, nats_durable, stream_name};
use crate::{Broker, Deployment, KafkaTool, Record, unhex};

/// The NATS header that carries a message's key (CloudEvents' partitioning
/// extension), which Weir gives the handler as the event key.
pub const NATS_KEY_HEADER: &str = "ce-partitionkey";

/// How long one read of a topic may wait for records.
const READ_WAIT: Duration = Duration::from_secs(2);

/// Most records one [`TestBroker::read`] returns.
const READ_MAX: usize = 100_000;

/// The brokers the conformance suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// A Kafka-protocol broker: tansu.
    Kafka,
    /// NATS with JetStream: nats-server.
    Nats,
    /// RabbitMQ: rabbitmq-server.
    Rabbit,
    /// Redis Streams: redis-server.
    Redis,
    /// Amazon SQS: moto's server mode.
    Sqs,
}

impl BrokerKind {
    /// Starts a broker of this kind, with its client.
    ///
    /// # Errors
    ///
    /// When the broker or the client is not installed, or the broker does
    /// not become ready.
    pub fn start(self) -> Result<Box<dyn TestBroker>> {
        Ok(match self {
            BrokerKind::Kafka => Box::new(KafkaBroker::start()?),
            BrokerKind::Nats => Box::new(NatsBroker::start()?),
            BrokerKind::Rabbit => Box::new(crate::rabbitmq::RabbitBroker::start()?),
            BrokerKind::Redis => Box::new(crate::redis::RedisBroker::start()?),
            BrokerKind::Sqs => Box::new(crate::sqs::SqsBroker::start()?),
        })
    }

    /// `kafka` or `nats`, as in the test names.
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "kafka",
            BrokerKind::Nats => "nats",
            BrokerKind::Rabbit => "rabbitmq",
            BrokerKind::Redis => "redis",
            BrokerKind::Sqs => "sqs",
        }
    }
}

/// Where a produced or stored record sits, in its broker's own terms.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Position {
    /// A Kafka record.
    Kafka {
        /// Partition.
        partition: i32,
        /// Offset within the partition.
        offset: i64,
    },
    /// A JetStream message.
    JetStream {
        /// Stream name.
        stream: String,
        /// Sequence within the stream.
        sequence: u64,
    },
    /// A RabbitMQ message, published to the default exchange with the
    /// queue as routing key: a queue has no positions, so the message is
    /// known by the `message_id` the client gave it.
    Rabbit {
        /// The queue (the routing key it was published with).
        queue: String,
        /// Its `message_id` property.
        message_id: String,
    },
    /// A Redis Streams entry.
    Redis {
        /// The stream's key.
        stream: String,
        /// The entry ID, `<ms>-<seq>`.
        entry_id: String,
    },
    /// An SQS message.
    Sqs {
        /// The queue's URL.
        queue_url: String,
        /// The id SQS gave it.
        message_id: String,
    },
}

impl Position {
    /// The headers a dead letter of the record at this position carries
    /// besides `weir.origin.topic`: `weir.origin.partition` and
    /// `weir.origin.offset` (Kafka), `weir.origin.stream` and
    /// `weir.origin.sequence` (JetStream).
    pub fn origin_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Position::Kafka { partition, offset } => vec![
                ("weir.origin.partition", partition.to_string()),
                ("weir.origin.offset", offset.to_string()),
            ],
            Position::JetStream { stream, sequence } => vec![
                ("weir.origin.stream", stream.clone()),
                ("weir.origin.sequence", sequence.to_string()),
            ],
            Position::Rabbit { queue, message_id } => vec![
                ("weir.origin.exchange", String::new()),
                ("weir.origin.routing_key", queue.clone()),
                ("weir.origin.message_id", message_id.clone()),
            ],
            Position::Redis { stream, entry_id } => vec![
                ("weir.origin.stream", stream.clone()),
                ("weir.origin.entry_id", entry_id.clone()),
            ],
            Position::Sqs {
                queue_url,
                message_id,
            } => vec![
                ("weir.origin.queue_url", queue_url.clone()),
                ("weir.origin.message_id", message_id.clone()),
            ],
        }
    }

    /// The `partition` and `offset` a handler of contract 0.1.0 sees for
    /// this record (`wit/README.md`): a JetStream message has partition 0
    /// and its stream sequence as offset, a Redis entry the milliseconds of
    /// its ID. `None` where the offset is not known when the message is
    /// produced (RabbitMQ: the delivery tag; SQS: the receive count).
    pub fn partition_offset(&self) -> (i64, Option<i64>) {
        match self {
            Position::Kafka { partition, offset } => (i64::from(*partition), Some(*offset)),
            Position::JetStream { sequence, .. } => {
                (0, Some(i64::try_from(*sequence).unwrap_or(i64::MAX)))
            }
            Position::Redis { entry_id, .. } => {
                (0, entry_id.split('-').next().and_then(|ms| ms.parse().ok()))
            }
            Position::Rabbit { .. } | Position::Sqs { .. } => (0, None),
        }
    }
}

/// A record read back from a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Topic (Kafka) or subject (NATS).
    pub topic: String,
    /// Kafka: the record key; NATS: the `ce-partitionkey` header.
    pub key: Option<Vec<u8>>,
    /// Payload.
    pub value: Vec<u8>,
    /// Headers, in broker order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Where it is stored.
    pub position: Position,
}

impl Stored {
    /// The UTF-8 value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
    }

    /// The key as text (lossy).
    pub fn key_text(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }
}

/// A running broker and an independent client for it: everything a
/// delivery test needs, the same for every broker.
pub trait TestBroker {
    /// Which broker this is.
    fn kind(&self) -> BrokerKind;

    /// A deployment whose `weir.toml` consumes from this broker, with an
    /// empty handlers directory.
    ///
    /// # Errors
    ///
    /// When files cannot be written.
    fn deployment(&self) -> Result<Deployment>;

    /// Makes `topic` ready to be produced to and consumed from before Weir
    /// starts (Kafka: creates it with `partitions`; NATS: creates stream
    /// [`stream_name`]`(topic)` capturing the subject `topic`, unless one
    /// exists).
    ///
    /// # Errors
    ///
    /// When the broker refuses.
    fn create_topic(&self, topic: &str, partitions: i32) -> Result<()>;

    /// Makes a topic that only Weir writes to (dead letters, emitted
    /// events) readable: Kafka creates it (tansu creates no topics on
    /// produce); NATS does nothing, since Weir creates the stream for a
    /// subject it publishes to when none captures it.
    ///
    /// # Errors
    ///
    /// When the broker refuses.
    fn create_output_topic(&self, topic: &str) -> Result<()>;

    /// Produces `records` to `topic` and waits for the broker to
    /// acknowledge each; returns their positions, in order.
    ///
    /// NATS: published to subject `topic`; the key goes in header
    /// `ce-partitionkey` (keys and header values must be UTF-8), the
    /// partition is ignored.
    ///
    /// # Errors
    ///
    /// When the broker does not acknowledge, or (NATS) a key or header is
    /// not UTF-8.
    fn produce(&self, topic: &str, records: &[Record]) -> Result<Vec<Position>>;

    /// Every record in `topic` so far (`[]` if it does not exist yet), in
    /// order within each partition (NATS: sequence order).
    ///
    /// # Errors
    ///
    /// When the broker cannot be read.
    fn read(&self, topic: &str) -> Result<Vec<Stored>>;

    /// Whether consumer group `group` (NATS: its durable consumer) has
    /// acknowledged every record of `topic`, the last of which are among
    /// `produced` (all of them, or at least the last of each partition).
    /// Only for a handler whose only topic is `topic`.
    ///
    /// # Errors
    ///
    /// When the broker cannot be asked.
    fn caught_up(&self, group: &str, topic: &str, produced: &[Position]) -> Result<bool>;

    /// What the broker knows of `group`'s progress on `topic`, for error
    /// messages.
    fn progress(&self, group: &str, topic: &str) -> String;

    /// The part of [`TestBroker::progress`] that changes only when
    /// `group`'s consumption of `topic` moves (positions delivered or
    /// acknowledged, messages pending), never while it idles: the measure
    /// for waits that fail on no progress ([`crate::poll_progress`]).
    fn progress_mark(&self, group: &str, topic: &str) -> String {
        self.progress(group, topic)
    }

    /// Adjusts `deployment` for tests that SIGKILL Weir, so that a
    /// restarted process gets the work back quickly (Kafka: a short session
    /// timeout, so the killed member leaves the group soon).
    ///
    /// # Errors
    ///
    /// When the configuration cannot be written.
    fn prepare_for_kills(&self, deployment: &Deployment) -> Result<()>;

    /// Manifest lines for a handler whose process is SIGKILLed, so that
    /// what the killed process held comes back soon (NATS: a short
    /// `[nats] ack_wait`, since the server redelivers an unacknowledged
    /// message only after it). Appended at the end of the manifest.
    fn manifest_for_kills(&self) -> &'static str;

    /// Whether handlers consuming one topic compete for its messages (a
    /// queue: RabbitMQ, SQS) instead of each getting all of them (a log:
    /// Kafka, JetStream, Redis Streams). Tests that run two handlers on the
    /// same messages give each its own topic there.
    fn competing_consumers(&self) -> bool {
        false
    }
}

/// tansu and kafka-python.
pub struct KafkaBroker {
    /// The broker process.
    pub broker: Broker,
    /// The client.
    pub kafka: KafkaTool,
}

impl KafkaBroker {
    /// Starts tansu and its client.
    ///
    /// # Errors
    ///
    /// When either is missing or tansu does not become ready.
    pub fn start() -> Result<Self> {
        let broker = Broker::start()?;
        let kafka = KafkaTool::new(&broker)?;
        Ok(Self { broker, kafka })
    }
}

impl TestBroker for KafkaBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Kafka
    }

    fn deployment(&self) -> Result<Deployment> {
        Deployment::new(&self.broker)
    }

    fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.kafka.create_topic(topic, partitions)
    }

    fn create_output_topic(&self, topic: &str) -> Result<()> {
        self.kafka.create_topic(topic, 1)
    }

    fn produce(&self, topic: &str, records: &[Record]) -> Result<Vec<Position>> {
        Ok(self
            .kafka
            .produce(topic, records)?
            .into_iter()
            .map(|(partition, offset)| Position::Kafka { partition, offset })
            .collect())
    }

    fn read(&self, topic: &str) -> Result<Vec<Stored>> {
        self.kafka
            .consume(topic, READ_MAX, READ_WAIT)?
            .iter()
            .map(|r| {
                Ok(Stored {
                    topic: topic.to_string(),
                    key: r["key_hex"].as_str().map(unhex).transpose()?,
                    value: unhex(r["value_hex"].as_str().unwrap_or_default())?,
                    headers: headers(r)?,
                    position: Position::Kafka {
                        partition: r["partition"]
                            .as_i64()
                            .and_then(|p| i32::try_from(p).ok())
                            .ok_or_else(|| anyhow!("no partition in {r}"))?,
                        offset: r["offset"]
                            .as_i64()
                            .ok_or_else(|| anyhow!("no offset in {r}"))?,
                    },
                })
            })
            .collect()
    }

    fn caught_up(&self, group: &str, topic: &str, produced: &[Position]) -> Result<bool> {
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        for position in produced {
            if let Position::Kafka { partition, offset } = position {
                let end = ends.entry(*partition).or_insert(0);
                *end = (*end).max(offset + 1);
            }
        }
        let committed = self.kafka.committed(group, topic)?;
        // Every partition with records is committed at its end; partitions
        // without any have nothing to commit.
        Ok(ends.keys().all(|p| committed.contains_key(p))
            && committed
                .iter()
                .all(|(p, offset)| *offset == ends.get(p).copied()))
    }

    fn progress(&self, group: &str, topic: &str) -> String {
        match self.kafka.committed(group, topic) {
            Ok(committed) => format!("committed offsets of {group} on {topic}: {committed:?}"),
            Err(err) => format!("cannot read the offsets of {group}: {err:#}"),
        }
    }

    fn prepare_for_kills(&self, deployment: &Deployment) -> Result<()> {
        // A killed member never says goodbye: let the broker notice quickly
        // so the restarted process gets the partitions without a long wait.
        deployment.append_config(
            "\n[source.kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
        )
    }

    fn manifest_for_kills(&self) -> &'static str {
        ""
    }
}

/// `[name, value_hex]` header pairs of a client record.
fn headers(record: &Value) -> Result<Vec<(String, Vec<u8>)>> {
    record["headers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|h| {
            let name = h[0].as_str().ok_or_else(|| anyhow!("bad header {h}"))?;
            let value = unhex(h[1].as_str().unwrap_or_default())?;
            Ok((name.to_string(), value))
        })
        .collect()
}

/// nats-server with JetStream, and nats-py.
pub struct NatsBroker {
    /// The server process.
    pub server: NatsServer,
    /// The client.
    pub nats: NatsTool,
}

impl NatsBroker {
    /// Starts nats-server and its client.
    ///
    /// # Errors
    ///
    /// When either is missing or the server does not become ready.
    pub fn start() -> Result<Self> {
        let server = NatsServer::start()?;
        let nats = NatsTool::new(&server)?;
        Ok(Self { server, nats })
    }

    /// A server speaking only TLS ([`NatsServer::start_tls`]) and a client
    /// trusting `certs`' CA.
    ///
    /// # Errors
    ///
    /// As [`NatsBroker::start`].
    pub fn start_tls(certs: &crate::tls::Certificates) -> Result<Self> {
        let server = NatsServer::start_tls(certs)?;
        let nats = NatsTool::for_tls(&server.url, &certs.ca)?;
        Ok(Self { server, nats })
    }

    /// The NATS message for `record`: key in `ce-partitionkey`, text
    /// headers; a record with a header no NATS client library sends (a
    /// value that is not UTF-8 or holds a line break or carriage return, a
    /// `hex:` name) gets its header block written byte for byte, as a raw
    /// protocol producer (or a Go one) can.
    fn message(record: &Record) -> Result<NatsMessage> {
        let mut headers = Vec::new();
        if let Some(key) = &record.key {
            let key = String::from_utf8(key.clone()).map_err(|_| {
                anyhow!("NATS carries keys in a text header: key {key:02x?} is not UTF-8")
            })?;
            headers.push((NATS_KEY_HEADER.to_string(), key.into_bytes()));
        }
        for (name, value) in &record.headers {
            if name == NATS_KEY_HEADER && record.key.is_some() {
                bail!("record has both a key and a {NATS_KEY_HEADER} header");
            }
            headers.push((name.clone(), value.clone()));
        }
        let raw = headers.iter().any(|(name, value)| {
            name.starts_with("hex:")
                || std::str::from_utf8(value).is_err()
                || value.contains(&b'\r')
                || value.contains(&b'\n')
        });
        if raw {
            let mut block = b"NATS/1.0\r\n".to_vec();
            for (name, value) in &headers {
                match name.strip_prefix("hex:") {
                    Some(hex) => block.extend(crate::unhex(hex)?),
                    None => block.extend_from_slice(name.as_bytes()),
                }
                block.extend_from_slice(b": ");
                block.extend_from_slice(value);
                block.extend_from_slice(b"\r\n");
            }
            block.extend_from_slice(b"\r\n");
            return Ok(NatsMessage {
                value: record.value.clone(),
                header_block: Some(block),
                ..NatsMessage::default()
            });
        }
        Ok(NatsMessage {
            subject: None,
            value: record.value.clone(),
            headers: headers
                .into_iter()
                .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
                .collect(),
            msg_id: None,
            header_block: None,
        })
    }
}

impl TestBroker for NatsBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Nats
    }

    fn deployment(&self) -> Result<Deployment> {
        Deployment::with_source(&format!("[source.nats]\nurl = \"{}\"\n", self.server.url))
    }

    fn create_topic(&self, topic: &str, _partitions: i32) -> Result<()> {
        self.nats
            .add_stream(&stream_name(topic), &[topic])
            .map(drop)
    }

    fn create_output_topic(&self, _topic: &str) -> Result<()> {
        Ok(())
    }

    fn produce(&self, topic: &str, records: &[Record]) -> Result<Vec<Position>> {
        let messages = records
            .iter()
            .map(Self::message)
            .collect::<Result<Vec<_>>>()?;
        Ok(self
            .nats
            .publish(topic, &messages)?
            .into_iter()
            .map(|(stream, sequence)| Position::JetStream { stream, sequence })
            .collect())
    }

    fn read(&self, topic: &str) -> Result<Vec<Stored>> {
        self.nats
            .read(Stream::Capturing(topic), READ_MAX, Duration::from_secs(30))?
            .iter()
            .map(|m| {
                let headers = headers(m)?;
                let key = headers
                    .iter()
                    .find(|(n, _)| n == NATS_KEY_HEADER)
                    .map(|(_, v)| v.clone());
                Ok(Stored {
                    topic: m["subject"].as_str().unwrap_or(topic).to_string(),
                    key,
                    value: unhex(m["value_hex"].as_str().unwrap_or_default())?,
                    headers,
                    position: Position::JetStream {
                        stream: m["stream"]
                            .as_str()
                            .ok_or_else(|| anyhow!("no stream in {m}"))?
                            .to_string(),
                        sequence: m["seq"].as_u64().ok_or_else(|| anyhow!("no seq in {m}"))?,
                    },
                })
            })
            .collect()
    }

    fn caught_up(&self, group: &str, topic: &str, produced: &[Position]) -> Result<bool> {
        let durable = nats_durable(group, topic, 1);
        let Some(consumer) = self
            .nats
            .consumer(Stream::Capturing(topic), &durable)
            .with_context(|| format!("consumer {durable} on {topic}"))?
        else {
            return Ok(false);
        };
        let last = produced
            .iter()
            .filter_map(|p| match p {
                Position::JetStream { stream, sequence } if *stream == consumer.stream => {
                    Some(*sequence)
                }
                _ => None,
            })
            .max()
            .unwrap_or(0);
        Ok(consumer.num_pending == 0
            && consumer.num_ack_pending == 0
            && consumer.ack_floor_stream_seq >= last)
    }

    fn progress(&self, group: &str, topic: &str) -> String {
        let durable = nats_durable(group, topic, 1);
        match self.nats.consumer(Stream::Capturing(topic), &durable) {
            Ok(Some(state)) => format!("durable consumer {durable}: {state:?}"),
            Ok(None) => format!(
                "no durable consumer {durable} on the stream capturing {topic}; streams: {:?}",
                self.nats.streams().ok()
            ),
            Err(err) => format!("cannot read durable consumer {durable}: {err:#}"),
        }
    }

    /// Without `num_waiting`: Weir's pull requests expire and are renewed
    /// while it idles.
    fn progress_mark(&self, group: &str, topic: &str) -> String {
        let durable = nats_durable(group, topic, 1);
        match self.nats.consumer(Stream::Capturing(topic), &durable) {
            Ok(Some(c)) => format!(
                "acknowledged to {}, delivered to {}, {} pending, {} unacknowledged, {} redelivered",
                c.ack_floor_stream_seq,
                c.delivered_stream_seq,
                c.num_pending,
                c.num_ack_pending,
                c.num_redelivered
            ),
            _ => self.progress(group, topic),
        }
    }

    fn prepare_for_kills(&self, _deployment: &Deployment) -> Result<()> {
        Ok(())
    }

    fn manifest_for_kills(&self) -> &'static str {
        // Held messages are kept alive with progress acknowledgements, so a
        // short ack wait only bounds how soon a killed process's come back.
        "\n[nats]\nack_wait = \"3s\"\n"
    }
}
