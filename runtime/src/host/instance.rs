//! Compiled handlers and their instances.
//!
//! A [`CompiledHandler`] is one version of a handler, linked and ready to
//! instantiate (`InstancePre`); a [`HandlerInstance`] is one live instance
//! with its own store, reused across calls until it traps.
//!
//! Instantiation and calls are futures run on the async runtime (see
//! "Calls" in [`host`](crate::host)): a guest yields at every epoch tick, and the
//! tick that finds its timeout passed interrupts it (the same trap, and the
//! same `timeout` failure, as a deadline counted in ticks). A call waiting
//! in the host (a sleep, a poll, a file read) runs no guest code for a tick
//! to stop, so every call and instantiation is also raced against the same
//! deadline on the runtime's timer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use super::Limits;
use super::bindings::{Contract, v0_1, v0_2};
use super::check::WorldPre;
use super::event::{Event, Origin};
use super::output::GuestOutput;
use super::transaction::Transaction;
use crate::store::{Effects, Store as StateStore};

/// Per-instance host state.
pub struct InstanceState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub(super) handler: Arc<str>,
    /// The version (content hash), for tagging log records.
    pub(super) version: Arc<str>,
    /// Where the event being handled came from, for tagging log records.
    pub(super) current: Option<Arc<Origin>>,
    /// Where state is read from.
    store: Option<StateStore>,
    /// The effects of the call in progress.
    txn: Option<Transaction>,
    /// The manifest's `[config]`.
    pub(super) config: Arc<BTreeMap<String, String>>,
    /// When the running instantiation or call times out.
    deadline: Instant,
    /// Log records the call in progress wrote (bounded: see
    /// `imports::MAX_LOG_RECORDS`).
    pub(super) logged: u32,
}

impl InstanceState {
    /// The transaction of the call in progress. Outside a call (while the
    /// component starts) there is none; state is then read-only and
    /// nothing can be emitted, so a throwaway one serves.
    pub(super) fn txn(&mut self) -> &mut Transaction {
        let (store, handler) = (self.store.clone(), self.handler.clone());
        self.txn
            .get_or_insert_with(|| Transaction::new(store, handler))
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// One version of a handler, compiled, linked and checked against the world.
#[derive(Clone)]
pub struct CompiledHandler {
    engine: Engine,
    pre: WorldPre,
    name: Arc<str>,
    version: Arc<str>,
    limits: Limits,
    /// Whether the engine meters fuel.
    metered: bool,
    store: Option<StateStore>,
    config: Arc<BTreeMap<String, String>>,
    env: Arc<Vec<(String, String)>>,
    /// Read-only directories granted: (host path, guest path).
    dirs: Arc<Vec<(std::path::PathBuf, String)>>,
}

impl CompiledHandler {
    pub(super) fn new(
        engine: Engine,
        pre: WorldPre,
        name: Arc<str>,
        version: Arc<str>,
        limits: Limits,
        metered: bool,
    ) -> Self {
        Self {
            engine,
            pre,
            name,
            version,
            limits,
            metered,
            store: None,
            config: Arc::default(),
            env: Arc::default(),
            dirs: Arc::default(),
        }
    }

    /// Directories granted read-only by the manifest's `[sandbox] dirs`, as
    /// (host path, guest path).
    pub fn with_dirs(mut self, dirs: Vec<(std::path::PathBuf, String)>) -> Self {
        self.dirs = Arc::new(dirs);
        self
    }

    /// Environment variables granted by the manifest's `[sandbox] env`.
    pub fn with_env(mut self, env: &BTreeMap<String, String>) -> Self {
        self.env = Arc::new(env.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        self
    }

    /// Serves state reads from `store`. Without one (as in `weir check`)
    /// state calls fail as unavailable.
    pub fn with_store(mut self, store: StateStore) -> Self {
        self.store = Some(store);
        self
    }

    /// The values the `config` import returns.
    pub fn with_config(mut self, config: BTreeMap<String, String>) -> Self {
        self.config = Arc::new(config);
        self
    }

    /// The handler's name (its file stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version: a short content hash of the `.wasm` file.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The contract version the component was built for.
    pub fn contract(&self) -> Contract {
        self.pre.contract()
    }

    /// Names of the component's imports, for `weir check`.
    pub fn imports(&self) -> Vec<String> {
        let ty = self.pre.instance_pre().component().component_type();
        ty.imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Names of the component's exports, for `weir check`.
    pub fn exports(&self) -> Vec<String> {
        let ty = self.pre.instance_pre().component().component_type();
        ty.exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Creates a fresh instance with its own store: no preopened
    /// directories, no environment, no network, empty stdin; stdout and
    /// stderr go to the log, line by line.
    ///
    /// # Errors
    ///
    /// When the guest's start function traps or a limit is hit while
    /// instantiating.
    pub async fn instantiate(&self) -> Result<HandlerInstance, Failure> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(self.limits.memory).unwrap_or(usize::MAX))
            .table_elements(self.limits.table_elements as usize)
            .instances(self.limits.instances as usize)
            .trap_on_grow_failure(true)
            .build();
        let stdout = GuestOutput::new(self.name.clone(), "stdout");
        let stderr = GuestOutput::new(self.name.clone(), "stderr");
        let mut wasi = WasiCtx::builder();
        // File operations on granted directories run on the blocking pool,
        // never on a runtime thread, so that a read that blocks (a FIFO, a
        // stalled network file system) is still cut off by the timeout.
        wasi.allow_blocking_current_thread(false)
            .envs(&self.env)
            .stdout(stdout.clone())
            .stderr(stderr.clone());
        for (host_dir, guest_dir) in self.dirs.iter() {
            wasi.preopened_dir(host_dir, guest_dir, FsPerms::ReadOnly)
                .map_err(|err| Failure {
                    kind: FailureKind::Retryable,
                    message: format!(
                        "cannot open the granted directory {} (as {guest_dir}): {err}",
                        host_dir.display()
                    ),
                    poisoned: true,
                    category: None,
                })?;
        }
        let state = InstanceState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits,
            handler: self.name.clone(),
            version: self.version.clone(),
            current: None,
            store: self.store.clone(),
            txn: None,
            config: self.config.clone(),
            deadline: Instant::now() + self.limits.timeout,
            logged: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        // Every tick: interrupt a guest past its deadline (a timeout trap),
        // else let other tasks run and go on at the next tick.
        store.epoch_deadline_callback(|store| {
            if Instant::now() >= store.data().deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        store.set_epoch_deadline(1);
        if self.metered {
            // Cannot fail: the engine meters fuel.
            let _ = store.set_fuel(self.limits.fuel.unwrap_or(u64::MAX));
        }
        let outputs = [stdout, stderr];
        let deadline = tokio::time::Instant::from_std(store.data().deadline);
        let instantiate = async {
            match &self.pre {
                WorldPre::V0_1(pre) => pre.instantiate_async(&mut store).await.map(World::V0_1),
                WorldPre::V0_2(pre) => pre.instantiate_async(&mut store).await.map(World::V0_2),
            }
        };
        // As in `handle`: a start function waiting in the host times out too.
        let bindings = tokio::time::timeout_at(deadline, instantiate).await;
        outputs.iter().for_each(GuestOutput::end);
        let bindings = match bindings {
            Ok(Ok(bindings)) => bindings,
            Ok(Err(err)) => {
                let failure = Failure::from_trap(&err, self.limits, "instantiating");
                log_trap(&self.name, &self.version, None, &failure, &err);
                return Err(failure);
            }
            Err(_elapsed) => {
                let failure = Failure::host_timeout(self.limits, "instantiating");
                tracing::warn!(handler = %self.name, version = %self.version,
                    error = %failure.message, "handler timed out in a host call");
                return Err(failure);
            }
        };
        Ok(HandlerInstance {
            metered: self.metered,
            name: self.name.clone(),
            version: self.version.clone(),
            store,
            bindings,
            limits: self.limits,
            outputs,
        })
    }
}

/// What became of one call to `handle`.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `handle` returned `ok`; these are its state writes and emitted
    /// events, to be committed with the outcome.
    Handled(Effects),
    /// `handle` returned an error, trapped, or hit a limit.
    Failed(Failure),
}

/// Why a call failed, and whether retrying can help.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Retry classification.
    pub kind: FailureKind,
    /// What happened, for logs and dead-letter headers.
    pub message: String,
    /// The instance is unusable afterwards (a trap or a limit) and must be
    /// replaced.
    pub poisoned: bool,
    /// What kind of failure the handler said it met: the kebab-case name of
    /// its `error-category` (`service-unavailable`, `validation`, …), or
    /// for `other(name)` that name sanitized (lowercase ASCII letters,
    /// digits and single `-`, at most 64 characters). `None` when the
    /// handler named none, for components built against
    /// `weir:handler@0.1.0` (which has no categories), and for traps,
    /// timeouts and limits.
    pub category: Option<String>,
}

/// How a failure is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Retry with the handler's backoff policy.
    Retryable,
    /// Retry after this delay, as the handler asked.
    RetryAfter(Duration),
    /// Never retry: dead-letter now.
    Permanent,
}

impl FailureKind {
    /// The name used in logs and the `weir.error.kind` header.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retryable => "retryable",
            FailureKind::RetryAfter(_) => "retry-after",
            FailureKind::Permanent => "permanent",
        }
    }
}

impl Failure {
    /// Classifies an error raised by wasmtime while running the guest.
    /// Traps and limits are retryable: the next attempt may succeed on a
    /// fresh instance.
    fn from_trap(err: &wasmtime::Error, limits: Limits, during: &str) -> Self {
        let message = match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => format!(
                "timeout: {during} ran longer than the limit of {}",
                humantime::format_duration(limits.timeout)
            ),
            Some(Trap::StackOverflow) => format!("trap while {during}: stack overflow"),
            Some(Trap::OutOfFuel) => format!(
                "fuel limit: {during} used more than the limit of {} units",
                limits.fuel.unwrap_or(u64::MAX)
            ),
            _ if is_table_limit(err) => format!(
                "table limit: {during} tried to grow a table past the limit of {} elements",
                limits.table_elements
            ),
            _ if is_memory_limit(err) => format!(
                "memory limit: {during} tried to grow linear memory past the limit of {} MiB",
                limits.memory >> 20
            ),
            _ => {
                let cause = err.root_cause().to_string();
                // Rust and C guests keep their own stack in linear memory;
                // overflowing it usually shows up as an access out of bounds.
                let hint = if cause.contains("out of bounds memory access") {
                    " (often the guest's own stack, kept in linear memory, overflowing)"
                } else {
                    ""
                };
                format!("trap while {during}: {cause}{hint}")
            }
        };
        Failure {
            kind: FailureKind::Retryable,
            message,
            poisoned: true,
            category: None,
        }
    }
}

impl Failure {
    /// A call stopped at its deadline while it waited in the host, where
    /// the epoch interruption cannot reach it.
    fn host_timeout(limits: Limits, during: &str) -> Self {
        Failure {
            kind: FailureKind::Retryable,
            message: format!(
                "timeout: {during} ran longer than the limit of {} (waiting in a host call: a sleep, a poll or a file read)",
                humantime::format_duration(limits.timeout)
            ),
            poisoned: true,
            category: None,
        }
    }
}

/// Logs a trap or limit with the handler's name and version and the guest's
/// backtrace (function names when the component keeps its name section).
fn log_trap(
    handler: &str,
    version: &str,
    at: Option<&Arc<Origin>>,
    failure: &Failure,
    err: &wasmtime::Error,
) {
    let backtrace = err
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|bt| bt.to_string())
        .unwrap_or_default();
    tagged_event!(target: module_path!(), tracing::Level::WARN, at, stream,
        handler, version, error = %failure.message,
        backtrace = %backtrace.trim_end(), "handler trapped");
}

fn is_table_limit(err: &wasmtime::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .to_string()
            .contains("forcing trap when growing table")
    })
}

fn is_memory_limit(err: &wasmtime::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .to_string()
            .contains("forcing a memory growth failure")
            || cause
                .to_string()
                .contains("forcing trap when growing memory")
    })
}

/// A live instance of a handler. Not thread-safe; one per worker.
pub struct HandlerInstance {
    metered: bool,
    name: Arc<str>,
    version: Arc<str>,
    store: Store<InstanceState>,
    bindings: World,
    limits: Limits,
    /// The guest's stdout and stderr.
    outputs: [GuestOutput; 2],
}

impl HandlerInstance {
    /// Calls `handle` once. The guest yields to other tasks at every epoch
    /// tick ([`EPOCH_TICK`](super::EPOCH_TICK)) and is interrupted at the first tick past the
    /// handler's timeout.
    pub async fn handle(&mut self, event: &Event) -> Outcome {
        let origin = event.origin();
        for output in &self.outputs {
            output.begin(Some(origin.clone()));
        }
        let state = self.store.data_mut();
        state.current = Some(origin);
        state.txn = Some(Transaction::new(state.store.clone(), state.handler.clone()));
        state.deadline = Instant::now() + self.limits.timeout;
        state.logged = 0;
        self.store.set_epoch_deadline(1);
        if self.metered {
            // Each call gets the full budget. Cannot fail: the engine meters.
            let _ = self.store.set_fuel(self.limits.fuel.unwrap_or(u64::MAX));
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(self.store.data().deadline);
        // The event in the shape of the contract the component was built
        // for; its error back as a version-neutral failure.
        let call = async {
            match &self.bindings {
                World::V0_1(bindings) => bindings
                    .call_handle(
                        &mut self.store,
                        &v0_1::weir::handler::types::Event::from(event),
                    )
                    .await
                    .map(|r| r.map_err(Failure::from)),
                World::V0_2(bindings) => bindings
                    .call_handle(
                        &mut self.store,
                        &v0_2::weir::handler::types::Event::from(event),
                    )
                    .await
                    .map(|r| r.map_err(Failure::from)),
            }
        };
        // The epoch deadline stops guest code; this one stops a call that
        // waits in the host (a sleep, a poll, a blocked file read), where
        // no epoch tick reaches it. Dropping the call leaves the store
        // unusable, so the instance is poisoned either way.
        let result = tokio::time::timeout_at(deadline, call).await;
        for output in &self.outputs {
            output.end();
        }
        let state = self.store.data_mut();
        let origin = state.current.take();
        // Effects of a failed call are dropped here, never committed.
        let txn = state.txn.take();
        tracing::trace!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "handle returned"
        );
        match result {
            Ok(Ok(Ok(()))) => Outcome::Handled(txn.map(Transaction::finish).unwrap_or_default()),
            Ok(Ok(Err(failure))) => Outcome::Failed(failure),
            Ok(Err(err)) => {
                let failure = Failure::from_trap(&err, self.limits, "handling the event");
                log_trap(&self.name, &self.version, origin.as_ref(), &failure, &err);
                Outcome::Failed(failure)
            }
            Err(_elapsed) => {
                let failure = Failure::host_timeout(self.limits, "handling the event");
                tagged_event!(target: module_path!(), tracing::Level::WARN, origin.as_ref(), stream,
                    handler = %self.name, version = %self.version, error = %failure.message,
                    "handler timed out in a host call");
                Outcome::Failed(failure)
            }
        }
    }

    /// The contract version this instance's component was built for.
    pub fn contract(&self) -> Contract {
        match self.bindings {
            World::V0_1(_) => Contract::V0_1,
            World::V0_2(_) => Contract::V0_2,
        }
    }
}

/// An instance's exports, in the shape of its contract version.
enum World {
    V0_1(v0_1::Handler),
    V0_2(v0_2::Handler),
}
