//! What happens to each message between the broker and the handler:
//! decode → dedup → per-key ordering → invoke (sandboxed) → retry or
//! dead-letter → record the outcome → acknowledge.
//!
//! One [`Worker`] serves one handler from its own consumer group. Messages
//! are spread over *lanes* (one per key, per partition or per message,
//! following the handler's `ordering`); a lane runs one message at a time in
//! offset order, different lanes run in parallel, and at most
//! `max_in_flight` messages are held at once. A key waiting for its retry
//! holds only its own lane.
//!
//! The invariant every path below keeps:
//!
//! > A message's offset is acknowledged to the source only after its outcome
//! > is durable in the store — handled (with the handler's state writes and
//! > emitted events, in the same transaction as the dedup mark),
//! > dead-lettered (the broker acknowledged the dead letter), or found to be
//! > a duplicate — and only as part of a contiguous watermark (see
//! > [`offsets`]). Attempt counts are durable before a retry is scheduled.
//! > The effects of a failed call are never committed. A message abandoned
//! > at shutdown or after its partition was revoked is never acknowledged
//! > and is redelivered.

pub mod decode;
pub mod dlq;
pub mod offsets;
pub mod outbox;
pub mod publish;
pub mod retry;
pub mod synthetic;
#[cfg(test)]
mod tests;

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::host::{CompiledHandler, Event, Failure, FailureKind, HandlerInstance, Outcome};
use crate::registry::{Manifest, Ordering};
use crate::source::{Message, Source};
use crate::store::{Applied, Effects, Store, Write};
use offsets::Ledger;
use publish::Publisher;
use retry::Next;

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
    fn instantiate(&self) -> Result<Self::Instance, Failure>;
    /// The version being served, for logs.
    fn version(&self) -> &str;
}

/// One call of `handle`. Blocks: runs on a blocking thread.
pub trait HandlerCall {
    /// Handles one event.
    fn handle(&mut self, event: &Event) -> Outcome;
}

impl HandlerFactory for CompiledHandler {
    type Instance = HandlerInstance;
    fn instantiate(&self) -> Result<HandlerInstance, Failure> {
        CompiledHandler::instantiate(self)
    }
    fn version(&self) -> &str {
        CompiledHandler::version(self)
    }
}

impl HandlerCall for HandlerInstance {
    fn handle(&mut self, event: &Event) -> Outcome {
        HandlerInstance::handle(self, event)
    }
}

/// Counters for one handler, readable while it runs.
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
}

impl HandlerStats {
    /// Messages with a final outcome (handled, dead-lettered or duplicate).
    pub fn finished(&self) -> u64 {
        self.handled.load(AtomicOrdering::Relaxed)
            + self.dead_lettered.load(AtomicOrdering::Relaxed)
            + self.duplicates.load(AtomicOrdering::Relaxed)
    }
}

/// Messages that must run one after another share a lane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Lane {
    Key(String, i32, u64),
    Partition(String, i32),
    Message(String, i32, i64),
}

fn lane_of(ordering: Ordering, message: &Message) -> Lane {
    let (topic, partition) = (message.topic.clone(), message.partition);
    match (ordering, &message.key) {
        (Ordering::Key, Some(key)) => {
            let mut hasher = DefaultHasher::new();
            key.hash(&mut hasher);
            Lane::Key(topic, partition, hasher.finish())
        }
        (Ordering::Key, None) | (Ordering::Partition, _) => Lane::Partition(topic, partition),
        (Ordering::None, _) => Lane::Message(topic, partition, message.offset),
    }
}

/// How a message's processing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Durable outcome: acknowledge.
    Finished,
    /// Shutdown, revocation or a store failure came first: leave it for
    /// redelivery.
    Abandoned,
}

struct Done {
    lane: Lane,
    topic: String,
    partition: i32,
    offset: i64,
    generation: u64,
    ending: Ending,
}

/// Everything a message task needs, shared by all tasks of one worker.
struct Shared<F: HandlerFactory, D: Publisher> {
    name: String,
    manifest: Manifest,
    /// The version being served and its idle instances.
    served: Arc<Mutex<Served<F>>>,
    store: Store,
    dead_letters: D,
    ledger: Arc<Ledger>,
    stats: Arc<HandlerStats>,
    shutdown: watch::Receiver<bool>,
}

/// The version of a handler being served, with its idle instances.
struct Served<F: HandlerFactory> {
    factory: Arc<F>,
    pool: Vec<F::Instance>,
    /// Bumped on every swap, so instances of older versions are not pooled.
    generation: u64,
}

/// Replaces the version a running [`Worker`] serves, without touching its
/// consumer: calls already running finish on the old version, every call
/// that starts afterwards uses the new one, and no message is skipped or
/// handled twice because of the swap.
pub struct HandlerSwap<F: HandlerFactory> {
    served: Arc<Mutex<Served<F>>>,
}

impl<F: HandlerFactory> HandlerSwap<F> {
    /// Serves `factory` from now on.
    pub fn swap(&self, factory: F) {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        served.factory = Arc::new(factory);
        served.pool.clear();
        served.generation += 1;
    }

    /// The version being served.
    pub fn version(&self) -> String {
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        served.factory.version().to_string()
    }
}

impl<F: HandlerFactory, D: Publisher> Shared<F, D> {
    fn version(&self) -> String {
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        served.factory.version().to_string()
    }
}

/// Serves one handler.
pub struct Worker<S: Source, F: HandlerFactory, D: Publisher> {
    source: S,
    shared: Arc<Shared<F, D>>,
}

impl<S: Source, F: HandlerFactory, D: Publisher> Worker<S, F, D> {
    /// A worker for handler `name`: consuming from `source` (which reports
    /// partition ownership to `ledger`), calling instances of `factory`,
    /// recording outcomes in `store`, dead-lettering to `dead_letters`, and
    /// stopping when `shutdown` turns true.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        manifest: Manifest,
        factory: F,
        source: S,
        ledger: Arc<Ledger>,
        store: Store,
        dead_letters: D,
        stats: Arc<HandlerStats>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            source,
            shared: Arc::new(Shared {
                name,
                manifest,
                served: Arc::new(Mutex::new(Served {
                    factory: Arc::new(factory),
                    pool: Vec::new(),
                    generation: 0,
                })),
                store,
                dead_letters,
                ledger,
                stats,
                shutdown,
            }),
        }
    }

    /// A handle for replacing the served version while the worker runs.
    pub fn swapper(&self) -> HandlerSwap<F> {
        HandlerSwap {
            served: self.shared.served.clone(),
        }
    }

    /// Consumes until shutdown. Then lets running calls finish (those
    /// waiting for a retry are abandoned), acknowledges what finished,
    /// commits and leaves the group.
    pub async fn run(self) {
        let shared = self.shared.clone();
        let source = self.source;
        let max_in_flight = shared.manifest.max_in_flight;
        // Resume paused partitions once a quarter of the room is free: each
        // pause drops librdkafka's prefetched messages, so resuming too eagerly
        // refetches over and over.
        let low_water = max_in_flight - max_in_flight.div_ceil(4);
        // Lanes with a message running; each holds the messages queued
        // behind it.
        let mut lanes: HashMap<Lane, VecDeque<(Message, u64)>> = HashMap::new();
        let mut held = 0usize;
        let mut paused: HashSet<(String, i32)> = HashSet::new();
        let mut tasks: JoinSet<Done> = JoinSet::new();
        let mut shutdown = shared.shutdown.clone();

        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    held -= 1;
                    let Some(done) = joined_done(joined) else { continue };
                    finish(&source, &shared.ledger, &done);
                    if let Some(queue) = lanes.get_mut(&done.lane) {
                        match queue.pop_front() {
                            Some((next, generation)) => {
                                tasks.spawn(process(shared.clone(), done.lane.clone(), next, generation));
                            }
                            None => {
                                lanes.remove(&done.lane);
                            }
                        }
                    }
                    if held <= low_water && !paused.is_empty() {
                        for (topic, partition) in paused.drain() {
                            source.resume(&topic, partition);
                        }
                    }
                }
                received = source.recv() => {
                    let message = match received {
                        Ok(message) => message,
                        Err(err) => {
                            tracing::warn!(handler = %shared.name, error = %err, "consumer error; librdkafka keeps retrying");
                            continue;
                        }
                    };
                    let Some(generation) = shared.ledger.track(&message.topic, message.partition, message.offset) else {
                        tracing::debug!(handler = %shared.name, topic = %message.topic, partition = message.partition,
                            offset = message.offset, "message of a partition no longer owned; dropped");
                        continue;
                    };
                    held += 1;
                    if held >= max_in_flight && paused.insert((message.topic.clone(), message.partition)) {
                        source.pause(&message.topic, message.partition);
                    }
                    let lane = lane_of(shared.manifest.ordering, &message);
                    match lanes.get_mut(&lane) {
                        Some(queue) => queue.push_back((message, generation)),
                        None => {
                            lanes.insert(lane.clone(), VecDeque::new());
                            tasks.spawn(process(shared.clone(), lane, message, generation));
                        }
                    }
                }
            }
        }

        // Shutdown: queued messages are left for redelivery; running ones
        // finish (or abandon a pending retry) and are acknowledged if done.
        while let Some(joined) = tasks.join_next().await {
            if let Some(done) = joined_done(joined) {
                finish(&source, &shared.ledger, &done);
            }
        }
        source.close();
        tracing::info!(handler = %shared.name, "stopped");
    }
}

fn joined_done(joined: Result<Done, tokio::task::JoinError>) -> Option<Done> {
    match joined {
        Ok(done) => Some(done),
        Err(err) => {
            // A panic in the pipeline is a bug; the message stays
            // unacknowledged (the watermark cannot pass it) and is
            // redelivered after a restart.
            tracing::error!(error = %err, "message task failed");
            None
        }
    }
}

/// Acknowledges a finished message if the watermark advanced.
fn finish<S: Source>(source: &S, ledger: &Ledger, done: &Done) {
    if done.ending != Ending::Finished {
        return;
    }
    if let Some(next) = ledger.complete(&done.topic, done.partition, done.generation, done.offset) {
        source.ack(&done.topic, done.partition, next);
    }
}

/// One message from dedup to durable outcome.
async fn process<F: HandlerFactory, D: Publisher>(
    shared: Arc<Shared<F, D>>,
    lane: Lane,
    message: Message,
    generation: u64,
) -> Done {
    let (topic, partition, offset) = (message.topic.clone(), message.partition, message.offset);
    let ending = deliver(&shared, message, generation).await;
    Done {
        lane,
        topic,
        partition,
        offset,
        generation,
        ending,
    }
}

async fn deliver<F: HandlerFactory, D: Publisher>(
    shared: &Arc<Shared<F, D>>,
    message: Message,
    generation: u64,
) -> Ending {
    let manifest = &shared.manifest;
    let name = shared.name.as_str();
    // A message queued behind its key may outlive its partition's
    // ownership: leave it to the new owner rather than handle it twice.
    if !shared
        .ledger
        .owns(&message.topic, message.partition, generation)
    {
        return Ending::Abandoned;
    }
    let dedup = manifest.dedup.enabled;
    let id = decode::event_id(&message, &manifest.dedup.id);
    let seen = match shared.store.seen(name, &id) {
        Ok(seen) => seen,
        Err(err) => {
            tracing::error!(handler = name, error = %err, "cannot read the store; message left for redelivery");
            return Ending::Abandoned;
        }
    };
    if dedup && seen.done {
        shared
            .stats
            .duplicates
            .fetch_add(1, AtomicOrdering::Relaxed);
        tracing::debug!(handler = name, topic = %message.topic, partition = message.partition,
            offset = message.offset, event_id = %id, "duplicate; skipped");
        return Ending::Finished;
    }
    let mut event = Arc::new(decode::to_event(message, id, seen.attempts + 1));
    // Runs of this attempt rejected because state they read had changed.
    let mut conflicts = 0u64;
    loop {
        if event.attempt > manifest.retry.max_attempts {
            // The attempts were used up before a restart.
            let failure = Failure {
                kind: FailureKind::Retryable,
                message: format!(
                    "all {} attempts failed before a restart",
                    manifest.retry.max_attempts
                ),
                poisoned: false,
            };
            return dead_letter(shared, &event, &failure, generation).await;
        }
        let failure = match invoke(shared, event.clone()).await {
            Outcome::Handled(effects) => match commit(shared, &event, effects).await {
                Committed::Yes => {
                    shared.stats.handled.fetch_add(1, AtomicOrdering::Relaxed);
                    return Ending::Finished;
                }
                Committed::Duplicate => {
                    // Another delivery of this event committed first; its
                    // effects stand, this one's are dropped.
                    shared
                        .stats
                        .duplicates
                        .fetch_add(1, AtomicOrdering::Relaxed);
                    tracing::debug!(handler = name, event_id = %event.id, "duplicate found at commit; its effects were dropped");
                    return Ending::Finished;
                }
                Committed::Conflict => {
                    conflicts += 1;
                    shared.stats.conflicts.fetch_add(1, AtomicOrdering::Relaxed);
                    if conflicts < MAX_CONFLICTS {
                        // Run again at once on the new state; back off a
                        // little when it keeps colliding.
                        if conflicts > 2 {
                            let delay = Duration::from_millis(fastrand::u64(1..=conflicts.min(50)));
                            if !pause(shared.shutdown.clone(), delay).await {
                                return Ending::Abandoned;
                            }
                        }
                        continue;
                    }
                    conflicts = 0;
                    Failure {
                        kind: FailureKind::Retryable,
                        message: format!(
                            "state conflict: {MAX_CONFLICTS} runs in a row read state that another event changed before they could commit"
                        ),
                        poisoned: false,
                    }
                }
                Committed::No => return Ending::Abandoned,
            },
            Outcome::Failed(failure) => failure,
        };
        let requested = match failure.kind {
            FailureKind::RetryAfter(delay) => Some(delay),
            _ => None,
        };
        let next = match failure.kind {
            FailureKind::Permanent => Next::GiveUp,
            _ => manifest
                .retry
                .next(event.attempt, requested, fastrand::f64()),
        };
        let Next::RetryIn(delay) = next else {
            return dead_letter(shared, &event, &failure, generation).await;
        };
        shared.stats.retries.fetch_add(1, AtomicOrdering::Relaxed);
        // The attempt count is durable before the retry is scheduled, so a
        // crash during the backoff does not reset it.
        let attempted = Write::Attempted {
            handler: name.to_string(),
            id: event.id.clone(),
            attempts: event.attempt,
        };
        if let Err(err) = shared.store.write(attempted).await {
            tracing::error!(handler = name, error = %err, "cannot record the attempt; message left for redelivery");
            return Ending::Abandoned;
        }
        tracing::warn!(handler = name, version = %shared.version(), topic = %event.topic,
            partition = event.partition, offset = event.offset, event_id = %event.id, attempt = event.attempt,
            kind = failure.kind.as_str(), error = %failure.message, retry_in_ms = delay.as_millis() as u64,
            "attempt failed; will retry");

        if !pause(shared.shutdown.clone(), delay).await
            || !shared
                .ledger
                .owns(&event.topic, event.partition, generation)
        {
            return Ending::Abandoned;
        }
        // The blocking call has returned, so this is the only reference
        // and no copy is made.
        Arc::make_mut(&mut event).attempt += 1;
    }
}

/// Most runs of one attempt rejected for conflicts before the attempt
/// counts as failed.
const MAX_CONFLICTS: u64 = 100;

/// What became of committing a handled event.
enum Committed {
    /// Durable with its effects.
    Yes,
    /// The event was already done; nothing applied.
    Duplicate,
    /// State it read changed meanwhile; nothing applied, run it again.
    Conflict,
    /// The store failed; leave the message for redelivery.
    No,
}

/// Commits a handled event: its dedup mark, cleared attempts, state writes
/// and emitted events, in one transaction. Without deduplication and
/// without effects there is nothing to record unless attempts were
/// persisted.
async fn commit<F: HandlerFactory, D: Publisher>(
    shared: &Shared<F, D>,
    event: &Event,
    mut effects: Effects,
) -> Committed {
    let dedup = shared.manifest.dedup.enabled;
    if !dedup && event.attempt == 1 && effects.is_empty() {
        return Committed::Yes;
    }
    outbox::stamp(&shared.name, &event.id, &mut effects.emits);
    let write = Write::Finished {
        handler: shared.name.clone(),
        id: event.id.clone(),
        ttl: shared.manifest.dedup.ttl,
        dedup,
        effects: (!effects.is_empty()).then(|| Box::new(effects)),
    };
    match shared.store.write(write).await {
        Ok(Applied::Done) => Committed::Yes,
        Ok(Applied::Duplicate) => Committed::Duplicate,
        Ok(Applied::Conflict) => Committed::Conflict,
        Err(err) => {
            tracing::error!(handler = %shared.name, error = %err, "cannot record the outcome; message left for redelivery");
            Committed::No
        }
    }
}

/// Marks a dead-lettered event done (dedup mark, attempts cleared).
async fn record_dead_letter<F: HandlerFactory, D: Publisher>(
    shared: &Shared<F, D>,
    event: &Event,
) -> Ending {
    match commit(shared, event, Effects::default()).await {
        // A duplicate here means another delivery finished first: done.
        Committed::Yes | Committed::Duplicate => Ending::Finished,
        Committed::Conflict | Committed::No => Ending::Abandoned,
    }
}

/// Calls the handler on a blocking thread with a pooled instance (or a new
/// one), returning the instance to the pool unless the call poisoned it.
async fn invoke<F: HandlerFactory, D: Publisher>(
    shared: &Arc<Shared<F, D>>,
    event: Arc<Event>,
) -> Outcome {
    let task = shared.clone();
    let started = Instant::now();
    let joined = tokio::task::spawn_blocking(move || {
        let (factory, pooled, generation) = {
            let mut served = task.served.lock().unwrap_or_else(|p| p.into_inner());
            (served.factory.clone(), served.pool.pop(), served.generation)
        };
        let mut instance = match pooled {
            Some(instance) => instance,
            None => match factory.instantiate() {
                Ok(instance) => instance,
                Err(failure) => return Outcome::Failed(failure),
            },
        };
        let outcome = instance.handle(&event);
        let poisoned = matches!(&outcome, Outcome::Failed(f) if f.poisoned);
        let mut served = task.served.lock().unwrap_or_else(|p| p.into_inner());
        // An instance of a replaced version finishes its call and is
        // dropped; the next call uses the new version.
        if !poisoned && served.generation == generation {
            served.pool.push(instance);
        }
        outcome
    })
    .await;
    let latency_us = started.elapsed().as_micros() as u64;
    shared.stats.calls.fetch_add(1, AtomicOrdering::Relaxed);
    shared
        .stats
        .busy_micros
        .fetch_add(latency_us, AtomicOrdering::Relaxed);
    tracing::debug!(handler = %shared.name, latency_us, "handle returned");
    joined.unwrap_or_else(|err| {
        Outcome::Failed(Failure {
            kind: FailureKind::Retryable,
            message: format!("handler invocation aborted: {err}"),
            poisoned: true,
        })
    })
}

/// Produces the dead letter, waits for the broker's acknowledgement
/// (retrying the produce until it succeeds, shutdown, or revocation), then
/// records the outcome.
async fn dead_letter<F: HandlerFactory, D: Publisher>(
    shared: &Arc<Shared<F, D>>,
    event: &Event,
    failure: &Failure,
    generation: u64,
) -> Ending {
    let name = shared.name.as_str();
    let topic = format!("{}{}", event.topic, shared.manifest.dlq.suffix);
    let headers = dlq::headers(
        name,
        event,
        failure,
        event.attempt.min(shared.manifest.retry.max_attempts),
    );
    let mut backoff = Duration::from_millis(200);
    loop {
        // Never produce on behalf of a partition no longer owned.
        if !shared
            .ledger
            .owns(&event.topic, event.partition, generation)
        {
            return Ending::Abandoned;
        }
        match shared
            .dead_letters
            .send(&topic, event.key.as_deref(), &event.payload, &headers)
            .await
        {
            Ok(()) => {
                shared
                    .stats
                    .dead_lettered
                    .fetch_add(1, AtomicOrdering::Relaxed);
                tracing::warn!(handler = name, topic = %event.topic, partition = event.partition,
                    offset = event.offset, event_id = %event.id, attempts = event.attempt,
                    kind = failure.kind.as_str(), error = %failure.message, dlq = %topic, "dead-lettered");
                return record_dead_letter(shared, event).await;
            }
            Err(err) => {
                tracing::error!(handler = name, dlq = %topic, error = %err, retry_in_ms = backoff.as_millis() as u64,
                    "cannot write dead letter; the message stays unacknowledged until it can");
                if !pause(shared.shutdown.clone(), backoff).await {
                    return Ending::Abandoned;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Waits `delay` unless shutdown comes first. Returns `false` on shutdown.
async fn pause(mut shutdown: watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => false,
        _ = tokio::time::sleep(delay) => true,
    }
}
