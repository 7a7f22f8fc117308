//! Producing to Kafka: dead letters and the outbox relay's emitted events,
//! through one idempotent producer.

use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::Cluster;
use crate::source::{Publisher, Receipt, Refused};

/// An idempotent producer (acks from all in-sync replicas, no duplicates
/// from internal retries).
#[derive(Clone)]
pub struct KafkaProducer {
    producer: FutureProducer,
}

impl KafkaProducer {
    /// Creates the producer.
    ///
    /// # Errors
    ///
    /// When librdkafka rejects the configuration.
    pub fn new(cluster: &Cluster, client_id: &str) -> anyhow::Result<Self> {
        let mut config = cluster.client_config(client_id);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        let producer = config
            .create()
            .map_err(|err| anyhow::anyhow!("cannot create a producer: {err}"))?;
        Ok(Self { producer })
    }

    /// Produces one record and waits until the broker acknowledged it.
    ///
    /// # Errors
    ///
    /// When the broker did not acknowledge the record within the delivery
    /// timeout; [`Refused`] for a record too large for the broker or a
    /// topic name it does not take.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> anyhow::Result<(i32, i64)> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(Header {
                key: name.as_str(),
                value: Some(value.as_slice()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).payload(payload).headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        let delivery = self
            .producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(err, _)| {
                let refused = matches!(
                    err.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::MessageSizeTooLarge
                            | RDKafkaErrorCode::InvalidMessageSize
                            | RDKafkaErrorCode::MessageBatchTooLarge
                            | RDKafkaErrorCode::InvalidTopic
                            | RDKafkaErrorCode::InvalidRecord
                    )
                );
                if refused {
                    anyhow::Error::new(Refused(format!("produce to {topic:?}: {err}")))
                } else {
                    anyhow::anyhow!("produce to {topic:?} failed: {err}")
                }
            })?;
        Ok((delivery.partition, delivery.offset))
    }
}

impl Publisher for KafkaProducer {
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
        _id: Option<&str>,
    ) -> anyhow::Result<Receipt> {
        // The idempotent producer already drops duplicates of its own
        // retries; consumers deduplicate by the `event_id` header.
        let (partition, offset) = KafkaProducer::send(self, topic, key, payload, headers).await?;
        Ok(Receipt { partition, offset })
    }
}
