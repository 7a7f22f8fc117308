//! The outbox relay: publishes the events handlers emitted, after the
//! transaction that recorded them is durable.
//!
//! # How it works
//!
//! The relay reads outbox rows in sequence order, from a cursor, into one
//! queue per destination topic (a *lane*). Each lane hands its rows to the
//! publisher in order, up to `MAX_IN_FLIGHT` (512) awaiting acknowledgement at
//! once, and answers for itself: its acknowledgements, failures and backoff
//! concern no other lane. Acknowledged rows are deleted from the outbox in
//! batches, one store write at a time. All of it runs in the relay's one
//! task; nothing in it waits for a particular publish.
//!
//! # Invariants
//!
//! - **Emitted in the outcome's transaction.** An emitted event exists
//!   only as an outbox row written in the same transaction as its handler's
//!   outcome (see [`store`](crate::store)); a failed or crashed call leaves no row, so
//!   nothing is published for it.
//! - **Delete after acknowledgement.** A row is deleted only after the
//!   broker acknowledged its record. A crash between the acknowledgement and
//!   the delete publishes it again after the restart: at least once, never
//!   lost.
//! - **Deterministic ids.** Every publication of a row carries the same
//!   `event_id` header, derived from the source event id, the handler and
//!   the emit's index, so a consumer that deduplicates by it (as Weir does
//!   by default) sees each emitted event once.
//! - **Cursor.** Outbox sequence numbers only grow, and a commit becomes
//!   visible whole (the store's one writer hands them out inside the
//!   transaction), so a row committed after a read sorts after every row
//!   that read returned. The relay therefore reads only rows after the
//!   highest sequence number it has read. A fresh relay starts before the
//!   first row, so rows left from before a restart are published. No row is
//!   read twice in one run: a lane retries its own failed rows from memory.
//! - **Order per topic.** A lane hands its records to the publisher in
//!   sequence (commit) order, through an idempotent producer; the
//!   [`Publisher`] keeps the order in which send futures are first polled,
//!   and the relay polls each one as it starts it. When a publish fails, the
//!   lane hands out nothing more, waits for its publishes in flight, backs
//!   off (200 ms, doubling up to 30 s, reset by a success) and starts again
//!   from its oldest unacknowledged row. The exception: rows that were
//!   already in flight behind the one that failed, and succeeded, are not
//!   sent again, so they may land before it.
//! - **Topics are independent.** A lane waits only for its own
//!   acknowledgements and its own backoff, never for another lane's. What
//!   lanes share is memory: reading stops while they hold `MAX_HELD` (4096) rows
//!   (read and not yet acknowledged) and resumes as they drain. So a topic
//!   blocked long enough to fill that holds up the *reading* of newer rows
//!   for all topics, though never the publishing or deleting of rows
//!   already read.
//! - **A failed delete is not a failed publish.** If deleting acknowledged
//!   rows fails, the rows stay in the outbox, so they are published again
//!   after a restart (duplicates, never losses), but not again in this run:
//!   they stay marked as acknowledged and their delete is retried, with
//!   backoff.
//! - **Refused for good.** When the broker refuses a row's event for good
//!   ([`crate::source::Refused`]: larger than it takes, a topic name it does
//!   not accept), retrying cannot help and would block the topic: the row
//!   is sent instead, at once and in its place, as a dead letter to
//!   `<topic>.dlq` (Weir's dead-letter headers, kind `permanent`, the
//!   refusal as `weir.error`), and if that is refused too, as the dead
//!   letter without its payload (`weir.payload-dropped` gives its size and
//!   SHA-256). The row is deleted only once one of them is acknowledged, so
//!   nothing is lost silently; a crash before that starts over from the
//!   event. A refusal of the last form is an ordinary failure.
//! - **Unreadable rows**, which this version cannot decode, are logged once
//!   as the cursor passes them and left in place: never published, never
//!   holding up the cursor.
//! - **No missed wake-up.** The relay registers for the store's "rows
//!   added" notification before each read, so a commit landing between the
//!   read and the wait still wakes it. It also wakes when a lane's backoff
//!   or a delete's retry is due.
//! - **Last pass.** On stop, the relay reads to the end of the outbox once
//!   more (the workers' last outcomes may have added rows), publishes what
//!   it can without waiting for any backoff (a lane whose publish fails
//!   then gives up), waits for the publishes in flight (bounded by the
//!   publisher's own delivery timeout, and by the runtime's shutdown
//!   deadline), deletes what was acknowledged and reports what is left for
//!   the next start.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::fault;
use crate::lock::Unpoisoned;
use crate::source::{Publisher, Receipt};
use crate::store::{Applied, OutboxRecord, Store, StoreError, Write};

/// The header carrying an emitted event's deterministic id.
pub const EVENT_ID_HEADER: &str = "event_id";
/// The header naming the event whose handling emitted it.
pub const SOURCE_EVENT_ID_HEADER: &str = "weir.source-event-id";
/// The header naming the handler that emitted it.
pub const HANDLER_HEADER: &str = "weir.handler";

/// Rows read from the store at a time.
const BATCH: usize = 512;
/// Most records of one topic handed to the publisher and not yet answered.
const MAX_IN_FLIGHT: usize = 512;
/// Reading stops while the lanes hold this many rows (see "Topics are
/// independent"); it may overshoot by less than a [`BATCH`].
const MAX_HELD: usize = 4096;
/// First delay before a failed publish or delete is tried again; doubles up
/// to the cap.
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
    /// Publishes the broker refused for good, each answered by sending the
    /// row as a dead letter instead ("Refused for good").
    pub refused: AtomicU64,
    /// Where acknowledged records are also counted, by topic.
    pub metrics: Option<crate::metrics::Metrics>,
    /// Topics whose publishes fail: since when (the first failure after a
    /// success), and the last error. A topic leaves at its next success.
    failing: Mutex<BTreeMap<String, (Instant, String)>>,
}

impl RelayStats {
    /// Counters that also record `metrics`.
    pub fn recording(metrics: crate::metrics::Metrics) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    fn failing(&self) -> MutexGuard<'_, BTreeMap<String, (Instant, String)>> {
        self.failing.locked()
    }

    /// Topics whose publishes have failed for at least `longer_than`, with
    /// how long and the last error: the relay is blocked on them.
    pub fn blocked(&self, longer_than: Duration) -> Vec<(String, Duration, String)> {
        let now = Instant::now();
        self.failing()
            .iter()
            .filter_map(|(topic, (since, error))| {
                let failing = now.saturating_duration_since(*since);
                (failing >= longer_than).then(|| (topic.clone(), failing, error.clone()))
            })
            .collect()
    }
}

/// The broker's answer for one row: the topic of its lane (the emitted
/// event's, whatever the row has become since: "Refused for good"), its
/// sequence number, the record sent, and whether the broker acknowledged
/// it.
type Answer = (Arc<str>, u64, Arc<OutboxRecord>, anyhow::Result<Receipt>);
/// A publish in flight.
type Sending = Pin<Box<dyn Future<Output = Answer> + Send>>;
/// A delete in flight, with the rows it deletes.
type Deleting = Pin<Box<dyn Future<Output = (Vec<u64>, Result<Applied, StoreError>)> + Send>>;

/// Publishes outbox rows until told to stop.
pub struct Relay<P: Publisher> {
    store: Store,
    publisher: Arc<P>,
    /// The highest sequence number read (see "Cursor"); `None` before the
    /// first row.
    cursor: Option<u64>,
    /// Rows may be waiting after the cursor: set by the store's
    /// notification, cleared when a read reaches the end.
    behind: bool,
    /// After a failed read: when to read again.
    read_retry_at: Option<Instant>,
    /// One queue per topic; a topic without rows or publishes has none.
    lanes: HashMap<Arc<str>, Lane>,
    /// The publishes in flight, of all lanes. Unordered: each answer goes
    /// to its own lane as soon as it comes, whatever the others do.
    sending: FuturesUnordered<Sending>,
    books: Books,
    /// The delete in flight, if any: one store write at a time.
    deleting: Option<Deleting>,
    /// After a failed delete: when to try again, and the delay used.
    delete_retry: Option<(Instant, Duration)>,
    /// A delete failed during the last pass: leave the rest to the next
    /// start.
    delete_given_up: bool,
    /// Rows read from the store in this run (test support: the "Cursor"
    /// invariant says each row is read once).
    rows_read: Arc<AtomicU64>,
}

/// What the lanes' answers add up to.
struct Books {
    /// Rows held by all lanes (see "Topics are independent").
    held: usize,
    /// Acknowledged rows not yet deleted, or whose delete failed.
    acknowledged: Vec<u64>,
    stats: Arc<RelayStats>,
    /// Stop was asked: this is the last pass.
    finishing: bool,
}

/// One topic's rows, read and not yet acknowledged, oldest first.
#[derive(Default)]
struct Lane {
    /// In sequence order. An acknowledged row stays until every older one
    /// is acknowledged too, so the front is the oldest unacknowledged row.
    rows: VecDeque<Row>,
    /// Where in `rows` to look for the next row to hand out.
    next: usize,
    /// Rows handed to the publisher and not yet answered.
    in_flight: usize,
    /// Set by a failure: nothing is handed out until every publish in flight
    /// has answered and this time has passed.
    retry_at: Option<Instant>,
    /// The delay after the last failure; `None` after a success.
    backoff: Option<Duration>,
    /// A publish failed during the last pass: the rest wait for the next
    /// start.
    given_up: bool,
    /// Its last answer was a failure (the topic is in
    /// [`RelayStats::blocked`]'s list).
    failing: bool,
}

struct Row {
    seq: u64,
    record: Arc<OutboxRecord>,
    state: RowState,
    /// How far refusals for good have taken it ("Refused for good").
    refused: Refusals,
}

/// What a row has become after the broker refused it for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusals {
    /// The emitted event as it was committed.
    None,
    /// Its dead letter.
    DeadLetter,
    /// Its dead letter without the payload.
    WithoutPayload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowState {
    /// To be handed to the publisher (again, after a failure).
    Waiting,
    /// Handed to the publisher, no answer yet.
    Sent,
    /// Acknowledged by the broker.
    Acknowledged,
}

impl Lane {
    fn push(&mut self, seq: u64, record: Arc<OutboxRecord>) {
        self.rows.push_back(Row {
            seq,
            record,
            state: RowState::Waiting,
            refused: Refusals::None,
        });
    }

    /// The broker refused row `seq` for good (`why`): it becomes its dead
    /// letter, or that dead letter without its payload, to be sent next,
    /// without a backoff ("Refused for good"). `false` when it already was
    /// both: the refusal is then an ordinary failure.
    fn refused(&mut self, seq: u64, why: &str) -> bool {
        let Ok(index) = self.rows.binary_search_by_key(&seq, |row| row.seq) else {
            return false;
        };
        let row = &mut self.rows[index];
        let (record, refused) = match row.refused {
            Refusals::None => (
                super::dlq::of_refused_emit(&row.record, why),
                Refusals::DeadLetter,
            ),
            Refusals::DeadLetter if !row.record.payload.is_empty() => (
                OutboxRecord {
                    topic: row.record.topic.clone(),
                    key: row.record.key.clone(),
                    payload: Vec::new(),
                    headers: super::dlq::without_payload(
                        &row.record.payload,
                        &row.record.headers,
                        why,
                    ),
                },
                Refusals::WithoutPayload,
            ),
            _ => return false,
        };
        row.record = Arc::new(record);
        row.refused = refused;
        row.state = RowState::Waiting;
        self.in_flight = self.in_flight.saturating_sub(1);
        self.next = self.next.min(index);
        true
    }

    /// The next row to hand to the publisher, marked sent, if the lane may
    /// send now. In the last pass (`finishing`), a backoff is not waited
    /// out.
    fn next_to_send(&mut self, now: Instant, finishing: bool) -> Option<(u64, Arc<OutboxRecord>)> {
        if self.given_up {
            return None;
        }
        if let Some(at) = self.retry_at {
            // "Order per topic": start again only once every publish in
            // flight has answered, so the retry begins at the true oldest
            // unacknowledged row and nothing older is still on its way.
            if self.in_flight > 0 || (!finishing && now < at) {
                return None;
            }
            self.retry_at = None;
            self.next = 0;
        }
        while self.in_flight < MAX_IN_FLIGHT {
            let row = self.rows.get_mut(self.next)?;
            self.next += 1;
            // Rows acknowledged behind a failed one are skipped: the
            // exception in "Order per topic".
            if row.state == RowState::Waiting {
                row.state = RowState::Sent;
                self.in_flight += 1;
                return Some((row.seq, row.record.clone()));
            }
        }
        None
    }

    /// Takes the broker's answer for row `seq`. Returns how many rows left
    /// the lane (acknowledged, with nothing older unacknowledged) and, when
    /// this failure starts a backoff, its length.
    fn answer(
        &mut self,
        seq: u64,
        acknowledged: bool,
        now: Instant,
        finishing: bool,
    ) -> (usize, Option<Duration>) {
        let Ok(index) = self.rows.binary_search_by_key(&seq, |row| row.seq) else {
            // Not one of ours: cannot happen, every send comes from a row.
            return (0, None);
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        let mut backoff = None;
        if acknowledged {
            self.rows[index].state = RowState::Acknowledged;
            if self.retry_at.is_none() {
                self.backoff = None;
            }
        } else {
            self.rows[index].state = RowState::Waiting;
            if finishing {
                self.given_up = true;
            }
            // Later failures of the same attempt (rows that were in flight
            // with it) neither log nor lengthen the backoff again.
            if self.retry_at.is_none() {
                let delay = self
                    .backoff
                    .map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                self.backoff = Some(delay);
                self.retry_at = Some(now + delay);
                backoff = Some(delay);
            }
        }
        let mut left = 0;
        while self
            .rows
            .front()
            .is_some_and(|row| row.state == RowState::Acknowledged)
        {
            self.rows.pop_front();
            left += 1;
        }
        self.next = self.next.saturating_sub(left);
        (left, backoff)
    }

    /// Nothing held and nothing in flight: the lane can go.
    fn is_idle(&self) -> bool {
        self.rows.is_empty() && self.in_flight == 0
    }
}

impl Books {
    /// Applies the broker's answer for a row of `lane`.
    fn settle(&mut self, lane: &mut Lane, (topic, seq, record, result): Answer) {
        let now = Instant::now();
        match result {
            Ok(receipt) => {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                if let Some(metrics) = &self.stats.metrics {
                    metrics.produced(&record.topic, receipt.partition);
                }
                if lane.failing {
                    lane.failing = false;
                    self.stats.failing().remove(&*topic);
                }
                tracing::debug!(event = "message_produced", topic = %record.topic, seq,
                    causation_id = text_header(&record.headers, super::correlation::CAUSATION_HEADER),
                    correlation_id = text_header(&record.headers, "correlation_id"), "message_produced");
                let (left, _) = lane.answer(seq, true, now, self.finishing);
                self.held = self.held.saturating_sub(left);
                // "Delete after acknowledgement": only acknowledged rows
                // are ever queued for deletion.
                self.acknowledged.push(seq);
            }
            Err(err) => {
                if let Some(refused) = crate::source::refusal(&err)
                    && lane.refused(seq, &refused.0)
                {
                    tracing::error!(topic = %record.topic, seq, error = %err,
                        "the broker refuses an emitted event for good; it goes to the dead-letter topic instead");
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                lane.failing = true;
                self.stats
                    .failing()
                    .entry(topic.to_string())
                    .or_insert_with(|| (now, String::new()))
                    .1 = format!("{err:#}");
                let gave_up_before = lane.given_up;
                let (left, backoff) = lane.answer(seq, false, now, self.finishing);
                self.held = self.held.saturating_sub(left);
                if self.finishing && !gave_up_before {
                    tracing::warn!(topic = %record.topic, seq, error = %err,
                        "cannot publish an emitted event while stopping; it and the later ones for its topic are published after the next start");
                } else if let Some(backoff) = backoff
                    && !self.finishing
                {
                    tracing::error!(topic = %record.topic, seq, error = %err, retry_in_ms = backoff.as_millis() as u64,
                        "cannot publish an emitted event; it and the later ones for its topic wait in the outbox");
                } else {
                    tracing::debug!(topic = %record.topic, seq, error = %err, "another publish of a failing topic failed");
                }
            }
        }
    }
}

/// Starts publishing `record`, row `seq` of the lane of `topic`.
fn publish<P: Publisher>(
    publisher: Arc<P>,
    topic: Arc<str>,
    seq: u64,
    record: Arc<OutboxRecord>,
) -> Sending {
    Box::pin(async move {
        let id = record
            .headers
            .iter()
            .find(|(n, _)| n == EVENT_ID_HEADER)
            .and_then(|(_, v)| std::str::from_utf8(v).ok());
        let result = publisher
            .send(
                &record.topic,
                record.key.as_deref(),
                &record.payload,
                &record.headers,
                id,
            )
            .await;
        (topic, seq, record, result)
    })
}

/// Relays `store`'s outbox while this process holds its relay lease
/// ([`Store::relay_lease`]: always, for the embedded database; for
/// PostgreSQL, while no other process does), until `stop` turns true. A
/// lost lease stops the relay (after its last pass) and waits for the
/// lease again; a fresh relay starts from the oldest row left, so a row
/// acknowledged but not yet deleted when the lease moved is published
/// again (at least once, as after a crash).
pub async fn relay_with_lease<P: Publisher>(
    store: Store,
    make: impl Fn() -> Relay<P>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pause = FIRST_BACKOFF;
    loop {
        let lease = tokio::select! {
            lease = store.relay_lease() => lease,
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut lease = match lease {
            Ok(lease) => {
                pause = FIRST_BACKOFF;
                lease
            }
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?pause, "cannot take the outbox relay lease");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                pause = (pause * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let (relay_stop, relay_watch) = watch::channel(false);
        let relay = make().run(relay_watch);
        let mut relay = pin!(relay);
        let stopping = tokio::select! {
            () = &mut relay => return,
            _ = stop.wait_for(|s| *s) => true,
            () = lease.lost() => false,
        };
        let _ = relay_stop.send(true);
        relay.await;
        drop(lease);
        if stopping {
            return;
        }
        tracing::warn!("the outbox relay lost its lease; waiting to take it again");
    }
}

/// Polls `send` once, in the caller's task, so that the record reaches the
/// publisher now, in the order the lane hands rows out ("Order per topic"),
/// however a set of futures later orders its polls. (The task may be woken
/// once for nothing: the set polls the future again with its own waker.)
async fn first_poll(send: &mut Sending) -> Poll<Answer> {
    std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await
}

/// The answer of the delete in flight; never, if there is none.
async fn deleted(deleting: &mut Option<Deleting>) -> (Vec<u64>, Result<Applied, StoreError>) {
    match deleting {
        Some(write) => write.await,
        None => std::future::pending().await,
    }
}

impl<P: Publisher> Relay<P> {
    /// A relay from `store`'s outbox to `publisher`.
    pub fn new(store: Store, publisher: P, stats: Arc<RelayStats>) -> Self {
        Self {
            store,
            publisher: Arc::new(publisher),
            cursor: None,
            behind: true,
            read_retry_at: None,
            lanes: HashMap::new(),
            sending: FuturesUnordered::new(),
            books: Books {
                held: 0,
                acknowledged: Vec::new(),
                stats,
                finishing: false,
            },
            deleting: None,
            delete_retry: None,
            delete_given_up: false,
            rows_read: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Publishes rows as they are committed until `stop` turns true (or its
    /// sender goes away), then makes one last pass (rows it cannot publish
    /// stay for the next start).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let ready = self.store.outbox_ready();
        match self.store.outbox_len().await {
            Ok(0) => {}
            Ok(pending) => {
                tracing::info!(
                    pending,
                    "publishing emitted events left from before the restart"
                )
            }
            Err(err) => tracing::error!(error = %err, "cannot read the outbox"),
        }
        let mut notified = pin!(ready.notified());
        loop {
            if !self.books.finishing && *stop.borrow() {
                self.finish();
            }
            let finishing = self.books.finishing;
            let may_read = self
                .read_retry_at
                .is_none_or(|at| finishing || at <= Instant::now());
            if self.behind && may_read {
                // "No missed wake-up": register before reading.
                notified.set(ready.notified());
                notified.as_mut().enable();
                self.read().await;
            }
            self.dispatch().await;
            self.start_delete();
            if finishing {
                if self.behind && self.books.held < MAX_HELD {
                    // The last pass reads to the end, as memory allows.
                    continue;
                }
                if self.sending.is_empty() && self.deleting.is_none() {
                    break;
                }
            }
            let wake = self.next_wake();
            let sleep = tokio::time::sleep_until(
                wake.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
            );
            tokio::select! {
                Some(answer) = self.sending.next(), if !self.sending.is_empty() => self.answer(answer),
                result = deleted(&mut self.deleting), if self.deleting.is_some() => {
                    self.deleting = None;
                    self.after_delete(result);
                }
                _ = notified.as_mut(), if !self.behind && !finishing => self.behind = true,
                _ = sleep, if wake.is_some() => {}
                _ = stop.wait_for(|s| *s), if !finishing => self.finish(),
            }
        }
        let left_behind: usize = self
            .lanes
            .values()
            .filter(|lane| lane.given_up)
            .map(|lane| lane.rows.len())
            .sum();
        tracing::debug!(
            rows_read = self.rows_read.load(Ordering::Relaxed),
            left_behind,
            "outbox relay stopped"
        );
        match self.store.outbox_len().await {
            Ok(0) => tracing::debug!("outbox empty"),
            Ok(pending) => tracing::warn!(
                pending,
                "emitted events not yet acknowledged by the broker; they are published after the next start"
            ),
            Err(err) => tracing::error!(error = %err, "cannot read the outbox"),
        }
    }

    /// Applies an answer that came after its first poll, to the lane it
    /// came from (a dead letter sent for a refused row answers to the
    /// emitted event's lane, not to one of its own topic).
    fn answer(&mut self, answer: Answer) {
        let topic = answer.0.clone();
        if let Some(lane) = self.lanes.get_mut(&*topic) {
            self.books.settle(lane, answer);
            if lane.is_idle() {
                self.lanes.remove(&*topic);
            }
        }
    }

    /// Stop was asked: from now on, the last pass (see "Last pass").
    fn finish(&mut self) {
        self.books.finishing = true;
        // Read to the end once more: the workers' last outcomes may have
        // added rows.
        self.behind = true;
        self.read_retry_at = None;
    }

    /// Reads rows after the cursor into their lanes, until the end of the
    /// outbox or until the lanes hold [`MAX_HELD`] rows.
    async fn read(&mut self) {
        // Any pending retry is this read; if memory is full it reads
        // nothing, and the next read comes when the lanes drain.
        self.read_retry_at = None;
        while self.books.held < MAX_HELD {
            let rows = match self.store.outbox_batch(self.cursor, BATCH).await {
                Ok(rows) => rows,
                Err(err) => {
                    tracing::error!(error = %err, "cannot read the outbox");
                    self.read_retry_at = Some(Instant::now() + FIRST_BACKOFF);
                    if self.books.finishing {
                        // The last pass waits for nothing: what is left is
                        // read after the next start.
                        self.behind = false;
                    }
                    return;
                }
            };
            let end = rows.len() < BATCH;
            self.rows_read
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            for (seq, row) in rows {
                // "Cursor": rows come in sequence order, and no row at or
                // below this one will appear later.
                self.cursor = Some(seq);
                match row {
                    Ok(record) => {
                        let record = Arc::new(record);
                        self.lanes
                            .entry(Arc::from(record.topic.as_str()))
                            .or_default()
                            .push(seq, record);
                        self.books.held += 1;
                    }
                    // "Unreadable rows": the cursor moves past it, so this
                    // is said once per run.
                    Err(err) => {
                        tracing::error!(seq, error = %err, "unreadable outbox row left in place")
                    }
                }
            }
            if end {
                self.behind = false;
                return;
            }
        }
    }

    /// Hands every lane's next rows to the publisher, as far as each lane
    /// may send now ("Topics are independent": a lane that may not send
    /// is simply skipped).
    async fn dispatch(&mut self) {
        let now = Instant::now();
        let Self {
            lanes,
            publisher,
            sending,
            books,
            ..
        } = self;
        for (topic, lane) in lanes.iter_mut() {
            while let Some((seq, record)) = lane.next_to_send(now, books.finishing) {
                let mut send = publish(publisher.clone(), topic.clone(), seq, record);
                match first_poll(&mut send).await {
                    // Answered at once: a failure stops this lane's loop
                    // here, before anything later is handed out.
                    Poll::Ready(answer) => books.settle(lane, answer),
                    Poll::Pending => sending.push(send),
                }
            }
        }
        lanes.retain(|_, lane| !lane.is_idle());
    }

    /// Deletes what was acknowledged since the last delete, unless a delete
    /// is in flight or waits for its retry.
    fn start_delete(&mut self) {
        if self.deleting.is_some() || self.books.acknowledged.is_empty() {
            return;
        }
        if self.books.finishing {
            if self.delete_given_up {
                return;
            }
        } else if self.delete_retry.is_some_and(|(at, _)| Instant::now() < at) {
            return;
        }
        // Fault point: the broker has the records, the outbox still has
        // their rows.
        fault::point("after-publish");
        let seqs = std::mem::take(&mut self.books.acknowledged);
        let store = self.store.clone();
        self.deleting = Some(Box::pin(async move {
            let result = store.write(Write::Published { seqs: seqs.clone() }).await;
            (seqs, result)
        }));
    }

    /// Takes the answer of a delete.
    fn after_delete(&mut self, (seqs, result): (Vec<u64>, Result<Applied, StoreError>)) {
        match result {
            Ok(_) => self.delete_retry = None,
            Err(err) => {
                // "A failed delete is not a failed publish": the rows stay
                // acknowledged, to be deleted later, never sent again in
                // this run.
                let backoff = self
                    .delete_retry
                    .map_or(FIRST_BACKOFF, |(_, b)| (b * 2).min(MAX_BACKOFF));
                tracing::error!(error = %err, rows = seqs.len(), retry_in_ms = backoff.as_millis() as u64,
                    "cannot remove published rows from the outbox; they are published again only after a restart");
                self.delete_retry = Some((Instant::now() + backoff, backoff));
                if self.books.finishing {
                    self.delete_given_up = true;
                }
                self.books.acknowledged.extend(seqs);
            }
        }
    }

    /// When something becomes due without any other wake-up: a lane's
    /// retry, a delete's retry, a read's retry. The last pass waits for
    /// none of them.
    fn next_wake(&self) -> Option<Instant> {
        if self.books.finishing {
            return None;
        }
        // A lane with publishes in flight is woken by their answers.
        let lanes = self
            .lanes
            .values()
            .filter(|lane| lane.in_flight == 0)
            .filter_map(|lane| lane.retry_at);
        let delete = self
            .delete_retry
            .filter(|_| self.deleting.is_none() && !self.books.acknowledged.is_empty())
            .map(|(at, _)| at);
        let read = self.read_retry_at.filter(|_| self.behind);
        lanes.chain(delete).chain(read).min()
    }
}

/// The UTF-8 value of header `name`, for log records.
fn text_header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::synthetic::MemoryPublisher;
    use crate::store::Effects;

    async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done().await {
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
        wait_for("a failed publish", async || {
            stats.failures.load(Ordering::Relaxed) > 0
        })
        .await;
        assert_eq!(store.outbox_len().await.expect("len"), 20);
        // It recovers: everything goes out, in commit order, then the rows go.
        publisher.failing.store(false, Ordering::Relaxed);
        wait_for("an empty outbox", async || {
            store.outbox_len().await.ok() == Some(0)
        })
        .await;
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

    /// Commits the outcome of event `id`, which emitted `emits` as (topic,
    /// payload), like a handler's.
    async fn commit(store: &Store, id: &str, emits: &[(&str, String)]) {
        let mut emits: Vec<OutboxRecord> = emits
            .iter()
            .map(|(topic, payload)| OutboxRecord {
                topic: (*topic).to_string(),
                key: None,
                payload: payload.clone().into_bytes(),
                headers: vec![],
            })
            .collect();
        stamp("h", id, &mut emits);
        let write = Write::Finished {
            handler: "h".into(),
            id: id.into(),
            ttl: Duration::from_secs(60),
            dedup: true,
            effects: Some(Arc::new(Effects {
                emits,
                ..Effects::default()
            })),
        };
        store.write(write).await.expect("write");
    }

    /// `topic`'s rows `from..to`, named `<topic><i>`.
    fn rows(topic: &str, range: std::ops::Range<usize>) -> Vec<(&str, String)> {
        range.map(|i| (topic, format!("{topic}{i}"))).collect()
    }

    /// The payloads published to `topic`, in order.
    fn published(publisher: &MemoryPublisher, topic: &str) -> Vec<String> {
        publisher
            .records()
            .iter()
            .filter(|r| r.topic == topic)
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect()
    }

    fn names(topic: &str, range: std::ops::Range<usize>) -> Vec<String> {
        rows(topic, range).into_iter().map(|(_, p)| p).collect()
    }

    /// A relay running on its own task.
    struct Running {
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        stats: Arc<RelayStats>,
        rows_read: Arc<AtomicU64>,
    }

    fn start(store: &Store, publisher: &MemoryPublisher) -> Running {
        let stats = Arc::new(RelayStats::default());
        let relay = Relay::new(store.clone(), publisher.clone(), stats.clone());
        let rows_read = relay.rows_read.clone();
        let (stop, stopped) = watch::channel(false);
        Running {
            stop,
            task: tokio::spawn(relay.run(stopped)),
            stats,
            rows_read,
        }
    }

    impl Running {
        fn published(&self) -> u64 {
            self.stats.published.load(Ordering::Relaxed)
        }

        fn rows_read(&self) -> u64 {
            self.rows_read.load(Ordering::Relaxed)
        }

        async fn stop(self) -> Arc<RelayStats> {
            let _ = self.stop.send(true);
            tokio::time::timeout(Duration::from_secs(20), self.task)
                .await
                .expect("the relay stops in time")
                .expect("relay");
            self.stats
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("weir.redb")).expect("open");
        (dir, store)
    }

    // Against the old design (each round waited for all its
    // acknowledgements), the first wait times out: "fast" is published but
    // never deleted, and its second wave is never published.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_topic_does_not_hold_up_other_topics() {
        let (_dir, store) = open();
        let publisher = MemoryPublisher::default();
        publisher.stall("slow");
        let relay = start(&store, &publisher);
        let mut first = rows("slow", 0..2);
        first.extend(rows("fast", 0..2));
        commit(&store, "e1", &first).await;
        wait_for("fast's first rows published and deleted", async || {
            store.outbox_len().await.ok() == Some(2)
        })
        .await;
        assert_eq!(published(&publisher, "fast"), names("fast", 0..2));
        // While "slow" still has publishes in flight, "fast" goes on.
        let mut second = rows("fast", 2..5);
        second.extend(rows("slow", 2..3));
        commit(&store, "e2", &second).await;
        wait_for("fast's later rows published and deleted", async || {
            store.outbox_len().await.ok() == Some(3)
        })
        .await;
        assert_eq!(published(&publisher, "fast"), names("fast", 0..5));
        assert!(published(&publisher, "slow").is_empty());
        // Once the broker answers, "slow" goes out, in order.
        publisher.release("slow");
        wait_for("an empty outbox", async || {
            store.outbox_len().await.ok() == Some(0)
        })
        .await;
        let stats = relay.stop().await;
        assert_eq!(published(&publisher, "slow"), names("slow", 0..3));
        assert_eq!(stats.published.load(Ordering::Relaxed), 8);
        assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    }

    /// "Refused for good": the dead letter sent for a refused row answers
    /// to the emitted event's lane, however late it answers. (When its
    /// answer was looked up by the dead letter's own topic, it was lost:
    /// the row stayed in the outbox, sent, forever, and its lane with it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_row_is_deleted_once_its_late_dead_letter_is_acknowledged() {
        let (_dir, store) = open();
        let publisher = MemoryPublisher::default();
        publisher.refuse_once("big", b"big0");
        publisher.stall("big.dlq");
        let relay = start(&store, &publisher);
        commit(&store, "e1", &rows("big", 0..2)).await;
        wait_for("the row after the refused one published", async || {
            published(&publisher, "big") == names("big", 1..2)
        })
        .await;
        publisher.release("big.dlq");
        wait_for("an empty outbox", async || {
            store.outbox_len().await.ok() == Some(0)
        })
        .await;
        commit(&store, "e2", &rows("big", 2..3)).await;
        wait_for("a later row published and deleted", async || {
            store.outbox_len().await.ok() == Some(0) && published(&publisher, "big").len() == 2
        })
        .await;
        let stats = relay.stop().await;
        assert_eq!(published(&publisher, "big.dlq"), names("big", 0..1));
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        assert!(stats.blocked(Duration::ZERO).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_topic_does_not_hold_up_others_and_its_rows_stay() {
        let (_dir, store) = open();
        let publisher = MemoryPublisher::default();
        publisher.fail_topic("down", true);
        let relay = start(&store, &publisher);
        let mut first = rows("down", 0..3);
        first.extend(rows("up", 0..2));
        commit(&store, "e1", &first).await;
        wait_for("up's rows deleted", async || {
            store.outbox_len().await.ok() == Some(3)
        })
        .await;
        // "down" fails again after its backoff; "up" goes on meanwhile.
        wait_for("a retry of down", async || {
            relay.stats.failures.load(Ordering::Relaxed) >= 2
        })
        .await;
        commit(&store, "e2", &rows("up", 2..4)).await;
        wait_for("up's later rows deleted", async || {
            store.outbox_len().await.ok() == Some(3)
        })
        .await;
        assert_eq!(published(&publisher, "up"), names("up", 0..4));
        // Stopping does not wait for the backoff, and leaves down's rows
        // for the next start.
        let stats = relay.stop().await;
        assert!(published(&publisher, "down").is_empty());
        assert_eq!(store.outbox_len().await.expect("len"), 3);
        assert_eq!(stats.published.load(Ordering::Relaxed), 4);
        // The next start publishes them, in order.
        publisher.fail_topic("down", false);
        let relay = start(&store, &publisher);
        wait_for("an empty outbox", async || {
            store.outbox_len().await.ok() == Some(0)
        })
        .await;
        relay.stop().await;
        assert_eq!(published(&publisher, "down"), names("down", 0..3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failure_a_topic_resumes_from_its_oldest_unacknowledged_row() {
        let (_dir, store) = open();
        let publisher = MemoryPublisher::default();
        publisher.fail_once("a", b"a2");
        let relay = start(&store, &publisher);
        let mut emitted = rows("a", 0..5);
        emitted.extend(rows("b", 0..3));
        commit(&store, "e1", &emitted).await;
        wait_for("an empty outbox", async || {
            store.outbox_len().await.ok() == Some(0)
        })
        .await;
        wait_for("every acknowledgement counted", async || {
            relay.published() == 8
        })
        .await;
        let stats = relay.stop().await;
        // a0 and a1 were acknowledged and not sent again; a2 failed, then
        // went again with everything after it, in order; each row was
        // acknowledged once, so deleted once.
        assert_eq!(published(&publisher, "a"), names("a", 0..5));
        assert_eq!(published(&publisher, "b"), names("b", 0..3));
        assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
        assert_eq!(stats.published.load(Ordering::Relaxed), 8);
    }

    // The old design read the outbox from its first row every round, and
    // published again the rows whose delete had failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_are_read_once_even_when_a_delete_fails() {
        let (_dir, store) = open();
        let publisher = MemoryPublisher::default();
        publisher.stall("t");
        let relay = start(&store, &publisher);
        // More than two reads' worth, in several commits.
        let total = 3 * BATCH + 10;
        for (i, chunk) in rows("t", 0..total).chunks(100).enumerate() {
            commit(&store, &format!("e{i}"), chunk).await;
        }
        commit(&store, "u", &rows("u", 0..5)).await;
        wait_for("u's rows deleted", async || {
            store.outbox_len().await.ok() == Some(total as u64)
        })
        .await;
        wait_for("every row read", async || {
            relay.rows_read() == total as u64 + 5
        })
        .await;
        // The next store write, the first delete of t's rows, fails.
        store.fail_next_commits(1);
        publisher.release("t");
        wait_for("an empty outbox", async || {
            store.outbox_len().await.ok() == Some(0)
        })
        .await;
        let rows_read = relay.rows_read();
        let stats = relay.stop().await;
        assert_eq!(rows_read, total as u64 + 5, "a row was read twice");
        // Published once each, in order: the failed delete did not send
        // them again.
        assert_eq!(published(&publisher, "t"), names("t", 0..total));
        assert_eq!(stats.published.load(Ordering::Relaxed), total as u64 + 5);
        assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reading_pauses_while_memory_is_full() {
        let (_dir, store) = open();
        let publisher = MemoryPublisher::default();
        publisher.stall("t");
        let total = 2 * MAX_HELD;
        commit(&store, "e", &rows("t", 0..total)).await;
        let relay = start(&store, &publisher);
        wait_for("memory full", async || relay.rows_read() >= MAX_HELD as u64).await;
        // Nothing drains while the broker does not answer, so no further
        // read can come.
        let read = relay.rows_read();
        assert!(
            read < (MAX_HELD + BATCH) as u64,
            "read {read} rows with none acknowledged"
        );
        assert_eq!(store.outbox_len().await.expect("len"), total as u64);
        publisher.release("t");
        wait_for("an empty outbox", async || {
            store.outbox_len().await.ok() == Some(0)
        })
        .await;
        let rows_read = relay.rows_read();
        relay.stop().await;
        assert_eq!(rows_read, total as u64);
        assert_eq!(published(&publisher, "t"), names("t", 0..total));
    }

    fn lane_of(count: usize) -> Lane {
        let mut lane = Lane::default();
        for seq in 0..count as u64 {
            lane.push(
                seq,
                Arc::new(OutboxRecord {
                    topic: "t".into(),
                    key: None,
                    payload: seq.to_le_bytes().to_vec(),
                    headers: vec![],
                }),
            );
        }
        lane
    }

    fn send_all(lane: &mut Lane, now: Instant, finishing: bool) -> Vec<u64> {
        std::iter::from_fn(|| lane.next_to_send(now, finishing).map(|(seq, _)| seq)).collect()
    }

    #[test]
    fn a_lane_retries_from_its_oldest_unacknowledged_row_once_in_flight_ones_answer() {
        let now = Instant::now();
        let mut lane = lane_of(MAX_IN_FLIGHT + 10);
        // At most MAX_IN_FLIGHT handed out at once, in order.
        let sent = send_all(&mut lane, now, false);
        assert_eq!(sent, (0..MAX_IN_FLIGHT as u64).collect::<Vec<_>>());
        assert_eq!(lane.answer(0, true, now, false), (1, None));
        assert_eq!(lane.answer(2, true, now, false), (0, None));
        // Row 1 fails: backoff starts; row 2, acknowledged, stays behind it.
        assert_eq!(lane.answer(1, false, now, false), (0, Some(FIRST_BACKOFF)));
        // A second failure of the same attempt does not lengthen it.
        assert_eq!(lane.answer(3, false, now, false), (0, None));
        let later = now + FIRST_BACKOFF;
        assert!(
            send_all(&mut lane, later, false).is_empty(),
            "rows still in flight"
        );
        for seq in 4..MAX_IN_FLIGHT as u64 {
            lane.answer(seq, true, now, false);
        }
        assert!(send_all(&mut lane, now, false).is_empty(), "backing off");
        // Then from the oldest unacknowledged row, skipping acknowledged ones.
        let mut retry = vec![1, 3];
        retry.extend(MAX_IN_FLIGHT as u64..MAX_IN_FLIGHT as u64 + 10);
        assert_eq!(send_all(&mut lane, later, false), retry);
        // Row 3 fails again before any success: the backoff doubles.
        assert_eq!(
            lane.answer(3, false, later, false),
            (0, Some(FIRST_BACKOFF * 2))
        );
        // Row 1 goes, and row 2 (acknowledged behind it) with it.
        assert_eq!(lane.answer(1, true, later, false), (2, None));
        // Everything older than row 3 has gone; row 3 is next again.
        assert_eq!(lane.rows.front().map(|row| row.seq), Some(3));
    }

    #[test]
    fn in_the_last_pass_a_lane_retries_at_once_and_gives_up_on_a_failure() {
        let now = Instant::now();
        let mut lane = lane_of(3);
        assert_eq!(send_all(&mut lane, now, false), vec![0, 1, 2]);
        lane.answer(0, false, now, false);
        lane.answer(1, true, now, false);
        lane.answer(2, true, now, false);
        assert!(send_all(&mut lane, now, false).is_empty(), "backing off");
        // Stopping: no backoff is waited out.
        assert_eq!(send_all(&mut lane, now, true), vec![0]);
        lane.answer(0, false, now, true);
        assert!(lane.given_up);
        assert!(send_all(&mut lane, now + MAX_BACKOFF, true).is_empty());
        assert_eq!(lane.rows.len(), 3);
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
