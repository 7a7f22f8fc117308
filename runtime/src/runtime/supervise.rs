//! `weir run`: loading the handlers, connecting to the broker, opening the
//! store, serving until a stop signal, reloading on every change of the
//! handlers directory, and stopping cleanly.

use std::time::Duration;

use anyhow::Context as _;

use super::{Connected, Runtime, WithBroker, connect, load_handlers};
use crate::config::Config;
use crate::host::Host;
use crate::registry::{self, LoadError, LoadedHandler};
use crate::source::Broker;

/// Runs `config` until SIGTERM or Ctrl-C (then returns `Ok`), or until a
/// worker had to stop on its own (then returns why).
///
/// # Errors
///
/// When the handlers directory, the broker or the store cannot be used, or
/// a worker stopped on its own.
pub async fn supervise(config: &Config) -> anyhow::Result<()> {
    // From here on SIGTERM and Ctrl-C stop weir cleanly (exit 0), during
    // start-up too: compiling a large component can take many seconds.
    let mut stopping = stop_signals()?;
    let started = tokio::select! {
        _ = stopping.wait_for(|stop| *stop) => {
            tracing::info!("stopped during start-up");
            return Ok(());
        }
        started = prepare(config) => started?,
    };
    let (loaded, connected) = started;
    connected
        .run(Supervisor {
            config,
            loaded,
            stopping,
        })
        .await
}

/// The handlers that loaded, and the files that did not.
struct Loaded {
    host: Host,
    handlers: Vec<LoadedHandler>,
    failed: Vec<LoadError>,
}

/// Loads the handlers and connects to the broker.
async fn prepare(config: &Config) -> anyhow::Result<(Loaded, Connected)> {
    crate::fault::init().map_err(anyhow::Error::msg)?;
    let host = super::host_for(config)?;
    let dir = &config.runtime.handlers_dir;
    let loading = std::time::Instant::now();
    let (handlers, failed) =
        load_handlers(&host, dir, &config.limits, config.broker_kind()).await?;
    tracing::info!(
        handlers = handlers.len(),
        failed = failed.len(),
        elapsed_ms = loading.elapsed().as_millis() as u64,
        "handlers loaded"
    );
    for err in &failed {
        tracing::error!(file = %err.file().display(), error = %err, "handler failed to load");
    }
    if handlers.is_empty() {
        // Deploying is copying files: wait for them (not ready meanwhile).
        tracing::warn!(dir = %dir.display(), failed = failed.len(),
            "no handler to serve yet; waiting for <name>.wasm and <name>.toml to appear there");
    }
    let mut topics: Vec<String> = Vec::new();
    for handler in &handlers {
        topics.extend(handler.manifest.topics.iter().cloned());
        topics.extend(handler.manifest.dead_letter_topics());
    }
    topics.sort();
    topics.dedup();
    let connected = connect(config, &topics).await?;
    if let Some(bootstrap) = connected.embedded_bootstrap() {
        tracing::info!(bootstrap = %bootstrap, "embedded broker listening");
        println!("embedded broker: {bootstrap}");
    }
    Ok((
        Loaded {
            host,
            handlers,
            failed,
        },
        connected,
    ))
}

/// `weir run` on the connected broker.
struct Supervisor<'a> {
    config: &'a Config,
    loaded: Loaded,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl WithBroker for Supervisor<'_> {
    type Output = ();

    async fn run<B: Broker>(self, broker: B) -> anyhow::Result<()> {
        let Supervisor {
            config,
            loaded,
            mut stopping,
        } = self;
        let started = tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => {
                tracing::info!("stopped during start-up");
                return Ok(());
            }
            started = start(config, loaded, &broker) => started?,
        };
        serve(config, started, stopping).await
    }
}

/// What `weir run` has once it started.
struct Started<B: Broker> {
    host: Host,
    runtime: Runtime<B>,
    /// Kept until the end, as the runtime's store is.
    _store: crate::store::Store,
    admin_stop: tokio::sync::watch::Sender<bool>,
    requests: tokio::sync::mpsc::Receiver<crate::admin::Command>,
    /// Watches the handlers directory while it lives.
    _watcher: notify_debouncer_mini::Debouncer<notify::RecommendedWatcher>,
    changes: tokio::sync::mpsc::Receiver<()>,
}

async fn start<B: Broker>(
    config: &Config,
    loaded: Loaded,
    broker: &B,
) -> anyhow::Result<Started<B>> {
    let Loaded {
        host,
        handlers,
        failed,
    } = loaded;
    let dir = &config.runtime.handlers_dir;
    let store = super::open_store_waiting(config).await?;
    tracing::info!(store = %store.describe(), shared = store.shared(), "store open");
    let mut runtime = Runtime::start(handlers, broker, &store, config)?;
    if !failed.is_empty() {
        // Records the files that failed as rejected, so that readiness
        // names them from the start.
        runtime
            .reload(&host, dir, &config.limits, config.runtime.shutdown_timeout)
            .await?;
    }
    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    let (commands, requests) = tokio::sync::mpsc::channel(4);
    if config.admin.enabled {
        crate::admin::serve(
            config.admin.listen,
            crate::admin::access(&config.admin, &config.runtime.data_dir)?,
            runtime.metrics(),
            runtime.status(),
            store.clone(),
            Some(commands),
            admin_stopped,
        )
        .await;
    }
    // Hot reload: new, changed and removed files in the handlers directory.
    let (watcher, changes) = registry::watch::watch(dir)
        .with_context(|| format!("[runtime] handlers_dir {}: cannot watch it", dir.display()))?;
    tracing::info!(dir = %dir.display(), "watching for new, changed and removed handlers");
    Ok(Started {
        host,
        runtime,
        _store: store,
        admin_stop,
        requests,
        _watcher: watcher,
        changes,
    })
}

async fn serve<B: Broker>(
    config: &Config,
    started: Started<B>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Started {
        host,
        mut runtime,
        _store,
        admin_stop,
        mut requests,
        _watcher,
        mut changes,
    } = started;
    let dir = &config.runtime.handlers_dir;
    // A periodic rescan catches anything the file-system events missed.
    let mut rescan = tokio::time::interval(Duration::from_secs(30));
    rescan.tick().await;
    let mut failure = None;
    loop {
        tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => break,
            why = runtime.failed() => {
                failure = Some(why);
                break;
            }
            Some(()) = changes.recv() => {}
            _ = rescan.tick() => {}
            Some(command) = requests.recv() => {
                match command {
                    crate::admin::Command::Rewind { handler, from, reset_state, reply } => {
                        let done = runtime
                            .rewind(&handler, from, reset_state, config.runtime.shutdown_timeout)
                            .await
                            .map_err(|err| format!("{err:#}"));
                        let _ = reply.send(done);
                    }
                }
                continue;
            }
        }
        if let Err(err) = runtime
            .reload(&host, dir, &config.limits, config.runtime.shutdown_timeout)
            .await
        {
            tracing::error!(error = %err, "reloading handlers failed; the running ones keep serving");
        }
    }
    tracing::info!("stopping: finishing in-flight messages and committing offsets");
    runtime.stop(config.runtime.shutdown_timeout).await;
    let _ = admin_stop.send(true);
    tracing::info!("stopped");
    match failure {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// Listens for SIGTERM and SIGINT (Ctrl-C) from now on: the receiver turns
/// `true` at the first. The handlers are installed before this returns, so a
/// signal arriving at any later moment stops weir cleanly.
fn stop_signals() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        let _ = stop.send(true);
    });
    Ok(stopping)
}
