//! The runtime's tasks beside the workers: the periodic consumer-lag log
//! line, the periodic dead-letter measurements, and making sure each
//! handler's dead-letter topics exist.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::Status;
use crate::metrics::Metrics;
use crate::pipeline::HandlerStats;
use crate::registry::Manifest;
use crate::source::Broker;

/// Logs each consumer group's lag per topic (`event = "consumer_lag"`, at
/// info) every `every`: the sum over its partitions, the partitions known,
/// and the oldest committed position's age (see
/// [`Progress`](crate::source::progress::Progress)).
pub(super) async fn log_lag(metrics: Metrics, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let mut by_topic: BTreeMap<(String, String), (i64, usize, Duration)> = BTreeMap::new();
        for (group, view) in metrics.partitions() {
            let entry = by_topic.entry((group, view.topic)).or_default();
            entry.0 += view.lag.unwrap_or(0);
            entry.1 += 1;
            entry.2 = entry.2.max(view.position_age);
        }
        for ((group, topic), (lag, partitions, age)) in by_topic {
            tracing::info!(event = "consumer_lag", consumer_group = %group, topic = %topic, lag, partitions,
                position_age_s = age.as_secs(), "consumer lag");
        }
    }
}

/// Measures every served handler's dead-letter topics every `every`, for
/// `weir_dlq_depth` and `weir_dlq_oldest_age_seconds` (a topic that cannot
/// be measured keeps its last values; why is logged at debug).
pub(super) async fn measure_dead_letters<B: Broker>(
    broker: B,
    status: Status,
    metrics: Metrics,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        let mut dlqs: Vec<String> = status
            .handlers()
            .into_iter()
            .flat_map(|view| view.dead_letter_topics)
            .collect();
        dlqs.sort();
        dlqs.dedup();
        for dlq in dlqs {
            let measured = broker.depth(&dlq).await;
            match measured {
                Ok(depth) => {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                    let age = depth.oldest_ms.map_or(Duration::ZERO, |oldest| {
                        Duration::from_millis(u64::try_from(now_ms - oldest).unwrap_or(0))
                    });
                    metrics.dlq(&dlq, depth.messages, age);
                }
                Err(err) => {
                    tracing::debug!(dlq = %dlq, error = %format!("{err:#}"), "cannot measure the dead-letter topic")
                }
            }
        }
    }
}

/// Makes sure `manifest`'s dead-letter topics exist, creating the missing
/// ones when `[dlq] create` allows; a topic that is missing (and may not be
/// created) or cannot be created is logged once and keeps the handler from
/// being ready (`HandlerStats::dead_letters_blocked`) until a dead letter
/// is written after all.
pub(super) async fn ensure_dead_letter_topics<B: Broker>(
    broker: B,
    handler: String,
    manifest: Manifest,
    stats: Arc<HandlerStats>,
) {
    let mut seen = std::collections::BTreeSet::new();
    for topic in &manifest.topics {
        let dlq = manifest.dlq.destination(topic);
        if !seen.insert(dlq.clone()) {
            continue;
        }
        let (retention, create) = (manifest.dlq.retention, manifest.dlq.create);
        let created = broker
            .ensure_dead_letters(&dlq, topic, retention, create)
            .await;
        match created {
            Ok(None) => {}
            Ok(Some(partitions)) => {
                tracing::info!(handler = %handler, dlq = %dlq, partitions,
                    retention_s = retention.as_secs(), "created the dead-letter topic");
            }
            Err(err) => {
                tracing::error!(handler = %handler, dlq = %dlq, error = %format!("{err:#}"),
                    "dead-letter topic unavailable: poison messages of this handler wait unacknowledged, and it is not ready, until dead letters can be written");
                stats.dead_letter_problem(Some(format!("{err:#}")));
            }
        }
    }
}
