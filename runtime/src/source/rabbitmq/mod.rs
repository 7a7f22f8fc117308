//! RabbitMQ (AMQP 0-9-1) through `lapin`: one consumer channel per
//! handler over the handler's queues, and a publisher with confirms for
//! dead letters and emitted events.
//!
//! # Queues
//!
//! A handler's `topics` are queue names. Each is looked up with a passive
//! declare first, so an existing queue (quorum, stream-backed, with a TTL,
//! a length limit, whatever arguments its owner chose) is used as it is.
//! A missing one is declared durable, with `x-single-active-consumer` when
//! the manifest's `[rabbitmq] single_active_consumer` is set. The
//! manifest's `[rabbitmq] bind` entries bind the queues to existing
//! exchanges (`bind = [{ exchange = "orders", routing_key = "eu.#" }]`);
//! bindings are idempotent and re-applied on every (re)connection.
//!
//! # Acknowledgements
//!
//! Manual acknowledgements. Invariant (*acknowledge only what was
//! settled*): `basic.ack` is sent only for a delivery the pipeline settled
//! `Done` or `DeadLettered`, which it does only once the outcome is
//! durable. `Released` sends `basic.nack` with requeue. Nothing else ever
//! acknowledges: there is no auto-ack, and a channel closed for any reason
//! (Weir closing, a broker restart, a network failure) makes the broker
//! requeue everything it had delivered on it and not had acknowledged.
//!
//! Invariant (*never on someone else's behalf*): a delivery belongs to the
//! channel it came on. Once that channel has closed the delivery is no
//! longer ours ([`Source::owns`](super::Source::owns) is `false` from then
//! on) and settling it acknowledges nothing: the broker has requeued the
//! message and delivers it again (with `redelivered` set) on a new channel,
//! here or elsewhere; the pipeline's dedup table recognises the copy by its
//! event id (`message_id` when no id header is there).
//!
//! Invariant (*hold what is held*): RabbitMQ has no acknowledgement
//! deadline to extend; an unacknowledged delivery stays with its channel
//! for as long as the channel lives — up to the broker's `consumer_timeout`
//! (30 minutes by default): a delivery held longer than that (a very long
//! retry backoff) makes the broker close the channel, and the message is
//! redelivered and deduplicated as above. Raise `consumer_timeout` on the
//! broker when handlers retry for longer.
//!
//! # Backpressure
//!
//! The consumer's prefetch (`basic.qos`) is the handler's `max_in_flight`
//! (split evenly between its queues when it has several): the broker never
//! hands out more unacknowledged messages than the pipeline may hold.
//!
//! # Keys and ordering
//!
//! A message's key is its `ce-partitionkey` header (the CloudEvents
//! partitioning extension; a string or bytes), else its routing key; the
//! manifest's `key` overrides both. One consumer keeps the per-key order of
//! its queue. Several consumers of one queue (several Weir processes) share
//! its messages round-robin, so **no order holds across consumers**. For
//! per-key order across processes either set `single_active_consumer =
//! true` (one process consumes, the others stand by and take over when it
//! goes away), or partition with a consistent-hash exchange
//! (`x-consistent-hash`) and give each process its own queue.
//!
//! # Properties and headers
//!
//! The `message_id` property is the message's identity across
//! redeliveries (it becomes the event id when no id header is there);
//! `correlation_id` is exposed as header `correlation_id` unless a header
//! of that name exists; `timestamp` (seconds; a value too large to be
//! seconds is taken as milliseconds) becomes the event's time. Header
//! table values become bytes: strings and byte arrays as they are,
//! numbers, booleans and timestamps as text, nested arrays and tables as
//! JSON. A published header a table cannot hold (a name over 255 bytes, a
//! repeated name) travels packed in `weir.headers`
//! ([`super::packed`]) and is unpacked on receive.
//!
//! # Publishing
//!
//! A topic `name` publishes to the default exchange with routing key
//! `name` (the queue `name`); `exchange/routing.key` publishes to that
//! exchange with that routing key. Publishes are persistent (delivery
//! mode 2), `mandatory` (a message no queue takes is returned and the
//! publish fails, rather than being dropped silently) and confirmed:
//! [`Publisher::send`](super::Publisher::send) returns once the broker has
//! confirmed it. A record's `id` is its `message_id`, its key its
//! `ce-partitionkey` header.
//!
//! # Dead letters
//!
//! Weir publishes dead letters itself, to the durable queue
//! `<queue>.dlq` (declared when Weir creates it with `x-message-ttl` =
//! the manifest's `[dlq] retention`). It does not use RabbitMQ's
//! dead-letter exchanges: a message rejected into a DLX keeps only the
//! broker's `x-death` header, so the error, the attempts and the origin
//! Weir records (`weir.*` headers) would be lost, and the reject would
//! drop the original before any dead letter is durable. Publishing with
//! confirms first and acknowledging the original after keeps both.

mod consumer;
mod decode;
mod link;
mod publisher;
mod topology;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub use consumer::{RabbitConsumer, RabbitDelivery};
pub use publisher::RabbitPublisher;

use super::{Broker, BrokerKind, NoArchive, Rewind, no_archive, no_rewind};
use super::{Depth, Subscription};
use link::Link;

/// The header carrying a message's key (CloudEvents' `partitionkey`).
pub const KEY_HEADER: &str = "ce-partitionkey";

/// `[source.rabbitmq]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSource {
    /// `amqp://user:password@host:port/vhost` (`%2f` is the vhost `/`);
    /// `amqps://` for TLS.
    pub url: String,
    /// The connection name the broker shows (management UI,
    /// `rabbitmqctl list_connections`); ` (consume)` or ` (publish)` is
    /// appended.
    #[serde(default = "default_connection_name")]
    pub connection_name: String,
    /// Heartbeat interval asked of the broker; `"0s"` turns heartbeats
    /// off. A `heartbeat` in the URL's query takes precedence.
    #[serde(default = "default_heartbeat", with = "crate::parse::duration")]
    pub heartbeat: Duration,
    /// How long one connection attempt may take.
    #[serde(default = "default_connect_timeout", with = "crate::parse::duration")]
    pub connect_timeout: Duration,
    /// How long a publish (dead letter, emitted event) may wait for the
    /// broker's confirm before it counts as failed (and is tried again).
    #[serde(default = "default_publish_timeout", with = "crate::parse::duration")]
    pub publish_timeout: Duration,
    /// A CA certificate (PEM) to trust for `amqps://`, besides the
    /// system's.
    pub tls_ca_file: Option<PathBuf>,
}

fn default_connection_name() -> String {
    "weir".to_string()
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(30)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_publish_timeout() -> Duration {
    Duration::from_secs(30)
}

impl RabbitSource {
    /// Checks the table, naming the key that is wrong.
    ///
    /// # Errors
    ///
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        self.url
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|err| format!("[source.rabbitmq] url: {err} (write it like \"amqp://guest:guest@127.0.0.1:5672/%2f\")"))?;
        if self.heartbeat.as_secs() > u64::from(u16::MAX) {
            return Err(
                "[source.rabbitmq] heartbeat: at most 65535 seconds (\"0s\" turns heartbeats off)"
                    .into(),
            );
        }
        if self.connect_timeout.is_zero() {
            return Err("[source.rabbitmq] connect_timeout: must be greater than zero".into());
        }
        if self.publish_timeout.is_zero() {
            return Err("[source.rabbitmq] publish_timeout: must be greater than zero".into());
        }
        Ok(())
    }
}

/// The manifest's `[rabbitmq]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitSettings {
    /// Bindings of the handler's queues to existing exchanges, made on
    /// every (re)connection.
    pub bind: Vec<Binding>,
    /// Declare a missing queue with `x-single-active-consumer`: of all the
    /// processes consuming it one at a time gets messages, which keeps
    /// per-key order across processes. An existing queue is used as it is.
    pub single_active_consumer: bool,
}

/// One `[[rabbitmq.bind]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// The exchange (it must exist).
    pub exchange: String,
    /// The binding's routing key or pattern (`eu.#` on a topic exchange;
    /// a weight like `"1"` on a consistent-hash exchange).
    #[serde(default)]
    pub routing_key: String,
    /// Which of the handler's queues to bind; unset: every one.
    pub queue: Option<String>,
}

/// Whether `name` can name a queue (or, for a dead-letter destination,
/// `exchange/routing.key`).
///
/// # Errors
///
/// Saying why not.
pub fn check_queue_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty queue name (the broker would make one up)".into());
    }
    if name.len() > 255 {
        return Err(format!("{name:?} is longer than 255 bytes"));
    }
    if name.starts_with("amq.") {
        return Err(format!(
            "{name:?}: queue names starting with \"amq.\" are reserved by the broker"
        ));
    }
    Ok(())
}

/// Where a topic is published: `(exchange, routing key)`. `name` is the
/// default exchange with routing key `name`; `exchange/key` that exchange
/// with that key.
pub fn route(topic: &str) -> (&str, &str) {
    match topic.split_once('/') {
        Some((exchange, key)) => (exchange, key),
        None => ("", topic),
    }
}

/// A connection to the broker: one AMQP connection for consumers and one
/// for publishing (so a publisher blocked by a resource alarm never holds
/// up acknowledgements), each reconnected when lost.
#[derive(Clone)]
pub struct RabbitConnection {
    consume: Arc<Link>,
    publisher: RabbitPublisher,
}

impl RabbitConnection {
    /// Prepares the connections. Nothing is connected yet: consumers and
    /// publishes connect when first needed, and while the broker is
    /// unreachable they keep trying with backoff, logging every failure,
    /// so Weir starts either way and consumes once the broker answers.
    ///
    /// # Errors
    ///
    /// When the settings are unusable (a bad URL, an unreadable CA file).
    pub async fn connect(source: &RabbitSource) -> anyhow::Result<Self> {
        source.validate().map_err(anyhow::Error::msg)?;
        let consume = Arc::new(Link::new(source, "consume")?);
        let publish = Arc::new(Link::new(source, "publish")?);
        Ok(Self {
            consume,
            publisher: RabbitPublisher::new(publish, source.publish_timeout),
        })
    }
}

impl Broker for RabbitConnection {
    type Settings = RabbitSettings;
    type Consumer = RabbitConsumer;
    type Publisher = RabbitPublisher;
    type Archive = NoArchive;

    fn kind(&self) -> BrokerKind {
        BrokerKind::Rabbit
    }

    /// A consumer for one handler.
    fn consumer(
        &self,
        subscription: Subscription<RabbitSettings>,
    ) -> anyhow::Result<RabbitConsumer> {
        Ok(RabbitConsumer::new(self.consume.clone(), subscription))
    }

    /// The publisher (one confirm channel, shared by every clone).
    fn publisher(&self) -> RabbitPublisher {
        self.publisher.clone()
    }

    /// Makes sure dead-letter destination `dlq` (of queue `origin`) exists:
    /// a queue found by a passive declare is used as it is; a missing one
    /// is declared durable with `x-message-ttl` = `retention` when `create`
    /// allows. An `exchange/routing.key` destination needs the exchange to
    /// exist. Returns whether it declared one.
    ///
    /// # Errors
    ///
    /// When it is missing and may not be created, or the broker refuses.
    async fn ensure_dead_letters(
        &self,
        dlq: &str,
        origin: &str,
        retention: Duration,
        create: bool,
    ) -> anyhow::Result<Option<i32>> {
        topology::ensure_dead_letters(&self.consume, dlq, origin, retention, create)
            .await
            .map(|created| created.then_some(1))
    }

    /// How many messages queue `topic` holds ready for consumers (when the
    /// oldest was written is not known: `oldest_ms` is `None`); a missing
    /// queue holds none.
    ///
    /// # Errors
    ///
    /// When the broker cannot be asked, or `topic` names an exchange.
    async fn depth(&self, topic: &str) -> anyhow::Result<Depth> {
        let (exchange, queue) = route(topic);
        if !exchange.is_empty() {
            anyhow::bail!(
                "{topic:?} names exchange {exchange:?}: only a queue has a depth (count the queues bound to it)"
            );
        }
        let found = topology::passive(&self.consume, queue).await?;
        Ok(Depth {
            messages: found.map_or(0, |q| u64::from(q.message_count())),
            oldest_ms: None,
        })
    }

    async fn rewind(
        &self,
        _: &Subscription<Self::Settings>,
        _: Rewind,
        _: bool,
    ) -> anyhow::Result<Vec<String>> {
        Err(no_rewind(BrokerKind::Rabbit))
    }

    fn archive(&self) -> anyhow::Result<NoArchive> {
        Err(no_archive(BrokerKind::Rabbit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(extra: &str) -> Result<RabbitSource, toml::de::Error> {
        toml::from_str(&format!(
            "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n{extra}"
        ))
    }

    #[test]
    fn the_source_table_has_defaults_and_names_a_bad_key() {
        let Ok(s) = source("") else {
            panic!("the minimal table does not parse");
        };
        assert_eq!(s.connection_name, "weir");
        assert_eq!(s.heartbeat, Duration::from_secs(30));
        assert_eq!(s.validate(), Ok(()));
        assert!(source("prefetch = 3").is_err());
        let Ok(bad) = toml::from_str::<RabbitSource>("url = \"http://x\"") else {
            panic!("does not parse");
        };
        assert!(bad.validate().is_err_and(|e| e.contains("url")));
    }

    #[test]
    fn the_manifest_table_takes_bindings() {
        let parsed: Result<RabbitSettings, _> = toml::from_str(
            "single_active_consumer = true\nbind = [{ exchange = \"orders\", routing_key = \"eu.#\" }]",
        );
        let Ok(settings) = parsed else {
            panic!("does not parse: {parsed:?}");
        };
        assert!(settings.single_active_consumer);
        assert_eq!(
            settings.bind,
            vec![Binding {
                exchange: "orders".into(),
                routing_key: "eu.#".into(),
                queue: None
            }]
        );
        assert!(toml::from_str::<RabbitSettings>("prefetch = 1").is_err());
    }

    #[test]
    fn topics_route_to_the_default_exchange_or_a_named_one() {
        assert_eq!(route("orders"), ("", "orders"));
        assert_eq!(route("orders.dlq"), ("", "orders.dlq"));
        assert_eq!(route("events/eu.created"), ("events", "eu.created"));
        assert!(check_queue_name("").is_err());
        assert!(check_queue_name("amq.gen-1").is_err());
        assert!(check_queue_name("orders").is_ok());
    }
}
