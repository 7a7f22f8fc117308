//! The embedded backend: one redb database file, one process.
//!
//! # Tables
//!
//! | table | key | value | meaning |
//! | --- | --- | --- | --- |
//! | `dedup` | (handler, event id) | expiry, ms since epoch | the event's outcome is final |
//! | `dedup_expiry` | (expiry, handler, event id) | () | index for expiring marks without a scan |
//! | `attempts` | (handler, event id) | attempts so far | failed attempts of an unfinished event |
//! | `state` | (handler, key) | (version, value) | a handler's key-value state |
//! | `outbox` | sequence | encoded [`OutboxRecord`] | emitted events not yet acknowledged by the broker |
//! | `meta` | name | u64 | counters: the last state version and outbox sequence |
//!
//! # Group commit
//!
//! Writes go to one writer thread, which applies everything queued in a
//! single write transaction with `Durability::Immediate` (one fsync for the
//! whole batch) and only then answers each writer ("Durable before
//! answered" in [`store`](crate::store)). Outcomes are validated and applied in
//! order inside that transaction; the thread is the database's only
//! writer, which makes validation atomic, and sequence numbers are handed
//! out inside it, so they follow commit order.
//!
//! # Lookups
//!
//! [`RedbStore::seen`] does not open a read transaction of its own: it
//! reads the dedup and attempt tables of the snapshot the writer publishes
//! after each commit. Invariant: the writer publishes the snapshot of a
//! commit *before* it answers any write of that commit, so a lookup that
//! starts after a write returned sees it — exactly what a fresh read
//! transaction would see from this process, which is the database's only
//! writer. (A lookup racing a commit may see the state before it; so could
//! a fresh read transaction.) If taking a snapshot fails, none is published
//! and lookups open their own read transaction until a later commit
//! publishes one again.

mod commit;

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, mpsc};

use redb::{
    Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};
use tokio::sync::{Notify, watch};

use super::record::committed_ms;
use super::{
    CommitStats, Faults, Footprint, OutboxRecord, OutboxRow, Request, Seen, StateEntry, StoreError,
    now_ms,
};
use crate::lock::UnpoisonedRw;
use commit::WriterState;

const DEDUP: TableDefinition<(&str, &str), u64> = TableDefinition::new("dedup");
const DEDUP_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("dedup_expiry");
const ATTEMPTS: TableDefinition<(&str, &str), u32> = TableDefinition::new("attempts");
const STATE: TableDefinition<(&str, &str), (u64, &[u8])> = TableDefinition::new("state");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// `meta` key: the version given to the last transaction that wrote state.
const META_STATE_VERSION: &str = "state_version";
/// `meta` key: the last outbox sequence number handed out.
const META_OUTBOX_SEQ: &str = "outbox_seq";

/// Most writes applied in one transaction.
const MAX_BATCH: usize = 4096;
/// Most expired marks removed per batch, so expiry never stalls a commit.
const MAX_EXPIRED_PER_BATCH: usize = 1024;

/// The dedup and attempt tables as of one commit (see "Lookups" above).
struct Snapshot {
    dedup: ReadOnlyTable<(&'static str, &'static str), u64>,
    attempts: ReadOnlyTable<(&'static str, &'static str), u32>,
}

impl Snapshot {
    fn take(db: &Database) -> Result<Self, String> {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        Ok(Self {
            dedup: txn.open_table(DEDUP).map_err(|e| e.to_string())?,
            attempts: txn.open_table(ATTEMPTS).map_err(|e| e.to_string())?,
        })
    }

    fn seen(&self, handler: &str, id: &str) -> Result<Seen, redb::StorageError> {
        let done = match self.dedup.get((handler, id))? {
            Some(expires) => expires.value() > now_ms(),
            None => false,
        };
        let attempts = self
            .attempts
            .get((handler, id))?
            .map(|a| a.value())
            .unwrap_or(0);
        Ok(Seen { done, attempts })
    }
}

/// The snapshot of the last commit, when there is a current one.
type Latest = Arc<RwLock<Option<Arc<Snapshot>>>>;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
    latest: Latest,
    writer: mpsc::Sender<Request>,
    stats: Arc<CommitStats>,
    outbox_ready: Arc<Notify>,
    faults: Arc<Faults>,
    metrics: Arc<std::sync::OnceLock<crate::metrics::Metrics>>,
    /// False once the writer thread has ended.
    writer_alive: Arc<std::sync::atomic::AtomicBool>,
    /// The relay lease, never lost.
    relay_lease: Arc<watch::Sender<bool>>,
}

impl RedbStore {
    /// Opens (or creates) the database at `path` and starts its writer
    /// thread.
    ///
    /// # Errors
    ///
    /// When the file cannot be created, is not a redb database, or is locked
    /// by another process.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |message: String| StoreError::Open {
            database: path.display().to_string(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| open_error(e.to_string()))?;
        }
        let db = Database::create(path).map_err(|e| open_error(e.to_string()))?;
        // Create the tables so that readers never see them missing.
        let txn = db.begin_write().map_err(|e| open_error(e.to_string()))?;
        {
            txn.open_table(DEDUP)
                .map_err(|e| open_error(e.to_string()))?;
            txn.open_table(DEDUP_EXPIRY)
                .map_err(|e| open_error(e.to_string()))?;
            txn.open_table(ATTEMPTS)
                .map_err(|e| open_error(e.to_string()))?;
            txn.open_table(STATE)
                .map_err(|e| open_error(e.to_string()))?;
            txn.open_table(OUTBOX)
                .map_err(|e| open_error(e.to_string()))?;
            txn.open_table(META)
                .map_err(|e| open_error(e.to_string()))?;
        }
        txn.commit().map_err(|e| open_error(e.to_string()))?;
        let latest: Latest = Arc::new(RwLock::new(Some(Arc::new(
            Snapshot::take(&db).map_err(open_error)?,
        ))));
        let db = Arc::new(db);
        let path = Arc::new(path.to_path_buf());
        let (writer, requests) = mpsc::channel();
        let stats = Arc::new(CommitStats::default());
        let outbox_ready = Arc::new(Notify::new());
        let faults = Arc::new(Faults::default());
        let metrics = Arc::new(std::sync::OnceLock::new());
        let writer_state = WriterState {
            metrics: metrics.clone(),
            db: db.clone(),
            path: path.clone(),
            latest: latest.clone(),
            stats: stats.clone(),
            outbox_ready: outbox_ready.clone(),
            faults: faults.clone(),
        };
        let writer_alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let alive = writer_alive.clone();
        std::thread::Builder::new()
            .name("weir-store".into())
            .spawn(move || {
                writer_state.run(&requests);
                alive.store(false, Ordering::SeqCst);
            })
            .map_err(|e| open_error(e.to_string()))?;
        Ok(Self {
            db,
            path,
            latest,
            writer,
            stats,
            outbox_ready,
            faults,
            metrics,
            writer_alive,
            relay_lease: Arc::new(watch::Sender::new(false)),
        })
    }

    /// Whether the writer thread still runs (it ends only when it fails for
    /// good, or with the last handle).
    pub fn writer_alive(&self) -> bool {
        self.writer_alive.load(Ordering::SeqCst)
    }

    /// Records each group commit (its size and time) to `metrics` from now
    /// on. The first call wins.
    pub fn record_to(&self, metrics: crate::metrics::Metrics) {
        let _ = self.metrics.set(metrics);
    }

    /// Test support: the next `batches` group commits fail with an I/O
    /// error, as on a full or failing disk.
    #[doc(hidden)]
    pub fn fail_next_commits(&self, batches: u64) {
        self.faults.fail_next(batches);
    }

    /// Test support: the writer thread ends at its next batch (its writers
    /// get [`StoreError::Closed`]), as if it had died.
    #[doc(hidden)]
    pub fn stop_writer(&self) {
        self.faults.stop();
    }

    /// How many transactions carried how many writes so far.
    pub fn commit_stats(&self) -> &CommitStats {
        &self.stats
    }

    fn io(&self, err: impl std::fmt::Display) -> StoreError {
        io_error(&self.path, err)
    }

    /// Looks an event up, in the snapshot of the last commit (see
    /// "Lookups" in the module documentation). Never blocks on writers.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn seen(&self, handler: &str, id: &str) -> Result<Seen, StoreError> {
        let latest = self.latest.read_locked().clone();
        let snapshot = match latest {
            Some(snapshot) => snapshot,
            None => Arc::new(Snapshot::take(&self.db).map_err(|e| self.io(e))?),
        };
        snapshot.seen(handler, id).map_err(|e| self.io(e))
    }

    /// A consistent snapshot of all handlers' state, as committed now.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn state_view(&self) -> Result<RedbView, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        Ok(RedbView {
            txn,
            path: self.path.clone(),
        })
    }

    /// Up to `limit` outbox rows with a sequence number above `after`, oldest
    /// first. A row that cannot be decoded comes back as an error message.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn outbox_batch(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let outbox = txn.open_table(OUTBOX).map_err(|e| self.io(e))?;
        let start = match after {
            Some(seq) => Bound::Excluded(seq),
            None => Bound::Unbounded,
        };
        let mut rows = Vec::new();
        for entry in outbox
            .range::<u64>((start, Bound::Unbounded))
            .map_err(|e| self.io(e))?
            .take(limit)
        {
            let (seq, bytes) = entry.map_err(|e| self.io(e))?;
            rows.push((seq.value(), OutboxRecord::decode(bytes.value())));
        }
        Ok(rows)
    }

    /// Emitted events not yet acknowledged by the broker.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let outbox = txn.open_table(OUTBOX).map_err(|e| self.io(e))?;
        outbox.len().map_err(|e| self.io(e))
    }

    /// When the oldest outbox row was committed (milliseconds since the
    /// Unix epoch): `None` when the outbox is empty or its oldest row was
    /// written by a version that did not keep commit times.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn outbox_oldest_ms(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let outbox = txn.open_table(OUTBOX).map_err(|e| self.io(e))?;
        let first = outbox.first().map_err(|e| self.io(e))?;
        Ok(first.and_then(|(_, bytes)| committed_ms(bytes.value())))
    }

    /// What the store holds for `handler`: what a rebuild would forget.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn footprint(&self, handler: &str) -> Result<Footprint, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let count = |found: Result<Vec<(String, u64)>, redb::StorageError>| {
            found.map(|keys| keys.len() as u64).map_err(|e| self.io(e))
        };
        let dedup = txn.open_table(DEDUP).map_err(|e| self.io(e))?;
        let attempts = txn.open_table(ATTEMPTS).map_err(|e| self.io(e))?;
        let state = txn.open_table(STATE).map_err(|e| self.io(e))?;
        let outbox = txn.open_table(OUTBOX).map_err(|e| self.io(e))?;
        Ok(Footprint {
            marks: count(keys_of(&dedup, handler, |v| v.value()))?,
            attempts: count(keys_of(&attempts, handler, |v| u64::from(v.value())))?,
            state_keys: count(keys_of(&state, handler, |_| 0))?,
            outbox_rows: rows_of(&outbox, handler).map_err(|e| self.io(e))?.len() as u64,
        })
    }

    /// Woken whenever a commit added outbox rows.
    pub fn outbox_ready(&self) -> Arc<Notify> {
        self.outbox_ready.clone()
    }

    /// This process relays the outbox: it is the database's only user, so
    /// the lease is never lost.
    pub fn relay_lease(&self) -> watch::Receiver<bool> {
        self.relay_lease.subscribe()
    }

    /// The database file.
    pub fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// Queues `request` for the writer thread.
    pub(super) fn send(&self, request: Request) -> Result<(), StoreError> {
        self.writer.send(request).map_err(|_| StoreError::Closed)
    }
}

fn io_error(path: &Path, err: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        database: path.display().to_string(),
        message: err.to_string(),
    }
}

/// A read-only snapshot of handler state (see [`RedbStore::state_view`]).
pub struct RedbView {
    txn: ReadTransaction,
    path: Arc<PathBuf>,
}

impl RedbView {
    /// The value of `key` in `handler`'s namespace, with its version.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn get(&self, handler: &str, key: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let table = self
            .txn
            .open_table(STATE)
            .map_err(|e| io_error(&self.path, e))?;
        let found = table
            .get((handler, key))
            .map_err(|e| io_error(&self.path, e))?;
        Ok(found.map(|v| {
            let (version, bytes) = v.value();
            (version, bytes.to_vec())
        }))
    }

    /// Up to `count` entries of `handler` whose key starts with `prefix` and
    /// comes after `start_after`, in key order.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn scan(
        &self,
        handler: &str,
        prefix: &str,
        start_after: Option<&str>,
        count: usize,
    ) -> Result<Vec<StateEntry>, StoreError> {
        let table = self
            .txn
            .open_table(STATE)
            .map_err(|e| io_error(&self.path, e))?;
        scan(&table, handler, prefix, start_after, count).map_err(|e| io_error(&self.path, e))
    }
}

/// The entries a prefix listing sees; shared by reads and commit-time
/// validation so both see exactly the same thing.
fn scan<T>(
    table: &T,
    handler: &str,
    prefix: &str,
    start_after: Option<&str>,
    count: usize,
) -> Result<Vec<StateEntry>, redb::StorageError>
where
    T: ReadableTable<(&'static str, &'static str), (u64, &'static [u8])>,
{
    let start = match start_after {
        Some(after) if after >= prefix => Bound::Excluded((handler, after)),
        _ => Bound::Included((handler, prefix)),
    };
    let mut entries = Vec::new();
    for entry in table.range::<(&str, &str)>((start, Bound::Unbounded))? {
        if entries.len() >= count {
            break;
        }
        let (key, value) = entry?;
        let (owner, name) = key.value();
        if owner != handler || !name.starts_with(prefix) {
            break;
        }
        let (version, bytes) = value.value();
        entries.push((name.to_string(), version, bytes.to_vec()));
    }
    Ok(entries)
}

/// The names of `handler`'s entries in a table keyed by (handler, name),
/// each with `number` of its value.
fn keys_of<V: redb::Value + 'static, T: ReadableTable<(&'static str, &'static str), V>>(
    table: &T,
    handler: &str,
    number: impl Fn(redb::AccessGuard<'_, V>) -> u64,
) -> Result<Vec<(String, u64)>, redb::StorageError> {
    let mut keys = Vec::new();
    for entry in table.range((handler, "")..)? {
        let (key, value) = entry?;
        let (owner, name) = key.value();
        if owner != handler {
            break;
        }
        keys.push((name.to_string(), number(value)));
    }
    Ok(keys)
}

/// The outbox rows `handler` emitted (their `weir.handler` header).
fn rows_of<T: ReadableTable<u64, &'static [u8]>>(
    outbox: &T,
    handler: &str,
) -> Result<Vec<u64>, redb::StorageError> {
    let mut rows = Vec::new();
    for entry in outbox.iter()? {
        let (seq, bytes) = entry?;
        let mine = OutboxRecord::decode(bytes.value()).is_ok_and(|record| {
            record.headers.iter().any(|(name, value)| {
                name == "weir.handler" && value.as_slice() == handler.as_bytes()
            })
        });
        if mine {
            rows.push(seq.value());
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::super::{Applied, Effects, Write};

    use tokio::sync::oneshot;

    use super::super::record::{OUTBOX_FORMAT, OUTBOX_FORMAT_UNTIMED};
    use super::*;

    type Store = RedbStore;

    impl RedbStore {
        async fn write(&self, write: Write) -> Result<Applied, StoreError> {
            let (reply, answer) = oneshot::channel();
            self.send(Request::One(write, reply))?;
            answer.await.map_err(|_| StoreError::Closed)?
        }
    }

    fn finished(id: &str, ttl: Duration) -> Write {
        Write::Finished {
            handler: "h".into(),
            id: id.into(),
            ttl,
            dedup: false,
            effects: None,
        }
    }

    #[tokio::test]
    async fn marks_and_attempts_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("weir.redb");
        {
            let store = Store::open(&path).expect("open");
            assert_eq!(store.seen("h", "e1").expect("read"), Seen::default());
            store
                .write(Write::Attempted {
                    handler: "h".into(),
                    id: "e2".into(),
                    attempts: 2,
                })
                .await
                .expect("write");
            store
                .write(finished("e1", Duration::from_secs(60)))
                .await
                .expect("write");
        }
        // The writer thread holds the database until its channel closes.
        let store = poll_open(&path);
        assert_eq!(
            store.seen("h", "e1").expect("read"),
            Seen {
                done: true,
                attempts: 0
            }
        );
        assert_eq!(
            store.seen("h", "e2").expect("read"),
            Seen {
                done: false,
                attempts: 2
            }
        );
        assert_eq!(store.seen("other", "e1").expect("read"), Seen::default());
    }

    fn poll_open(path: &Path) -> Store {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match Store::open(path) {
                Ok(store) => return store,
                Err(err) if std::time::Instant::now() > deadline => panic!("{err}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    #[tokio::test]
    async fn finishing_clears_attempts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("weir.redb")).expect("open");
        store
            .write(Write::Attempted {
                handler: "h".into(),
                id: "e".into(),
                attempts: 4,
            })
            .await
            .expect("write");
        store
            .write(finished("e", Duration::from_secs(60)))
            .await
            .expect("write");
        assert_eq!(
            store.seen("h", "e").expect("read"),
            Seen {
                done: true,
                attempts: 0
            }
        );
    }

    #[tokio::test]
    async fn expired_marks_are_removed_through_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("weir.redb")).expect("open");
        store
            .write(finished("old", Duration::ZERO))
            .await
            .expect("write");
        store
            .write(finished("new", Duration::from_secs(3600)))
            .await
            .expect("write");
        // The next batch sweeps what is due.
        store
            .write(finished("other", Duration::from_secs(3600)))
            .await
            .expect("write");
        assert!(!store.seen("h", "old").expect("read").done);
        assert!(store.seen("h", "new").expect("read").done);
        let txn = store.db.begin_read().expect("read");
        let expiry = txn.open_table(DEDUP_EXPIRY).expect("table");
        assert_eq!(
            expiry.len().expect("len"),
            2,
            "the expired index entry is gone"
        );
        let dedup = txn.open_table(DEDUP).expect("table");
        assert!(dedup.get(("h", "old")).expect("get").is_none());
    }

    #[tokio::test]
    async fn concurrent_writes_share_transactions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("weir.redb")).expect("open");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.spawn(async move {
                store
                    .write(finished(&format!("e{i}"), Duration::from_secs(60)))
                    .await
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.expect("join").expect("write");
        }
        let stats = store.commit_stats();
        let (commits, writes) = (
            stats.commits.load(Ordering::Relaxed),
            stats.writes.load(Ordering::Relaxed),
        );
        assert_eq!(writes, 200);
        assert!(
            commits < 200,
            "200 concurrent writes took {commits} transactions"
        );
        for i in 0..200 {
            assert!(store.seen("h", &format!("e{i}")).expect("read").done);
        }
    }

    fn emitting(id: &str, key: &str) -> Write {
        let mut writes = BTreeMap::new();
        writes.insert(key.to_string(), Some(id.as_bytes().to_vec()));
        Write::Finished {
            handler: "h".into(),
            id: id.into(),
            ttl: Duration::from_secs(60),
            dedup: true,
            effects: Some(Arc::new(Effects {
                writes,
                emits: vec![OutboxRecord {
                    topic: "out".into(),
                    key: Some(vec![0, 255]),
                    payload: id.as_bytes().to_vec(),
                    headers: vec![("h".into(), vec![1, 2])],
                }],
                ..Effects::default()
            })),
        }
    }

    #[tokio::test]
    async fn forgetting_a_handler_leaves_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("weir.redb")).expect("open");
        let of = |handler: &str, write: Write| match write {
            Write::Finished {
                id,
                ttl,
                dedup,
                effects,
                ..
            } => {
                let effects = effects.map(|effects| {
                    let mut effects = (*effects).clone();
                    for record in &mut effects.emits {
                        record
                            .headers
                            .push(("weir.handler".into(), handler.as_bytes().to_vec()));
                    }
                    Arc::new(effects)
                });
                Write::Finished {
                    handler: handler.into(),
                    id,
                    ttl,
                    dedup,
                    effects,
                }
            }
            other => other,
        };
        for (handler, id) in [("h", "e1"), ("h", "e2"), ("other", "e1")] {
            let write = of(handler, emitting(id, id));
            assert_eq!(store.write(write).await.expect("write"), Applied::Done);
        }
        store
            .write(Write::Attempted {
                handler: "h".into(),
                id: "e3".into(),
                attempts: 2,
            })
            .await
            .expect("attempt");
        let before = Footprint {
            marks: 2,
            attempts: 1,
            state_keys: 2,
            outbox_rows: 2,
        };
        assert_eq!(store.footprint("h").expect("footprint"), before);
        let forget = |state| Write::Forget {
            handler: "h".into(),
            state,
        };
        store.write(forget(false)).await.expect("forget");
        assert_eq!(
            store.footprint("h").expect("footprint"),
            Footprint {
                marks: 0,
                attempts: 0,
                ..before
            }
        );
        assert!(!store.seen("h", "e1").expect("seen").done);
        store.write(forget(true)).await.expect("reset");
        assert_eq!(
            store.footprint("h").expect("footprint"),
            Footprint::default()
        );
        let other = store.footprint("other").expect("footprint");
        assert_eq!(
            (other.marks, other.state_keys, other.outbox_rows),
            (1, 1, 1)
        );
        assert!(store.seen("other", "e1").expect("seen").done);
    }

    #[tokio::test]
    async fn versions_and_outbox_sequence_keep_growing_across_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("weir.redb");
        let (version, seq) = {
            let store = Store::open(&path).expect("open");
            assert_eq!(
                store.write(emitting("e1", "k")).await.expect("write"),
                Applied::Done
            );
            let view = store.state_view().expect("view");
            let (version, _) = view.get("h", "k").expect("get").expect("present");
            let rows = store.outbox_batch(None, 10).expect("outbox");
            (version, rows[0].0)
        };
        let store = poll_open(&path);
        assert_eq!(
            store.write(emitting("e2", "k")).await.expect("write"),
            Applied::Done
        );
        let (after, value) = store
            .state_view()
            .expect("view")
            .get("h", "k")
            .expect("get")
            .expect("present");
        assert!(
            after > version,
            "version {after} after reopening, was {version}"
        );
        assert_eq!(value, b"e2");
        let rows = store.outbox_batch(None, 10).expect("outbox");
        assert_eq!(rows.len(), 2);
        let oldest = store.outbox_oldest_ms().expect("oldest").expect("a time");
        assert!(
            oldest <= now_ms() && oldest + 60_000 > now_ms(),
            "oldest row committed at {oldest}, now {}",
            now_ms()
        );
        assert!(rows[1].0 > seq, "outbox sequence reused after reopening");
        let record = rows[0].1.clone().expect("decodes");
        assert_eq!(record.key, Some(vec![0, 255]));
        assert_eq!(record.payload, b"e1");
        let stored = record.encode(1_700_000_000_123);
        assert_eq!(committed_ms(&stored), Some(1_700_000_000_123));
        assert_eq!(OutboxRecord::decode(&stored), Ok(record.clone()));
        // A row of the format without the commit time is still read.
        let mut untimed = vec![OUTBOX_FORMAT_UNTIMED];
        untimed.extend_from_slice(&stored[9..]);
        assert_eq!(OutboxRecord::decode(&untimed), Ok(record));
        assert_eq!(committed_ms(&untimed), None);
        assert!(OutboxRecord::decode(&[9]).is_err());
        assert!(OutboxRecord::decode(&[OUTBOX_FORMAT, 5, 0]).is_err());
        store
            .write(Write::Published {
                seqs: rows.iter().map(|(s, _)| *s).collect(),
            })
            .await
            .expect("write");
        assert_eq!(store.outbox_len().expect("len"), 0);
    }
}
