//! `weir demo`: the example handlers against the embedded broker and a
//! generated stream of order events, with a short summary at the end.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::config::Config;
use crate::runtime::{Runtime, load_handlers};
use crate::source::embedded::EmbeddedBroker;
use crate::source::kafka::{Cluster, KafkaProducer};
use crate::store::Store;

/// Event types in the generated stream.
const EVENT_TYPES: &[&str] = &["OrderPlaced", "OrderPaid", "OrderShipped", "OrderCancelled"];

/// Runs the demo: `events` generated messages spread over the handlers'
/// topics; one in ten is malformed on purpose so dead-lettering shows.
///
/// # Errors
///
/// When no handler loads, the broker cannot start, or the stream is not
/// fully handled within `deadline`.
/// With `serve`, the handlers and the status page stay up after the summary
/// until Ctrl-C.
pub async fn run(
    config: &Config,
    events: usize,
    deadline: Duration,
    serve: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // The same compiled-component cache as `weir run`: a second demo, or a
    // `weir run` after it, does not compile the components again.
    let host = crate::runtime::host_for(config)?;
    let dir = &config.runtime.handlers_dir;
    let (handlers, failed) =
        load_handlers(&host, dir, &config.limits, crate::source::BrokerKind::Kafka).await?;
    for err in &failed {
        println!("skipped  {err}");
    }
    anyhow::ensure!(
        !handlers.is_empty(),
        "no handler could be loaded from {}; build the examples first with `bash .ci/build-handlers`",
        dir.display()
    );
    let partitions = match config.broker_section() {
        crate::config::BrokerSection::Embedded(e) => e.partitions,
        _ => 3,
    };
    let broker = EmbeddedBroker::start(partitions)?;
    let mut topics: Vec<String> = handlers
        .iter()
        .flat_map(|h| h.manifest.topics.iter().cloned())
        .collect();
    topics.sort();
    topics.dedup();
    for handler in &handlers {
        for topic in &handler.manifest.topics {
            broker.create_topic(topic)?;
        }
        for dlq in handler.manifest.dead_letter_topics() {
            broker.create_topic(&dlq)?;
        }
    }
    let cluster = Cluster {
        bootstrap_servers: broker.bootstrap_servers(),
        properties: Default::default(),
    };
    println!(
        "embedded broker on {} ({partitions} partitions per topic)",
        cluster.bootstrap_servers
    );
    for handler in &handlers {
        println!(
            "loaded   {} {} ← {}",
            handler.name,
            handler.compiled.version(),
            handler.manifest.topics.join(", ")
        );
    }

    // The demo keeps nothing: a fresh database each run.
    let data = tempfile_dir()?;
    let store = Store::open(&data.join("weir.redb"))?;
    let broker = crate::source::kafka::KafkaConnection::to(cluster.clone())?;
    let runtime = Runtime::start(handlers, &broker, &store, config)?;
    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    if config.admin.enabled
        && let Some(address) = crate::admin::serve(
            config.admin.listen,
            crate::admin::access(&config.admin, &data)?,
            runtime.metrics(),
            runtime.status(),
            store.clone(),
            None,
            admin_stopped,
        )
        .await
    {
        println!("status page: http://{address}/ (metrics at /metrics)");
    }
    let produced = produce(&cluster, &topics, events).await?;
    println!(
        "produced {events} events: {}",
        produced
            .iter()
            .map(|(t, n)| format!("{n} to {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let expected: Vec<u64> = runtime
        .handlers()
        .iter()
        .map(|r| {
            r.handler
                .manifest
                .topics
                .iter()
                .map(|t| produced.get(t).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let wait_started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let finished: Vec<u64> = runtime
            .handlers()
            .iter()
            .map(|r| r.stats.finished())
            .collect();
        if finished.iter().zip(&expected).all(|(f, e)| f >= e) {
            break;
        }
        if wait_started.elapsed() > deadline {
            runtime.stop(config.runtime.shutdown_timeout).await;
            anyhow::bail!(
                "the stream was not fully handled within {} (finished {finished:?} of {expected:?})",
                humantime::format_duration(deadline)
            );
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            let total: u64 = finished.iter().sum();
            let want: u64 = expected.iter().sum();
            println!("working  {total}/{want} deliveries finished");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handled_in = wait_started.elapsed();

    println!();
    println!(
        "{:<12} {:<13} {:>8} {:>8} {:>14} {:>8} {:>13}",
        "handler", "version", "produced", "handled", "dead-lettered", "retries", "mean handle"
    );
    for (running, expected) in runtime.handlers().iter().zip(&expected) {
        let stats = &running.stats;
        let calls = stats.calls.load(Ordering::Relaxed).max(1);
        println!(
            "{:<12} {:<13} {:>8} {:>8} {:>14} {:>8} {:>10} µs",
            running.handler.name,
            running.handler.compiled.version(),
            expected,
            stats.handled.load(Ordering::Relaxed),
            stats.dead_lettered.load(Ordering::Relaxed),
            stats.retries.load(Ordering::Relaxed),
            stats.busy_micros.load(Ordering::Relaxed) / calls,
        );
    }
    let conflicts: u64 = runtime
        .handlers()
        .iter()
        .map(|r| r.stats.conflicts.load(Ordering::Relaxed))
        .sum();
    let relay = runtime.relay_stats();
    if serve {
        println!("serving the handlers and the status page until Ctrl-C");
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for Ctrl-C")?;
    }
    runtime.stop(config.runtime.shutdown_timeout).await;
    let _ = admin_stop.send(true);
    println!();
    println!(
        "(handled can exceed produced: handlers also get what other handlers emit to their topics)"
    );
    println!(
        "{} events emitted by handlers were published through the outbox; \
         {conflicts} calls re-ran because state they read changed first; \
         read the state with `weir state list <handler>` after `weir run`",
        relay.published.load(Ordering::Relaxed)
    );
    println!(
        "all events handled in {:.2} s (total run {:.2} s); dead letters are in <topic>.dlq",
        handled_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!("next: `weir run` serves the same handlers until Ctrl-C; see README.md");
    drop(broker);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// A fresh directory for the demo's database.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("weir-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Produces `events` order events round-robin over `topics`, concurrently,
/// and returns how many went to each topic.
async fn produce(
    cluster: &Cluster,
    topics: &[String],
    events: usize,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let producer = KafkaProducer::new(cluster, "weir-demo")?;
    let mut sends = tokio::task::JoinSet::new();
    let mut counts = BTreeMap::new();
    for i in 0..events {
        let topic = topics[i % topics.len()].clone();
        *counts.entry(topic.clone()).or_insert(0) += 1;
        let customer = format!("customer-{}", i % 17);
        let payload = order_event(i);
        let producer = producer.clone();
        sends.spawn(async move {
            let headers = [("event_id".to_string(), format!("demo-{i}").into_bytes())];
            producer
                .send(
                    &topic,
                    Some(customer.as_bytes()),
                    payload.as_bytes(),
                    &headers,
                )
                .await
        });
    }
    while let Some(joined) = sends.join_next().await {
        joined.context("producer task failed")??;
    }
    Ok(counts)
}

/// A seed-format order event; one in ten is malformed.
fn order_event(i: usize) -> String {
    let event_type = EVENT_TYPES[i % EVENT_TYPES.len()];
    match i % 20 {
        6 => format!("{{\"event_id\": \"demo-{i}\", \"event_type\": \"{event_type}\""),
        16 => format!(
            "{{\"event_id\": \"demo-{i}\", \"event_type\": \"{event_type}\", \"timestamp\": \"2026-11-23T10:00:00Z\", \"data\": {{}}, \"metadata\": {{\"correlation_id\": \"c-{i}\"}}}}"
        ),
        _ => format!(
            "{{\"event_id\": \"demo-{i}\", \"event_type\": \"{event_type}\", \"aggregate_id\": \"order-{}\", \"timestamp\": \"2026-11-23T10:00:00Z\", \"data\": {{\"amount_cents\": {}}}, \"metadata\": {{\"correlation_id\": \"c-{i}\"}}}}",
            i % 50,
            1000 + i
        ),
    }
}
