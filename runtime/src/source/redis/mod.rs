//! Redis Streams: not connected yet. This module holds the settings and the
//! consumer and publisher types the runtime expects of it; each answers
//! that the broker is not available yet.

use std::time::Duration;

use serde::Deserialize;

use super::{Depth, Message, Publisher, Receipt, Settled, Source, Subscription};

/// `[source.redis]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSource {
    /// Where the broker is.
    pub url: String,
}

impl RedisSource {
    /// Checks the table, naming the key that is wrong.
    ///
    /// # Errors
    ///
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The manifest's `[redis]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {}

/// Whether `name` can name a stream.
///
/// # Errors
///
/// Saying why not.
pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty name".into());
    }
    Ok(())
}

const UNAVAILABLE: &str = "Redis Streams is not available yet";

/// A connection to the broker.
#[derive(Clone)]
pub struct RedisConnection {}

impl RedisConnection {
    /// Connects.
    ///
    /// # Errors
    ///
    /// Always, for now.
    pub async fn connect(_source: &RedisSource) -> anyhow::Result<Self> {
        anyhow::bail!(UNAVAILABLE)
    }

    /// A consumer for one handler.
    pub fn consumer(&self, _subscription: Subscription<RedisSettings>) -> RedisConsumer {
        RedisConsumer {}
    }

    /// A publisher on this connection.
    pub fn publisher(&self) -> RedisPublisher {
        RedisPublisher {}
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
pub struct RedisConsumer {}

/// One delivered message.
pub struct RedisDelivery {}

impl Source for RedisConsumer {
    type Delivery = RedisDelivery;

    async fn recv(&self) -> Result<(Message, RedisDelivery), String> {
        Err(UNAVAILABLE.into())
    }

    fn owns(&self, _delivery: &RedisDelivery) -> bool {
        false
    }

    fn settle(&self, _delivery: &RedisDelivery, _outcome: Settled) {}

    async fn close(self) {}
}

/// Publishes dead letters and emitted events.
#[derive(Clone)]
pub struct RedisPublisher {}

impl Publisher for RedisPublisher {
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

impl super::Archive for RedisConnection {
    async fn read_all(&self, _topic: &str) -> anyhow::Result<Vec<Message>> {
        anyhow::bail!(UNAVAILABLE)
    }

    async fn remove(
        &self,
        _topic: &str,
        _selected: &[super::Position],
        _read: &[super::Position],
    ) -> anyhow::Result<usize> {
        anyhow::bail!(UNAVAILABLE)
    }

    async fn depth(&self, _topic: &str) -> anyhow::Result<Depth> {
        anyhow::bail!(UNAVAILABLE)
    }
}

impl RedisConnection {
    /// Moves a handler's consumer group back (`weir replay`).
    ///
    /// # Errors
    ///
    /// Always, for now.
    pub async fn rewind(
        &self,
        _manifest: &crate::registry::Manifest,
        _group: &str,
        _from: super::Rewind,
        _apply: bool,
    ) -> anyhow::Result<Vec<String>> {
        anyhow::bail!(UNAVAILABLE)
    }
}
