//! One group commit in PostgreSQL: the writes of a batch, validated and
//! applied in one transaction, safely beside the commits of other
//! processes.
//!
//! # How writers of several processes are kept apart
//!
//! The transaction runs at READ COMMITTED. Before reading anything it
//! validates, it takes transaction-scoped advisory locks, so that nobody
//! else can change those things until it commits:
//!
//! - the **event** of every outcome that checks its dedup mark: two
//!   deliveries of one event, in two processes, commit one after the other,
//!   and the second finds the first's mark ("No effect twice");
//! - every **state key** an outcome read or writes: the versions it
//!   validates cannot change between validation and commit, and a key read
//!   as absent cannot appear meanwhile ("Serializable state", across
//!   processes — a lost update needs exactly that window);
//! - its **handler**, shared by every outcome that touches state, exclusive
//!   for one that listed a prefix: a listing's keys may not gain or lose a
//!   member while it is validated, and nobody can write a key it would have
//!   listed without that lock;
//! - the **outbox**, just before inserting rows, so that outbox sequence
//!   numbers follow commit order across processes (the relay's "Cursor"):
//!   a transaction takes its numbers only after every earlier holder has
//!   committed, and PostgreSQL releases locks only after the commit is
//!   visible.
//!
//! Invariant: within a transaction, locks are taken in ascending id order in
//! one statement (`lock_all`) before its first read, and the outbox lock
//! last; two batches can therefore only deadlock when a write that lists a
//! prefix or forgets a handler starts a later segment (see below), and
//! PostgreSQL then cancels one, whose writers are told it failed and try
//! again.
//!
//! # Segments
//!
//! A batch is applied in order, as in redb. Its writes are cut into
//! segments: a new one starts at a [`Write::Forget`] and at an outcome that
//! listed a prefix. Each segment: lock, read (the dedup marks and state
//! versions it depends on, the prefix listing), decide every write in
//! order in memory (an outcome sees the marks and versions of the ones
//! before it), then write the decisions in a few set-based statements
//! (sent together, executed in order). Later segments read what earlier
//! ones wrote, inside the same transaction.

use std::collections::{BTreeMap, HashMap};

use futures_util::future::try_join_all;
use tokio_postgres::types::ToSql;

use super::super::{Applied, Effects, Write, now_ms};
use super::lock_id;
use crate::fault;

/// The commit's statements, for one schema.
pub(super) struct Statements {
    lock_all: String,
    lock_one: String,
    read_marks: String,
    read_versions: String,
    next_version: String,
    upsert_marks: String,
    delete_attempts: String,
    upsert_attempts: String,
    delete_state: String,
    upsert_state: String,
    delete_outbox: String,
    insert_outbox: String,
    notify: String,
    forget_marks: String,
    forget_attempts: String,
    forget_state: String,
    forget_outbox: String,
    pub(super) scan_from: String,
    pub(super) scan_after: String,
}

impl Statements {
    /// `s` is the quoted schema name.
    pub(super) fn new(s: &str) -> Self {
        let pairs = "SELECT * FROM unnest($1::text[], $2::text[])";
        Self {
            lock_all: format!("SELECT {s}.lock_all($1::int8[], $2::bool[])"),
            lock_one: "SELECT pg_advisory_xact_lock($1)".into(),
            read_marks: format!(
                "SELECT handler, event_id, expires_ms FROM {s}.dedup \
                 WHERE (handler, event_id) IN ({pairs})"
            ),
            read_versions: format!(
                "SELECT handler, key, version FROM {s}.state WHERE (handler, key) IN ({pairs})"
            ),
            next_version: format!("SELECT nextval('{s}.state_version')"),
            upsert_marks: format!(
                "INSERT INTO {s}.dedup (handler, event_id, expires_ms) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) \
                 ON CONFLICT (handler, event_id) DO UPDATE SET expires_ms = EXCLUDED.expires_ms"
            ),
            delete_attempts: format!(
                "DELETE FROM {s}.attempts WHERE (handler, event_id) IN ({pairs})"
            ),
            upsert_attempts: format!(
                "INSERT INTO {s}.attempts (handler, event_id, attempts) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int4[]) \
                 ON CONFLICT (handler, event_id) DO UPDATE SET attempts = EXCLUDED.attempts"
            ),
            delete_state: format!("DELETE FROM {s}.state WHERE (handler, key) IN ({pairs})"),
            upsert_state: format!(
                "INSERT INTO {s}.state (handler, key, version, value) \
                 SELECT h, k, $3, v FROM unnest($1::text[], $2::text[], $4::bytea[]) AS t(h, k, v) \
                 ON CONFLICT (handler, key) DO UPDATE \
                 SET version = EXCLUDED.version, value = EXCLUDED.value"
            ),
            delete_outbox: format!("DELETE FROM {s}.outbox WHERE seq = ANY($1::int8[])"),
            insert_outbox: format!(
                "INSERT INTO {s}.outbox (handler, record) \
                 SELECT h, r FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS t(h, r, n) \
                 ORDER BY n"
            ),
            notify: "SELECT pg_notify($1, '')".into(),
            forget_marks: format!("DELETE FROM {s}.dedup WHERE handler = $1"),
            forget_attempts: format!("DELETE FROM {s}.attempts WHERE handler = $1"),
            forget_state: format!("DELETE FROM {s}.state WHERE handler = $1"),
            forget_outbox: format!("DELETE FROM {s}.outbox WHERE handler = $1"),
            scan_from: format!(
                "SELECT key, version, value FROM {s}.state \
                 WHERE handler = $1 AND key >= $2 AND key LIKE $3 ORDER BY key LIMIT $4"
            ),
            scan_after: format!(
                "SELECT key, version, value FROM {s}.state \
                 WHERE handler = $1 AND key > $2 AND key LIKE $3 ORDER BY key LIMIT $4"
            ),
        }
    }
}

/// The advisory lock ids of one schema.
pub(super) struct LockIds {
    schema: String,
    /// The session lock of the relay lease.
    pub(super) relay: i64,
    /// The transaction lock that orders outbox sequence numbers.
    outbox: i64,
}

impl LockIds {
    pub(super) fn new(schema: &str) -> Self {
        Self {
            schema: schema.to_string(),
            relay: lock_id(schema, &["relay"]),
            outbox: lock_id(schema, &["outbox"]),
        }
    }

    fn event(&self, handler: &str, id: &str) -> i64 {
        lock_id(&self.schema, &["event", handler, id])
    }

    fn key(&self, handler: &str, key: &str) -> i64 {
        lock_id(&self.schema, &["key", handler, key])
    }

    fn handler(&self, handler: &str) -> i64 {
        lock_id(&self.schema, &["handler", handler])
    }
}

/// What one batch did.
pub(super) struct BatchOutcome {
    /// Per write, in order.
    pub(super) applied: Vec<Applied>,
    /// Outbox rows inserted.
    pub(super) outbox_rows: usize,
}

type Pair = (String, String);

/// What a segment decided to write. Maps keep one change per row (a later
/// write of the batch replaces an earlier one), in key order, so that every
/// transaction touches rows in the same order.
#[derive(Default)]
struct Plan {
    marks: BTreeMap<Pair, i64>,
    attempts: BTreeMap<Pair, Option<i32>>,
    state: BTreeMap<Pair, Option<Vec<u8>>>,
    published: Vec<i64>,
    outbox: Vec<(String, Vec<u8>)>,
}

/// The transaction in progress.
struct Txn<'a, 'b> {
    txn: &'b deadpool_postgres::Transaction<'a>,
    sql: &'b Statements,
    locks: &'b LockIds,
    /// Locks held, and whether exclusively.
    held: HashMap<i64, bool>,
    /// This transaction's state version, once taken.
    version: Option<i64>,
    outbox_locked: bool,
}

fn err(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Applies `batch` in one transaction (see the module documentation).
pub(super) async fn apply(
    client: &mut deadpool_postgres::Object,
    sql: &Statements,
    locks: &LockIds,
    channel: &str,
    batch: &[&Write],
) -> Result<BatchOutcome, String> {
    let txn = client.transaction().await.map_err(err)?;
    let mut t = Txn {
        txn: &txn,
        sql,
        locks,
        held: HashMap::new(),
        version: None,
        outbox_locked: false,
    };
    let mut applied = Vec::with_capacity(batch.len());
    let mut outbox_rows = 0;
    let mut start = 0;
    while start < batch.len() {
        if let Write::Forget { handler, state } = batch[start] {
            t.forget(handler, *state).await?;
            applied.push(Applied::Done);
            start += 1;
            continue;
        }
        let mut end = start + 1;
        while end < batch.len() && !starts_segment(batch[end]) {
            end += 1;
        }
        outbox_rows += t.segment(&batch[start..end], &mut applied).await?;
        start = end;
    }
    if outbox_rows > 0 {
        txn.execute(sql.notify.as_str(), &[&channel])
            .await
            .map_err(err)?;
    }
    // Fault point: everything is staged but nothing is durable.
    fault::point("before-commit");
    txn.commit().await.map_err(err)?;
    Ok(BatchOutcome {
        applied,
        outbox_rows,
    })
}

/// Whether `write` begins a segment of its own ("Segments").
fn starts_segment(write: &Write) -> bool {
    match write {
        Write::Forget { .. } => true,
        Write::Finished {
            effects: Some(effects),
            ..
        } => !effects.scans.is_empty(),
        _ => false,
    }
}

/// The effects of `write` worth validating and applying, if any.
fn effects_of(write: &Write) -> Option<&Effects> {
    match write {
        Write::Finished {
            effects: Some(effects),
            ..
        } if !effects.is_empty() => Some(effects),
        _ => None,
    }
}

impl Txn<'_, '_> {
    /// Takes the locks in `wanted` this transaction does not hold yet, in
    /// ascending id order, in one statement.
    async fn lock(&mut self, wanted: BTreeMap<i64, bool>) -> Result<(), String> {
        let (mut ids, mut exclusive) = (Vec::new(), Vec::new());
        for (id, exclusively) in wanted {
            match self.held.get(&id) {
                Some(true) => continue,
                Some(false) if !exclusively => continue,
                _ => {}
            }
            ids.push(id);
            exclusive.push(exclusively);
        }
        if ids.is_empty() {
            return Ok(());
        }
        self.txn
            .execute(self.sql.lock_all.as_str(), &[&ids, &exclusive])
            .await
            .map_err(err)?;
        for (id, exclusively) in ids.into_iter().zip(exclusive) {
            let held = self.held.entry(id).or_insert(exclusively);
            *held |= exclusively;
        }
        Ok(())
    }

    /// Forgets `handler` (a rebuild, `weir rewind`), with its handler lock
    /// held exclusively so that no outcome of it commits meanwhile.
    async fn forget(&mut self, handler: &str, state: bool) -> Result<(), String> {
        self.lock(BTreeMap::from([(self.locks.handler(handler), true)]))
            .await?;
        let mut statements = vec![&self.sql.forget_marks, &self.sql.forget_attempts];
        if state {
            statements.extend([&self.sql.forget_state, &self.sql.forget_outbox]);
        }
        for statement in statements {
            self.txn
                .execute(statement.as_str(), &[&handler])
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    /// Locks, reads, decides and writes one segment; returns the outbox
    /// rows it inserted.
    async fn segment(
        &mut self,
        writes: &[&Write],
        applied: &mut Vec<Applied>,
    ) -> Result<usize, String> {
        // 1. Locks.
        let mut wanted: BTreeMap<i64, bool> = BTreeMap::new();
        let mut checked: Vec<Pair> = Vec::new();
        let mut read: Vec<Pair> = Vec::new();
        let mut writes_state = false;
        for write in writes {
            let Write::Finished {
                handler, id, dedup, ..
            } = write
            else {
                continue;
            };
            if *dedup {
                wanted.insert(self.locks.event(handler, id), true);
                checked.push((handler.clone(), id.clone()));
            }
            if let Some(effects) = effects_of(write) {
                let scanning = !effects.scans.is_empty();
                let lock = wanted.entry(self.locks.handler(handler)).or_insert(false);
                *lock |= scanning;
                for key in effects.reads.keys().chain(effects.writes.keys()) {
                    wanted.insert(self.locks.key(handler, key), true);
                }
                read.extend(effects.reads.keys().map(|k| (handler.clone(), k.clone())));
                writes_state |= !effects.writes.is_empty();
            }
        }
        self.lock(wanted).await?;

        // 2. Reads, sent together.
        let mut marks: HashMap<Pair, i64> = HashMap::new();
        let mut versions: HashMap<Pair, Option<u64>> = HashMap::new();
        let (mark_rows, version_rows) = {
            let (h, i): (Vec<&str>, Vec<&str>) = checked
                .iter()
                .map(|(h, i)| (h.as_str(), i.as_str()))
                .unzip();
            let (rh, rk): (Vec<&str>, Vec<&str>) =
                read.iter().map(|(h, k)| (h.as_str(), k.as_str())).unzip();
            let marks_query = async {
                if h.is_empty() {
                    Ok(Vec::new())
                } else {
                    self.txn
                        .query(self.sql.read_marks.as_str(), &[&h, &i])
                        .await
                }
            };
            let versions_query = async {
                if rh.is_empty() {
                    Ok(Vec::new())
                } else {
                    self.txn
                        .query(self.sql.read_versions.as_str(), &[&rh, &rk])
                        .await
                }
            };
            tokio::try_join!(marks_query, versions_query).map_err(err)?
        };
        for row in mark_rows {
            marks.insert((row.get(0), row.get(1)), row.get(2));
        }
        for pair in read {
            versions.insert(pair, None);
        }
        for row in version_rows {
            versions.insert((row.get(0), row.get(1)), Some(row.get::<_, i64>(2) as u64));
        }
        if writes_state && self.version.is_none() {
            let row = self
                .txn
                .query_one(self.sql.next_version.as_str(), &[])
                .await
                .map_err(err)?;
            self.version = Some(row.get(0));
        }
        // A listing is validated as it reads now (the handler lock is held
        // exclusively): only the segment's first write can have one.
        let listings_hold = match writes.first().and_then(|w| effects_of(w)) {
            Some(effects) if !effects.scans.is_empty() => {
                let Write::Finished { handler, .. } = writes[0] else {
                    unreachable!("effects belong to a finished write")
                };
                self.listings_hold(handler, effects).await?
            }
            _ => true,
        };

        // 3. Decisions, in order, as redb makes them.
        let now = now_ms() as i64;
        let version = self.version.unwrap_or(0);
        let mut plan = Plan::default();
        for (at, write) in writes.iter().enumerate() {
            match write {
                Write::Finished {
                    handler,
                    id,
                    ttl,
                    dedup,
                    ..
                } => {
                    let pair = (handler.clone(), id.clone());
                    if *dedup && marks.get(&pair).is_some_and(|expires| *expires > now) {
                        applied.push(Applied::Duplicate);
                        continue;
                    }
                    if let Some(effects) = effects_of(write) {
                        let reads_hold = effects.reads.iter().all(|(key, seen)| {
                            versions
                                .get(&(handler.clone(), key.clone()))
                                .copied()
                                .flatten()
                                == *seen
                        });
                        if !reads_hold || (at == 0 && !listings_hold) {
                            applied.push(Applied::Conflict);
                            continue;
                        }
                        for (key, value) in &effects.writes {
                            let pair = (handler.clone(), key.clone());
                            versions.insert(pair.clone(), value.as_ref().map(|_| version as u64));
                            plan.state.insert(pair, value.clone());
                        }
                        for record in &effects.emits {
                            plan.outbox
                                .push((handler.clone(), record.encode(now as u64)));
                        }
                    }
                    let expires = now.saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
                    marks.insert(pair.clone(), expires);
                    plan.marks.insert(pair.clone(), expires);
                    plan.attempts.insert(pair, None);
                    applied.push(Applied::Done);
                }
                Write::Attempted {
                    handler,
                    id,
                    attempts,
                } => {
                    let count = i32::try_from(*attempts).unwrap_or(i32::MAX);
                    plan.attempts
                        .insert((handler.clone(), id.clone()), Some(count));
                    applied.push(Applied::Done);
                }
                Write::Published { seqs } => {
                    plan.published.extend(seqs.iter().map(|s| *s as i64));
                    applied.push(Applied::Done);
                }
                Write::Forget { .. } => unreachable!("a forget is a segment of its own"),
            }
        }

        // 4. Writes.
        self.write(plan, version).await
    }

    /// Whether the listings `effects` read still list the same.
    async fn listings_hold(&self, handler: &str, effects: &Effects) -> Result<bool, String> {
        for listing in &effects.scans {
            let now = super::scan(
                &**self.txn,
                &self.sql.scan_from,
                &self.sql.scan_after,
                handler,
                &listing.prefix,
                listing.start_after.as_deref(),
                listing.fetched,
            )
            .await
            .map_err(err)?;
            if !listing.lists(&now) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes what a segment decided, in a few statements sent together
    /// (PostgreSQL runs them in the order sent).
    async fn write(&mut self, plan: Plan, version: i64) -> Result<usize, String> {
        fn split<V>(map: &BTreeMap<Pair, V>) -> (Vec<&str>, Vec<&str>) {
            map.keys().map(|(a, b)| (a.as_str(), b.as_str())).unzip()
        }
        let sql = self.sql;
        let (mark_h, mark_i) = split(&plan.marks);
        let mark_e: Vec<i64> = plan.marks.values().copied().collect();
        let gone: BTreeMap<&Pair, ()> = plan
            .attempts
            .iter()
            .filter(|(_, n)| n.is_none())
            .map(|(p, _)| (p, ()))
            .collect();
        let (gone_h, gone_i): (Vec<&str>, Vec<&str>) =
            gone.keys().map(|(a, b)| (a.as_str(), b.as_str())).unzip();
        let counted: Vec<(&Pair, i32)> = plan
            .attempts
            .iter()
            .filter_map(|(p, n)| n.map(|n| (p, n)))
            .collect();
        let count_h: Vec<&str> = counted.iter().map(|(p, _)| p.0.as_str()).collect();
        let count_i: Vec<&str> = counted.iter().map(|(p, _)| p.1.as_str()).collect();
        let count_n: Vec<i32> = counted.iter().map(|(_, n)| *n).collect();
        let (mut del_h, mut del_k, mut set_h, mut set_k, mut set_v) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((h, k), value) in &plan.state {
            match value {
                Some(v) => {
                    set_h.push(h.as_str());
                    set_k.push(k.as_str());
                    set_v.push(v.as_slice());
                }
                None => {
                    del_h.push(h.as_str());
                    del_k.push(k.as_str());
                }
            }
        }
        let out_h: Vec<&str> = plan.outbox.iter().map(|(h, _)| h.as_str()).collect();
        let out_r: Vec<&[u8]> = plan.outbox.iter().map(|(_, r)| r.as_slice()).collect();
        let lock_outbox = !plan.outbox.is_empty() && !self.outbox_locked;

        let mut statements: Vec<(&str, Vec<&(dyn ToSql + Sync)>)> = Vec::new();
        if !mark_h.is_empty() {
            statements.push((&sql.upsert_marks, vec![&mark_h, &mark_i, &mark_e]));
        }
        if !gone_h.is_empty() {
            statements.push((&sql.delete_attempts, vec![&gone_h, &gone_i]));
        }
        if !count_h.is_empty() {
            statements.push((&sql.upsert_attempts, vec![&count_h, &count_i, &count_n]));
        }
        if !del_h.is_empty() {
            statements.push((&sql.delete_state, vec![&del_h, &del_k]));
        }
        if !set_h.is_empty() {
            statements.push((&sql.upsert_state, vec![&set_h, &set_k, &version, &set_v]));
        }
        if !plan.published.is_empty() {
            statements.push((&sql.delete_outbox, vec![&plan.published]));
        }
        // The outbox lock last ("How writers … are kept apart").
        if lock_outbox {
            statements.push((&sql.lock_one, vec![&self.locks.outbox]));
        }
        if !out_h.is_empty() {
            statements.push((&sql.insert_outbox, vec![&out_h, &out_r]));
        }
        // Prepared first (cached per connection), so that each execute is
        // sent on its first poll, in order.
        let mut prepared = Vec::with_capacity(statements.len());
        for (statement, _) in &statements {
            prepared.push(self.txn.prepare_cached(statement).await.map_err(err)?);
        }
        let txn = self.txn;
        try_join_all(
            prepared
                .iter()
                .zip(&statements)
                .map(|(statement, (_, params))| txn.execute(statement, params.as_slice())),
        )
        .await
        .map_err(err)?;
        if lock_outbox {
            self.outbox_locked = true;
        }
        Ok(plan.outbox.len())
    }
}
