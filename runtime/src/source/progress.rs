//! How a consumer is doing, as its source sees it: whether it has joined
//! (Kafka: the group is up and has given it an assignment; NATS JetStream:
//! its durable consumer exists on the server and answers), how far behind
//! the broker's end each partition is, and when each partition's committed
//! position last moved. Sources write it; the metrics and the readiness
//! check read it.
//!
//! - **Lag**: Kafka from librdkafka's statistics (the partition's high
//!   watermark minus the committed offset), JetStream from the durable
//!   consumer's info (messages pending plus delivered and not yet
//!   acknowledged), partition `0` per subject.
//! - **Age of the committed position**: the time since the position last
//!   advanced, while the partition has messages behind it; `0` when it has
//!   none (an idle partition is not a stuck one). A partition whose age
//!   keeps growing is stuck: a message retried for long, a store that
//!   refuses writes, a dead-letter topic that cannot be written.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::lock::Unpoisoned;

/// One partition as its consumer last saw it.
#[derive(Clone, Copy, Debug)]
struct Partition {
    /// Messages behind the broker's end; `None` until first known.
    lag: Option<i64>,
    /// When the committed position last advanced (or the partition was
    /// first seen).
    advanced: Instant,
}

#[derive(Debug)]
struct Board {
    /// `None` once joined; else why not.
    not_joined: Option<String>,
    partitions: BTreeMap<String, BTreeMap<i32, Partition>>,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            not_joined: Some("the consumer has not joined yet".to_string()),
            partitions: BTreeMap::new(),
        }
    }
}

/// What one partition looks like now (see [`Progress::snapshot`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionView {
    /// Topic or subject.
    pub topic: String,
    /// Partition (`0` for a JetStream subject).
    pub partition: i32,
    /// Messages behind the broker's end, when known.
    pub lag: Option<i64>,
    /// Time since the committed position advanced, while messages are
    /// behind it; zero when none are (see the module documentation).
    pub position_age: Duration,
}

/// The progress of one consumer group (or durable). Cheap to clone; clones
/// share the values.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    inner: Arc<Mutex<Board>>,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, Board> {
        self.inner.locked()
    }

    /// The consumer has joined (its group, or its durable on the server).
    pub fn joined(&self) {
        self.lock().not_joined = None;
    }

    /// The consumer is not (or no longer) joined, because of `why`.
    pub fn not_joined(&self, why: impl Into<String>) {
        self.lock().not_joined = Some(why.into());
    }

    /// `None` when joined; else why not.
    pub fn joining(&self) -> Option<String> {
        self.lock().not_joined.clone()
    }

    /// `topic`/`partition` is `lag` messages behind.
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.partition(topic, partition, |p| p.lag = Some(lag));
    }

    /// The committed position of `topic`/`partition` advanced.
    pub fn advanced(&self, topic: &str, partition: i32) {
        let now = Instant::now();
        self.partition(topic, partition, |p| p.advanced = now);
    }

    fn partition(&self, topic: &str, partition: i32, change: impl FnOnce(&mut Partition)) {
        let mut board = self.lock();
        let partitions = match board.partitions.get_mut(topic) {
            Some(partitions) => partitions,
            None => board.partitions.entry(topic.to_string()).or_default(),
        };
        change(partitions.entry(partition).or_insert(Partition {
            lag: None,
            advanced: Instant::now(),
        }));
    }

    /// `topic`/`partition` is no longer this consumer's.
    pub fn forget(&self, topic: &str, partition: i32) {
        let mut board = self.lock();
        if let Some(partitions) = board.partitions.get_mut(topic) {
            partitions.remove(&partition);
            if partitions.is_empty() {
                board.partitions.remove(topic);
            }
        }
    }

    /// Every partition known, in order.
    pub fn snapshot(&self) -> Vec<PartitionView> {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> Vec<PartitionView> {
        self.lock()
            .partitions
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions.iter().map(move |(partition, p)| PartitionView {
                    topic: topic.clone(),
                    partition: *partition,
                    lag: p.lag,
                    position_age: if p.lag.unwrap_or(0) > 0 {
                        now.saturating_duration_since(p.advanced)
                    } else {
                        Duration::ZERO
                    },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_ages_only_while_messages_are_behind_it() {
        let progress = Progress::default();
        progress.advanced("t", 0);
        progress.set_lag("t", 0, 0);
        progress.set_lag("t", 1, 5);
        let later = Instant::now() + Duration::from_secs(60);
        let views = progress.snapshot_at(later);
        assert_eq!(views.len(), 2);
        assert_eq!(views[0].position_age, Duration::ZERO, "{views:?}");
        assert!(
            views[1].position_age >= Duration::from_secs(60),
            "{views:?}"
        );
        progress.advanced("t", 1);
        let after = progress.snapshot_at(later);
        assert!(after[1].position_age < Duration::from_secs(60), "{after:?}");
        progress.forget("t", 1);
        assert_eq!(progress.snapshot().len(), 1);
    }

    #[test]
    fn joined_until_told_otherwise() {
        let progress = Progress::default();
        assert!(progress.joining().is_some());
        progress.joined();
        assert_eq!(progress.joining(), None);
        progress.not_joined("server down");
        assert_eq!(progress.joining().as_deref(), Some("server down"));
    }
}
