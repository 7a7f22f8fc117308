//! Putting it together: load every handler in the directory, give each its
//! own consumer (group or durable) and worker on the configured broker, and
//! stop them all gracefully.
//!
//! The runtime is written once against [`Broker`]: [`connect`](fn@connect) is the one
//! place that names brokers, connecting to the configured one and handing
//! it to the broker-neutral code here and in the pipeline.
//!
//! | file | holds |
//! | --- | --- |
//! | [`runtime`](crate::runtime) | the running set of workers: start, serve, reload, rewind, stop |
//! | [`connect`](mod@connect) | the one dispatch over brokers: connecting to the configured one |
//! | [`reload`] | what a change of the handlers directory means: start, swap, restart, retire |
//! | [`supervise`](mod@supervise) | `weir run`: start, serve until stopped, reload on changes, stop |
//! | [`background`] | its periodic and one-off tasks: the lag log, dead-letter measurements, dead-letter topics |

mod background;
mod connect;
mod reload;
mod supervise;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::admin::{HandlerView, Status};
use crate::config::{Config, LimitsSection};
use crate::host::{CompiledHandler, Host};
use crate::metrics::Metrics;
use crate::pipeline::outbox::{Relay, RelayStats, relay_with_lease};
use crate::pipeline::{HandlerStats, HandlerSwap, Worker};
use crate::registry::{self, LoadError, LoadedHandler};
use crate::source::progress::Progress;
use crate::source::{Broker, BrokerKind, Publisher, Source};
use crate::store::Store;
use reload::Change;

pub use connect::{Connected, WithBroker, connect, subscription};
pub use supervise::supervise;

use background::{ensure_dead_letter_topics, log_lag, measure_dead_letters};

/// A handler being served, with its live counters.
pub struct RunningHandler {
    /// The loaded handler (its current version).
    pub handler: LoadedHandler,
    /// Its counters.
    pub stats: Arc<HandlerStats>,
    /// What identifies the files it was loaded from: the component's
    /// content hash and the manifest's.
    fingerprint: Fingerprint,
    swap: HandlerSwap<CompiledHandler>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Content hashes of a handler's component and manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    wasm: String,
    manifest: String,
}

fn fingerprint(wasm: &Path) -> std::io::Result<Fingerprint> {
    Ok(Fingerprint {
        wasm: registry::content_version(&std::fs::read(wasm)?),
        manifest: registry::content_version(&std::fs::read(wasm.with_extension("toml"))?),
    })
}

/// The running set of workers, consuming from broker `B`.
pub struct Runtime<B: Broker> {
    metrics: Metrics,
    status: Status,
    running: BTreeMap<String, RunningHandler>,
    broker: B,
    store: Store,
    concurrency: usize,
    fatal: mpsc::UnboundedSender<String>,
    fatal_rx: mpsc::UnboundedReceiver<String>,
    /// Fingerprints of files that failed to load, so each bad version is
    /// reported once.
    rejected: BTreeMap<PathBuf, Fingerprint>,
    relay: tokio::task::JoinHandle<()>,
    relay_stop: watch::Sender<bool>,
    relay_stats: Arc<RelayStats>,
    /// The lag log and the dead-letter measurements.
    background: Vec<tokio::task::JoinHandle<()>>,
}

/// The Wasm host for `config`: fuel metering when `[limits] fuel` is set,
/// and the compiled-component cache in `[runtime] data_dir/compiled`.
///
/// # Errors
///
/// When the engine cannot be created.
pub fn host_for(config: &crate::config::Config) -> anyhow::Result<Host> {
    Host::new(&crate::host::HostSettings {
        fuel: config.limits.fuel.is_some(),
        cache_dir: Some(config.runtime.data_dir.join("compiled")),
        ..crate::host::HostSettings::default()
    })
}

/// Loads every `<name>.wasm` in `dir`, compiling in parallel on
/// blocking threads.
/// Handlers that fail are returned separately; one bad file never stops the
/// others.
///
/// # Errors
///
/// When the directory itself cannot be read.
pub async fn load_handlers(
    host: &Host,
    dir: &Path,
    defaults: &LimitsSection,
    broker: BrokerKind,
) -> anyhow::Result<(Vec<LoadedHandler>, Vec<LoadError>)> {
    let files = registry::discover(dir).map_err(|err| {
        anyhow::anyhow!(
            "[runtime] handlers_dir {}: cannot read the directory: {err}",
            dir.display()
        )
    })?;
    let mut tasks = JoinSet::new();
    for file in files {
        let host = host.clone();
        let defaults = defaults.clone();
        tasks.spawn_blocking(move || registry::load(&host, &file, &defaults, broker));
    }
    let (mut loaded, mut failed) = (Vec::new(), Vec::new());
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            Ok(handler) => loaded.push(handler),
            Err(err) => failed.push(err),
        }
    }
    loaded.sort_by(|a, b| a.name.cmp(&b.name));
    failed.sort_by_key(LoadError::file);
    Ok((loaded, failed))
}

/// Calls of one handler running at once when neither the manifest nor the
/// runtime's `[limits]` says: four per CPU core. Part of a call's turn is
/// spent handing it to and from its blocking thread; with one call per core
/// the cores idle meanwhile (`cargo bench -p weir --bench pipeline`: 25k
/// msg/s with 2 calls on 2 cores, 44k with 8, no gain beyond).
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 4
}

impl<B: Broker> Runtime<B> {
    /// Starts one worker per handler against `broker`, recording outcomes
    /// in `store`, with at most `concurrency` calls of a handler at once
    /// unless its manifest says otherwise.
    ///
    /// # Errors
    ///
    /// When a consumer cannot be created.
    pub fn start(
        handlers: Vec<LoadedHandler>,
        broker: &B,
        store: &Store,
        config: &Config,
    ) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        store.record_to(metrics.clone());
        let relay_stats = Arc::new(RelayStats::recording(metrics.clone()));
        let (relay_stop, relay_watch) = watch::channel(false);
        // "Relay lease" (`store/postgres/mod.rs`): one process relays.
        let relay = {
            let (store, broker, stats) = (store.clone(), broker.clone(), relay_stats.clone());
            tokio::spawn(relay_with_lease(
                store.clone(),
                move || Relay::new(store.clone(), broker.publisher(), stats.clone()),
                relay_watch,
            ))
        };
        let (fatal, fatal_rx) = mpsc::unbounded_channel();
        let status = Status::default();
        let every = config.runtime.lag_log_interval;
        let mut background = Vec::new();
        if !every.is_zero() {
            background.push(tokio::spawn(log_lag(metrics.clone(), every)));
        }
        let every = config.runtime.dlq_scan_interval;
        if !every.is_zero() {
            background.push(tokio::spawn(measure_dead_letters(
                broker.clone(),
                status.clone(),
                metrics.clone(),
                every,
            )));
        }
        let mut runtime = Self {
            background,
            metrics,
            status,
            running: BTreeMap::new(),
            broker: broker.clone(),
            store: store.clone(),
            concurrency: config
                .limits
                .concurrency
                .unwrap_or_else(default_concurrency),
            fatal,
            fatal_rx,
            rejected: BTreeMap::new(),
            relay,
            relay_stop,
            relay_stats,
        };
        runtime.status.write().relay = Some(runtime.relay_stats.clone());
        for handler in handlers {
            runtime.serve(handler)?;
        }
        Ok(runtime)
    }

    /// A future that resolves when a worker had to stop on its own (the
    /// store stopped), with the reason: the process should exit with it.
    pub async fn failed(&mut self) -> String {
        self.fatal_rx
            .recv()
            .await
            .unwrap_or_else(|| "every worker stopped".into())
    }

    /// Starts a worker for `handler` with its own consumer.
    fn serve(&mut self, handler: LoadedHandler) -> anyhow::Result<()> {
        let fingerprint = fingerprint(&handler.wasm_path)?;
        let group = handler.group();
        tracing::info!(handler = %handler.name, version = %handler.compiled.version(),
            contract = handler.compiled.contract().version(), group = %group,
            topics = %handler.manifest.topics.join(","), broker = self.broker.kind().as_str(), "serving");
        let stats = Arc::new(HandlerStats::recording(
            self.metrics.handler(&handler.name, &group),
        ));
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(ensure_dead_letter_topics(
            self.broker.clone(),
            handler.name.clone(),
            handler.manifest.clone(),
            stats.clone(),
        ));
        let (stop, stopped) = watch::channel(false);
        let consumer = self.broker.consumer(subscription::<B>(
            &handler.name,
            &handler.manifest,
            &group,
            self.metrics.progress(&group),
        ))?;
        let publisher = self.broker.publisher();
        let (swap, task) = self.spawn(&handler, consumer, publisher, &stats, &alive, stopped);
        self.metrics
            .serving(&handler.name, &group, Some(handler.compiled.version()));
        self.status.write().handlers.insert(
            handler.name.clone(),
            HandlerView {
                name: handler.name.clone(),
                version: handler.compiled.version().to_string(),
                contract: handler.compiled.contract().version().to_string(),
                group: group.clone(),
                topics: handler.manifest.topics.clone(),
                dead_letter_topics: handler.manifest.dead_letter_topics(),
                stats: stats.clone(),
                alive,
                progress: self.metrics.progress(&group),
            },
        );
        self.running.insert(
            handler.name.clone(),
            RunningHandler {
                handler,
                stats,
                fingerprint,
                swap,
                stop,
                task,
            },
        );
        Ok(())
    }

    /// Runs a worker for `handler` on `source`, dead-lettering through
    /// `publisher`; a worker that stops on its own reports why.
    fn spawn<S: Source, D: Publisher>(
        &self,
        handler: &LoadedHandler,
        source: S,
        publisher: D,
        stats: &Arc<HandlerStats>,
        alive: &Arc<AtomicBool>,
        stopped: watch::Receiver<bool>,
    ) -> (HandlerSwap<CompiledHandler>, tokio::task::JoinHandle<()>) {
        let concurrency = handler
            .manifest
            .limits
            .concurrency
            .unwrap_or(self.concurrency);
        let worker = Worker::new(
            handler.name.clone(),
            handler.manifest.clone(),
            handler.compiled.clone().with_store(self.store.clone()),
            concurrency,
            source,
            self.store.clone(),
            publisher,
            stats.clone(),
            stopped,
        );
        let swap = worker.swapper();
        let fatal = self.fatal.clone();
        let alive = alive.clone();
        let task = tokio::spawn(async move {
            let result = worker.run().await;
            alive.store(false, AtomicOrdering::SeqCst);
            if let Err(why) = result {
                let _ = fatal.send(why);
            }
        });
        (swap, task)
    }

    /// The handlers being served, by name.
    pub fn handlers(&self) -> Vec<&RunningHandler> {
        self.running.values().collect()
    }

    /// The process's metrics.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// What the admin server shows, kept current.
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    /// Counters of the outbox relay.
    pub fn relay_stats(&self) -> Arc<RelayStats> {
        self.relay_stats.clone()
    }

    /// Brings the served handlers in line with the files in `dir`:
    ///
    /// - a new `<name>.wasm` (with its manifest) starts being served;
    /// - a changed component, or a manifest change confined to `[limits]`,
    ///   `[config]` and `[sandbox]` ([`reload::change`]), is swapped in: the consumer keeps its
    ///   group membership and position, running calls finish on the old
    ///   version, later calls use the new one;
    /// - any other manifest change restarts the handler's worker (it drains,
    ///   commits and leaves its group, then rejoins with the new settings);
    /// - a removed component drains, commits and leaves its group;
    /// - a file that fails to load or check is rejected with a log line
    ///   naming what is wrong, and the version already served (if any)
    ///   keeps serving.
    ///
    /// Compiling happens on blocking threads.
    ///
    /// # Errors
    ///
    /// When the directory cannot be read.
    pub async fn reload(
        &mut self,
        host: &Host,
        dir: &Path,
        defaults: &LimitsSection,
        drain: Duration,
    ) -> anyhow::Result<()> {
        let broker = self.broker.kind();
        let files = registry::discover(dir)?;
        let present: BTreeSet<String> = files
            .iter()
            .filter_map(|f| Some(f.file_stem()?.to_str()?.to_string()))
            .collect();
        // Removed handlers: drain and leave.
        for name in reload::retired(self.running.keys(), &present) {
            if let Some(running) = self.running.remove(&name) {
                tracing::info!(handler = %name, version = %running.swap.version(), "handler removed; draining");
                self.metrics.serving(&name, "", None);
                self.status.write().handlers.remove(&name);
                retire(running, drain).await;
                tracing::info!(handler = %name, "handler removed; left its group");
            }
        }
        for file in files {
            let Ok(current) = fingerprint(&file) else {
                // A manifest not written yet, or the file vanished: the
                // next change event comes back to it.
                continue;
            };
            let name = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            if self
                .running
                .get(&name)
                .is_some_and(|r| r.fingerprint == current)
                || self.rejected.get(&file) == Some(&current)
            {
                continue;
            }
            let started = std::time::Instant::now();
            let (load_host, load_file, load_defaults) =
                (host.clone(), file.clone(), defaults.clone());
            let loaded = tokio::task::spawn_blocking(move || {
                registry::load(&load_host, &load_file, &load_defaults, broker)
            })
            .await?;
            let handler = match loaded {
                Ok(handler) => handler,
                Err(err) => {
                    let serving = self.running.get(&name).map(|r| r.swap.version());
                    tracing::error!(handler = %name, file = %err.file().display(), error = %err,
                        still_serving = serving.as_deref().unwrap_or("nothing"),
                        "new version rejected");
                    self.metrics.reload(&name, false);
                    self.status
                        .write()
                        .rejected
                        .insert(file.display().to_string(), err.to_string());
                    self.rejected.insert(file, current);
                    continue;
                }
            };
            self.status
                .write()
                .rejected
                .remove(&file.display().to_string());
            self.rejected.remove(&file);
            if self.running.contains_key(&name) {
                self.metrics.reload(&name, true);
            }
            let compile_ms = started.elapsed().as_millis() as u64;
            let served = self.running.get(&name).map(|r| &r.handler.manifest);
            match (
                reload::change(served, &handler.manifest),
                self.running.get_mut(&name),
            ) {
                (Change::Swap, Some(running)) => {
                    let old = running.swap.version();
                    running
                        .swap
                        .swap(handler.compiled.clone().with_store(self.store.clone()));
                    tracing::info!(handler = %name, old_version = %old, version = %handler.compiled.version(),
                        compile_ms, "new version serving");
                    self.metrics
                        .serving(&name, &handler.group(), Some(handler.compiled.version()));
                    if let Some(view) = self.status.write().handlers.get_mut(&name) {
                        view.version = handler.compiled.version().to_string();
                        view.contract = handler.compiled.contract().version().to_string();
                    }
                    running.handler = handler;
                    running.fingerprint = current;
                }
                (Change::Restart, _) => {
                    if let Some(running) = self.running.remove(&name) {
                        tracing::info!(handler = %name, "manifest changed; restarting the handler's consumer");
                        retire(running, drain).await;
                    }
                    self.serve(handler)?;
                }
                (Change::Start | Change::Swap, _) => self.serve(handler)?,
            }
        }
        Ok(())
    }

    /// `weir rewind` done by a running weir (the admin API's
    /// `POST /handlers/{name}/rewind`): stops the handler's worker (it
    /// drains, commits and leaves its group), forgets its dedup marks and
    /// attempt counts (with `reset_state` also its state and pending outbox
    /// rows), moves its consumer back to `from`, and serves it again. What
    /// was done, one line each.
    ///
    /// The order and what a failure leaves are those of [`replay`](crate::tools::rewind);
    /// whatever happens, the handler is served again.
    ///
    /// # Errors
    ///
    /// When no such handler is served, the store cannot be written, or the
    /// broker refuses (another process consumes in the group).
    pub async fn rewind(
        &mut self,
        name: &str,
        from: crate::source::Rewind,
        reset_state: bool,
        drain: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let Some(running) = self.running.remove(name) else {
            anyhow::bail!("no handler {name:?} is served here");
        };
        let handler = running.handler.clone();
        let group = handler.group();
        let consumer = subscription::<B>(name, &handler.manifest, &group, Progress::default());
        tracing::info!(handler = %name, from = ?from, reset_state, "rewind: stopping the handler's consumer");
        self.status.write().handlers.remove(name);
        retire(running, drain).await;
        let footprint = self.store.footprint(name).await;
        let result = async {
            let footprint = footprint?;
            // Refused before anything is forgotten (see [`crate::tools::rewind`]).
            self.broker
                .rewind(&consumer, from, false)
                .await
                .map_err(|err| anyhow::anyhow!("{err:#}; nothing was forgotten"))?;
            let mut done = vec![format!(
                "forgot {} dedup mark(s) and {} attempt count(s)",
                footprint.marks, footprint.attempts
            )];
            if reset_state {
                done.push(format!(
                    "deleted {} state key(s) and {} emitted event(s) not yet published",
                    footprint.state_keys, footprint.outbox_rows
                ));
            }
            self.store
                .write(crate::store::Write::Forget {
                    handler: name.to_string(),
                    state: reset_state,
                })
                .await?;
            done.extend(self.broker.rewind(&consumer, from, true).await?);
            anyhow::Ok(done)
        }
        .await;
        // Served again whatever happened: a failed rewind leaves it
        // consuming where it was.
        self.serve(handler)?;
        match &result {
            Ok(done) => {
                tracing::info!(handler = %name, done = %done.join("; "), "rewind done; serving again")
            }
            Err(err) => {
                tracing::error!(handler = %name, error = %format!("{err:#}"), "rewind failed; serving again")
            }
        }
        result
    }

    /// Stops consuming, lets in-flight calls finish, commits acknowledged
    /// offsets and leaves the consumer groups, then publishes what the
    /// outbox still holds. Work still going on after `timeout` is abandoned;
    /// unacknowledged messages are redelivered and unpublished events
    /// published on the next start.
    pub async fn stop(mut self, timeout: Duration) {
        for task in &self.background {
            task.abort();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        for running in self.running.values() {
            let _ = running.stop.send(true);
        }
        for (name, running) in std::mem::take(&mut self.running) {
            let mut task = running.task;
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::error!(handler = %name, error = %err, "a worker ended abnormally")
                }
                Err(_) => {
                    tracing::warn!(handler = %name, timeout = %humantime::format_duration(timeout),
                        "worker did not stop in time; its unacknowledged messages will be redelivered");
                    task.abort();
                }
            }
        }
        // The workers' last outcomes may have added outbox rows: stop the
        // relay only now, after its final pass.
        let _ = self.relay_stop.send(true);
        if tokio::time::timeout_at(deadline, &mut self.relay)
            .await
            .is_err()
        {
            tracing::warn!(
                "the outbox relay did not finish in time; remaining events are published on the next start"
            );
            self.relay.abort();
        }
    }
}

/// Stops one worker: it finishes running calls, commits and leaves its
/// group; after `drain` it is abandoned (its unacknowledged messages are
/// redelivered).
async fn retire(running: RunningHandler, drain: Duration) {
    let _ = running.stop.send(true);
    let mut task = running.task;
    if tokio::time::timeout(drain, &mut task).await.is_err() {
        tracing::warn!(handler = %running.handler.name, "worker did not drain in time; abandoned");
        task.abort();
    }
}

/// Opens the runtime's store: the embedded database under
/// `[runtime] data_dir`, or PostgreSQL when `[store] url` is set.
///
/// # Errors
///
/// When the database cannot be opened or reached (naming the key).
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    match config.store.postgres() {
        Some(settings) => Store::connect(&settings)
            .await
            .map_err(|err| anyhow::Error::new(err).context("[store] url")),
        None => {
            let path = config.runtime.data_dir.join("weir.redb");
            Store::open(&path).map_err(|err| anyhow::anyhow!("[runtime] data_dir: {err}"))
        }
    }
}

/// How long `weir run` waits for a database another process holds.
const STORE_BUSY_WAIT: Duration = Duration::from_secs(10);
/// Longest pause between attempts to reach PostgreSQL at start.
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// Opens the store for `weir run`: like [`open_store`], but
/// - while another process holds the embedded database — a short command
///   such as `weir state` or `weir dlq`, or a weir that is still stopping —
///   it tries again for up to ten seconds before giving up with the same
///   error;
/// - while PostgreSQL cannot be reached (not: refuses), it keeps trying,
///   with a growing pause, and says so: a service waits for its database.
///
/// # Errors
///
/// When the database cannot be opened, or is still held after the wait.
pub async fn open_store_waiting(config: &Config) -> anyhow::Result<Store> {
    let deadline = tokio::time::Instant::now() + STORE_BUSY_WAIT;
    let mut said = false;
    let mut pause = Duration::from_millis(100);
    loop {
        match open_store(config).await {
            Err(err)
                if format!("{err:#}").contains("already open")
                    && tokio::time::Instant::now() < deadline =>
            {
                if !said {
                    tracing::warn!(error = %format!("{err:#}"),
                        "the database is held by another process; waiting up to 10 s for it");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err)
                if matches!(
                    err.downcast_ref::<crate::store::StoreError>(),
                    Some(crate::store::StoreError::Unreachable { .. })
                ) =>
            {
                tracing::warn!(error = %format!("{err:#}"), retry_in = ?pause,
                    "PostgreSQL cannot be reached; waiting for it");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(STORE_RETRY_MAX);
            }
            result => return result,
        }
    }
}
