//! Which offsets may be committed: a per-partition contiguous watermark.
//!
//! Messages of one partition are settled out of order when different keys
//! run in parallel. The committed position must never pass a message that is
//! not settled, so the ledger tracks, per owned partition, the offsets in
//! flight and the highest offset received.
//!
//! Invariant: the watermark of a partition is the smallest offset still in
//! flight, or (when nothing is in flight) one past the highest offset
//! received. Every offset below the watermark was settled `Done` or
//! `DeadLettered`. Only a watermark that advanced is handed out for storing.
//! A released offset stays in flight, so the watermark never passes it.
//!
//! Ownership: each assignment of a partition gets its own [`Slot`] with a
//! new generation. A delivery holds the slot it was tracked in; once the
//! partition is revoked the slot is dead for good (a later assignment gets a
//! new one), so nothing is ever acknowledged on behalf of a partition this
//! process no longer owns. The liveness flag changes only under the slot's
//! lock, together with its final watermark, so a completion racing a revoke
//! either lands before the final commit or not at all.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::lock::Unpoisoned;

#[derive(Debug, Default)]
struct Marks {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The last watermark handed out.
    acked: Option<i64>,
}

impl Marks {
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

/// One assignment of one partition.
#[derive(Debug)]
pub struct Slot {
    /// The partition's topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Unique among every assignment this process has seen.
    pub generation: u64,
    live: AtomicBool,
    marks: Mutex<Marks>,
}

impl Slot {
    fn marks(&self) -> MutexGuard<'_, Marks> {
        self.marks.locked()
    }

    /// Whether the partition is still owned under this assignment.
    pub fn owned(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// The message at `offset` is settled. Returns the new watermark to
    /// store if it advanced; `None` if it did not or the partition was
    /// revoked since.
    pub fn complete(&self, offset: i64) -> Option<i64> {
        let mut marks = self.marks();
        if !self.owned() {
            return None;
        }
        marks.in_flight.remove(&offset);
        marks.advanced()
    }
}

/// Offsets in flight for every partition a consumer owns. Shared between
/// the consumer and its rebalance callbacks.
#[derive(Debug, Default)]
pub struct Ledger {
    partitions: Mutex<HashMap<String, HashMap<i32, Arc<Slot>>>>,
    generations: AtomicU64,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<i32, Arc<Slot>>>> {
        self.partitions.locked()
    }

    /// The partition is now owned; returns its generation.
    pub fn assign(&self, topic: &str, partition: i32) -> u64 {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = Arc::new(Slot {
            topic: topic.to_string(),
            partition,
            generation,
            live: AtomicBool::new(true),
            marks: Mutex::default(),
        });
        let old = self
            .lock()
            .entry(topic.to_string())
            .or_default()
            .insert(partition, slot);
        if let Some(old) = old {
            let _marks = old.marks();
            old.live.store(false, Ordering::Release);
        }
        generation
    }

    /// Whether the partition is owned now.
    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.lock()
            .get(topic)
            .is_some_and(|partitions| partitions.contains_key(&partition))
    }

    /// The partition is no longer owned. Returns its final watermark, to
    /// commit before it is released (`None` if nothing was received).
    pub fn revoke(&self, topic: &str, partition: i32) -> Option<i64> {
        let slot = self.lock().get_mut(topic)?.remove(&partition)?;
        let mut marks = slot.marks();
        slot.live.store(false, Ordering::Release);
        marks.advanced().or(marks.acked)
    }

    /// A message was received. Returns the slot to settle it in, or `None`
    /// if the partition is not owned (drop the message: its new owner will
    /// receive it).
    pub fn track(&self, topic: &str, partition: i32, offset: i64) -> Option<Arc<Slot>> {
        let slot = self.lock().get(topic)?.get(&partition)?.clone();
        {
            let mut marks = slot.marks();
            if !slot.owned() {
                return None;
            }
            marks.in_flight.insert(offset);
            marks.next = Some(marks.next.map_or(offset + 1, |n| n.max(offset + 1)));
        }
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(ledger: &Ledger, offset: i64) -> Arc<Slot> {
        ledger.track("t", 0, offset).expect("owned")
    }

    #[test]
    fn watermark_waits_for_the_oldest_unfinished_offset() {
        let ledger = Ledger::default();
        ledger.assign("t", 0);
        let slots: Vec<Arc<Slot>> = (10..15).map(|o| track(&ledger, o)).collect();
        let slot = &slots[0];
        // 11, 12 and 14 finish before 10: nothing may be committed.
        assert_eq!(slot.complete(11), Some(10));
        assert_eq!(slot.complete(12), None);
        assert_eq!(slot.complete(14), None);
        // 10 finishes: everything below 13 is done.
        assert_eq!(slot.complete(10), Some(13));
        // 13 finishes: everything received is done.
        assert_eq!(slot.complete(13), Some(15));
    }

    #[test]
    fn first_watermark_is_the_first_offset_received() {
        let ledger = Ledger::default();
        ledger.assign("t", 0);
        track(&ledger, 100);
        let slot = track(&ledger, 101);
        assert_eq!(slot.complete(101), Some(100));
        assert_eq!(slot.complete(100), Some(102));
    }

    #[test]
    fn partitions_are_independent() {
        let ledger = Ledger::default();
        let g0 = ledger.assign("t", 0);
        let g1 = ledger.assign("t", 1);
        assert_ne!(g0, g1);
        let s0 = ledger.track("t", 0, 5).expect("owned");
        let s1 = ledger.track("t", 1, 7).expect("owned");
        assert_eq!(s1.complete(7), Some(8));
        assert_eq!(s0.complete(5), Some(6));
    }

    #[test]
    fn revoked_partitions_refuse_completions_and_messages() {
        let ledger = Ledger::default();
        let g = ledger.assign("t", 0);
        let slot = track(&ledger, 1);
        track(&ledger, 2);
        assert_eq!(slot.complete(1), Some(2));
        // Revoked with 2 in flight: the final watermark stays at 2.
        assert_eq!(ledger.revoke("t", 0), Some(2));
        assert!(!slot.owned());
        assert_eq!(slot.complete(2), None);
        assert!(ledger.track("t", 0, 3).is_none());
        // Assigned again: a new slot; the old one stays dead.
        let g2 = ledger.assign("t", 0);
        assert_ne!(g, g2);
        assert!(!slot.owned());
        let again = track(&ledger, 2);
        assert_eq!(again.generation, g2);
        assert_eq!(slot.complete(2), None);
        assert_eq!(again.complete(2), Some(3));
    }

    #[test]
    fn revoke_hands_out_unacked_progress() {
        let ledger = Ledger::default();
        ledger.assign("t", 0);
        let slot = track(&ledger, 0);
        track(&ledger, 1);
        assert_eq!(slot.complete(0), Some(1));
        assert_eq!(
            ledger.revoke("t", 0),
            Some(1),
            "committed again before release"
        );
        ledger.assign("t", 0);
        track(&ledger, 1);
        assert_eq!(
            ledger.revoke("t", 0),
            Some(1),
            "nothing finished: position unchanged"
        );
    }

    #[test]
    fn a_released_offset_holds_the_watermark() {
        let ledger = Ledger::default();
        ledger.assign("t", 0);
        let slot = track(&ledger, 0);
        track(&ledger, 1);
        // 0 is released (never completed); 1 finishes.
        assert_eq!(slot.complete(1), Some(0));
        assert_eq!(ledger.revoke("t", 0), Some(0));
    }
}
