//! The Wasm host: one wasmtime [`Engine`] for the process, the linker that
//! grants handlers exactly the `handler` world (plus WASI with nothing
//! preopened), compilation, and instances.
//!
//! The host knows nothing of any broker's client: it turns a component into
//! something that can be called with an [`Event`] and reports an
//! [`Outcome`]. It serves every released version of the `weir:handler`
//! contract ([`Contract`]) from one linker: `check` finds the version a
//! component was built for, and each call converts the event to that
//! version's shape.
//!
//! # Calls
//!
//! Instantiating and calling a handler are futures, run on the async
//! runtime like everything else: no thread hand-off per call. A guest
//! cannot hold a runtime thread: at every epoch tick ([`EPOCH_TICK`]) it
//! yields to other tasks, and the first tick past its timeout interrupts it
//! (a trap, reported as a `timeout` failure). A call that waits in the host
//! instead (a WASI sleep or poll, a read of a granted file, which runs on
//! the blocking pool) is raced against the same deadline on the runtime's
//! timer, so the timeout bounds the whole call. Weir's own host functions
//! (state reads, emits, logs) are synchronous and short: they read the
//! embedded store or buffer in memory.

/// Emits a tracing event at a constant `$level`, tagged with the event
/// being handled (`$at`: an `Option<&Origin>`): `topic`, `partition` and
/// `offset` for a Kafka record; `topic`, `$stream` (the field name for the
/// stream: `stream`, or another where a record already has a `stream`
/// field) and `sequence` for a JetStream message, `position` (as
/// displayed) for the other brokers; and `event_id`, plus
/// `correlation_id` and `traceparent` when the event has them. Outside a
/// call: `topic = ""`, `partition = -1`, `offset = -1`. The rest of the
/// arguments are the event's own fields and message.
macro_rules! tagged_event {
    (target: $target:expr, $level:expr, $at:expr, $stream:ident, $($rest:tt)+) => {
        match $at {
            Some(origin) => {
                let $crate::host::event::Origin {
                    topic, position, event_id, correlation_id, traceparent,
                } = &**origin;
                match position {
                    $crate::message::Position::Kafka { partition, offset } => {
                        tracing::event!(target: $target, $level,
                            topic = topic.as_str(), partition = *partition, offset = *offset,
                            event_id = event_id.as_str(), correlation_id = correlation_id.as_deref(),
                            traceparent = traceparent.as_deref(), $($rest)+)
                    }
                    $crate::message::Position::JetStream { stream, sequence, .. } => {
                        tracing::event!(target: $target, $level,
                            topic = topic.as_str(), $stream = stream.as_str(), sequence = *sequence,
                            event_id = event_id.as_str(), correlation_id = correlation_id.as_deref(),
                            traceparent = traceparent.as_deref(), $($rest)+)
                    }
                    other => {
                        tracing::event!(target: $target, $level,
                            topic = topic.as_str(), position = %other,
                            event_id = event_id.as_str(), correlation_id = correlation_id.as_deref(),
                            traceparent = traceparent.as_deref(), $($rest)+)
                    }
                }
            }
            None => tracing::event!(target: $target, $level,
                topic = "", partition = -1, offset = -1, $($rest)+),
        }
    };
}

mod bindings;
pub mod cache;
mod check;
mod event;
mod imports;
mod instance;
mod limits;
mod output;
pub mod transaction;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use bindings::{Contract, WORLD_PACKAGE};
pub use check::CheckError;
pub use event::Event;
pub use instance::{CompiledHandler, Failure, FailureKind, HandlerInstance, Outcome};

pub use limits::Limits;

/// How often the engine's epoch advances; the granularity of timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Process-wide Wasm host settings.
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// Upper bound for any handler's memory limit; sizes the pooling
    /// allocator's slots.
    pub max_memory: u64,
    /// Instances that may exist at once across all handlers.
    pub max_instances: u32,
    /// Meter fuel (needed for any handler's fuel limit; costs some speed).
    pub fuel: bool,
    /// Where compiled components are cached; `None`: compile every time.
    pub cache_dir: Option<std::path::PathBuf>,
}

impl Default for HostSettings {
    fn default() -> Self {
        Self {
            max_memory: 1 << 30,
            max_instances: 256,
            fuel: false,
            cache_dir: None,
        }
    }
}

/// The process's Wasm engine and linker.
///
/// Cloning is cheap; all clones share one engine and one epoch ticker, which
/// stops when the last clone is dropped.
#[derive(Clone)]
pub struct Host {
    engine: Engine,
    linker: Arc<Linker<instance::InstanceState>>,
    fuel: bool,
    cache: Option<cache::ModuleCache>,
    _ticker: Arc<EpochTicker>,
}

impl Host {
    /// Creates the engine (pooling allocator, epoch interruption) and the
    /// linker.
    ///
    /// # Errors
    ///
    /// When the engine cannot be created or the linker cannot be populated
    /// (a bug, not a user error).
    pub fn new(settings: &HostSettings) -> anyhow::Result<Self> {
        let engine = match Engine::new(&engine_config(settings, true)) {
            Ok(engine) => engine,
            Err(err) => {
                // The pooling allocator reserves address space up front; on
                // hosts that restrict virtual memory fall back to on-demand
                // allocation, which is slower to instantiate but works.
                tracing::warn!(error = %err, "pooling allocator unavailable; using on-demand allocation");
                Engine::new(&engine_config(settings, false))?
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Every released contract, side by side: their interfaces have
        // distinct versioned names, so each component links to its own.
        bindings::v0_1::Handler::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state| state,
        )?;
        bindings::v0_2::Handler::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state| state,
        )?;
        let ticker = EpochTicker::start(engine.clone());
        let cache = settings
            .cache_dir
            .clone()
            .map(|dir| cache::ModuleCache::new(dir, &engine));
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            fuel: settings.fuel,
            cache,
            _ticker: Arc::new(ticker),
        })
    }

    /// Whether fuel is metered (`[limits] fuel` is set in the runtime
    /// configuration).
    pub fn meters_fuel(&self) -> bool {
        self.fuel
    }

    /// Compiles `bytes` and checks them against the `handler` world of the
    /// contract version they were built for (see [`Contract`]).
    ///
    /// This is CPU-heavy (milliseconds to seconds): call it from a blocking
    /// thread, not an async task.
    ///
    /// # Errors
    ///
    /// [`CheckError`] saying in words what is wrong: not Wasm, a core module
    /// rather than a component, a compile error, an import this runtime does
    /// not provide (an unknown contract version among them), or a missing
    /// or mistyped `handle` export.
    pub fn compile(
        &self,
        name: &str,
        version: &str,
        bytes: &[u8],
        limits: Limits,
    ) -> Result<CompiledHandler, CheckError> {
        check::sniff(bytes)?;
        let cached = self
            .cache
            .as_ref()
            .and_then(|cache| cache.load(&self.engine, bytes));
        let component = match cached {
            Some(component) => component,
            None => {
                let component = Component::new(&self.engine, bytes)
                    .map_err(|err| CheckError::Compile(format!("{err:#}")))?;
                if let Some(cache) = &self.cache {
                    cache.store(bytes, &component);
                }
                component
            }
        };
        let pre = check::link(&self.linker, &component)?;
        Ok(CompiledHandler::new(
            self.engine.clone(),
            pre,
            name.into(),
            version.into(),
            limits,
            self.fuel,
        ))
    }
}

fn engine_config(settings: &HostSettings, pooling: bool) -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.consume_fuel(settings.fuel);
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        let instances = settings.max_instances;
        pool.total_component_instances(instances);
        // A Rust or Python component holds a handful of core instances
        // (the guest, the WASI adapter, shims); leave room for that.
        pool.total_core_instances(instances.saturating_mul(8));
        pool.total_memories(instances.saturating_mul(2));
        pool.total_tables(instances.saturating_mul(4));
        pool.total_stacks(instances);
        pool.max_memory_size(usize::try_from(settings.max_memory).unwrap_or(usize::MAX));
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// Advances the engine's epoch every [`EPOCH_TICK`] so that running guests
/// hit their deadlines.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            });
        if let Err(err) = spawned {
            tracing::error!(error = %err, "cannot start the epoch thread; handler timeouts will not fire");
        }
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(wat: &str) -> Result<CompiledHandler, CheckError> {
        let host = Host::new(&HostSettings::default()).expect("host");
        let bytes = wat::parse_str(wat).expect("valid WAT");
        let limits = Limits {
            memory: 16 << 20,
            timeout: Duration::from_secs(1),
            fuel: None,
            table_elements: 10_000,
            instances: 16,
        };
        host.compile("t", "v", &bytes, limits)
    }

    fn error(wat: &str) -> String {
        compile(wat).err().expect("must not fit").to_string()
    }

    #[test]
    fn missing_handle_export_lists_what_is_exported() {
        let err = error(
            r#"(component
                 (core module $m (func (export "f")))
                 (core instance $i (instantiate $m))
                 (func $run (canon lift (core func $i "f")))
                 (export "run" (func $run)))"#,
        );
        assert!(err.contains("does not export a function `handle`"), "{err}");
        assert!(err.contains("it exports: run"), "{err}");
    }

    #[test]
    fn wrongly_typed_handle_says_what_it_must_be() {
        let err = error(
            r#"(component
                 (core module $m (func (export "f") (param i32) (result i32) local.get 0))
                 (core instance $i (instantiate $m))
                 (func $handle (param "x" u32) (result u32) (canon lift (core func $i "f")))
                 (export "handle" (func $handle)))"#,
        );
        assert!(err.contains("`handle` export has the wrong type"), "{err}");
        assert!(err.contains("result<_, handler-error>"), "{err}");
    }

    #[test]
    fn unknown_import_is_named() {
        let err =
            error(r#"(component (import "acme:db/query@1.0.0" (instance (export "run" (func)))))"#);
        assert!(err.contains("acme:db/query@1.0.0"), "{err}");
        assert!(err.contains("may import only"), "{err}");
    }

    #[test]
    fn http_imports_are_refused_with_the_cause() {
        let err = error(r#"(component (import "wasi:http/types@0.2.10" (instance)))"#);
        assert!(err.contains("no HTTP access"), "{err}");
        assert!(err.contains("--disable http"), "{err}");
    }

    #[test]
    fn unknown_contract_versions_are_refused_naming_the_served_ones() {
        let err = error(r#"(component (import "weir:handler/log@0.3.0" (instance)))"#);
        assert!(err.contains("version 0.3.0"), "{err}");
        assert!(
            err.contains("weir:handler@0.1.0, weir:handler@0.2.0"),
            "{err}"
        );
    }

    #[test]
    fn two_contract_versions_in_one_component_are_refused() {
        let err = error(
            r#"(component
                 (import "weir:handler/log@0.1.0" (instance))
                 (import "weir:handler/config@0.2.0" (instance)))"#,
        );
        assert!(err.contains("two versions"), "{err}");
    }

    #[test]
    fn a_served_version_passes_the_version_check() {
        // An import of 0.1.0 or 0.2.0 is not refused for its version; this
        // one then fails on the missing export instead.
        for version in ["0.1.0", "0.2.0"] {
            let err = error(&format!(
                r#"(component (import "weir:handler/types@{version}" (instance)))"#
            ));
            assert!(!err.contains("serves"), "{version}: {err}");
            assert!(err.contains("does not export"), "{version}: {err}");
            assert!(
                err.contains(&format!("@{version}/handler")),
                "{version}: {err}"
            );
        }
    }
}
