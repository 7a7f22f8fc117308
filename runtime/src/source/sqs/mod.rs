//! Amazon SQS: not connected yet. This module holds the settings and the
//! consumer and publisher types the runtime expects of it; each answers
//! that the broker is not available yet.

use std::time::Duration;

use serde::Deserialize;

use super::{Depth, Message, Publisher, Receipt, Settled, Source, Subscription};

/// `[source.sqs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSource {
    /// Where the broker is.
    pub url: String,
}

impl SqsSource {
    /// Checks the table, naming the key that is wrong.
    ///
    /// # Errors
    ///
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The manifest's `[sqs]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqsSettings {}

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

const UNAVAILABLE: &str = "Amazon SQS is not available yet";

/// A connection to the broker.
#[derive(Clone)]
pub struct SqsConnection {}

impl SqsConnection {
    /// Connects.
    ///
    /// # Errors
    ///
    /// Always, for now.
    pub async fn connect(_source: &SqsSource) -> anyhow::Result<Self> {
        anyhow::bail!(UNAVAILABLE)
    }

    /// A consumer for one handler.
    pub fn consumer(&self, _subscription: Subscription<SqsSettings>) -> SqsConsumer {
        SqsConsumer {}
    }

    /// A publisher on this connection.
    pub fn publisher(&self) -> SqsPublisher {
        SqsPublisher {}
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
pub struct SqsConsumer {}

/// One delivered message.
pub struct SqsDelivery {}

impl Source for SqsConsumer {
    type Delivery = SqsDelivery;

    async fn recv(&self) -> Result<(Message, SqsDelivery), String> {
        Err(UNAVAILABLE.into())
    }

    fn owns(&self, _delivery: &SqsDelivery) -> bool {
        false
    }

    fn settle(&self, _delivery: &SqsDelivery, _outcome: Settled) {}

    async fn close(self) {}
}

/// Publishes dead letters and emitted events.
#[derive(Clone)]
pub struct SqsPublisher {}

impl Publisher for SqsPublisher {
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
