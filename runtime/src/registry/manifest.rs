//! The handler manifest: `<name>.toml` beside `<name>.wasm`.
//!
//! ```toml
//! topics = ["orders"]          # required
//! group = "weir.orders"        # consumer group; default weir.<name>
//! start = "earliest"           # where a new group starts: earliest | latest
//! ordering = "key"             # key | partition | none
//! max_in_flight = 256          # messages held at once (running + waiting)
//!
//! [dedup]
//! id = ["header:ce_id", "header:event_id"]   # or "json:/pointer"; then topic/partition/offset
//! ttl = "7d"
//!
//! [retry]
//! max_attempts = 5
//! initial_delay = "1s"
//! multiplier = 2.0
//! max_delay = "60s"
//! jitter = 0.2
//!
//! [limits]
//! memory = "64MiB"
//! timeout = "5s"
//!
//! [dlq]
//! suffix = ".dlq"
//!
//! [config]
//! greeting = "hello"
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, LimitsSection, byte_size, duration, read_toml};

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
    /// Values the handler can read (through the `config` import).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// What the sandbox grants beyond the world's imports (nothing by
    /// default).
    #[serde(default)]
    pub sandbox: SandboxGrants,
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
            ],
            ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest retained message: nothing produced before the handler was
    /// deployed is skipped.
    #[default]
    Earliest,
    /// Only messages produced after the group first joins.
    Latest,
}

impl StartFrom {
    /// The librdkafka `auto.offset.reset` value.
    pub fn as_offset_reset(self) -> &'static str {
        match self {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        }
    }
}

/// `[retry]`: exponential backoff with jitter.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Total attempts including the first; after the last the event is
    /// dead-lettered.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(with = "duration")]
    pub initial_delay: Duration,
    /// Each further delay is the previous one times this.
    pub multiplier: f64,
    /// Upper bound for any delay.
    #[serde(with = "duration")]
    pub max_delay: Duration,
    /// Random spread, as a fraction of the delay (0.2 = ±20 %).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: 0.2,
        }
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
}

fn optional_byte_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    byte_size::deserialize(d).map(Some)
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration::deserialize(d).map(Some)
}

/// Limits in force for one handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear-memory cap in bytes.
    pub memory: u64,
    /// Wall-clock limit for one call.
    pub timeout: Duration,
    /// Fuel per call, when metered.
    pub fuel: Option<u64>,
    /// Most elements in any one table.
    pub table_elements: u32,
    /// Most core instances.
    pub instances: u32,
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

/// `[dlq]`: where poison messages go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqSettings {
    /// Dead letters of topic `t` go to `t` + suffix.
    pub suffix: String,
}

impl Default for DlqSettings {
    fn default() -> Self {
        Self {
            suffix: ".dlq".into(),
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
        if let Some(topic) = self.topics.iter().find(|t| !valid_topic(t)) {
            return Err(format!(
                "topics: {topic:?} is not a valid topic name (1-249 of [a-zA-Z0-9._-])"
            ));
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

    /// The consumer group for a handler called `name`.
    pub fn group_for(&self, name: &str) -> String {
        self.group.clone().unwrap_or_else(|| format!("weir.{name}"))
    }
}

fn valid_topic(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_toml;

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
    fn errors_name_the_key() {
        for (text, key) in [
            ("", "topics"),
            ("topics = []", "topics"),
            ("topics = [\"a b\"]", "topics"),
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
