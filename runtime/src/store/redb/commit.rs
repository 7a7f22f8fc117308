//! The writer thread: one redb transaction, one fsync, per batch of
//! queued writes (the "Group commit" invariant of the [parent](super)),
//! each write validated against what is committed before it applies.

use std::path::PathBuf;
use std::sync::{Arc, mpsc};

use redb::{Database, ReadableTable};
use tokio::sync::Notify;

use super::super::{
    Applied, CommitStats, Effects, Faults, Request, StoreError, Write, answer_all, now_ms,
};
use super::{
    ATTEMPTS, DEDUP, DEDUP_EXPIRY, Latest, MAX_BATCH, MAX_EXPIRED_PER_BATCH, META, META_OUTBOX_SEQ,
    META_STATE_VERSION, OUTBOX, STATE, Snapshot, keys_of, rows_of, scan,
};
use crate::fault;
use crate::lock::UnpoisonedRw;

/// The writer thread's handles.
pub(super) struct WriterState {
    pub(super) metrics: Arc<std::sync::OnceLock<crate::metrics::Metrics>>,
    pub(super) db: Arc<Database>,
    pub(super) path: Arc<PathBuf>,
    pub(super) latest: Latest,
    pub(super) stats: Arc<CommitStats>,
    pub(super) outbox_ready: Arc<Notify>,
    pub(super) faults: Arc<Faults>,
}

impl WriterState {
    /// One transaction, one fsync, per batch of requests.
    pub(super) fn run(&self, requests: &mpsc::Receiver<Request>) {
        while let Ok(first) = requests.recv() {
            let mut queued = first.writes().len();
            let mut batch = vec![first];
            while queued < MAX_BATCH {
                match requests.try_recv() {
                    Ok(request) => {
                        queued += request.writes().len();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            if self.faults.stopping() {
                tracing::error!("the database writer stops (injected)");
                return;
            }
            let writes: Vec<&Write> = batch.iter().flat_map(Request::writes).collect();
            let injected = self.faults.fail_this();
            let started = std::time::Instant::now();
            let result = if injected {
                Err("injected write failure".to_string())
            } else {
                apply(&self.db, &writes)
            }
            .map_err(|message| StoreError::Io {
                database: self.path.display().to_string(),
                message,
            });
            match &result {
                Err(err) => {
                    tracing::error!(error = %err, writes = writes.len(), "database write failed");
                }
                Ok(outcome) => {
                    // Fault point: the transaction is durable, nobody has been
                    // told, so no offset has been stored for it.
                    fault::point("after-commit");
                    self.publish_snapshot();
                    self.stats
                        .committed(&outcome.applied, self.metrics.get(), started.elapsed());
                    if outcome.outbox_rows > 0 {
                        self.outbox_ready.notify_one();
                    }
                    tracing::trace!(writes = writes.len(), "group commit");
                }
            }
            drop(writes);
            answer_all(batch, &result.map(|outcome| outcome.applied));
        }
    }
}

impl WriterState {
    /// Makes the commit just made visible to lookups, before anyone is told
    /// of it (the "Lookups" invariant in the module documentation).
    fn publish_snapshot(&self) {
        let snapshot = match Snapshot::take(&self.db) {
            Ok(snapshot) => Some(Arc::new(snapshot)),
            Err(err) => {
                tracing::warn!(error = %err, "cannot take a snapshot for lookups; they read the database directly until the next commit");
                None
            }
        };
        *self.latest.write_locked() = snapshot;
    }
}

/// What one batch did.
struct BatchOutcome {
    /// Per write, in order.
    applied: Vec<Applied>,
    /// Outbox rows inserted.
    outbox_rows: usize,
}

fn apply(db: &Database, batch: &[&Write]) -> Result<BatchOutcome, String> {
    let err = |e: redb::StorageError| e.to_string();
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let mut applied = Vec::with_capacity(batch.len());
    let mut outbox_rows = 0;
    {
        let mut dedup = txn.open_table(DEDUP).map_err(|e| e.to_string())?;
        let mut expiry = txn.open_table(DEDUP_EXPIRY).map_err(|e| e.to_string())?;
        let mut attempts = txn.open_table(ATTEMPTS).map_err(|e| e.to_string())?;
        let mut state = txn.open_table(STATE).map_err(|e| e.to_string())?;
        let mut outbox = txn.open_table(OUTBOX).map_err(|e| e.to_string())?;
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        let counter = |meta: &redb::Table<&str, u64>, name: &str| -> Result<u64, String> {
            Ok(meta.get(name).map_err(err)?.map(|v| v.value()).unwrap_or(0))
        };
        // Every state value written by this transaction gets this version;
        // versions only grow, so a changed key never looks unchanged.
        let version = counter(&meta, META_STATE_VERSION)? + 1;
        let mut wrote_state = false;
        let mut outbox_seq = counter(&meta, META_OUTBOX_SEQ)?;
        let now = now_ms();
        for write in batch {
            match write {
                Write::Finished {
                    handler,
                    id,
                    ttl,
                    dedup: check,
                    effects,
                } => {
                    let key = (handler.as_str(), id.as_str());
                    if *check {
                        let live = dedup
                            .get(key)
                            .map_err(err)?
                            .is_some_and(|expires| expires.value() > now);
                        if live {
                            applied.push(Applied::Duplicate);
                            continue;
                        }
                    }
                    if let Some(effects) = effects.as_deref().filter(|e| !e.is_empty()) {
                        if !still_valid(&state, handler, effects).map_err(err)? {
                            applied.push(Applied::Conflict);
                            continue;
                        }
                        for (name, value) in &effects.writes {
                            let key = (handler.as_str(), name.as_str());
                            match value {
                                Some(bytes) => {
                                    state
                                        .insert(key, (version, bytes.as_slice()))
                                        .map_err(err)?;
                                }
                                None => {
                                    state.remove(key).map_err(err)?;
                                }
                            }
                            wrote_state = true;
                        }
                        for record in &effects.emits {
                            outbox_seq += 1;
                            outbox
                                .insert(outbox_seq, record.encode(now).as_slice())
                                .map_err(err)?;
                            outbox_rows += 1;
                        }
                    }
                    let expires = now.saturating_add(ttl.as_millis() as u64);
                    if let Some(old) = dedup.insert(key, expires).map_err(err)? {
                        let old = old.value();
                        expiry.remove((old, key.0, key.1)).map_err(err)?;
                    }
                    expiry.insert((expires, key.0, key.1), ()).map_err(err)?;
                    attempts.remove(key).map_err(err)?;
                    applied.push(Applied::Done);
                }
                Write::Attempted {
                    handler,
                    id,
                    attempts: count,
                } => {
                    attempts
                        .insert((handler.as_str(), id.as_str()), *count)
                        .map_err(err)?;
                    applied.push(Applied::Done);
                }
                Write::Published { seqs } => {
                    for seq in seqs {
                        outbox.remove(*seq).map_err(err)?;
                    }
                    applied.push(Applied::Done);
                }
                Write::Forget {
                    handler,
                    state: reset,
                } => {
                    let h = handler.as_str();
                    for (id, expires) in keys_of(&dedup, h, |v| v.value()).map_err(err)? {
                        dedup.remove((h, id.as_str())).map_err(err)?;
                        expiry.remove((expires, h, id.as_str())).map_err(err)?;
                    }
                    for (id, _) in keys_of(&attempts, h, |v| u64::from(v.value())).map_err(err)? {
                        attempts.remove((h, id.as_str())).map_err(err)?;
                    }
                    if *reset {
                        for (key, _) in keys_of(&state, h, |_| 0).map_err(err)? {
                            state.remove((h, key.as_str())).map_err(err)?;
                        }
                        for seq in rows_of(&outbox, h).map_err(err)? {
                            outbox.remove(seq).map_err(err)?;
                        }
                    }
                    applied.push(Applied::Done);
                }
            }
        }
        if wrote_state {
            meta.insert(META_STATE_VERSION, version).map_err(err)?;
        }
        if outbox_rows > 0 {
            meta.insert(META_OUTBOX_SEQ, outbox_seq).map_err(err)?;
        }
        // Expire marks through the index (due at or before `now`, matching
        // `seen`, which treats them as gone): only entries already due are
        // visited, never the whole table.
        let due: Vec<(u64, String, String)> = expiry
            .range(..(now.saturating_add(1), "", ""))
            .map_err(err)?
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
                .map_err(err)?;
            dedup.remove((handler.as_str(), id.as_str())).map_err(err)?;
        }
    }
    // Fault point: everything is staged but nothing is durable.
    fault::point("before-commit");
    txn.commit().map_err(|e| e.to_string())?;
    Ok(BatchOutcome {
        applied,
        outbox_rows,
    })
}

/// Whether everything `effects` read is still as it was: each key's
/// version, and each listing's result.
fn still_valid(
    state: &redb::Table<(&str, &str), (u64, &[u8])>,
    handler: &str,
    effects: &Effects,
) -> Result<bool, redb::StorageError> {
    for (key, seen) in &effects.reads {
        let now = state.get((handler, key.as_str()))?.map(|v| v.value().0);
        if now != *seen {
            return Ok(false);
        }
    }
    for listing in &effects.scans {
        let now = scan(
            state,
            handler,
            &listing.prefix,
            listing.start_after.as_deref(),
            listing.fetched,
        )?;
        if !listing.lists(&now) {
            return Ok(false);
        }
    }
    Ok(true)
}
