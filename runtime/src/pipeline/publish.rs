//! Producing records to the broker: dead letters and the outbox relay both
//! go through a [`Publisher`].

use std::future::Future;

use crate::source::kafka::KafkaProducer;

/// Somewhere records can be produced to.
pub trait Publisher: Send + Sync + 'static {
    /// Writes one record and returns once the broker acknowledged it.
    ///
    /// Records are handed to the broker in the order their futures are
    /// first polled, so polling several together (as the outbox relay does)
    /// keeps their order within a partition.
    fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

impl Publisher for KafkaProducer {
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> anyhow::Result<()> {
        KafkaProducer::send(self, topic, key, payload, headers)
            .await
            .map(|_| ())
    }
}
