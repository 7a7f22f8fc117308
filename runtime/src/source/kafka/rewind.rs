//! Moving a consumer group's committed offsets back (`weir rewind`).
//!
//! The offsets are committed from outside the group (no member joins), so
//! the broker accepts them only while the group has no active member: a
//! running consumer makes the commit fail instead of racing it. The group's
//! members are asked first, dry run or not, so that a replay can find out
//! that the rewind would be refused before it forgets anything.

use std::time::{Duration, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::Cluster;
use crate::source::Rewind;

/// How long one request to the cluster may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// One partition's move: from its committed offset (if any) to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Committed now.
    pub committed: Option<i64>,
    /// Committed after the rewind.
    pub to: i64,
}

/// Where `group` would start again on each partition of `topics`, from
/// `from`; with `apply`, commits it.
///
/// # Errors
///
/// When the cluster cannot be asked, or refuses the commit (a member of the
/// group is running).
pub async fn rewind(
    cluster: &Cluster,
    group: &str,
    topics: &[String],
    from: Rewind,
    apply: bool,
) -> anyhow::Result<Vec<Move>> {
    let mut config = cluster.client_config("weir-replay");
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let (group, topics) = (group.to_string(), topics.to_vec());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .create()
            .map_err(|err| anyhow::anyhow!("cannot create a client: {err}"))?;
        // Asked before anything is moved or forgotten, with or without
        // `apply`: a dry run says whether the rewind can happen.
        let groups = consumer
            .fetch_group_list(Some(&group), TIMEOUT)
            .map_err(|err| anyhow::anyhow!("cannot ask the cluster about group {group:?}: {err}"))?;
        let members: usize = groups
            .groups()
            .iter()
            .filter(|g| g.name() == group)
            .map(|g| g.members().len())
            .sum();
        if members > 0 {
            anyhow::bail!(
                "group {group:?} has {members} active member(s): the cluster moves a group's offsets only while nobody consumes in it; stop the weir processes serving it first"
            );
        }
        let mut moves = Vec::new();
        for topic in &topics {
            let metadata = consumer
                .fetch_metadata(Some(topic), TIMEOUT)
                .map_err(|err| anyhow::anyhow!("cannot read the metadata of {topic:?}: {err}"))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                anyhow::bail!("topic {topic:?} does not exist");
            }
            let mut wanted = TopicPartitionList::new();
            for partition in &partitions {
                wanted
                    .add_partition(topic, *partition);
            }
            let committed = consumer
                .committed_offsets(wanted.clone(), TIMEOUT)
                .map_err(|err| anyhow::anyhow!("cannot read {group:?}'s offsets: {err}"))?;
            let times = match from {
                Rewind::Time(at) => {
                    let ms = at
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                    // offsets_for_times takes the time in the offset field.
                    let mut at_time = TopicPartitionList::new();
                    for partition in &partitions {
                        at_time
                            .add_partition_offset(topic, *partition, Offset::Offset(ms))
                            .map_err(|err| anyhow::anyhow!("cannot list {topic:?}: {err}"))?;
                    }
                    Some(
                        consumer
                            .offsets_for_times(at_time, TIMEOUT)
                            .map_err(|err| anyhow::anyhow!("cannot find offsets by time: {err}"))?,
                    )
                }
                _ => None,
            };
            for partition in partitions {
                let (low, high) = consumer
                    .fetch_watermarks(topic, partition, TIMEOUT)
                    .map_err(|err| anyhow::anyhow!("cannot read the offsets of {topic:?}: {err}"))?;
                let to = match from {
                    Rewind::Earliest => low,
                    // Not `clamp`, which panics on a broker that answers
                    // low > high.
                    Rewind::Offset(offset) => offset.min(high).max(low),
                    Rewind::Time(_) => match times
                        .as_ref()
                        .and_then(|t| t.find_partition(topic, partition))
                        .map(|e| e.offset())
                    {
                        Some(Offset::Offset(offset)) => offset,
                        // No message at or after the time: the end.
                        _ => high,
                    },
                };
                let committed = match committed
                    .find_partition(topic, partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(offset)) => Some(offset),
                    _ => None,
                };
                moves.push(Move {
                    topic: topic.clone(),
                    partition,
                    committed,
                    to,
                });
            }
        }
        if apply {
            let mut offsets = TopicPartitionList::new();
            for m in &moves {
                offsets
                    .add_partition_offset(&m.topic, m.partition, Offset::Offset(m.to))
                    .map_err(|err| anyhow::anyhow!("cannot list {}/{}: {err}", m.topic, m.partition))?;
            }
            consumer.commit(&offsets, CommitMode::Sync).map_err(|err| {
                anyhow::anyhow!(
                    "the cluster refused the new offsets of group {group:?} ({err}): is a weir serving it still running?"
                )
            })?;
        }
        Ok(moves)
    })
    .await
    .map_err(|err| anyhow::anyhow!("the rewind stopped: {err}"))?
}
