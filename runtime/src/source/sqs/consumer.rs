//! A handler's consumer: one long-polling receiver per queue, a keep-alive
//! that extends the visibility of every held message, an acknowledgement
//! sender, and a watcher of each queue's backlog.
//!
//! # Invariants
//!
//! - **Acknowledge only what was settled.** A message is deleted only when
//!   the pipeline settles it `Done` or `DeadLettered` ([`SqsConsumer::settle`]),
//!   which it does only once the outcome is durable.
//! - **Never on someone else's behalf.** Every received message is entered
//!   in `held` with the moment its visibility ends, counted from before the
//!   request that set it. Once that moment is near (less than a sixth of
//!   the visibility timeout, at most 2 s, left) or SQS refused to extend it,
//!   the entry leaves `held` for good: [`SqsConsumer::owns`] answers `false`
//!   from then on, and settling it neither deletes nor releases anything.
//! - **Hold what is held.** Every message in `held` — buffered for the
//!   pipeline or held by it — has its visibility extended to the full
//!   timeout every third of it ([`keep_alive`]), so SQS does not deliver it
//!   to anyone else while Weir works on it.
//! - **Bounded.** One slot of `slots` (`max_in_flight` in all) per message
//!   in `held`: a receive asks for at most as many messages as there are
//!   free slots (and at most 10), and a slot comes back when its entry
//!   leaves `held`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::names::{self, queue_name};
use super::{
    KEY_ATTRIBUTE, Lookup, SqsConnection, SqsSettings, attributes, describe, missing_queue,
};
use crate::lock::Unpoisoned;
use crate::source::progress::Progress;
use crate::source::{Message, Position, Settled, Source, Subscription};

/// Most messages one receive, delete or visibility change takes.
const MAX_BATCH: usize = 10;
/// How long a receive in progress may still finish once the consumer
/// closes; after that it is dropped (the messages it would have brought
/// come back after their visibility timeout).
const RECEIVE_GRACE: Duration = Duration::from_secs(1);
/// How much earlier than its answer SQS may have picked a long poll's
/// messages (and started their visibility timeout), at most: SQS answers a
/// long poll as soon as it has messages, so this only covers the answer's
/// way back (a quarter of the visibility timeout when that is shorter).
const PICK_SLACK: Duration = Duration::from_secs(1);
/// How often each queue's backlog is read.
const LAG_PERIOD: Duration = Duration::from_secs(5);
/// The system attributes Weir reads from a received message.
const SYSTEM_ATTRIBUTES: [MessageSystemAttributeName; 4] = [
    MessageSystemAttributeName::ApproximateReceiveCount,
    MessageSystemAttributeName::SentTimestamp,
    MessageSystemAttributeName::MessageGroupId,
    MessageSystemAttributeName::SequenceNumber,
];
/// A queue's own `maxReceiveCount` below which Weir warns.
const LOW_RECEIVE_COUNT: u64 = 5;

/// One queue a handler consumes.
#[derive(Debug, Clone)]
struct Queue {
    /// The topic, as the manifest names it.
    topic: String,
    /// Its queue's name.
    name: String,
}

/// One message received and not yet settled or lost.
#[derive(Debug, Clone)]
struct Held {
    /// The index of its queue.
    scope: usize,
    /// Its queue's URL.
    url: String,
    /// The receipt handle of this delivery.
    receipt: String,
    /// When its visibility ends, at the latest.
    deadline: Instant,
}

/// What a consumer's tasks share.
struct Shared {
    connection: SqsConnection,
    handler: String,
    queues: Vec<Queue>,
    visibility: Duration,
    wait: Duration,
    /// How close to its deadline a message stops being this consumer's.
    margin: Duration,
    progress: Progress,
    held: Mutex<HashMap<u64, Held>>,
    /// One permit per message that may still be received.
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    /// Per queue: `None` once a receive succeeded, else why not.
    joining: Mutex<Vec<Option<String>>>,
}

impl Shared {
    /// Takes delivery `id` out of `held` (giving its slot back), if it is
    /// still this consumer's.
    fn take(&self, id: u64) -> Option<Held> {
        let mut held = self.held.locked();
        let entry = held.remove(&id)?;
        self.slots.add_permits(1);
        if Instant::now() + self.margin < entry.deadline {
            Some(entry)
        } else {
            drop(held);
            self.lapsed(&entry, "its visibility timeout ran out");
            None
        }
    }

    fn lapsed(&self, entry: &Held, why: &str) {
        tracing::warn!(handler = %self.handler, queue = %self.queues[entry.scope].name, why,
            "a held message is no longer this consumer's: SQS may deliver it again (its outcome here is not acknowledged; a redelivery is deduplicated)");
    }

    /// Records how queue `scope`'s last receive went, and the consumer's
    /// readiness with it.
    fn receive_went(&self, scope: usize, problem: Option<String>) {
        let mut joining = self.joining.locked();
        let was = joining[scope].is_none();
        joining[scope] = problem.clone();
        match problem {
            Some(why) => self
                .progress
                .not_joined(format!("SQS queue {:?}: {why}", self.queues[scope].name)),
            None if joining.iter().all(Option::is_none) => self.progress.joined(),
            None => {}
        }
        drop(joining);
        if !was && self.joining.locked()[scope].is_none() {
            tracing::info!(handler = %self.handler, queue = %self.queues[scope].name, "receiving from the queue");
        }
    }
}

/// One delivered message.
pub struct SqsDelivery {
    id: u64,
}

/// A handler's consumer of its queues.
pub struct SqsConsumer {
    shared: Arc<Shared>,
    messages: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Message, SqsDelivery)>>,
    acks: mpsc::UnboundedSender<Ack>,
    stop: watch::Sender<bool>,
    receivers: Vec<JoinHandle<()>>,
    /// The keep-alive, the acknowledgement sender and the lag watcher.
    tasks: [JoinHandle<()>; 3],
}

impl SqsConsumer {
    pub(super) fn start(
        connection: SqsConnection,
        subscription: Subscription<SqsSettings>,
    ) -> SqsConsumer {
        let source = &connection.inner.source;
        let visibility = whole_seconds(
            subscription
                .settings
                .visibility_timeout
                .unwrap_or(source.visibility_timeout),
        );
        let wait = subscription.settings.wait_time.unwrap_or(source.wait_time);
        let queues: Vec<Queue> = subscription
            .topics
            .iter()
            .map(|topic| Queue {
                topic: topic.clone(),
                name: queue_name(topic),
            })
            .collect();
        let shared = Arc::new(Shared {
            connection: connection.clone(),
            handler: subscription.handler.clone(),
            joining: Mutex::new(vec![Some("no receive yet".to_string()); queues.len()]),
            queues,
            visibility,
            wait,
            margin: (visibility / 6).min(Duration::from_secs(2)),
            progress: subscription.progress.clone(),
            held: Mutex::default(),
            slots: Arc::new(Semaphore::new(subscription.max_in_flight.max(1))),
            next_id: AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let (deliver, messages) = mpsc::unbounded_channel();
        let receivers = (0..shared.queues.len())
            .map(|scope| {
                tokio::spawn(receive(
                    shared.clone(),
                    scope,
                    deliver.clone(),
                    stopped.clone(),
                ))
            })
            .collect();
        let (acks, queue) = mpsc::unbounded_channel();
        let tasks = [
            tokio::spawn(keep_alive(Arc::downgrade(&shared))),
            tokio::spawn(send_acks(shared.clone(), queue)),
            tokio::spawn(watch_lag(Arc::downgrade(&shared))),
        ];
        SqsConsumer {
            shared,
            messages: tokio::sync::Mutex::new(messages),
            acks,
            stop,
            receivers,
            tasks,
        }
    }
}

/// `duration` rounded up to whole seconds (SQS counts visibility in
/// seconds).
fn whole_seconds(duration: Duration) -> Duration {
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    Duration::from_secs(seconds)
}

fn seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)
}

impl Source for SqsConsumer {
    type Delivery = SqsDelivery;

    /// The next message of any of the handler's queues. The receivers keep
    /// trying (and logging) while SQS is unreachable, so this waits.
    async fn recv(&self) -> Result<(Message, SqsDelivery), String> {
        let mut messages = self.messages.lock().await;
        messages
            .recv()
            .await
            .ok_or_else(|| "the SQS consumer stopped".to_string())
    }

    fn owns(&self, delivery: &SqsDelivery) -> bool {
        let mut held = self.shared.held.locked();
        let Some(entry) = held.get(&delivery.id) else {
            return false;
        };
        if Instant::now() + self.shared.margin < entry.deadline {
            return true;
        }
        // Lapsed: it leaves for good (see the module invariants).
        if let Some(entry) = held.remove(&delivery.id) {
            self.shared.slots.add_permits(1);
            drop(held);
            self.shared.lapsed(&entry, "its visibility timeout ran out");
        }
        false
    }

    /// Invariant: a message is deleted only when settled `Done` or
    /// `DeadLettered` (which the pipeline reports only once durable), and
    /// only while it is still this consumer's.
    fn settle(&self, delivery: &SqsDelivery, outcome: Settled) {
        let Some(held) = self.shared.take(delivery.id) else {
            return;
        };
        let kind = match outcome {
            Settled::Done | Settled::DeadLettered => AckKind::Delete,
            Settled::Released => AckKind::Release,
        };
        let _ = self.acks.send(Ack { held, kind });
    }

    /// Stops receiving, hands back what the pipeline never took, sends the
    /// acknowledgements still queued.
    async fn close(self) {
        let Self {
            shared,
            messages,
            acks,
            stop,
            receivers,
            tasks,
        } = self;
        let _ = stop.send(true);
        for receiver in receivers {
            let _ = tokio::time::timeout(RECEIVE_GRACE * 3, receiver).await;
        }
        let mut messages = messages.into_inner();
        messages.close();
        let mut released = 0;
        while let Ok((_, delivery)) = messages.try_recv() {
            if let Some(held) = shared.take(delivery.id) {
                released += 1;
                let _ = acks.send(Ack {
                    held,
                    kind: AckKind::Release,
                });
            }
        }
        let rest: Vec<u64> = shared.held.locked().keys().copied().collect();
        for id in rest {
            if let Some(held) = shared.take(id) {
                released += 1;
                let _ = acks.send(Ack {
                    held,
                    kind: AckKind::Release,
                });
            }
        }
        if released > 0 {
            tracing::info!(handler = %shared.handler, released, "handing back messages received but not handled");
        }
        drop(acks);
        let [keepalive, acking, lag] = tasks;
        if tokio::time::timeout(Duration::from_secs(5), acking)
            .await
            .is_err()
        {
            tracing::warn!(handler = %shared.handler, "acknowledgements still queued after 5 s; those messages are delivered again after their visibility timeout");
        }
        keepalive.abort();
        lag.abort();
        for queue in &shared.queues {
            shared.progress.forget(&queue.topic, 0);
        }
    }
}

/// Receives from queue `scope` until stopped: long polls for as many
/// messages as there are free slots (at most 10), entering each in `held`
/// and handing it to `deliver`. While SQS is unreachable or the queue
/// missing, logs why and tries again with backoff.
async fn receive(
    shared: Arc<Shared>,
    scope: usize,
    deliver: mpsc::UnboundedSender<(Message, SqsDelivery)>,
    mut stopped: watch::Receiver<bool>,
) {
    let queue = shared.queues[scope].clone();
    let client = shared.connection.client().clone();
    let mut url = None;
    let mut backoff = Duration::from_millis(250);
    loop {
        if *stopped.borrow() {
            return;
        }
        let problem = match &url {
            Some(_) => None,
            None => match open(&shared, &queue).await {
                Ok(found) => {
                    url = Some(found);
                    None
                }
                Err(why) => Some(why),
            },
        };
        if let Some(why) = problem {
            tracing::warn!(handler = %shared.handler, queue = %queue.name, error = %why,
                retry_in_ms = backoff.as_millis() as u64, "cannot receive from the SQS queue; trying again");
            shared.receive_went(scope, Some(why));
            if !crate::shutdown::slept(&mut stopped, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            continue;
        }
        let Some(queue_url) = url.clone() else {
            continue;
        };
        // Slots first: never more messages out than `max_in_flight`.
        let first = tokio::select! {
            permit = shared.slots.clone().acquire_owned() => permit,
            _ = stopped.changed() => return,
        };
        let Ok(first) = first else { return };
        first.forget();
        let mut asked = 1;
        while asked < MAX_BATCH {
            match shared.slots.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    asked += 1;
                }
                Err(_) => break,
            }
        }
        let mut request = client
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(asked as i32)
            .wait_time_seconds(seconds(shared.wait))
            .visibility_timeout(seconds(shared.visibility))
            .message_attribute_names("All");
        for name in SYSTEM_ATTRIBUTES {
            let former = QueueAttributeName::from(name.as_str());
            request = request.message_system_attribute_names(name);
            // The parameter's former name, which some SQS-compatible
            // servers (moto) still read instead; SQS takes both. Named one
            // by one, not `All`: moto answers `All` with a null
            // `MessageDeduplicationId`, which the SDK cannot parse.
            #[allow(deprecated)]
            {
                request = request.attribute_names(former);
            }
        }
        if names::is_fifo(&queue.name) {
            // A retried receive of a FIFO queue gets the same messages.
            request =
                request.receive_request_attempt_id(format!("weir-{:016x}", fastrand::u64(..)));
        }
        let sent = Instant::now();
        let mut call = Box::pin(request.send());
        let result = tokio::select! {
            result = &mut call => Some(result),
            _ = stopped.changed() => tokio::time::timeout(RECEIVE_GRACE, &mut call).await.ok(),
        };
        let Some(result) = result else {
            shared.slots.add_permits(asked);
            return;
        };
        match result {
            Ok(out) => {
                backoff = Duration::from_millis(250);
                shared.receive_went(scope, None);
                let answered = Instant::now();
                let picked = answered
                    .checked_sub(PICK_SLACK.min(shared.visibility / 4))
                    .map_or(sent, |early| early.max(sent));
                let deadline = picked + shared.visibility;
                let messages = out.messages();
                shared
                    .slots
                    .add_permits(asked.saturating_sub(messages.len()));
                for message in messages {
                    match decode(&shared, scope, &queue_url, message, deadline) {
                        Some(decoded) => {
                            let _ = deliver.send(decoded);
                        }
                        None => shared.slots.add_permits(1),
                    }
                }
            }
            Err(err) => {
                shared.slots.add_permits(asked);
                if missing_queue(&err) {
                    shared.connection.forget_url(&queue.name);
                    url = None;
                }
                let why = describe(&err);
                tracing::warn!(handler = %shared.handler, queue = %queue.name, error = %why,
                    retry_in_ms = backoff.as_millis() as u64, "receiving from the SQS queue failed; trying again");
                shared.receive_went(scope, Some(why));
                if !crate::shutdown::slept(&mut stopped, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Finds `queue`'s URL and reads its redrive policy (warning when its
/// `maxReceiveCount` is low: see the module documentation of `sqs`).
async fn open(shared: &Shared, queue: &Queue) -> Result<String, String> {
    let url = shared
        .connection
        .queue_url(&queue.name)
        .await
        .map_err(|why| match why {
            Lookup::Missing => format!(
                "queue {:?} (topic {:?}) does not exist: create it",
                queue.name, queue.topic
            ),
            Lookup::Failed(why) => why,
        })?;
    let attributes = shared
        .connection
        .client()
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await;
    let redrive = match attributes {
        Ok(out) => out
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
            .cloned(),
        Err(err) => {
            tracing::warn!(handler = %shared.handler, queue = %queue.name, error = %describe(&err),
                "cannot read the queue's redrive policy");
            None
        }
    };
    let max_receives = redrive.as_deref().and_then(|policy| {
        let policy: serde_json::Value = serde_json::from_str(policy).ok()?;
        match &policy["maxReceiveCount"] {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
    });
    match max_receives {
        Some(count) if count < LOW_RECEIVE_COUNT => {
            tracing::warn!(handler = %shared.handler, queue = %queue.name, max_receive_count = count,
                "the queue's redrive policy moves a message to its own dead-letter queue after few receives: every crash, shutdown or lost visibility counts one, so a message can go there before Weir has retried it [retry] max_attempts times (raise maxReceiveCount)")
        }
        Some(count) => {
            tracing::info!(handler = %shared.handler, queue = %queue.name, max_receive_count = count,
                "the queue has a redrive policy: Weir retries in-process, so only crashes, shutdowns and lost visibility count towards it")
        }
        None => {}
    }
    tracing::info!(handler = %shared.handler, queue = %queue.name, topic = %queue.topic, url = %url,
        visibility_timeout_s = shared.visibility.as_secs(), wait_time_s = shared.wait.as_secs(), "consuming");
    Ok(url)
}

/// The message and delivery of `message`, received from queue `scope`,
/// entered in `held` until `deadline`.
fn decode(
    shared: &Shared,
    scope: usize,
    url: &str,
    message: &aws_sdk_sqs::types::Message,
    deadline: Instant,
) -> Option<(Message, SqsDelivery)> {
    let queue = &shared.queues[scope];
    let Some(receipt) = message.receipt_handle() else {
        tracing::warn!(handler = %shared.handler, queue = %queue.name, "SQS delivered a message without a receipt handle; skipping it");
        return None;
    };
    let system = |name: MessageSystemAttributeName| {
        message
            .attributes()
            .and_then(|a| a.get(&name))
            .map(String::as_str)
    };
    let (payload, headers) = attributes::decode(
        message.body().unwrap_or_default(),
        message.message_attributes(),
    );
    let group = system(MessageSystemAttributeName::MessageGroupId).filter(|g| !g.is_empty());
    let key = match group {
        Some(group) if names::is_fifo(&queue.name) => group.as_bytes().to_vec(),
        _ => headers
            .iter()
            .find(|(n, v)| n == KEY_ATTRIBUTE && !v.is_empty())
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| queue.name.as_bytes().to_vec()),
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared.held.locked().insert(
        id,
        Held {
            scope,
            url: url.to_string(),
            receipt: receipt.to_string(),
            deadline,
        },
    );
    Some((
        Message {
            topic: queue.topic.clone(),
            key: Some(key),
            payload,
            headers,
            timestamp_ms: system(MessageSystemAttributeName::SentTimestamp)
                .and_then(|t| t.parse().ok()),
            position: Position::Sqs {
                queue: url.to_string(),
                message_id: message.message_id().unwrap_or_default().to_string(),
                receive_count: system(MessageSystemAttributeName::ApproximateReceiveCount)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1),
                sequence_number: system(MessageSystemAttributeName::SequenceNumber)
                    .map(str::to_string),
            },
            scope: scope as u64,
        },
        SqsDelivery { id },
    ))
}

/// Keeps every held message invisible to other consumers: each third of
/// the visibility timeout, extends every entry of `held` to the full
/// timeout again; an entry SQS refuses to extend, or whose visibility ran
/// out meanwhile, leaves `held` (it is no longer this consumer's). Ends
/// with the consumer.
async fn keep_alive(shared: Weak<Shared>) {
    let Some(period) = shared
        .upgrade()
        .map(|s| (s.visibility / 3).max(Duration::from_millis(500)))
    else {
        return;
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut lapsed = Vec::new();
        let mut by_queue: HashMap<String, Vec<(u64, String)>> = HashMap::new();
        {
            let mut held = shared.held.locked();
            held.retain(|id, entry| {
                if entry.deadline <= now + shared.margin {
                    lapsed.push(entry.clone());
                    false
                } else {
                    by_queue
                        .entry(entry.url.clone())
                        .or_default()
                        .push((*id, entry.receipt.clone()));
                    true
                }
            });
        }
        shared.slots.add_permits(lapsed.len());
        for entry in &lapsed {
            shared.lapsed(entry, "its visibility could not be extended in time");
        }
        for (url, entries) in by_queue {
            for chunk in entries.chunks(MAX_BATCH) {
                extend(&shared, &url, chunk).await;
            }
        }
    }
}

/// Extends the visibility of `entries` (delivery id, receipt handle) of
/// the queue at `url` to the full timeout.
async fn extend(shared: &Shared, url: &str, entries: &[(u64, String)]) {
    let mut request = Vec::with_capacity(entries.len());
    for (id, receipt) in entries {
        let entry = ChangeMessageVisibilityBatchRequestEntry::builder()
            .id(id.to_string())
            .receipt_handle(receipt)
            .visibility_timeout(seconds(shared.visibility))
            .build();
        if let Ok(entry) = entry {
            request.push(entry);
        }
    }
    let asked = Instant::now();
    let answer = shared
        .connection
        .client()
        .change_message_visibility_batch()
        .queue_url(url)
        .set_entries(Some(request))
        .send()
        .await;
    match answer {
        Ok(out) => {
            let deadline = asked + shared.visibility;
            let mut held = shared.held.locked();
            for ok in out.successful() {
                if let Some(entry) = ok.id().parse().ok().and_then(|id: u64| held.get_mut(&id)) {
                    entry.deadline = entry.deadline.max(deadline);
                }
            }
            let mut refused = Vec::new();
            for failed in out.failed() {
                if let Some(entry) = failed
                    .id()
                    .parse()
                    .ok()
                    .and_then(|id: u64| held.remove(&id))
                {
                    refused.push((
                        entry,
                        format!("{} {}", failed.code(), failed.message().unwrap_or_default()),
                    ));
                }
            }
            drop(held);
            shared.slots.add_permits(refused.len());
            for (entry, why) in refused {
                shared.lapsed(
                    &entry,
                    &format!("SQS refused to extend its visibility: {why}"),
                );
            }
        }
        Err(err) => {
            tracing::warn!(handler = %shared.handler, error = %describe(&err),
                "cannot extend the visibility of held messages; trying again (a message whose visibility runs out is no longer this consumer's)");
        }
    }
}

/// What to do with a settled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    /// Delete it (`Done`, `DeadLettered`).
    Delete,
    /// Make it visible again now (`Released`).
    Release,
}

/// One settled message's acknowledgement, for [`send_acks`].
struct Ack {
    held: Held,
    kind: AckKind,
}

/// Sends acknowledgements in batches, in the order they were settled. A
/// delete that SQS did not answer is tried again while the message is
/// still invisible; one that succeeds advances its queue's position age
/// (`progress.advanced`). A release that fails needs no retry: the message
/// comes back when its visibility runs out.
async fn send_acks(shared: Arc<Shared>, mut queue: mpsc::UnboundedReceiver<Ack>) {
    while let Some(first) = queue.recv().await {
        let mut acks = vec![first];
        while acks.len() < 100 {
            match queue.try_recv() {
                Ok(ack) => acks.push(ack),
                Err(_) => break,
            }
        }
        // Consecutive acks of one kind and queue go together.
        let mut start = 0;
        while start < acks.len() {
            let (url, kind) = (&acks[start].held.url, acks[start].kind);
            let mut end = start + 1;
            while end < acks.len()
                && end - start < MAX_BATCH
                && acks[end].held.url == *url
                && acks[end].kind == kind
            {
                end += 1;
            }
            match kind {
                AckKind::Delete => delete(&shared, &acks[start..end]).await,
                AckKind::Release => release(&shared, &acks[start..end]).await,
            }
            start = end;
        }
    }
}

/// Deletes `acks` (of one queue), retrying while they are still invisible.
async fn delete(shared: &Shared, acks: &[Ack]) {
    let Some(first) = acks.first() else { return };
    let url = &first.held.url;
    let mut backoff = Duration::from_millis(100);
    loop {
        let entries: Vec<DeleteMessageBatchRequestEntry> = acks
            .iter()
            .enumerate()
            .filter_map(|(index, ack)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(index.to_string())
                    .receipt_handle(&ack.held.receipt)
                    .build()
                    .ok()
            })
            .collect();
        let answer = shared
            .connection
            .client()
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await;
        match answer {
            Ok(out) => {
                for ok in out.successful() {
                    if let Some(ack) = ok.id().parse::<usize>().ok().and_then(|i| acks.get(i)) {
                        shared
                            .progress
                            .advanced(&shared.queues[ack.held.scope].topic, 0);
                    }
                }
                for failed in out.failed() {
                    tracing::warn!(handler = %shared.handler, code = failed.code(), error = failed.message().unwrap_or_default(),
                        "SQS refused to delete a settled message; it will be delivered again and deduplicated");
                }
                return;
            }
            Err(err) => {
                let still_ours = acks
                    .iter()
                    .map(|a| a.held.deadline)
                    .min()
                    .is_some_and(|d| Instant::now() + backoff + shared.margin < d);
                if !still_ours || missing_queue(&err) {
                    tracing::warn!(handler = %shared.handler, error = %describe(&err), messages = acks.len(),
                        "cannot delete settled messages; they will be delivered again and deduplicated");
                    return;
                }
                tracing::warn!(handler = %shared.handler, error = %describe(&err), retry_in_ms = backoff.as_millis() as u64,
                    "cannot delete settled messages yet; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Makes `acks` (of one queue) visible again at once.
async fn release(shared: &Shared, acks: &[Ack]) {
    let Some(first) = acks.first() else { return };
    let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = acks
        .iter()
        .enumerate()
        .filter_map(|(index, ack)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(index.to_string())
                .receipt_handle(&ack.held.receipt)
                .visibility_timeout(0)
                .build()
                .ok()
        })
        .collect();
    let answer = shared
        .connection
        .client()
        .change_message_visibility_batch()
        .queue_url(&first.held.url)
        .set_entries(Some(entries))
        .send()
        .await;
    if let Err(err) = answer {
        tracing::warn!(handler = %shared.handler, error = %describe(&err), messages = acks.len(),
            "cannot hand messages back to SQS; they are delivered again when their visibility runs out");
    }
}

/// Keeps `progress` current with each queue's backlog (messages waiting to
/// be received). Ends with the consumer.
async fn watch_lag(shared: Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        for queue in &strong.queues {
            if let Ok(counts) = strong.connection.counts(&queue.name).await {
                strong.progress.set_lag(
                    &queue.topic,
                    0,
                    i64::try_from(counts.visible).unwrap_or(i64::MAX),
                );
            }
        }
        drop(strong);
        tokio::time::sleep(LAG_PERIOD).await;
    }
}
