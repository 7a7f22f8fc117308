//! The admin server of a running `weir`, against a real broker (Kafka on
//! tansu, NATS JetStream on nats-server): `/metrics` counts exactly what
//! the test produced, handled, retried and dead-lettered, under the
//! standard names; `/health/ready` says ready, and not ready (naming the
//! file) once a broken handler is dropped in, while the outbox cannot
//! publish, and while the consumer has lost its server; `/handlers` lists
//! what runs; the log records of an event carry its correlation id.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;
use weir_tests::admin::{get, ready_until, samples};
use weir_tests::{
    BrokerKind, COMMAND_WAIT, Record, TestBroker, broker_test, free_port, output_within,
    poll_until, stop,
};

const WAIT: Duration = Duration::from_secs(90);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn record(key: &str, id: &str, fail: Option<&str>) -> Record {
    let mut headers = vec![("event_id".to_string(), id.as_bytes().to_vec())];
    if let Some(fail) = fail {
        headers.push(("probe.fail".to_string(), fail.as_bytes().to_vec()));
    }
    Record {
        partition: None,
        key: Some(key.as_bytes().to_vec()),
        value: format!("{{\"id\":\"{id}\"}}").into_bytes(),
        headers,
    }
}

fn metrics_match(kind: BrokerKind) -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = kind.start()?;
    let broker: &dyn TestBroker = broker.as_ref();
    broker.create_topic("events", 2)?;
    broker.create_output_topic("events.dlq")?;
    broker.create_output_topic("counts")?;
    // 20 handled; 5 copies of handled ids on their key (duplicates); 3
    // permanent failures (validation); 2 that fail both of their attempts.
    let mut records = Vec::new();
    for i in 0..20 {
        records.push(record(&format!("k{}", i % 4), &format!("ev-{i}"), None));
    }
    // Correlation: ev-19 carries a correlation id and trace context in
    // headers, perm-0 (below) a correlation id in its JSON envelope.
    if let Some(last) = records.last_mut() {
        for (name, value) in [("correlation_id", "c-19"), ("traceparent", TRACEPARENT)] {
            last.headers
                .push((name.to_string(), value.as_bytes().to_vec()));
        }
    }
    for i in 0..5 {
        records.push(record(&format!("k{}", i % 4), &format!("ev-{i}"), None));
    }
    for i in 0..3 {
        records.push(record(
            "bad",
            &format!("perm-{i}"),
            Some("permanent:validation"),
        ));
    }
    records[25].value = br#"{"id":"perm-0","metadata":{"correlation_id":"c-perm"}}"#.to_vec();
    for i in 0..2 {
        records.push(record("flaky", &format!("retry-{i}"), Some("retryable")));
    }
    broker.produce("events", &records)?;

    let deployment = broker.deployment()?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    deployment.add_handler(
        "sdk-probe",
        "probe",
        "topics = [\"events\"]\n\n[retry]\nmax_attempts = 2\ninitial_delay = \"10ms\"\njitter = 0.0\n",
    )?;
    // Beside it, a handler that keeps state: read through the admin server
    // while weir holds the database.
    deployment.add_handler(
        "counter",
        "counter",
        "topics = [\"events\"]\n\n[config]\noutput_topic = \"counts\"\n",
    )?;
    // Weir's own per-message log events are at debug.
    let mut weir = deployment.start_with_env("run", &[("WEIR_LOG", "info,weir=debug")])?;
    let log = weir.log.clone();

    let consumed = |status: &str| {
        format!(
            "messages_consumed_total{{topic=\"events\",consumer_group=\"weir.probe\",status=\"{status}\"}}"
        )
    };
    let text = poll_until(
        WAIT,
        "the metrics to count every message",
        || {
            let Ok((200, text)) = get(port, "/metrics") else {
                return Ok(None);
            };
            let s = samples(&text);
            let done = s.get(&consumed("handled")).copied() == Some(20.0)
                && s.get(&consumed("duplicate")).copied() == Some(5.0)
                && s.get(&consumed("dead_lettered")).copied() == Some(5.0);
            Ok(done.then_some(text))
        },
        || format!("log: {}", log.display()),
    )?;
    let s = samples(&text);
    let expect = |name: String, value: f64| -> Result<()> {
        ensure!(
            s.get(&name).copied() == Some(value),
            "{name} = {:?}, expected {value}; exposition:\n{text}",
            s.get(&name)
        );
        Ok(())
    };
    expect(consumed("handled"), 20.0)?;
    expect(consumed("duplicate"), 5.0)?;
    expect(consumed("dead_lettered"), 5.0)?;
    // Every failed attempt: 3 permanent + 2 × 2 retryable.
    expect(consumed("failed"), 7.0)?;
    expect(consumed("retried"), 2.0)?;
    expect(
        "dlq_messages_total{topic=\"events\",error_type=\"validation\"}".into(),
        3.0,
    )?;
    expect(
        "dlq_messages_total{topic=\"events\",error_type=\"retryable\"}".into(),
        2.0,
    )?;
    // Dead letters, over the partitions they went to.
    let dead_letters: f64 = s
        .iter()
        .filter(|(k, _)| k.starts_with("messages_produced_total{topic=\"events.dlq\",partition="))
        .map(|(_, v)| v)
        .sum();
    ensure!(
        dead_letters == 5.0,
        "{dead_letters} dead letters produced:\n{text}"
    );
    for family in [
        "weir_handler_instances{handler=\"probe\",state=\"idle\"}",
        "weir_outbox_rows",
        "weir_outbox_oldest_age_seconds",
    ] {
        ensure!(s.contains_key(family), "no {family}:\n{text}");
    }
    // Calls: 20 handled + 7 failed attempts, and a copy of a handled id
    // only when it ran in the same run as its original, before the
    // original's mark was committed (then caught at commit).
    let calls = s
        .get("message_processing_duration_seconds_count{topic=\"events\",consumer_group=\"weir.probe\"}")
        .copied()
        .unwrap_or_default();
    ensure!(
        (27.0..=32.0).contains(&calls),
        "{calls} calls timed, expected 27 to 32:\n{text}"
    );
    ensure!(
        s.keys()
            .any(|k| k.starts_with("weir_handler_info{handler=\"probe\",version=")),
        "no weir_handler_info for probe:\n{text}"
    );

    // Lag: every partition of `events` the probe consumes reaches 0, as
    // the consumer reports it (every 5 s).
    poll_until(
        WAIT,
        "consumer_lag of weir.probe to reach 0 on every partition",
        || {
            let (_, text) = get(port, "/metrics")?;
            let s = samples(&text);
            let of = |family: &str| -> Vec<f64> {
                let prefix = format!("{family}{{topic=\"events\",consumer_group=\"weir.probe\"");
                s.iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .map(|(_, v)| *v)
                    .collect()
            };
            let lags = of("consumer_lag");
            // Nothing behind: no committed position is ageing.
            let ages = of("weir_committed_position_age_seconds");
            Ok((!lags.is_empty()
                && lags.iter().all(|l| *l == 0.0)
                && ages.len() == lags.len()
                && ages.iter().all(|a| *a == 0.0))
            .then_some(()))
        },
        || match get(port, "/metrics") {
            Ok((_, text)) => format!(
                "lag lines: {:?}; log: {}",
                text.lines()
                    .filter(|l| l.starts_with("consumer_lag"))
                    .collect::<Vec<_>>(),
                log.display()
            ),
            Err(err) => format!("{err:#}"),
        },
    )?;

    // The standard log events, with their context fields.
    let mut wanted = vec![
        "message_consumed",
        "message_acked",
        "message_dlq",
        "message_produced",
        "consumer_lag",
    ];
    if kind == BrokerKind::Kafka {
        wanted.push("rebalance");
    }
    poll_until(
        WAIT,
        "every standard log event",
        || {
            let records = weir.records();
            let seen = |name: &str| {
                // JSON logs carry their fields at the top level.
                records.iter().any(|f| {
                    f["event"] == name
                        && (name == "rebalance" || f["topic"].is_string())
                        && (name != "message_acked"
                            || (f["latency_ms"].is_number() && f["consumer_group"] == "weir.probe"))
                })
            };
            Ok(wanted.iter().all(|name| seen(name)).then_some(()))
        },
        || {
            let seen: std::collections::BTreeSet<String> = weir
                .records()
                .iter()
                .filter_map(|r| r["event"].as_str().map(String::from))
                .collect();
            format!("events seen: {seen:?}; log: {}", log.display())
        },
    )?;

    let (code, body) = get(port, "/health/live")?;
    ensure!(code == 200, "live: {code} {body}");
    let (code, body) = get(port, "/health/ready")?;
    ensure!(code == 200, "ready: {code} {body}");
    let (code, body) = get(port, "/handlers")?;
    ensure!(code == 200, "handlers: {code} {body}");
    let handlers: Value = serde_json::from_str(&body).context("handlers JSON")?;
    let probe = handlers["handlers"]
        .as_array()
        .and_then(|list| list.iter().find(|h| h["name"] == "probe"))
        .ok_or_else(|| anyhow!("no probe in {body}"))?;
    ensure!(
        probe["name"] == "probe"
            && probe["group"] == "weir.probe"
            && probe["topics"][0] == "events"
            && probe["handled"] == 20
            && probe["dead_lettered"] == 5
            && probe["in_flight"] == 0,
        "handlers: {body}"
    );

    // `weir state` while weir runs (and holds the database): through the
    // admin server. 25 distinct events; the 3 on key "bad" count 3.
    poll_until(
        WAIT,
        "the counter to count every distinct event",
        || {
            let listing =
                deployment.weir(&["state", "list", "counter", "--prefix", "count/", "--json"])?;
            let total: u64 = listing
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|e| e["value"].as_str()?.parse::<u64>().ok())
                .sum();
            Ok((total == 25).then_some(()))
        },
        || format!("log: {}", log.display()),
    )?;
    let bad = deployment.weir(&["state", "get", "counter", "count/bad"])?;
    ensure!(bad.trim() == "3", "count/bad = {bad:?}");

    // The counter's event for ev-19 carries its correlation id, trace
    // context and causation; perm-0's dead letter its envelope's id.
    let counts = poll_until(
        WAIT,
        "the counter's event for ev-19",
        || {
            let stored = broker.read("counts")?;
            Ok(stored
                .into_iter()
                .find(|r| r.header("weir.source-event-id").as_deref() == Some("ev-19")))
        },
        || format!("log: {}", log.display()),
    )?;
    ensure!(
        counts.header("correlation_id").as_deref() == Some("c-19")
            && counts.header("traceparent").as_deref() == Some(TRACEPARENT)
            && counts.header("causation_id").as_deref() == Some("ev-19"),
        "emitted event headers: {:?}",
        counts.headers
    );
    let dead = broker.read("events.dlq")?;
    let perm = dead
        .iter()
        .find(|r| r.header("weir.event-id").as_deref() == Some("perm-0"))
        .ok_or_else(|| anyhow!("no dead letter for perm-0"))?;
    ensure!(
        perm.header("correlation_id").as_deref() == Some("c-perm"),
        "dead letter headers: {:?}",
        perm.headers
    );
    // The log records of handling those events carry the same ids: the
    // handler's own record, and weir's dead-letter event.
    let records = weir.records();
    let logged = |event_id: &str, what: &dyn Fn(&Value) -> bool| {
        records.iter().any(|r| r["event_id"] == event_id && what(r))
    };
    ensure!(
        logged("ev-19", &|r| r["target"] == "weir::guest"
            && r["handler"] == "probe"
            && r["correlation_id"] == "c-19"
            && r["traceparent"] == TRACEPARENT),
        "no handler log record for ev-19 with its correlation id and traceparent; log: {}",
        log.display()
    );
    ensure!(
        logged("perm-0", &|r| r["event"] == "message_dlq"
            && r["correlation_id"] == "c-perm"),
        "no message_dlq record for perm-0 with its correlation id; log: {}",
        log.display()
    );

    // A broken file makes the process not ready, naming it; the good
    // handler keeps serving.
    std::fs::write(deployment.handlers().join("broken.wasm"), b"not wasm")?;
    std::fs::write(
        deployment.handlers().join("broken.toml"),
        "topics = [\"events\"]\n",
    )?;
    let body = poll_until(
        WAIT,
        "ready to turn false for the broken handler",
        || {
            let (code, body) = get(port, "/health/ready")?;
            Ok((code == 503).then_some(body))
        },
        || format!("log: {}", log.display()),
    )?;
    let ready: Value = serde_json::from_str(&body).context("ready JSON")?;
    ensure!(
        ready["ready"] == false
            && ready["not_ready"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["check"] == "load"
                    && p["file"]
                        .as_str()
                        .is_some_and(|f| f.ends_with("broken.wasm")))),
        "ready: {body}"
    );
    stop(&mut weir)?;
    Ok(())
}

#[test]
fn kafka_metrics_count_what_happened_and_health_tells_why() -> Result<()> {
    metrics_match(BrokerKind::Kafka)
}

#[test]
fn nats_metrics_count_what_happened_and_health_tells_why() -> Result<()> {
    metrics_match(BrokerKind::Nats)
}

/// With nothing deployed, weir starts, says it is not ready ("no
/// handlers"), and serves a handler as soon as its files are copied in.
#[test]
fn an_empty_handlers_directory_waits_for_a_deployment() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = BrokerKind::Kafka.start()?;
    let broker: &dyn TestBroker = broker.as_ref();
    broker.create_topic("events", 1)?;
    let deployment = broker.deployment()?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir = deployment.start("empty")?;
    let log = weir.log.clone();
    let body = poll_until(
        WAIT,
        "the admin server to say there are no handlers",
        || {
            let Ok((code, body)) = get(port, "/health/ready") else {
                return Ok(None);
            };
            Ok((code == 503 && body.contains("no handlers")).then_some(body))
        },
        || format!("log: {}", log.display()),
    )?;
    ensure!(body.contains("\"ready\":false"), "ready: {body}");
    deployment.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    broker.produce("events", &[record("k", "ev-1", None)])?;
    poll_until(
        WAIT,
        "the deployed handler to serve and weir to be ready",
        || {
            let Ok((200, text)) = get(port, "/metrics") else {
                return Ok(None);
            };
            let handled = samples(&text)
                .get("messages_consumed_total{topic=\"events\",consumer_group=\"weir.probe\",status=\"handled\"}")
                .copied();
            let ready = get(port, "/health/ready")
                .map(|(code, _)| code)
                .unwrap_or(0);
            Ok((handled == Some(1.0) && ready == 200).then_some(()))
        },
        || format!("log: {}", log.display()),
    )?;
    stop(&mut weir)?;
    Ok(())
}

/// Whether `ready` names a problem of `check` whose reason contains `text`.
fn names(ready: &Value, check: &str, text: &str) -> bool {
    ready["not_ready"].as_array().is_some_and(|problems| {
        problems
            .iter()
            .any(|p| p["check"] == check && p["reason"].as_str().is_some_and(|r| r.contains(text)))
    })
}

/// Ready turns false, saying why, while the outbox cannot publish (its
/// destination stream is full) and while the consumer has lost its server,
/// and true again once each is fixed; the emitted events all arrive.
#[test]
fn ready_says_when_the_outbox_is_blocked_or_the_consumer_is_gone() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let mut nats = weir_tests::NatsBroker::start()?;
    nats.create_topic("events", 1)?;
    // The counter's output stream takes one message, then refuses.
    nats.nats
        .add_limited_stream("COUNTS", &["counts"], Some(1))?;
    let deployment = nats.deployment()?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    deployment.add_handler(
        "counter",
        "counter",
        "topics = [\"events\"]\n\n[config]\noutput_topic = \"counts\"\n",
    )?;
    let mut weir = deployment.start("ready")?;
    let log = weir.log.clone();
    ready_until(port, "ready at first", WAIT, &log, |code, _| code == 200)?;

    let records: Vec<Record> = (0..3)
        .map(|i| record("k", &format!("ev-{i}"), None))
        .collect();
    nats.produce("events", &records)?;
    let blocked = ready_until(
        port,
        "not ready: the outbox is blocked on counts",
        WAIT,
        &log,
        |code, body| code == 503 && names(body, "outbox", "counts"),
    )?;
    ensure!(blocked["ready"] == false, "{blocked}");
    // Room in the stream: the relay publishes the rest and ready returns.
    nats.nats.delete_stream("COUNTS")?;
    ready_until(
        port,
        "ready once counts takes messages",
        WAIT,
        &log,
        |code, _| code == 200,
    )?;
    poll_until(
        WAIT,
        "the emitted events after the stream was replaced",
        || Ok((nats.read("counts")?.len() >= 2).then_some(())),
        || format!("log: {}", log.display()),
    )?;

    // The server goes away: the consumer is not joined; back: ready.
    nats.server.stop()?;
    ready_until(
        port,
        "not ready: the consumer lost its server",
        WAIT,
        &log,
        |code, body| code == 503 && names(body, "consumer", ""),
    )?;
    nats.server.restart()?;
    ready_until(
        port,
        "ready once the server is back",
        WAIT,
        &log,
        |code, _| code == 200,
    )?;
    stop(&mut weir)?;
    Ok(())
}

/// Chromium from `$CHROMIUM_BIN`, else Debian's `/usr/bin/chromium`.
fn chromium() -> Result<std::path::PathBuf> {
    let path = std::env::var_os("CHROMIUM_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    weir_tests::require(
        path,
        "a Chromium browser for the status page test",
        "install Debian's chromium (`bash .ci/install-test-tools` does, as root) or set CHROMIUM_BIN",
    )
}

/// The status page, loaded from a running weir in a real headless browser,
/// shows the handler with its version and what it handled.
#[test]
fn the_status_page_shows_each_handler_in_a_browser() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let browser = chromium()?;
    let broker = BrokerKind::Kafka.start()?;
    let broker: &dyn TestBroker = broker.as_ref();
    broker.create_topic("events", 1)?;
    let records: Vec<Record> = (0..10)
        .map(|i| record("k", &format!("ev-{i}"), None))
        .collect();
    broker.produce("events", &records)?;
    let deployment = broker.deployment()?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    deployment.add_handler("sdk-probe", "probe", "topics = [\"events\"]\n")?;
    let mut weir = deployment.start("page")?;
    let log = weir.log.clone();
    let version = poll_until(
        WAIT,
        "the probe to handle all ten",
        || {
            let Ok((200, body)) = get(port, "/handlers") else {
                return Ok(None);
            };
            let handlers: Value = serde_json::from_str(&body)?;
            let probe = &handlers["handlers"][0];
            Ok((probe["handled"] == 10).then(|| probe["version"].as_str().map(String::from)))
        },
        || format!("log: {}", log.display()),
    )?
    .context("no version")?;
    let profile = tempfile::tempdir()?;
    let output = output_within(
        std::process::Command::new(&browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=5000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("http://127.0.0.1:{port}/")),
        COMMAND_WAIT,
    )?;
    let dom = String::from_utf8_lossy(&output.stdout);
    let row = dom
        .split("<tr data-handler=\"probe\">")
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .ok_or_else(|| {
            anyhow!(
                "no row for probe in the page; chromium exited {}: {}\nDOM:\n{dom}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    ensure!(
        row.contains(&format!("<td class=\"text\">{version}</td>"))
            && row.contains("<td>10</td>")
            && row.contains("running"),
        "probe's row: {row}"
    );
    ensure!(dom.contains("ready ·"), "page state: {dom}");
    stop(&mut weir)?;
    Ok(())
}
