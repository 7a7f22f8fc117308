//! The runtime's one redb database: dedup marks and attempt counts (state and
//! outbox tables come next).
//!
//! # Tables
//!
//! | table | key | value | meaning |
//! | --- | --- | --- | --- |
//! | `dedup` | (handler, event id) | expiry, ms since epoch | the event's outcome is final |
//! | `dedup_expiry` | (expiry, handler, event id) | () | index for expiring marks without a scan |
//! | `attempts` | (handler, event id) | attempts so far | failed attempts of an unfinished event |
//!
//! # Group commit
//!
//! Writes go to one writer thread, which applies everything queued in a
//! single write transaction with `Durability::Immediate` (one fsync for the
//! whole batch) and only then answers each writer. Invariant: when
//! [`Store::write`] returns `Ok`, the write is on disk; callers store offsets
//! only after that, so a crash at any point either keeps the mark and the
//! offset, or the message is redelivered and either found done (skipped) or
//! handled again with its persisted attempt count.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

const DEDUP: TableDefinition<(&str, &str), u64> = TableDefinition::new("dedup");
const DEDUP_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("dedup_expiry");
const ATTEMPTS: TableDefinition<(&str, &str), u32> = TableDefinition::new("attempts");

/// Most writes applied in one transaction.
const MAX_BATCH: usize = 4096;
/// Most expired marks removed per batch, so expiry never stalls a commit.
const MAX_EXPIRED_PER_BATCH: usize = 1024;

/// Errors from the store. They name the database file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("cannot open the database {path}: {message}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A read or write failed.
    #[error("database {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The writer thread is gone (the runtime is shutting down).
    #[error("the database writer has stopped")]
    Closed,
}

/// One change, applied durably by the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The event's outcome is final (handled or dead-lettered): mark it done
    /// until `ttl` from now and forget its attempts.
    Finished {
        /// Handler name.
        handler: String,
        /// Event id.
        id: String,
        /// How long the mark is kept.
        ttl: Duration,
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
}

/// What the store knows about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    /// Its outcome is final: a duplicate.
    pub done: bool,
    /// Failed attempts persisted so far.
    pub attempts: u32,
}

struct Request {
    write: Write,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// Group-commit counters.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Write transactions committed.
    pub commits: AtomicU64,
    /// Writes applied (over all transactions).
    pub writes: AtomicU64,
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: Arc<PathBuf>,
    writer: mpsc::Sender<Request>,
    stats: Arc<CommitStats>,
}

impl Store {
    /// Opens (or creates) the database at `path` and starts its writer
    /// thread.
    ///
    /// # Errors
    ///
    /// When the file cannot be created, is not a redb database, or is locked
    /// by another process.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: path.to_path_buf(),
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
        }
        txn.commit().map_err(|e| open_error(e.to_string()))?;
        let db = Arc::new(db);
        let path = Arc::new(path.to_path_buf());
        let (writer, requests) = mpsc::channel();
        let stats = Arc::new(CommitStats::default());
        let (thread_db, thread_path, thread_stats) = (db.clone(), path.clone(), stats.clone());
        std::thread::Builder::new()
            .name("weir-store".into())
            .spawn(move || write_loop(&thread_db, &thread_path, &requests, &thread_stats))
            .map_err(|e| open_error(e.to_string()))?;
        Ok(Self {
            db,
            path,
            writer,
            stats,
        })
    }

    /// How many transactions carried how many writes so far.
    pub fn commit_stats(&self) -> &CommitStats {
        &self.stats
    }

    fn io(&self, err: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: self.path.to_path_buf(),
            message: err.to_string(),
        }
    }

    /// Looks an event up. A read transaction: never blocks on writers.
    ///
    /// # Errors
    ///
    /// When the database cannot be read.
    pub fn seen(&self, handler: &str, id: &str) -> Result<Seen, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let dedup = txn.open_table(DEDUP).map_err(|e| self.io(e))?;
        let attempts = txn.open_table(ATTEMPTS).map_err(|e| self.io(e))?;
        let done = match dedup.get((handler, id)).map_err(|e| self.io(e))? {
            Some(expires) => expires.value() > now_ms(),
            None => false,
        };
        let attempts = attempts
            .get((handler, id))
            .map_err(|e| self.io(e))?
            .map(|a| a.value())
            .unwrap_or(0);
        Ok(Seen { done, attempts })
    }

    /// Applies `write` durably, together with whatever else is queued.
    /// Returns once it is on disk.
    ///
    /// Cancel-safe in the sense that matters: if the future is dropped, the
    /// write may or may not be applied, exactly as if the process had
    /// crashed at that moment.
    ///
    /// # Errors
    ///
    /// When the transaction fails or the writer has stopped.
    pub async fn write(&self, write: Write) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Request { write, reply })
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The writer thread: one transaction, one fsync, per batch of requests.
fn write_loop(db: &Database, path: &Path, requests: &mpsc::Receiver<Request>, stats: &CommitStats) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let result = apply(db, &batch).map_err(|message| StoreError::Io {
            path: path.to_path_buf(),
            message,
        });
        if let Err(err) = &result {
            tracing::error!(error = %err, writes = batch.len(), "database write failed");
        } else {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats
                .writes
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::trace!(writes = batch.len(), "group commit");
        }
        for request in batch {
            let _ = request.reply.send(result.clone());
        }
    }
}

fn apply(db: &Database, batch: &[Request]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut dedup = txn.open_table(DEDUP).map_err(|e| e.to_string())?;
        let mut expiry = txn.open_table(DEDUP_EXPIRY).map_err(|e| e.to_string())?;
        let mut attempts = txn.open_table(ATTEMPTS).map_err(|e| e.to_string())?;
        let now = now_ms();
        for request in batch {
            match &request.write {
                Write::Finished { handler, id, ttl } => {
                    let expires = now.saturating_add(ttl.as_millis() as u64);
                    let key = (handler.as_str(), id.as_str());
                    if let Some(old) = dedup.insert(key, expires).map_err(|e| e.to_string())? {
                        let old = old.value();
                        expiry
                            .remove((old, key.0, key.1))
                            .map_err(|e| e.to_string())?;
                    }
                    expiry
                        .insert((expires, key.0, key.1), ())
                        .map_err(|e| e.to_string())?;
                    attempts.remove(key).map_err(|e| e.to_string())?;
                }
                Write::Attempted {
                    handler,
                    id,
                    attempts: count,
                } => {
                    attempts
                        .insert((handler.as_str(), id.as_str()), *count)
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        // Expire marks through the index (due at or before `now`, matching
        // `seen`, which treats them as gone): only entries already due are
        // visited, never the whole table.
        let due: Vec<(u64, String, String)> = expiry
            .range(..(now.saturating_add(1), "", ""))
            .map_err(|e| e.to_string())?
            .take(MAX_EXPIRED_PER_BATCH)
            .filter_map(Result::ok)
            .map(|(k, _)| {
                let (at, handler, id) = k.value();
                (at, handler.to_string(), id.to_string())
            })
            .collect();
        for (at, handler, id) in &due {
            expiry
                .remove((*at, handler.as_str(), id.as_str()))
                .map_err(|e| e.to_string())?;
            dedup
                .remove((handler.as_str(), id.as_str()))
                .map_err(|e| e.to_string())?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    fn finished(id: &str, ttl: Duration) -> Write {
        Write::Finished {
            handler: "h".into(),
            id: id.into(),
            ttl,
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
}
