//! Compiled handlers and their instances.
//!
//! A [`CompiledHandler`] is one version of a handler, linked and ready to
//! instantiate (`InstancePre`); a [`HandlerInstance`] is one live instance
//! with its own store, reused across calls until it traps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use super::EPOCH_TICK;
use super::bindings::{
    EmitError, Event, Handler, HandlerError, HandlerPre, Level, StateError, weir,
};
use super::output::GuestOutput;
use super::transaction::{EmitFailure, StateFailure, Transaction};
use crate::registry::Limits;
use crate::store::{Effects, Store as StateStore};

/// Longest log message or field value a guest can write; longer ones are cut.
const MAX_LOG_TEXT: usize = 8 * 1024;

/// Per-instance host state.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    handler: Arc<str>,
    /// The version (content hash), for tagging log records.
    version: Arc<str>,
    /// The event being handled, for tagging log records.
    current: Option<(String, i32, i64)>,
    /// Where state is read from.
    store: Option<StateStore>,
    /// The effects of the call in progress.
    txn: Option<Transaction>,
    /// The manifest's `[config]`.
    config: Arc<BTreeMap<String, String>>,
}

impl StoreState {
    /// The transaction of the call in progress. Outside a call (while the
    /// component starts) there is none; state is then read-only and
    /// nothing can be emitted, so a throwaway one serves.
    fn txn(&mut self) -> &mut Transaction {
        let (store, handler) = (self.store.clone(), self.handler.clone());
        self.txn
            .get_or_insert_with(|| Transaction::new(store, handler))
    }
}

impl From<StateFailure> for StateError {
    fn from(failure: StateFailure) -> Self {
        match failure {
            StateFailure::KeyTooLong(n) => StateError::KeyTooLong(n),
            StateFailure::ValueTooLarge(n) => StateError::ValueTooLarge(n),
            StateFailure::TooManyWrites(n) => StateError::TooManyWrites(n),
            StateFailure::TransactionTooLarge(n) => StateError::TransactionTooLarge(n),
            StateFailure::Unavailable(m) => StateError::Unavailable(m),
        }
    }
}

impl From<EmitFailure> for EmitError {
    fn from(failure: EmitFailure) -> Self {
        match failure {
            EmitFailure::InvalidTopic(m) => EmitError::InvalidTopic(m),
            EmitFailure::TooLarge(n) => EmitError::TooLarge(n),
            EmitFailure::TooMany(n) => EmitError::TooMany(n),
            EmitFailure::TransactionTooLarge(n) => EmitError::TransactionTooLarge(n),
        }
    }
}

impl weir::handler::state::Host for StoreState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.txn().get(&key)?)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), StateError> {
        Ok(self.txn().set(&key, value)?)
    }

    fn delete(&mut self, key: String) -> Result<(), StateError> {
        Ok(self.txn().delete(&key)?)
    }

    fn list_prefix(
        &mut self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        Ok(self
            .txn()
            .list_prefix(&prefix, start_after.as_deref(), limit)?)
    }
}

impl weir::handler::emit::Host for StoreState {
    fn send(
        &mut self,
        topic: String,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
    ) -> Result<(), EmitError> {
        Ok(self.txn().emit(topic, key, payload, headers)?)
    }
}

impl weir::handler::config::Host for StoreState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn get_all(&mut self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl weir::handler::types::Host for StoreState {}

impl weir::handler::log::Host for StoreState {
    fn log(&mut self, level: Level, message: String, fields: Vec<(String, String)>) {
        let message = clip(message);
        let fields = serde_json::Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (clip(k), serde_json::Value::String(clip(v))))
                .collect(),
        )
        .to_string();
        let handler = &*self.handler;
        let version = &*self.version;
        let (topic, partition, offset) = match &self.current {
            Some((t, p, o)) => (t.as_str(), *p, *o),
            None => ("", -1, -1),
        };
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(target: "weir::guest", $level, handler, version, topic, partition, offset, fields = %fields, "{message}")
            };
        }
        match level {
            Level::Trace => emit!(tracing::Level::TRACE),
            Level::Debug => emit!(tracing::Level::DEBUG),
            Level::Info => emit!(tracing::Level::INFO),
            Level::Warn => emit!(tracing::Level::WARN),
            Level::Error => emit!(tracing::Level::ERROR),
        }
    }
}

fn clip(mut text: String) -> String {
    if text.len() > MAX_LOG_TEXT {
        let mut end = MAX_LOG_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// One version of a handler, compiled, linked and checked against the world.
#[derive(Clone)]
pub struct CompiledHandler {
    engine: Engine,
    pre: HandlerPre<StoreState>,
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
        pre: HandlerPre<StoreState>,
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
    pub fn instantiate(&self) -> Result<HandlerInstance, Failure> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(self.limits.memory).unwrap_or(usize::MAX))
            .table_elements(self.limits.table_elements as usize)
            .instances(self.limits.instances as usize)
            .trap_on_grow_failure(true)
            .build();
        let stdout = GuestOutput::new(self.name.clone(), "stdout");
        let stderr = GuestOutput::new(self.name.clone(), "stderr");
        let mut wasi = WasiCtx::builder();
        wasi.allow_blocking_current_thread(true)
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
                })?;
        }
        let state = StoreState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits,
            handler: self.name.clone(),
            version: self.version.clone(),
            current: None,
            store: self.store.clone(),
            txn: None,
            config: self.config.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(self.limits.timeout));
        if self.metered {
            // Cannot fail: the engine meters fuel.
            let _ = store.set_fuel(self.limits.fuel.unwrap_or(u64::MAX));
        }
        let outputs = [stdout, stderr];
        let bindings = self.pre.instantiate(&mut store);
        outputs.iter().for_each(GuestOutput::end);
        let bindings = bindings.map_err(|err| {
            let failure = Failure::from_trap(&err, self.limits, "instantiating");
            log_trap(&self.name, &self.version, None, &failure, &err);
            failure
        })?;
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

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
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
    fn from_handler_error(err: HandlerError) -> Self {
        let (kind, message) = match err {
            HandlerError::Retryable(m) => (FailureKind::Retryable, m),
            HandlerError::RetryAfter(r) => (
                FailureKind::RetryAfter(Duration::from_millis(r.delay_ms)),
                r.reason,
            ),
            HandlerError::Permanent(m) => (FailureKind::Permanent, m),
        };
        Failure {
            kind,
            message,
            poisoned: false,
        }
    }

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
        }
    }
}

/// Logs a trap or limit with the handler's name and version and the guest's
/// backtrace (function names when the component keeps its name section).
fn log_trap(
    handler: &str,
    version: &str,
    at: Option<(&str, i32, i64)>,
    failure: &Failure,
    err: &wasmtime::Error,
) {
    let backtrace = err
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|bt| bt.to_string())
        .unwrap_or_default();
    let (topic, partition, offset) = at.unwrap_or(("", -1, -1));
    tracing::warn!(handler, version, topic, partition, offset, error = %failure.message,
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
    store: Store<StoreState>,
    bindings: Handler,
    limits: Limits,
    /// The guest's stdout and stderr.
    outputs: [GuestOutput; 2],
}

impl HandlerInstance {
    /// Calls `handle` once. Blocks the calling thread for as long as the
    /// guest runs (bounded by the handler's timeout): call it from a
    /// blocking thread.
    pub fn handle(&mut self, event: &Event) -> Outcome {
        let current = Some((event.topic.clone(), event.partition, event.offset));
        for output in &self.outputs {
            output.begin(current.clone());
        }
        let state = self.store.data_mut();
        state.current = current;
        state.txn = Some(Transaction::new(state.store.clone(), state.handler.clone()));
        self.store
            .set_epoch_deadline(deadline_ticks(self.limits.timeout));
        if self.metered {
            // Each call gets the full budget. Cannot fail: the engine meters.
            let _ = self.store.set_fuel(self.limits.fuel.unwrap_or(u64::MAX));
        }
        let started = Instant::now();
        let result = self.bindings.call_handle(&mut self.store, event);
        for output in &self.outputs {
            output.end();
        }
        let state = self.store.data_mut();
        state.current = None;
        // Effects of a failed call are dropped here, never committed.
        let txn = state.txn.take();
        tracing::trace!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "handle returned"
        );
        match result {
            Ok(Ok(())) => Outcome::Handled(txn.map(Transaction::finish).unwrap_or_default()),
            Ok(Err(err)) => Outcome::Failed(Failure::from_handler_error(err)),
            Err(err) => {
                let failure = Failure::from_trap(&err, self.limits, "handling the event");
                let at = (event.topic.as_str(), event.partition, event.offset);
                log_trap(&self.name, &self.version, Some(at), &failure, &err);
                Outcome::Failed(failure)
            }
        }
    }
}
