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
mod decode;
pub mod ledger;
mod producer;
pub mod rewind;
pub mod topics;

pub use archive::KafkaArchive;
pub use producer::KafkaProducer;

use std::collections::BTreeMap;
use std::sync::Arc;

use rdkafka::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::progress::Progress;
use super::{
    Archive, Broker, BrokerKind, Depth, Message, Position, Rewind, Settled, Source, Subscription,
};
use crate::source::StartFrom;
use ledger::{Ledger, Slot};

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

/// Keeps the ledger in step with partition ownership and logs rebalances
/// and commit failures.
pub struct WeirContext {
    group: String,
    ledger: Arc<Ledger>,
    progress: Progress,
}

impl ClientContext for WeirContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): whether
    /// the group is up (its coordinator known and joined), and each
    /// assigned partition's lag, the high watermark minus the committed
    /// offset, where both are known.
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(group) = &statistics.cgrp {
            if group.state == "up" {
                self.progress.joined();
            } else {
                self.progress.not_joined(format!(
                    "consumer group {:?} is not up: coordinator state {:?} for {} s",
                    self.group,
                    group.state,
                    group.stateage / 1000
                ));
            }
        }
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 && self.ledger.owns(topic, *partition) {
                    self.progress.set_lag(topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for WeirContext {
    /// Runs inside `recv` (on the worker's task), before librdkafka applies
    /// the change.
    ///
    /// On revoke: the ledger stops accepting completions for the partitions,
    /// and their final watermark is stored and committed synchronously
    /// before they are released. In-flight work for them is abandoned: its
    /// results are never acknowledged, and the new owner redelivers it.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                for element in tpl.elements() {
                    self.ledger.assign(element.topic(), element.partition());
                    self.progress.advanced(element.topic(), element.partition());
                }
                self.progress.joined();
                tracing::info!(event = "rebalance", consumer_group = %self.group, change = "assigned", partitions = %describe(tpl), "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                let mut commit = TopicPartitionList::new();
                for element in tpl.elements() {
                    self.progress.forget(element.topic(), element.partition());
                    if let Some(next) = self.ledger.revoke(element.topic(), element.partition()) {
                        let _ = commit.add_partition_offset(
                            element.topic(),
                            element.partition(),
                            Offset::Offset(next),
                        );
                    }
                }
                if commit.count() > 0 {
                    if let Err(err) = consumer.store_offsets(&commit) {
                        tracing::warn!(group = %self.group, error = %err, "cannot store final offsets of revoked partitions");
                    }
                    if let Err(err) = consumer.commit(&commit, CommitMode::Sync) {
                        tracing::warn!(group = %self.group, error = %err, "cannot commit final offsets of revoked partitions");
                    }
                }
                tracing::info!(event = "rebalance", consumer_group = %self.group, change = "revoked", partitions = %describe(tpl), committed = %describe(&commit), "partitions revoked");
            }
            Rebalance::Error(err) => {
                tracing::warn!(group = %self.group, error = %err, "rebalance error")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                tracing::trace!(group = %self.group, offsets = %describe(offsets), "offsets committed")
            }
            // Nothing stored since the last commit: not a problem.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(err) => {
                tracing::warn!(group = %self.group, error = %err, "offset commit failed; it is retried on the next commit")
            }
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    let parts: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => format!("{}/{}@{}", e.topic(), e.partition(), o),
            _ => format!("{}/{}", e.topic(), e.partition()),
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(",")
    }
}

/// A consumer in one group, subscribed to one handler's topics.
pub struct KafkaConsumer {
    consumer: StreamConsumer<WeirContext>,
    ledger: Arc<Ledger>,
    group: String,
}

/// One delivered record: the assignment it arrived under and its offset.
pub struct KafkaDelivery {
    slot: Arc<Slot>,
    offset: i64,
}

impl KafkaConsumer {
    /// Creates the consumer and subscribes it.
    ///
    /// # Errors
    ///
    /// When librdkafka rejects the configuration (naming the property) or
    /// the subscription.
    pub fn new(
        cluster: &Cluster,
        client_id: &str,
        group: &str,
        topics: &[String],
        start: StartFrom,
        progress: Progress,
    ) -> anyhow::Result<Self> {
        let ledger = Arc::new(Ledger::default());
        let mut config = cluster.client_config(client_id);
        config
            .set("group.id", group)
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", start.as_offset_reset())
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.partition.eof", "false");
        if config.get("statistics.interval.ms").is_none() {
            // For the lag and the group's state: see `WeirContext::stats`.
            config.set("statistics.interval.ms", "5000");
        }
        let consumer: StreamConsumer<WeirContext> = config
            .create_with_context(WeirContext {
                group: group.to_string(),
                ledger: ledger.clone(),
                progress,
            })
            .map_err(|err| {
                anyhow::anyhow!("cannot create a consumer for group {group:?}: {err}")
            })?;
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|err| {
            anyhow::anyhow!("cannot subscribe group {group:?} to {topics:?}: {err}")
        })?;
        Ok(Self {
            consumer,
            ledger,
            group: group.to_string(),
        })
    }
}

impl Source for KafkaConsumer {
    type Delivery = KafkaDelivery;

    /// Waits for the next record of a partition this consumer owns. A
    /// consumer error (the broker being down shows up as transport errors;
    /// librdkafka keeps reconnecting) is returned as text.
    async fn recv(&self) -> Result<(Message, KafkaDelivery), String> {
        loop {
            let borrowed = self.consumer.recv().await.map_err(|e| e.to_string())?;
            let (topic, partition, offset) =
                (borrowed.topic(), borrowed.partition(), borrowed.offset());
            let Some(slot) = self.ledger.track(topic, partition, offset) else {
                tracing::debug!(group = %self.group, topic, partition, offset,
                    "record of a partition no longer owned; dropped");
                continue;
            };
            let headers = decode::headers_of(&borrowed);
            let message = Message {
                topic: topic.to_string(),
                key: borrowed.key().map(<[u8]>::to_vec),
                payload: borrowed.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers,
                timestamp_ms: borrowed.timestamp().to_millis(),
                position: Position::Kafka { partition, offset },
                // One assignment of one partition: keys keep their order
                // within it.
                scope: slot.generation,
            };
            return Ok((message, KafkaDelivery { slot, offset }));
        }
    }

    fn owns(&self, delivery: &KafkaDelivery) -> bool {
        delivery.slot.owned()
    }

    /// Done or dead-lettered: the offset leaves the ledger, and if the
    /// partition's watermark advanced it is stored for the next commit.
    /// Released: the offset stays in flight, so the committed position stays
    /// below it until the partition is reassigned or Weir restarts, and the
    /// record is then delivered again.
    ///
    /// Invariant: a watermark is stored only when every record below it was
    /// settled `Done` or `DeadLettered` (see [`ledger`]). If the partition
    /// was revoked meanwhile, nothing is stored: the new owner decides.
    fn settle(&self, delivery: &KafkaDelivery, outcome: Settled) {
        let slot = &delivery.slot;
        if outcome == Settled::Released {
            // The pipeline says why (shutdown, or a message it gave up on).
            tracing::debug!(group = %self.group, topic = %slot.topic, partition = slot.partition,
                offset = delivery.offset, "record released; the committed position stays below it");
            return;
        }
        let Some(next) = slot.complete(delivery.offset) else {
            return;
        };
        let mut tpl = TopicPartitionList::with_capacity(1);
        if let Err(err) =
            tpl.add_partition_offset(&slot.topic, slot.partition, Offset::Offset(next))
        {
            tracing::error!(topic = %slot.topic, partition = slot.partition, error = %err, "cannot build offset list");
            return;
        }
        match self.consumer.store_offsets(&tpl) {
            Ok(()) => self
                .consumer
                .context()
                .progress
                .advanced(&slot.topic, slot.partition),
            Err(err) => {
                tracing::warn!(group = %self.group, topic = %slot.topic, partition = slot.partition, next_offset = next, error = %err,
                    "offset not stored (partition no longer assigned?); the record will be redelivered to its new owner")
            }
        }
    }

    /// Commits every stored offset synchronously, then leaves the group.
    async fn close(self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::debug!(group = %self.group, "final offsets committed"),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(err) => {
                tracing::warn!(group = %self.group, error = %err, "final offset commit failed")
            }
        }
        self.consumer.unsubscribe();
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
