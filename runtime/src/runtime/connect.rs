//! The one place that names the brokers: connecting to the configured one
//! and handing it, as a [`Broker`], to whatever runs on it (`weir run`'s
//! supervisor, `weir rewind`, `weir dlq`). Everything past this point is
//! written once against the trait.

use std::future::Future;

use crate::config::{BrokerSection, Config};
use crate::registry::Manifest;
use crate::source::embedded::EmbeddedBroker;
use crate::source::kafka::{Cluster, KafkaConnection};
use crate::source::nats::NatsConnection;
use crate::source::progress::Progress;
use crate::source::rabbitmq::RabbitConnection;
use crate::source::redis::RedisConnection;
use crate::source::sqs::SqsConnection;
use crate::source::{Broker, Subscription};

/// Something to run on the connected broker, whichever it is.
pub trait WithBroker {
    /// What it yields.
    type Output;

    /// Runs on `broker`.
    fn run<B: Broker>(self, broker: B) -> impl Future<Output = anyhow::Result<Self::Output>>;
}

/// The broker the configuration names, connected.
pub struct Connected {
    broker: Connection,
    /// The embedded broker, when no `[source]` is configured: it lives as
    /// long as this.
    embedded: Option<EmbeddedBroker>,
}

/// One connection of each broker there is.
#[allow(clippy::large_enum_variant)] // made once per process
enum Connection {
    Kafka(KafkaConnection),
    Nats(NatsConnection),
    Rabbit(RabbitConnection),
    Redis(RedisConnection),
    Sqs(SqsConnection),
}

impl Connected {
    /// The embedded broker's `host:port`, when it is the one in use.
    pub fn embedded_bootstrap(&self) -> Option<String> {
        self.embedded
            .as_ref()
            .map(EmbeddedBroker::bootstrap_servers)
    }

    /// Runs `work` on the broker; the embedded broker, if it is the one,
    /// stops when `work` is done.
    ///
    /// # Errors
    ///
    /// Whatever `work` returns.
    pub async fn run<W: WithBroker>(self, work: W) -> anyhow::Result<W::Output> {
        let output = match self.broker {
            Connection::Kafka(broker) => work.run(broker).await,
            Connection::Nats(broker) => work.run(broker).await,
            Connection::Rabbit(broker) => work.run(broker).await,
            Connection::Redis(broker) => work.run(broker).await,
            Connection::Sqs(broker) => work.run(broker).await,
        };
        drop(self.embedded);
        output
    }
}

/// Connects to the configured broker, starting the embedded one if no
/// `[source]` is configured (creating `topics` on it).
///
/// # Errors
///
/// When the embedded broker cannot start, a topic cannot be created, or
/// the broker's settings are unusable.
pub async fn connect(config: &Config, topics: &[String]) -> anyhow::Result<Connected> {
    let (broker, embedded) = match config.broker_section() {
        BrokerSection::Kafka(source) => {
            (Connection::Kafka(KafkaConnection::connect(&source)?), None)
        }
        BrokerSection::Nats(source) => (
            Connection::Nats(NatsConnection::connect(&source).await?),
            None,
        ),
        BrokerSection::Rabbit(source) => (
            Connection::Rabbit(RabbitConnection::connect(&source).await?),
            None,
        ),
        BrokerSection::Redis(source) => (
            Connection::Redis(RedisConnection::connect(&source).await?),
            None,
        ),
        BrokerSection::Sqs(source) => (
            Connection::Sqs(SqsConnection::connect(&source).await?),
            None,
        ),
        BrokerSection::Embedded(embedded) => {
            let broker = EmbeddedBroker::start(embedded.partitions)?;
            for topic in topics {
                broker.create_topic(topic)?;
            }
            let cluster = Cluster {
                bootstrap_servers: broker.bootstrap_servers(),
                properties: Default::default(),
            };
            (
                Connection::Kafka(KafkaConnection::to(cluster)?),
                Some(broker),
            )
        }
    };
    Ok(Connected { broker, embedded })
}

/// The subscription of a handler called `name` with `manifest`, consuming
/// as `group`, reporting progress to `progress`, with its manifest's table
/// for broker `B`.
pub fn subscription<B: Broker>(
    name: &str,
    manifest: &Manifest,
    group: &str,
    progress: Progress,
) -> Subscription<B::Settings> {
    Subscription {
        handler: name.to_string(),
        group: group.to_string(),
        topics: manifest.topics.clone(),
        start: manifest.start,
        max_in_flight: manifest.max_in_flight,
        progress,
        settings: manifest.broker_settings::<B::Settings>(),
    }
}
