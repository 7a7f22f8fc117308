//! Reading a Kafka topic from its start, and deleting its oldest records:
//! the [`Archive`] the dead-letter tools use.
//!
//! Reading assigns every partition at its beginning to a consumer that
//! joins no group and commits nothing, and reads until each partition
//! reports its end (or, for brokers that never report it, until no record
//! came for [`IDLE`]). Deleting is Kafka's `DeleteRecords`: a partition's
//! log start moves past its oldest records; records in the middle of a
//! partition cannot be deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use super::Cluster;
use crate::source::{Archive, Depth, Message, Position};

/// How long reading waits for a record before it takes a partition as
/// read to its end.
const IDLE: Duration = Duration::from_millis(1500);
/// How long a metadata request or a deletion may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The reader's client context: the end of a partition, which the reader
/// asks to be told of (`enable.partition.eof`), is how a read ends, not an
/// error to log; other client errors are logged as warnings.
struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reports it as a global error with that code.
        let end_of_partition = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end_of_partition {
            tracing::warn!(error = %error, reason, "Kafka client error while reading a topic");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// A cluster's topics, read and trimmed.
pub struct KafkaArchive {
    cluster: Cluster,
}

impl KafkaArchive {
    /// The archive of `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        Self { cluster }
    }

    /// A consumer that joins no group and commits nothing, telling when it
    /// reached a partition's end.
    fn reader(&self) -> anyhow::Result<BaseConsumer<ReaderContext>> {
        let mut config = self.cluster.client_config("weir-dlq");
        config
            .set("group.id", "weir-dlq-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        config
            .create_with_context(ReaderContext)
            .map_err(|err| anyhow::anyhow!("cannot create a reader: {err}"))
    }

    fn read_blocking(&self, topic: &str) -> anyhow::Result<Vec<Message>> {
        let consumer = self.reader()?;
        let metadata = consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .map_err(|err| anyhow::anyhow!("cannot read the metadata of {topic:?}: {err}"))?;
        let Some(described) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(Vec::new());
        };
        if described.error().is_some() || described.partitions().is_empty() {
            // Unknown topic: nothing was ever written to it.
            return Ok(Vec::new());
        }
        let mut assignment = TopicPartitionList::new();
        let mut open: BTreeSet<i32> = BTreeSet::new();
        for partition in described.partitions() {
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Beginning)
                .map_err(|err| anyhow::anyhow!("cannot assign {topic:?}: {err}"))?;
            open.insert(partition.id());
        }
        consumer
            .assign(&assignment)
            .map_err(|err| anyhow::anyhow!("cannot assign {topic:?}: {err}"))?;
        let mut messages = Vec::new();
        let mut last_record = Instant::now();
        while !open.is_empty() && last_record.elapsed() < IDLE {
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    open.remove(&partition);
                }
                Some(Err(err)) => anyhow::bail!("cannot read {topic:?}: {err}"),
                Some(Ok(record)) => {
                    last_record = Instant::now();
                    messages.push(Message {
                        topic: record.topic().to_string(),
                        key: record.key().map(<[u8]>::to_vec),
                        payload: record.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        headers: super::decode::headers_of(&record),
                        timestamp_ms: record.timestamp().to_millis(),
                        position: Position::Kafka {
                            partition: record.partition(),
                            offset: record.offset(),
                        },
                        scope: 0,
                    });
                }
            }
        }
        Ok(messages)
    }
}

impl KafkaArchive {
    /// Sums the partitions' watermarks, and reads the first record of each
    /// partition that holds any for the oldest time.
    fn depth_blocking(&self, topic: &str) -> anyhow::Result<Depth> {
        let consumer = self.reader()?;
        let metadata = consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .map_err(|err| anyhow::anyhow!("cannot read the metadata of {topic:?}: {err}"))?;
        let Some(described) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
        else {
            return Ok(Depth::default());
        };
        let mut depth = Depth::default();
        let mut firsts = TopicPartitionList::new();
        let mut waiting: BTreeSet<i32> = BTreeSet::new();
        for partition in described.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition.id(), TIMEOUT)
                .map_err(|err| anyhow::anyhow!("cannot read the offsets of {topic:?}: {err}"))?;
            if high > low {
                depth.messages += u64::try_from(high - low).unwrap_or(0);
                firsts
                    .add_partition_offset(topic, partition.id(), Offset::Offset(low))
                    .map_err(|err| anyhow::anyhow!("cannot assign {topic:?}: {err}"))?;
                waiting.insert(partition.id());
            }
        }
        if waiting.is_empty() {
            return Ok(depth);
        }
        consumer
            .assign(&firsts)
            .map_err(|err| anyhow::anyhow!("cannot assign {topic:?}: {err}"))?;
        let started = Instant::now();
        while !waiting.is_empty() && started.elapsed() < IDLE {
            if let Some(Ok(record)) = consumer.poll(Duration::from_millis(200))
                && waiting.remove(&record.partition())
                && let Some(ms) = record.timestamp().to_millis()
            {
                depth.oldest_ms = Some(depth.oldest_ms.map_or(ms, |o| o.min(ms)));
            }
        }
        Ok(depth)
    }
}

/// Per partition, the offset before which every record read is selected:
/// where `DeleteRecords` may move the partition's start. Partitions whose
/// oldest record is not selected are left out.
pub(crate) fn deletable_prefix(
    selected: &[Position],
    read: &[Position],
) -> BTreeMap<i32, (i64, usize)> {
    let chosen: BTreeSet<(i32, i64)> = selected
        .iter()
        .filter_map(|p| match p {
            Position::Kafka { partition, offset } => Some((*partition, *offset)),
            _ => None,
        })
        .collect();
    let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for position in read {
        if let Position::Kafka { partition, offset } = position {
            by_partition.entry(*partition).or_default().push(*offset);
        }
    }
    let mut prefix = BTreeMap::new();
    for (partition, mut offsets) in by_partition {
        offsets.sort_unstable();
        let taken = offsets
            .iter()
            .take_while(|offset| chosen.contains(&(partition, **offset)))
            .count();
        if taken > 0 {
            let before = offsets
                .get(taken)
                .copied()
                .unwrap_or(offsets[taken - 1] + 1);
            prefix.insert(partition, (before, taken));
        }
    }
    prefix
}

impl Archive for KafkaArchive {
    async fn read_all(&self, topic: &str) -> anyhow::Result<Vec<Message>> {
        let archive = KafkaArchive::new(self.cluster.clone());
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || archive.read_blocking(&topic))
            .await
            .map_err(|err| anyhow::anyhow!("the reader stopped: {err}"))?
    }

    async fn depth(&self, topic: &str) -> anyhow::Result<Depth> {
        let archive = KafkaArchive::new(self.cluster.clone());
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || archive.depth_blocking(&topic))
            .await
            .map_err(|err| anyhow::anyhow!("the reader stopped: {err}"))?
    }

    async fn remove(
        &self,
        topic: &str,
        selected: &[Position],
        read: &[Position],
    ) -> anyhow::Result<usize> {
        let prefix = deletable_prefix(selected, read);
        if prefix.is_empty() {
            return Ok(0);
        }
        let admin: AdminClient<DefaultClientContext> = self
            .cluster
            .client_config("weir-dlq")
            .create()
            .map_err(|err| anyhow::anyhow!("cannot create an admin client: {err}"))?;
        let mut offsets = TopicPartitionList::new();
        for (partition, (before, _)) in &prefix {
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*before))
                .map_err(|err| anyhow::anyhow!("cannot list {topic:?}/{partition}: {err}"))?;
        }
        let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let result = admin
            .delete_records(&offsets, &options)
            .await
            .map_err(|err| anyhow::anyhow!("cannot delete records of {topic:?}: {err}"))?;
        let mut removed = 0;
        for element in result.elements() {
            match element.error() {
                Ok(()) => {
                    removed += prefix.get(&element.partition()).map_or(0, |(_, n)| *n);
                }
                Err(KafkaError::OffsetFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err(err) => anyhow::bail!(
                    "the broker refused to delete records of {topic:?}/{}: {err}",
                    element.partition()
                ),
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(partition: i32, offset: i64) -> Position {
        Position::Kafka { partition, offset }
    }

    #[test]
    fn only_a_partition_s_oldest_selected_records_can_go() {
        let read = [at(0, 0), at(0, 1), at(0, 2), at(1, 5), at(1, 6), at(2, 0)];
        // Partition 0: 0 and 2 selected, 1 kept: only 0 goes. Partition 1:
        // both: up to 7. Partition 2: not selected.
        let selected = [at(0, 0), at(0, 2), at(1, 6), at(1, 5)];
        let prefix = deletable_prefix(&selected, &read);
        assert_eq!(prefix.get(&0), Some(&(1, 1)));
        assert_eq!(prefix.get(&1), Some(&(7, 2)));
        assert_eq!(prefix.get(&2), None);
    }
}
