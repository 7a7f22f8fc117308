//! Redis Streams through the `redis` crate: one consumer group per handler
//! (`XREADGROUP`), a publisher for dead letters and emitted events
//! (`XADD`), and the dead-letter tools' reads (`XRANGE`, `XDEL`).
//!
//! # Entries
//!
//! A stream entry is a list of fields. Weir reads field `payload` as the
//! message's payload and field `key` as its key; every other field is a
//! header. An entry without a `payload` field (written by a tool that knows
//! nothing of Weir) is handed over as a JSON object of all its fields, the
//! values as text. The key is the `key` field, else the `ce-partitionkey`
//! field, else the stream's name; a manifest's `key` overrides it. Weir
//! writes entries the same way: `key`, `payload`, then one field per header
//! (a header called `key`, `payload` or `weir.headers` travels packed in
//! `weir.headers`, see [`super::packed`], and is unpacked on receive).
//!
//! # Acknowledgements
//!
//! Invariant: `XACK` only for settled outcomes (`Done`, `DeadLettered`),
//! which the pipeline reports only once they are durable. A `Released`
//! entry stays in the group's pending list, and comes back once it has been
//! idle for `claim_idle` (see below), to this process or another.
//!
//! # Pending entries of dead consumers
//!
//! An entry read by a consumer that then died stays pending under that
//! consumer's name. Each consumer runs `XAUTOCLAIM` every half `claim_idle`
//! (the manifest's `[redis] claim_idle`, default 30 s): entries idle that
//! long, whoever holds them, become its own and are handled (the dedup
//! marks catch what the dead consumer had finished but not acknowledged).
//!
//! Invariant: a message the pipeline holds is never claimed underneath it.
//! Every third of `claim_idle` the consumer resets the idle time of every
//! entry it holds (`XCLAIM … JUSTID` of its own pending entries, found with
//! `XPENDING`). An entry that is no longer in its pending list (a stall
//! longer than `claim_idle` let another consumer claim it) is no longer
//! owned: the pipeline stops working on it and acknowledges nothing for it.
//!
//! # Backpressure
//!
//! A read asks for at most the free part of `max_in_flight` (up to 256), and
//! nothing is read while the pipeline is full: entries wait in the stream,
//! not in memory.
//!
//! # Ids and order
//!
//! A stream is one ordered log (one scope per stream): the entry ID
//! (`<ms>-<seq>`) is the position, and `<stream>/<entry-id>` the event id of
//! an entry without an id header. Per-key order holds within a consumer;
//! across processes sharing a group, Redis hands entries to whichever
//! consumer reads first, so per-key order across processes needs one
//! consumer per group (see the README).

mod archive;
mod consumer;
mod entry;
mod publisher;
mod rewind;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;

use super::{Broker, BrokerKind, Rewind};
use super::{Depth, Subscription};
use crate::lock::Unpoisoned;
use crate::parse::duration;

pub use consumer::{RedisConsumer, RedisDelivery};
pub use publisher::RedisPublisher;

/// `[source.redis]`: the Redis server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSource {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// This process's consumer name in every group. Default
    /// `<host>-<pid>`: unique per process, so two processes never share a
    /// pending list. A fixed name lets a restarted process take up its own
    /// pending entries at once instead of after `claim_idle`; never give
    /// two running processes the same one.
    pub consumer: Option<String>,
    /// Streams Weir writes to (dead letters, emitted events) are trimmed to
    /// about this many entries (`XADD … MAXLEN ~`); unset: not trimmed by
    /// length.
    pub maxlen: Option<u64>,
    /// How long one connection attempt may take.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// TLS for a `rediss://` URL: whom to trust, and a client certificate.
    #[serde(default)]
    pub tls: RedisTls,
}

/// `[source.redis.tls]`: used with a `rediss://` URL (without this table,
/// a `rediss://` server's certificate must be signed by a CA the system
/// trusts and name the host).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTls {
    /// CA certificates (PEM) to trust instead of the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for servers that ask for one
    /// (`tls-auth-clients yes`), with `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    /// Client key (PEM), with `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
}

impl RedisTls {
    fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// The certificates as the driver takes them.
    fn certificates(&self) -> Result<redis::TlsCertificates, String> {
        let read = |key: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|err| {
                format!(
                    "[source.redis.tls] {key}: cannot read {}: {err}",
                    path.display()
                )
            })
        };
        let client_tls = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("cert_file", cert)?,
                client_key: read("key_file", key)?,
            }),
            _ => None,
        };
        let root_cert = match &self.ca_file {
            Some(path) => Some(read("ca_file", path)?),
            None => None,
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl RedisSource {
    /// Checks the table, naming the key that is wrong.
    ///
    /// # Errors
    ///
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        redis::Client::open(self.url.as_str())
            .map_err(|err| format!("[source.redis] url {}: {err}", redacted(&self.url)))?;
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err("[source.redis.tls] cert_file, key_file: set both or neither".into());
        }
        if self.tls.is_set() && !self.url.starts_with("rediss://") {
            return Err(
                "[source.redis.tls]: TLS settings need a rediss:// url in [source.redis] url"
                    .into(),
            );
        }
        if self.consumer.as_deref().is_some_and(str::is_empty) {
            return Err("[source.redis] consumer: must not be empty".into());
        }
        if self.maxlen == Some(0) {
            return Err("[source.redis] maxlen: must be at least 1 (or unset)".into());
        }
        Ok(())
    }
}

/// The manifest's `[redis]` table: how this handler's consumer behaves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// How long an entry must have been pending, unacknowledged, before
    /// another consumer of the group claims it (`XAUTOCLAIM`): how soon the
    /// entries of a crashed process are handled again. Entries this process
    /// holds are kept from being claimed however long they run.
    #[serde(with = "duration")]
    pub claim_idle: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            claim_idle: Duration::from_secs(30),
        }
    }
}

/// Whether `name` can name a stream Weir reads: any non-empty key without
/// control characters.
///
/// # Errors
///
/// Saying why not.
pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a stream name must not be empty".into());
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "{name:?} has control characters; use a plain Redis key"
        ));
    }
    Ok(())
}

/// A connection to a Redis server: the shared, auto-reconnecting
/// connection for acknowledgements, publications and questions, made on
/// first use (so Weir starts while Redis is down, and consumes once it
/// answers).
#[derive(Clone)]
pub struct RedisConnection {
    client: redis::Client,
    url: String,
    consumer: String,
    maxlen: Option<u64>,
    connect_timeout: Duration,
    shared: Arc<tokio::sync::Mutex<Option<ConnectionManager>>>,
    /// Dead-letter streams and how long they keep entries (`XADD … MINID ~`).
    retention: Arc<Mutex<HashMap<String, Duration>>>,
}

impl RedisConnection {
    /// Prepares a connection (made on first use).
    ///
    /// # Errors
    ///
    /// When the URL is unusable.
    pub async fn connect(source: &RedisSource) -> anyhow::Result<Self> {
        let client = if source.tls.is_set() {
            let certificates = source.tls.certificates().map_err(anyhow::Error::msg)?;
            redis::Client::build_with_tls(source.url.as_str(), certificates)
        } else {
            redis::Client::open(source.url.as_str())
        }
        .map_err(|err| anyhow::anyhow!("[source.redis] url {}: {err}", redacted(&source.url)))?;
        let consumer = source.consumer.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "weir".into());
            format!("{host}-{}", std::process::id())
        });
        Ok(Self {
            client,
            url: redacted(&source.url),
            consumer,
            maxlen: source.maxlen,
            connect_timeout: source.connect_timeout,
            shared: Arc::default(),
            retention: Arc::default(),
        })
    }

    /// A new auto-reconnecting connection whose replies may take up to
    /// `response` (a blocking read needs its own).
    async fn open(&self, response: Duration) -> anyhow::Result<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(response))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        self.client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|err| anyhow::anyhow!("cannot connect to Redis at {}: {err}", self.url))
    }

    /// The shared connection.
    async fn shared(&self) -> anyhow::Result<ConnectionManager> {
        let mut shared = self.shared.lock().await;
        if let Some(connection) = shared.as_ref() {
            return Ok(connection.clone());
        }
        let connection = self.open(Duration::from_secs(10)).await?;
        tracing::info!(url = %self.url, consumer = %self.consumer, "connected to Redis");
        *shared = Some(connection.clone());
        Ok(connection)
    }
}

impl Broker for RedisConnection {
    type Settings = RedisSettings;
    type Consumer = RedisConsumer;
    type Publisher = RedisPublisher;
    type Archive = RedisConnection;

    fn kind(&self) -> BrokerKind {
        BrokerKind::Redis
    }

    /// A consumer of `subscription`'s streams for one handler.
    fn consumer(&self, subscription: Subscription<RedisSettings>) -> anyhow::Result<RedisConsumer> {
        Ok(RedisConsumer::new(self.clone(), subscription))
    }

    /// A publisher on this connection.
    fn publisher(&self) -> RedisPublisher {
        RedisPublisher::new(self.clone())
    }

    /// Makes sure dead letters can go to stream `dlq`: Redis makes a stream
    /// on its first entry, so with `create` there is nothing to do but to
    /// remember `retention` (entries older than it are trimmed as new ones
    /// are added); without, the stream must exist already. Returns `false`:
    /// nothing is created ahead.
    ///
    /// # Errors
    ///
    /// When `create` is off and the stream does not exist, or Redis cannot
    /// be asked.
    async fn ensure_dead_letters(
        &self,
        dlq: &str,
        _origin: &str,
        retention: Duration,
        create: bool,
    ) -> anyhow::Result<Option<i32>> {
        if !create {
            let mut connection = self.shared().await?;
            let exists: i64 = redis::cmd("EXISTS")
                .arg(dlq)
                .query_async(&mut connection)
                .await
                .map_err(|err| anyhow::anyhow!("cannot ask Redis for stream {dlq:?}: {err}"))?;
            if exists == 0 {
                anyhow::bail!(
                    "stream {dlq:?} does not exist and [dlq] create = false: create it (XADD or XGROUP CREATE … MKSTREAM), or allow Weir to"
                );
            }
        }
        if !retention.is_zero() {
            self.retention.locked().insert(dlq.to_string(), retention);
        }
        Ok(None)
    }

    /// How many entries `topic` holds and when the oldest was written.
    ///
    /// # Errors
    ///
    /// When Redis cannot be asked.
    async fn depth(&self, topic: &str) -> anyhow::Result<Depth> {
        <Self as super::Archive>::depth(self, topic).await
    }

    async fn rewind(
        &self,
        subscription: &Subscription<Self::Settings>,
        from: Rewind,
        apply: bool,
    ) -> anyhow::Result<Vec<String>> {
        self.rewind_group(&subscription.topics, &subscription.group, from, apply)
            .await
    }

    fn archive(&self) -> anyhow::Result<Self> {
        Ok(self.clone())
    }
}

/// `url` without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_and_passwords_kept_out_of_logs() {
        let source = |url: &str| RedisSource {
            url: url.into(),
            consumer: None,
            maxlen: None,
            connect_timeout: default_connect_timeout(),
            tls: RedisTls::default(),
        };
        assert!(source("redis://127.0.0.1:6379").validate().is_ok());
        assert!(source("rediss://127.0.0.1:6379").validate().is_ok());
        let err = source("redis://:hunter2hunter@x:notaport")
            .validate()
            .expect_err("port");
        assert!(!err.contains("hunter2hunter"), "{err}");
        let err = source("http://x").validate().expect_err("scheme");
        assert!(err.contains("[source.redis] url"), "{err}");
        assert_eq!(
            redacted("redis://user:secret@host:6379/0"),
            "redis://…@host:6379/0"
        );
        assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
        assert!(check_stream_name("orders").is_ok());
        assert!(check_stream_name("").is_err());
        assert!(check_stream_name("a\nb").is_err());
    }
}
