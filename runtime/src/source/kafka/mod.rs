//! Kafka through librdkafka: one consumer per handler (its own group), and a
//! producer for dead letters.
//!
//! # Offsets
//!
//! Automatic offset *storage* is off (`enable.auto.offset.store=false`):
//! an offset becomes eligible for commit only when the pipeline calls
//! [`KafkaConsumer::ack`], which it does after the message's outcome is
//! durable. Automatic *commit* of stored offsets stays on, so acknowledged
//! progress reaches the broker within a second, and [`KafkaConsumer::close`]
//! commits synchronously on shutdown. librdkafka refuses to store an offset
//! for a partition this consumer no longer owns, so nothing is ever
//! committed on behalf of a partition that was revoked.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use std::sync::Arc;

use super::{Message, Source};
use crate::pipeline::offsets::Ledger;
use crate::registry::StartFrom;

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
}

impl ClientContext for WeirContext {}

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
                }
                tracing::info!(group = %self.group, partitions = %describe(tpl), "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                let mut commit = TopicPartitionList::new();
                for element in tpl.elements() {
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
                tracing::info!(group = %self.group, partitions = %describe(tpl), committed = %describe(&commit), "partitions revoked");
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
    group: String,
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
        ledger: Arc<Ledger>,
    ) -> anyhow::Result<Self> {
        let mut config = cluster.client_config(client_id);
        config
            .set("group.id", group)
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", start.as_offset_reset())
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.partition.eof", "false");
        let consumer: StreamConsumer<WeirContext> = config
            .create_with_context(WeirContext {
                group: group.to_string(),
                ledger,
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
            group: group.to_string(),
        })
    }

    fn partition_list(&self, topic: &str, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition(topic, partition);
        tpl
    }
}

impl Source for KafkaConsumer {
    /// Waits for the next message. A consumer error (the broker being down
    /// shows up as transport errors; librdkafka keeps reconnecting) is
    /// returned as text.
    async fn recv(&self) -> Result<Message, String> {
        let borrowed = self.consumer.recv().await.map_err(|e| e.to_string())?;
        let headers = borrowed
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Message {
            topic: borrowed.topic().to_string(),
            partition: borrowed.partition(),
            offset: borrowed.offset(),
            key: borrowed.key().map(<[u8]>::to_vec),
            payload: borrowed.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
            timestamp_ms: borrowed.timestamp().to_millis(),
        })
    }

    /// Marks every message of `topic`/`partition` below `next_offset` as
    /// done; the next commit records `next_offset` as the group's position.
    ///
    /// Invariant: call only once every message below `next_offset` has a
    /// durable outcome. If the partition was revoked meanwhile, librdkafka
    /// refuses the store and the position is left to the new owner.
    fn ack(&self, topic: &str, partition: i32, next_offset: i64) {
        let mut tpl = TopicPartitionList::with_capacity(1);
        if let Err(err) = tpl.add_partition_offset(topic, partition, Offset::Offset(next_offset)) {
            tracing::error!(topic, partition, error = %err, "cannot build offset list");
            return;
        }
        if let Err(err) = self.consumer.store_offsets(&tpl) {
            tracing::warn!(group = %self.group, topic, partition, next_offset, error = %err,
                "offset not stored (partition no longer assigned?); the message will be redelivered to its new owner");
        }
    }

    fn pause(&self, topic: &str, partition: i32) {
        if let Err(err) = self.consumer.pause(&self.partition_list(topic, partition)) {
            tracing::warn!(group = %self.group, topic, partition, error = %err, "cannot pause partition");
        }
    }

    fn resume(&self, topic: &str, partition: i32) {
        if let Err(err) = self.consumer.resume(&self.partition_list(topic, partition)) {
            tracing::warn!(group = %self.group, topic, partition, error = %err, "cannot resume partition");
        }
    }

    /// Commits every acknowledged offset synchronously, then leaves the
    /// group.
    fn close(self) {
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

/// An idempotent producer (acks from all in-sync replicas, no duplicates
/// from internal retries).
#[derive(Clone)]
pub struct KafkaProducer {
    producer: FutureProducer,
}

impl KafkaProducer {
    /// Creates the producer.
    ///
    /// # Errors
    ///
    /// When librdkafka rejects the configuration.
    pub fn new(cluster: &Cluster, client_id: &str) -> anyhow::Result<Self> {
        let mut config = cluster.client_config(client_id);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        let producer = config
            .create()
            .map_err(|err| anyhow::anyhow!("cannot create a producer: {err}"))?;
        Ok(Self { producer })
    }

    /// Produces one record and waits until the broker acknowledged it.
    ///
    /// # Errors
    ///
    /// When the broker did not acknowledge the record within the delivery
    /// timeout.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> anyhow::Result<(i32, i64)> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(Header {
                key: name.as_str(),
                value: Some(value.as_slice()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).payload(payload).headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        let delivery = self
            .producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(err, _)| anyhow::anyhow!("produce to {topic:?} failed: {err}"))?;
        Ok((delivery.partition, delivery.offset))
    }
}
