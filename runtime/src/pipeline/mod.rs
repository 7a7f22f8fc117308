//! What happens to each message between the broker and the handler:
//! decode → dedup → per-key ordering → invoke (sandboxed) → retry or
//! dead-letter → record the outcome → settle with the source.
//!
//! One [`Worker`] serves one handler from its own consumer. Messages are
//! spread over *lanes* (one per key, per scope or per message, following the
//! handler's `ordering`); a lane runs one message at a time in delivery
//! order, different lanes run in parallel, and at most `max_in_flight`
//! messages are held at once (then the worker stops receiving: each source
//! bounds what it fetched ahead, nothing is thrown away). At most
//! `concurrency` calls of one handler run at once, so one busy handler
//! never takes every instance from another. A key waiting for its retry
//! holds only its own lane.
//!
//! The pipeline knows messages, outcomes and handlers; no broker.
//!
//! | file | holds |
//! | --- | --- |
//! | [`worker`] | receiving, lanes, runs, settling with the source |
//! | `deliver` | one message from dedup to a final outcome (a state machine) |
//! | `invoke` | instances, hot swap, the per-handler call limit |
//! | [`decode`] | a message's id and key, as the manifest says |
//! | [`retry`] | backoff, and which failures are retried |
//! | [`breaker`] | the circuit breaker |
//! | [`dlq`] | what a dead letter carries |
//! | [`outbox`] | publishing emitted events after their commit |
//! | [`correlation`] | correlation ids and trace context on emitted events |
//! | [`synthetic`] | a source, publisher and handler in memory, for tests and benches |
//!
//! The invariant every path below keeps:
//!
//! > A message is settled `Done` or `DeadLettered` with its source only
//! > after its outcome is durable in the store — handled (with the
//! > handler's state writes and emitted events, in the same transaction as
//! > the dedup mark), dead-lettered (the broker acknowledged the dead
//! > letter), or found to be a duplicate. Attempt counts are durable before
//! > a retry is scheduled. The effects of a failed call are never committed.
//! > A message is settled `Released` (redelivered) at shutdown, when its
//! > delivery is no longer this consumer's, or when the store has stopped
//! > for good; while the store merely fails, its lane holds it and retries
//! > the write, so later messages of its key never run ahead of it.

pub mod breaker;
pub mod correlation;
pub mod decode;
mod deliver;
pub mod dlq;
mod invoke;
pub mod outbox;
pub mod retry;
pub mod synthetic;
#[cfg(test)]
mod tests;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use crate::host::{CompiledHandler, Event, Failure, HandlerInstance, Outcome};
use crate::lock::Unpoisoned;
use crate::metrics::HandlerMetrics;

pub use invoke::HandlerSwap;
pub use worker::Worker;

/// Creates handler instances; implemented by compiled Wasm handlers and, in
/// tests, by native ones.
pub trait HandlerFactory: Send + Sync + 'static {
    /// One instance, reused for many calls until it fails.
    type Instance: HandlerCall + Send + 'static;
    /// A fresh instance.
    ///
    /// # Errors
    ///
    /// A retryable failure if instantiation traps or hits a limit.
    fn instantiate(&self) -> impl Future<Output = Result<Self::Instance, Failure>> + Send;
    /// The version being served, for logs.
    fn version(&self) -> &str;
}

/// One call of `handle`: a future run on the async runtime, which must not
/// hold a runtime thread for long (a Wasm guest yields at every epoch tick).
pub trait HandlerCall {
    /// Handles one event.
    fn handle(&mut self, event: &Event) -> impl Future<Output = Outcome> + Send;
}

impl HandlerFactory for CompiledHandler {
    type Instance = HandlerInstance;
    fn instantiate(&self) -> impl Future<Output = Result<HandlerInstance, Failure>> + Send {
        CompiledHandler::instantiate(self)
    }
    fn version(&self) -> &str {
        CompiledHandler::version(self)
    }
}

impl HandlerCall for HandlerInstance {
    fn handle(&mut self, event: &Event) -> impl Future<Output = Outcome> + Send {
        HandlerInstance::handle(self, event)
    }
}

/// Counters for one handler, readable while it runs, and its Prometheus
/// metrics when it has a recorder (see [`metrics`](crate::metrics)).
#[derive(Debug, Default)]
pub struct HandlerStats {
    /// Messages whose handler returned `ok`.
    pub handled: AtomicU64,
    /// Messages dead-lettered (permanent error or attempts exhausted).
    pub dead_lettered: AtomicU64,
    /// Messages skipped because their event id was already done.
    pub duplicates: AtomicU64,
    /// Calls run again because state they read changed before their commit.
    pub conflicts: AtomicU64,
    /// Failed attempts that were retried.
    pub retries: AtomicU64,
    /// Time spent inside `handle`, in microseconds, over all attempts.
    pub busy_micros: AtomicU64,
    /// Calls to `handle`.
    pub calls: AtomicU64,
    /// Messages held now (running, waiting for a retry, queued).
    pub in_flight: AtomicU64,
    /// Instances running a call now.
    pub instances_busy: AtomicU64,
    /// Instances kept idle for the next calls.
    pub instances_idle: AtomicU64,
    /// See [`HandlerStats::dead_letters_blocked`].
    dead_letters_blocked: std::sync::Mutex<Option<String>>,
    /// See [`HandlerStats::breaker_state`].
    breaker: std::sync::Mutex<Option<&'static str>>,
    /// The last failed attempt (see [`HandlerStats::last_error`]).
    last_error: std::sync::Mutex<Option<serde_json::Value>>,
    /// Where the same events go as metrics.
    recorder: Option<HandlerMetrics>,
}

impl HandlerStats {
    /// Counters that also record `metrics`.
    pub fn recording(metrics: HandlerMetrics) -> Self {
        Self {
            recorder: Some(metrics),
            ..Self::default()
        }
    }

    /// Messages with a final outcome (handled, dead-lettered or duplicate).
    pub fn finished(&self) -> u64 {
        self.handled.load(AtomicOrdering::Relaxed)
            + self.dead_lettered.load(AtomicOrdering::Relaxed)
            + self.duplicates.load(AtomicOrdering::Relaxed)
    }

    pub(crate) fn handled(&self, topic: &str) {
        self.handled.fetch_add(1, AtomicOrdering::Relaxed);
        self.consumed(topic, "handled");
    }

    pub(crate) fn duplicate(&self, topic: &str) {
        self.duplicates.fetch_add(1, AtomicOrdering::Relaxed);
        self.consumed(topic, "duplicate");
    }

    pub(crate) fn retried(&self, topic: &str) {
        self.retries.fetch_add(1, AtomicOrdering::Relaxed);
        self.consumed(topic, "retried");
    }

    pub(crate) fn failed(&self, event: &Event, failure: &Failure) {
        self.consumed(&event.topic, "failed");
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = serde_json::json!({
            "error": failure.message,
            "kind": failure.kind.as_str(),
            "category": failure.category,
            "event_id": event.id,
            "topic": event.topic,
            "attempt": event.attempt,
            "at_ms": at_ms,
        });
        *self.last_error.locked() = Some(last);
    }

    /// The last failed attempt, if any: `{"error", "kind", "category",
    /// "event_id", "topic", "attempt", "at_ms"}`.
    pub fn last_error(&self) -> Option<serde_json::Value> {
        self.last_error.locked().clone()
    }

    pub(crate) fn dead_lettered(&self, topic: &str, error_type: &str, dlq: &str, partition: i32) {
        self.dead_lettered.fetch_add(1, AtomicOrdering::Relaxed);
        self.consumed(topic, "dead_lettered");
        if let Some(recorder) = &self.recorder {
            recorder.dead_letter(topic, error_type);
            recorder.produced(dlq, partition);
        }
    }

    pub(crate) fn conflict(&self) {
        self.conflicts.fetch_add(1, AtomicOrdering::Relaxed);
        if let Some(recorder) = &self.recorder {
            recorder.conflict();
        }
    }

    pub(crate) fn call(&self, topic: &str, took: std::time::Duration) {
        self.calls.fetch_add(1, AtomicOrdering::Relaxed);
        self.busy_micros
            .fetch_add(took.as_micros() as u64, AtomicOrdering::Relaxed);
        if let Some(recorder) = &self.recorder {
            recorder.call(topic, took.as_secs_f64());
        }
    }

    pub(crate) fn held(&self, held: usize) {
        self.in_flight.store(held as u64, AtomicOrdering::Relaxed);
        if let Some(recorder) = &self.recorder {
            recorder.in_flight(held);
        }
    }

    /// Why the handler's dead letters cannot be written now (its
    /// dead-letter topic is missing, or the broker refuses them); `None`
    /// while they can.
    pub fn dead_letters_blocked(&self) -> Option<String> {
        self.dead_letters_blocked.locked().clone()
    }

    /// Dead letters cannot be written because of `problem`, or (`None`)
    /// they can again.
    pub fn dead_letter_problem(&self, problem: Option<String>) {
        *self.dead_letters_blocked.locked() = problem;
    }

    /// The state of the handler's circuit breaker (`closed`, `open`,
    /// `half_open`); `None` without one.
    pub fn breaker_state(&self) -> Option<&'static str> {
        *self.breaker.locked()
    }

    pub(crate) fn breaker(&self, state: &'static str) {
        *self.breaker.locked() = Some(state);
        if let Some(recorder) = &self.recorder {
            recorder.breaker(state);
        }
    }

    pub(crate) fn instances(&self, busy: usize, idle: usize) {
        self.instances_busy
            .store(busy as u64, AtomicOrdering::Relaxed);
        self.instances_idle
            .store(idle as u64, AtomicOrdering::Relaxed);
        if let Some(recorder) = &self.recorder {
            recorder.instances(busy, idle);
        }
    }

    fn consumed(&self, topic: &str, status: &'static str) {
        if let Some(recorder) = &self.recorder {
            recorder.consumed(topic, status);
        }
    }
}
