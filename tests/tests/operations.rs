//! Failures as operations, against a real broker (Kafka on tansu, NATS
//! JetStream on nats-server): a handler whose dependency goes down opens
//! its circuit breaker instead of dead-lettering the stream, and handles
//! every message exactly once, in key order, once the dependency is back.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weir_tests::admin::{get, scrape};
use weir_tests::{BrokerKind, Record, TestBroker, broker_test, free_port, poll_until, stop};

const WAIT: Duration = Duration::from_secs(90);

fn record(key: &str, id: &str) -> Record {
    Record {
        partition: None,
        key: Some(key.as_bytes().to_vec()),
        value: format!("{{\"id\":\"{id}\"}}").into_bytes(),
        headers: vec![("event_id".to_string(), id.as_bytes().to_vec())],
    }
}

/// The manifest of the handler under test, its dependency `dependency`.
fn manifest(dependency: &str) -> String {
    format!(
        "topics = [\"orders\"]\n\n[retry]\nmax_attempts = 4\ninitial_delay = \"20ms\"\njitter = 0.0\n\n\
         [breaker]\nfailure_threshold = 3\nreset_timeout = \"500ms\"\n\n\
         [config]\ndependency = \"{dependency}\"\n"
    )
}

fn breaker_pauses_while_the_dependency_is_down(kind: BrokerKind) -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = kind.start()?;
    let broker: &dyn TestBroker = broker.as_ref();
    broker.create_topic("orders", 2)?;
    broker.create_output_topic("orders.dlq")?;
    let deployment = broker.deployment()?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    deployment.add_handler("sdk-probe", "dep", &manifest("down"))?;
    let mut weir = deployment.start("breaker")?;
    let log = weir.log.clone();

    // 24 events over 4 keys, in order within each key.
    let keys = ["a", "b", "c", "d"];
    let records: Vec<Record> = (0..24)
        .map(|i| record(keys[i % 4], &format!("ev-{i:02}")))
        .collect();
    broker.produce("orders", &records)?;

    let series =
        |name: &str| format!("{name}{{topic=\"orders\",consumer_group=\"weir.dep\",status=");
    let count = |s: &BTreeMap<String, f64>, status: &str| {
        s.get(&format!(
            "{}\"{status}\"}}",
            series("messages_consumed_total")
        ))
        .copied()
        .unwrap_or(0.0)
    };
    let state = |s: &BTreeMap<String, f64>, state: &str| {
        s.get(&format!(
            "weir_circuit_breaker_state{{handler=\"dep\",state=\"{state}\"}}"
        ))
        .copied()
    };
    // Down: the breaker opens, and probes keep failing (six failed calls:
    // at least two of them probes) without a single dead letter, though
    // each message may fail only four times.
    let opened = poll_until(
        WAIT,
        "the breaker to open and probes to fail",
        || {
            let s = scrape(port);
            let failed = count(&s, "failed");
            Ok((state(&s, "open") == Some(1.0) && failed >= 6.0).then_some(s))
        },
        || format!("log: {}", log.display()),
    )?;
    ensure!(
        count(&opened, "dead_lettered") == 0.0 && count(&opened, "handled") == 0.0,
        "while down: {opened:?}"
    );
    let (code, body) = get(port, "/handlers")?;
    let handlers: Value = serde_json::from_str(&body).context("handlers JSON")?;
    ensure!(
        code == 200
            && handlers["handlers"][0]["breaker"]
                .as_str()
                .is_some_and(|s| s == "open" || s == "half_open"),
        "breaker not shown in /handlers: {body}"
    );
    ensure!(
        weir.records().iter().any(|r| r["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("circuit breaker opened"))),
        "the opening was not logged; log: {}",
        log.display()
    );

    // Back: a manifest reload brings the dependency up; the next probe
    // closes the breaker and every message is handled once.
    deployment.add_handler("sdk-probe", "dep", &manifest("up"))?;
    let done = poll_until(
        WAIT,
        "every message handled after the dependency came back",
        || {
            let s = scrape(port);
            Ok((count(&s, "handled") == 24.0 && state(&s, "closed") == Some(1.0)).then_some(s))
        },
        || format!("log: {}", log.display()),
    )?;
    ensure!(
        count(&done, "dead_lettered") == 0.0,
        "dead letters: {done:?}"
    );
    ensure!(
        broker.read("orders.dlq")?.is_empty(),
        "orders.dlq is not empty"
    );

    // Exactly once, in key order: the successful calls, per key, are the
    // key's events in the order produced.
    let mut handled: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for fields in weir.guest_records("dep", "sdk-probe") {
        if fields["outcome"] == "ok" {
            let key = fields["key"].as_str().unwrap_or_default().to_string();
            let id = fields["id"].as_str().unwrap_or_default().to_string();
            handled.entry(key).or_default().push(id);
        }
    }
    for (index, key) in keys.iter().enumerate() {
        let expected: Vec<String> = (0..24)
            .filter(|i| i % 4 == index)
            .map(|i| format!("ev-{i:02}"))
            .collect();
        ensure!(
            handled.get(*key) == Some(&expected),
            "key {key}: handled {:?}, expected {expected:?}",
            handled.get(*key)
        );
    }
    stop(&mut weir)?;
    Ok(())
}

#[test]
fn kafka_breaker_pauses_while_the_dependency_is_down() -> Result<()> {
    breaker_pauses_while_the_dependency_is_down(BrokerKind::Kafka)
}

#[test]
fn nats_breaker_pauses_while_the_dependency_is_down() -> Result<()> {
    breaker_pauses_while_the_dependency_is_down(BrokerKind::Nats)
}
