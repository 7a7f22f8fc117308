//! The broker the runtime is connected to: connecting to the configured
//! one, the consumer settings a handler gets on it, and moving a handler's
//! consumer back (`weir replay`).

use crate::config::Config;
use crate::registry::{BrokerKind, Manifest};
use crate::source::kafka::{Cluster, KafkaProducer};
use crate::source::nats::{self, ConsumerSpec, NatsConnection};
use crate::source::progress::Progress;
use crate::source::rabbitmq::RabbitConnection;
use crate::source::redis::RedisConnection;
use crate::source::sqs::SqsConnection;
use crate::source::{Depth, Subscription};

/// The broker the runtime is connected to.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // made once per process
pub enum Broker {
    /// Kafka (or the embedded Kafka-protocol broker), with the producer
    /// for dead letters and emitted events.
    Kafka {
        /// Connection settings for consumers.
        cluster: Cluster,
        /// The shared producer.
        producer: KafkaProducer,
    },
    /// NATS JetStream.
    Nats(NatsConnection),
    /// RabbitMQ.
    Rabbit(RabbitConnection),
    /// Redis Streams.
    Redis(RedisConnection),
    /// Amazon SQS.
    Sqs(SqsConnection),
}

impl Broker {
    /// Which kind of broker this is.
    pub fn kind(&self) -> BrokerKind {
        match self {
            Broker::Kafka { .. } => BrokerKind::Kafka,
            Broker::Nats(_) => BrokerKind::Nats,
            Broker::Rabbit(_) => BrokerKind::Rabbit,
            Broker::Redis(_) => BrokerKind::Redis,
            Broker::Sqs(_) => BrokerKind::Sqs,
        }
    }

    /// How many messages `topic` holds and how old the oldest is (for the
    /// dead-letter gauges).
    ///
    /// # Errors
    ///
    /// When the broker cannot be asked.
    pub async fn depth(&self, topic: &str) -> anyhow::Result<Depth> {
        use crate::source::Archive;
        match self {
            Broker::Kafka { cluster, .. } => {
                crate::source::kafka::KafkaArchive::new(cluster.clone())
                    .depth(topic)
                    .await
            }
            Broker::Nats(connection) => connection.depth(topic).await,
            Broker::Rabbit(connection) => connection.depth(topic).await,
            Broker::Redis(connection) => connection.depth(topic).await,
            Broker::Sqs(connection) => connection.depth(topic).await,
        }
    }

    /// Makes sure dead-letter destination `dlq` of `origin` exists, creating
    /// it (keeping dead letters for `retention`) when missing and `create`
    /// allows. Returns the partitions created, if it created one.
    ///
    /// # Errors
    ///
    /// When it is missing and may not be created, or the broker refuses.
    pub async fn ensure_dead_letters(
        &self,
        dlq: &str,
        origin: &str,
        retention: std::time::Duration,
        create: bool,
    ) -> anyhow::Result<Option<i32>> {
        use crate::source::kafka::topics::{Ensured, ensure_topic};
        let created = match self {
            Broker::Kafka { cluster, .. } => {
                return Ok(
                    match ensure_topic(cluster, dlq, origin, retention, create).await? {
                        Ensured::Existing => None,
                        Ensured::Created(partitions) => Some(partitions),
                    },
                );
            }
            Broker::Nats(connection) => {
                connection
                    .ensure_dead_letters(dlq, retention, create)
                    .await?
            }
            Broker::Rabbit(connection) => {
                connection
                    .ensure_dead_letters(dlq, origin, retention, create)
                    .await?
            }
            Broker::Redis(connection) => {
                connection
                    .ensure_dead_letters(dlq, origin, retention, create)
                    .await?
            }
            Broker::Sqs(connection) => {
                connection
                    .ensure_dead_letters(dlq, origin, retention, create)
                    .await?
            }
        };
        Ok(created.then_some(1))
    }

    /// Moves the consumer of a handler with `manifest`, consuming as
    /// `group`, back to `from` (with `apply`; otherwise only says where it
    /// would go): one line per partition or subject, in words.
    ///
    /// # Errors
    ///
    /// When the broker cannot be asked, or refuses (a consumer of the group
    /// is running).
    pub async fn rewind(
        &self,
        manifest: &Manifest,
        group: &str,
        from: crate::source::Rewind,
        apply: bool,
    ) -> anyhow::Result<Vec<String>> {
        let verb = if apply { "" } else { "would " };
        match self {
            Broker::Kafka { cluster, .. } => {
                let moves = crate::source::kafka::rewind::rewind(
                    cluster,
                    group,
                    &manifest.topics,
                    from,
                    apply,
                )
                .await?;
                Ok(moves
                    .into_iter()
                    .map(|m| {
                        let now = m.committed.map_or_else(
                            || "nothing committed".to_string(),
                            |o| format!("offset {o}"),
                        );
                        format!(
                            "{verb}move {}/{} from {now} to offset {}",
                            m.topic, m.partition, m.to
                        )
                    })
                    .collect())
            }
            Broker::Nats(connection) => {
                let spec = nats_consumer_spec(manifest, group, Progress::default());
                let moves = connection.rewind(&spec, from, apply).await?;
                Ok(moves
                    .into_iter()
                    .map(|m| {
                        let now = m.acked.map_or_else(
                            || "no consumer yet".to_string(),
                            |s| format!("acknowledged up to stream sequence {s}"),
                        );
                        format!(
                            "{verb}restart consumer {} of {} ({now}) from {}",
                            m.durable, m.topic, m.to
                        )
                    })
                    .collect())
            }
            Broker::Redis(connection) => connection.rewind(manifest, group, from, apply).await,
            Broker::Rabbit(_) | Broker::Sqs(_) => anyhow::bail!(
                "{} queues have no positions to move a consumer back to: a message is gone once acknowledged; replay from where the messages came from, or use `weir dlq replay` for dead letters",
                self.kind().name()
            ),
        }
    }
}

/// The subscription of a handler with `manifest`, consuming as `group`,
/// with its broker table `settings`.
pub fn subscription<S: Clone + Default>(
    name: &str,
    manifest: &Manifest,
    group: &str,
    progress: Progress,
    settings: Option<&S>,
) -> Subscription<S> {
    Subscription {
        handler: name.to_string(),
        group: group.to_string(),
        topics: manifest.topics.clone(),
        start: manifest.start,
        max_in_flight: manifest.max_in_flight,
        progress,
        settings: settings.cloned().unwrap_or_default(),
    }
}

/// The cluster of a `[source.kafka]` table.
///
/// # Errors
///
/// When a pass-through property overrides one Weir sets (naming it).
pub fn kafka_cluster(source: crate::config::KafkaSource) -> anyhow::Result<Cluster> {
    let cluster = Cluster {
        bootstrap_servers: source.bootstrap_servers,
        properties: source.properties,
    };
    cluster.validate()?;
    Ok(cluster)
}

/// The JetStream consumers of a handler with `manifest`, consuming as
/// `group`.
pub fn nats_consumer_spec(manifest: &Manifest, group: &str, progress: Progress) -> ConsumerSpec {
    let settings = manifest.nats.clone().unwrap_or_default();
    ConsumerSpec {
        durable: settings.durable.unwrap_or_else(|| nats::name_for(group)),
        topics: manifest.topics.clone(),
        start: manifest.start,
        ack_wait: settings.ack_wait,
        max_ack_pending: manifest.max_in_flight,
        progress,
    }
}

/// The connection settings of a `[source.nats]` table.
pub fn nats_settings(source: crate::config::NatsSource) -> nats::NatsSettings {
    nats::NatsSettings {
        url: source.url,
        user: source.user.zip(source.password),
        token: source.token,
        creds_file: source.creds_file,
        nkey: source.nkey,
        tls_required: source.tls.required,
        tls_ca_file: source.tls.ca_file,
        tls_client: source.tls.cert_file.zip(source.tls.key_file),
        connect_timeout: source.connect_timeout,
        streams: nats::StreamSettings {
            memory: source.streams.storage == "memory",
            max_age: source.streams.max_age,
            replicas: source.streams.replicas,
            duplicate_window: source.streams.duplicate_window,
        },
    }
}

/// Connects to the configured broker, starting the embedded one if no
/// `[source]` is configured (creating `topics` on it). The embedded broker
/// lives as long as the returned guard.
///
/// # Errors
///
/// When the embedded broker cannot start, a topic cannot be created, or
/// the broker's settings are unusable.
pub async fn connect(
    config: &Config,
    topics: &[String],
) -> anyhow::Result<(Broker, Option<crate::source::embedded::EmbeddedBroker>)> {
    let kafka = |cluster: Cluster| -> anyhow::Result<Broker> {
        let producer = KafkaProducer::new(&cluster, "weir-producer")?;
        Ok(Broker::Kafka { cluster, producer })
    };
    match config.source() {
        crate::config::Source::Kafka(source) => Ok((kafka(kafka_cluster(source)?)?, None)),
        crate::config::Source::Nats(source) => Ok((
            Broker::Nats(NatsConnection::connect(&nats_settings(source)).await?),
            None,
        )),
        crate::config::Source::Rabbit(source) => Ok((
            Broker::Rabbit(RabbitConnection::connect(&source).await?),
            None,
        )),
        crate::config::Source::Redis(source) => Ok((
            Broker::Redis(RedisConnection::connect(&source).await?),
            None,
        )),
        crate::config::Source::Sqs(source) => {
            Ok((Broker::Sqs(SqsConnection::connect(&source).await?), None))
        }
        crate::config::Source::Embedded(embedded) => {
            let broker = crate::source::embedded::EmbeddedBroker::start(embedded.partitions)?;
            for topic in topics {
                broker.create_topic(topic)?;
            }
            let cluster = Cluster {
                bootstrap_servers: broker.bootstrap_servers(),
                properties: Default::default(),
            };
            Ok((kafka(cluster)?, Some(broker)))
        }
    }
}
