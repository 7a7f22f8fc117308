//! How far behind its broker's end each consumer is, as its source last
//! saw it: Kafka from librdkafka's statistics (the partition's high
//! watermark minus the committed offset), NATS JetStream from the durable
//! consumer's info (messages pending plus delivered and not yet
//! acknowledged). Sources write it; the metrics read it when scraped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The lag of one consumer group (or durable), by topic and partition (0
/// for a JetStream subject). Cheap to clone; clones share the values.
#[derive(Clone, Debug, Default)]
pub struct Lag {
    inner: Arc<Mutex<BTreeMap<(String, i32), i64>>>,
}

impl Lag {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<(String, i32), i64>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `topic`/`partition` is `lag` messages behind.
    pub fn set(&self, topic: &str, partition: i32, lag: i64) {
        self.lock().insert((topic.to_string(), partition), lag);
    }

    /// `topic`/`partition` is no longer this consumer's.
    pub fn forget(&self, topic: &str, partition: i32) {
        self.lock().remove(&(topic.to_string(), partition));
    }

    /// Every partition known, with its lag.
    pub fn snapshot(&self) -> Vec<(String, i32, i64)> {
        self.lock()
            .iter()
            .map(|((topic, partition), lag)| (topic.clone(), *partition, *lag))
            .collect()
    }
}
