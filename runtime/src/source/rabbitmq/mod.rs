//! RabbitMQ: not connected yet. This module holds the settings and the
//! consumer and publisher types the runtime expects of it; each answers
//! that the broker is not available yet.

use std::time::Duration;

use serde::Deserialize;

use super::{Depth, Message, Publisher, Receipt, Settled, Source, Subscription};

/// `[source.rabbitmq]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSource {
    /// Where the broker is.
    pub url: String,
}

impl RabbitSource {
    /// Checks the table, naming the key that is wrong.
    ///
    /// # Errors
    ///
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The manifest's `[rabbitmq]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitSettings {}

/// Whether `name` can name a queue.
///
/// # Errors
///
/// Saying why not.
pub fn check_queue_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty name".into());
    }
    Ok(())
}

const UNAVAILABLE: &str = "RabbitMQ is not available yet";

/// A connection to the broker.
#[derive(Clone)]
pub struct RabbitConnection {}

impl RabbitConnection {
    /// Connects.
    ///
    /// # Errors
    ///
    /// Always, for now.
    pub async fn connect(_source: &RabbitSource) -> anyhow::Result<Self> {
        anyhow::bail!(UNAVAILABLE)
    }

    /// A consumer for one handler.
    pub fn consumer(&self, _subscription: Subscription<RabbitSettings>) -> RabbitConsumer {
        RabbitConsumer {}
    }

    /// A publisher on this connection.
    pub fn publisher(&self) -> RabbitPublisher {
        RabbitPublisher {}
    }

    /// Makes sure dead-letter destination `dlq` (of `origin`) exists.
    ///
    /// # Errors
    ///
    /// Always, for now.
    pub async fn ensure_dead_letters(
        &self,
        _dlq: &str,
        _origin: &str,
        _retention: Duration,
        _create: bool,
    ) -> anyhow::Result<bool> {
        anyhow::bail!(UNAVAILABLE)
    }

    /// How many messages `topic` holds.
    ///
    /// # Errors
    ///
    /// Always, for now.
    pub async fn depth(&self, _topic: &str) -> anyhow::Result<Depth> {
        anyhow::bail!(UNAVAILABLE)
    }
}

/// A handler's consumer.
pub struct RabbitConsumer {}

/// One delivered message.
pub struct RabbitDelivery {}

impl Source for RabbitConsumer {
    type Delivery = RabbitDelivery;

    async fn recv(&self) -> Result<(Message, RabbitDelivery), String> {
        Err(UNAVAILABLE.into())
    }

    fn owns(&self, _delivery: &RabbitDelivery) -> bool {
        false
    }

    fn settle(&self, _delivery: &RabbitDelivery, _outcome: Settled) {}

    async fn close(self) {}
}

/// Publishes dead letters and emitted events.
#[derive(Clone)]
pub struct RabbitPublisher {}

impl Publisher for RabbitPublisher {
    async fn send(
        &self,
        _topic: &str,
        _key: Option<&[u8]>,
        _payload: &[u8],
        _headers: &[(String, Vec<u8>)],
        _id: Option<&str>,
    ) -> anyhow::Result<Receipt> {
        anyhow::bail!(UNAVAILABLE)
    }
}
