//! The shared backend: PostgreSQL, for several weir processes in one
//! consumer group (`[store] url`).
//!
//! Tables and migrations: [`schema`]. The group commit, its locks and its
//! validation: [`commit`]. TLS (libpq's `sslmode`): [`tls`], used by every
//! connection, the pool's and the relay lease's.
//!
//! # Connections
//!
//! A pool (`deadpool-postgres`, `[store] pool_size`) serves the lookup task
//! ([`lookup`]: dedup lookups and state reads, gathered into one query per
//! kind), the writer task (one connection per batch), prefix listings and
//! the outbox relay's reads; the relay lease holds one connection of its
//! own. A broken connection is
//! dropped by the pool and replaced at the next use, so a PostgreSQL
//! restart costs the calls in flight (they fail, and the pipeline holds and
//! tries again: "Durable before answered" in [`store`](crate::store)) and nothing
//! else.
//!
//! # Group commit
//!
//! As in redb: one writer task per process takes everything queued (at
//! most [`MAX_BATCH`] writes, which bounds the advisory locks one
//! transaction holds) into one PostgreSQL transaction and answers each
//! writer only after `COMMIT` returned. Writers of other processes commit
//! beside it; [`commit`] says how they are kept apart.
//!
//! # Relay lease
//!
//! Exactly one process relays the outbox at a time: the one whose lease
//! connection holds the session advisory lock of the schema's outbox.
//! PostgreSQL drops the lock with the connection (a process that dies, a
//! network that breaks), and the next process waiting for it takes over
//! from the rows still in the table. The lease connection also `LISTEN`s
//! for the notification every commit that adds outbox rows sends, so the
//! relay wakes for rows of every process.
//!
//! # Expiry
//!
//! A sweeper task of its own (off the writer, so commits never wait for
//! it) deletes due dedup marks through the `dedup_expiry` index once a
//! second: [`MAX_EXPIRED_PER_SWEEP`] per statement, statement after
//! statement until none are due, skipping rows another transaction holds.
//! So the table holds at most about a second of expired marks whatever the
//! rate. Marks due but not yet deleted already count as gone (`seen` and
//! the commit compare expiry with the time).

mod commit;
mod lookup;
mod schema;
mod tls;

pub use tls::percent_decoded;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_postgres::AsyncMessage;

use super::record::committed_ms;
use super::{
    CommitStats, Faults, Footprint, OutboxRecord, OutboxRow, RelayLease, Request, Seen, StateEntry,
    StoreError, answer_all, now_ms,
};
use crate::fault;
use crate::lock::Unpoisoned;

/// Most writes applied in one transaction. Each takes up to a few advisory
/// locks, and PostgreSQL's lock table is shared by all sessions
/// (`max_locks_per_transaction` × connections); this keeps one commit well
/// inside the default.
const MAX_BATCH: usize = 256;
/// Most expired marks deleted per statement of a sweep.
const MAX_EXPIRED_PER_SWEEP: i64 = 1024;
/// How long a readiness probe waits for the server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the sweeper deletes what is due.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How to reach the shared store (`[store]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// `postgres://user:password@host:port/database?…` (libpq's URL form,
    /// or its `key=value` form).
    pub url: String,
    /// The PostgreSQL schema holding weir's tables.
    pub schema: String,
    /// Most pooled connections of this process.
    pub pool_size: usize,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

impl PgSettings {
    /// Checks what can be checked without connecting; errors name the key.
    ///
    /// # Errors
    ///
    /// A URL that does not parse, a schema name that is not a plain
    /// identifier, a pool of zero.
    pub fn validate(&self) -> Result<(), String> {
        // Certificate files are read when connecting (a configuration
        // may be checked on another machine).
        tls::parse(&self.url)
            .map_err(|e| format!("[store] url: not a PostgreSQL connection URL: {e}"))?;
        if !schema::valid_name(&self.schema) {
            return Err(format!(
                "[store] schema: {:?} is not a plain SQL name (lower-case letters, digits and _, not starting with a digit, at most 63 characters)",
                self.schema
            ));
        }
        if self.pool_size == 0 {
            return Err("[store] pool_size: must be at least 1".into());
        }
        Ok(())
    }
}

/// The statements of one schema, with its name filled in.
struct Sql {
    lookup: lookup::Statements,
    outbox_batch: String,
    outbox_len: String,
    outbox_first: String,
    footprint: String,
    sweep: String,
    commit: commit::Statements,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        Self {
            lookup: lookup::Statements::new(&s),
            outbox_batch: format!(
                "SELECT seq, record FROM {s}.outbox WHERE seq > $1 ORDER BY seq LIMIT $2"
            ),
            outbox_len: format!("SELECT count(*) FROM {s}.outbox"),
            outbox_first: format!("SELECT record FROM {s}.outbox ORDER BY seq LIMIT 1"),
            footprint: format!(
                "SELECT (SELECT count(*) FROM {s}.dedup WHERE handler = $1), \
                 (SELECT count(*) FROM {s}.attempts WHERE handler = $1), \
                 (SELECT count(*) FROM {s}.state WHERE handler = $1), \
                 (SELECT count(*) FROM {s}.outbox WHERE handler = $1)"
            ),
            sweep: format!(
                "DELETE FROM {s}.dedup WHERE ctid = ANY(ARRAY(\
                 SELECT ctid FROM {s}.dedup WHERE expires_ms <= $1 \
                 ORDER BY expires_ms LIMIT {MAX_EXPIRED_PER_SWEEP} FOR UPDATE SKIP LOCKED))"
            ),
            commit: commit::Statements::new(&s),
        }
    }
}

/// What every handle shares.
struct Shared {
    pool: Pool,
    pg: tokio_postgres::Config,
    /// TLS as `[store] url` asks for it (see [`tls`]).
    tls: postgres_openssl::MakeTlsConnector,
    sql: Sql,
    /// `postgres://host:port/database (schema s)`, for errors and logs.
    database: String,
    /// The lock ids of this schema.
    locks: commit::LockIds,
    /// The channel commits notify when they add outbox rows.
    channel: String,
    stats: CommitStats,
    outbox_ready: Arc<Notify>,
    faults: Faults,
    metrics: OnceLock<crate::metrics::Metrics>,
    writer_alive: AtomicBool,
    /// The error of the last group commit, if it failed.
    last_failure: std::sync::Mutex<Option<String>>,
}

/// Handle to the shared store; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Request>,
    lookups: mpsc::UnboundedSender<lookup::Lookup>,
}

/// A stable 64-bit advisory lock id for `parts` in `schema`.
fn lock_id(schema: &str, parts: &[&str]) -> i64 {
    let mut hash = Sha256::new();
    for part in std::iter::once(schema).chain(parts.iter().copied()) {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_le_bytes(bytes)
}

/// `err` and every cause under it (a TLS error says why only in its
/// source: `certificate verify failed`).
fn chain(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether `err` is the server refusing (bad credentials, no such
/// database, a failed statement) or TLS failing (a certificate that does
/// not verify, a server without TLS under `sslmode=require`) rather than
/// the server being unreachable: waiting would not help.
fn refused(err: &tokio_postgres::Error) -> bool {
    // The driver's TLS errors have no kind of their own in its API; each
    // says "TLS" (`error performing TLS handshake: …`).
    err.as_db_error().is_some() || err.to_string().contains("TLS")
}

impl PgStore {
    /// Connects, creates or migrates the schema, and starts the writer.
    ///
    /// # Errors
    ///
    /// When the server cannot be reached or refuses, or the schema is newer
    /// than this build.
    pub async fn connect(settings: &PgSettings) -> Result<Self, StoreError> {
        let (mut pg, tls) = tls::parse(&settings.url).map_err(|message| StoreError::Open {
            database: "[store] url".into(),
            message,
        })?;
        let tls = tls.connector().map_err(|message| StoreError::Open {
            database: "[store] url".into(),
            message,
        })?;
        pg.connect_timeout(settings.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        if pg.get_application_name().is_none() {
            pg.application_name("weir");
        }
        let database = describe(&pg, &settings.schema);
        let open_error = |message: String| StoreError::Open {
            database: database.clone(),
            message,
        };
        let manager = Manager::from_config(
            pg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(settings.connect_timeout))
            .wait_timeout(Some(settings.connect_timeout * 2))
            .build()
            .map_err(|e| open_error(e.to_string()))?;
        let schema = settings.schema.as_str();
        let mut client = pool.get().await.map_err(|e| match &e {
            deadpool_postgres::PoolError::Backend(pg) if refused(pg) => open_error(chain(pg)),
            deadpool_postgres::PoolError::Backend(pg) => StoreError::Unreachable {
                database: database.clone(),
                message: chain(pg),
            },
            _ => StoreError::Unreachable {
                database: database.clone(),
                message: e.to_string(),
            },
        })?;
        let was = schema::migrate(&mut client, schema, lock_id(schema, &["migrate"]))
            .await
            .map_err(open_error)?;
        drop(client);
        if was < schema::VERSION {
            tracing::info!(database = %database, from = was, to = schema::VERSION, "store schema created or migrated");
        }
        let shared = Arc::new(Shared {
            pool,
            pg,
            tls,
            sql: Sql::new(schema),
            database,
            locks: commit::LockIds::new(schema),
            channel: format!("weir_outbox_{schema}"),
            stats: CommitStats::default(),
            outbox_ready: Arc::new(Notify::new()),
            faults: Faults::default(),
            metrics: OnceLock::new(),
            writer_alive: AtomicBool::new(true),
            last_failure: std::sync::Mutex::new(None),
        });
        let (writer, requests) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(shared.clone(), requests));
        let (lookups, asks) = mpsc::unbounded_channel();
        tokio::spawn(lookup::run(shared.clone(), asks));
        tokio::spawn(sweeper(Arc::downgrade(&shared)));
        Ok(Self {
            shared,
            writer,
            lookups,
        })
    }

    /// `postgres://host:port/database (schema s)`.
    pub fn describe(&self) -> String {
        self.shared.database.clone()
    }

    fn io(&self, err: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            database: self.shared.database.clone(),
            message: err.to_string(),
        }
    }

    /// Why the store cannot serve now, if it cannot (see `Store::probe`).
    pub async fn probe(&self) -> Option<String> {
        if !self.writer_alive() {
            return Some("the database writer has stopped".into());
        }
        let answered = tokio::time::timeout(PROBE_TIMEOUT, async {
            let client = self.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| self.io(e))
        })
        .await;
        match answered {
            Err(_) => return Some(format!("no answer within {PROBE_TIMEOUT:?}")),
            Ok(Err(err)) => return Some(err.to_string()),
            Ok(Ok(_)) => {}
        }
        let failed = self.shared.last_failure.locked().clone();
        failed.map(|err| format!("the last group commit failed: {err}"))
    }

    /// Deletes every dedup mark due at `at` (milliseconds since the Unix
    /// epoch), as the sweeper does every second with the time then
    /// ("Expiry" above); how many.
    ///
    /// # Errors
    ///
    /// When the database cannot be written.
    pub async fn sweep_expired(&self, at: i64) -> Result<u64, StoreError> {
        sweep_due(&self.shared, at)
            .await
            .map_err(|message| StoreError::Io {
                database: self.shared.database.clone(),
                message,
            })
    }

    /// Whether the writer task still runs.
    pub fn writer_alive(&self) -> bool {
        self.shared.writer_alive.load(Ordering::SeqCst)
    }

    /// Records each group commit to `metrics` from now on.
    pub fn record_to(&self, metrics: crate::metrics::Metrics) {
        let _ = self.shared.metrics.set(metrics);
    }

    /// Test support: the next `batches` commits fail.
    pub fn fail_next_commits(&self, batches: u64) {
        self.shared
            .faults
            .fail_batches
            .store(batches, Ordering::SeqCst);
    }

    /// Test support: the writer ends at its next batch.
    pub fn stop_writer(&self) {
        self.shared.faults.stop();
    }

    /// Group-commit counters of this process.
    pub fn commit_stats(&self) -> &CommitStats {
        &self.shared.stats
    }

    /// Woken when a commit added outbox rows.
    pub fn outbox_ready(&self) -> Arc<Notify> {
        self.shared.outbox_ready.clone()
    }

    /// Queues `request` for the writer task.
    pub(super) fn send(&self, request: Request) -> Result<(), StoreError> {
        self.writer.send(request).map_err(|_| StoreError::Closed)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.shared.pool.get().await.map_err(|e| self.io(e))
    }

    /// Asks the lookup task ("Group lookups" in [`lookup`]).
    async fn ask<T>(
        &self,
        lookup: impl FnOnce(oneshot::Sender<Result<T, String>>) -> lookup::Lookup,
    ) -> Result<T, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.lookups
            .send(lookup(answer))
            .map_err(|_| StoreError::Closed)?;
        answered
            .await
            .map_err(|_| StoreError::Closed)?
            .map_err(|e| self.io(e))
    }

    /// The event's mark and attempts, as committed now.
    pub async fn seen(&self, handler: &str, id: &str) -> Result<Seen, StoreError> {
        self.ask(|answer| lookup::Lookup::Seen {
            handler: handler.to_string(),
            id: id.to_string(),
            answer,
        })
        .await
    }

    /// `key`'s committed value and version.
    pub async fn get(
        &self,
        handler: &str,
        key: &str,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.ask(|answer| lookup::Lookup::Get {
            handler: handler.to_string(),
            key: key.to_string(),
            answer,
        })
        .await
    }

    /// Up to `count` committed entries under `prefix` after `start_after`,
    /// in byte order of keys (the column's "C" collation).
    pub async fn scan(
        &self,
        handler: &str,
        prefix: &str,
        start_after: Option<&str>,
        count: usize,
    ) -> Result<Vec<StateEntry>, StoreError> {
        let client = self.client().await?;
        let sql = &self.shared.sql.commit;
        scan(
            &**client,
            &sql.scan_from,
            &sql.scan_after,
            handler,
            prefix,
            start_after,
            count,
        )
        .await
        .map_err(|e| self.io(e))
    }

    /// Up to `limit` rows after `after`, in sequence order.
    pub async fn outbox_batch(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.shared.sql.outbox_batch)
            .await
            .map_err(|e| self.io(e))?;
        let after = after.map_or(0, |seq| seq as i64);
        let rows = client
            .query(&statement, &[&after, &(limit as i64)])
            .await
            .map_err(|e| self.io(e))?;
        Ok(rows
            .iter()
            .map(|row| {
                let seq: i64 = row.get(0);
                let bytes: &[u8] = row.get(1);
                (seq as u64, OutboxRecord::decode(bytes))
            })
            .collect())
    }

    /// Rows waiting in the outbox (of every process).
    pub async fn outbox_len(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(self.shared.sql.outbox_len.as_str(), &[])
            .await
            .map_err(|e| self.io(e))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// When the oldest outbox row was committed.
    pub async fn outbox_oldest_ms(&self) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(self.shared.sql.outbox_first.as_str(), &[])
            .await
            .map_err(|e| self.io(e))?;
        Ok(row.and_then(|row| committed_ms(row.get::<_, &[u8]>(0))))
    }

    /// What the store holds for `handler`.
    pub async fn footprint(&self, handler: &str) -> Result<Footprint, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(self.shared.sql.footprint.as_str(), &[&handler])
            .await
            .map_err(|e| self.io(e))?;
        let n = |i: usize| row.get::<_, i64>(i) as u64;
        Ok(Footprint {
            marks: n(0),
            attempts: n(1),
            state_keys: n(2),
            outbox_rows: n(3),
        })
    }

    /// Waits for the relay lease ("Relay lease" above). Dropping the lease
    /// closes its connection, which gives the lock up.
    pub async fn relay_lease(&self) -> Result<RelayLease, StoreError> {
        let shared = &self.shared;
        let (client, mut connection) = shared
            .pg
            .connect(shared.tls.clone())
            .await
            .map_err(|e| self.io(e))?;
        let (lost, receiver) = watch::channel(false);
        let ready = shared.outbox_ready.clone();
        let database = shared.database.clone();
        tokio::spawn(async move {
            // Drives the connection and turns notifications into wake-ups,
            // until the connection ends (the lease dropped, or broken).
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => ready.notify_one(),
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(database = %database, error = %err, "the outbox relay's lease connection broke; the lease is lost");
                        break;
                    }
                }
            }
            let _ = lost.send(true);
        });
        client
            .execute("SELECT pg_advisory_lock($1)", &[&shared.locks.relay])
            .await
            .map_err(|e| self.io(e))?;
        client
            .batch_execute(&format!("LISTEN \"{}\"", shared.channel))
            .await
            .map_err(|e| self.io(e))?;
        tracing::info!(database = %shared.database, "this process relays the shared outbox");
        Ok(RelayLease::held(receiver, Some(client)))
    }
}

/// `postgres://host:port/database (schema s)`, without credentials.
fn describe(pg: &tokio_postgres::Config, schema: &str) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg
        .get_dbname()
        .or(pg.get_user())
        .unwrap_or("postgres")
        .to_string();
    format!("postgres://{host}:{port}/{db} (schema {schema})")
}

/// A prefix listing, shared by reads and commit-time validation so both see
/// the same thing.
async fn scan(
    client: &impl tokio_postgres::GenericClient,
    scan_from: &str,
    scan_after: &str,
    handler: &str,
    prefix: &str,
    start_after: Option<&str>,
    count: usize,
) -> Result<Vec<StateEntry>, tokio_postgres::Error> {
    let pattern = format!("{}%", like_escape(prefix));
    let (statement, from) = match start_after {
        Some(after) if after >= prefix => (scan_after, after),
        _ => (scan_from, prefix),
    };
    let rows = client
        .query(statement, &[&handler, &from, &pattern, &(count as i64)])
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            (
                row.get::<_, String>(0),
                row.get::<_, i64>(1) as u64,
                row.get(2),
            )
        })
        .collect())
}

/// `text` as a LIKE pattern that matches it literally (backslash escapes).
fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The writer task: one transaction per batch ("Group commit" above).
async fn write_loop(shared: Arc<Shared>, mut requests: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = requests.recv().await {
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
        if shared.faults.stopping() {
            tracing::error!("the database writer stops (injected)");
            break;
        }
        let writes: Vec<&super::Write> = batch.iter().flat_map(Request::writes).collect();
        let injected = shared.faults.fail_this();
        let started = Instant::now();
        let result = if injected {
            Err("injected write failure".to_string())
        } else {
            commit_batch(&shared, &writes).await
        }
        .map_err(|message| StoreError::Io {
            database: shared.database.clone(),
            message,
        });
        *shared.last_failure.locked() = result.as_ref().err().map(ToString::to_string);
        match &result {
            Err(err) => {
                tracing::error!(error = %err, writes = writes.len(), "database write failed");
            }
            Ok(outcome) => {
                // Fault point: the transaction is durable, nobody has been
                // told, so no offset has been stored for it.
                fault::point("after-commit");
                shared
                    .stats
                    .committed(&outcome.applied, shared.metrics.get(), started.elapsed());
                if outcome.outbox_rows > 0 {
                    shared.outbox_ready.notify_one();
                }
            }
        }
        drop(writes);
        answer_all(batch, &result.map(|outcome| outcome.applied));
    }
    shared.writer_alive.store(false, Ordering::SeqCst);
}

async fn commit_batch(
    shared: &Shared,
    writes: &[&super::Write],
) -> Result<commit::BatchOutcome, String> {
    let mut client = shared.pool.get().await.map_err(|e| e.to_string())?;
    commit::apply(
        &mut client,
        &shared.sql.commit,
        &shared.locks,
        &shared.channel,
        writes,
    )
    .await
}

/// The sweeper task ("Expiry" above): every [`SWEEP_EVERY`], deletes every
/// mark then due; ends with the store.
async fn sweeper(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !shared.writer_alive.load(Ordering::SeqCst) {
            return;
        }
        match sweep_due(&shared, now_ms() as i64).await {
            Ok(0) => {}
            Ok(removed) => tracing::trace!(removed, "expired dedup marks removed"),
            Err(err) => {
                tracing::debug!(error = %err, "expiring dedup marks failed; next sweep tries again")
            }
        }
    }
}

/// Deletes every mark due at `now` (ms), [`MAX_EXPIRED_PER_SWEEP`] per
/// statement until one deletes fewer: however fast marks come due, a sweep
/// leaves none behind. Returns how many it deleted.
async fn sweep_due(shared: &Shared, now: i64) -> Result<u64, String> {
    let client = shared.pool.get().await.map_err(|e| e.to_string())?;
    let mut removed = 0;
    loop {
        let deleted = client
            .execute(shared.sql.sweep.as_str(), &[&now])
            .await
            .map_err(|e| e.to_string())?;
        removed += deleted;
        if deleted < MAX_EXPIRED_PER_SWEEP as u64 {
            return Ok(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_match_literally() {
        assert_eq!(like_escape("a_b%c\\d"), "a\\_b\\%c\\\\d");
        assert_eq!(like_escape("count/"), "count/");
    }

    #[test]
    fn lock_ids_differ_by_schema_and_part() {
        let a = lock_id("weir", &["s", "h", "k"]);
        assert_eq!(a, lock_id("weir", &["s", "h", "k"]));
        assert_ne!(a, lock_id("other", &["s", "h", "k"]));
        assert_ne!(a, lock_id("weir", &["s", "hk", ""]));
    }

    #[test]
    fn settings_errors_name_the_key() {
        let good = PgSettings {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            schema: "weir".into(),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
        };
        assert_eq!(good.validate(), Ok(()));
        let bad_schema = PgSettings {
            schema: "Weir-1".into(),
            ..good.clone()
        };
        assert!(
            bad_schema
                .validate()
                .is_err_and(|e| e.starts_with("[store] schema"))
        );
        let no_pool = PgSettings {
            pool_size: 0,
            ..good
        };
        assert!(
            no_pool
                .validate()
                .is_err_and(|e| e.starts_with("[store] pool_size"))
        );
    }
}
