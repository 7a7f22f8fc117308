//! Which offsets may be committed: a per-partition contiguous watermark.
//!
//! Messages of one partition complete out of order when different keys run
//! in parallel. The committed position must never pass a message that is not
//! finished, so the ledger tracks, per owned partition, the offsets in
//! flight and the highest offset received.
//!
//! Invariant: the watermark of a partition is the smallest offset still in
//! flight, or (when nothing is in flight) one past the highest offset
//! received. Every offset below the watermark has a durable outcome. Only a
//! watermark that advanced is handed out for storing.
//!
//! Ownership: each assignment of a partition gets a new generation. A
//! completion carries the generation it was tracked under; after the
//! partition is revoked (or revoked and assigned again) its completions are
//! refused, so nothing is ever acknowledged on behalf of a partition this
//! process no longer owns.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// A partition of a topic.
pub type TopicPartition = (String, i32);

#[derive(Debug)]
struct PartitionLedger {
    generation: u64,
    in_flight: BTreeSet<i64>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The last watermark handed out.
    acked: Option<i64>,
}

impl PartitionLedger {
    fn watermark(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }

    fn advanced(&mut self) -> Option<i64> {
        let mark = self.watermark()?;
        if self.acked.is_some_and(|acked| acked >= mark) {
            return None;
        }
        self.acked = Some(mark);
        Some(mark)
    }
}

/// Offsets in flight for every partition a consumer owns. Shared between
/// the pipeline and the source's rebalance callbacks.
#[derive(Debug, Default)]
pub struct Ledger {
    partitions: Mutex<HashMap<TopicPartition, PartitionLedger>>,
    generations: Mutex<u64>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, PartitionLedger>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The partition is now owned; returns its generation.
    pub fn assign(&self, topic: &str, partition: i32) -> u64 {
        let generation = {
            let mut counter = self.generations.lock().unwrap_or_else(|p| p.into_inner());
            *counter += 1;
            *counter
        };
        self.lock().insert(
            (topic.to_string(), partition),
            PartitionLedger {
                generation,
                in_flight: BTreeSet::new(),
                next: None,
                acked: None,
            },
        );
        generation
    }

    /// The partition is no longer owned. Returns its final watermark, to
    /// commit before it is released (`None` if nothing was received).
    pub fn revoke(&self, topic: &str, partition: i32) -> Option<i64> {
        let mut ledger = self.lock().remove(&(topic.to_string(), partition))?;
        ledger.advanced().or(ledger.acked)
    }

    /// A message was received. Returns the generation to complete it with,
    /// or `None` if the partition is not owned (drop the message: its new
    /// owner will receive it).
    pub fn track(&self, topic: &str, partition: i32, offset: i64) -> Option<u64> {
        let mut partitions = self.lock();
        let ledger = partitions.get_mut(&(topic.to_string(), partition))?;
        ledger.in_flight.insert(offset);
        ledger.next = Some(ledger.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(ledger.generation)
    }

    /// The message at `offset` has a durable outcome. Returns the new
    /// watermark to store if it advanced, or `None` (also when the partition
    /// was revoked since). A message abandoned at shutdown is never
    /// completed, so the watermark never passes it.
    pub fn complete(
        &self,
        topic: &str,
        partition: i32,
        generation: u64,
        offset: i64,
    ) -> Option<i64> {
        let mut partitions = self.lock();
        let ledger = partitions.get_mut(&(topic.to_string(), partition))?;
        if ledger.generation != generation {
            return None;
        }
        ledger.in_flight.remove(&offset);
        ledger.advanced()
    }

    /// Whether `generation` is still the live ownership of the partition.
    pub fn owns(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.lock()
            .get(&(topic.to_string(), partition))
            .is_some_and(|l| l.generation == generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_waits_for_the_oldest_unfinished_offset() {
        let ledger = Ledger::default();
        let g = ledger.assign("t", 0);
        for offset in 10..15 {
            assert_eq!(ledger.track("t", 0, offset), Some(g));
        }
        // 11, 12 and 14 finish before 10: nothing may be committed.
        assert_eq!(ledger.complete("t", 0, g, 11), Some(10));
        assert_eq!(ledger.complete("t", 0, g, 12), None);
        assert_eq!(ledger.complete("t", 0, g, 14), None);
        // 10 finishes: everything below 13 is done.
        assert_eq!(ledger.complete("t", 0, g, 10), Some(13));
        // 13 finishes: everything received is done.
        assert_eq!(ledger.complete("t", 0, g, 13), Some(15));
    }

    #[test]
    fn first_watermark_is_the_first_offset_received() {
        let ledger = Ledger::default();
        let g = ledger.assign("t", 0);
        ledger.track("t", 0, 100);
        ledger.track("t", 0, 101);
        assert_eq!(ledger.complete("t", 0, g, 101), Some(100));
        assert_eq!(ledger.complete("t", 0, g, 100), Some(102));
    }

    #[test]
    fn partitions_are_independent() {
        let ledger = Ledger::default();
        let g0 = ledger.assign("t", 0);
        let g1 = ledger.assign("t", 1);
        ledger.track("t", 0, 5);
        ledger.track("t", 1, 7);
        assert_eq!(ledger.complete("t", 1, g1, 7), Some(8));
        assert_eq!(ledger.complete("t", 0, g0, 5), Some(6));
    }

    #[test]
    fn revoked_partitions_refuse_completions_and_messages() {
        let ledger = Ledger::default();
        let g = ledger.assign("t", 0);
        ledger.track("t", 0, 1);
        ledger.track("t", 0, 2);
        assert_eq!(ledger.complete("t", 0, g, 1), Some(2));
        // Revoked with 2 in flight: the final watermark stays at 2.
        assert_eq!(ledger.revoke("t", 0), Some(2));
        assert_eq!(ledger.complete("t", 0, g, 2), None);
        assert_eq!(ledger.track("t", 0, 3), None);
        // Assigned again: a new generation; the old one stays refused.
        let g2 = ledger.assign("t", 0);
        assert_ne!(g, g2);
        assert!(!ledger.owns("t", 0, g));
        ledger.track("t", 0, 2);
        assert_eq!(ledger.complete("t", 0, g, 2), None);
        assert_eq!(ledger.complete("t", 0, g2, 2), Some(3));
    }

    #[test]
    fn revoke_hands_out_unacked_progress() {
        let ledger = Ledger::default();
        let g = ledger.assign("t", 0);
        ledger.track("t", 0, 0);
        ledger.track("t", 0, 1);
        assert_eq!(ledger.complete("t", 0, g, 0), Some(1));
        assert_eq!(
            ledger.revoke("t", 0),
            Some(1),
            "committed again before release"
        );
        let g = ledger.assign("t", 0);
        ledger.track("t", 0, 1);
        assert_eq!(
            ledger.revoke("t", 0),
            Some(1),
            "nothing finished: position unchanged"
        );
        let _ = g;
    }
}
