//! The runtime's configuration file (`weir.toml`).
//!
//! Every table and key is documented in `config/weir.toml`, which is also the
//! embedded default. Unknown keys are rejected, and every error names the file
//! and the key so an operator knows what to fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod secrets;

pub use crate::parse::ConfigError;
use crate::parse::{byte_size, duration, parse_toml};

/// `text` as a [`Config`], its secret references expanded and its secrets
/// registered (see [`secrets`]). Errors name the key, and the line when the
/// file holds no reference.
fn parse_expanded(path: &Path, base: &Path, text: &str) -> Result<Config, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let mut table: toml::Table = parse_toml(path, text)?;
    if !secrets::expand_table(&mut table, base).map_err(invalid)? && !text.contains("$${") {
        return parse_toml(path, text);
    }
    // The file's own lines no longer match the expanded values: name the
    // table and key instead (never the value, which may be a secret).
    let expanded = toml::to_string(&table).map_err(|err| invalid(err.to_string()))?;
    toml::from_str(&expanded).map_err(|err| {
        let message = err.message().trim_end().to_string();
        let Some(span) = err.span() else {
            return invalid(message);
        };
        let before = &expanded[..span.start.min(expanded.len())];
        let line = before.rsplit('\n').next().unwrap_or_default();
        let key = line.split('=').next().unwrap_or_default().trim();
        let table = before
            .lines()
            .rev()
            .find(|l| l.starts_with('['))
            .unwrap_or_default();
        invalid(format!("{table} {key}: {message}").trim().to_string())
    })
}

/// The whole runtime configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where handlers live and where state is kept.
    #[serde(default)]
    pub runtime: RuntimeSection,
    /// Which broker to consume from. Absent: the embedded broker.
    #[serde(default)]
    pub source: SourceSection,
    /// Runtime-wide defaults for handler sandbox limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// The admin HTTP server: metrics, health, handlers.
    #[serde(default)]
    pub admin: AdminSection,
    /// Where dedup marks, attempts, state and the outbox live. Absent: the
    /// embedded database in `[runtime] data_dir`.
    #[serde(default)]
    pub store: StoreSection,
}

/// `[store]`: the embedded database (default), or PostgreSQL shared by
/// several processes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `postgres://user:password@host:port/database`: keep everything in
    /// PostgreSQL. Absent: `weir.redb` in `[runtime] data_dir`.
    pub url: Option<String>,
    /// The PostgreSQL schema of weir's tables (created when missing).
    #[serde(default = "default_store_schema")]
    pub schema: String,
    /// Most PostgreSQL connections of this process.
    #[serde(default = "default_store_pool_size")]
    pub pool_size: usize,
    /// How long connecting to PostgreSQL may take.
    #[serde(default = "default_store_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
}

fn default_store_schema() -> String {
    "weir".into()
}
fn default_store_pool_size() -> usize {
    16
}
fn default_store_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            url: None,
            schema: default_store_schema(),
            pool_size: default_store_pool_size(),
            connect_timeout: default_store_connect_timeout(),
        }
    }
}

impl StoreSection {
    /// The PostgreSQL settings, when `url` is set.
    pub fn postgres(&self) -> Option<crate::store::PgSettings> {
        self.url.as_ref().map(|url| crate::store::PgSettings {
            url: url.clone(),
            schema: self.schema.clone(),
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
        })
    }
}

/// `[admin]`: the HTTP server for `/metrics`, `/health/live`,
/// `/health/ready` and `/handlers`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Serve it at all.
    #[serde(default = "default_admin_enabled")]
    pub enabled: bool,
    /// `host:port` to listen on; port 0 picks a free one (logged).
    #[serde(default = "default_admin_listen")]
    pub listen: std::net::SocketAddr,
    /// The bearer token the state and replay routes require (at least 16
    /// characters; usually `"${WEIR_ADMIN_TOKEN}"` or
    /// `"${file:/run/secrets/weir-admin}"`). Absent: a new random one at
    /// each start, written to `admin.token` in `[runtime] data_dir`.
    #[serde(default)]
    pub token: Option<String>,
    /// Names besides IP addresses and `localhost` that requests to the
    /// page, `/handlers`, state and replay may be addressed to (their
    /// `Host`), e.g. `["weir.internal"]`.
    #[serde(default)]
    pub hosts: Vec<String>,
}

fn default_admin_enabled() -> bool {
    true
}
fn default_admin_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            enabled: default_admin_enabled(),
            listen: default_admin_listen(),
            token: None,
            hosts: Vec::new(),
        }
    }
}

/// `[runtime]`: directories and lifecycle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    /// Directory holding `<name>.wasm` + `<name>.toml` pairs. Relative paths
    /// are resolved against the configuration file's directory.
    #[serde(default = "default_handlers_dir")]
    pub handlers_dir: PathBuf,
    /// Directory for the runtime's own data. Relative paths are resolved
    /// against the configuration file's directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How long a graceful stop waits for in-flight work before giving up on
    /// it (unfinished messages are redelivered on the next start).
    #[serde(default = "default_shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// How often each consumer group's lag is logged (`event =
    /// "consumer_lag"`, at info); `"0s"` turns the line off.
    #[serde(default = "default_lag_log_interval", with = "duration")]
    pub lag_log_interval: Duration,
    /// How often the dead-letter topics are measured for
    /// `weir_dlq_depth` and `weir_dlq_oldest_age_seconds`; `"0s"` never.
    #[serde(default = "default_dlq_scan_interval", with = "duration")]
    pub dlq_scan_interval: Duration,
}

fn default_handlers_dir() -> PathBuf {
    PathBuf::from("handlers")
}
fn default_data_dir() -> PathBuf {
    PathBuf::from(".weir")
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_lag_log_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_dlq_scan_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            handlers_dir: default_handlers_dir(),
            data_dir: default_data_dir(),
            shutdown_timeout: default_shutdown_timeout(),
            lag_log_interval: default_lag_log_interval(),
            dlq_scan_interval: default_dlq_scan_interval(),
        }
    }
}

/// `[source]`: at most one of `kafka`, `nats`, `rabbitmq`, `redis`, `sqs`
/// or `embedded`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// A real Kafka cluster.
    pub kafka: Option<crate::source::kafka::KafkaSource>,
    /// A NATS server (or cluster) with JetStream.
    pub nats: Option<crate::source::nats::NatsSource>,
    /// A RabbitMQ broker (AMQP 0-9-1).
    pub rabbitmq: Option<crate::source::rabbitmq::RabbitSource>,
    /// A Redis server: streams and consumer groups.
    pub redis: Option<crate::source::redis::RedisSource>,
    /// Amazon SQS (or a server speaking its API).
    pub sqs: Option<crate::source::sqs::SqsSource>,
    /// The in-process Kafka-protocol broker (the default).
    pub embedded: Option<crate::source::embedded::EmbeddedSource>,
}

/// Which broker the runtime talks to, once the configuration is resolved.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // made once per process
pub enum BrokerSection {
    /// A real cluster.
    Kafka(crate::source::kafka::KafkaSource),
    /// NATS JetStream.
    Nats(crate::source::nats::NatsSource),
    /// RabbitMQ.
    Rabbit(crate::source::rabbitmq::RabbitSource),
    /// Redis Streams.
    Redis(crate::source::redis::RedisSource),
    /// Amazon SQS.
    Sqs(crate::source::sqs::SqsSource),
    /// The in-process broker.
    Embedded(crate::source::embedded::EmbeddedSource),
}

/// `[limits]`: defaults for every handler; a manifest's `[limits]` overrides
/// them per handler.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Linear-memory cap per handler instance, e.g. `"64MiB"`.
    #[serde(default = "default_memory", with = "byte_size")]
    pub memory: u64,
    /// Wall-clock limit for one `handle` call, e.g. `"5s"`.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Fuel (roughly, Wasm instructions) one call may use. Unset: fuel is
    /// not metered at all (metering costs some speed), and manifests cannot
    /// set it either.
    #[serde(default)]
    pub fuel: Option<u64>,
    /// Most elements in any one table of an instance (function tables).
    #[serde(default = "default_table_elements")]
    pub table_elements: u32,
    /// Most core instances a component may create (a Rust component needs a
    /// few; an interpreter-based one more).
    #[serde(default = "default_instances")]
    pub instances: u32,
    /// Most calls of one handler running at once (each holds an instance
    /// and a thread). Default: four per CPU core.
    #[serde(default)]
    pub concurrency: Option<usize>,
}

fn default_table_elements() -> u32 {
    100_000
}
fn default_instances() -> u32 {
    64
}

fn default_memory() -> u64 {
    64 << 20
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            memory: default_memory(),
            timeout: default_timeout(),
            fuel: None,
            table_elements: default_table_elements(),
            instances: default_instances(),
            concurrency: None,
        }
    }
}

impl Config {
    /// Reads `path`, resolving relative directories against its parent.
    ///
    /// # Errors
    ///
    /// When the file cannot be read, is not valid TOML, has an unknown key or
    /// names both sources.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = parse_expanded(path, base, &text)?;
        config.runtime.handlers_dir = base.join(&config.runtime.handlers_dir);
        config.runtime.data_dir = base.join(&config.runtime.data_dir);
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let chosen = self.sources_set();
        if chosen.len() > 1 {
            return Err(invalid(format!(
                "[source]: set one broker, not {} (choose one of [source.kafka], [source.nats], [source.rabbitmq], [source.redis], [source.sqs], [source.embedded])",
                chosen.join(" and ")
            )));
        }
        let checks = [
            self.source.rabbitmq.as_ref().map(|s| s.validate()),
            self.source.redis.as_ref().map(|s| s.validate()),
            self.source.sqs.as_ref().map(|s| s.validate()),
        ];
        let store = self.store.postgres().map(|pg| pg.validate());
        if let Some(Err(message)) = checks
            .into_iter()
            .chain([store])
            .flatten()
            .find(Result::is_err)
        {
            return Err(invalid(message));
        }
        if let Some(nats) = &self.source.nats {
            if nats.url.trim().is_empty() {
                return Err(invalid(
                    "[source.nats] url: must name at least one server, e.g. \"nats://127.0.0.1:4222\"".into(),
                ));
            }
            if nats.user.is_some() != nats.password.is_some() {
                return Err(invalid(
                    "[source.nats] user, password: set both or neither".into(),
                ));
            }
            if nats.tls.cert_file.is_some() != nats.tls.key_file.is_some() {
                return Err(invalid(
                    "[source.nats.tls] cert_file, key_file: set both or neither".into(),
                ));
            }
            if !matches!(nats.streams.storage.as_str(), "file" | "memory") {
                return Err(invalid(format!(
                    "[source.nats.streams] storage: {:?} is neither \"file\" nor \"memory\"",
                    nats.streams.storage
                )));
            }
            if nats.streams.replicas == 0 {
                return Err(invalid(
                    "[source.nats.streams] replicas: must be at least 1".into(),
                ));
            }
        }
        if let Some(token) = &self.admin.token
            && token.trim().chars().count() < 16
        {
            return Err(invalid(
                "[admin] token: must be at least 16 characters (or leave it out to have one generated)".into(),
            ));
        }
        if let Some(host) = self
            .admin
            .hosts
            .iter()
            .find(|h| h.is_empty() || h.contains([':', '/', ' ']))
        {
            return Err(invalid(format!(
                "[admin] hosts: {host:?} is not a host name (no port, scheme or path)"
            )));
        }
        if let Some(kafka) = &self.source.kafka
            && kafka.bootstrap_servers.trim().is_empty()
        {
            return Err(invalid(
                "[source.kafka] bootstrap_servers: must name at least one host:port".into(),
            ));
        }
        if let Some(embedded) = &self.source.embedded
            && embedded.partitions < 1
        {
            return Err(invalid(
                "[source.embedded] partitions: must be at least 1".into(),
            ));
        }
        if self.limits.memory < (1 << 20) {
            return Err(invalid("[limits] memory: must be at least 1MiB".into()));
        }
        if self.limits.concurrency == Some(0) {
            return Err(invalid("[limits] concurrency: must be at least 1".into()));
        }
        if self.limits.timeout.is_zero() {
            return Err(invalid(
                "[limits] timeout: must be greater than zero".into(),
            ));
        }
        Ok(())
    }

    /// The broker to use: the one `[source.*]` table that is set (checked
    /// by `validate`), else the embedded one.
    pub fn broker_section(&self) -> BrokerSection {
        let s = &self.source;
        if let Some(kafka) = &s.kafka {
            BrokerSection::Kafka(kafka.clone())
        } else if let Some(nats) = &s.nats {
            BrokerSection::Nats(nats.clone())
        } else if let Some(rabbit) = &s.rabbitmq {
            BrokerSection::Rabbit(rabbit.clone())
        } else if let Some(redis) = &s.redis {
            BrokerSection::Redis(redis.clone())
        } else if let Some(sqs) = &s.sqs {
            BrokerSection::Sqs(sqs.clone())
        } else {
            BrokerSection::Embedded(s.embedded.clone().unwrap_or_default())
        }
    }

    /// Whether the broker is the embedded one (no `[source.*]` but
    /// `[source.embedded]` is set), which keeps nothing after `weir run`.
    pub fn is_embedded(&self) -> bool {
        matches!(self.broker_section(), BrokerSection::Embedded(_))
    }

    /// The `[source.*]` tables that are set.
    fn sources_set(&self) -> Vec<&'static str> {
        let s = &self.source;
        [
            ("[source.kafka]", s.kafka.is_some()),
            ("[source.nats]", s.nats.is_some()),
            ("[source.rabbitmq]", s.rabbitmq.is_some()),
            ("[source.redis]", s.redis.is_some()),
            ("[source.sqs]", s.sqs.is_some()),
            ("[source.embedded]", s.embedded.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    /// Which kind of broker handlers' manifests are checked against.
    pub fn broker_kind(&self) -> crate::source::BrokerKind {
        use crate::source::BrokerKind;
        match self.broker_section() {
            BrokerSection::Nats(_) => BrokerKind::Nats,
            BrokerSection::Rabbit(_) => BrokerKind::Rabbit,
            BrokerSection::Redis(_) => BrokerKind::Redis,
            BrokerSection::Sqs(_) => BrokerKind::Sqs,
            BrokerSection::Kafka(_) | BrokerSection::Embedded(_) => BrokerKind::Kafka,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = parse_toml(Path::new("weir.toml"), text)?;
        config.validate(Path::new("weir.toml"))?;
        Ok(config)
    }

    /// Every example in `config/` is a valid configuration, uncommented as
    /// it ships, for the broker it is named after.
    #[test]
    fn every_example_configuration_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("config/ is readable") {
            let path = entry.expect("an entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if !name.ends_with(".toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable");
            let config = parse(&text).unwrap_or_else(|err| panic!("{name}: {err}"));
            let broker = config.broker_kind().as_str();
            let expected = match name {
                "weir.toml" | "production.toml" => "kafka",
                other => other.trim_end_matches(".toml"),
            };
            assert_eq!(broker, expected, "{name} configures {broker}");
            seen.push(name.to_string());
        }
        seen.sort();
        assert!(seen.len() >= 3, "examples: {seen:?}");
    }

    #[test]
    fn empty_file_means_embedded_defaults() {
        let config = parse("").expect("empty config is valid");
        assert!(matches!(config.broker_section(), BrokerSection::Embedded(e) if e.partitions == 3));
        assert_eq!(config.limits.timeout, Duration::from_secs(5));
        assert_eq!(config.limits.memory, 64 << 20);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse("[runtime]\nhandlers_dir = \"h\"\nhandler_dir = \"x\"\n")
            .expect_err("unknown key must fail")
            .to_string();
        assert!(err.contains("handler_dir"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_duration_says_how_to_write_one() {
        let err = parse("[limits]\ntimeout = \"soon\"\n")
            .expect_err("bad duration must fail")
            .to_string();
        assert!(err.contains("timeout") || err.contains("soon"), "{err}");
        assert!(err.contains("\"5s\""), "{err}");
    }

    #[test]
    fn both_sources_is_an_error() {
        let err =
            parse("[source.kafka]\nbootstrap_servers = \"127.0.0.1:9092\"\n[source.embedded]\n")
                .expect_err("two sources must fail")
                .to_string();
        assert!(err.contains("set one broker"), "{err}");
    }

    #[test]
    fn kafka_properties_pass_through() {
        let config = parse(
            "[source.kafka]\nbootstrap_servers = \"127.0.0.1:9092\"\n[source.kafka.properties]\n\"socket.timeout.ms\" = \"1000\"\n",
        )
        .expect("valid kafka config");
        let BrokerSection::Kafka(kafka) = config.broker_section() else {
            panic!("expected kafka source");
        };
        assert_eq!(kafka.properties["socket.timeout.ms"], "1000");
    }

    #[test]
    fn nats_source_and_its_checks() {
        let config = parse("[source.nats]\nurl = \"nats://127.0.0.1:4222\"\n").expect("valid");
        assert!(
            matches!(config.broker_section(), BrokerSection::Nats(n) if n.streams.storage == "file")
        );
        assert_eq!(config.broker_kind(), crate::source::BrokerKind::Nats);
        for (text, key) in [
            ("[source.nats]\nurl = \"\"\n", "url"),
            (
                "[source.nats]\nurl = \"nats://h\"\nuser = \"u\"\n",
                "password",
            ),
            (
                "[source.nats]\nurl = \"nats://h\"\n[source.nats.streams]\nstorage = \"disk\"\n",
                "storage",
            ),
            (
                "[source.nats]\nurl = \"nats://h\"\n[source.kafka]\nbootstrap_servers = \"h:1\"\n",
                "set one broker",
            ),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(key), "{text:?} -> {err}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(byte_size::parse("64MiB"), Some(64 << 20));
        assert_eq!(byte_size::parse("1GiB"), Some(1 << 30));
        assert_eq!(byte_size::parse("10KB"), Some(10_000));
        assert_eq!(byte_size::parse("12"), Some(12));
        assert_eq!(byte_size::parse("12 apples"), None);
        assert_eq!(byte_size::parse("MiB"), None);
    }

    #[test]
    fn the_sqs_example_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sqs.toml");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let Some(sqs) = &config.source.sqs else {
            panic!("config/sqs.toml has no [source.sqs]");
        };
        assert_eq!(sqs.region.as_deref(), Some("eu-west-1"));
        assert_eq!(sqs.wait_time, std::time::Duration::from_secs(20));
    }

    #[test]
    fn the_rabbitmq_example_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/rabbitmq.toml");
        let loaded = Config::load(&path);
        assert!(loaded.is_ok(), "{loaded:?}");
    }
}
