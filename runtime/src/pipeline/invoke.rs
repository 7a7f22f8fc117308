//! Calling a handler: the version being served, its idle instances, and the
//! per-handler limit on calls running at once.
//!
//! Invariants:
//!
//! - **One handler cannot starve another.** At most `concurrency` calls of a
//!   handler run at once (a semaphore), and it keeps at most that many idle
//!   instances, so its share of the process-wide instance pool is bounded.
//!   Waiting for a permit is backpressure, never a failed attempt.
//! - **A full instance pool is waited out, not failed.** If the Wasm
//!   engine has no free instance slot (other handlers hold them all), the
//!   call waits and tries again; the message's attempt count is untouched.
//! - **A swap never mixes versions within a call**, and instances of a
//!   replaced version are dropped, not pooled.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::{HandlerCall, HandlerFactory, HandlerStats};
use crate::host::{Event, Failure, FailureKind, Outcome};
use crate::lock::Unpoisoned;

/// The version of a handler being served, with its idle instances.
struct Served<F: HandlerFactory> {
    factory: Arc<F>,
    idle: Vec<F::Instance>,
    /// Instances running a call now, of any version.
    busy: usize,
    /// Bumped on every swap, so instances of older versions are not pooled.
    generation: u64,
}

/// The handler side of a worker: who to call and how many at once.
pub(super) struct Invoker<F: HandlerFactory> {
    name: String,
    served: Arc<Mutex<Served<F>>>,
    permits: Arc<Semaphore>,
    concurrency: usize,
}

/// Replaces the version a running [`Worker`](super::Worker) serves, without
/// touching its consumer: calls already running finish on the old version,
/// every call that starts afterwards uses the new one, and no message is
/// skipped or handled twice because of the swap.
pub struct HandlerSwap<F: HandlerFactory> {
    served: Arc<Mutex<Served<F>>>,
}

impl<F: HandlerFactory> HandlerSwap<F> {
    /// Serves `factory` from now on.
    pub fn swap(&self, factory: F) {
        let mut served = self.served.locked();
        served.factory = Arc::new(factory);
        served.idle.clear();
        served.generation += 1;
    }

    /// The version being served.
    pub fn version(&self) -> String {
        self.served.locked().factory.version().to_string()
    }
}

/// What the engine says when every instance slot of the pooling allocator
/// is taken.
const POOL_EXHAUSTED: &str = "maximum concurrent";

fn pool_exhausted(failure: &Failure) -> bool {
    failure.message.contains(POOL_EXHAUSTED)
}

impl<F: HandlerFactory> Invoker<F> {
    pub(super) fn new(name: String, factory: F, concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            name,
            served: Arc::new(Mutex::new(Served {
                factory: Arc::new(factory),
                idle: Vec::new(),
                busy: 0,
                generation: 0,
            })),
            permits: Arc::new(Semaphore::new(concurrency)),
            concurrency,
        }
    }

    pub(super) fn swapper(&self) -> HandlerSwap<F> {
        HandlerSwap {
            served: self.served.clone(),
        }
    }

    /// The version being served.
    pub(super) fn version(&self) -> String {
        self.served.locked().factory.version().to_string()
    }

    /// Calls the handler with an idle instance (or a new one), once a call
    /// permit is free, on this task (see "Calls" in [`host`](crate::host)); returns
    /// the instance to the idle set unless the call poisoned it.
    pub(super) async fn call(&self, event: Arc<Event>, stats: &HandlerStats) -> Outcome {
        let mut waited = Duration::from_millis(5);
        loop {
            // Never closed: the semaphore lives as long as the invoker.
            let Ok(_permit) = self.permits.acquire().await else {
                return Outcome::Failed(Failure {
                    kind: FailureKind::Retryable,
                    message: "handler stopped".into(),
                    poisoned: false,
                    category: None,
                });
            };
            let started = Instant::now();
            let (factory, idle, generation) = {
                let mut served = self.served.locked();
                (served.factory.clone(), served.idle.pop(), served.generation)
            };
            let mut instance = match idle {
                Some(instance) => instance,
                None => match factory.instantiate().await {
                    Ok(instance) => instance,
                    Err(failure) if pool_exhausted(&failure) => {
                        // Backpressure from the engine, not the message's fault.
                        tracing::debug!(handler = %self.name, retry_in_ms = waited.as_millis() as u64,
                            "no free instance slot; waiting");
                        drop(_permit);
                        tokio::time::sleep(waited).await;
                        waited = (waited * 2).min(Duration::from_millis(500));
                        continue;
                    }
                    Err(failure) => {
                        self.record(stats, &event.topic, started);
                        return Outcome::Failed(failure);
                    }
                },
            };
            {
                let mut served = self.served.locked();
                served.busy += 1;
                stats.instances(served.busy, served.idle.len());
            }
            let outcome = instance.handle(&event).await;
            let poisoned = matches!(&outcome, Outcome::Failed(f) if f.poisoned);
            {
                let mut served = self.served.locked();
                served.busy = served.busy.saturating_sub(1);
                // An instance of a replaced version finishes its call and
                // is dropped; the next call uses the new version.
                if !poisoned
                    && served.generation == generation
                    && served.idle.len() < self.concurrency
                {
                    served.idle.push(instance);
                }
                stats.instances(served.busy, served.idle.len());
            }
            self.record(stats, &event.topic, started);
            return outcome;
        }
    }

    fn record(&self, stats: &HandlerStats, topic: &str, started: Instant) {
        let took = started.elapsed();
        stats.call(topic, took);
        tracing::trace!(handler = %self.name, latency_us = took.as_micros() as u64, "handle returned");
    }
}
