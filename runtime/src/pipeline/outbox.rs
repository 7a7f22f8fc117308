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
//!   idempotent producer. When a publish to a topic fails, that topic's
//!   rows wait (with backoff) and are retried from the oldest, so a topic's
//!   events keep their order; other topics go on. (Rows of the failing
//!   topic that were already in flight in the same round and succeeded are
//!   the exception: they may land before the one that failed.)

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::fault;
use crate::source::Publisher;
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
    /// Topics whose last publish failed: when to try again, and the delay
    /// after that.
    blocked: HashMap<String, (Instant, Duration)>,
    /// Rows this version cannot decode; left in place, never published.
    unreadable: HashSet<u64>,
}

impl<P: Publisher> Relay<P> {
    /// A relay from `store`'s outbox to `publisher`.
    pub fn new(store: Store, publisher: P, stats: Arc<RelayStats>) -> Self {
        Self {
            store,
            publisher,
            stats,
            blocked: HashMap::new(),
            unreadable: HashSet::new(),
        }
    }

    /// Publishes rows as they are committed until `stop` turns true, then
    /// makes one last pass (rows it cannot publish stay for the next start).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let ready = self.store.outbox_ready();
        match self.store.outbox_len() {
            Ok(0) => {}
            Ok(pending) => {
                tracing::info!(
                    pending,
                    "publishing emitted events left from before the restart"
                )
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
        self.blocked.clear();
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
        let now = Instant::now();
        let (due, more) = match self.due(now) {
            Ok(found) => found,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the outbox");
                return Some(FIRST_BACKOFF);
            }
        };
        if due.is_empty() {
            let idle = Duration::from_secs(1);
            let next = self.blocked.values().map(|(at, _)| *at).min();
            return Some(next.map_or(idle, |at| at.saturating_duration_since(now).min(idle)));
        }
        // Hand every record to the producer in commit order, then wait for
        // all acknowledgements.
        let results = futures_util::future::join_all(due.iter().map(|(_, r)| {
            let id = r
                .headers
                .iter()
                .find(|(n, _)| n == EVENT_ID_HEADER)
                .and_then(|(_, v)| std::str::from_utf8(v).ok());
            self.publisher
                .send(&r.topic, r.key.as_deref(), &r.payload, &r.headers, id)
        }))
        .await;
        let mut published = Vec::new();
        let mut failed: HashSet<&str> = HashSet::new();
        for ((seq, record), result) in due.iter().zip(results) {
            match result {
                Ok(()) => published.push(*seq),
                Err(err) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if failed.insert(&record.topic) {
                        let backoff = self
                            .blocked
                            .get(&record.topic)
                            .map_or(FIRST_BACKOFF, |(_, b)| (*b * 2).min(MAX_BACKOFF));
                        tracing::error!(topic = %record.topic, seq, error = %err, retry_in_ms = backoff.as_millis() as u64,
                            "cannot publish an emitted event; it and the later ones for its topic stay in the outbox");
                        self.blocked
                            .insert(record.topic.clone(), (Instant::now() + backoff, backoff));
                    }
                }
            }
        }
        for (_, record) in &due {
            if !failed.contains(record.topic.as_str()) {
                self.blocked.remove(&record.topic);
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
        (!more).then_some(Duration::from_secs(1))
    }

    /// Up to [`BATCH`] rows to publish now, oldest first, skipping blocked
    /// topics and unreadable rows; and whether more rows may be waiting.
    fn due(
        &mut self,
        now: Instant,
    ) -> Result<(Vec<(u64, OutboxRecord)>, bool), crate::store::StoreError> {
        let mut due = Vec::new();
        let mut after = None;
        loop {
            let rows = self.store.outbox_batch(after, BATCH)?;
            let exhausted = rows.len() < BATCH;
            for (seq, row) in rows {
                after = Some(seq);
                if self.unreadable.contains(&seq) {
                    continue;
                }
                match row {
                    Ok(record) => {
                        let blocked = self
                            .blocked
                            .get(&record.topic)
                            .is_some_and(|(at, _)| *at > now);
                        if !blocked {
                            due.push((seq, record));
                            if due.len() == BATCH {
                                return Ok((due, true));
                            }
                        }
                    }
                    Err(err) => {
                        tracing::error!(seq, error = %err, "unreadable outbox row left in place");
                        self.unreadable.insert(seq);
                    }
                }
            }
            if exhausted {
                return Ok((due, false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::synthetic::MemoryPublisher;
    use crate::store::Effects;

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_are_published_in_order_and_removed_only_once_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("weir.redb")).expect("open");
        let publisher = MemoryPublisher::default();
        publisher.failing.store(true, Ordering::Relaxed);
        let stats = Arc::new(RelayStats::default());
        let (stop, stopped) = watch::channel(false);
        let relay =
            tokio::spawn(Relay::new(store.clone(), publisher.clone(), stats.clone()).run(stopped));
        for i in 0..20u32 {
            let mut emits = vec![OutboxRecord {
                topic: "out".into(),
                key: Some(b"k".to_vec()),
                payload: i.to_string().into_bytes(),
                headers: vec![],
            }];
            stamp("h", &format!("e{i}"), &mut emits);
            let write = Write::Finished {
                handler: "h".into(),
                id: format!("e{i}"),
                ttl: Duration::from_secs(60),
                dedup: true,
                effects: Some(std::sync::Arc::new(Effects {
                    emits,
                    ..Effects::default()
                })),
            };
            store.write(write).await.expect("write");
        }
        // The broker refuses: nothing is removed.
        wait_for("a failed publish", || {
            stats.failures.load(Ordering::Relaxed) > 0
        })
        .await;
        assert_eq!(store.outbox_len().expect("len"), 20);
        // It recovers: everything goes out, in commit order, then the rows go.
        publisher.failing.store(false, Ordering::Relaxed);
        wait_for("an empty outbox", || store.outbox_len().ok() == Some(0)).await;
        let _ = stop.send(true);
        relay.await.expect("relay");
        let records = publisher.records();
        let payloads: Vec<String> = records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect();
        let expected: Vec<String> = (0..20).map(|i: u32| i.to_string()).collect();
        assert_eq!(payloads, expected);
        assert_eq!(stats.published.load(Ordering::Relaxed), 20);
        let first_id = records[0]
            .headers
            .iter()
            .find(|(n, _)| n == EVENT_ID_HEADER)
            .map(|(_, v)| v.clone());
        assert_eq!(first_id, Some(emitted_event_id("h", "e0", 0).into_bytes()));
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = emitted_event_id("h", "e1", 0);
        assert_eq!(a, emitted_event_id("h", "e1", 0));
        assert_eq!(a.len(), 32);
        assert_ne!(a, emitted_event_id("h", "e1", 1));
        assert_ne!(a, emitted_event_id("h2", "e1", 0));
        assert_ne!(a, emitted_event_id("h", "e2", 0));
        // Length-prefixed, so the parts cannot slide into each other.
        assert_ne!(
            emitted_event_id("ab", "c", 0),
            emitted_event_id("a", "bc", 0)
        );
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
        assert_eq!(
            id(&emits[0]),
            Some(emitted_event_id("h", "src", 0).into_bytes())
        );
        assert_eq!(id(&emits[1]), Some(b"mine".to_vec()));
        assert!(
            emits[0]
                .headers
                .contains(&(SOURCE_EVENT_ID_HEADER.into(), b"src".to_vec()))
        );
    }
}
