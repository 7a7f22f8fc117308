//! A handler's consumer: one channel with one AMQP consumer per queue,
//! opened (queues declared, bound, consumed) when first needed and again
//! whenever the channel or the connection is lost; manual
//! acknowledgements sent by a task of their own; the queues' ready counts
//! polled as the consumer's lag.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::{SelectAll, Stream};
use lapin::acker::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::options::{BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::link::Link;
use super::{RabbitSettings, decode, topology};
use crate::lock::Unpoisoned;
use crate::message::Message;
use crate::source::progress::Progress;
use crate::source::{Settled, Source, Subscription};

/// What a handler consumes, shared with the consumer's tasks.
struct Spec {
    handler: String,
    group: String,
    queues: Vec<String>,
    settings: RabbitSettings,
    /// Prefetch of each queue's AMQP consumer.
    prefetch: u16,
    progress: Progress,
    /// Whether a session is consuming (its queues exist).
    active: AtomicBool,
}

/// One delivered message: its channel's acknowledgement handle.
pub struct RabbitDelivery {
    id: u64,
    acker: Acker,
    /// The index of its queue in the handler's topics.
    scope: u64,
}

/// Every queue's deliveries, tagged with the queue's index.
type Deliveries = SelectAll<Pin<Box<dyn Stream<Item = (u64, lapin::Result<Delivery>)> + Send>>>;

/// An open channel consuming every queue of the handler.
struct Session {
    channel: Channel,
    deliveries: Deliveries,
    consumer_tags: Vec<String>,
}

/// The session, or the task opening it.
#[derive(Default)]
struct State {
    session: Option<Session>,
    opening: Option<JoinHandle<Session>>,
}

/// A handler's consumer of its queues.
pub struct RabbitConsumer {
    link: Arc<Link>,
    spec: Arc<Spec>,
    state: tokio::sync::Mutex<State>,
    /// Deliveries the pipeline holds, by id, with their channel's handle.
    held: Arc<Mutex<HashMap<u64, Acker>>>,
    next_delivery: AtomicU64,
    acks: mpsc::UnboundedSender<Ack>,
    /// The acknowledgement sender and the lag watcher.
    tasks: [JoinHandle<()>; 2],
}

impl RabbitConsumer {
    /// A consumer of `subscription`'s queues over `link`. Nothing is
    /// opened until the first [`recv`](Source::recv).
    pub(super) fn new(link: Arc<Link>, subscription: Subscription<RabbitSettings>) -> Self {
        let queues = subscription.topics;
        let share = subscription
            .max_in_flight
            .div_ceil(queues.len().max(1))
            .clamp(1, usize::from(u16::MAX));
        let spec = Arc::new(Spec {
            handler: subscription.handler,
            group: subscription.group,
            prefetch: u16::try_from(share).unwrap_or(u16::MAX),
            queues,
            settings: subscription.settings,
            progress: subscription.progress,
            active: AtomicBool::new(false),
        });
        let (acks, queue) = mpsc::unbounded_channel();
        let acking = tokio::spawn(send_acks(queue, spec.clone()));
        let lag = tokio::spawn(watch_lag(link.clone(), spec.clone()));
        Self {
            link,
            spec,
            state: tokio::sync::Mutex::new(State::default()),
            held: Arc::default(),
            next_delivery: AtomicU64::new(0),
            acks,
            tasks: [acking, lag],
        }
    }

    /// Records `delivery` as held and turns it into a message.
    fn decode(&self, scope: u64, delivery: Delivery) -> (Message, RabbitDelivery) {
        let queue = usize::try_from(scope)
            .ok()
            .and_then(|i| self.spec.queues.get(i))
            .map_or("", String::as_str);
        let message = decode::message(queue, scope, &delivery);
        let id = self.next_delivery.fetch_add(1, Ordering::Relaxed);
        self.held.locked().insert(id, delivery.acker.clone());
        (
            message,
            RabbitDelivery {
                id,
                acker: delivery.acker,
                scope,
            },
        )
    }
}

/// Opens a session: declares and binds the queues, then consumes each on
/// one new channel with the prefetch set.
async fn open(link: &Link, spec: &Spec) -> anyhow::Result<Session> {
    for queue in &spec.queues {
        topology::ensure_queue(link, queue, &spec.settings).await?;
    }
    let channel = link.channel().await?;
    channel
        .basic_qos(spec.prefetch, BasicQosOptions { global: false })
        .await
        .map_err(|err| anyhow::anyhow!("cannot set the prefetch: {err}"))?;
    let mut deliveries: Deliveries = SelectAll::new();
    let mut consumer_tags = Vec::new();
    for (index, queue) in spec.queues.iter().enumerate() {
        let tag = format!(
            "{}/{}/{}",
            spec.group,
            std::process::id(),
            CONSUMERS.fetch_add(1, Ordering::Relaxed)
        );
        let consumer: Consumer = channel
            .basic_consume(
                queue,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| anyhow::anyhow!("cannot consume queue {queue:?}: {err}"))?;
        let scope = index as u64;
        deliveries.push(Box::pin(consumer.map(move |d| (scope, d))));
        consumer_tags.push(tag);
        tracing::info!(handler = %spec.handler, queue = %queue, prefetch = spec.prefetch, "consuming");
    }
    Ok(Session {
        channel,
        deliveries,
        consumer_tags,
    })
}

/// Consumer tags are unique within the process.
static CONSUMERS: AtomicU64 = AtomicU64::new(0);

/// Opens a session, trying again with backoff (every failure logged, and
/// the consumer reported not joined) until it is open.
async fn open_until_open(link: Arc<Link>, spec: Arc<Spec>) -> Session {
    let mut backoff = Duration::from_millis(250);
    loop {
        match open(&link, &spec).await {
            Ok(session) => {
                spec.active.store(true, Ordering::Relaxed);
                spec.progress.joined();
                return session;
            }
            Err(err) => {
                let why = format!("{err:#}");
                tracing::warn!(handler = %spec.handler, broker = %link.label, error = %why,
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot set up the RabbitMQ consumer; trying again");
                spec.progress.not_joined(why);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Closes a session's channel: the broker requeues what was delivered on it
/// and not acknowledged.
async fn close_session(session: Session, handler: &str) {
    let Session {
        channel,
        deliveries,
        consumer_tags,
    } = session;
    if channel.status().connected() {
        for tag in &consumer_tags {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                channel.basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
        }
    }
    drop(deliveries);
    if channel.status().connected()
        && let Err(err) = channel.close(200, "consumer closing").await
    {
        tracing::debug!(handler, error = %err, "cannot close the consumer channel");
    }
}

impl Source for RabbitConsumer {
    type Delivery = RabbitDelivery;

    /// The next delivery of any of the handler's queues. Until the broker
    /// answers (and the queues exist and are consumed) this waits — the
    /// opening runs in a task of its own, so dropping this future loses
    /// nothing. A lost channel is reported once as an error, and opened
    /// again on the next call.
    async fn recv(&self) -> Result<(Message, RabbitDelivery), String> {
        let mut state = self.state.lock().await;
        loop {
            let Some(session) = state.session.as_mut() else {
                let opening = state.opening.get_or_insert_with(|| {
                    tokio::spawn(open_until_open(self.link.clone(), self.spec.clone()))
                });
                let opened = opening.await;
                state.opening = None;
                match opened {
                    Ok(session) => state.session = Some(session),
                    Err(err) => return Err(format!("opening the RabbitMQ consumer failed: {err}")),
                }
                continue;
            };
            let lost = match session.deliveries.next().await {
                Some((scope, Ok(delivery))) => return Ok(self.decode(scope, delivery)),
                Some((_, Err(err))) => format!("the consumer channel failed: {err}"),
                None => "the broker cancelled the consumer (was a queue deleted?)".to_string(),
            };
            // Invariant (never on someone else's behalf): the deliveries
            // of that channel are poisoned with it, so `owns` is false for
            // each from now on.
            let why = format!(
                "{lost}; consuming again on a new channel (the broker redelivers what was not acknowledged)"
            );
            tracing::warn!(handler = %self.spec.handler, broker = %self.link.label, "{why}");
            self.spec.active.store(false, Ordering::Relaxed);
            self.spec.progress.not_joined(why.clone());
            if let Some(session) = state.session.take() {
                let handler = self.spec.handler.clone();
                tokio::spawn(async move { close_session(session, &handler).await });
            }
            return Err(why);
        }
    }

    fn owns(&self, delivery: &RabbitDelivery) -> bool {
        !delivery.acker.poisoned() && self.held.locked().contains_key(&delivery.id)
    }

    /// Invariant (acknowledge only what was settled): `basic.ack` only for
    /// `Done` and `DeadLettered`, which the pipeline reports once durable;
    /// `Released` is a `basic.nack` with requeue. A delivery whose channel
    /// closed is acknowledged no more (the broker has requeued it).
    fn settle(&self, delivery: &RabbitDelivery, outcome: Settled) {
        if self.held.locked().remove(&delivery.id).is_none() || delivery.acker.poisoned() {
            return;
        }
        let _ = self.acks.send(Ack {
            acker: delivery.acker.clone(),
            done: !matches!(outcome, Settled::Released),
            scope: delivery.scope,
        });
    }

    /// Stops the deliveries, sends the acknowledgements still queued, then
    /// closes the channel: the broker requeues whatever was delivered and
    /// not settled.
    async fn close(self) {
        let Self {
            spec,
            state,
            held,
            acks,
            tasks,
            ..
        } = self;
        spec.active.store(false, Ordering::Relaxed);
        let mut state = state.into_inner();
        if let Some(opening) = state.opening.take() {
            opening.abort();
            if let Ok(session) = opening.await {
                state.session = Some(session);
            }
        }
        let mut session = state.session.take();
        if let Some(session) = &mut session {
            for tag in std::mem::take(&mut session.consumer_tags) {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    session
                        .channel
                        .basic_cancel(&tag, BasicCancelOptions::default()),
                )
                .await;
            }
        }
        held.locked().clear();
        drop(acks);
        let [acking, lag] = tasks;
        lag.abort();
        // The acknowledgement sender ends once its queue is drained.
        if tokio::time::timeout(Duration::from_secs(5), acking)
            .await
            .is_err()
        {
            tracing::warn!(handler = %spec.handler, "acknowledgements still queued after 5 s; those messages are redelivered");
        }
        if let Some(session) = session {
            close_session(session, &spec.handler).await;
        }
        for queue in &spec.queues {
            spec.progress.forget(queue, 0);
        }
    }
}

/// One settled delivery's acknowledgement, for [`send_acks`].
struct Ack {
    acker: Acker,
    /// `basic.ack` (else `basic.nack` with requeue).
    done: bool,
    scope: u64,
}

/// Most acknowledgements written in one go.
const ACK_BATCH: usize = 256;

/// Sends acknowledgements as they are settled, a batch at a time (the
/// broker takes each delivery tag on its own, in any order). An ack that
/// reached the broker advances its queue's position in `spec.progress`.
async fn send_acks(mut queue: mpsc::UnboundedReceiver<Ack>, spec: Arc<Spec>) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while queue.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let sent = futures_util::future::join_all(batch.iter().map(|ack| async move {
            if ack.done {
                ack.acker.ack(BasicAckOptions::default()).await
            } else {
                ack.acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
            }
        }))
        .await;
        for (ack, sent) in batch.drain(..).zip(sent) {
            match sent {
                Ok(true) => {
                    if ack.done
                        && let Some(queue) = usize::try_from(ack.scope)
                            .ok()
                            .and_then(|i| spec.queues.get(i))
                    {
                        spec.progress.advanced(queue, 0);
                    }
                }
                // Its channel closed meanwhile: the broker requeued it.
                Ok(false) => tracing::debug!(handler = %spec.handler,
                    "a settled delivery's channel closed before its acknowledgement; it is redelivered and deduplicated"),
                Err(err) => tracing::warn!(handler = %spec.handler, error = %err,
                    "cannot acknowledge a message; it will be redelivered and deduplicated"),
            }
        }
    }
}

/// How often the queues' ready counts are read once known; until then,
/// every [`FIRST_PERIOD`].
const LAG_PERIOD: Duration = Duration::from_secs(5);
const FIRST_PERIOD: Duration = Duration::from_secs(1);

/// Keeps each queue's lag in `spec.progress`: the messages it holds ready
/// (not yet delivered to any consumer), from a passive declare on a
/// channel of the watcher's own, while the consumer is consuming (so the
/// queues exist: a passive declare of a missing one makes the broker close
/// the channel). Ends when aborted.
async fn watch_lag(link: Arc<Link>, spec: Arc<Spec>) {
    let mut channel: Option<Channel> = None;
    loop {
        if !spec.active.load(Ordering::Relaxed) {
            tokio::time::sleep(FIRST_PERIOD).await;
            continue;
        }
        let mut all = true;
        for queue in &spec.queues {
            let open = match channel.take() {
                Some(c) if c.status().connected() => Ok(c),
                _ => link.channel().await,
            };
            let Ok(open) = open else {
                all = false;
                break;
            };
            match open
                .queue_declare(
                    queue,
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
            {
                Ok(found) => {
                    spec.progress
                        .set_lag(queue, 0, i64::from(found.message_count()));
                    channel = Some(open);
                }
                // A missing queue closes the channel: a new one next time.
                Err(_) => all = false,
            }
        }
        tokio::time::sleep(if all { LAG_PERIOD } else { FIRST_PERIOD }).await;
    }
}
