//! The worker: receives messages, spreads them over lanes, runs one message
//! per lane at a time, and settles each with its source.
//!
//! Invariants (on top of the pipeline's, in [`pipeline`](crate::pipeline)):
//!
//! - **Bounded.** At most `max_in_flight` messages are held (running, waiting
//!   for a retry, queued behind their key). At the bound the worker stops
//!   calling `recv`; nothing is dropped or paused. It also stops while the
//!   handler's circuit breaker is open ([`breaker`](crate::pipeline::breaker)).
//! - **A lane moves on only when its run is settled.** The messages at the
//!   front of a lane form the run its task drives, one after another, in
//!   order (see "Runs" in [`deliver`](crate::pipeline::deliver)); the next run starts when every
//!   message of this one is settled (never earlier, whatever failed). A
//!   new lane starts with a run of one; later runs take what queued up
//!   meanwhile.
//! - **A panic frees nothing it should not.** A lane's task that panics
//!   (a bug) is found by its task id; the first message of its run is
//!   tried again alone after a delay (an outcome of the run committed
//!   before the panic is then found done), up to the handler's
//!   `max_attempts`, then released to the broker and its lane moves on,
//!   with an error in the log.
//! - **Settled once.** Every delivery received is settled exactly once:
//!   by its task's outcome, or `Released` at shutdown.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::{Id, JoinSet};

use super::breaker::{Breaker, BreakerState};
use super::deliver::{MAX_RUN, deliver_run, event_of};
use super::invoke::{HandlerSwap, Invoker};
use super::{HandlerFactory, HandlerStats, decode};
use crate::host::Event;
use crate::lock::Unpoisoned;
use crate::message::{Message, Position};
use crate::registry::{Manifest, Ordering};
use crate::source::{Publisher, Settled, Source};
use crate::store::Store;

/// Everything a message task needs, shared by all tasks of one worker.
pub(super) struct Shared<S: Source, F: HandlerFactory, D: Publisher> {
    pub(super) name: String,
    pub(super) manifest: Manifest,
    pub(super) source: S,
    pub(super) invoker: Invoker<F>,
    pub(super) store: Store,
    pub(super) dead_letters: D,
    pub(super) stats: Arc<HandlerStats>,
    /// The handler's circuit breaker, if its manifest asks for one.
    pub(super) breaker: Option<Breaker>,
    /// Turns true when the worker stops (shutdown, or a fatal error).
    pub(super) shutdown: watch::Receiver<bool>,
    fatal: Mutex<Option<String>>,
    fatal_raised: Notify,
}

impl<S: Source, F: HandlerFactory, D: Publisher> Shared<S, F, D> {
    /// Something broke that retrying cannot mend: the worker stops and
    /// reports `why`.
    pub(super) fn fail(&self, why: String) {
        let mut fatal = self.fatal.locked();
        if fatal.is_none() {
            tracing::error!(handler = %self.name, error = %why, "handler stopping");
            *fatal = Some(why);
        }
        self.fatal_raised.notify_one();
    }
}

/// Messages that must run one after another share a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    /// One key within one scope.
    Key(u64, u64),
    /// A whole scope (a Kafka partition assignment, a JetStream consumer).
    Scope(u64),
    /// One message alone.
    Message(u64),
}

fn lane_of(ordering: Ordering, message: &Message, seq: u64) -> Lane {
    match (ordering, &message.key) {
        (Ordering::Key, Some(key)) => {
            let mut hasher = DefaultHasher::new();
            key.hash(&mut hasher);
            Lane::Key(message.scope, hasher.finish())
        }
        (Ordering::Key, None) | (Ordering::Partition, _) => Lane::Scope(message.scope),
        (Ordering::None, _) => Lane::Message(seq),
    }
}

/// A message held by the worker, at the front of its lane (running) or
/// queued behind it.
struct Pending<D> {
    event: Arc<Event>,
    delivery: Arc<D>,
    /// When it was received, for `latency_ms`.
    received: std::time::Instant,
    /// Times its task panicked.
    panics: u32,
}

/// Serves one handler.
pub struct Worker<S: Source, F: HandlerFactory, D: Publisher> {
    shared: Arc<Shared<S, F, D>>,
    shutdown: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
}

impl<S: Source, F: HandlerFactory, D: Publisher> Worker<S, F, D> {
    /// A worker for handler `name`: consuming from `source`, calling
    /// instances of `factory` (at most `concurrency` at once), recording
    /// outcomes in `store`, dead-lettering to `dead_letters`, and stopping
    /// when `shutdown` turns true.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        manifest: Manifest,
        factory: F,
        concurrency: usize,
        source: S,
        store: Store,
        dead_letters: D,
        stats: Arc<HandlerStats>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let breaker = manifest
            .breaker
            .map(|settings| Breaker::new(&name, settings, Some(stats.clone())));
        Self {
            shared: Arc::new(Shared {
                invoker: Invoker::new(name.clone(), factory, concurrency),
                breaker,
                name,
                manifest,
                source,
                store,
                dead_letters,
                stats,
                shutdown: stopped,
                fatal: Mutex::new(None),
                fatal_raised: Notify::new(),
            }),
            shutdown,
            stop,
        }
    }

    /// A handle for replacing the served version while the worker runs.
    pub fn swapper(&self) -> HandlerSwap<F> {
        self.shared.invoker.swapper()
    }

    /// Consumes until shutdown. Then lets running calls finish (those
    /// waiting for a retry give up at once), settles what finished, releases
    /// the rest, and closes the source.
    ///
    /// # Errors
    ///
    /// When the worker had to stop on its own (the store stopped): the
    /// reason, for the process to exit with.
    pub async fn run(self) -> Result<(), String> {
        let Self {
            shared,
            mut shutdown,
            stop,
        } = self;
        let max_in_flight = shared.manifest.max_in_flight;
        let mut lanes: HashMap<Lane, VecDeque<Pending<S::Delivery>>> = HashMap::new();
        let mut running: HashMap<Id, Lane> = HashMap::new();
        let mut held = 0usize;
        let mut seq = 0u64;
        let mut tasks: JoinSet<Vec<Settled>> = JoinSet::new();
        // While the breaker is open nothing is received (see
        // `breaker.rs`).
        let mut breaker = shared.breaker.as_ref().map(Breaker::watch);

        loop {
            let paused = breaker
                .as_ref()
                .is_some_and(|state| *state.borrow() == BreakerState::Open);
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = shared.fatal_raised.notified() => break,
                Some(()) = async {
                    match breaker.as_mut() {
                        Some(state) => state.changed().await.ok(),
                        None => std::future::pending().await,
                    }
                } => {}
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let (id, settled) = match joined {
                        Ok((id, settled)) => (id, Some(settled)),
                        Err(err) => (err.id(), None),
                    };
                    let Some(lane) = running.remove(&id) else { continue };
                    let Some(queue) = lanes.get_mut(&lane) else { continue };
                    let settled = match settled {
                        Some(settled) => settled,
                        None => {
                            // The task panicked: its message is still at the
                            // front of the lane.
                            let Some(front) = queue.front_mut() else { continue };
                            front.panics += 1;
                            let max = shared.manifest.retry.max_attempts;
                            if front.panics < max {
                                let delay = Duration::from_millis(200) * front.panics;
                                tracing::error!(handler = %shared.name, event_id = %front.event.id,
                                    panics = front.panics, retry_in_ms = delay.as_millis() as u64,
                                    "the task handling a message panicked (a bug in weir); trying it again");
                                // Alone this time: whatever panicked, the rest
                                // of its run waits behind it.
                                let handle = tasks.spawn(process(shared.clone(), run_of(queue, 1), delay));
                                running.insert(handle.id(), lane);
                                continue;
                            }
                            tracing::error!(handler = %shared.name, event_id = %front.event.id, panics = front.panics,
                                "the task handling a message panicked every time (a bug in weir); releasing it to the broker and moving its key on");
                            vec![Settled::Released]
                        }
                    };
                    for outcome in settled {
                        let Some(done) = queue.pop_front() else { break };
                        held -= 1;
                        settle(&shared, &done, outcome);
                    }
                    shared.stats.held(held);
                    if queue.is_empty() {
                        lanes.remove(&lane);
                    } else {
                        let handle = tasks.spawn(process(shared.clone(), run_of(queue, MAX_RUN), Duration::ZERO));
                        running.insert(handle.id(), lane);
                    }
                }
                received = shared.source.recv(), if held < max_in_flight && !paused => {
                    let (mut message, delivery) = match received {
                        Ok(received) => received,
                        Err(err) => {
                            tracing::warn!(handler = %shared.name, error = %err, "consumer error; the client keeps reconnecting");
                            continue;
                        }
                    };
                    if !shared.manifest.key.is_empty() {
                        message.key = decode::key(&message, &shared.manifest.key);
                    }
                    seq += 1;
                    held += 1;
                    shared.stats.held(held);
                    let lane = lane_of(shared.manifest.ordering, &message, seq);
                    let pending = Pending {
                        event: Arc::new(event_of(message, &shared.manifest)),
                        delivery: Arc::new(delivery),
                        received: std::time::Instant::now(),
                        panics: 0,
                    };
                    log_message(&shared, "message_consumed", &pending);
                    let queue = lanes.entry(lane).or_default();
                    queue.push_back(pending);
                    if queue.len() == 1 {
                        let handle = tasks.spawn(process(shared.clone(), run_of(queue, 1), Duration::ZERO));
                        running.insert(handle.id(), lane);
                    }
                }
            }
        }

        // Stopping: calls running finish, retries waiting give up; what
        // finished is settled, everything else released.
        let _ = stop.send(true);
        while let Some(joined) = tasks.join_next_with_id().await {
            let (id, settled) = match joined {
                Ok((id, settled)) => (id, settled),
                Err(err) => (err.id(), vec![Settled::Released]),
            };
            if let Some(queue) = running.remove(&id).and_then(|lane| lanes.get_mut(&lane)) {
                for outcome in settled {
                    let Some(done) = queue.pop_front() else { break };
                    settle(&shared, &done, outcome);
                }
            }
        }
        let mut released = 0usize;
        for pending in lanes.into_values().flatten() {
            settle(&shared, &pending, Settled::Released);
            released += 1;
        }
        shared.stats.held(0);
        if released > 0 {
            tracing::info!(handler = %shared.name, released,
                "messages received but not started are left to the broker to deliver again");
        }
        let fatal = shared.fatal.locked().take();
        match Arc::try_unwrap(shared) {
            Ok(shared) => {
                let name = shared.name.clone();
                shared.source.close().await;
                tracing::info!(handler = %name, "stopped");
            }
            Err(shared) => {
                tracing::error!(handler = %shared.name, "stopped without closing its consumer (a task outlived it)");
            }
        }
        fatal.map_or(Ok(()), Err)
    }
}

/// Settles `pending` with the source, and logs it (`message_acked` or
/// `message_nacked`, at debug).
fn settle<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    pending: &Pending<S::Delivery>,
    outcome: Settled,
) {
    shared.source.settle(&pending.delivery, outcome);
    let event = match outcome {
        Settled::Done | Settled::DeadLettered => "message_acked",
        Settled::Released => "message_nacked",
    };
    log_message(shared, event, pending);
}

/// A per-message log event (debug) with the standard fields: `event`,
/// `topic`, the position (`partition` and `offset`, or `stream` and
/// `sequence`), `consumer_group`, `handler`, `event_id` and `latency_ms`
/// since the message was received.
fn log_message<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    name: &'static str,
    pending: &Pending<S::Delivery>,
) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let event = &pending.event;
    let latency_ms = pending.received.elapsed().as_secs_f64() * 1e3;
    let group = shared.manifest.group_for(&shared.name);
    match &event.position {
        Position::Kafka { partition, offset } => {
            tracing::debug!(event = name, topic = %event.topic,
            partition, offset, consumer_group = %group, handler = %shared.name, event_id = %event.id,
            correlation_id = event.correlation_id.as_deref(), latency_ms, "{name}")
        }
        Position::JetStream {
            stream, sequence, ..
        } => tracing::debug!(event = name, topic = %event.topic,
            stream = %stream, sequence, consumer_group = %group, handler = %shared.name, event_id = %event.id,
            correlation_id = event.correlation_id.as_deref(), latency_ms, "{name}"),
        other => tracing::debug!(event = name, topic = %event.topic,
            position = %other, consumer_group = %group, handler = %shared.name, event_id = %event.id,
            correlation_id = event.correlation_id.as_deref(), latency_ms, "{name}"),
    }
}

/// The first `max` messages of a lane: the run its next task takes.
fn run_of<D>(queue: &VecDeque<Pending<D>>, max: usize) -> Vec<(Arc<Event>, Arc<D>)> {
    queue
        .iter()
        .take(max)
        .map(|p| (p.event.clone(), p.delivery.clone()))
        .collect()
}

/// A run of one lane's messages from dedup to their outcomes, after
/// `delay`: the outcomes of the first ones, in order (at least one).
async fn process<S: Source, F: HandlerFactory, D: Publisher>(
    shared: Arc<Shared<S, F, D>>,
    run: Vec<(Arc<Event>, Arc<S::Delivery>)>,
    delay: Duration,
) -> Vec<Settled> {
    if !delay.is_zero() && !crate::shutdown::slept(&mut shared.shutdown.clone(), delay).await {
        return vec![Settled::Released];
    }
    deliver_run(&shared, &run).await
}
