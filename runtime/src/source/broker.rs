//! What the runtime needs of a broker, behind one trait.
//!
//! Each broker folder implements [`Broker`] on its connection: a consumer
//! for a handler's [`Subscription`], a publisher for dead letters and
//! emitted events, its dead-letter destinations made sure of, their depth,
//! a consumer moved back, and the dead-letter reader of `weir dlq`. The
//! runtime is written once against the trait; the only place that names
//! the brokers is where the configured one is connected (`runtime::connect`).

use std::future::Future;
use std::time::Duration;

use super::{Archive, BrokerKind, Depth, Publisher, Rewind, Source, Subscription};

/// A connection to one broker, shared by every handler the runtime serves.
pub trait Broker: Clone + Send + Sync + 'static {
    /// The handler manifest's table for this broker (`[nats]`,
    /// `[rabbitmq]`, `[redis]`, `[sqs]`); `()` where there is none.
    type Settings: Clone + Default + Send + Sync + 'static;
    /// One handler's consumer.
    type Consumer: Source;
    /// Where dead letters and emitted events are published.
    type Publisher: Publisher + Clone;
    /// What `weir dlq` reads dead letters with.
    type Archive: Archive;

    /// Which broker this is.
    fn kind(&self) -> BrokerKind;

    /// A consumer for `subscription`, connected in the background.
    ///
    /// # Errors
    ///
    /// When the client cannot be created from the settings.
    fn consumer(
        &self,
        subscription: Subscription<Self::Settings>,
    ) -> anyhow::Result<Self::Consumer>;

    /// A publisher on this connection.
    fn publisher(&self) -> Self::Publisher;

    /// Makes sure dead-letter destination `dlq` of `origin` exists,
    /// creating it (keeping dead letters for `retention`) when missing and
    /// `create` allows. Returns the partitions created (`1` where the
    /// broker has none), if it created it.
    ///
    /// # Errors
    ///
    /// When it is missing and may not be created, or the broker refuses.
    fn ensure_dead_letters(
        &self,
        dlq: &str,
        origin: &str,
        retention: Duration,
        create: bool,
    ) -> impl Future<Output = anyhow::Result<Option<i32>>> + Send;

    /// How many messages `topic` holds and how old the oldest is.
    ///
    /// # Errors
    ///
    /// When the broker cannot be asked.
    fn depth(&self, topic: &str) -> impl Future<Output = anyhow::Result<Depth>> + Send;

    /// Moves the consumer of `subscription` back to `from` (with `apply`;
    /// otherwise only says where it would go): one line per partition,
    /// subject or stream, in words.
    ///
    /// # Errors
    ///
    /// When the broker cannot be asked, refuses (a consumer of the group is
    /// running), or has no positions to move (a queue).
    fn rewind(
        &self,
        subscription: &Subscription<Self::Settings>,
        from: Rewind,
        apply: bool,
    ) -> impl Future<Output = anyhow::Result<Vec<String>>> + Send;

    /// The dead-letter reader of `weir dlq`.
    ///
    /// # Errors
    ///
    /// When the broker cannot read a destination without consuming it (a
    /// queue), saying so.
    fn archive(&self) -> anyhow::Result<Self::Archive>;
}

/// The [`Broker::Archive`] of a broker that has none: a queue cannot be
/// read without consuming it. No value of it exists.
pub enum NoArchive {}

impl Archive for NoArchive {
    async fn read_all(&self, _: &str) -> anyhow::Result<Vec<super::Message>> {
        match *self {}
    }

    async fn remove(
        &self,
        _: &str,
        _: &[super::Position],
        _: &[super::Position],
    ) -> anyhow::Result<usize> {
        match *self {}
    }

    async fn depth(&self, _: &str) -> anyhow::Result<Depth> {
        match *self {}
    }
}

/// Why a queue broker has no [`Broker::archive`].
pub(crate) fn no_archive(kind: BrokerKind) -> anyhow::Error {
    anyhow::anyhow!(
        "`weir dlq` reads dead letters without consuming them, which {} queues cannot do; \
         the broker's own tools show them (the dead letters keep their origin in weir.origin.* headers)",
        kind.name()
    )
}

/// Why a queue broker has no [`Broker::rewind`].
pub(crate) fn no_rewind(kind: BrokerKind) -> anyhow::Error {
    anyhow::anyhow!(
        "{} queues have no positions to move a consumer back to: a message is gone once acknowledged; replay from where the messages came from, or use `weir dlq replay` for dead letters",
        kind.name()
    )
}
