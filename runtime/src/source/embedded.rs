//! The embedded broker: librdkafka's in-process Kafka-protocol mock cluster,
//! listening on loopback, so Weir runs with no infrastructure at all.
//!
//! It keeps everything in memory and is meant for trying Weir out and for
//! development; production points `[source.kafka]` at a real cluster.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// `[source.embedded]`: the in-process broker.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedSource {
    /// Partitions for each topic the handlers subscribe to.
    #[serde(default = "default_embedded_partitions")]
    pub partitions: i32,
}

fn default_embedded_partitions() -> i32 {
    3
}

impl Default for EmbeddedSource {
    fn default() -> Self {
        Self {
            partitions: default_embedded_partitions(),
        }
    }
}

/// A running in-process broker. Stops when dropped.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
    partitions: i32,
}

impl EmbeddedBroker {
    /// Starts a single-broker cluster whose topics get `partitions`
    /// partitions each.
    ///
    /// # Errors
    ///
    /// When librdkafka cannot create the cluster (for example, no free port).
    pub fn start(partitions: i32) -> anyhow::Result<Self> {
        let cluster = MockCluster::new(1)
            .map_err(|err| anyhow::anyhow!("cannot start the embedded broker: {err}"))?;
        Ok(Self {
            cluster,
            partitions,
        })
    }

    /// `host:port` that any Kafka client can use to reach this broker.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with the configured number of partitions, unless it
    /// exists already.
    ///
    /// # Errors
    ///
    /// When the mock cluster rejects the topic.
    pub fn create_topic(&self, topic: &str) -> anyhow::Result<()> {
        match self.cluster.create_topic(topic, self.partitions, 1) {
            Ok(()) => Ok(()),
            Err(err) if err.to_string().contains("already exists") => Ok(()),
            Err(err) => Err(anyhow::anyhow!("cannot create topic {topic:?}: {err}")),
        }
    }
}
