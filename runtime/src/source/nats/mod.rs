//! NATS JetStream through `async-nats`: one durable pull consumer per
//! handler topic (subject), and a publisher for dead letters and emitted
//! events.
//!
//! # Streams
//!
//! A subject no stream captures gets a stream of its own when Weir first
//! needs it (to consume it, or to publish a dead letter or an emitted event
//! to it): named after the subject with every character NATS does not allow
//! in names replaced by `_` (`orders` → `orders`, `orders.dlq` →
//! `orders_dlq`, `orders.>` → `orders__`), file storage, limits retention,
//! with the `[source.nats.streams]` settings. Existing streams are used as
//! they are.
//!
//! # Acknowledgements
//!
//! Explicit acks, only when the pipeline settles a message: `Done` and
//! `DeadLettered` send `+ACK`, `Released` a `-NAK` with a one-second delay
//! (so a consumer that is closing does not fetch it again). The server's
//! `max_deliver` is unlimited: Weir counts attempts itself (persisted) and
//! dead-letters.
//!
//! Invariant: a message the pipeline holds is never redelivered underneath
//! it. Every held delivery gets a progress acknowledgement (`+WPI`) every
//! third of the ack wait, so running calls and retry backoffs of any length
//! keep the message. A crashed process stops sending them, and the server
//! redelivers its messages one ack wait later.
//!
//! # Backpressure
//!
//! The consumer's `max_ack_pending` is the handler's `max_in_flight`: the
//! server never hands out more unacknowledged messages than the pipeline
//! may hold, so what the client buffered is always read promptly.
//!
//! # Keys and ids
//!
//! A message's key is its `ce-partitionkey` header (the CloudEvents
//! partitioning extension), else its subject; a manifest's `key` overrides
//! it. Messages published by Weir carry their key in `ce-partitionkey` and
//! their deterministic id as `Nats-Msg-Id`, so JetStream's duplicate window
//! drops a republished copy.
//!
//! # Headers
//!
//! A header NATS cannot carry as it is (a name that is not visible ASCII
//! or holds `:`, a value with a line break or that is not UTF-8: a Python
//! traceback in `weir.error`, a producer's binary header) is packed into
//! `weir.headers` ([`super::packed`]) when published and unpacked when
//! consumed, so a dead letter keeps every header of its message.

mod archive;
mod raw;
mod rescue;
pub mod rewind;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, Stream as Messages};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::{HeaderMap, Subject};
use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::packed::{PACKED, pack, unpack};
use super::progress::Progress;
use super::{
    Broker, BrokerKind, Message, Position, Publisher, Receipt, Refused, Rewind, Settled, Source,
    Subscription,
};
use crate::lock::{Unpoisoned, UnpoisonedRw};
use crate::source::StartFrom;
use rescue::Rescuer;

/// The header carrying a message's key (CloudEvents' `partitionkey`).
pub const KEY_HEADER: &str = "ce-partitionkey";

/// `[source.nats]`: NATS JetStream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSource {
    /// `nats://host:port[,nats://host:port…]`.
    pub url: String,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Authentication token.
    pub token: Option<String>,
    /// A `.creds` file (JWT + NKey seed), as issued by the operator.
    pub creds_file: Option<PathBuf>,
    /// An NKey seed (`SU…`).
    pub nkey: Option<String>,
    /// TLS settings.
    #[serde(default)]
    pub tls: NatsTls,
    /// How long one connection attempt may take.
    #[serde(default = "default_connect_timeout", with = "crate::parse::duration")]
    pub connect_timeout: Duration,
    /// Streams Weir creates for subjects no stream captures.
    #[serde(default)]
    pub streams: NatsStreams,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `[source.nats.tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// Refuse a connection without TLS.
    #[serde(default)]
    pub required: bool,
    /// CA certificate (PEM) to trust, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for mutual TLS (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), for mutual TLS (with `cert_file`).
    pub key_file: Option<PathBuf>,
}

/// `[source.nats.streams]`: how the streams Weir creates are configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsStreams {
    /// `file` or `memory`.
    pub storage: String,
    /// Oldest message kept (`"7d"`); `"0s"` keeps messages until other
    /// limits apply.
    #[serde(with = "crate::parse::duration")]
    pub max_age: Duration,
    /// Replicas (1 on a single server, up to 5 in a cluster).
    pub replicas: usize,
    /// How long JetStream remembers message ids to drop republished
    /// duplicates.
    #[serde(with = "crate::parse::duration")]
    pub duplicate_window: Duration,
}

impl Default for NatsStreams {
    fn default() -> Self {
        Self {
            storage: "file".into(),
            max_age: Duration::ZERO,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// `[nats]` in a handler's manifest: how its JetStream consumers behave.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Durable consumer name; default: `group` with characters NATS does
    /// not allow in names replaced by `_` (`weir.orders` → `weir_orders`).
    pub durable: Option<String>,
    /// How long the server waits for an acknowledgement before redelivering.
    /// Messages Weir holds (running, waiting for a retry) are kept alive
    /// with progress acknowledgements, so this only bounds how soon a
    /// message held by a crashed process is redelivered.
    #[serde(with = "crate::parse::duration")]
    pub ack_wait: Duration,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            durable: None,
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// `[source.nats]`, resolved for the client.
#[derive(Debug, Clone)]
struct Resolved {
    /// Server URLs, comma-separated.
    pub url: String,
    /// User name and password.
    pub user: Option<(String, String)>,
    /// Authentication token.
    pub token: Option<String>,
    /// A `.creds` file (JWT and NKey seed).
    pub creds_file: Option<std::path::PathBuf>,
    /// An NKey seed.
    pub nkey: Option<String>,
    /// Require TLS.
    pub tls_required: bool,
    /// CA certificate (PEM) to trust.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM), for mutual TLS.
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// Streams Weir creates.
    pub streams: StreamSettings,
}

impl From<&NatsSource> for Resolved {
    fn from(source: &NatsSource) -> Self {
        let source = source.clone();
        Resolved {
            url: source.url,
            user: source.user.zip(source.password),
            token: source.token,
            creds_file: source.creds_file,
            nkey: source.nkey,
            tls_required: source.tls.required,
            tls_ca_file: source.tls.ca_file,
            tls_client: source.tls.cert_file.zip(source.tls.key_file),
            connect_timeout: source.connect_timeout,
            streams: StreamSettings {
                memory: source.streams.storage == "memory",
                max_age: source.streams.max_age,
                replicas: source.streams.replicas,
                duplicate_window: source.streams.duplicate_window,
            },
        }
    }
}

/// How the streams Weir creates are configured.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// `file` (default) or `memory`.
    pub memory: bool,
    /// Oldest message kept; zero keeps them until the limits.
    pub max_age: Duration,
    /// Replicas (1 on a single server).
    pub replicas: usize,
    /// How long JetStream remembers `Nats-Msg-Id`s to drop duplicates.
    pub duplicate_window: Duration,
}

/// A connection to a NATS server with JetStream.
///
/// The client behind it is replaced when it stops for good: `async-nats`'s
/// connection task ends when it panics (on a header value with a carriage
/// return, see [`raw`]), after which every call fails. A supervisor notices
/// that within [`SUPERVISE_PERIOD`] and connects again; consumers then open
/// their pull streams again, after a [`rescue`] sweep.
#[derive(Clone)]
pub struct NatsConnection {
    live: Arc<RwLock<Live>>,
    events: Arc<Events>,
    streams: StreamSettings,
    /// Subjects known to be captured by a stream.
    covered: Arc<Mutex<HashSet<String>>>,
}

/// The client in use.
struct Live {
    client: async_nats::Client,
    js: Context,
    /// How many clients came before this one.
    generation: u64,
}

/// What consumers learn of the connection: every (re)connection counts.
#[derive(Default)]
struct Events {
    connects: AtomicU64,
    wake: tokio::sync::Notify,
}

impl Events {
    fn connected(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_waiters();
    }
}

/// How often the supervisor checks that the client still runs.
const SUPERVISE_PERIOD: Duration = Duration::from_secs(1);

/// Whether `subject` is a NATS subject: `.`-separated non-empty tokens
/// without whitespace; with `wildcards`, `*` may stand for a token and `>`
/// for the rest. Why not, in words.
///
/// # Errors
///
/// Saying what a subject may hold.
pub fn check_subject(subject: &str, wildcards: bool) -> Result<(), String> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let valid = subject.len() <= 1024
        && tokens.iter().enumerate().all(|(i, token)| {
            !token.is_empty()
                && !token.chars().any(char::is_whitespace)
                && match *token {
                    "*" => wildcards,
                    ">" => wildcards && i == tokens.len() - 1,
                    other => !other.contains(['*', '>']),
                }
        });
    match (valid, wildcards) {
        (true, _) => Ok(()),
        (false, true) => Err(format!(
            "{subject:?} is not a valid NATS subject (tokens separated by '.', no spaces; '*' and '>' only as whole tokens, '>' last)"
        )),
        (false, false) => Err(format!(
            "{subject:?} is not a valid NATS subject (no wildcards)"
        )),
    }
}

/// A stream or consumer name for `subject`: characters NATS does not allow
/// in names become `_`.
pub fn name_for(subject: &str) -> String {
    subject
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A client for `settings`; while the server is unreachable it keeps
/// trying in the background (every failure is logged).
async fn open_client(
    settings: &Resolved,
    events: Arc<Events>,
) -> anyhow::Result<async_nats::Client> {
    let url = settings.url.clone();
    let tls = settings.tls_required
        || settings.tls_ca_file.is_some()
        || settings
            .url
            .split(',')
            .any(|u| u.trim().starts_with("tls://"));
    let mut options = async_nats::ConnectOptions::new()
        .name("weir")
        .connection_timeout(settings.connect_timeout)
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let url = url.clone();
            let events = events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(url, "connected to NATS");
                        events.connected();
                    }
                    async_nats::Event::Disconnected => tracing::warn!(url,
                        "disconnected from NATS; reconnecting (nothing is acknowledged meanwhile)"),
                    async_nats::Event::Closed => tracing::info!(url, "NATS connection closed"),
                    // The driver reports a failed TLS handshake (a
                    // certificate that does not verify) as "TLS error"
                    // or "IO error", without its cause.
                    async_nats::Event::ClientError(err) if tls => tracing::error!(url, error = %err,
                        "cannot reach NATS over TLS: the connection or the TLS handshake failed (is the server's certificate signed by [source.nats.tls] ca_file or a CA the system trusts, and does it name the host?); retrying with backoff (nothing is consumed or acknowledged meanwhile)"),
                    async_nats::Event::ClientError(err) => tracing::warn!(url, error = %err,
                        "cannot reach NATS; retrying with backoff (nothing is consumed or acknowledged meanwhile)"),
                    other => tracing::warn!(url, event = %other, "NATS connection event"),
                }
            }
        });
    if let Some((user, password)) = &settings.user {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &settings.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &settings.nkey {
        options = options.nkey(seed.clone());
    }
    if let Some(path) = &settings.creds_file {
        options = options.credentials_file(path).await.map_err(|err| {
            anyhow::anyhow!(
                "[source.nats] creds_file {}: cannot read it: {err}",
                path.display()
            )
        })?;
    }
    if settings.tls_required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &settings.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &settings.tls_client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    options.connect(settings.url.as_str()).await.map_err(|err| {
        anyhow::anyhow!(
            "[source.nats] url {:?}: cannot connect: {err}",
            settings.url
        )
    })
}

/// Replaces the client of `live` when its connection task has ended (its
/// command channel is closed: a call fails at once, where a client that
/// is only disconnected queues it). Ends when the connection is dropped.
async fn supervise(live: Weak<RwLock<Live>>, events: Arc<Events>, settings: Resolved) {
    loop {
        tokio::time::sleep(SUPERVISE_PERIOD).await;
        let Some(cell) = live.upgrade() else {
            return;
        };
        let client = cell.read_locked().client.clone();
        drop(cell);
        let stopped = matches!(
            tokio::time::timeout(SUPERVISE_PERIOD, client.server_pool()).await,
            Ok(Err(_))
        );
        if !stopped {
            continue;
        }
        tracing::error!(url = %settings.url,
            "the NATS client stopped (its connection task ended, as it does on a message it cannot read); connecting again");
        match open_client(&settings, events.clone()).await {
            Ok(client) => {
                let Some(cell) = live.upgrade() else {
                    return;
                };
                let mut live = cell.write_locked();
                live.js = jetstream::new(client.clone());
                live.client = client;
                live.generation += 1;
                drop(live);
                events.connected();
            }
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "cannot connect to NATS again; trying later")
            }
        }
    }
}

impl NatsConnection {
    /// Connects; while the server is unreachable the client keeps trying in
    /// the background (every failure is logged), so Weir starts either way
    /// and consumes once the server answers.
    ///
    /// # Errors
    ///
    /// When the options are unusable (an unreadable credentials file).
    pub async fn connect(source: &NatsSource) -> anyhow::Result<Self> {
        let settings = &Resolved::from(source);
        let events = Arc::new(Events::default());
        let client = open_client(settings, events.clone()).await?;
        let js = jetstream::new(client.clone());
        let live = Arc::new(RwLock::new(Live {
            client,
            js,
            generation: 0,
        }));
        tokio::spawn(supervise(
            Arc::downgrade(&live),
            events.clone(),
            settings.clone(),
        ));
        Ok(Self {
            live,
            events,
            streams: settings.streams.clone(),
            covered: Arc::default(),
        })
    }

    /// The client in use.
    fn client(&self) -> async_nats::Client {
        self.live.read_locked().client.clone()
    }

    /// JetStream on the client in use.
    fn js(&self) -> Context {
        self.live.read_locked().js.clone()
    }

    /// How many clients came before the one in use.
    fn generation(&self) -> u64 {
        self.live.read_locked().generation
    }

    /// The stream capturing `subject`, created when there is none.
    async fn stream_for(&self, subject: &str) -> anyhow::Result<String> {
        self.stream_with(subject, self.streams.max_age).await
    }

    /// Makes sure a stream captures dead-letter subject `subject`: when none
    /// does and `create` is set, creates one keeping messages for
    /// `retention`. Returns whether it created one.
    ///
    /// # Errors
    ///
    /// When none exists and may not be created, or the server refuses.
    async fn ensure_dead_letter_stream(
        &self,
        subject: &str,
        retention: Duration,
        create: bool,
    ) -> anyhow::Result<bool> {
        if self.js().stream_by_subject(subject).await.is_ok() {
            self.covered.locked().insert(subject.to_string());
            return Ok(false);
        }
        if !create {
            anyhow::bail!(
                "no stream captures dead-letter subject {subject:?} and [dlq] create = false: create one (or allow Weir to)"
            );
        }
        self.stream_with(subject, retention).await?;
        Ok(true)
    }

    async fn stream_with(&self, subject: &str, max_age: Duration) -> anyhow::Result<String> {
        if let Ok(name) = self.js().stream_by_subject(subject).await {
            self.covered.locked().insert(subject.to_string());
            return Ok(name);
        }
        let name = name_for(subject);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subject.to_string()],
            storage: if self.streams.memory {
                StorageType::Memory
            } else {
                StorageType::File
            },
            max_age,
            num_replicas: self.streams.replicas,
            duplicate_window: self.streams.duplicate_window,
            ..Default::default()
        };
        self.js()
            .get_or_create_stream(config)
            .await
            .map_err(|err| {
                anyhow::anyhow!("cannot create stream {name:?} for subject {subject:?}: {err}")
            })?;
        tracing::info!(stream = %name, subject, "created a stream for the subject");
        self.covered.locked().insert(subject.to_string());
        Ok(name)
    }

    /// A consumer of `spec`'s subjects for one handler.
    fn consume(&self, spec: ConsumerSpec) -> NatsConsumer {
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
    /// Where the durable's progress is kept (see `source/progress.rs`).
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
    id: u64,
    /// Its ack subject (`$JS.ACK.…`).
    reply: Subject,
    /// The index of its topic in the consumer's spec.
    scope: u64,
}

/// A message the pipeline holds.
pub(super) struct Held {
    reply: Subject,
    /// The index of its topic in the consumer's spec.
    scope: u64,
    /// Its stream sequence.
    sequence: u64,
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
    /// Messages the client could not read, read another way ([`rescue`]).
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
fn key_of(headers: &[(String, Vec<u8>)], topic: &str) -> Vec<u8> {
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

/// Whether NATS carries a header of this name and value as it is:
/// `async-nats` asserts that a name is visible ASCII without `:` and that a
/// value has no CR or LF, and its values are text. A `Nats-*` header is
/// an instruction to the server (`Nats-Expected-Stream`, `Nats-Rollup`,
/// `Nats-TTL`, …) or its note on a stored message (`Nats-Sequence`), never
/// Weir's to give: one copied from a consumed message onto its dead letter
/// would make the server refuse or alter that publish, so it travels
/// packed like the others. (Weir's own `Nats-Msg-Id` is set after.)
fn carried<'a>(name: &str, value: &'a [u8]) -> Option<&'a str> {
    let name_ok = !name.is_empty()
        && name != PACKED
        && !name
            .get(..5)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("nats-"))
        && name.chars().all(|c| c.is_ascii_graphic() && c != ':');
    let value = std::str::from_utf8(value).ok()?;
    (name_ok && !value.contains(['\r', '\n'])).then_some(value)
}

/// The headers of a message to publish, with `key` as [`KEY_HEADER`] (when
/// the headers have none) and `id` as `Nats-Msg-Id`.
///
/// Invariant: nothing here can panic, whatever the bytes: headers NATS
/// cannot carry as they are (see [`carried`]) are packed into
/// [`PACKED`] (see [`crate::source::packed`]) and unpacked again by
/// [`unpack_headers`] on receive; an id with a line break is
/// percent-encoded (`%0A`, `%0D`, `%25`), which keeps distinct ids
/// distinct.
fn header_map(headers: &[(String, Vec<u8>)], key: Option<&[u8]>, id: Option<&str>) -> HeaderMap {
    let mut map = HeaderMap::new();
    let mut packed: Vec<(&str, &[u8])> = Vec::new();
    for (name, value) in headers {
        // Replaced by the id given, as the insert below always did.
        if id.is_some() && name == "Nats-Msg-Id" {
            continue;
        }
        match carried(name, value) {
            Some(text) => map.append(name.as_str(), text),
            None => packed.push((name.as_str(), value.as_slice())),
        }
    }
    if let Some(key) = key
        && !headers.iter().any(|(name, _)| name == KEY_HEADER)
    {
        match carried(KEY_HEADER, key) {
            Some(text) => map.insert(KEY_HEADER, text),
            None => packed.push((KEY_HEADER, key)),
        }
    }
    if !packed.is_empty() {
        map.insert(PACKED, pack(&packed).as_str());
    }
    if let Some(id) = id {
        if id.contains(['\r', '\n']) {
            let encoded = id
                .replace('%', "%25")
                .replace('\r', "%0D")
                .replace('\n', "%0A");
            map.insert("Nats-Msg-Id", encoded.as_str());
        } else {
            map.insert("Nats-Msg-Id", id);
        }
    }
    map
}

/// Replaces a [`PACKED`] header Weir wrote with the headers it holds, after
/// the others; one that is not Weir's packing stays as it came.
fn unpack_headers(headers: &mut Vec<(String, Vec<u8>)>) {
    let Some(at) = headers.iter().position(|(name, _)| name == PACKED) else {
        return;
    };
    if let Some(pairs) = unpack(&headers[at].1) {
        headers.remove(at);
        headers.extend(pairs);
    }
}

/// Publishes dead letters and emitted events to JetStream subjects.
#[derive(Clone)]
pub struct NatsPublisher {
    connection: NatsConnection,
}

impl Publisher for NatsPublisher {
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
        id: Option<&str>,
    ) -> anyhow::Result<Receipt> {
        let map = header_map(headers, key, id);
        let payload = bytes::Bytes::copy_from_slice(payload);
        let covered = self.connection.covered.locked().contains(topic);
        if !covered {
            self.connection.stream_for(topic).await?;
        }
        let ack = self
            .connection
            .js()
            .publish_with_headers(topic.to_string(), map, payload)
            .await
            .map_err(|err| {
                if err.kind() == PublishErrorKind::MaxPayloadExceeded {
                    anyhow::Error::new(Refused(format!("publish to {topic:?}: {err}")))
                } else {
                    anyhow::anyhow!("publish to {topic:?} failed: {err}")
                }
            })?;
        match ack.await {
            Ok(ack) => Ok(Receipt {
                partition: 0,
                offset: i64::try_from(ack.sequence).unwrap_or(i64::MAX),
            }),
            Err(err) => {
                if err.kind() == PublishErrorKind::StreamNotFound {
                    // The stream went away since: the caller's next try
                    // makes it again.
                    self.connection.covered.locked().remove(topic);
                }
                Err(anyhow::anyhow!(
                    "publish to {topic:?} not acknowledged: {err}"
                ))
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

impl Broker for NatsConnection {
    type Settings = NatsSettings;
    type Consumer = NatsConsumer;
    type Publisher = NatsPublisher;
    type Archive = NatsConnection;

    fn kind(&self) -> BrokerKind {
        BrokerKind::Nats
    }

    fn consumer(&self, subscription: Subscription<NatsSettings>) -> anyhow::Result<NatsConsumer> {
        Ok(self.consume(ConsumerSpec::of(&subscription)))
    }

    fn publisher(&self) -> NatsPublisher {
        NatsPublisher {
            connection: self.clone(),
        }
    }

    async fn ensure_dead_letters(
        &self,
        dlq: &str,
        _origin: &str,
        retention: Duration,
        create: bool,
    ) -> anyhow::Result<Option<i32>> {
        let created = self
            .ensure_dead_letter_stream(dlq, retention, create)
            .await?;
        Ok(created.then_some(1))
    }

    async fn depth(&self, topic: &str) -> anyhow::Result<super::Depth> {
        <Self as super::Archive>::depth(self, topic).await
    }

    async fn rewind(
        &self,
        subscription: &Subscription<NatsSettings>,
        from: Rewind,
        apply: bool,
    ) -> anyhow::Result<Vec<String>> {
        let verb = if apply { "" } else { "would " };
        let moves = self
            .rewind_durables(&ConsumerSpec::of(subscription), from, apply)
            .await?;
        Ok(moves
            .into_iter()
            .map(|m| {
                let now = m.acked.map_or_else(
                    || "no consumer yet".to_string(),
                    |s| format!("acknowledged up to stream sequence {s}"),
                );
                format!(
                    "{verb}restart consumer {} of {} ({now}) from {}",
                    m.durable, m.topic, m.to
                )
            })
            .collect())
    }

    fn archive(&self) -> anyhow::Result<Self> {
        Ok(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect()
    }

    /// Every value `async-nats` would assert on is packed instead, and
    /// reading the map back gives every header again.
    #[test]
    fn headers_nats_cannot_carry_are_packed_not_asserted_on() {
        let sent = owned(&[
            ("fine", b"v"),
            ("weir.error", b"Traceback:\n  line 1\r\nValueError"),
            ("with space", b"x"),
            ("colon:name", b"x"),
            ("binary", &[0xff, 0]),
            ("", b"empty name"),
            ("Nats-Expected-Stream", b"orders"),
            ("nats-rollup", b"sub"),
        ]);
        let map = header_map(&sent, Some(b"key\nwith break"), Some("id\n1%"));
        assert_eq!(map.get("fine").map(|v| v.as_str()), Some("v"));
        // A producer's instructions to the server never reach it.
        assert!(map.get("Nats-Expected-Stream").is_none());
        assert!(map.get("nats-rollup").is_none());
        assert_eq!(
            map.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some("id%0A1%25")
        );
        let mut back: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, values) in map.iter() {
            for value in values {
                back.push((name.to_string(), value.as_str().as_bytes().to_vec()));
            }
        }
        back.retain(|(name, _)| name != "Nats-Msg-Id");
        unpack_headers(&mut back);
        let mut want = sent.clone();
        want.push((KEY_HEADER.into(), b"key\nwith break".to_vec()));
        want.sort();
        back.sort();
        assert_eq!(back, want);
    }

    /// A producer's own `weir.headers` that is not Weir's packing is kept.
    #[test]
    fn a_foreign_packed_header_is_kept_as_it_came() {
        let mut headers = owned(&[(PACKED, b"not json"), ("a", b"b")]);
        unpack_headers(&mut headers);
        assert_eq!(headers, owned(&[(PACKED, b"not json"), ("a", b"b")]));
        let carried_key = header_map(&[], Some(b"plain"), None);
        assert_eq!(
            carried_key.get(KEY_HEADER).map(|v| v.as_str()),
            Some("plain")
        );
        assert!(carried_key.get(PACKED).is_none());
    }
}
