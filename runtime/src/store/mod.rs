//! The store: dedup marks, attempt counts, handler state and the outbox of
//! emitted events, behind one handle ([`Store`]) with two backends:
//!
//! - [`redb`], an embedded database file under `[runtime] data_dir`: the
//!   default, for one process;
//! - [`postgres`], PostgreSQL (`[store] url`), shared by any number of weir
//!   processes in one consumer group, so that a partition that moves finds
//!   its dedup marks, attempts and state where it arrives.
//!
//! Both keep the same promises, stated here once; each backend says how.
//!
//! # Durable before answered
//!
//! Writes are applied in group commits: everything queued goes into one
//! transaction, and each writer is answered only after it committed.
//! Invariant: when [`Store::write`] or [`Store::write_all`] returns `Ok`,
//! the write is durable; callers acknowledge or store offsets only after
//! that, so a crash at any point either keeps the mark and the offset, or
//! the message is redelivered and either found done (skipped) or handled
//! again with its persisted attempt count. A commit whose answer was lost
//! (the connection broke during it) is retried by the caller: its outcomes
//! then come back as duplicates, never applied twice.
//!
//! # One transaction per outcome
//!
//! A [`Write::Finished`] carries the handler's [`Effects`]: its state writes
//! and emitted events. They are applied in the same transaction as the dedup
//! mark, or not at all. Invariants:
//!
//! - **No effect twice.** An outcome whose event already has a live dedup
//!   mark is rejected whole ([`Applied::Duplicate`]), so two deliveries of
//!   one event (a redelivery after a crash or a rebalance, or the same id on
//!   two keys running at once, in one process or two) apply their effects
//!   once.
//! - **Serializable state.** Every state value carries the version of the
//!   transaction that wrote it. An outcome records the versions it read (and
//!   the result of every prefix listing); if any changed before its commit,
//!   it is rejected whole ([`Applied::Conflict`]) and the caller runs the
//!   handler again on the new state. Validation and apply happen inside the
//!   one transaction, atomically with respect to every other writer (redb:
//!   there is one; PostgreSQL: locks taken before validating).
//! - **Outbox rows are effects.** They are inserted with the mark and
//!   removed ([`Write::Published`]) only after the broker acknowledged them.
//!   Sequence numbers follow commit order (the outbox relay relies on it:
//!   see "Cursor" in [`outbox`](crate::pipeline::outbox)), and one relay at a time
//!   publishes them ([`Store::relay_lease`]).
//!
//! # Lookups
//!
//! [`Store::seen`] runs for every message: a lookup that starts after a
//! write returned sees it. State reads ([`StateView`]) see committed state;
//! what they saw is validated at commit, as above.

mod postgres;
mod record;
mod redb;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, oneshot, watch};

pub use postgres::{PgSettings, percent_decoded};
pub use record::OutboxRecord;

/// Errors from the store. They name the database: its file, or the
/// PostgreSQL server, database and schema.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, created or migrated.
    #[error("cannot open the database {database}: {message}")]
    Open {
        /// The file, or `postgres://host:port/db (schema s)`.
        database: String,
        /// Why.
        message: String,
    },
    /// The database server could not be reached (it may be down, or
    /// starting): worth trying again.
    #[error("cannot reach the database {database}: {message}")]
    Unreachable {
        /// `postgres://host:port/db (schema s)`.
        database: String,
        /// Why.
        message: String,
    },
    /// A read or write failed.
    #[error("database {database}: {message}")]
    Io {
        /// The file, or `postgres://host:port/db (schema s)`.
        database: String,
        /// What failed.
        message: String,
    },
    /// The writer thread is gone (the runtime is shutting down).
    #[error("the database writer has stopped")]
    Closed,
}

/// A prefix listing a handler read, kept so that its result can be checked
/// again at commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Keys starting with this.
    pub prefix: String,
    /// Keys after this one, if given.
    pub start_after: Option<String>,
    /// How many committed entries were fetched at most.
    pub fetched: usize,
    /// What was found: each key with its version.
    pub seen: Vec<(String, u64)>,
}

impl Scan {
    /// Whether a listing made again now (`now`) finds exactly what this
    /// one saw: the same keys with the same versions.
    pub(crate) fn lists(&self, now: &[StateEntry]) -> bool {
        now.len() == self.seen.len()
            && now
                .iter()
                .zip(&self.seen)
                .all(|((k, v, _), (sk, sv))| k == sk && v == sv)
    }
}

/// What one successful `handle` call wants to change, applied atomically with
/// its dedup mark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Committed keys read, with the version seen (`None`: absent).
    pub reads: BTreeMap<String, Option<u64>>,
    /// Prefix listings read.
    pub scans: Vec<Scan>,
    /// State changes by key: a new value, or `None` to delete.
    pub writes: BTreeMap<String, Option<Vec<u8>>>,
    /// Events to publish, in emit order.
    pub emits: Vec<OutboxRecord>,
}

impl Effects {
    /// Nothing to write or publish (reads alone need no commit).
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.emits.is_empty()
    }
}

/// One change, applied durably by the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The event's outcome is final (handled or dead-lettered): mark it done
    /// until `ttl` from now, forget its attempts, and apply `effects`.
    Finished {
        /// Handler name.
        handler: String,
        /// Event id.
        id: String,
        /// How long the mark is kept.
        ttl: Duration,
        /// Reject the outcome if the event is already marked done.
        dedup: bool,
        /// The handler's state writes and emitted events.
        effects: Option<Arc<Effects>>,
    },
    /// The event failed `attempts` times so far and will be retried.
    Attempted {
        /// Handler name.
        handler: String,
        /// Event id.
        id: String,
        /// Failed attempts so far.
        attempts: u32,
    },
    /// These outbox rows were acknowledged by the broker: remove them.
    Published {
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// Forget what `handler` has handled: its dedup marks and attempt
    /// counts, and with `state` also its state and the outbox rows it
    /// emitted and that wait to be published (a rebuild, `weir rewind`).
    Forget {
        /// Handler name.
        handler: String,
        /// Also its state and pending outbox rows.
        state: bool,
    },
}

/// What the store holds for one handler (see [`Store::footprint`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Dedup marks (events whose outcome is final).
    pub marks: u64,
    /// Attempt counts of unfinished events.
    pub attempts: u64,
    /// State keys.
    pub state_keys: u64,
    /// Outbox rows it emitted, not yet published.
    pub outbox_rows: u64,
}

/// What became of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied and durable.
    Done,
    /// Not applied: the event was already marked done.
    Duplicate,
    /// Not applied: state the handler read has changed since; run it again.
    Conflict,
}

/// What the store knows about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    /// Its outcome is final: a duplicate.
    pub done: bool,
    /// Failed attempts persisted so far.
    pub attempts: u32,
}

/// One caller's writes: a single one, or several applied in order in the
/// same transaction (all or none).
pub(crate) enum Request {
    One(Write, oneshot::Sender<Result<Applied, StoreError>>),
    All(
        Vec<Write>,
        oneshot::Sender<Result<Vec<Applied>, StoreError>>,
    ),
}

impl Request {
    pub(crate) fn writes(&self) -> &[Write] {
        match self {
            Request::One(write, _) => std::slice::from_ref(write),
            Request::All(writes, _) => writes,
        }
    }

    /// Answers with this request's share of `outcome` (from `at` on);
    /// returns how many writes it had.
    pub(crate) fn answer(self, outcome: &Result<Vec<Applied>, StoreError>, at: usize) -> usize {
        let n = self.writes().len();
        let mine = outcome
            .as_ref()
            .map(|applied| applied[at..at + n].to_vec())
            .map_err(Clone::clone);
        match self {
            Request::One(_, reply) => {
                let _ = reply.send(mine.map(|a| a[0]));
            }
            Request::All(_, reply) => {
                let _ = reply.send(mine);
            }
        }
        n
    }
}

/// Group-commit counters.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Write transactions committed.
    pub commits: AtomicU64,
    /// Writes applied (over all transactions).
    pub writes: AtomicU64,
    /// Outcomes rejected because state they read had changed.
    pub conflicts: AtomicU64,
}

/// An outbox row: its sequence number and its record (or why it cannot be
/// decoded).
pub type OutboxRow = (u64, Result<OutboxRecord, String>);

/// A state entry: key, version, value.
pub type StateEntry = (String, u64, Vec<u8>);

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Failures a test can inject into a writer (both backends).
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Batches still to fail, as a failing disk or server would.
    fail_batches: std::sync::atomic::AtomicU64,
    /// The writer ends at its next batch, as if it had died.
    stop_writer: std::sync::atomic::AtomicBool,
}

impl Faults {
    pub(crate) fn fail_next(&self, batches: u64) {
        self.fail_batches.store(batches, Ordering::SeqCst);
    }

    pub(crate) fn stop(&self) {
        self.stop_writer.store(true, Ordering::SeqCst);
    }

    /// Whether the writer is to end now.
    pub(crate) fn stopping(&self) -> bool {
        self.stop_writer.load(Ordering::SeqCst)
    }

    /// Whether this batch is to fail (counting it).
    pub(crate) fn fail_this(&self) -> bool {
        self.fail_batches
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl CommitStats {
    /// Counts a durable commit of `writes` whose outcomes were `applied`,
    /// and records its size and time to `metrics`.
    pub(crate) fn committed(
        &self,
        applied: &[Applied],
        metrics: Option<&crate::metrics::Metrics>,
        elapsed: Duration,
    ) {
        if let Some(metrics) = metrics {
            metrics.commit(applied.len(), elapsed.as_secs_f64());
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.writes
            .fetch_add(applied.len() as u64, Ordering::Relaxed);
        let conflicts = applied.iter().filter(|a| **a == Applied::Conflict).count();
        self.conflicts
            .fetch_add(conflicts as u64, Ordering::Relaxed);
    }
}

/// Answers every request of a batch with its share of `result`.
pub(crate) fn answer_all(batch: Vec<Request>, result: &Result<Vec<Applied>, StoreError>) {
    let mut at = 0;
    for request in batch {
        at += request.answer(result, at);
    }
}

/// Handle to the store, whichever backend holds it; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Redb(redb::RedbStore),
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens (or creates) the embedded database at `path` and starts its
    /// writer thread.
    ///
    /// # Errors
    ///
    /// When the file cannot be created, is not a redb database, or is locked
    /// by another process.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Redb(redb::RedbStore::open(path)?),
        })
    }

    /// Connects to PostgreSQL, creates or migrates the schema, and starts
    /// the writer.
    ///
    /// # Errors
    ///
    /// When the server cannot be reached, refuses, or holds a schema of a
    /// newer version.
    pub async fn connect(settings: &PgSettings) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Postgres(postgres::PgStore::connect(settings).await?),
        })
    }

    /// Which database this is, for logs: its file, or its server, database
    /// and schema.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Redb(store) => store.describe(),
            Backend::Postgres(store) => store.describe(),
        }
    }

    /// Whether several processes may share this store (PostgreSQL).
    pub fn shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Whether the writer still runs (it ends only when it fails for good,
    /// or with the last handle).
    pub fn writer_alive(&self) -> bool {
        match &self.backend {
            Backend::Redb(store) => store.writer_alive(),
            Backend::Postgres(store) => store.writer_alive(),
        }
    }

    /// Why the store cannot serve now, if it cannot: its writer stopped;
    /// or (PostgreSQL) the server does not answer within two seconds, or
    /// the last group commit failed.
    pub async fn probe(&self) -> Option<String> {
        match &self.backend {
            Backend::Redb(store) => {
                (!store.writer_alive()).then(|| "the database writer has stopped".to_string())
            }
            Backend::Postgres(store) => store.probe().await,
        }
    }

    /// Records each group commit (its size and time) to `metrics` from now
    /// on. The first call wins.
    pub fn record_to(&self, metrics: crate::metrics::Metrics) {
        match &self.backend {
            Backend::Redb(store) => store.record_to(metrics),
            Backend::Postgres(store) => store.record_to(metrics),
        }
    }

    /// Test support: the next `batches` group commits fail with an I/O
    /// error, as on a full or failing disk.
    #[doc(hidden)]
    pub fn fail_next_commits(&self, batches: u64) {
        match &self.backend {
            Backend::Redb(store) => store.fail_next_commits(batches),
            Backend::Postgres(store) => store.fail_next_commits(batches),
        }
    }

    /// Test support: the writer ends at its next batch (its writers get
    /// [`StoreError::Closed`]), as if it had died.
    #[doc(hidden)]
    pub fn stop_writer(&self) {
        match &self.backend {
            Backend::Redb(store) => store.stop_writer(),
            Backend::Postgres(store) => store.stop_writer(),
        }
    }

    /// How many transactions carried how many writes so far.
    pub fn commit_stats(&self) -> &CommitStats {
        match &self.backend {
            Backend::Redb(store) => store.commit_stats(),
            Backend::Postgres(store) => store.commit_stats(),
        }
    }

    /// Looks an event up (see "Lookups" above).
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub async fn seen(&self, handler: &str, id: &str) -> Result<Seen, StoreError> {
        match &self.backend {
            Backend::Redb(store) => store.seen(handler, id),
            Backend::Postgres(store) => store.seen(handler, id).await,
        }
    }

    /// A view of all handlers' committed state. (redb: one consistent
    /// snapshot; PostgreSQL: each read sees what is committed when it runs.
    /// Either way, what a handler read is validated at its commit.)
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn state_view(&self) -> Result<StateView, StoreError> {
        Ok(match &self.backend {
            Backend::Redb(store) => StateView::Redb(store.state_view()?),
            Backend::Postgres(store) => StateView::Postgres(store.clone()),
        })
    }

    /// Up to `limit` outbox rows with a sequence number above `after`, oldest
    /// first. A row that cannot be decoded comes back as an error message.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub async fn outbox_batch(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        match &self.backend {
            Backend::Redb(store) => store.outbox_batch(after, limit),
            Backend::Postgres(store) => store.outbox_batch(after, limit).await,
        }
    }

    /// Emitted events not yet acknowledged by the broker.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub async fn outbox_len(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(store) => store.outbox_len(),
            Backend::Postgres(store) => store.outbox_len().await,
        }
    }

    /// When the oldest outbox row was committed (milliseconds since the
    /// Unix epoch): `None` when the outbox is empty or its oldest row was
    /// written by a version that did not keep commit times.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub async fn outbox_oldest_ms(&self) -> Result<Option<u64>, StoreError> {
        match &self.backend {
            Backend::Redb(store) => store.outbox_oldest_ms(),
            Backend::Postgres(store) => store.outbox_oldest_ms().await,
        }
    }

    /// What the store holds for `handler`: what a rebuild would forget.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub async fn footprint(&self, handler: &str) -> Result<Footprint, StoreError> {
        match &self.backend {
            Backend::Redb(store) => store.footprint(handler),
            Backend::Postgres(store) => store.footprint(handler).await,
        }
    }

    /// Deletes every dedup mark due at `at`; how many. The PostgreSQL
    /// store's sweeper does this every second by itself, with the time
    /// then; the embedded store removes due marks within its commits, so
    /// here it deletes nothing.
    ///
    /// # Errors
    ///
    /// When the database cannot be written.
    pub async fn sweep_expired(&self, at: std::time::SystemTime) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(_) => Ok(0),
            Backend::Postgres(store) => {
                let ms = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                store.sweep_expired(ms).await
            }
        }
    }

    /// Woken whenever a commit added outbox rows (PostgreSQL: a commit of
    /// any process, while this one holds the relay lease).
    pub fn outbox_ready(&self) -> Arc<Notify> {
        match &self.backend {
            Backend::Redb(store) => store.outbox_ready(),
            Backend::Postgres(store) => store.outbox_ready(),
        }
    }

    /// Waits until this process may relay the outbox: at once for redb (it
    /// has one process); for PostgreSQL, until it holds the one relay lease
    /// of the schema. The lease is lost when its connection breaks; the
    /// relay then stops and asks again.
    ///
    /// # Errors
    ///
    /// When the database cannot be reached; the caller asks again.
    pub async fn relay_lease(&self) -> Result<RelayLease, StoreError> {
        match &self.backend {
            Backend::Redb(store) => Ok(RelayLease::held(store.relay_lease(), None)),
            Backend::Postgres(store) => store.relay_lease().await,
        }
    }

    /// Applies `write` durably, together with whatever else is queued.
    /// Returns once it is durable (or was rejected, see [`Applied`]).
    ///
    /// Cancel-safe in the sense that matters: if the future is dropped, the
    /// write may or may not be applied, exactly as if the process had
    /// crashed at that moment.
    ///
    /// # Errors
    ///
    /// When the transaction fails or the writer has stopped.
    pub async fn write(&self, write: Write) -> Result<Applied, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::One(write, reply))?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Applies `writes` in order in one transaction, all or none, durably
    /// (with whatever else is queued); one answer per write. Cancel-safe as
    /// [`write`](Self::write) is.
    ///
    /// # Errors
    ///
    /// When the transaction fails (none of them is applied) or the writer
    /// has stopped.
    pub async fn write_all(&self, writes: Vec<Write>) -> Result<Vec<Applied>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::All(writes, reply))?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn send(&self, request: Request) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(store) => store.send(request),
            Backend::Postgres(store) => store.send(request),
        }
    }
}

/// The right to relay the outbox (see [`Store::relay_lease`]); given up
/// when dropped.
pub struct RelayLease {
    lost: watch::Receiver<bool>,
    /// The connection holding the lock, if the backend needs one.
    _connection: Option<tokio_postgres::Client>,
}

impl RelayLease {
    fn held(lost: watch::Receiver<bool>, connection: Option<tokio_postgres::Client>) -> Self {
        Self {
            lost,
            _connection: connection,
        }
    }

    /// Whether the lease is lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Returns when the lease is lost; never, for a lease that cannot be.
    pub async fn lost(&mut self) {
        if self.lost.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Committed handler state, read through [`Store::state_view`].
pub enum StateView {
    /// A redb read transaction: one snapshot.
    Redb(redb::RedbView),
    /// Reads from PostgreSQL, each at its own moment.
    Postgres(postgres::PgStore),
}

impl StateView {
    /// The value of `key` in `handler`'s namespace, with its version.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub async fn get(
        &self,
        handler: &str,
        key: &str,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        match self {
            Self::Redb(view) => view.get(handler, key),
            Self::Postgres(store) => store.get(handler, key).await,
        }
    }

    /// Up to `count` entries of `handler` whose key starts with `prefix` and
    /// comes after `start_after`, in key order (bytewise).
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub async fn scan(
        &self,
        handler: &str,
        prefix: &str,
        start_after: Option<&str>,
        count: usize,
    ) -> Result<Vec<StateEntry>, StoreError> {
        match self {
            Self::Redb(view) => view.scan(handler, prefix, start_after, count),
            Self::Postgres(store) => store.scan(handler, prefix, start_after, count).await,
        }
    }
}
