//! The outbox relay: publishes the events handlers emitted, after the
//! transaction that recorded them is durable.
//!
//! Invariants:
//!
//! - An emitted event exists only as an outbox row written in the same
//!   transaction as its handler's outcome (see `store.rs`); a failed or
//!   crashed call leaves no row, so nothing is published for it.
//! - A row is deleted only after the broker acknowledged its record. A crash
//!   between the acknowledgement and the delete publishes it again after the
//!   restart: at least once, never lost.
//! - Every publication of a row carries the same `event_id` header, derived
//!   from the source event id, the handler and the emit's index, so a
//!   consumer that deduplicates by it (as Weir does by default) sees each
//!   emitted event once.
//! - Rows are published in the order they were committed, through an
//!   idempotent producer, so events for one partition keep their order
//!   unless a publish fails and is retried later.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::publish::Publisher;
use crate::fault;
use crate::store::{OutboxRecord, Store, Write};

/// The header carrying an emitted event's deterministic id.
pub const EVENT_ID_HEADER: &str = "event_id";
/// The header naming the event whose handling emitted it.
pub const SOURCE_EVENT_ID_HEADER: &str = "weir.source-event-id";
/// The header naming the handler that emitted it.
pub const HANDLER_HEADER: &str = "weir.handler";

/// Rows read and published per round.
const BATCH: usize = 512;
/// First delay before a failed row is tried again; doubles up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The deterministic id of the `index`-th event emitted by `handler` while
/// handling event `source_id`: the same on every run, different for every
/// (source, handler, index).
pub fn emitted_event_id(handler: &str, source_id: &str, index: usize) -> String {
    let mut hash = Sha256::new();
    for part in [handler.as_bytes(), source_id.as_bytes()] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hash.update((index as u64).to_le_bytes());
    hash.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Adds the id, source and handler headers to events emitted by `handler`
/// while handling `source_id`. An `event_id` the handler set itself is
/// kept.
pub fn stamp(handler: &str, source_id: &str, emits: &mut [OutboxRecord]) {
    for (index, record) in emits.iter_mut().enumerate() {
        if !record.headers.iter().any(|(n, _)| n == EVENT_ID_HEADER) {
            record.headers.push((
                EVENT_ID_HEADER.to_string(),
                emitted_event_id(handler, source_id, index).into_bytes(),
            ));
        }
        record.headers.push((
            SOURCE_EVENT_ID_HEADER.to_string(),
            source_id.as_bytes().to_vec(),
        ));
        record
            .headers
            .push((HANDLER_HEADER.to_string(), handler.as_bytes().to_vec()));
    }
}

/// Counters of the relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Records acknowledged by the broker.
    pub published: AtomicU64,
    /// Publish attempts that failed (and will be retried).
    pub failures: AtomicU64,
}

/// Publishes outbox rows until told to stop.
pub struct Relay<P: Publisher> {
    store: Store,
    publisher: P,
    stats: Arc<RelayStats>,
    /// Rows that failed: when to try again, and the delay after that.
    retry: HashMap<u64, (Instant, Duration)>,
}

impl<P: Publisher> Relay<P> {
    /// A relay from `store`'s outbox to `publisher`.
    pub fn new(store: Store, publisher: P, stats: Arc<RelayStats>) -> Self {
        Self {
            store,
            publisher,
            stats,
            retry: HashMap::new(),
        }
    }

    /// Publishes rows as they are committed until `stop` turns true, then
    /// makes one last pass (rows it cannot publish stay for the next start).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let ready = self.store.outbox_ready();
        match self.store.outbox_len() {
            Ok(0) => {}
            Ok(pending) => {
                tracing::info!(pending, "publishing emitted events left from before the restart")
            }
            Err(err) => tracing::error!(error = %err, "cannot read the outbox"),
        }
        loop {
            // Register interest before reading, so a commit between the
            // read and the wait is not missed.
            let notified = ready.notified();
            let wait = self.round().await;
            if *stop.borrow() {
                break;
            }
            if let Some(wait) = wait {
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
        }
        self.retry.clear();
        self.round().await;
        match self.store.outbox_len() {
            Ok(0) => tracing::debug!("outbox empty"),
            Ok(pending) => tracing::warn!(
                pending,
                "emitted events not yet acknowledged by the broker; they are published after the next start"
            ),
            Err(err) => tracing::error!(error = %err, "cannot read the outbox"),
        }
    }

    /// Publishes what is due. Returns how long to wait for more (`None`:
    /// go again at once, there may be more).
    async fn round(&mut self) -> Option<Duration> {
        let rows = match self.store.outbox_batch(None, BATCH) {
            Ok(rows) => rows,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the outbox");
                return Some(FIRST_BACKOFF);
            }
        };
        let full = rows.len() == BATCH;
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next_retry: Option<Instant> = None;
        for (seq, row) in rows {
            if let Some((at, _)) = self.retry.get(&seq)
                && *at > now
            {
                next_retry = Some(next_retry.map_or(*at, |n| n.min(*at)));
                continue;
            }
            match row {
                Ok(record) => due.push((seq, record)),
                Err(err) => {
                    // Not publishable by this version; kept, never dropped.
                    tracing::error!(seq, error = %err, "unreadable outbox row left in place");
                    self.retry.insert(seq, (now + MAX_BACKOFF, MAX_BACKOFF));
                }
            }
        }
        if due.is_empty() {
            let idle = Duration::from_secs(1);
            return Some(next_retry.map_or(idle, |at| at.saturating_duration_since(now).min(idle)));
        }
        // Hand every record to the producer in commit order, then wait for
        // all acknowledgements.
        let results = futures_util::future::join_all(due.iter().map(|(_, r)| {
            self.publisher
                .send(&r.topic, r.key.as_deref(), &r.payload, &r.headers)
        }))
        .await;
        let mut published = Vec::new();
        for ((seq, record), result) in due.iter().zip(results) {
            match result {
                Ok(()) => {
                    published.push(*seq);
                    self.retry.remove(seq);
                }
                Err(err) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    let backoff = self
                        .retry
                        .get(seq)
                        .map_or(FIRST_BACKOFF, |(_, b)| (*b * 2).min(MAX_BACKOFF));
                    tracing::error!(topic = %record.topic, seq, error = %err, retry_in_ms = backoff.as_millis() as u64,
                        "cannot publish an emitted event; it stays in the outbox");
                    self.retry.insert(*seq, (Instant::now() + backoff, backoff));
                }
            }
        }
        if published.is_empty() {
            return Some(FIRST_BACKOFF);
        }
        // Fault point: the broker has the records, the outbox still has
        // their rows.
        fault::point("after-publish");
        let count = published.len() as u64;
        if let Err(err) = self.store.write(Write::Published { seqs: published }).await {
            // They will be published again: duplicates, never losses.
            tracing::error!(error = %err, "cannot remove published rows from the outbox");
            return Some(FIRST_BACKOFF);
        }
        self.stats.published.fetch_add(count, Ordering::Relaxed);
        (!full && self.retry.is_empty()).then_some(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = emitted_event_id("h", "e1", 0);
        assert_eq!(a, emitted_event_id("h", "e1", 0));
        assert_eq!(a.len(), 32);
        assert_ne!(a, emitted_event_id("h", "e1", 1));
        assert_ne!(a, emitted_event_id("h2", "e1", 0));
        assert_ne!(a, emitted_event_id("h", "e2", 0));
        // Length-prefixed, so the parts cannot slide into each other.
        assert_ne!(emitted_event_id("ab", "c", 0), emitted_event_id("a", "bc", 0));
    }

    #[test]
    fn stamping_keeps_an_id_the_handler_chose() {
        let record = |headers: Vec<(String, Vec<u8>)>| OutboxRecord {
            topic: "t".into(),
            key: None,
            payload: vec![],
            headers,
        };
        let mut emits = vec![
            record(vec![]),
            record(vec![(EVENT_ID_HEADER.into(), b"mine".to_vec())]),
        ];
        stamp("h", "src", &mut emits);
        let id = |r: &OutboxRecord| {
            r.headers
                .iter()
                .find(|(n, _)| n == EVENT_ID_HEADER)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(id(&emits[0]), Some(emitted_event_id("h", "src", 0).into_bytes()));
        assert_eq!(id(&emits[1]), Some(b"mine".to_vec()));
        assert!(
            emits[0]
                .headers
                .contains(&(SOURCE_EVENT_ID_HEADER.into(), b"src".to_vec()))
        );
    }
}
