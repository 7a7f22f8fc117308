//! Which broker a runtime consumes from, as configuration and messages
//! name it.

/// The broker a runtime consumes from, for checking a manifest against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// Kafka, or the embedded Kafka-protocol broker.
    Kafka,
    /// NATS JetStream.
    Nats,
    /// RabbitMQ.
    Rabbit,
    /// Redis Streams.
    Redis,
    /// Amazon SQS.
    Sqs,
}

impl BrokerKind {
    /// As written in the configuration: `kafka`, `nats`, `rabbitmq`,
    /// `redis`, `sqs`.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "kafka",
            BrokerKind::Nats => "nats",
            BrokerKind::Rabbit => "rabbitmq",
            BrokerKind::Redis => "redis",
            BrokerKind::Sqs => "sqs",
        }
    }

    /// As people call it: `Kafka`, `NATS JetStream`, `RabbitMQ`, `Redis`,
    /// `Amazon SQS`.
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "Kafka",
            BrokerKind::Nats => "NATS JetStream",
            BrokerKind::Rabbit => "RabbitMQ",
            BrokerKind::Redis => "Redis",
            BrokerKind::Sqs => "Amazon SQS",
        }
    }

    /// Whether `name` can be a topic of this broker (a Kafka topic, a NATS
    /// subject with wildcards, a RabbitMQ queue or `exchange/routing.key`,
    /// a Redis stream, an SQS queue); why not, in words.
    ///
    /// # Errors
    ///
    /// Saying what a name may hold.
    pub fn check_name(self, name: &str) -> Result<(), String> {
        match self {
            BrokerKind::Kafka => super::kafka::check_topic_name(name),
            BrokerKind::Nats => super::nats::check_subject(name, true),
            BrokerKind::Rabbit => super::rabbitmq::check_queue_name(name),
            BrokerKind::Redis => super::redis::check_stream_name(name),
            BrokerKind::Sqs => super::sqs::check_queue_name(name),
        }
    }

    /// Whether `name` can be a dead-letter destination: a topic name
    /// ([`check_name`](Self::check_name)) that names one destination (a
    /// NATS subject without wildcards).
    ///
    /// # Errors
    ///
    /// Saying what a name may hold.
    pub fn check_dead_letter_name(self, name: &str) -> Result<(), String> {
        match self {
            BrokerKind::Nats => super::nats::check_subject(name, false),
            _ => self.check_name(name),
        }
    }
}
