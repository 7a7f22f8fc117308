//! One message from dedup to a final outcome: the per-message state machine.
//!
//! ```text
//! seen? ──done──────────────────────────────────────────► Done (duplicate)
//!   │ attempts left
//!   ▼
//! invoke ─ok─► commit ─durable─► Done
//!   │            ├─duplicate──► Done (another delivery won)
//!   │            └─conflict───► invoke again (same attempt)
//!   ├─retryable─► record attempt (durable) ─► wait ─► invoke
//!   └─permanent / last attempt─► publish dead letter ─► record ─► DeadLettered
//! ```
//!
//! Every arrow into the store waits until the write is durable (see
//! [`store`](crate::store)); a write that fails is retried while the message is held, so
//! the message's lane never moves on without it (the pipeline invariant in
//! [`pipeline`](crate::pipeline)). The machine leaves with `Released` only at shutdown,
//! when the delivery is no longer this consumer's, or when the store has
//! stopped for good.
//!
//! # Runs
//!
//! A lane's task takes the messages queued in it (up to [`MAX_RUN`]) as a
//! *run* and drives them one after another, in order. A handled outcome
//! that read and wrote no state (it may have emitted events) does not wait
//! for its own commit: it is deferred, and the run's deferred outcomes are
//! committed together in one transaction (one fsync) — at the end of the
//! run, or before any other write of the run, so that effects keep the
//! run's order. What this relies on, and keeps:
//!
//! - Such an outcome depends on no earlier one (it read no state) and no
//!   later one depends on it (it wrote none), so running the next message
//!   before it is durable changes nothing the next message sees.
//! - Nothing of a run is settled before the run's task returns, which is
//!   after every commit of the run is durable: the pipeline invariant
//!   holds for each message. (The price: earlier messages of a run are
//!   acknowledged with its last one.)
//! - Deferred outcomes are committed all or none, before anything later in
//!   the run. If they cannot be (shutdown, the delivery lost, the store
//!   stopped), they are released, and so is every later message.
//! - A second delivery of one event within a run is caught at commit, as
//!   between lanes: the writer rejects the later outcome as a duplicate.
//!
//! A stateful outcome, a failure, a retry or a dead letter takes the
//! ordinary path, one message at a time.

use std::sync::Arc;
use std::time::Duration;

use super::breaker::{CallResult, Permit};
use super::worker::Shared;
use super::{HandlerFactory, correlation, decode, dlq, outbox};
use crate::host::{Event, Failure, FailureKind, Outcome};
use crate::pipeline::retry::Next;
use crate::shutdown::slept;
use crate::source::{Publisher, Settled, Source};
use crate::store::{Applied, Effects, StoreError, Write};

/// Most runs of one attempt rejected for conflicts before the attempt
/// counts as failed.
const MAX_CONFLICTS: u64 = 100;

/// Longest wait between two tries of a failing store write.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(5);

/// Most outcomes of one run committed together.
pub(super) const MAX_RUN: usize = 64;

/// Outcomes of a run waiting to be committed together (see "Runs" above).
#[derive(Default)]
pub(super) struct RunOutcomes {
    /// Index in the run of the message being delivered.
    current: usize,
    /// Deferred outcomes, in run order: (index, event, its `Finished`).
    pending: Vec<(usize, Arc<Event>, Write)>,
    /// Outcomes decided by a flush: (index, settled).
    decided: Vec<(usize, Settled)>,
}

/// Drives the messages of a run (consecutive messages of one lane, in
/// order) to their outcomes, one after another, and returns the outcomes
/// of the first ones: all of them, or fewer if the worker is stopping (the
/// rest were not started). Never fewer than one.
pub(super) async fn deliver_run<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    run: &[(Arc<Event>, Arc<S::Delivery>)],
) -> Vec<Settled> {
    let mut group = RunOutcomes::default();
    let mut settled: Vec<Option<Settled>> = Vec::with_capacity(run.len());
    for (index, (event, delivery)) in run.iter().enumerate() {
        if index > 0 && *shared.shutdown.borrow() {
            break;
        }
        group.current = index;
        let outcome = deliver(shared, event.clone(), delivery, &mut group, run.len() > 1).await;
        settled.push(outcome);
        for (at, decided) in group.decided.drain(..) {
            settled[at] = Some(decided);
        }
    }
    if let Some((_, delivery)) = run.get(settled.len().saturating_sub(1)) {
        flush(shared, delivery, &mut group).await;
        for (at, decided) in group.decided.drain(..) {
            settled[at] = Some(decided);
        }
    }
    // Every index is decided: by `deliver`, or by a flush (which decides
    // every deferred outcome, committed or released).
    settled
        .into_iter()
        .map(|s| s.unwrap_or(Settled::Released))
        .collect()
}

/// Commits the deferred outcomes of `group` in one transaction (retrying
/// while the store fails and the run is still ours) and decides them.
/// `false`: they could not be committed and were released; then nothing
/// after them in the run may be committed either.
async fn flush<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    delivery: &S::Delivery,
    group: &mut RunOutcomes,
) -> bool {
    if group.pending.is_empty() {
        return true;
    }
    let pending = std::mem::take(&mut group.pending);
    let writes: Vec<Write> = pending.iter().map(|(_, _, w)| w.clone()).collect();
    let mut failures = 0u32;
    let applied = loop {
        match shared.store.write_all(writes.clone()).await {
            Ok(applied) => break Some(applied),
            Err(err) => {
                if !hold_on(shared, delivery, &err, "record the outcomes", failures).await {
                    break None;
                }
                failures += 1;
            }
        }
    };
    let Some(applied) = applied else {
        group
            .decided
            .extend(pending.iter().map(|(at, _, _)| (*at, Settled::Released)));
        return false;
    };
    for ((at, event, _), applied) in pending.iter().zip(applied) {
        match applied {
            Applied::Done => {
                shared.stats.handled(&event.topic);
            }
            // No reads were deferred, so no conflict; a duplicate means
            // another delivery of the event committed first.
            Applied::Duplicate | Applied::Conflict => {
                shared.stats.duplicate(&event.topic);
                tracing::debug!(handler = %shared.name, event_id = %event.id, "duplicate found at commit; its effects were dropped");
            }
        }
        group.decided.push((*at, Settled::Done));
    }
    true
}

/// Drives one message to its outcome. `None`: its outcome waits in `group`
/// (only when `defer`: the run has more messages).
async fn deliver<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    mut event: Arc<Event>,
    delivery: &S::Delivery,
    group: &mut RunOutcomes,
    defer: bool,
) -> Option<Settled> {
    let manifest = &shared.manifest;
    let name = shared.name.as_str();
    // A message queued behind its key may outlive its delivery's
    // ownership: leave it to the new owner rather than handle it twice.
    if !shared.source.owns(delivery) {
        return Some(Settled::Released);
    }
    let dedup = manifest.dedup.enabled;
    let seen = loop {
        match shared.store.seen(name, &event.id).await {
            Ok(seen) => break seen,
            Err(err) => {
                if !hold_on(shared, delivery, &err, "read the dedup mark", 0).await {
                    return Some(Settled::Released);
                }
            }
        }
    };
    if dedup && seen.done {
        shared.stats.duplicate(&event.topic);
        tracing::debug!(handler = name, topic = %event.topic, position = %event.position,
            event_id = %event.id, "duplicate; skipped");
        return Some(Settled::Done);
    }
    if seen.attempts > 0 {
        Arc::make_mut(&mut event).attempt = seen.attempts + 1;
    }
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
                category: None,
            };
            return Some(dead_letter(shared, &event, &failure, delivery, group).await);
        }
        // "Waiting is not an attempt" (`breaker.rs`): the call starts only
        // once the breaker lets it.
        let permit = match &shared.breaker {
            Some(breaker) => match breaker.admit(&mut shared.shutdown.clone()).await {
                Some(permit) => permit,
                None => return Some(Settled::Released),
            },
            None => Permit::unguarded(),
        };
        let outcome = shared.invoker.call(event.clone(), &shared.stats).await;
        let counts = permit.report(match &outcome {
            Outcome::Handled(_) => CallResult::Success,
            Outcome::Failed(failure) if failure.kind == FailureKind::Permanent => {
                CallResult::Neutral
            }
            Outcome::Failed(_) => CallResult::Failure,
        });
        if !counts {
            // A failed probe: the breaker is open again, and the attempt is
            // not this message's ("A failed probe is not held against its
            // message" in `breaker.rs`). It waits for the next probe.
            if let Outcome::Failed(failure) = &outcome {
                shared.stats.failed(&event, failure);
            }
            continue;
        }
        let failure = match outcome {
            // An outcome that read or wrote no state depends on no other
            // and no other depends on it: it may wait for the run's end
            // and be committed with the rest (see "Runs" above).
            Outcome::Handled(effects)
                if defer
                    && effects.reads.is_empty()
                    && effects.scans.is_empty()
                    && effects.writes.is_empty() =>
            {
                match finished(shared, &event, effects) {
                    Some(write) => {
                        group.pending.push((group.current, event.clone(), write));
                        return None;
                    }
                    None => {
                        shared.stats.handled(&event.topic);
                        return Some(Settled::Done);
                    }
                }
            }
            Outcome::Handled(effects) => match commit(shared, &event, effects, delivery, group)
                .await
            {
                Some(Applied::Done) => {
                    shared.stats.handled(&event.topic);
                    return Some(Settled::Done);
                }
                Some(Applied::Duplicate) => {
                    // Another delivery of this event committed first; its
                    // effects stand, this one's are dropped.
                    shared.stats.duplicate(&event.topic);
                    tracing::debug!(handler = name, event_id = %event.id, "duplicate found at commit; its effects were dropped");
                    return Some(Settled::Done);
                }
                Some(Applied::Conflict) => {
                    conflicts += 1;
                    shared.stats.conflict();
                    if conflicts < MAX_CONFLICTS {
                        // Run again at once on the new state; back off a
                        // little when it keeps colliding.
                        if conflicts > 2 {
                            let delay = Duration::from_millis(fastrand::u64(1..=conflicts.min(50)));
                            if !slept(&mut shared.shutdown.clone(), delay).await {
                                return Some(Settled::Released);
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
                        category: None,
                    }
                }
                None => return Some(Settled::Released),
            },
            Outcome::Failed(failure) => {
                shared.stats.failed(&event, &failure);
                failure
            }
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
            return Some(dead_letter(shared, &event, &failure, delivery, group).await);
        };
        shared.stats.retried(&event.topic);
        // The attempt count is durable before the retry is scheduled, so a
        // crash during the backoff does not reset it.
        let attempted = || Write::Attempted {
            handler: name.to_string(),
            id: event.id.clone(),
            attempts: event.attempt,
        };
        if durable(shared, delivery, attempted, "record the attempt", group)
            .await
            .is_none()
        {
            return Some(Settled::Released);
        }
        tracing::warn!(handler = name, version = %shared.invoker.version(), topic = %event.topic,
            position = %event.position, event_id = %event.id, correlation_id = event.correlation_id.as_deref(),
            attempt = event.attempt, kind = failure.kind.as_str(), category = failure.category.as_deref().unwrap_or("none"),
            error = %failure.message, retry_in_ms = delay.as_millis() as u64,
            "attempt failed; will retry");
        if !slept(&mut shared.shutdown.clone(), delay).await || !shared.source.owns(delivery) {
            return Some(Settled::Released);
        }
        Arc::make_mut(&mut event).attempt += 1;
    }
}

/// The write that records a handled event: its dedup mark, cleared
/// attempts, state writes and emitted events, in one transaction. `None`:
/// nothing to record (no deduplication, no effects, no attempts
/// persisted).
fn finished<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    event: &Event,
    mut effects: Effects,
) -> Option<Write> {
    let dedup = shared.manifest.dedup.enabled;
    if !dedup && event.attempt == 1 && effects.is_empty() {
        return None;
    }
    outbox::stamp(&shared.name, &event.id, &mut effects.emits);
    correlation::carry(event, &mut effects.emits);
    Some(Write::Finished {
        handler: shared.name.clone(),
        id: event.id.clone(),
        ttl: shared.manifest.dedup.ttl,
        dedup,
        effects: (!effects.is_empty()).then(|| Arc::new(effects)),
    })
}

/// Commits a handled event (see [`finished`]). `None`: the message is to
/// be released.
async fn commit<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    event: &Event,
    effects: Effects,
    delivery: &S::Delivery,
    group: &mut RunOutcomes,
) -> Option<Applied> {
    let Some(write) = finished(shared, event, effects) else {
        return Some(Applied::Done);
    };
    durable(
        shared,
        delivery,
        || write.clone(),
        "record the outcome",
        group,
    )
    .await
}

/// Applies a write, retrying while the store fails and the message is still
/// held. `None`: shutdown, the delivery is no longer ours, or the store has
/// stopped for good (the worker then stops, see [`hold_on`]).
async fn durable<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    delivery: &S::Delivery,
    write: impl Fn() -> Write,
    what: &str,
    group: &mut RunOutcomes,
) -> Option<Applied> {
    // Outcomes deferred earlier in the run are committed first, so that
    // effects keep the run's order; if they cannot be, neither can this.
    if !flush(shared, delivery, group).await {
        return None;
    }
    let mut failures = 0u32;
    loop {
        match shared.store.write(write()).await {
            Ok(applied) => {
                if failures > 0 {
                    tracing::info!(handler = %shared.name, failures, "the store accepts writes again; the held message moves on");
                }
                return Some(applied);
            }
            Err(err) => {
                if !hold_on(shared, delivery, &err, what, failures).await {
                    return None;
                }
                failures += 1;
            }
        }
    }
}

/// After a store failure: waits (exponential backoff, capped) and says
/// whether to try again. The message keeps its place in its lane meanwhile.
/// A store whose writer has stopped never recovers: the worker is told to
/// stop (the process exits with the error) and the message is released.
async fn hold_on<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    delivery: &S::Delivery,
    err: &StoreError,
    what: &str,
    failures: u32,
) -> bool {
    if matches!(err, StoreError::Closed) {
        shared.fail(format!(
            "handler {}: cannot {what}: {err}; stopping so that nothing is acknowledged without a durable outcome",
            shared.name
        ));
        return false;
    }
    let backoff = Duration::from_millis(100)
        .saturating_mul(1 << failures.min(6))
        .min(MAX_STORE_BACKOFF);
    tracing::error!(handler = %shared.name, error = %err, failures = failures + 1,
        retry_in_ms = backoff.as_millis() as u64,
        "cannot {what}; the message and later ones of its key wait until the store accepts it");
    slept(&mut shared.shutdown.clone(), backoff).await && shared.source.owns(delivery)
}

/// Publishes the dead letter, waits for the broker's acknowledgement
/// (retrying the publish until it succeeds, shutdown, or the delivery is
/// lost), then records the outcome.
async fn dead_letter<S: Source, F: HandlerFactory, D: Publisher>(
    shared: &Shared<S, F, D>,
    event: &Event,
    failure: &Failure,
    delivery: &S::Delivery,
    group: &mut RunOutcomes,
) -> Settled {
    let name = shared.name.as_str();
    let topic = shared.manifest.dlq.destination(&event.topic);
    let headers = dlq::headers(
        name,
        event,
        failure,
        event.attempt.min(shared.manifest.retry.max_attempts),
    );
    let mut headers = headers;
    let mut payload: &[u8] = &event.payload;
    let id = format!("{name}/{}/dead-letter", event.id);
    let mut backoff = Duration::from_millis(200);
    loop {
        // Never publish on behalf of a delivery no longer ours.
        if !shared.source.owns(delivery) {
            return Settled::Released;
        }
        match shared
            .dead_letters
            .send(&topic, event.key.as_deref(), payload, &headers, Some(&id))
            .await
        {
            Ok(receipt) => {
                if shared.stats.dead_letters_blocked().is_some() {
                    shared.stats.dead_letter_problem(None);
                }
                shared.stats.dead_lettered(
                    &event.topic,
                    dlq::error_type(failure),
                    &topic,
                    receipt.partition,
                );
                tracing::warn!(event = "message_dlq", handler = name, topic = %event.topic, position = %event.position,
                    event_id = %event.id, correlation_id = event.correlation_id.as_deref(), attempts = event.attempt,
                    kind = failure.kind.as_str(), category = failure.category.as_deref().unwrap_or("none"),
                    error = %failure.message, dlq = %topic, "dead-lettered");
                // Marks the event done (dedup mark, attempts cleared). A
                // duplicate here means another delivery finished first.
                return match commit(shared, event, Effects::default(), delivery, group).await {
                    Some(Applied::Done | Applied::Duplicate) => Settled::DeadLettered,
                    Some(Applied::Conflict) | None => Settled::Released,
                };
            }
            Err(err) => {
                // Refused for good with its payload (larger than the
                // broker takes, with Weir's headers): sent again at once
                // without it, saying what it was, rather than never.
                if let Some(refused) = crate::source::refusal(&err)
                    && !payload.is_empty()
                {
                    tracing::error!(handler = name, dlq = %topic, error = %err,
                        "the broker refuses the dead letter with its payload; it is sent without it");
                    headers = dlq::without_payload(payload, &headers, &refused.0);
                    payload = &[];
                    continue;
                }
                tracing::error!(handler = name, dlq = %topic, error = %err, retry_in_ms = backoff.as_millis() as u64,
                    "cannot write dead letter; the message stays unacknowledged until it can");
                shared.stats.dead_letter_problem(Some(format!(
                    "cannot write dead letters to {topic:?}: {err:#}"
                )));
                if !slept(&mut shared.shutdown.clone(), backoff).await {
                    return Settled::Released;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Builds the event for a received message: its id (see [`decode`]) and
/// the first attempt (corrected from the store when the task starts).
pub(super) fn event_of(
    message: crate::message::Message,
    manifest: &crate::registry::Manifest,
) -> Event {
    let id = decode::event_id(&message, &manifest.dedup.id, &manifest.dlq);
    decode::to_event(message, id, 1)
}
