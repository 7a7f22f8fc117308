//! One handler's Kafka consumer: its group membership, the ledger kept in
//! step with partition ownership, and offsets stored only as the
//! pipeline settles (the [parent](super)'s "Offsets" and "Backpressure").

use std::sync::Arc;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::ledger::{Ledger, Slot};
use super::{Cluster, decode};
use crate::source::progress::Progress;
use crate::source::{Message, Position, Settled, Source, StartFrom};

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
    /// settled `Done` or `DeadLettered` (see [`ledger`](super::ledger)). If the partition
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
