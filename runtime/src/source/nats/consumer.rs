//! One handler's JetStream consumer: a durable pull consumer per subject,
//! the ordered acknowledgement task, progress acknowledgements for what
//! the pipeline holds, and the lag watcher (the invariants are the
//! [parent](super)'s "Acknowledgements" and "Backpressure").

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::{self, Stream as Messages};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::AckKind;
use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use tokio::sync::mpsc;

use super::rescue::Rescuer;
use super::{KEY_HEADER, NatsConnection, NatsSettings, name_for, unpack_headers};
use crate::lock::Unpoisoned;
use crate::source::progress::Progress;
use crate::source::{Message, Position, Settled, Source, StartFrom, Subscription};

/// What a handler's consumer is.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Durable name (one topic) or prefix (`<durable>-<topic>`, several).
    pub durable: String,
    /// Subjects, wildcards allowed.
    pub topics: Vec<String>,
    /// Where a new consumer starts.
    pub start: StartFrom,
    /// The ack wait.
    pub ack_wait: Duration,
    /// Most unacknowledged messages out at once.
    pub max_ack_pending: usize,
    /// Where the durable's progress is kept (see [`progress`](crate::source::progress)).
    pub progress: Progress,
}

impl ConsumerSpec {
    /// The durable consumer name for topic number `index`.
    pub fn durable_for(&self, topic: &str) -> String {
        if self.topics.len() == 1 {
            self.durable.clone()
        } else {
            format!("{}-{}", self.durable, name_for(topic))
        }
    }
}

/// One delivered message: the handle to acknowledge it with.
pub struct NatsDelivery {
    pub(super) id: u64,
    /// Its ack subject (`$JS.ACK.…`).
    pub(super) reply: Subject,
    /// The index of its topic in the consumer's spec.
    pub(super) scope: u64,
}

/// A message the pipeline holds.
pub(super) struct Held {
    pub(super) reply: Subject,
    /// The index of its topic in the consumer's spec.
    pub(super) scope: u64,
    /// Its stream sequence.
    pub(super) sequence: u64,
}

/// A handler's JetStream consumers, read as one.
pub struct NatsConsumer {
    connection: NatsConnection,
    spec: ConsumerSpec,
    inbox: tokio::sync::Mutex<Inbox>,
    rescuer: Rescuer,
    acks: mpsc::UnboundedSender<Ack>,
    /// The keep-alive ticker, the ack sender and the lag watch.
    tasks: [tokio::task::JoinHandle<()>; 3],
}

/// Where [`NatsConsumer::recv`] takes messages from.
struct Inbox {
    /// The pull streams of every topic's consumer and the connection
    /// generation they were opened on (`None` until set up).
    pulled: Option<(SelectAll<Tagged>, u64)>,
    /// Messages the client could not read, read another way ([`rescue`](super::rescue)).
    rescued: mpsc::UnboundedReceiver<(Message, NatsDelivery)>,
}

/// What a pull stream yields.
type Pulled = Result<jetstream::Message, pull::MessagesError>;

/// Tags a pulled message with its topic's scope.
type Tag = Box<dyn FnMut(Pulled) -> (u64, Pulled) + Send + Sync>;

/// One topic's messages, tagged with the topic's scope.
type Tagged = futures_util::stream::Map<Messages, Tag>;

impl NatsConsumer {
    /// Creates (or finds) the streams and durable consumers, sweeps each for
    /// messages the client cannot read ([`Rescuer::sweep`], before anything
    /// is pulled: so one left by a stopped client is read another way
    /// before the server hands it to this client again), and opens their
    /// pull streams.
    async fn open(&self) -> anyhow::Result<SelectAll<Tagged>> {
        let mut all = SelectAll::new();
        for (index, topic) in self.spec.topics.iter().enumerate() {
            let stream_name = self.connection.stream_for(topic).await?;
            let stream = self
                .connection
                .js()
                .get_stream(&stream_name)
                .await
                .map_err(|err| anyhow::anyhow!("cannot open stream {stream_name:?}: {err}"))?;
            let durable = self.spec.durable_for(topic);
            let config = pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: topic.clone(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.spec.ack_wait,
                max_deliver: -1,
                max_ack_pending: i64::try_from(self.spec.max_ack_pending).unwrap_or(i64::MAX),
                deliver_policy: match self.spec.start {
                    StartFrom::Earliest => DeliverPolicy::All,
                    StartFrom::Latest => DeliverPolicy::New,
                },
                ..Default::default()
            };
            // Creates the durable, or updates it to this manifest's ack wait
            // and max_ack_pending. A change the server refuses (the deliver
            // policy of an existing durable) keeps the durable as it is.
            let mut consumer: jetstream::consumer::PullConsumer = match stream
                .create_consumer(config)
                .await
            {
                Ok(consumer) => consumer,
                Err(err) => {
                    let existing = stream.get_consumer(&durable).await.map_err(|_| {
                        anyhow::anyhow!(
                            "cannot create consumer {durable:?} on stream {stream_name:?}: {err}"
                        )
                    })?;
                    tracing::warn!(durable = %durable, stream = %stream_name, error = %err,
                            "the durable consumer cannot take this manifest's settings; using it as it is (delete it to start over)");
                    existing
                }
            };
            match consumer.info().await {
                Ok(info) => self.rescuer.sweep(index as u64, topic, info).await,
                Err(err) => tracing::warn!(durable = %durable, error = %err,
                    "cannot read the durable consumer's state; messages the client cannot read are looked for later"),
            }
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.spec.max_ack_pending.clamp(1, 256))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
                .map_err(|err| anyhow::anyhow!("cannot pull from consumer {durable:?}: {err}"))?;
            tracing::info!(durable = %durable, stream = %stream_name, subject = %topic, "consuming");
            let scope = index as u64;
            let tag: Tag = Box::new(move |item| (scope, item));
            all.push(messages.map(tag));
        }
        Ok(all)
    }

    fn decode(
        &self,
        scope: u64,
        message: jetstream::Message,
    ) -> Result<(Message, NatsDelivery), String> {
        let (stream, sequence, delivered, published) = {
            let info = message
                .info()
                .map_err(|err| format!("not a JetStream message: {err}"))?;
            (
                info.stream.to_string(),
                info.stream_sequence,
                u64::try_from(info.delivered).unwrap_or(1),
                i64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok(),
            )
        };
        let reply = message
            .reply
            .clone()
            .ok_or_else(|| "a JetStream message without an ack subject".to_string())?;
        let (message, _) = message.split();
        let mut headers = Vec::new();
        if let Some(map) = &message.headers {
            for (name, values) in map.iter() {
                for value in values {
                    headers.push((name.to_string(), value.as_str().as_bytes().to_vec()));
                }
            }
            headers.sort_by(|a, b| a.0.cmp(&b.0));
        }
        unpack_headers(&mut headers);
        let topic = message.subject.to_string();
        let key = key_of(&headers, &topic);
        let id = self.rescuer.next_delivery.fetch_add(1, Ordering::Relaxed);
        self.rescuer.held.locked().insert(
            id,
            Held {
                reply: reply.clone(),
                scope,
                sequence,
            },
        );
        Ok((
            Message {
                topic,
                key: Some(key),
                payload: message.payload.to_vec(),
                headers,
                timestamp_ms: published,
                position: Position::JetStream {
                    stream,
                    sequence,
                    delivered,
                },
                scope,
            },
            NatsDelivery { id, reply, scope },
        ))
    }
}

/// A message's key: its [`KEY_HEADER`], else its subject.
pub(super) fn key_of(headers: &[(String, Vec<u8>)], topic: &str) -> Vec<u8> {
    headers
        .iter()
        .find(|(n, v)| n == KEY_HEADER && !v.is_empty())
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| topic.as_bytes().to_vec())
}

impl Source for NatsConsumer {
    type Delivery = NatsDelivery;

    /// The next message of any of the handler's subjects, pulled or
    /// rescued. Until the server answers (and the streams and consumers
    /// exist) this waits, logging why, and tries again; when the client
    /// was replaced ([`NatsConnection`]) the pull streams are opened again
    /// on the new one.
    async fn recv(&self) -> Result<(Message, NatsDelivery), String> {
        let mut inbox = self.inbox.lock().await;
        let Inbox { pulled, rescued } = &mut *inbox;
        let mut backoff = Duration::from_millis(250);
        loop {
            if let Ok(found) = rescued.try_recv() {
                return Ok(found);
            }
            let generation = self.connection.generation();
            if pulled.as_ref().is_some_and(|(_, at)| *at != generation) {
                tracing::warn!(durable = %self.spec.durable, "pulling again on the new NATS client");
                *pulled = None;
            }
            let Some((open, _)) = pulled.as_mut() else {
                match self.open().await {
                    Ok(open) => *pulled = Some((open, generation)),
                    Err(err) => {
                        tracing::warn!(durable = %self.spec.durable, error = %format!("{err:#}"),
                            retry_in_ms = backoff.as_millis() as u64,
                            "cannot set up the JetStream consumer; trying again");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
                continue;
            };
            tokio::select! {
                biased;
                Some(found) = rescued.recv() => return Ok(found),
                next = open.next() => match next {
                    Some((scope, Ok(message))) => return self.decode(scope, message),
                    Some((_, Err(err))) => {
                        if self.connection.generation() != generation {
                            continue;
                        }
                        return Err(format!("JetStream consumer {}: {err}", self.spec.durable));
                    }
                    None => {
                        // Every pull stream ended (their consumer was
                        // deleted): set them up again.
                        tracing::warn!(durable = %self.spec.durable, "the JetStream consumer went away; setting it up again");
                        *pulled = None;
                    }
                },
                // A client replaced meanwhile: pull on the new one.
                () = self.connection.events.wake.notified() => {}
            }
        }
    }

    fn owns(&self, delivery: &NatsDelivery) -> bool {
        self.rescuer.held.locked().contains_key(&delivery.id)
    }

    /// Invariant: `+ACK` only for settled outcomes, which the pipeline
    /// reports only once they are durable.
    fn settle(&self, delivery: &NatsDelivery, outcome: Settled) {
        if self.rescuer.held.locked().remove(&delivery.id).is_none() {
            return;
        }
        let kind = match outcome {
            Settled::Done | Settled::DeadLettered => AckKind::Ack,
            Settled::Released => AckKind::Nak(Some(Duration::from_secs(1))),
        };
        let _ = self.acks.send(Ack {
            reply: delivery.reply.clone(),
            kind,
            scope: delivery.scope,
        });
    }

    /// Stops pulling, sends the acknowledgements still queued, and flushes
    /// them to the server.
    async fn close(self) {
        drop(self.inbox.into_inner());
        self.rescuer.held.locked().clear();
        let Self {
            connection,
            acks,
            tasks,
            spec,
            ..
        } = self;
        drop(acks);
        let [keepalive, acking, lag] = tasks;
        keepalive.abort();
        lag.abort();
        for topic in &spec.topics {
            spec.progress.forget(topic, 0);
        }
        // The ack sender ends once its queue is drained.
        if tokio::time::timeout(Duration::from_secs(5), acking)
            .await
            .is_err()
        {
            tracing::warn!(durable = %spec.durable, "acknowledgements still queued after 5 s; those messages are redelivered");
        }
        if let Err(err) = connection.client().flush().await {
            tracing::warn!(error = %err, "cannot flush the last acknowledgements; those messages are redelivered");
        }
    }
}

/// One settled message's acknowledgement, for [`send_acks`].
struct Ack {
    reply: Subject,
    kind: AckKind,
    /// The index of its topic in the consumer's spec.
    scope: u64,
}

/// Sends acknowledgements in the order they were settled, on the client in
/// use. An `Ack` sent advances its durable's ack floor (its committed
/// position): recorded in `spec.progress`.
async fn send_acks(
    connection: NatsConnection,
    mut queue: mpsc::UnboundedReceiver<Ack>,
    spec: ConsumerSpec,
) {
    while let Some(ack) = queue.recv().await {
        let acked = matches!(ack.kind, AckKind::Ack);
        match connection
            .client()
            .publish(ack.reply, ack.kind.into())
            .await
        {
            Ok(()) => {
                if acked
                    && let Some(topic) = usize::try_from(ack.scope)
                        .ok()
                        .and_then(|index| spec.topics.get(index))
                {
                    spec.progress.advanced(topic, 0);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot acknowledge a message; it will be redelivered and deduplicated")
            }
        }
    }
}

/// How often a durable's info is read from the server once it answers;
/// until then, every [`JOIN_PERIOD`].
const LAG_PERIOD: Duration = Duration::from_secs(5);
const JOIN_PERIOD: Duration = Duration::from_millis(500);

/// Keeps `spec.progress` current from each subject's durable consumer info:
/// joined while every durable exists and the server answers for it; the
/// lag is what the durable has not yet had acknowledged (pending plus
/// delivered and unacknowledged). After every (re)connection it also
/// sweeps each durable for messages the client cannot read
/// ([`Rescuer::sweep`]): the client drops its connection on one, so a
/// reconnection is when one may be pending. Ends when aborted.
async fn watch_lag(rescuer: Rescuer) {
    let Rescuer {
        connection, spec, ..
    } = &rescuer;
    let mut swept = 0;
    loop {
        let connects = connection.events.connects.load(Ordering::Relaxed);
        let mut missing = None;
        for (index, topic) in spec.topics.iter().enumerate() {
            let durable = spec.durable_for(topic);
            match durable_info(connection, topic, &durable).await {
                Ok(info) => {
                    let behind = info.num_pending + info.num_ack_pending as u64;
                    spec.progress
                        .set_lag(topic, 0, i64::try_from(behind).unwrap_or(i64::MAX));
                    if connects != swept {
                        rescuer.sweep(index as u64, topic, &info).await;
                    }
                }
                Err(why) => {
                    missing.get_or_insert(format!(
                        "JetStream consumer {durable:?} for {topic:?}: {why}"
                    ));
                }
            }
        }
        let period = match missing {
            None => {
                swept = connects;
                spec.progress.joined();
                LAG_PERIOD
            }
            Some(why) => {
                spec.progress.not_joined(why);
                JOIN_PERIOD
            }
        };
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = connection.events.wake.notified() => {}
        }
    }
}

/// The info of durable `durable` on the stream capturing `topic`.
async fn durable_info(
    connection: &NatsConnection,
    topic: &str,
    durable: &str,
) -> Result<jetstream::consumer::Info, String> {
    let js = connection.js();
    if connection.client().connection_state() != async_nats::connection::State::Connected {
        return Err("not connected to the server".to_string());
    }
    let stream_name = js
        .stream_by_subject(topic)
        .await
        .map_err(|err| format!("no stream: {err}"))?;
    let stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|err| format!("stream {stream_name:?}: {err}"))?;
    let mut consumer = stream
        .get_consumer::<pull::Config>(durable)
        .await
        .map_err(|err| format!("not set up: {err}"))?;
    consumer
        .info()
        .await
        .cloned()
        .map_err(|err| format!("no answer: {err}"))
}

/// Keeps every held message from being redelivered: a progress
/// acknowledgement each third of the ack wait, on the client in use.
async fn keep_alive(
    connection: NatsConnection,
    held: Arc<Mutex<HashMap<u64, Held>>>,
    ack_wait: Duration,
    durable: String,
) {
    let period = (ack_wait / 3).max(Duration::from_millis(500));
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        // Strong count 1: only this map holds it, the consumer is gone.
        if Arc::strong_count(&held) == 1 {
            return;
        }
        let replies: Vec<Subject> = held.locked().values().map(|h| h.reply.clone()).collect();
        let client = connection.client();
        for reply in replies {
            if let Err(err) = client.publish(reply, AckKind::Progress.into()).await {
                tracing::warn!(durable = %durable, error = %err, "cannot extend a held message's ack wait");
            }
        }
    }
}

impl ConsumerSpec {
    /// The durables of `subscription`: named by the manifest's `[nats]
    /// durable`, else after the group.
    pub fn of(subscription: &Subscription<NatsSettings>) -> Self {
        let settings = &subscription.settings;
        ConsumerSpec {
            durable: settings
                .durable
                .clone()
                .unwrap_or_else(|| name_for(&subscription.group)),
            topics: subscription.topics.clone(),
            start: subscription.start,
            ack_wait: settings.ack_wait,
            max_ack_pending: subscription.max_in_flight,
            progress: subscription.progress.clone(),
        }
    }
}

impl NatsConnection {
    /// A consumer of `spec`'s subjects for one handler.
    pub(super) fn consume(&self, spec: ConsumerSpec) -> NatsConsumer {
        let (acks, queue) = mpsc::unbounded_channel();
        let (rescued_tx, rescued) = mpsc::unbounded_channel();
        let held: Arc<Mutex<HashMap<u64, Held>>> = Arc::default();
        let rescuer = Rescuer {
            connection: self.clone(),
            spec: spec.clone(),
            held: held.clone(),
            next_delivery: Arc::default(),
            found: rescued_tx,
        };
        let keepalive = tokio::spawn(keep_alive(
            self.clone(),
            held.clone(),
            spec.ack_wait,
            spec.durable.clone(),
        ));
        let acking = tokio::spawn(send_acks(self.clone(), queue, spec.clone()));
        let lag = tokio::spawn(watch_lag(rescuer.clone()));
        NatsConsumer {
            connection: self.clone(),
            spec,
            inbox: tokio::sync::Mutex::new(Inbox {
                pulled: None,
                rescued,
            }),
            rescuer,
            acks,
            tasks: [keepalive, acking, lag],
        }
    }
}
