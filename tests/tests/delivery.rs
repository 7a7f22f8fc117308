//! Delivery guarantees against a real broker process: deduplication across
//! restarts, per-key ordering with parallelism, attempt counts that survive
//! SIGKILL, two processes sharing one consumer group, and records the broker
//! refuses for good dead-lettered instead of retried forever (Kafka,
//! RabbitMQ, Redis).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use weir_tests::{
    Broker, Deployment, KafkaTool, RabbitBroker, Record, RedisBroker, Stored, TestBroker,
    WeirProcess, broker_test, consume_at_least, field, header, poll_until, stop,
};

const WAIT: Duration = Duration::from_secs(90);

fn setup(topic: &str, partitions: i32) -> Result<(Broker, KafkaTool, Deployment)> {
    let broker = Broker::start()?;
    let kafka = KafkaTool::new(&broker)?;
    kafka.create_topic(topic, partitions)?;
    let deployment = Deployment::new(&broker)?;
    Ok((broker, kafka, deployment))
}

fn record(partition: i32, key: &str, headers: &[(&str, &str)]) -> Record {
    Record {
        partition: Some(partition),
        key: Some(key.as_bytes().to_vec()),
        value: format!("value of {key}").into_bytes(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
    }
}

/// Probe calls that succeeded, in log order.
fn oks(weir: &WeirProcess) -> Vec<Value> {
    weir.guest_records("probe", "probe")
        .into_iter()
        .filter(|r| r["outcome"] == "ok")
        .collect()
}

fn wait_oks(weir: &WeirProcess, count: usize) -> Result<()> {
    poll_until(
        WAIT,
        &format!("{count} successful calls"),
        || Ok((oks(weir).len() >= count).then_some(())),
        || format!("{} so far; log: {}", oks(weir).len(), weir.log.display()),
    )
}

#[test]
fn attempt_counts_survive_sigkill_during_a_backoff() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup("events", 1)?;
    let manifest = "topics = [\"events\"]\n[retry]\nmax_attempts = 6\ninitial_delay = \"300ms\"\nmultiplier = 1.0\nmax_delay = \"300ms\"\njitter = 0.0\n";
    deployment.add_handler("probe", "probe", manifest)?;
    // Attempts 1-3 fail; a fresh count would need three more failures.
    kafka.produce(
        "events",
        &[record(0, "k", &[("probe.fail", "retryable:3")])],
    )?;

    let mut first = deployment.start("first")?;
    // The warning is logged after attempt 2's failure is durable; kill the
    // process during the backoff that follows.
    poll_until(
        WAIT,
        "the second failed attempt to be recorded",
        || {
            Ok(first
                .records()
                .iter()
                .any(|r| r["message"] == "attempt failed; will retry" && r["attempt"] == 2)
                .then_some(()))
        },
        || first.log.display().to_string(),
    )?;
    first.kill()?;

    let mut second = deployment.start("second")?;
    wait_oks(&second, 1)?;
    stop(&mut second)?;
    let attempts: Vec<i64> = second
        .guest_records("probe", "probe")
        .iter()
        .filter_map(|r| field(r, "attempt"))
        .collect();
    // Attempt 3 may have started before the kill; either way the count goes
    // on from the persisted value and never restarts at 1.
    ensure!(
        attempts == vec![3, 4] || attempts == vec![4],
        "after SIGKILL the attempts were {attempts:?}, expected to continue at 3 (or 4)"
    );
    Ok(())
}

#[test]
fn two_processes_share_a_group_and_lose_nothing_when_one_stops() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup("events", 4)?;
    deployment.add_handler(
        "probe",
        "probe",
        "topics = [\"events\"]\nmax_in_flight = 2\n",
    )?;
    let batch = |range: std::ops::Range<usize>| -> Vec<Record> {
        range
            .map(|i| {
                record(
                    (i % 4) as i32,
                    &format!("k{}", i % 10),
                    &[("probe.sleep-ms", "50")],
                )
            })
            .collect()
    };
    // About 300 × 50 ms of work, two at a time: several seconds for A alone.
    let produced = kafka.produce("events", &batch(0..300))?;

    let mut a = deployment.start("a")?;
    wait_oks(&a, 10)?;
    let b = deployment.start_another("b")?;
    // B has taken over some partitions once it handles messages itself.
    wait_oks(&b, 5)?;
    ensure!(
        oks(&a).len() < 300,
        "A finished everything before B joined; make the work longer"
    );
    // Stop A mid-stream: it finishes in-flight work, commits what it owns
    // and leaves; B takes over its partitions.
    stop(&mut a)?;

    let expected: BTreeSet<(i64, i64)> = produced.iter().map(|&(p, o)| (i64::from(p), o)).collect();
    let handled = |w: &WeirProcess| -> BTreeSet<(i64, i64)> {
        oks(w)
            .iter()
            .filter_map(|r| Some((field(r, "partition")?, field(r, "offset")?)))
            .collect()
    };
    let a_handled = handled(&a);
    poll_until(
        WAIT,
        "every message to be handled by A or B",
        || {
            Ok(a_handled
                .union(&handled(&b))
                .cloned()
                .collect::<BTreeSet<_>>()
                .eq(&expected)
                .then_some(()))
        },
        || {
            format!(
                "missing {:?}",
                expected
                    .difference(&a_handled.union(&handled(&b)).cloned().collect())
                    .take(10)
                    .collect::<Vec<_>>()
            )
        },
    )?;
    let mut ends: BTreeMap<i32, Option<i64>> = BTreeMap::new();
    for &(p, o) in &produced {
        let end = ends.entry(p).or_insert(Some(0));
        *end = Some(end.unwrap_or(0).max(o + 1));
    }
    poll_until(
        WAIT,
        "the group's committed offsets to reach the end",
        || Ok((kafka.committed("weir.probe", "events")? == ends).then_some(())),
        || {
            format!(
                "{:?} vs {ends:?}",
                kafka.committed("weir.probe", "events").ok()
            )
        },
    )?;
    let mut b = b;
    stop(&mut b)?;
    ensure!(
        !a_handled.is_empty() && !handled(&b).is_empty(),
        "both processes must have handled messages"
    );
    // A never tried to acknowledge anything for partitions it had lost.
    let refused = a
        .records()
        .iter()
        .filter(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("offset not stored"))
        })
        .count();
    ensure!(
        refused == 0,
        "A stored offsets for partitions it no longer owned ({refused} times)"
    );
    // Messages handled by both are only ones A had in flight when it
    // stopped or lost a partition.
    let both = a_handled.intersection(&handled(&b)).count();
    ensure!(both <= 4, "{both} messages were handled by both processes");
    Ok(())
}

/// What the broker refuses for good is dead-lettered, not retried forever:
/// an emitted event between librdkafka's `message.max.bytes` (1,000,000)
/// and Weir's own 1 MiB emit cap goes to `emitted.dlq` (without its
/// payload, as its dead letter is as large), and the events emitted after
/// it to the same topic are published; a dead letter that outgrows the
/// limit (a message near it plus an 8 KiB failure reason) is sent without
/// its payload, saying what it was, and `weir dlq replay` refuses it.
#[test]
fn records_the_broker_refuses_for_good_are_dead_lettered_not_retried() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup("events", 1)?;
    kafka.create_topic("events.dlq", 1)?;
    kafka.create_topic("emitted", 1)?;
    kafka.create_topic("emitted.dlq", 1)?;
    deployment.add_handler(
        "sdk-probe",
        "probe",
        "topics = [\"events\"]\n[retry]\nmax_attempts = 1\n",
    )?;
    let emit = |key: &str, bytes: Option<&str>| {
        let mut headers = vec![("probe.emit", "emitted")];
        if let Some(bytes) = bytes {
            headers.push(("probe.emit-bytes", bytes));
        }
        record(0, key, &headers)
    };
    let mut near_limit = record(0, "near-limit", &[("probe.fail", "permanent-long")]);
    near_limit.value = vec![b'n'; 995_000];
    kafka.produce(
        "events",
        &[
            emit("too-large", Some("1040000")),
            emit("after", None),
            near_limit,
            record(0, "last", &[]),
        ],
    )?;
    let mut weir = deployment.start("refused")?;
    let emitted = consume_at_least(&kafka, "emitted", 1, WAIT, &weir)?;
    ensure!(
        emitted.len() == 1 && header(&emitted[0], "weir.handler").as_deref() == Some("probe"),
        "emitted: {emitted:?}"
    );
    let refused = consume_at_least(&kafka, "emitted.dlq", 1, WAIT, &weir)?;
    let dropped = header(&refused[0], "weir.payload-dropped").unwrap_or_default();
    ensure!(
        dropped.starts_with("1040000 bytes, sha256 ")
            && header(&refused[0], "weir.error.kind").as_deref() == Some("permanent")
            && header(&refused[0], "weir.origin.topic").as_deref() == Some("emitted"),
        "the refused emit's dead letter: {:?}",
        refused[0]
    );
    let dead = consume_at_least(&kafka, "events.dlq", 1, WAIT, &weir)?;
    let dropped = header(&dead[0], "weir.payload-dropped").unwrap_or_default();
    ensure!(
        dropped.starts_with("995000 bytes, sha256 ") && dead[0]["value_hex"] == "",
        "the oversized dead letter: {:?}",
        header(&dead[0], "weir.payload-dropped")
    );
    poll_until(
        WAIT,
        "the last message handled",
        || {
            Ok(weir
                .guest_records("probe", "sdk-probe")
                .iter()
                .any(|r| r["key"] == "last" && r["outcome"] == "ok")
                .then_some(()))
        },
        || format!("log: {}", weir.log.display()),
    )?;
    stop(&mut weir)?;
    let replay = deployment.weir(&["dlq", "replay", "probe"])?;
    ensure!(
        replay.contains("replayed 0 dead letter(s)") && replay.contains("payload was left out"),
        "a replay of a dead letter without its payload: {replay}"
    );
    Ok(())
}

/// What a queue broker refuses for good, as `emitted` refuses it: the
/// emitted event goes to `emitted.dlq` with the refusal as its reason, an
/// event emitted after it to another topic is published, and every later
/// message is handled.
fn refused_emits_are_dead_lettered(
    broker: &dyn TestBroker,
    emit_bytes: Option<&str>,
) -> Result<()> {
    broker.create_topic("events", 1)?;
    for topic in ["emitted.dlq", "other"] {
        broker.create_output_topic(topic)?;
    }
    let deployment = broker.deployment()?;
    deployment.add_handler(
        "sdk-probe",
        "probe",
        "topics = [\"events\"]\n[retry]\nmax_attempts = 1\n",
    )?;
    let mut refused = vec![("probe.emit", "emitted")];
    if let Some(bytes) = emit_bytes {
        refused.push(("probe.emit-bytes", bytes));
    }
    let mut records = vec![
        record(0, "refused", &refused),
        record(0, "after", &[("probe.emit", "other")]),
        record(0, "last", &[]),
    ];
    for record in &mut records {
        record.partition = None;
    }
    broker.produce("events", &records)?;
    let mut weir = deployment.start("refused")?;
    let log = weir.log.clone();
    let read = |topic: &str| -> Result<Option<Vec<Stored>>> {
        let stored = broker.read(topic)?;
        Ok((!stored.is_empty()).then_some(stored))
    };
    let other = poll_until(
        WAIT,
        "the event emitted after the refused one",
        || read("other"),
        || format!("log: {}", log.display()),
    )?;
    ensure!(
        other.len() == 1 && other[0].header("weir.handler").as_deref() == Some("probe"),
        "other: {other:?}"
    );
    let dead = poll_until(
        WAIT,
        "the refused emit's dead letter",
        || read("emitted.dlq"),
        || format!("log: {}", log.display()),
    )?;
    let reason = dead[0].header("weir.error").unwrap_or_default();
    ensure!(
        dead.len() == 1
            && reason.starts_with("the broker refused the emitted event")
            && dead[0].header("weir.error.kind").as_deref() == Some("permanent")
            && dead[0].header("weir.origin.topic").as_deref() == Some("emitted"),
        "the refused emit's dead letters: {dead:?}"
    );
    if let Some(bytes) = emit_bytes {
        let dropped = dead[0].header("weir.payload-dropped").unwrap_or_default();
        ensure!(
            dropped.starts_with(&format!("{bytes} bytes, sha256 ")) && dead[0].value.is_empty(),
            "the dead letter of a refused emit as large: {:?}",
            dead[0].header("weir.payload-dropped")
        );
    } else {
        ensure!(
            dead[0].value == b"emitted:value of refused",
            "the refused emit's payload: {:?}",
            String::from_utf8_lossy(&dead[0].value)
        );
    }
    poll_until(
        WAIT,
        "the last message handled",
        || {
            Ok(weir
                .guest_records("probe", "sdk-probe")
                .iter()
                .any(|r| r["key"] == "last" && r["outcome"] == "ok")
                .then_some(()))
        },
        || format!("log: {}", weir.log.display()),
    )?;
    stop(&mut weir)?;
    Ok(())
}

/// RabbitMQ closes the channel of a publish whose body is over its
/// `max_message_size` (`PRECONDITION_FAILED`), failing every publish in
/// flight on it: an emit over it is dead-lettered without its payload
/// instead of retried forever, and the emit in flight beside it is sent
/// again and arrives. (A dead letter cannot outgrow the limit here: its
/// body is the consumed message's, and headers do not count.)
#[test]
fn rabbitmq_records_over_max_message_size_are_dead_lettered_not_retried() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = RabbitBroker::start_with_max_message_size(256 * 1024)?;
    refused_emits_are_dead_lettered(&broker, Some("300000"))
}

/// A Redis key that holds something other than a stream refuses every
/// `XADD` (`WRONGTYPE`): an emit to it is dead-lettered, not retried
/// forever.
#[test]
fn redis_an_emit_to_a_key_that_is_no_stream_is_dead_lettered_not_retried() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = RedisBroker::start()?;
    broker.server.command(&["SET", "emitted", "not-a-stream"])?;
    refused_emits_are_dead_lettered(&broker, None)
}
