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
mod consumer;
mod publisher;
mod raw;
mod rescue;
pub mod rewind;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self, Context};
use serde::Deserialize;

use super::{Broker, BrokerKind, Rewind, Subscription};
use crate::lock::{Unpoisoned, UnpoisonedRw};

pub use consumer::{ConsumerSpec, NatsConsumer, NatsDelivery};
use consumer::{Held, key_of};
pub use publisher::NatsPublisher;
use publisher::unpack_headers;

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
