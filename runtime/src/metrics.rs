//! Prometheus metrics, with the names dashboards for event consumers
//! already use, and Weir's own under `weir_`.
//!
//! | family | labels | meaning |
//! | --- | --- | --- |
//! | `messages_consumed_total` | `topic`, `consumer_group`, `status` | messages by outcome: `handled`, `duplicate`, `dead_lettered` (final, once per message); `retried` and `failed` (per failed attempt) |
//! | `message_processing_duration_seconds` | `topic`, `consumer_group` | time inside `handle`, every attempt |
//! | `dlq_messages_total` | `topic`, `error_type` | dead letters published, by the handler's error category, else the error kind |
//! | `messages_produced_total` | `topic` | emitted events and dead letters the broker acknowledged |
//! | `consumer_lag` | `topic`, `consumer_group`, `partition` | messages behind the broker's end (Kafka: high watermark minus committed offset; JetStream: pending plus unacknowledged, partition `0`), as the consumer last saw it |
//! | `weir_messages_in_flight` | `handler` | messages held (running, waiting for a retry, queued behind their key) |
//! | `weir_state_conflicts_total` | `handler` | calls run again because state they read changed before their commit |
//! | `weir_handler_info` | `handler`, `version`, `consumer_group` | 1 for the version being served |
//! | `weir_handler_reloads_total` | `handler`, `result` | hot reloads: `applied`, `rejected` |
//! | `weir_outbox_rows` | | emitted events committed and not yet acknowledged by the broker |
//! | `weir_store_commit_writes` | | outcomes per durable group commit |
//! | `weir_store_commit_seconds` | | time of one durable group commit |
//!
//! Invariants: recording never blocks and never fails (a metric is an
//! atomic add, or a short lock on first use of a label set); metrics never
//! decide anything — the pipeline's behaviour is the same with or without
//! them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::source::lag::Lag;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Consumed {
    topic: String,
    consumer_group: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicGroup {
    topic: String,
    consumer_group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Partition {
    topic: String,
    consumer_group: String,
    partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLetters {
    topic: String,
    error_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Topic {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabel {
    handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerInfo {
    handler: String,
    version: String,
    consumer_group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reload {
    handler: String,
    result: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new([0.001, 0.01, 0.1, 1.0, 10.0])
}

fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0])
}

fn commit_histogram() -> Histogram {
    Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 1.0])
}

/// The process's metrics; cheap to clone (all clones share the values).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    consumed: Family<Consumed, Counter>,
    duration: Family<TopicGroup, Histogram>,
    dead_letters: Family<DeadLetters, Counter>,
    produced: Family<Topic, Counter>,
    lag: Family<Partition, Gauge>,
    /// Each consumer group's lag, as its source keeps it.
    lag_boards: Arc<Mutex<Vec<(String, Lag)>>>,
    in_flight: Family<HandlerLabel, Gauge>,
    conflicts: Family<HandlerLabel, Counter>,
    info: Family<HandlerInfo, Gauge>,
    /// The info labels set for each handler, to remove when it changes.
    serving: Arc<Mutex<HashMap<String, HandlerInfo>>>,
    reloads: Family<Reload, Counter>,
    outbox_rows: Gauge,
    commit_writes: Histogram,
    commit_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family registered, all empty.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let consumed = Family::<Consumed, Counter>::default();
        registry.register(
            "messages_consumed",
            "Messages consumed, by outcome (handled, duplicate, dead_lettered; retried and failed per failed attempt)",
            consumed.clone(),
        );
        let duration =
            Family::<TopicGroup, Histogram>::new_with_constructor(duration_histogram as fn() -> _);
        registry.register(
            "message_processing_duration_seconds",
            "Time inside the handler's handle call, every attempt",
            duration.clone(),
        );
        let dead_letters = Family::<DeadLetters, Counter>::default();
        registry.register(
            "dlq_messages",
            "Dead letters published, by the handler's error category or else the error kind",
            dead_letters.clone(),
        );
        let produced = Family::<Topic, Counter>::default();
        registry.register(
            "messages_produced",
            "Emitted events and dead letters acknowledged by the broker",
            produced.clone(),
        );
        let lag = Family::<Partition, Gauge>::default();
        registry.register(
            "consumer_lag",
            "Messages behind the broker's end, per partition, as the consumer last saw it",
            lag.clone(),
        );
        let in_flight = Family::<HandlerLabel, Gauge>::default();
        registry.register(
            "weir_messages_in_flight",
            "Messages held per handler: running, waiting for a retry, or queued behind their key",
            in_flight.clone(),
        );
        let conflicts = Family::<HandlerLabel, Counter>::default();
        registry.register(
            "weir_state_conflicts",
            "Calls run again because state they read changed before their commit",
            conflicts.clone(),
        );
        let info = Family::<HandlerInfo, Gauge>::default();
        registry.register(
            "weir_handler_info",
            "1 for the version of each handler being served",
            info.clone(),
        );
        let reloads = Family::<Reload, Counter>::default();
        registry.register(
            "weir_handler_reloads",
            "Hot reloads of a handler: applied or rejected",
            reloads.clone(),
        );
        let outbox_rows = Gauge::default();
        registry.register(
            "weir_outbox_rows",
            "Emitted events committed and not yet acknowledged by the broker",
            outbox_rows.clone(),
        );
        let commit_writes = batch_histogram();
        registry.register(
            "weir_store_commit_writes",
            "Outcomes per durable group commit",
            commit_writes.clone(),
        );
        let commit_seconds = commit_histogram();
        registry.register(
            "weir_store_commit_seconds",
            "Time of one durable group commit",
            commit_seconds.clone(),
        );
        Self {
            registry: Arc::new(registry),
            consumed,
            duration,
            dead_letters,
            produced,
            lag,
            lag_boards: Arc::default(),
            in_flight,
            conflicts,
            info,
            serving: Arc::default(),
            reloads,
            outbox_rows,
            commit_writes,
            commit_seconds,
        }
    }

    /// The lag board of `consumer_group`, for its source to keep current
    /// (the same board for every consumer of the group in this process).
    pub fn lag(&self, consumer_group: &str) -> Lag {
        let mut boards = self.lag_boards.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, lag)) = boards.iter().find(|(g, _)| g == consumer_group) {
            return lag.clone();
        }
        let lag = Lag::default();
        boards.push((consumer_group.to_string(), lag.clone()));
        lag
    }

    /// Every consumer group's lag: (group, topic, partition, lag).
    pub fn lags(&self) -> Vec<(String, String, i32, i64)> {
        self.lag_boards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flat_map(|(group, board)| {
                board
                    .snapshot()
                    .into_iter()
                    .map(move |(topic, partition, lag)| (group.clone(), topic, partition, lag))
            })
            .collect()
    }

    /// The text exposition of every family (the lag as the sources last
    /// saw it).
    pub fn encode(&self) -> String {
        self.lag.clear();
        for (group, board) in self
            .lag_boards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            for (topic, partition, lag) in board.snapshot() {
                self.lag
                    .get_or_create(&Partition {
                        topic,
                        consumer_group: group.clone(),
                        partition: partition.to_string(),
                    })
                    .set(lag);
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The recorder for one handler consuming as `consumer_group`.
    pub fn handler(&self, handler: &str, consumer_group: &str) -> HandlerMetrics {
        let label = HandlerLabel {
            handler: handler.to_string(),
        };
        HandlerMetrics {
            metrics: self.clone(),
            handler: handler.to_string(),
            consumer_group: consumer_group.to_string(),
            in_flight: self.in_flight.get_or_create(&label).clone(),
            conflicts: self.conflicts.get_or_create(&label).clone(),
            topics: Arc::default(),
        }
    }

    /// A record published to `topic` was acknowledged by the broker.
    pub fn produced(&self, topic: &str) {
        self.produced
            .get_or_create(&Topic {
                topic: topic.to_string(),
            })
            .inc();
    }

    /// The outbox holds `rows` rows now.
    pub fn outbox_rows(&self, rows: u64) {
        self.outbox_rows
            .set(i64::try_from(rows).unwrap_or(i64::MAX));
    }

    /// A durable group commit of `writes` outcomes took `seconds`.
    pub fn commit(&self, writes: usize, seconds: f64) {
        self.commit_writes.observe(writes as f64);
        self.commit_seconds.observe(seconds);
    }

    /// Handler `handler` now serves `version` (`None`: it was removed).
    pub fn serving(&self, handler: &str, consumer_group: &str, version: Option<&str>) {
        let mut serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        // The version it served before leaves the info family.
        if let Some(old) = serving.remove(handler) {
            self.info.remove(&old);
        }
        if let Some(version) = version {
            let labels = HandlerInfo {
                handler: handler.to_string(),
                version: version.to_string(),
                consumer_group: consumer_group.to_string(),
            };
            self.info.get_or_create(&labels).set(1);
            serving.insert(handler.to_string(), labels);
        }
    }

    /// A hot reload of `handler` was applied (`true`) or rejected.
    pub fn reload(&self, handler: &str, applied: bool) {
        self.reloads
            .get_or_create(&Reload {
                handler: handler.to_string(),
                result: if applied { "applied" } else { "rejected" },
            })
            .inc();
    }
}

/// Records what one handler does (see the table in the module docs).
#[derive(Clone)]
pub struct HandlerMetrics {
    metrics: Metrics,
    handler: String,
    consumer_group: String,
    in_flight: Gauge,
    conflicts: Counter,
    /// This handler's series per topic, looked up without allocating.
    topics: Arc<std::sync::RwLock<HashMap<String, TopicSeries>>>,
}

/// The series of one handler and topic.
#[derive(Clone)]
struct TopicSeries {
    handled: Counter,
    duplicate: Counter,
    retried: Counter,
    failed: Counter,
    dead_lettered: Counter,
    duration: Histogram,
}

impl std::fmt::Debug for HandlerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerMetrics")
            .field("handler", &self.handler)
            .field("consumer_group", &self.consumer_group)
            .finish()
    }
}

impl HandlerMetrics {
    /// This handler's series for `topic`.
    fn series(&self, topic: &str) -> TopicSeries {
        if let Some(series) = self
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
        {
            return series.clone();
        }
        let consumed = |status: &'static str| {
            self.metrics
                .consumed
                .get_or_create(&Consumed {
                    topic: topic.to_string(),
                    consumer_group: self.consumer_group.clone(),
                    status,
                })
                .clone()
        };
        let series = TopicSeries {
            handled: consumed("handled"),
            duplicate: consumed("duplicate"),
            retried: consumed("retried"),
            failed: consumed("failed"),
            dead_lettered: consumed("dead_lettered"),
            duration: self
                .metrics
                .duration
                .get_or_create(&TopicGroup {
                    topic: topic.to_string(),
                    consumer_group: self.consumer_group.clone(),
                })
                .clone(),
        };
        self.topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_string(), series.clone());
        series
    }

    /// A message on `topic` reached `status` (`handled`, `duplicate`,
    /// `dead_lettered`, `retried`, `failed`; anything else is ignored).
    pub fn consumed(&self, topic: &str, status: &'static str) {
        let series = self.series(topic);
        match status {
            "handled" => series.handled.inc(),
            "duplicate" => series.duplicate.inc(),
            "retried" => series.retried.inc(),
            "failed" => series.failed.inc(),
            "dead_lettered" => series.dead_lettered.inc(),
            _ => 0,
        };
    }

    /// One call of `handle` on a message of `topic` took `seconds`.
    pub fn call(&self, topic: &str, seconds: f64) {
        self.series(topic).duration.observe(seconds);
    }

    /// A dead letter for a message of `topic` was published, for an error
    /// of `error_type`.
    pub fn dead_letter(&self, topic: &str, error_type: &str) {
        self.metrics
            .dead_letters
            .get_or_create(&DeadLetters {
                topic: topic.to_string(),
                error_type: error_type.to_string(),
            })
            .inc();
    }

    /// A record was published to `topic` and acknowledged.
    pub fn produced(&self, topic: &str) {
        self.metrics.produced(topic);
    }

    /// The handler holds `held` messages now.
    pub fn in_flight(&self, held: usize) {
        self.in_flight.set(i64::try_from(held).unwrap_or(i64::MAX));
    }

    /// A call was run again because state it read had changed.
    pub fn conflict(&self) {
        self.conflicts.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_the_standard_ones() {
        let metrics = Metrics::new();
        let orders = metrics.handler("orders", "weir.orders");
        orders.consumed("orders", "handled");
        orders.consumed("orders", "handled");
        orders.consumed("orders", "retried");
        orders.call("orders", 0.002);
        orders.dead_letter("orders", "validation");
        metrics.produced("orders.dlq");
        metrics.serving("orders", "weir.orders", Some("abc"));
        metrics.serving("orders", "weir.orders", Some("def"));
        let text = metrics.encode();
        for line in [
            r#"messages_consumed_total{topic="orders",consumer_group="weir.orders",status="handled"} 2"#,
            r#"messages_consumed_total{topic="orders",consumer_group="weir.orders",status="retried"} 1"#,
            r#"message_processing_duration_seconds_bucket{le="0.01",topic="orders",consumer_group="weir.orders"} 1"#,
            r#"message_processing_duration_seconds_bucket{le="0.001",topic="orders",consumer_group="weir.orders"} 0"#,
            r#"dlq_messages_total{topic="orders",error_type="validation"} 1"#,
            r#"messages_produced_total{topic="orders.dlq"} 1"#,
            r#"weir_handler_info{handler="orders",version="def",consumer_group="weir.orders"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        assert!(
            !text.contains(r#"version="abc""#),
            "old version kept:\n{text}"
        );
    }
}
