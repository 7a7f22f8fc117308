//! Kafka through librdkafka: one consumer per handler (its own group), and
//! an idempotent producer for dead letters and emitted events.
//!
//! # Offsets
//!
//! Automatic offset *storage* is off (`enable.auto.offset.store=false`):
//! an offset becomes eligible for commit only when the pipeline settles a
//! message and the partition's contiguous watermark (see [`ledger`]) passes
//! it. Automatic *commit* of stored offsets stays on, so acknowledged
//! progress reaches the broker within a second, and [`KafkaConsumer`]'s
//! `close` commits synchronously on shutdown. Ownership is tracked per
//! assignment (a [`ledger::Slot`]); librdkafka also refuses to store an
//! offset for a partition this consumer no longer owns, so nothing is ever
//! committed on behalf of a partition that was revoked.
//!
//! # Backpressure
//!
//! The pipeline stops calling `recv` when it holds `max_in_flight`
//! messages. librdkafka keeps what it fetched ahead (bounded by
//! `queued.max.messages.kbytes`) and stops fetching; nothing is dropped or
//! fetched twice, as pausing a partition would. If the pipeline stays full
//! longer than `max.poll.interval.ms` (5 minutes by default) the consumer
//! leaves its group and rejoins: its partitions move, and the messages it
//! held are redelivered (and deduplicated) by their next owner.

mod archive;
mod consumer;
mod decode;
pub mod ledger;
mod publisher;
pub mod rewind;
pub mod topics;

pub use archive::KafkaArchive;
pub use consumer::{KafkaConsumer, KafkaDelivery, WeirContext};
pub use publisher::KafkaProducer;

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

use super::{Archive, Broker, BrokerKind, Depth, Rewind, Subscription};

/// Properties Weir sets itself because its delivery guarantees depend on
/// them; a user's `[source.kafka.properties]` may not override these.
const RESERVED: &[&str] = &[
    "group.id",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "auto.offset.reset",
    "enable.idempotence",
    "acks",
];

/// Whether `topic` is a Kafka topic name: 1-249 of `[a-zA-Z0-9._-]`.
///
/// # Errors
///
/// Saying what a topic name may hold.
pub fn check_topic_name(topic: &str) -> Result<(), String> {
    let valid = (1..=249).contains(&topic.len())
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{topic:?} is not a valid Kafka topic name (1-249 of [a-zA-Z0-9._-])"
        ))
    }
}

/// `[source.kafka]`: a Kafka (or Kafka-protocol) cluster.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSource {
    /// `host:port[,host:port…]` of the cluster's brokers.
    pub bootstrap_servers: String,
    /// librdkafka properties passed through to every client as they are
    /// (security settings, timeouts, …). Weir's own delivery settings
    /// (offset storage, commits) cannot be overridden here.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// Connection settings shared by every client of one cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `host:port[,…]`.
    pub bootstrap_servers: String,
    /// librdkafka pass-through properties.
    pub properties: BTreeMap<String, String>,
}

impl Cluster {
    /// Checks that no pass-through property overrides a reserved one.
    ///
    /// # Errors
    ///
    /// Names the offending property.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(key) = self
            .properties
            .keys()
            .find(|k| RESERVED.contains(&k.as_str()))
        {
            anyhow::bail!(
                "[source.kafka.properties] {key:?}: Weir sets this itself to keep its delivery \
                 guarantees; remove it (consumer groups are set per handler with `group` in the manifest)"
            );
        }
        Ok(())
    }

    fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        config.set("client.id", client_id);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

/// A connection to a Kafka cluster: its settings, for the consumers each
/// handler gets, and the one producer dead letters and emitted events share.
#[derive(Clone)]
pub struct KafkaConnection {
    cluster: Cluster,
    producer: KafkaProducer,
}

impl KafkaConnection {
    /// The connection `source` describes.
    ///
    /// # Errors
    ///
    /// When a pass-through property overrides one Weir sets (naming it), or
    /// librdkafka rejects the configuration.
    pub fn connect(source: &KafkaSource) -> anyhow::Result<Self> {
        let cluster = Cluster {
            bootstrap_servers: source.bootstrap_servers.clone(),
            properties: source.properties.clone(),
        };
        cluster.validate()?;
        Self::to(cluster)
    }

    /// A connection to `cluster`, whose properties are already checked.
    ///
    /// # Errors
    ///
    /// When librdkafka rejects the configuration.
    pub fn to(cluster: Cluster) -> anyhow::Result<Self> {
        let producer = KafkaProducer::new(&cluster, "weir-producer")?;
        Ok(Self { cluster, producer })
    }
}

impl Broker for KafkaConnection {
    type Settings = ();
    type Consumer = KafkaConsumer;
    type Publisher = KafkaProducer;
    type Archive = KafkaArchive;

    fn kind(&self) -> BrokerKind {
        BrokerKind::Kafka
    }

    fn consumer(&self, subscription: Subscription<()>) -> anyhow::Result<KafkaConsumer> {
        KafkaConsumer::new(
            &self.cluster,
            &format!("weir-{}", subscription.handler),
            &subscription.group,
            &subscription.topics,
            subscription.start,
            subscription.progress,
        )
    }

    fn publisher(&self) -> KafkaProducer {
        self.producer.clone()
    }

    async fn ensure_dead_letters(
        &self,
        dlq: &str,
        origin: &str,
        retention: std::time::Duration,
        create: bool,
    ) -> anyhow::Result<Option<i32>> {
        use topics::{Ensured, ensure_topic};
        Ok(
            match ensure_topic(&self.cluster, dlq, origin, retention, create).await? {
                Ensured::Existing => None,
                Ensured::Created(partitions) => Some(partitions),
            },
        )
    }

    async fn depth(&self, topic: &str) -> anyhow::Result<Depth> {
        KafkaArchive::new(self.cluster.clone()).depth(topic).await
    }

    async fn rewind(
        &self,
        subscription: &Subscription<()>,
        from: Rewind,
        apply: bool,
    ) -> anyhow::Result<Vec<String>> {
        let verb = if apply { "" } else { "would " };
        let moves = rewind::rewind(
            &self.cluster,
            &subscription.group,
            &subscription.topics,
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

    fn archive(&self) -> anyhow::Result<KafkaArchive> {
        Ok(KafkaArchive::new(self.cluster.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::BaseProducer;

    /// What managed Kafka services ask for: TLS, and SASL PLAIN or SCRAM
    /// over it. librdkafka refuses these settings when it was built
    /// without OpenSSL; creating a client checks them without connecting.
    #[test]
    fn tls_and_sasl_settings_are_accepted() {
        for (protocol, mechanism) in [
            ("SSL", None),
            ("SASL_SSL", Some("PLAIN")),
            ("SASL_SSL", Some("SCRAM-SHA-256")),
            ("SASL_SSL", Some("SCRAM-SHA-512")),
            ("SASL_SSL", Some("OAUTHBEARER")),
            ("SASL_PLAINTEXT", Some("SCRAM-SHA-512")),
        ] {
            let mut properties =
                BTreeMap::from([("security.protocol".to_string(), protocol.to_string())]);
            if let Some(mechanism) = mechanism {
                properties.insert("sasl.mechanisms".into(), mechanism.into());
                if mechanism != "OAUTHBEARER" {
                    properties.insert("sasl.username".into(), "weir".into());
                    properties.insert("sasl.password".into(), "secret".into());
                }
            }
            let cluster = Cluster {
                bootstrap_servers: "127.0.0.1:1".into(),
                properties,
            };
            let created: Result<BaseProducer, _> = cluster.client_config("weir-test").create();
            assert!(
                created.is_ok(),
                "{protocol} {mechanism:?}: {:?}",
                created.err()
            );
        }
    }
}
