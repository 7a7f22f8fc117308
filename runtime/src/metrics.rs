//! Prometheus metrics, with the names dashboards for event consumers
//! already use, and Weir's own under `weir_`.
//!
//! | family | labels | meaning |
//! | --- | --- | --- |
//! | `messages_consumed_total` | `topic`, `consumer_group`, `status` | messages by outcome: `handled`, `duplicate`, `dead_lettered` (final, once per message); `retried` and `failed` (per failed attempt) |
//! | `message_processing_duration_seconds` | `topic`, `consumer_group` | time inside `handle`, every attempt |
//! | `dlq_messages_total` | `topic`, `error_type` | dead letters published, by the handler's error category, else the error kind |
//! | `messages_produced_total` | `topic`, `partition` | emitted events and dead letters the broker acknowledged, by where it put them (partition `0` for brokers without partitions) |
//! | `consumer_lag` | `topic`, `consumer_group`, `partition` | messages behind the broker's end (Kafka: high watermark minus committed offset; JetStream: pending plus unacknowledged, partition `0`), as the consumer last saw it |
//! | `weir_committed_position_age_seconds` | `topic`, `consumer_group`, `partition` | time since the partition's committed position last advanced, while messages are behind it; `0` when none are (a value that keeps growing is a stuck partition) |
//! | `weir_messages_in_flight` | `handler` | messages held (running, waiting for a retry, queued behind their key) |
//! | `weir_handler_instances` | `handler`, `state` | instances `busy` running a call and `idle` kept for the next ones |
//! | `weir_state_conflicts_total` | `handler` | calls run again because state they read changed before their commit |
//! | `weir_handler_info` | `handler`, `version`, `consumer_group` | 1 for the version being served |
//! | `weir_handler_reloads_total` | `handler`, `result` | hot reloads: `applied`, `rejected` |
//! | `weir_circuit_breaker_state` | `handler`, `state` | 1 for the state a handler's breaker is in (`closed`, `open`, `half_open`), 0 for the others; only handlers with `[breaker]` |
//! | `weir_dlq_depth` | `topic` | dead letters each dead-letter topic holds, read from the broker every `[runtime] dlq_scan_interval` |
//! | `weir_dlq_oldest_age_seconds` | `topic` | age of the oldest of them (`0` when empty) |
//! | `weir_outbox_rows` | | emitted events committed and not yet acknowledged by the broker |
//! | `weir_outbox_oldest_age_seconds` | | age of the oldest of those rows, since its commit (`0` when none wait) |
//! | `weir_store_commit_writes` | | outcomes per durable group commit |
//! | `weir_store_commit_seconds` | | time of one durable group commit |
//!
//! Invariants: recording never blocks and never fails (a metric is an
//! atomic add, or a short lock on first use of a label set); metrics never
//! decide anything — the pipeline's behaviour is the same with or without
//! them.
//!
//! **Bounded series.** Every label value comes from configuration or from
//! a short fixed list, except `topic`, which comes from the wire (a NATS
//! wildcard subscription matches a subject per order id, a handler may
//! emit to as many). The process keeps at most [`MAX_TOPICS`] distinct
//! `topic` values; the messages, dead letters and records of any further
//! topic count under `topic="(other)"` ([`OTHER_TOPICS`]), said once in
//! the log. So the memory of the metrics and the size of a scrape stay
//! bounded whatever the producers send.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::lock::{Unpoisoned, UnpoisonedRw};
use crate::source::progress::{PartitionView, Progress};

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
struct TopicPartition {
    topic: String,
    partition: String,
}

/// A handler and one of its states (instances: `busy`, `idle`; breaker:
/// `closed`, `open`, `half_open`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Instances {
    handler: String,
    state: &'static str,
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

/// Most distinct `topic` label values kept ("Bounded series").
pub const MAX_TOPICS: usize = 1000;
/// The `topic` label of every topic beyond the first [`MAX_TOPICS`]. Not a
/// valid Kafka topic name, and not one anybody gives a NATS subject or a
/// queue.
pub const OTHER_TOPICS: &str = "(other)";

/// The `topic` label values in use ("Bounded series").
#[derive(Default)]
struct TopicLabels {
    seen: Mutex<HashSet<String>>,
    /// The log has said that the bound was reached.
    said: AtomicBool,
}

impl TopicLabels {
    /// `topic` itself while it is one of the first [`MAX_TOPICS`] seen,
    /// else [`OTHER_TOPICS`].
    fn label<'a>(&self, topic: &'a str) -> &'a str {
        let mut seen = self.seen.locked();
        if seen.contains(topic) {
            return topic;
        }
        if seen.len() < MAX_TOPICS {
            seen.insert(topic.to_string());
            return topic;
        }
        drop(seen);
        if !self.said.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                topic = %topic.escape_debug(),
                "metrics keep {MAX_TOPICS} topics; this one and any further ones are counted as topic=\"{OTHER_TOPICS}\""
            );
        }
        OTHER_TOPICS
    }
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
    produced: Family<TopicPartition, Counter>,
    lag: Family<Partition, Gauge>,
    position_age: Family<Partition, Gauge<f64, AtomicU64>>,
    /// Each consumer group's progress, as its source keeps it.
    boards: Arc<Mutex<Vec<(String, Progress)>>>,
    in_flight: Family<HandlerLabel, Gauge>,
    instances: Family<Instances, Gauge>,
    conflicts: Family<HandlerLabel, Counter>,
    info: Family<HandlerInfo, Gauge>,
    /// The info labels set for each handler, to remove when it changes.
    serving: Arc<Mutex<HashMap<String, HandlerInfo>>>,
    reloads: Family<Reload, Counter>,
    breakers: Family<Instances, Gauge>,
    dlq_depth: Family<Topic, Gauge>,
    dlq_oldest: Family<Topic, Gauge<f64, AtomicU64>>,
    outbox_rows: Gauge,
    outbox_oldest_age: Gauge<f64, AtomicU64>,
    commit_writes: Histogram,
    commit_seconds: Histogram,
    topics: Arc<TopicLabels>,
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
        let produced = Family::<TopicPartition, Counter>::default();
        registry.register(
            "messages_produced",
            "Emitted events and dead letters acknowledged by the broker, by partition",
            produced.clone(),
        );
        let lag = Family::<Partition, Gauge>::default();
        registry.register(
            "consumer_lag",
            "Messages behind the broker's end, per partition, as the consumer last saw it",
            lag.clone(),
        );
        let position_age = Family::<Partition, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "weir_committed_position_age_seconds",
            "Time since the partition's committed position last advanced, while messages are behind it",
            position_age.clone(),
        );
        let in_flight = Family::<HandlerLabel, Gauge>::default();
        registry.register(
            "weir_messages_in_flight",
            "Messages held per handler: running, waiting for a retry, or queued behind their key",
            in_flight.clone(),
        );
        let instances = Family::<Instances, Gauge>::default();
        registry.register(
            "weir_handler_instances",
            "Instances per handler: busy running a call, idle kept for the next ones",
            instances.clone(),
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
        let breakers = Family::<Instances, Gauge>::default();
        registry.register(
            "weir_circuit_breaker_state",
            "1 for the state each handler's circuit breaker is in (closed, open, half_open), 0 for the others",
            breakers.clone(),
        );
        let dlq_depth = Family::<Topic, Gauge>::default();
        registry.register(
            "weir_dlq_depth",
            "Dead letters held by each dead-letter topic, as last read from the broker",
            dlq_depth.clone(),
        );
        let dlq_oldest = Family::<Topic, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "weir_dlq_oldest_age_seconds",
            "Age of the oldest dead letter in each dead-letter topic (0 when empty)",
            dlq_oldest.clone(),
        );
        let outbox_rows = Gauge::default();
        registry.register(
            "weir_outbox_rows",
            "Emitted events committed and not yet acknowledged by the broker",
            outbox_rows.clone(),
        );
        let outbox_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "weir_outbox_oldest_age_seconds",
            "Age of the oldest emitted event waiting in the outbox, since its commit",
            outbox_oldest_age.clone(),
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
            position_age,
            boards: Arc::default(),
            in_flight,
            instances,
            conflicts,
            info,
            serving: Arc::default(),
            reloads,
            breakers,
            dlq_depth,
            dlq_oldest,
            outbox_rows,
            outbox_oldest_age,
            commit_writes,
            commit_seconds,
            topics: Arc::default(),
        }
    }

    /// The progress board of `consumer_group`, for its source to keep
    /// current (the same board for every consumer of the group in this
    /// process).
    pub fn progress(&self, consumer_group: &str) -> Progress {
        let mut boards = self.boards.locked();
        if let Some((_, progress)) = boards.iter().find(|(g, _)| g == consumer_group) {
            return progress.clone();
        }
        let progress = Progress::default();
        boards.push((consumer_group.to_string(), progress.clone()));
        progress
    }

    /// Every consumer group's partitions: (group, partition view).
    pub fn partitions(&self) -> Vec<(String, PartitionView)> {
        self.boards
            .locked()
            .iter()
            .flat_map(|(group, board)| {
                board
                    .snapshot()
                    .into_iter()
                    .map(move |view| (group.clone(), view))
            })
            .collect()
    }

    /// The text exposition of every family (the partitions as the sources
    /// last saw them).
    pub fn encode(&self) -> String {
        self.lag.clear();
        self.position_age.clear();
        for (group, view) in self.partitions() {
            let labels = Partition {
                topic: view.topic,
                consumer_group: group,
                partition: view.partition.to_string(),
            };
            if let Some(lag) = view.lag {
                self.lag.get_or_create(&labels).set(lag);
            }
            self.position_age
                .get_or_create(&labels)
                .set(view.position_age.as_secs_f64());
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
            instances: ["busy", "idle"].map(|state| {
                self.instances
                    .get_or_create(&Instances {
                        handler: handler.to_string(),
                        state,
                    })
                    .clone()
            }),
            conflicts: self.conflicts.get_or_create(&label).clone(),
            topics: Arc::default(),
        }
    }

    /// A record published to `topic` was acknowledged by the broker, which
    /// put it in `partition`.
    pub fn produced(&self, topic: &str, partition: i32) {
        self.produced
            .get_or_create(&TopicPartition {
                topic: self.topics.label(topic).to_string(),
                partition: partition.to_string(),
            })
            .inc();
    }

    /// The outbox holds `rows` rows now, the oldest `oldest_age` old.
    pub fn outbox(&self, rows: u64, oldest_age: Duration) {
        self.outbox_rows
            .set(i64::try_from(rows).unwrap_or(i64::MAX));
        self.outbox_oldest_age.set(oldest_age.as_secs_f64());
    }

    /// Dead-letter topic `topic` holds `depth` dead letters, the oldest
    /// `oldest_age` old.
    pub fn dlq(&self, topic: &str, depth: u64, oldest_age: Duration) {
        let labels = Topic {
            topic: topic.to_string(),
        };
        self.dlq_depth
            .get_or_create(&labels)
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.dlq_oldest
            .get_or_create(&labels)
            .set(oldest_age.as_secs_f64());
    }

    /// A durable group commit of `writes` outcomes took `seconds`.
    pub fn commit(&self, writes: usize, seconds: f64) {
        self.commit_writes.observe(writes as f64);
        self.commit_seconds.observe(seconds);
    }

    /// Handler `handler` now serves `version` (`None`: it was removed).
    pub fn serving(&self, handler: &str, consumer_group: &str, version: Option<&str>) {
        let mut serving = self.serving.locked();
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
    /// Busy and idle instances.
    instances: [Gauge; 2],
    conflicts: Counter,
    /// This handler's series per topic label, looked up without
    /// allocating (at most [`MAX_TOPICS`] + 1 of them).
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
    /// This handler's series for `topic` ("Bounded series").
    fn series(&self, topic: &str) -> TopicSeries {
        let cached = |label: &str| self.topics.read_locked().get(label).cloned();
        if let Some(series) = cached(topic) {
            return series;
        }
        let topic = self.metrics.topics.label(topic);
        if let Some(series) = cached(topic) {
            return series;
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
            .write_locked()
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
                topic: self.metrics.topics.label(topic).to_string(),
                error_type: error_type.to_string(),
            })
            .inc();
    }

    /// A record was published to `topic` and acknowledged, in `partition`.
    pub fn produced(&self, topic: &str, partition: i32) {
        self.metrics.produced(topic, partition);
    }

    /// `busy` instances run a call now; `idle` wait for the next ones.
    pub fn instances(&self, busy: usize, idle: usize) {
        let [busy_gauge, idle_gauge] = &self.instances;
        busy_gauge.set(i64::try_from(busy).unwrap_or(i64::MAX));
        idle_gauge.set(i64::try_from(idle).unwrap_or(i64::MAX));
    }

    /// The handler holds `held` messages now.
    pub fn in_flight(&self, held: usize) {
        self.in_flight.set(i64::try_from(held).unwrap_or(i64::MAX));
    }

    /// The handler's circuit breaker is now in `state`.
    pub fn breaker(&self, state: &'static str) {
        for each in ["closed", "open", "half_open"] {
            self.metrics
                .breakers
                .get_or_create(&Instances {
                    handler: self.handler.clone(),
                    state: each,
                })
                .set(i64::from(each == state));
        }
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
        metrics.produced("orders.dlq", 2);
        orders.instances(3, 1);
        metrics.outbox(4, Duration::from_millis(1500));
        metrics.serving("orders", "weir.orders", Some("abc"));
        metrics.serving("orders", "weir.orders", Some("def"));
        let text = metrics.encode();
        for line in [
            r#"messages_consumed_total{topic="orders",consumer_group="weir.orders",status="handled"} 2"#,
            r#"messages_consumed_total{topic="orders",consumer_group="weir.orders",status="retried"} 1"#,
            r#"message_processing_duration_seconds_bucket{le="0.01",topic="orders",consumer_group="weir.orders"} 1"#,
            r#"message_processing_duration_seconds_bucket{le="0.001",topic="orders",consumer_group="weir.orders"} 0"#,
            r#"dlq_messages_total{topic="orders",error_type="validation"} 1"#,
            r#"messages_produced_total{topic="orders.dlq",partition="2"} 1"#,
            r#"weir_handler_instances{handler="orders",state="busy"} 3"#,
            r#"weir_handler_instances{handler="orders",state="idle"} 1"#,
            r#"weir_outbox_rows 4"#,
            r#"weir_outbox_oldest_age_seconds 1.5"#,
            r#"weir_handler_info{handler="orders",version="def",consumer_group="weir.orders"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        assert!(
            !text.contains(r#"version="abc""#),
            "old version kept:\n{text}"
        );
    }

    /// "Bounded series": a subject per message (a NATS wildcard) makes at
    /// most `MAX_TOPICS` series per family, then one `(other)`.
    #[test]
    fn topics_from_the_wire_make_a_bounded_number_of_series() {
        let metrics = Metrics::new();
        let orders = metrics.handler("orders", "weir.orders");
        let total = MAX_TOPICS + 500;
        for n in 0..total {
            let subject = format!("orders.{n}");
            orders.consumed(&subject, "handled");
            orders.call(&subject, 0.002);
            orders.dead_letter(&subject, "validation");
        }
        for n in 0..total {
            metrics.produced(&format!("audit.{n}"), 0);
        }
        let text = metrics.encode();
        let series = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        let handled = text
            .lines()
            .filter(|l| l.starts_with("messages_consumed_total{") && l.contains("handled"))
            .count();
        // The first MAX_TOPICS labels went to consumed topics and their
        // dead letters (the same names); every audit topic is beyond it.
        assert_eq!(
            handled,
            MAX_TOPICS + 1,
            "one handled series per kept topic, plus (other)"
        );
        assert_eq!(series("dlq_messages_total{"), MAX_TOPICS + 1);
        assert_eq!(series("messages_produced_total{"), 1);
        let other = |family: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(family)
                        && l.contains(r#"topic="(other)""#)
                        && (!l.contains("status=") || l.contains("handled"))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
        };
        assert_eq!(
            other("messages_consumed_total{").as_deref(),
            Some("500"),
            "{text}"
        );
        assert_eq!(
            other("messages_produced_total{").as_deref(),
            Some(total.to_string().as_str())
        );
        assert_eq!(
            other("message_processing_duration_seconds_count{").as_deref(),
            Some("500")
        );
        assert!(orders.topics.read().map(|m| m.len()).unwrap_or(0) <= MAX_TOPICS + 1);
    }
}
