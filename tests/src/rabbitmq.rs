//! RabbitMQ for the conformance suite: a private rabbitmq-server and pika. Not connected yet.

use anyhow::{Result, bail};

use crate::broker::{BrokerKind, Position, Stored, TestBroker};
use crate::{Deployment, Record};

/// A private rabbitmq-server and an independent client for it.
pub struct RabbitBroker {}

impl RabbitBroker {
    /// Starts the server and its client.
    ///
    /// # Errors
    ///
    /// Always, for now.
    pub fn start() -> Result<Self> {
        bail!("the RabbitMQ test broker is not available yet")
    }
}

impl TestBroker for RabbitBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Rabbit
    }

    fn deployment(&self) -> Result<Deployment> {
        bail!("not available yet")
    }

    fn create_topic(&self, _topic: &str, _partitions: i32) -> Result<()> {
        bail!("not available yet")
    }

    fn create_output_topic(&self, _topic: &str) -> Result<()> {
        bail!("not available yet")
    }

    fn produce(&self, _topic: &str, _records: &[Record]) -> Result<Vec<Position>> {
        bail!("not available yet")
    }

    fn read(&self, _topic: &str) -> Result<Vec<Stored>> {
        bail!("not available yet")
    }

    fn caught_up(&self, _group: &str, _topic: &str, _produced: &[Position]) -> Result<bool> {
        bail!("not available yet")
    }

    fn progress(&self, _group: &str, _topic: &str) -> String {
        String::new()
    }

    fn prepare_for_kills(&self, _deployment: &Deployment) -> Result<()> {
        Ok(())
    }

    fn manifest_for_kills(&self) -> &'static str {
        ""
    }
}
