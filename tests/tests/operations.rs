//! Failures as operations, against a real broker (Kafka on tansu, NATS
//! JetStream on nats-server, Redis Streams on redis-server; RabbitMQ and
//! SQS queues cannot be read back or rewound, so the dead-letter tools and
//! replay do not apply there):
//!
//! - a handler whose dependency goes down opens its circuit breaker
//!   instead of dead-lettering the stream, and handles every message
//!   exactly once, in key order, once the dependency is back;
//! - `weir dlq` lists dead letters with their origin, replays them so that
//!   each is handled again exactly once (replaying twice included), and
//!   purges what its filter selects, leaving the rest;
//! - `weir replay --reset-state` rebuilds a projection from its input: the
//!   rebuilt state equals what the first run built; where the broker cannot
//!   rewind (a queue), it fails having forgotten nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weir_tests::admin::{get, post_json, scrape};
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

/// The dead letters `weir dlq list <args> --json` prints.
fn listed(deployment: &weir_tests::Deployment, args: &[&str]) -> Result<Value> {
    let mut all = vec!["dlq", "list"];
    all.extend(args);
    all.push("--json");
    let (out, err) = deployment.weir_output(&all)?;
    // The normal end of a partition is no error.
    ensure!(
        !err.contains("PartitionEOF"),
        "weir dlq list reported the end of a partition as an error: {err}"
    );
    serde_json::from_str(&out).with_context(|| format!("weir dlq list output: {out}"))
}

fn dead_letters_are_listed_replayed_once_and_purged(kind: BrokerKind) -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = kind.start()?;
    let broker: &dyn TestBroker = broker.as_ref();
    // orders.dlq is not created here: weir creates it (Kafka: like orders).
    broker.create_topic("orders", 1)?;
    broker.create_topic("other", 1)?;
    let deployment = broker.deployment()?;
    let port = free_port()?;
    deployment.admin_port(port)?;
    // A handler whose dead-letter topic is missing and may not be created.
    deployment.add_handler(
        "sdk-probe",
        "strict",
        "topics = [\"other\"]\n\n[dlq]\ncreate = false\n",
    )?;
    let manifest = |dependency: &str| {
        format!(
            "topics = [\"orders\"]\n\n[retry]\ndelays = [\"10ms\"]\n\n\
             [config]\ndependency = \"{dependency}\"\n"
        )
    };
    deployment.add_handler("sdk-probe", "dep", &manifest("down"))?;
    let mut weir = deployment.start("dlq")?;
    let log = weir.log.clone();
    let ready = poll_until(
        WAIT,
        "ready to name strict's missing dead-letter topic",
        || {
            let Ok((503, body)) = get(port, "/health/ready") else {
                return Ok(None);
            };
            let ready: Value = serde_json::from_str(&body).context("ready JSON")?;
            let named = ready["not_ready"].as_array().is_some_and(|problems| {
                problems.iter().any(|p| {
                    p["check"] == "dead_letters"
                        && p["handler"] == "strict"
                        && p["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("other.dlq"))
                })
            });
            Ok(named.then_some(ready))
        },
        || format!("log: {}", log.display()),
    )?;
    ensure!(
        !ready["not_ready"]
            .as_array()
            .is_some_and(|problems| problems
                .iter()
                .any(|p| p["check"] == "dead_letters" && p["handler"] == "dep")),
        "dep's dead-letter topic was not created: {ready}"
    );

    // Six events fail while the dependency is down (retryable: two
    // attempts each, the explicit schedule's one delay between them); two
    // are invalid (permanent, category validation).
    let mut records: Vec<Record> = (0..6)
        .map(|i| record(["a", "b"][i % 2], &format!("ev-{i}")))
        .collect();
    for i in 0..2 {
        let mut invalid = record("c", &format!("bad-{i}"));
        invalid
            .headers
            .push(("probe.fail".into(), b"permanent:validation".to_vec()));
        records.push(invalid);
    }
    broker.produce("orders", &records)?;
    let count = |status: &str| {
        scrape(port)
            .get(&format!(
                "messages_consumed_total{{topic=\"orders\",consumer_group=\"weir.dep\",status=\"{status}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
    };
    poll_until(
        WAIT,
        "eight dead letters",
        || Ok((count("dead_lettered") == 8.0).then_some(())),
        || format!("log: {}", log.display()),
    )?;

    // The depth the running weir measures. (tansu answers ListOffsets
    // with batch counts, so on Kafka the depth is only known to be there.)
    poll_until(
        WAIT,
        "weir_dlq_depth of orders.dlq to reach 8",
        || {
            let s = scrape(port);
            let depth = s.get("weir_dlq_depth{topic=\"orders.dlq\"}").copied();
            let age = s
                .get("weir_dlq_oldest_age_seconds{topic=\"orders.dlq\"}")
                .copied();
            let counted = match kind {
                BrokerKind::Kafka => depth.is_some_and(|d| d >= 1.0),
                _ => depth == Some(8.0),
            };
            Ok((counted && age.is_some()).then_some(()))
        },
        || format!("metrics: {:?}; log: {}", scrape(port), log.display()),
    )?;

    // List: every dead letter with its origin, and the summary.
    let all = listed(&deployment, &["dep"])?;
    let letters = all["dead_letters"].as_array().cloned().unwrap_or_default();
    ensure!(letters.len() == 8, "listed: {all}");
    ensure!(
        all["summary"][0]["dlq"] == "orders.dlq"
            && all["summary"][0]["depth"] == 8
            && all["summary"][0]["oldest_age_seconds"].is_u64(),
        "summary: {all}"
    );
    for letter in &letters {
        let id = letter["event_id"].as_str().unwrap_or_default();
        let (kind, attempts) = if id.starts_with("bad-") {
            ("permanent", 1)
        } else {
            ("retryable", 2)
        };
        ensure!(
            letter["handler"] == "dep"
                && letter["kind"] == kind
                && letter["attempts"] == attempts
                && letter["origin_topic"] == "orders"
                && !letter["origin"].as_str().unwrap_or_default().is_empty(),
            "dead letter: {letter}"
        );
    }
    let invalid = listed(&deployment, &["dep", "--error-kind", "validation"])?;
    ensure!(
        invalid["dead_letters"].as_array().map(Vec::len) == Some(2),
        "--error-kind validation: {invalid}"
    );

    // Replay the six retryable ones, twice, once the dependency is back:
    // each is handled exactly once.
    deployment.add_handler("sdk-probe", "dep", &manifest("up"))?;
    poll_until(
        WAIT,
        "the manifest reload",
        || {
            Ok(scrape(port)
                .get("weir_handler_reloads_total{handler=\"dep\",result=\"applied\"}")
                .is_some_and(|n| *n >= 1.0)
                .then_some(()))
        },
        || format!("log: {}", log.display()),
    )?;
    let dry = deployment.weir(&[
        "dlq",
        "replay",
        "dep",
        "--error-kind",
        "retryable",
        "--dry-run",
    ])?;
    ensure!(dry.contains("would replay 6"), "dry run: {dry}");
    for _ in 0..2 {
        let out = deployment.weir(&["dlq", "replay", "dep", "--error-kind", "retryable"])?;
        ensure!(out.contains("replayed 6 "), "replay: {out}");
    }
    // The second replay's copies: skipped by weir's dedup on Kafka; on
    // NATS, JetStream's duplicate window drops them first (the replay id
    // is their Nats-Msg-Id).
    let copies = match kind {
        BrokerKind::Nats => 0.0,
        _ => 6.0,
    };
    poll_until(
        WAIT,
        "the replayed events handled once and their copies skipped",
        || Ok((count("handled") == 6.0 && count("duplicate") == copies).then_some(())),
        || {
            format!(
                "handled {}, duplicate {}; log: {}",
                count("handled"),
                count("duplicate"),
                log.display()
            )
        },
    )?;
    let mut handled: Vec<String> = weir
        .guest_records("dep", "sdk-probe")
        .into_iter()
        .filter(|fields| fields["outcome"] == "ok")
        .filter_map(|fields| fields["id"].as_str().map(String::from))
        .collect();
    // (A copy that ran before the first one's commit is called, and its
    // effects dropped at commit: the counters above say handled once.)
    handled.sort();
    handled.dedup();
    let originals: Vec<String> = handled
        .iter()
        .filter_map(|id| id.split_once("#replay:").map(|(id, _)| id.to_string()))
        .collect();
    ensure!(
        originals == (0..6).map(|i| format!("ev-{i}")).collect::<Vec<_>>(),
        "handled: {handled:?}"
    );
    ensure!(count("dead_lettered") == 8.0, "replays were dead-lettered");

    // Purge: refused without a filter; with one, it leaves the rest.
    ensure!(
        deployment.weir(&["dlq", "purge", "dep"]).is_err(),
        "a purge without a filter was not refused"
    );
    if kind != BrokerKind::Kafka {
        // (tansu, the Kafka-protocol test broker, does not implement
        // DeleteRecords.)
        let out = deployment.weir(&["dlq", "purge", "dep", "--error-kind", "retryable"])?;
        ensure!(out.contains("removed 6 of 6"), "purge: {out}");
        let left = listed(&deployment, &["dep"])?;
        let ids: Vec<&str> = left["dead_letters"]
            .as_array()
            .map(|l| l.iter().filter_map(|d| d["event_id"].as_str()).collect())
            .unwrap_or_default();
        ensure!(ids == ["bad-0", "bad-1"], "left after the purge: {left}");
    }
    stop(&mut weir)?;
    Ok(())
}

/// The counter's state: key → count, read with `weir state list`.
fn counts(deployment: &weir_tests::Deployment) -> Result<BTreeMap<String, String>> {
    let out = deployment.weir(&["state", "list", "counter", "--prefix", "count/", "--json"])?;
    let mut counts = BTreeMap::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let entry: Value =
            serde_json::from_str(line).with_context(|| format!("state line {line}"))?;
        if let (Some(key), Some(value)) = (entry["key"].as_str(), entry["value"].as_str()) {
            counts.insert(key.to_string(), value.to_string());
        }
    }
    Ok(counts)
}

fn a_replay_rebuilds_the_projection(kind: BrokerKind) -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = kind.start()?;
    let broker: &dyn TestBroker = broker.as_ref();
    broker.create_topic("events", 2)?;
    broker.create_output_topic("counts")?;
    let deployment = broker.deployment()?;
    deployment.add_handler(
        "counter",
        "counter",
        "topics = [\"events\"]\n\n[config]\noutput_topic = \"counts\"\n",
    )?;
    // 12 events over 3 keys: 4 each.
    let records: Vec<Record> = (0..12)
        .map(|i| record(&format!("k{}", i % 3), &format!("ev-{i}")))
        .collect();
    broker.produce("events", &records)?;
    let expected: BTreeMap<String, String> = (0..3)
        .map(|k| (format!("count/k{k}"), "4".to_string()))
        .collect();

    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir = deployment.start("first")?;
    let log = weir.log.clone();
    poll_until(
        WAIT,
        "the first run to count every event",
        // (Read through the admin server while weir runs; an error while
        // it starts is polled past.)
        || {
            Ok(counts(&deployment)
                .ok()
                .filter(|c| *c == expected)
                .map(|_| ()))
        },
        || format!("log: {}", log.display()),
    )?;
    // From the command line: refused while weir runs.
    let refused = deployment.weir(&["replay", "counter", "--from", "earliest", "--yes"]);
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("stop")),
        "a replay while weir runs: {refused:?}"
    );
    // Through the running weir's admin API: the state is rebuilt, each
    // event counted once more in this process and once in the state.
    let (code, body) = post_json(
        port,
        "/handlers/counter/replay",
        &deployment.admin_token()?,
        &serde_json::json!({"from": "earliest", "reset_state": true}),
        WAIT,
    )?;
    ensure!(
        code == 200 && body.contains("forgot 12 dedup mark(s)"),
        "admin replay: {code} {body}"
    );
    let handled = |s: &BTreeMap<String, f64>| {
        s.get("messages_consumed_total{topic=\"events\",consumer_group=\"weir.counter\",status=\"handled\"}")
            .copied()
    };
    poll_until(
        WAIT,
        "the replay through the admin API to handle every event again",
        || Ok((handled(&scrape(port)) == Some(24.0)).then_some(())),
        || format!("log: {}", log.display()),
    )?;
    ensure!(
        counts(&deployment)? == expected,
        "after the admin replay: {:?}",
        counts(&deployment)
    );
    stop(&mut weir)?;

    // The plan, then the rebuild.
    let plan = deployment.weir(&["replay", "counter", "--from", "earliest", "--reset-state"])?;
    ensure!(
        plan.contains("would forget 12 dedup mark(s)")
            && plan.contains("would delete 3 state key(s)")
            && plan.contains("nothing done"),
        "plan: {plan}"
    );
    ensure!(
        counts(&deployment)? == expected,
        "the plan changed something"
    );
    let done = deployment.weir(&[
        "replay",
        "counter",
        "--from",
        "earliest",
        "--reset-state",
        "--yes",
    ])?;
    ensure!(done.contains("done"), "replay: {done}");
    ensure!(
        counts(&deployment)?.is_empty(),
        "state left after the reset"
    );

    let mut weir = deployment.start("rebuild")?;
    let log = weir.log.clone();
    poll_until(
        WAIT,
        "the rebuilt projection to equal the first one",
        || {
            Ok(counts(&deployment)
                .ok()
                .filter(|c| *c == expected)
                .map(|_| ()))
        },
        || format!("counts: {:?}; log: {}", counts(&deployment), log.display()),
    )?;
    // Every event handled again, once: no count goes past 4.
    let rebuilt = poll_until(
        WAIT,
        "the group to catch up again",
        || {
            let s = scrape(port);
            Ok((handled(&s) == Some(12.0)).then_some(s))
        },
        || format!("log: {}", log.display()),
    )?;
    ensure!(
        counts(&deployment)? == expected,
        "after catching up: {:?}; metrics {rebuilt:?}",
        counts(&deployment)
    );
    stop(&mut weir)?;
    Ok(())
}

#[test]
fn kafka_a_replay_rebuilds_the_projection() -> Result<()> {
    a_replay_rebuilds_the_projection(BrokerKind::Kafka)
}

#[test]
fn nats_a_replay_rebuilds_the_projection() -> Result<()> {
    a_replay_rebuilds_the_projection(BrokerKind::Nats)
}

/// The alert rules in `config/alerts.yml` load, and each fires on the
/// series in `config/alerts.test.yml` that should set it off (promtool's
/// rule unit tests).
#[test]
fn the_alert_rules_load_and_fire() -> Result<()> {
    let promtool = weir_tests::require(
        std::env::var_os("PROMTOOL_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/usr/bin/promtool".into()),
        "promtool, to check the alert rules",
        "install Debian's prometheus package (`bash .ci/install-test-tools` does, as root) or set PROMTOOL_BIN",
    )?;
    let config = weir_tests::workspace().join("config");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let output = weir_tests::output_within(
            std::process::Command::new(&promtool)
                .args(args)
                .current_dir(&config),
            weir_tests::COMMAND_WAIT,
        )?;
        ensure!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[test]
fn kafka_dead_letters_are_listed_replayed_once_and_purged() -> Result<()> {
    dead_letters_are_listed_replayed_once_and_purged(BrokerKind::Kafka)
}

#[test]
fn nats_dead_letters_are_listed_replayed_once_and_purged() -> Result<()> {
    dead_letters_are_listed_replayed_once_and_purged(BrokerKind::Nats)
}

/// A replay the broker cannot do forgets nothing: a queue has no position
/// to move back to, so `weir replay --reset-state --yes` fails, and the
/// state, the dedup marks and the plan are as they were; a weir started
/// again handles nothing twice.
fn a_refused_replay_forgets_nothing(kind: BrokerKind) -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = kind.start()?;
    let broker: &dyn TestBroker = broker.as_ref();
    broker.create_topic("events", 1)?;
    broker.create_output_topic("counts")?;
    let deployment = broker.deployment()?;
    deployment.add_handler(
        "counter",
        "counter",
        "topics = [\"events\"]\n\n[config]\noutput_topic = \"counts\"\n",
    )?;
    let records: Vec<Record> = (0..6)
        .map(|i| record(&format!("k{}", i % 2), &format!("ev-{i}")))
        .collect();
    broker.produce("events", &records)?;
    let expected: BTreeMap<String, String> = (0..2)
        .map(|k| (format!("count/k{k}"), "3".to_string()))
        .collect();
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir = deployment.start("first")?;
    let log = weir.log.clone();
    poll_until(
        WAIT,
        "every event counted",
        || {
            Ok(counts(&deployment)
                .ok()
                .filter(|c| *c == expected)
                .map(|_| ()))
        },
        || format!("log: {}", log.display()),
    )?;
    // Through the running weir's admin API: refused, and nothing forgotten.
    let (code, body) = post_json(
        port,
        "/handlers/counter/replay",
        &deployment.admin_token()?,
        &serde_json::json!({"from": "earliest", "reset_state": true}),
        WAIT,
    )?;
    ensure!(
        code != 200 && body.contains("nothing was forgotten"),
        "admin replay on {}: {code} {body}",
        kind.name()
    );
    ensure!(
        counts(&deployment)? == expected,
        "the refused admin replay changed the state: {:?}",
        counts(&deployment)
    );
    stop(&mut weir)?;
    // From the command line, on a stopped weir: refused the same way.
    let refused = deployment.weir(&[
        "replay",
        "counter",
        "--from",
        "earliest",
        "--reset-state",
        "--yes",
    ]);
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("nothing was forgotten")),
        "a replay on {}: {refused:?}",
        kind.name()
    );
    ensure!(
        counts(&deployment)? == expected,
        "the refused replay changed the state: {:?}",
        counts(&deployment)
    );
    Ok(())
}

/// SIGTERM while weir is still starting (compiling a large Python
/// component cold takes seconds) stops it cleanly: exit 0, said in the log,
/// not death by the signal.
#[test]
fn sigterm_during_start_up_is_a_clean_stop() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = BrokerKind::Nats.start()?;
    let deployment = broker.deployment()?;
    deployment.add_handler("noop-py", "slow", "topics = [\"events\"]\n")?;
    let mut weir = deployment.start("start-up")?;
    let log = weir.log.clone();
    poll_until(
        WAIT,
        "weir to say it is starting",
        || {
            Ok(weir
                .records()
                .iter()
                .any(|r| r["message"] == "starting")
                .then_some(()))
        },
        || format!("log: {}", log.display()),
    )?;
    let status = weir.terminate(WAIT)?;
    let records = weir.records();
    ensure!(
        !records.iter().any(|r| r["message"] == "handlers loaded"),
        "start-up finished before the signal came, so this shows nothing; log: {}",
        log.display()
    );
    ensure!(
        status.success(),
        "weir exited with {status} on SIGTERM during start-up; log: {}",
        log.display()
    );
    ensure!(
        records
            .iter()
            .any(|r| r["message"] == "stopped during start-up"),
        "no word of the stop in the log: {}",
        log.display()
    );
    Ok(())
}

#[test]
fn rabbitmq_a_refused_replay_forgets_nothing() -> Result<()> {
    a_refused_replay_forgets_nothing(BrokerKind::Rabbit)
}

#[test]
fn sqs_a_refused_replay_forgets_nothing() -> Result<()> {
    a_refused_replay_forgets_nothing(BrokerKind::Sqs)
}

#[test]
fn redis_dead_letters_are_listed_replayed_once_and_purged() -> Result<()> {
    dead_letters_are_listed_replayed_once_and_purged(BrokerKind::Redis)
}

#[test]
fn redis_a_replay_rebuilds_the_projection() -> Result<()> {
    a_replay_rebuilds_the_projection(BrokerKind::Redis)
}

#[test]
fn redis_breaker_pauses_while_the_dependency_is_down() -> Result<()> {
    breaker_pauses_while_the_dependency_is_down(BrokerKind::Redis)
}

#[test]
fn kafka_breaker_pauses_while_the_dependency_is_down() -> Result<()> {
    breaker_pauses_while_the_dependency_is_down(BrokerKind::Kafka)
}

#[test]
fn nats_breaker_pauses_while_the_dependency_is_down() -> Result<()> {
    breaker_pauses_while_the_dependency_is_down(BrokerKind::Nats)
}

/// One request of [`the_admin_server_acts_only_for_its_operator`]: method,
/// path, headers, body, and the status it must get.
type Case<'a> = (
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Option<&'a [u8]>,
    u16,
);

/// The admin server acts only for its operator: a cross-site form POST
/// (what a web page the operator visits can send) and a request addressed
/// to another name (DNS rebinding) change nothing and read nothing; the
/// state route needs the token, bounds its limit and knows which handlers
/// it serves; metrics and health stay open to Prometheus and probes; the
/// CLI, which reads the generated token, and the token holder are served.
#[test]
fn the_admin_server_acts_only_for_its_operator() -> Result<()> {
    use weir_tests::admin::{get_with_token, request};
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = BrokerKind::Kafka.start()?;
    let broker: &dyn TestBroker = broker.as_ref();
    broker.create_topic("events", 1)?;
    broker.create_output_topic("counts")?;
    let deployment = broker.deployment()?;
    deployment.add_handler(
        "counter",
        "counter",
        "topics = [\"events\"]\n\n[config]\noutput_topic = \"counts\"\n",
    )?;
    let records: Vec<Record> = (0..6)
        .map(|i| record(&format!("k{}", i % 2), &format!("ev-{i}")))
        .collect();
    broker.produce("events", &records)?;
    let expected: BTreeMap<String, String> = (0..2)
        .map(|k| (format!("count/k{k}"), "3".to_string()))
        .collect();
    let port = free_port()?;
    deployment.admin_port(port)?;
    let mut weir = deployment.start("guarded")?;
    let log = weir.log.clone();
    // The CLI reads the generated token and asks the running weir.
    poll_until(
        WAIT,
        "the counts, read through the CLI from the running weir",
        || {
            Ok(counts(&deployment)
                .ok()
                .filter(|c| *c == expected)
                .map(|_| ()))
        },
        || format!("log: {}", log.display()),
    )?;
    let token = deployment.admin_token()?;
    ensure!(
        !std::fs::read_to_string(&log)?.contains(&token),
        "the token is in the log"
    );
    let wait = Duration::from_secs(30);
    let form = "from=earliest&reset_state=true";
    let evil_origin = ("Origin", "http://evil.example");
    let form_type = ("Content-Type", "application/x-www-form-urlencoded");
    let bearer = format!("Bearer {token}");
    let json_body = br#"{"from": "earliest", "reset_state": true}"#.as_slice();
    let json_type = ("Content-Type", "application/json");
    let evil_host = format!("evil.example:{port}");
    let cases: Vec<Case> = vec![
        // What the web page sent before: a form POST, no token.
        (
            "POST",
            "/handlers/counter/replay?from=earliest&reset_state=true",
            vec![evil_origin, form_type],
            Some(form.as_bytes()),
            403,
        ),
        // Even with the token, nothing from another site acts.
        (
            "POST",
            "/handlers/counter/replay",
            vec![evil_origin, json_type, ("Authorization", &bearer)],
            Some(json_body),
            403,
        ),
        (
            "POST",
            "/handlers/counter/replay",
            vec![
                ("Sec-Fetch-Site", "cross-site"),
                json_type,
                ("Authorization", &bearer),
            ],
            Some(json_body),
            403,
        ),
        // The token holder's query-string form: a JSON body is required.
        (
            "POST",
            "/handlers/counter/replay?from=earliest&reset_state=true",
            vec![("Authorization", &bearer)],
            None,
            415,
        ),
        // A form body with the token: not JSON.
        (
            "POST",
            "/handlers/counter/replay",
            vec![form_type, ("Authorization", &bearer)],
            Some(form.as_bytes()),
            415,
        ),
        // A page that rebinds its name to this address reads nothing.
        (
            "GET",
            "/handlers/counter/state",
            vec![("Host", &evil_host), ("Authorization", &bearer)],
            None,
            421,
        ),
        ("GET", "/handlers", vec![("Host", &evil_host)], None, 421),
        ("GET", "/", vec![("Host", &evil_host)], None, 421),
        // State needs the right token.
        ("GET", "/handlers/counter/state", vec![], None, 401),
        (
            "GET",
            "/handlers/counter/state",
            vec![("Authorization", "Bearer not-the-token")],
            None,
            401,
        ),
        // Bounded, and only for handlers served here.
        (
            "GET",
            "/handlers/counter/state?limit=100000",
            vec![("Authorization", &bearer)],
            None,
            400,
        ),
        (
            "GET",
            "/handlers/nobody/state",
            vec![("Authorization", &bearer)],
            None,
            404,
        ),
        (
            "POST",
            "/handlers/nobody/replay",
            vec![json_type, ("Authorization", &bearer)],
            Some(json_body),
            404,
        ),
        // Prometheus and probes address the process by any name.
        ("GET", "/metrics", vec![("Host", &evil_host)], None, 200),
        ("GET", "/health/live", vec![("Host", &evil_host)], None, 200),
        // The page and the handler list, addressed to this server.
        ("GET", "/", vec![], None, 200),
        ("GET", "/handlers", vec![("Host", "localhost")], None, 200),
    ];
    for (method, path, headers, body, wanted) in &cases {
        let (code, answer) = request(port, method, path, headers, *body, wait)?;
        ensure!(
            code == *wanted,
            "{method} {path} with {headers:?}: answered {code}, not {wanted}: {answer}"
        );
        ensure!(
            !answer.contains(&token),
            "{method} {path}: the answer holds the token"
        );
    }
    // Nothing above changed anything.
    ensure!(
        counts(&deployment)? == expected,
        "the refused requests changed the state: {:?}",
        counts(&deployment)
    );
    ensure!(
        !std::fs::read_to_string(&log)?.contains("replay: stopping"),
        "a refused request replayed"
    );
    // The token holder reads state.
    let (code, body) = get_with_token(port, "/handlers/counter/state?prefix=count/", &token)?;
    ensure!(
        code == 200 && body.contains("count/k0") && body.contains("count/k1"),
        "state with the token: {code} {body}"
    );
    stop(&mut weir)?;
    Ok(())
}
