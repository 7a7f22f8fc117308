//! The handler manifest: `<name>.toml` beside `<name>.wasm`.
//!
//! Broker-neutral where it can be: `topics` are Kafka topics or NATS
//! subjects, `group` is the consumer group or the durable consumer's name.
//! Settings only one broker understands live in that broker's table
//! (`[nats]`), and a table for another broker than the one configured is an
//! error that names it.
//!
//! ```toml
//! topics = ["orders"]          # required: topics (Kafka) or subjects (NATS, wildcards allowed)
//! group = "weir.orders"        # consumer group / durable name; default weir.<name>
//! start = "earliest"           # where a new group starts: earliest | latest
//! ordering = "key"             # key | partition | none
//! key = ["header:customer"]    # where the key comes from; default: the broker's own
//! max_in_flight = 256          # messages held at once (running + waiting)
//!
//! [nats]
//! ack_wait = "30s"             # JetStream ack wait; held messages are kept alive
//!
//! [dedup]
//! id = ["header:ce_id", "header:event_id", "header:Nats-Msg-Id"]   # or "json:/pointer"; then the position
//! ttl = "7d"
//!
//! [retry]
//! max_attempts = 5
//! initial_delay = "1s"
//! multiplier = 2.0
//! max_delay = "60s"
//! jitter = 0.2
//! # or an explicit schedule, then the dead letter (replaces the four above):
//! # delays = ["1s", "5s", "30s"]
//!
//! [limits]
//! memory = "64MiB"
//! timeout = "5s"
//!
//! [dlq]
//! suffix = ".dlq"
//! create = true                # create <topic>.dlq when missing
//! retention = "7d"             # ... keeping dead letters this long
//!
//! [breaker]                    # optional: pause calls while a dependency is down
//! failure_threshold = 10       # failed attempts in a row (permanent errors aside) that open it
//! reset_timeout = "60s"        # then one probe call
//! half_open_attempts = 1
//!
//! [config]
//! greeting = "hello"
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::config::LimitsSection;
use crate::host::Limits;
use crate::parse::{ConfigError, byte_size, duration, read_toml};
use crate::source::{BrokerKind, StartFrom};

/// A handler's manifest, as written by its author.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Topics the handler consumes.
    pub topics: Vec<String>,
    /// Consumer group; each handler has its own so that one slow handler
    /// never holds back another. Default: `weir.<name>`.
    pub group: Option<String>,
    /// Where a consumer group without committed offsets starts.
    #[serde(default)]
    pub start: StartFrom,
    /// Which messages must be handled one after another.
    #[serde(default)]
    pub ordering: Ordering,
    /// Where a message's key (for ordering, and as the handler sees it)
    /// comes from, tried in order; none yielding one, the broker's own key
    /// (the Kafka record key; NATS: the `ce-partitionkey` header, else the
    /// subject).
    #[serde(default)]
    pub key: Vec<KeySource>,
    /// Messages held at once (running, waiting for a retry, or queued
    /// behind their key); at the bound the partition is paused.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Deduplication by event id.
    #[serde(default)]
    pub dedup: DedupSettings,
    /// Retry policy for failed events.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Sandbox limits; unset values take the runtime's `[limits]`.
    #[serde(default)]
    pub limits: ManifestLimits,
    /// Dead-letter settings.
    #[serde(default)]
    pub dlq: DlqSettings,
    /// A circuit breaker, when the table is there (see
    /// [`breaker`](crate::pipeline::breaker)).
    pub breaker: Option<BreakerSettings>,
    /// Values the handler can read (through the `config` import).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// What the sandbox grants beyond the world's imports (nothing by
    /// default).
    #[serde(default)]
    pub sandbox: SandboxGrants,
    /// NATS JetStream settings (only with `[source.nats]`).
    pub nats: Option<crate::source::nats::NatsSettings>,
    /// RabbitMQ settings (only with `[source.rabbitmq]`).
    pub rabbitmq: Option<crate::source::rabbitmq::RabbitSettings>,
    /// Redis Streams settings (only with `[source.redis]`).
    pub redis: Option<crate::source::redis::RedisSettings>,
    /// Amazon SQS settings (only with `[source.sqs]`).
    pub sqs: Option<crate::source::sqs::SqsSettings>,
}

/// Where a message's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A header's value, if present and non-empty.
    Header(String),
    /// A string or number at this JSON pointer in the payload.
    JsonPointer(String),
    /// The whole topic or subject.
    Topic,
    /// The n-th (1-based) `.`-separated token of the subject
    /// (`subject:3` of `orders.eu.42` is `42`).
    TopicToken(usize),
}

impl<'de> Deserialize<'de> for KeySource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Some(name) = text.strip_prefix("header:").filter(|n| !n.is_empty()) {
            Ok(KeySource::Header(name.to_string()))
        } else if let Some(pointer) = text.strip_prefix("json:").filter(|p| p.starts_with('/')) {
            Ok(KeySource::JsonPointer(pointer.to_string()))
        } else if text == "subject" || text == "topic" {
            Ok(KeySource::Topic)
        } else if let Some(n) = text
            .strip_prefix("subject:")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n >= 1)
        {
            Ok(KeySource::TopicToken(n))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid key source {text:?}; write \"header:<name>\", \"json:/pointer\", \"subject\" or \"subject:<n>\" (n-th token, from 1)"
            )))
        }
    }
}

/// `[sandbox]`: grants beyond the `weir:handler` world. Everything else
/// (filesystem, network, the host's environment, stdin) stays denied.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxGrants {
    /// Environment variables the guest sees (`std::env::var`), with these
    /// exact values; the host's own environment is never passed through.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Directories the guest may read, by the path it sees them at:
    /// `{ "/data" = "reference-data" }`. Read-only; a relative host path is
    /// resolved against the manifest's directory.
    #[serde(default)]
    pub dirs: BTreeMap<String, std::path::PathBuf>,
}

fn default_max_in_flight() -> usize {
    256
}

/// Which messages are handled strictly one after another.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Same key (within a partition) in offset order; different keys in
    /// parallel. Messages without a key are ordered per partition.
    #[default]
    Key,
    /// One message at a time per partition.
    Partition,
    /// No ordering: every message may run in parallel.
    None,
}

/// Where an event's id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSource {
    /// A header's value, if it is non-empty UTF-8.
    Header(String),
    /// A string or number at this JSON pointer in the payload.
    JsonPointer(String),
}

impl<'de> Deserialize<'de> for IdSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Some(name) = text.strip_prefix("header:").filter(|n| !n.is_empty()) {
            Ok(IdSource::Header(name.to_string()))
        } else if let Some(pointer) = text.strip_prefix("json:").filter(|p| p.starts_with('/')) {
            Ok(IdSource::JsonPointer(pointer.to_string()))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid id source {text:?}; write \"header:<name>\" or \"json:/pointer/into/payload\""
            )))
        }
    }
}

/// `[dedup]`: drop events already handled.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupSettings {
    /// Turn deduplication off (every delivery reaches the handler).
    pub enabled: bool,
    /// Sources of the event id, tried in order; when none yields one the id
    /// is `<topic>/<partition>/<offset>`.
    pub id: Vec<IdSource>,
    /// How long an event id is remembered.
    #[serde(with = "duration")]
    pub ttl: Duration,
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            id: vec![
                IdSource::Header("ce_id".into()),
                IdSource::Header("event_id".into()),
                IdSource::Header("Nats-Msg-Id".into()),
            ],
            ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// `[retry]`: exponential backoff with jitter, or an explicit schedule
/// (`delays`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RetryToml")]
pub struct RetryPolicy {
    /// Total attempts including the first; after the last the event is
    /// dead-lettered. With `delays`: one more than there are delays.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_delay: Duration,
    /// Each further delay is the previous one times this.
    pub multiplier: f64,
    /// Upper bound for any delay.
    pub max_delay: Duration,
    /// Random spread, as a fraction of the delay (0.2 = ±20 %).
    pub jitter: f64,
    /// An explicit schedule: the delay after the first failed attempt,
    /// after the second, and so on; after the last, the event is
    /// dead-lettered. Empty: exponential backoff. Taken as written (no
    /// jitter).
    pub delays: Vec<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: 0.2,
            delays: Vec::new(),
        }
    }
}

/// `[retry]` as written: every key optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryToml {
    max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "optional_duration")]
    initial_delay: Option<Duration>,
    multiplier: Option<f64>,
    #[serde(default, deserialize_with = "optional_duration")]
    max_delay: Option<Duration>,
    jitter: Option<f64>,
    delays: Option<Vec<String>>,
}

impl TryFrom<RetryToml> for RetryPolicy {
    type Error = String;

    fn try_from(raw: RetryToml) -> Result<Self, String> {
        let defaults = Self::default();
        let delays = raw
            .delays
            .unwrap_or_default()
            .iter()
            .map(|text| {
                humantime::parse_duration(text).map_err(|err| {
                    format!("retry.delays: invalid duration {text:?} ({err}); write it like \"250ms\", \"5s\" or \"2m\"")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let max_attempts = if delays.is_empty() {
            raw.max_attempts.unwrap_or(defaults.max_attempts)
        } else {
            let implied = u32::try_from(delays.len() + 1).unwrap_or(u32::MAX);
            match raw.max_attempts {
                Some(given) if given != implied => {
                    return Err(format!(
                        "retry.max_attempts: {given} disagrees with retry.delays, whose {} delays mean {implied} attempts; drop max_attempts",
                        delays.len()
                    ));
                }
                _ => implied,
            }
        };
        if !delays.is_empty()
            && (raw.initial_delay.is_some() || raw.multiplier.is_some() || raw.max_delay.is_some())
        {
            return Err(
                "retry.delays: an explicit schedule replaces initial_delay, multiplier and max_delay; drop them".into(),
            );
        }
        let max_delay = match delays.iter().max() {
            // Caps a handler's `retry-after` like the schedule's longest.
            Some(longest) => *longest,
            None => raw.max_delay.unwrap_or(defaults.max_delay),
        };
        Ok(Self {
            max_attempts,
            initial_delay: raw
                .initial_delay
                .or(delays.first().copied())
                .unwrap_or(defaults.initial_delay),
            multiplier: raw.multiplier.unwrap_or(defaults.multiplier),
            max_delay,
            jitter: raw.jitter.unwrap_or(defaults.jitter),
            delays,
        })
    }
}

/// `[limits]` in a manifest.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLimits {
    /// Linear-memory cap, e.g. `"64MiB"`.
    #[serde(default, deserialize_with = "optional_byte_size")]
    pub memory: Option<u64>,
    /// Wall-clock limit for one call, e.g. `"5s"`.
    #[serde(default, deserialize_with = "optional_duration")]
    pub timeout: Option<Duration>,
    /// Fuel one call may use (needs `[limits] fuel` in the runtime
    /// configuration, which turns metering on).
    pub fuel: Option<u64>,
    /// Most elements in any one table.
    pub table_elements: Option<u32>,
    /// Most core instances the component may create.
    pub instances: Option<u32>,
    /// Most calls of this handler running at once (each holds one
    /// instance). Default: the runtime's `[limits] concurrency`.
    pub concurrency: Option<usize>,
}

fn optional_byte_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    byte_size::deserialize(d).map(Some)
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration::deserialize(d).map(Some)
}

impl ManifestLimits {
    /// This handler's limits, falling back to the runtime defaults.
    pub fn resolve(&self, defaults: &LimitsSection) -> Limits {
        Limits {
            memory: self.memory.unwrap_or(defaults.memory),
            timeout: self.timeout.unwrap_or(defaults.timeout),
            fuel: self.fuel.or(defaults.fuel),
            table_elements: self.table_elements.unwrap_or(defaults.table_elements),
            instances: self.instances.unwrap_or(defaults.instances),
        }
    }
}

/// `[breaker]`: stop calling the handler while its dependency is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Failed attempts in a row (permanent errors aside) that open it.
    pub failure_threshold: u32,
    /// How long it stays open before a probe runs.
    #[serde(with = "duration")]
    pub reset_timeout: Duration,
    /// Calls run as probes at once when the timeout has passed.
    pub half_open_attempts: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 10,
            reset_timeout: Duration::from_secs(60),
            half_open_attempts: 1,
        }
    }
}

/// `[dlq]`: where poison messages go.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqSettings {
    /// Dead letters of topic `t` go to `t` + suffix.
    pub suffix: String,
    /// One topic (or subject) for every dead letter of this handler,
    /// instead of `<topic><suffix>`. Needed when a subscription with `>`
    /// would consume its own dead letters.
    pub topic: Option<String>,
    /// Create the dead-letter topic (Kafka: same partition count and
    /// replication as the topic it serves; NATS: a stream) when it is
    /// missing. `false`: a missing one is reported and the handler is not
    /// ready; its poison messages wait, unacknowledged.
    pub create: bool,
    /// How long a dead-letter topic Weir creates keeps its dead letters
    /// (Kafka `retention.ms`, JetStream `max_age`).
    #[serde(with = "duration")]
    pub retention: Duration,
}

impl Default for DlqSettings {
    fn default() -> Self {
        Self {
            suffix: ".dlq".into(),
            topic: None,
            create: true,
            retention: Duration::from_secs(7 * 86_400),
        }
    }
}

impl DlqSettings {
    /// Where a dead letter of a message from `topic` goes: `topic` +
    /// suffix; for an SQS FIFO queue (`orders.fifo`) the suffix goes before
    /// `.fifo` (`orders.dlq.fifo`, the queue `orders-dlq.fifo`), since a
    /// FIFO queue's dead letters need a FIFO queue.
    pub fn destination(&self, topic: &str) -> String {
        match &self.topic {
            Some(fixed) => fixed.clone(),
            None => match topic.strip_suffix(".fifo") {
                Some(base) => format!("{base}{}.fifo", self.suffix),
                None => format!("{topic}{}", self.suffix),
            },
        }
    }
}

impl Manifest {
    /// Reads and validates a manifest file.
    ///
    /// # Errors
    ///
    /// When the file is missing, not valid TOML, has unknown keys or values
    /// out of range; the message names the file and the key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let manifest: Manifest = read_toml(path)?;
        manifest
            .validate()
            .map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        if self.topics.is_empty() {
            return Err("topics: list at least one topic to consume".into());
        }
        if let Some(topic) = self.topics.iter().find(|t| t.trim().is_empty()) {
            return Err(format!("topics: {topic:?} is empty"));
        }
        if self.group.as_deref().is_some_and(|g| g.trim().is_empty()) {
            return Err("group: must not be empty".into());
        }
        let retry = &self.retry;
        if retry.max_attempts == 0 {
            return Err("retry.max_attempts: must be at least 1".into());
        }
        if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
            return Err("retry.multiplier: must be a number >= 1.0".into());
        }
        if !(0.0..=1.0).contains(&retry.jitter) {
            return Err("retry.jitter: must be between 0.0 and 1.0".into());
        }
        if retry.max_delay < retry.initial_delay {
            return Err("retry.max_delay: must not be less than retry.initial_delay".into());
        }
        if let Some(breaker) = &self.breaker {
            if breaker.failure_threshold == 0 {
                return Err("breaker.failure_threshold: must be at least 1".into());
            }
            if breaker.half_open_attempts == 0 {
                return Err("breaker.half_open_attempts: must be at least 1".into());
            }
            if breaker.reset_timeout.is_zero() {
                return Err("breaker.reset_timeout: must be greater than zero".into());
            }
        }
        if self.limits.memory.is_some_and(|m| m < (1 << 20)) {
            return Err("limits.memory: must be at least 1MiB".into());
        }
        if let Some(guest) = self.sandbox.dirs.keys().find(|g| !g.starts_with('/')) {
            return Err(format!(
                "sandbox.dirs: {guest:?} must be an absolute path as the guest sees it, e.g. \"/data\""
            ));
        }
        if self.limits.fuel == Some(0) {
            return Err("limits.fuel: must be greater than zero".into());
        }
        if self.limits.timeout.is_some_and(|t| t.is_zero()) {
            return Err("limits.timeout: must be greater than zero".into());
        }
        if self.max_in_flight == 0 {
            return Err("max_in_flight: must be at least 1".into());
        }
        if self.limits.concurrency == Some(0) {
            return Err("limits.concurrency: must be at least 1".into());
        }
        if self
            .dlq
            .topic
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err("dlq.topic: must not be empty".into());
        }
        if self.dedup.ttl.is_zero() {
            return Err("dedup.ttl: must be greater than zero (set dedup.enabled = false to turn deduplication off)".into());
        }
        if self.dlq.suffix.is_empty() {
            return Err(
                "dlq.suffix: must not be empty (it would dead-letter into the source topic)".into(),
            );
        }
        Ok(())
    }

    /// Checks the settings that depend on the broker: topic names (a Kafka
    /// topic, or a NATS subject with wildcards), and no table of another
    /// broker's.
    ///
    /// # Errors
    ///
    /// Naming the key and the broker.
    pub fn check_broker(&self, broker: BrokerKind) -> Result<(), String> {
        let tables = [
            ("nats", self.nats.is_some(), BrokerKind::Nats),
            ("rabbitmq", self.rabbitmq.is_some(), BrokerKind::Rabbit),
            ("redis", self.redis.is_some(), BrokerKind::Redis),
            ("sqs", self.sqs.is_some(), BrokerKind::Sqs),
        ];
        if let Some((table, _, _)) = tables.iter().find(|(_, set, b)| *set && *b != broker) {
            return Err(format!(
                "[{table}]: this runtime consumes from {} ([source.{}]); remove the table or configure [source.{table}]",
                broker.name(),
                broker.as_str()
            ));
        }
        if broker != BrokerKind::Nats
            && self
                .key
                .iter()
                .any(|k| matches!(k, KeySource::TopicToken(_)))
        {
            return Err(format!(
                "key: \"subject:<n>\" picks a token of a NATS subject; {} topics have no tokens (use \"header:<name>\" or \"json:/pointer\")",
                broker.name()
            ));
        }
        for topic in &self.topics {
            broker
                .check_name(topic)
                .map_err(|why| format!("topics: {why}"))?;
        }
        if let Some(topic) = self.dlq.topic.as_deref() {
            broker
                .check_dead_letter_name(topic)
                .map_err(|why| format!("dlq.topic: {why}"))?;
        }
        if broker == BrokerKind::Nats
            && self.dlq.topic.is_none()
            && let Some(topic) = self.topics.iter().find(|t| t.ends_with('>'))
        {
            return Err(format!(
                "dlq.topic: the subscription {topic:?} would consume its own dead letters (<subject>{}); set [dlq] topic to a subject outside it",
                self.dlq.suffix
            ));
        }
        Ok(())
    }

    /// This manifest's table for the broker whose table is a `T` (`[nats]`
    /// for [`NatsSettings`](crate::source::nats::NatsSettings), …), its
    /// defaults when the table is absent or the broker has none (`()`).
    pub fn broker_settings<T: Clone + Default + 'static>(&self) -> T {
        use std::any::Any;
        let tables: [Option<&dyn Any>; 4] = [
            self.nats.as_ref().map(|t| t as &dyn Any),
            self.rabbitmq.as_ref().map(|t| t as &dyn Any),
            self.redis.as_ref().map(|t| t as &dyn Any),
            self.sqs.as_ref().map(|t| t as &dyn Any),
        ];
        tables
            .into_iter()
            .flatten()
            .find_map(|table| table.downcast_ref::<T>())
            .cloned()
            .unwrap_or_default()
    }

    /// Where this handler's dead letters go: the destination of each topic
    /// it consumes ([`DlqSettings::destination`]), sorted, each once.
    pub fn dead_letter_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .topics
            .iter()
            .map(|topic| self.dlq.destination(topic))
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// The consumer group for a handler called `name`.
    pub fn group_for(&self, name: &str) -> String {
        self.group.clone().unwrap_or_else(|| format!("weir.{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_toml;

    fn parse(text: &str) -> Result<Manifest, String> {
        let manifest: Manifest =
            parse_toml(Path::new("h.toml"), text).map_err(|e| e.to_string())?;
        manifest.validate()?;
        Ok(manifest)
    }

    #[test]
    fn minimal_manifest_takes_defaults() {
        let m = parse("topics = [\"orders\"]").expect("valid");
        assert_eq!(m.group_for("orders"), "weir.orders");
        assert_eq!(m.start, StartFrom::Earliest);
        assert_eq!(m.retry, RetryPolicy::default());
        assert_eq!(m.dlq.suffix, ".dlq");
        assert_eq!(m.ordering, Ordering::Key);
        assert_eq!(m.max_in_flight, 256);
        assert_eq!(m.dedup, DedupSettings::default());
    }

    #[test]
    fn dedup_id_sources() {
        let m = parse(
            "topics = [\"a\"]\n[dedup]\nid = [\"json:/event_id\", \"header:x\"]\nttl = \"1h\"",
        )
        .expect("valid");
        assert_eq!(
            m.dedup.id,
            vec![
                IdSource::JsonPointer("/event_id".into()),
                IdSource::Header("x".into())
            ]
        );
        assert_eq!(m.dedup.ttl, Duration::from_secs(3600));
        let err = parse("topics = [\"a\"]\n[dedup]\nid = [\"payload\"]").expect_err("bad source");
        assert!(err.contains("header:<name>"), "{err}");
    }

    #[test]
    fn full_manifest() {
        let m = parse(
            r#"
            topics = ["a", "b"]
            group = "g"
            start = "latest"
            [retry]
            max_attempts = 3
            initial_delay = "100ms"
            [limits]
            memory = "32MiB"
            [dlq]
            suffix = ".dead"
            [config]
            k = "v"
            "#,
        )
        .expect("valid");
        assert_eq!(m.group_for("x"), "g");
        assert_eq!(m.retry.max_attempts, 3);
        assert_eq!(m.retry.initial_delay, Duration::from_millis(100));
        assert_eq!(m.retry.multiplier, 2.0);
        let limits = m.limits.resolve(&LimitsSection::default());
        assert_eq!(limits.memory, 32 << 20);
        assert_eq!(limits.timeout, Duration::from_secs(5));
        assert_eq!(m.config["k"], "v");
    }

    #[test]
    fn an_explicit_retry_schedule_sets_the_attempts() {
        let m = parse("topics = [\"a\"]\n[retry]\ndelays = [\"1s\", \"5s\", \"30s\"]\n")
            .expect("valid");
        assert_eq!(m.retry.max_attempts, 4);
        assert_eq!(m.retry.delays, [1, 5, 30].map(Duration::from_secs).to_vec());
        assert!(
            parse("topics = [\"a\"]\n[retry]\ndelays = [\"1s\"]\nmax_attempts = 2\n").is_ok(),
            "an agreeing max_attempts is fine"
        );
        for (text, names) in [
            ("delays = [\"1s\"]\nmax_attempts = 5", "retry.max_attempts"),
            ("delays = [\"1s\"]\nmultiplier = 3.0", "retry.delays"),
            ("delays = [\"soon\"]", "retry.delays"),
        ] {
            let err = parse(&format!("topics = [\"a\"]\n[retry]\n{text}\n")).expect_err(text);
            assert!(err.contains(names), "{text}: {err}");
        }
    }

    #[test]
    fn broker_specific_settings_are_checked_against_the_broker() {
        let check = |text: &str, broker| parse(text).and_then(|m| m.check_broker(broker));
        // Kafka topic names; subjects with wildcards on NATS.
        assert!(check("topics = [\"orders.eu\"]", BrokerKind::Kafka).is_ok());
        let err = check("topics = [\"orders.*\"]", BrokerKind::Kafka).expect_err("wildcard");
        assert!(err.contains("topics") && err.contains("Kafka"), "{err}");
        assert!(check("topics = [\"orders.*\"]", BrokerKind::Nats).is_ok());
        let err = check("topics = [\"a b\"]", BrokerKind::Nats).expect_err("space");
        assert!(err.contains("NATS subject"), "{err}");
        let err = check("topics = [\"a.>.b\"]", BrokerKind::Nats).expect_err("> not last");
        assert!(err.contains("topics"), "{err}");
        // A table for another broker names itself.
        let err = check(
            "topics = [\"a\"]\n[nats]\nack_wait = \"10s\"",
            BrokerKind::Kafka,
        )
        .expect_err("[nats] under Kafka");
        assert!(err.contains("[nats]") && err.contains("Kafka"), "{err}");
        let nats =
            parse("topics = [\"a\"]\n[nats]\nack_wait = \"10s\"\ndurable = \"d\"").expect("valid");
        assert_eq!(
            nats.nats.as_ref().map(|n| (n.ack_wait, n.durable.clone())),
            Some((Duration::from_secs(10), Some("d".into())))
        );
        // A subscription with `>` would consume its own dead letters.
        let err = check("topics = [\"orders.>\"]", BrokerKind::Nats).expect_err("dlq inside");
        assert!(err.contains("dlq.topic"), "{err}");
        assert!(
            check(
                "topics = [\"orders.>\"]\n[dlq]\ntopic = \"dead.orders\"",
                BrokerKind::Nats
            )
            .is_ok()
        );
        // Subject tokens as keys are NATS-only.
        let err =
            check("topics = [\"a\"]\nkey = [\"subject:2\"]", BrokerKind::Kafka).expect_err("token");
        assert!(err.contains("key"), "{err}");
        let m = parse(
            "topics = [\"a\"]\nkey = [\"header:k\", \"json:/id\", \"subject\", \"subject:2\"]",
        )
        .expect("valid");
        assert_eq!(
            m.key,
            vec![
                KeySource::Header("k".into()),
                KeySource::JsonPointer("/id".into()),
                KeySource::Topic,
                KeySource::TopicToken(2)
            ]
        );
        let err = parse("topics = [\"a\"]\nkey = [\"subject:0\"]").expect_err("token 0");
        assert!(err.contains("subject:<n>"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("", "topics"),
            ("topics = []", "topics"),
            ("topics = [\" \"]", "topics"),
            ("topics = [\"a\"]\nordering = \"random\"", "random"),
            ("topics = [\"a\"]\nmax_in_flight = 0", "max_in_flight"),
            ("topics = [\"a\"]\n[dedup]\nttl = \"0s\"", "dedup.ttl"),
            (
                "topics = [\"a\"]\n[retry]\nmax_attempts = 0",
                "retry.max_attempts",
            ),
            ("topics = [\"a\"]\n[retry]\njitter = 2.0", "retry.jitter"),
            ("topics = [\"a\"]\nstart = \"middle\"", "middle"),
            (
                "topics = [\"a\"]\n[limits]\ntimeout = \"0s\"",
                "limits.timeout",
            ),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(key), "{text:?} -> {err}");
        }
    }
}
