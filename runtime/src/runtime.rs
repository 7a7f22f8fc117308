//! Putting it together: load every handler in the directory, give each its
//! own consumer group and worker, and stop them all gracefully.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, LimitsSection};
use crate::host::Host;
use crate::pipeline::offsets::Ledger;
use crate::pipeline::outbox::{Relay, RelayStats};
use crate::pipeline::{HandlerStats, Worker};
use crate::registry::{self, LoadError, LoadedHandler};
use crate::source::kafka::{Cluster, KafkaConsumer, KafkaProducer};
use crate::store::Store;

/// A handler being served, with its live counters.
pub struct RunningHandler {
    /// The loaded handler.
    pub handler: LoadedHandler,
    /// Its counters.
    pub stats: Arc<HandlerStats>,
}

/// The running set of workers.
pub struct Runtime {
    running: Vec<RunningHandler>,
    workers: JoinSet<()>,
    shutdown: watch::Sender<bool>,
    relay: tokio::task::JoinHandle<()>,
    relay_stop: watch::Sender<bool>,
    relay_stats: Arc<RelayStats>,
}

/// Loads every `<name>.wasm` in `dir`, compiling on blocking threads.
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
        tasks.spawn_blocking(move || registry::load(&host, &file, &defaults));
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

impl Runtime {
    /// Starts one worker per handler against `cluster`, recording outcomes
    /// in `store`.
    ///
    /// # Errors
    ///
    /// When a consumer or the producer (for dead letters and emitted
    /// events) cannot be created.
    pub fn start(
        handlers: Vec<LoadedHandler>,
        cluster: &Cluster,
        store: &Store,
    ) -> anyhow::Result<Self> {
        let (shutdown, watcher) = watch::channel(false);
        let producer = KafkaProducer::new(cluster, "weir-producer")?;
        let relay_stats = Arc::new(RelayStats::default());
        let (relay_stop, relay_watch) = watch::channel(false);
        let relay = tokio::spawn(
            Relay::new(store.clone(), producer.clone(), relay_stats.clone()).run(relay_watch),
        );
        let mut workers = JoinSet::new();
        let mut running = Vec::new();
        for handler in handlers {
            let group = handler.group();
            let ledger = Arc::new(Ledger::default());
            let consumer = KafkaConsumer::new(
                cluster,
                &format!("weir-{}", handler.name),
                &group,
                &handler.manifest.topics,
                handler.manifest.start,
                ledger.clone(),
            )?;
            tracing::info!(handler = %handler.name, version = %handler.compiled.version(), group = %group,
                topics = %handler.manifest.topics.join(","), "serving");
            let stats = Arc::new(HandlerStats::default());
            let worker = Worker::new(
                handler.name.clone(),
                handler.manifest.clone(),
                handler.compiled.clone().with_store(store.clone()),
                consumer,
                ledger,
                store.clone(),
                producer.clone(),
                stats.clone(),
                watcher.clone(),
            );
            workers.spawn(worker.run());
            running.push(RunningHandler { handler, stats });
        }
        Ok(Self {
            running,
            workers,
            shutdown,
            relay,
            relay_stop,
            relay_stats,
        })
    }

    /// Counters of the outbox relay.
    pub fn relay_stats(&self) -> Arc<RelayStats> {
        self.relay_stats.clone()
    }

    /// The handlers being served.
    pub fn handlers(&self) -> &[RunningHandler] {
        &self.running
    }

    /// Stops consuming, lets in-flight calls finish, commits acknowledged
    /// offsets and leaves the consumer groups, then publishes what the
    /// outbox still holds. Work still going on after `timeout` is abandoned;
    /// unacknowledged messages are redelivered and unpublished events
    /// published on the next start.
    pub async fn stop(mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        // Receivers outlive this call only inside the workers.
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout_at(deadline, async {
            while let Some(joined) = self.workers.join_next().await {
                if let Err(err) = joined {
                    tracing::error!(error = %err, "a worker ended abnormally");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                timeout = %humantime::format_duration(timeout),
                "workers did not stop in time; their unacknowledged messages will be redelivered"
            );
            self.workers.abort_all();
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

/// Opens the runtime's database under `[runtime] data_dir`.
///
/// # Errors
///
/// When the database cannot be opened (naming the file and the key).
pub fn open_store(config: &Config) -> anyhow::Result<Store> {
    let path = config.runtime.data_dir.join("weir.redb");
    Store::open(&path).map_err(|err| anyhow::anyhow!("[runtime] data_dir: {err}"))
}

/// Resolves the configured cluster, starting the embedded broker if no
/// `[source.kafka]` is configured. The broker lives as long as the returned
/// guard.
///
/// # Errors
///
/// When the embedded broker cannot start or a topic cannot be created.
pub fn connect(
    config: &Config,
    topics: &[String],
) -> anyhow::Result<(Cluster, Option<crate::source::embedded::EmbeddedBroker>)> {
    match config.source() {
        crate::config::Source::Kafka(kafka) => {
            let cluster = Cluster {
                bootstrap_servers: kafka.bootstrap_servers,
                properties: kafka.properties,
            };
            cluster.validate()?;
            Ok((cluster, None))
        }
        crate::config::Source::Embedded(embedded) => {
            let broker = crate::source::embedded::EmbeddedBroker::start(embedded.partitions)?;
            for topic in topics {
                broker.create_topic(topic)?;
            }
            let cluster = Cluster {
                bootstrap_servers: broker.bootstrap_servers(),
                properties: Default::default(),
            };
            Ok((cluster, Some(broker)))
        }
    }
}
