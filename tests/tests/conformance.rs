//! Delivery conformance: every broker Weir consumes from keeps the same
//! promises. Each case is written once against [`TestBroker`] and run
//! against each broker: `kafka::<case>` (tansu), `nats::<case>` (NATS
//! JetStream), `rabbitmq::<case>`, `redis::<case>` and `sqs::<case>` (moto's
//! SQS server). Filter with `cargo test -p weir-tests --test conformance
//! nats::`.
//!
//! Messages are told apart by their payloads (`m-17`), never by a broker's
//! position, so the assertions read the same for every broker; where a
//! broker shows through (dead-letter origin headers, the partition and
//! offset a 0.1.0 handler sees) the expectation comes from the position the
//! broker acknowledged when the message was produced.
//!
//! `WEIR_CRASH_CYCLES` sets the kill/restart cycles of the SIGKILL case
//! (default 4); `WEIR_CRASH_SEED` repeats a run of the crash cases.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;
use weir_tests::counting::{
    INPUT, Input, OUTPUT, catch_up_and_read, counter_deployment, crash_cycles, finish_and_verify,
    wait_for_work,
};
use weir_tests::{
    BrokerKind, NatsBroker, Position, Record, Rng, SqsBroker, Stream, TestBroker, WeirProcess,
    broker_test, field, nats_durable, poll_progress, poll_until, stop, stream_name, unhex,
};

/// How long a wait on weir's work may go without progress (its calls,
/// the broker's view of the group, the records read) before it fails.
const WAIT: Duration = Duration::from_secs(90);

/// Runs `case` against a fresh broker of `kind`, one test at a time.
fn run(kind: BrokerKind, case: fn(&dyn TestBroker) -> Result<()>) -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = kind.start()?;
    case(broker.as_ref()).with_context(|| format!("against {}", kind.name()))
}

/// One `#[test]` per case and broker: `kafka::<case>`, `nats::<case>`,
/// `rabbitmq::<case>`, `redis::<case>`, `sqs::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod kafka {
            $(
                #[test]
                fn $case() -> anyhow::Result<()> {
                    super::run(weir_tests::BrokerKind::Kafka, super::$case)
                }
            )*
        }
        mod nats {
            $(
                #[test]
                fn $case() -> anyhow::Result<()> {
                    super::run(weir_tests::BrokerKind::Nats, super::$case)
                }
            )*
        }
        mod rabbitmq {
            $(
                #[test]
                fn $case() -> anyhow::Result<()> {
                    super::run(weir_tests::BrokerKind::Rabbit, super::$case)
                }
            )*
        }
        mod redis {
            $(
                #[test]
                fn $case() -> anyhow::Result<()> {
                    super::run(weir_tests::BrokerKind::Redis, super::$case)
                }
            )*
        }
        mod sqs {
            $(
                #[test]
                fn $case() -> anyhow::Result<()> {
                    super::run(weir_tests::BrokerKind::Sqs, super::$case)
                }
            )*
        }
    };
}

conformance!(
    every_message_is_handled_once_and_acknowledged,
    a_restart_resumes_where_the_last_run_stopped,
    duplicate_event_ids_are_handled_once_even_across_restarts,
    a_failing_key_holds_only_its_own_later_messages,
    retries_run_out_into_a_dead_letter_that_names_its_origin,
    a_permanent_error_is_dead_lettered_after_one_attempt,
    a_bad_component_is_reported_while_the_others_serve,
    sigkill_in_a_loop_loses_no_state_and_emits_each_event_once,
    aborting_at_the_worst_moments_loses_nothing_and_applies_nothing_twice,
    effects_of_failed_attempts_are_discarded,
    contracts_0_1_and_0_2_serve_side_by_side,
    runs_committed_together_survive_aborts,
    hostile_input_never_stops_a_handler,
);

// ---------------------------------------------------------------------------
// Helpers

/// A record with key `key`, payload `payload` and text headers.
fn record(key: &str, payload: &str, headers: &[(&str, &str)]) -> Record {
    Record::keyed(key, payload, headers)
}

/// One call of the `probe` handler, from its log record.
#[derive(Debug, Clone)]
struct Call {
    id: String,
    topic: String,
    key: Option<String>,
    payload: String,
    attempt: i64,
    outcome: String,
    partition: Option<i64>,
    offset: Option<i64>,
}

/// Every probe call so far, in log order.
fn calls(weir: &WeirProcess) -> Vec<Call> {
    weir.guest_records("probe", "probe")
        .iter()
        .map(|r| {
            let text = |name: &str| r[name].as_str().unwrap_or_default().to_string();
            let bytes = |name: &str| {
                unhex(r[name].as_str().unwrap_or_default())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .ok()
            };
            Call {
                id: text("id"),
                topic: text("topic"),
                key: (r["key_hex"] != "none").then(|| bytes("key_hex")).flatten(),
                payload: bytes("payload_hex").unwrap_or_default(),
                attempt: field(r, "attempt").unwrap_or(0),
                outcome: text("outcome"),
                partition: field(r, "partition"),
                offset: field(r, "offset"),
            }
        })
        .collect()
}

/// Probe calls that succeeded.
fn oks(weir: &WeirProcess) -> Vec<Call> {
    calls(weir)
        .into_iter()
        .filter(|c| c.outcome == "ok")
        .collect()
}

fn wait_oks(weir: &WeirProcess, count: usize) -> Result<()> {
    poll_progress(
        WAIT,
        &format!("{count} successful calls"),
        || Ok((oks(weir).len() >= count).then_some(())),
        || calls(weir).len(),
        || format!("{} so far; log: {}", oks(weir).len(), weir.log.display()),
    )
}

/// Waits until `group` has acknowledged everything `produced` on `topic`.
fn wait_caught_up(
    broker: &dyn TestBroker,
    group: &str,
    topic: &str,
    produced: &[Position],
    weir: &WeirProcess,
) -> Result<()> {
    poll_progress(
        WAIT,
        &format!("{group} to acknowledge everything produced to {topic}"),
        || Ok(broker.caught_up(group, topic, produced)?.then_some(())),
        || (calls(weir).len(), broker.progress_mark(group, topic)),
        || {
            format!(
                "{}; log: {}",
                broker.progress(group, topic),
                weir.log.display()
            )
        },
    )
}

/// Waits for at least `count` records on `topic` and returns them.
fn wait_read(
    broker: &dyn TestBroker,
    topic: &str,
    count: usize,
    weir: &WeirProcess,
) -> Result<Vec<weir_tests::Stored>> {
    let read = Cell::new(0);
    poll_progress(
        WAIT,
        &format!("{count} records on {topic}"),
        || {
            let stored = broker.read(topic)?;
            read.set(read.get().max(stored.len()));
            Ok((stored.len() >= count).then_some(stored))
        },
        || (read.get(), calls(weir).len()),
        || format!("{} read; log: {}", read.get(), weir.log.display()),
    )
}

/// How often each payload was handled successfully.
fn handled_counts<'a>(runs: impl IntoIterator<Item = &'a WeirProcess>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for weir in runs {
        for call in oks(weir) {
            *counts.entry(call.payload).or_insert(0) += 1;
        }
    }
    counts
}

/// Fails unless every payload in `expected` was handled exactly once, and
/// nothing else was handled.
fn ensure_each_once(counts: &BTreeMap<String, usize>, expected: &BTreeSet<String>) -> Result<()> {
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(twice.is_empty(), "handled more than once: {twice:?}");
    let seen: BTreeSet<String> = counts.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&seen).take(10).collect();
    let unexpected: Vec<_> = seen.difference(expected).take(10).collect();
    ensure!(
        missing.is_empty() && unexpected.is_empty(),
        "missing {missing:?}, unexpected {unexpected:?}"
    );
    Ok(())
}

const PROBE: &str = "topics = [\"events\"]\nmax_in_flight = 16\n";
const GROUP: &str = "weir.probe";

// ---------------------------------------------------------------------------
// Cases

/// A clean run: every message handled once, per key in production order,
/// with the key and (for a 0.1.0 handler) the partition and offset the
/// broker gave it; at the end everything is acknowledged.
fn every_message_is_handled_once_and_acknowledged(broker: &dyn TestBroker) -> Result<()> {
    broker.create_topic("events", 3)?;
    let records: Vec<Record> = (0..120)
        .map(|i| record(&format!("key-{}", i % 7), &format!("m-{i}"), &[]))
        .collect();
    let produced = broker.produce("events", &records)?;
    let deployment = broker.deployment()?;
    deployment.add_handler("probe", "probe", PROBE)?;

    let mut weir = deployment.start("run")?;
    wait_oks(&weir, records.len())?;
    wait_caught_up(broker, GROUP, "events", &produced, &weir)?;
    stop(&mut weir)?;

    let all = calls(&weir);
    ensure!(
        all.len() == records.len(),
        "{} calls for {} messages",
        all.len(),
        records.len()
    );
    let expected: BTreeSet<String> = (0..120).map(|i| format!("m-{i}")).collect();
    ensure_each_once(&handled_counts([&weir]), &expected)?;
    let position: BTreeMap<String, &Position> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .zip(&produced)
        .collect();
    let mut lanes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for call in &all {
        let index: usize = call
            .payload
            .strip_prefix("m-")
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| anyhow!("unexpected payload {:?}", call.payload))?;
        let key = format!("key-{}", index % 7);
        ensure!(
            call.key.as_deref() == Some(key.as_str()),
            "{}: key {:?}, produced with {key}",
            call.payload,
            call.key
        );
        ensure!(
            call.topic == "events",
            "{}: topic {}",
            call.payload,
            call.topic
        );
        let (partition, offset) = position
            .get(&call.payload)
            .map(|p| p.partition_offset())
            .ok_or_else(|| anyhow!("no position for {}", call.payload))?;
        ensure!(
            call.partition == Some(partition) && offset.is_none_or(|o| call.offset == Some(o)),
            "{}: handler saw partition {:?} offset {:?}, the broker acknowledged {partition}/{offset:?}",
            call.payload,
            call.partition,
            call.offset
        );
        lanes.entry(key).or_default().push(index);
    }
    ensure!(lanes.len() == 7, "keys seen: {:?}", lanes.keys());
    for (key, order) in &lanes {
        ensure!(
            order.windows(2).all(|w| w[0] < w[1]),
            "key {key} handled out of order: {order:?}"
        );
    }
    Ok(())
}

/// SIGTERM halfway through: in-flight work finishes and is acknowledged;
/// more is produced while Weir is down; the restart handles the rest,
/// nothing twice, nothing missed.
fn a_restart_resumes_where_the_last_run_stopped(broker: &dyn TestBroker) -> Result<()> {
    broker.create_topic("events", 3)?;
    let deployment = broker.deployment()?;
    deployment.add_handler(
        "probe",
        "probe",
        "topics = [\"events\"]\nmax_in_flight = 2\n",
    )?;
    // About 100 × 50 ms of work, two at a time: several seconds.
    let slow: Vec<Record> = (0..100)
        .map(|i| {
            record(
                &format!("key-{}", i % 5),
                &format!("m-{i}"),
                &[("probe.sleep-ms", "50")],
            )
        })
        .collect();
    let mut produced = broker.produce("events", &slow)?;
    let mut first = deployment.start("first")?;
    wait_oks(&first, 20)?;
    stop(&mut first)?;
    let first_count = oks(&first).len();
    ensure!(
        first_count < slow.len(),
        "the first run finished everything before SIGTERM; make the work longer"
    );

    let more: Vec<Record> = (100..140)
        .map(|i| record(&format!("key-{}", i % 5), &format!("m-{i}"), &[]))
        .collect();
    produced.extend(broker.produce("events", &more)?);
    let mut second = deployment.start("second")?;
    let expected: BTreeSet<String> = (0..140).map(|i| format!("m-{i}")).collect();
    poll_until(
        WAIT,
        "every message to be handled by one run or the other",
        || {
            let seen: BTreeSet<String> = handled_counts([&first, &second]).into_keys().collect();
            Ok((seen == expected).then_some(()))
        },
        || {
            let seen: BTreeSet<String> = handled_counts([&first, &second]).into_keys().collect();
            format!(
                "missing {:?}; log: {}",
                expected.difference(&seen).take(10).collect::<Vec<_>>(),
                second.log.display()
            )
        },
    )?;
    wait_caught_up(broker, GROUP, "events", &produced, &second)?;
    stop(&mut second)?;
    eprintln!("first run handled {first_count} of 100 before SIGTERM");
    ensure_each_once(&handled_counts([&first, &second]), &expected)
}

/// The same event id (`ce_id`) produced twice reaches the handler once,
/// also when the copy arrives after a restart.
fn duplicate_event_ids_are_handled_once_even_across_restarts(
    broker: &dyn TestBroker,
) -> Result<()> {
    broker.create_topic("events", 2)?;
    let deployment = broker.deployment()?;
    deployment.add_handler("probe", "probe", "topics = [\"events\"]\n")?;
    // Each event twice, as a retrying producer sends it: same key, same id.
    let batch = |ids: std::ops::Range<usize>| -> Vec<Record> {
        ids.flat_map(|i| {
            let one = record(
                &format!("order-{i}"),
                &format!("m-{i}"),
                &[("ce_id", &format!("evt-{i}"))],
            );
            [one.clone(), one]
        })
        .collect()
    };
    let mut produced = broker.produce("events", &batch(0..20))?;
    let mut first = deployment.start("first")?;
    wait_oks(&first, 20)?;
    wait_caught_up(broker, GROUP, "events", &produced, &first)?;
    stop(&mut first)?;
    let ids = |weir: &WeirProcess| -> Vec<String> { oks(weir).into_iter().map(|c| c.id).collect() };
    let first_ids = ids(&first);
    let distinct: BTreeSet<&String> = first_ids.iter().collect();
    ensure!(
        first_ids.len() == 20 && distinct.len() == 20,
        "first run handled {first_ids:?}"
    );

    // After a restart: old ids again, plus 5 new ones, each twice.
    produced.extend(broker.produce("events", &batch(15..25))?);
    let mut second = deployment.start("second")?;
    wait_oks(&second, 5)?;
    wait_caught_up(broker, GROUP, "events", &produced, &second)?;
    stop(&mut second)?;
    let second_ids = ids(&second);
    let expected: Vec<String> = (20..25).map(|i| format!("evt-{i}")).collect();
    let mut sorted = second_ids.clone();
    sorted.sort();
    ensure!(
        sorted == expected,
        "second run handled {second_ids:?}, expected each of {expected:?} once"
    );
    Ok(())
}

/// One key fails twice and waits for its retries; only its own later
/// messages wait with it, every other key flows past.
fn a_failing_key_holds_only_its_own_later_messages(broker: &dyn TestBroker) -> Result<()> {
    broker.create_topic("events", 1)?;
    let deployment = broker.deployment()?;
    deployment.add_handler(
        "probe",
        "probe",
        "topics = [\"events\"]\n[retry]\nmax_attempts = 5\ninitial_delay = \"400ms\"\nmultiplier = 2.0\nmax_delay = \"2s\"\njitter = 0.0\n",
    )?;
    let mut sent = vec![record("slow", "slow-0", &[("probe.fail", "retryable:2")])];
    let mut slow = 0;
    for i in 0..20 {
        sent.push(record(
            &format!("fast-{}", i % 4),
            &format!("fast-{i}"),
            &[],
        ));
        if i % 5 == 0 {
            slow += 1;
            sent.push(record("slow", &format!("slow-{slow}"), &[]));
        }
    }
    broker.produce("events", &sent)?;
    let mut weir = deployment.start("run")?;
    wait_oks(&weir, sent.len())?;
    stop(&mut weir)?;

    let calls = calls(&weir);
    let first_slow: Vec<i64> = calls
        .iter()
        .filter(|c| c.payload == "slow-0")
        .map(|c| c.attempt)
        .collect();
    ensure!(
        first_slow == vec![1, 2, 3],
        "attempts of the failing message: {first_slow:?}"
    );
    let slow_ok = calls
        .iter()
        .position(|c| c.payload == "slow-0" && c.outcome == "ok")
        .ok_or_else(|| anyhow!("the failing message never succeeded"))?;
    let last_fast = calls
        .iter()
        .rposition(|c| c.payload.starts_with("fast-"))
        .ok_or_else(|| anyhow!("no other key was handled"))?;
    ensure!(
        last_fast < slow_ok,
        "other keys were held back by the failing key"
    );
    let later: Vec<(usize, &str)> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.payload.starts_with("slow-") && c.payload != "slow-0")
        .map(|(i, c)| (i, c.payload.as_str()))
        .collect();
    let expected: Vec<String> = (1..=slow).map(|i| format!("slow-{i}")).collect();
    ensure!(
        later
            .iter()
            .map(|(_, p)| *p)
            .eq(expected.iter().map(String::as_str)),
        "the failing key's later messages, in handling order: {later:?}, expected {expected:?}"
    );
    ensure!(
        later.iter().all(|(i, _)| *i > slow_ok),
        "a later message of the failing key ran before it succeeded"
    );
    Ok(())
}

const RETRY_THREE_TIMES: &str = "topics = [\"events\"]\n[retry]\nmax_attempts = 3\ninitial_delay = \"50ms\"\nmultiplier = 2.0\nmax_delay = \"200ms\"\njitter = 0.0\n";

/// Checks the dead letter of the record produced as `original` at
/// `position`: its key, payload and headers, and everything Weir adds.
fn ensure_dead_letter(
    dead: &weir_tests::Stored,
    original: &Record,
    position: &Position,
    kind: &str,
    attempts: &str,
    error: &str,
) -> Result<()> {
    let payload = String::from_utf8_lossy(&original.value);
    ensure!(
        dead.value == original.value,
        "{payload}: dead letter payload {:?}",
        String::from_utf8_lossy(&dead.value)
    );
    ensure!(
        dead.key == original.key,
        "{payload}: dead letter key {:?}",
        dead.key_text()
    );
    for (name, value) in &original.headers {
        ensure!(
            dead.header(name).map(String::into_bytes).as_ref() == Some(value),
            "{payload}: original header {name} not kept: {:?}",
            dead.headers
        );
    }
    let id = original
        .headers
        .iter()
        .find(|(n, _)| n == "ce_id")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    let mut expected: Vec<(&str, String)> = vec![
        ("weir.handler", "probe".into()),
        ("weir.error.kind", kind.into()),
        ("weir.attempts", attempts.into()),
        ("weir.origin.topic", "events".into()),
    ];
    if let Some(id) = id {
        expected.push(("weir.event-id", id));
    }
    expected.extend(position.origin_headers());
    for (name, value) in expected {
        ensure!(
            dead.header(name).as_deref() == Some(value.as_str()),
            "{payload}: dead letter header {name} = {:?}, expected {value:?}; headers: {:?}",
            dead.header(name),
            dead.headers
        );
    }
    ensure!(
        dead.header("weir.error").is_some_and(|e| e.contains(error)),
        "{payload}: weir.error {:?} does not say {error:?}",
        dead.header("weir.error")
    );
    ensure!(
        dead.header("weir.failed-at")
            .is_some_and(|t| t.ends_with('Z')),
        "{payload}: weir.failed-at {:?}",
        dead.header("weir.failed-at")
    );
    Ok(())
}

/// A component built for contract 0.1.0 (`probe`) and one built for 0.2.0
/// (`sdk-probe`, as handler `modern`) serve one topic side by side: each
/// handles every message once; the 0.1.0 one sees a partition and an offset
/// (on JetStream: partition 0 and the stream sequence), the 0.2.0 one the
/// broker's own position; a 0.2.0 error category reaches its dead letter.
/// On a queue broker, where two consumers of one queue share its messages,
/// the 0.2.0 handler gets its own queue with the same messages.
fn contracts_0_1_and_0_2_serve_side_by_side(broker: &dyn TestBroker) -> Result<()> {
    let competing = broker.competing_consumers();
    let modern_topic = if competing { "events-modern" } else { "events" };
    broker.create_topic("events", 1)?;
    broker.create_output_topic("events.dlq")?;
    if competing {
        broker.create_topic(modern_topic, 1)?;
        broker.create_output_topic(&format!("{modern_topic}.dlq"))?;
    }
    let deployment = broker.deployment()?;
    deployment.add_handler("probe", "probe", "topics = [\"events\"]\n")?;
    deployment.add_handler(
        "sdk-probe",
        "modern",
        &format!("topics = [\"{modern_topic}\"]\n"),
    )?;
    let mut records: Vec<Record> = (0..10)
        .map(|i| {
            let id = format!("e{i}");
            record(
                &format!("k{i}"),
                &format!("m-{i}"),
                &[("ce_id", id.as_str())],
            )
        })
        .collect();
    // The 0.2.0 handler fails it as `validation`; the 0.1.0 one cannot
    // name a category (and refuses the request as not understood).
    records.push(record(
        "k-bad",
        "bad",
        &[("ce_id", "e-bad"), ("probe.fail", "permanent:validation")],
    ));
    let produced = broker.produce("events", &records)?;
    let modern_produced = if competing {
        broker.produce(modern_topic, &records)?
    } else {
        produced.clone()
    };
    let mut weir = deployment.start("run")?;
    let modern = |weir: &WeirProcess| weir.guest_records("modern", "sdk-probe");
    let modern_oks = |weir: &WeirProcess| {
        modern(weir)
            .into_iter()
            .filter(|r| r["outcome"] == "ok")
            .count()
    };
    wait_oks(&weir, 10)?;
    poll_until(
        WAIT,
        "10 successful calls of the 0.2.0 handler",
        || Ok((modern_oks(&weir) >= 10).then_some(())),
        || format!("{} so far; log: {}", modern_oks(&weir), weir.log.display()),
    )?;
    let dead = if competing {
        let mut dead = wait_read(broker, "events.dlq", 1, &weir)?;
        dead.extend(wait_read(broker, &format!("{modern_topic}.dlq"), 1, &weir)?);
        dead
    } else {
        wait_read(broker, "events.dlq", 2, &weir)?
    };
    wait_caught_up(broker, "weir.probe", "events", &produced, &weir)?;
    wait_caught_up(broker, "weir.modern", modern_topic, &modern_produced, &weir)?;
    stop(&mut weir)?;

    let expected: BTreeSet<String> = (0..10).map(|i| format!("m-{i}")).collect();
    ensure_each_once(&handled_counts([&weir]), &expected)?;
    let ids = || {
        records.iter().filter_map(|r| {
            let id = r.headers.iter().find(|(n, _)| n == "ce_id")?;
            Some(String::from_utf8_lossy(&id.1).into_owned())
        })
    };
    let position_of: BTreeMap<String, &Position> = ids().zip(&produced).collect();
    let modern_position_of: BTreeMap<String, &Position> = ids().zip(&modern_produced).collect();
    for call in oks(&weir) {
        let (partition, offset) = position_of
            .get(&call.id)
            .map(|p| p.partition_offset())
            .ok_or_else(|| anyhow!("no position for {}", call.id))?;
        ensure!(
            call.partition == Some(partition) && offset.is_none_or(|o| call.offset == Some(o)),
            "0.1.0 handler saw {:?}/{:?} for {}, expected {partition}/{offset:?}",
            call.partition,
            call.offset,
            call.id
        );
    }
    let modern_calls = modern(&weir);
    let ok_ids: BTreeSet<String> = modern_calls
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    let expected_ids: BTreeSet<String> = (0..10).map(|i| format!("e{i}")).collect();
    ensure!(ok_ids == expected_ids, "0.2.0 handler handled {ok_ids:?}");
    for call in &modern_calls {
        let id = call["id"].as_str().unwrap_or_default();
        let position = modern_position_of
            .get(id)
            .ok_or_else(|| anyhow!("0.2.0 handler saw an unknown event {id:?}"))?;
        let seen = match position {
            Position::Kafka { partition, offset } => {
                call["broker"] == "kafka"
                    && field(call, "partition") == Some(i64::from(*partition))
                    && field(call, "offset") == Some(*offset)
            }
            Position::JetStream { stream, sequence } => {
                call["broker"] == "jetstream"
                    && call["stream"].as_str() == Some(stream.as_str())
                    && field(call, "sequence") == i64::try_from(*sequence).ok()
                    && call.get("partition").is_none()
            }
            Position::Rabbit { queue, .. } => {
                call["broker"] == "rabbitmq"
                    && call["exchange"] == ""
                    && call["routing_key"].as_str() == Some(queue.as_str())
            }
            Position::Redis { stream, entry_id } => {
                call["broker"] == "redis"
                    && call["stream"].as_str() == Some(stream.as_str())
                    && call["entry_id"].as_str() == Some(entry_id.as_str())
            }
            Position::Sqs { message_id, .. } => {
                call["broker"] == "sqs" && call["message_id"].as_str() == Some(message_id.as_str())
            }
        };
        ensure!(seen, "0.2.0 handler saw {call} for {position:?}");
    }
    ensure!(dead.len() == 2, "dead letters: {dead:?}");
    for letter in &dead {
        let category = letter.header("weir.error.category");
        match letter.header("weir.handler").as_deref() {
            Some("modern") => ensure!(
                category.as_deref() == Some("validation"),
                "0.2.0 dead letter category {category:?}"
            ),
            Some("probe") => ensure!(
                category.is_none(),
                "0.1.0 dead letter has a category {category:?}"
            ),
            other => anyhow::bail!("dead letter from {other:?}"),
        }
    }
    Ok(())
}

/// How many calls the message with `payload` took.
fn attempts(calls: &[Call], payload: &str) -> usize {
    calls.iter().filter(|c| c.payload == payload).count()
}

/// A retryable failure is retried up to `max_attempts`, then dead-lettered
/// to `<topic>.dlq` with its origin; one that recovers in time is not.
fn retries_run_out_into_a_dead_letter_that_names_its_origin(broker: &dyn TestBroker) -> Result<()> {
    broker.create_topic("events", 1)?;
    broker.create_output_topic("events.dlq")?;
    let deployment = broker.deployment()?;
    deployment.add_handler("probe", "probe", RETRY_THREE_TIMES)?;
    let sent = vec![
        record(
            "k0",
            "recovers",
            &[("probe.fail", "retryable:2"), ("ce_id", "evt-0")],
        ),
        record(
            "k1",
            "exhausted",
            &[("probe.fail", "retryable:99"), ("ce_id", "evt-1")],
        ),
        record("k2", "healthy", &[("ce_id", "evt-2")]),
    ];
    let produced = broker.produce("events", &sent)?;
    let mut weir = deployment.start("run")?;
    wait_oks(&weir, 2)?;
    wait_read(broker, "events.dlq", 1, &weir)?;
    wait_caught_up(broker, GROUP, "events", &produced, &weir)?;
    stop(&mut weir)?;

    let calls = calls(&weir);
    for (payload, expected) in [("recovers", 3), ("exhausted", 3), ("healthy", 1)] {
        let took = attempts(&calls, payload);
        ensure!(
            took == expected,
            "{payload} took {took} calls, expected {expected}"
        );
    }
    let dead = broker.read("events.dlq")?;
    ensure!(
        dead.len() == 1,
        "expected one dead letter, got {}: {dead:?}",
        dead.len()
    );
    ensure_dead_letter(
        &dead[0],
        &sent[1],
        &produced[1],
        "retryable",
        "3",
        "probe asked to fail",
    )
}

/// A permanent error is dead-lettered at once: one attempt.
fn a_permanent_error_is_dead_lettered_after_one_attempt(broker: &dyn TestBroker) -> Result<()> {
    broker.create_topic("events", 1)?;
    broker.create_output_topic("events.dlq")?;
    let deployment = broker.deployment()?;
    deployment.add_handler("probe", "probe", RETRY_THREE_TIMES)?;
    let sent = vec![
        record(
            "k0",
            "refused",
            &[("probe.fail", "permanent"), ("ce_id", "evt-0")],
        ),
        record("k1", "healthy", &[]),
    ];
    let produced = broker.produce("events", &sent)?;
    let mut weir = deployment.start("run")?;
    wait_oks(&weir, 1)?;
    wait_read(broker, "events.dlq", 1, &weir)?;
    wait_caught_up(broker, GROUP, "events", &produced, &weir)?;
    stop(&mut weir)?;

    let calls = calls(&weir);
    ensure!(
        attempts(&calls, "refused") == 1,
        "a permanent error took {} calls",
        attempts(&calls, "refused")
    );
    let dead = broker.read("events.dlq")?;
    ensure!(dead.len() == 1, "dead letters: {dead:?}");
    ensure_dead_letter(
        &dead[0],
        &sent[0],
        &produced[0],
        "permanent",
        "1",
        "permanent failure",
    )
}

/// A file that is not a component, beside a good handler: the log names
/// it, the good one serves.
fn a_bad_component_is_reported_while_the_others_serve(broker: &dyn TestBroker) -> Result<()> {
    broker.create_topic("events", 3)?;
    let deployment = broker.deployment()?;
    deployment.add_handler("probe", "probe", PROBE)?;
    std::fs::write(
        deployment.handlers().join("broken.wasm"),
        b"\x7fELF not wasm at all",
    )?;
    std::fs::write(deployment.handlers().join("broken.toml"), PROBE)?;
    std::fs::write(deployment.handlers().join("core.wasm"), b"\0asm\x01\0\0\0")?;
    std::fs::write(deployment.handlers().join("core.toml"), PROBE)?;
    let records: Vec<Record> = (0..30)
        .map(|i| record(&format!("key-{}", i % 4), &format!("m-{i}"), &[]))
        .collect();
    let produced = broker.produce("events", &records)?;

    let mut weir = deployment.start("run")?;
    wait_oks(&weir, records.len())?;
    wait_caught_up(broker, GROUP, "events", &produced, &weir)?;
    stop(&mut weir)?;

    let failures: Vec<Value> = weir
        .records()
        .into_iter()
        .filter(|r| r["level"] == "ERROR" && r["message"] == "handler failed to load")
        .collect();
    let about = |file: &str, needle: &str| {
        failures.iter().any(|r| {
            r["file"].as_str().is_some_and(|f| f.ends_with(file))
                && r["error"].as_str().is_some_and(|e| e.contains(needle))
        })
    };
    ensure!(
        about("broken.wasm", "not a WebAssembly file"),
        "broken.wasm not reported: {failures:?}"
    );
    ensure!(
        about("core.wasm", "core WebAssembly module, not a component"),
        "core.wasm not reported: {failures:?}"
    );
    let expected: BTreeSet<String> = (0..30).map(|i| format!("m-{i}")).collect();
    ensure_each_once(&handled_counts([&weir]), &expected)
}

// ---------------------------------------------------------------------------
// Exactly-once effects, proven by crashing the process: the `counter`
// handler counts per key in state and emits one event per input carrying the
// new count; the input has duplicate event ids (see `weir_tests::counting`).

/// Kills Weir with SIGKILL at random moments while it works through a
/// stream with duplicates; a final run then catches up, and: every per-key
/// count in state equals the distinct input events of that key, and the
/// output holds every emitted event (by `event_id`) with identical copies
/// and per key exactly the counts 1..=n.
fn sigkill_in_a_loop_loses_no_state_and_emits_each_event_once(
    broker: &dyn TestBroker,
) -> Result<()> {
    let deployment = counter_deployment(broker, "")?;
    let mut rng = Rng::from_env();
    let mut input = Input::default();
    let cycles = crash_cycles(4);
    let mut kills_mid_work = 0;
    for cycle in 0..cycles {
        input.produce(broker, &mut rng, 40, 10)?;
        let mut weir = deployment.start(&format!("cycle-{cycle}"))?;
        let working = wait_for_work(&weir, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        if working && weir.wait_exit(Duration::ZERO)?.is_none() {
            kills_mid_work += 1;
        }
        weir.kill()?;
    }
    eprintln!("{cycles} SIGKILL cycles, {kills_mid_work} while handling");
    ensure!(
        kills_mid_work * 2 >= cycles,
        "only {kills_mid_work} of {cycles} kills landed while weir was working"
    );
    finish_and_verify(broker, &deployment, &input)
}

/// Weir aborts itself, like a power cut, at the moments a crash hurts
/// most (`WEIR_FAULT`, see `runtime/src/fault.rs`): before the group
/// commit, after it (nobody told, nothing acknowledged), and after a
/// publish (the outbox row not yet deleted); each several times, at a
/// random hit. Then the same checks as the SIGKILL loop.
fn aborting_at_the_worst_moments_loses_nothing_and_applies_nothing_twice(
    broker: &dyn TestBroker,
) -> Result<()> {
    let deployment = counter_deployment(broker, "")?;
    let mut rng = Rng::from_env();
    let mut input = Input::default();
    let points = ["after-commit", "after-publish", "before-commit"];
    let mut aborted = BTreeMap::new();
    for cycle in 0..points.len() * 3 {
        let point = points[cycle % points.len()];
        input.produce(broker, &mut rng, 30, 8)?;
        let fault = format!("{point}@{}", 1 + rng.below(6));
        let mut weir =
            deployment.start_with_env(&format!("fault-{cycle}"), &[("WEIR_FAULT", &fault)])?;
        match weir.wait_exit(Duration::from_secs(60))? {
            Some(status) => {
                ensure!(!status.success(), "weir exited cleanly with {fault} armed");
                ensure!(
                    weir.lines()
                        .iter()
                        .any(|l| l.contains("fault injection: aborting")),
                    "weir died without reaching {fault}; log: {}",
                    weir.log.display()
                );
                *aborted.entry(point).or_insert(0) += 1;
            }
            // It never reached the chosen hit: nothing to prove this cycle.
            None => weir.kill()?,
        }
    }
    eprintln!("aborts per fault point: {aborted:?}");
    for point in points {
        ensure!(
            aborted.get(point).copied().unwrap_or(0) >= 1,
            "never aborted at {point}: {aborted:?}"
        );
    }
    finish_and_verify(broker, &deployment, &input)
}

/// A call that writes state and emits, then fails, leaves nothing behind:
/// only the effects of the attempt that succeeded are committed.
fn effects_of_failed_attempts_are_discarded(broker: &dyn TestBroker) -> Result<()> {
    let deployment = counter_deployment(
        broker,
        "[retry]\nmax_attempts = 5\ninitial_delay = \"50ms\"\njitter = 0.0\n",
    )?;
    let mut input = Input::default();
    let records: Vec<Record> = (0..6)
        .map(|i| {
            let id = format!("ev-{i}");
            input.events.insert(id.clone(), "k1".into());
            let mut headers = vec![("event_id", id.as_str())];
            // Every other event writes, emits, then fails its first two
            // attempts.
            if i % 2 == 0 {
                headers.push(("counter.fail-attempts", "2"));
            }
            record("k1", &format!("{{\"id\":\"{id}\"}}"), &headers)
        })
        .collect();
    input.produced = broker.produce(INPUT, &records)?;
    finish_and_verify(broker, &deployment, &input)
}

/// A handler that keeps no state and emits (the no-op handler echoing each
/// event), with one lane per partition: its outcomes are committed a run
/// at a time, many per transaction (see "Runs" in
/// `runtime/src/pipeline/deliver.rs`). Weir aborts before and after such
/// a commit and after a publish, several times; a final run catches up.
/// Then: the input is acknowledged to its end, every distinct input event
/// was echoed under one emitted id, and every copy of an emitted id is
/// identical.
fn runs_committed_together_survive_aborts(broker: &dyn TestBroker) -> Result<()> {
    broker.create_topic(INPUT, 2)?;
    broker.create_output_topic(OUTPUT)?;
    let deployment = broker.deployment()?;
    broker.prepare_for_kills(&deployment)?;
    deployment.add_handler(
        "noop",
        "echo",
        &format!(
            "topics = [\"{INPUT}\"]\nordering = \"partition\"\nmax_in_flight = 64\n\n[config]\necho_topic = \"{OUTPUT}\"\n{}",
            broker.manifest_for_kills()
        ),
    )?;
    let mut rng = Rng::from_env();
    let mut input = Input::default();
    let points = ["before-commit", "after-commit", "after-publish"];
    let mut aborted = BTreeMap::new();
    for cycle in 0..points.len() * 2 {
        let point = points[cycle % points.len()];
        input.produce(broker, &mut rng, 60, 15)?;
        let fault = format!("{point}@{}", 1 + rng.below(3));
        let mut weir =
            deployment.start_with_env(&format!("fault-{cycle}"), &[("WEIR_FAULT", &fault)])?;
        match weir.wait_exit(Duration::from_secs(60))? {
            Some(status) => {
                ensure!(!status.success(), "weir exited cleanly with {fault} armed");
                *aborted.entry(point).or_insert(0) += 1;
            }
            None => weir.kill()?,
        }
    }
    eprintln!("aborts per fault point: {aborted:?}");
    for point in points {
        ensure!(
            aborted.get(point).copied().unwrap_or(0) >= 1,
            "never aborted at {point}: {aborted:?}"
        );
    }
    let distinct = input.events.len();
    let output = catch_up_and_read(broker, &deployment, "weir.echo", &input)?;
    let mut by_id: BTreeMap<String, (String, Vec<u8>, Option<String>)> = BTreeMap::new();
    for r in &output {
        let id = r.header("event_id").context("echo without event_id")?;
        let source = r
            .header("weir.source-event-id")
            .context("echo without weir.source-event-id")?;
        let this = (source, r.value.clone(), r.key_text());
        match by_id.get(&id) {
            Some(first) => ensure!(
                *first == this,
                "emitted event {id} published with different contents: {first:?} and {this:?}"
            ),
            None => {
                by_id.insert(id, this);
            }
        }
    }
    let sources: BTreeSet<&String> = by_id.values().map(|(s, _, _)| s).collect();
    let inputs: BTreeSet<&String> = input.events.keys().collect();
    ensure!(
        sources == inputs,
        "echoes' sources differ from the input: missing {:?}, unexpected {:?}",
        inputs.difference(&sources).take(10).collect::<Vec<_>>(),
        sources.difference(&inputs).take(10).collect::<Vec<_>>()
    );
    ensure!(
        by_id.len() == distinct,
        "{} distinct emitted ids for {distinct} distinct inputs",
        by_id.len()
    );
    eprintln!(
        "verified: {} records produced, {distinct} distinct events, {} echoes read",
        input.produced.len(),
        output.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The NATS harness itself, without weir: server, client, and what the
// suite's assertions rest on.

#[test]
fn nats_harness_serves_streams_consumers_and_restarts() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let mut nats = NatsBroker::start()?;
    let broker: &dyn TestBroker = &nats;
    broker.create_topic("orders", 1)?;
    // Idempotent.
    broker.create_topic("orders", 1)?;
    let sent = vec![
        record("k1", "one", &[("ce_id", "e1")]),
        record("k2", "two", &[("a", "x"), ("b", "y z")]),
        Record {
            key: None,
            value: vec![0, 255, 128],
            ..Record::default()
        },
    ];
    let produced = broker.produce("orders", &sent)?;
    let expected: Vec<Position> = (1..=3)
        .map(|sequence| Position::JetStream {
            stream: "orders".into(),
            sequence,
        })
        .collect();
    ensure!(produced == expected, "acknowledged at {produced:?}");

    let stored = broker.read("orders")?;
    ensure!(stored.len() == 3, "read back {stored:?}");
    for ((got, want), position) in stored.iter().zip(&sent).zip(&produced) {
        ensure!(
            got.value == want.value && got.key == want.key && got.position == *position,
            "read back {got:?} for {want:?}"
        );
        ensure!(got.topic == "orders", "subject {}", got.topic);
    }
    ensure!(
        stored[1].headers
            == vec![
                ("ce-partitionkey".to_string(), b"k2".to_vec()),
                ("a".to_string(), b"x".to_vec()),
                ("b".to_string(), b"y z".to_vec()),
            ],
        "headers in order: {:?}",
        stored[1].headers
    );
    ensure!(
        broker.read("nothing")?.is_empty(),
        "a subject without a stream"
    );
    ensure!(
        broker
            .produce(
                "orders",
                &[Record {
                    key: Some(vec![0xff]),
                    ..Record::default()
                }]
            )
            .is_err(),
        "a binary key cannot travel in a NATS header"
    );

    // caught_up follows a durable consumer named after the group.
    let group = "weir.probe";
    let durable = nats_durable(group, "orders", 1);
    ensure!(durable == "weir_probe", "durable {durable}");
    ensure!(
        !broker.caught_up(group, "orders", &produced)?,
        "caught up without a consumer"
    );
    ensure!(
        broker
            .progress(group, "orders")
            .contains("no durable consumer"),
        "{}",
        broker.progress(group, "orders")
    );
    let acked = nats.nats.ack(Stream::Capturing("orders"), &durable, 2)?;
    ensure!(acked == vec![1, 2], "acked {acked:?}");
    let state = nats
        .nats
        .consumer(Stream::Named("orders"), &durable)?
        .ok_or_else(|| anyhow!("no consumer after acking"))?;
    ensure!(
        state.num_pending == 1 && state.num_ack_pending == 0 && state.ack_floor_stream_seq == 2,
        "{state:?}"
    );
    ensure!(
        !nats.caught_up(group, "orders", &produced)?,
        "caught up with one pending"
    );
    nats.nats.ack(Stream::Capturing("orders"), &durable, 5)?;
    ensure!(
        nats.caught_up(group, "orders", &produced)?,
        "{}",
        nats.progress(group, "orders")
    );

    // Down, then back on the same port with the same store.
    nats.server.stop()?;
    ensure!(!nats.server.is_running(), "still running after stop");
    ensure!(
        nats.produce("orders", &sent[..1]).is_err(),
        "published to a stopped server"
    );
    nats.server.restart()?;
    ensure!(
        nats.read("orders")?.len() == 3,
        "messages lost over a restart"
    );
    ensure!(
        nats.caught_up(group, "orders", &produced)?,
        "consumer lost over a restart: {}",
        nats.progress(group, "orders")
    );
    let more = nats.produce("orders", &sent[..1])?;
    ensure!(
        more == vec![Position::JetStream {
            stream: "orders".into(),
            sequence: 4
        }],
        "after the restart: {more:?}"
    );
    nats.server.kill()?;
    nats.server.restart()?;
    let streams = nats.nats.streams()?;
    ensure!(
        streams.len() == 1
            && streams[0].name == stream_name("orders")
            && streams[0].subjects == vec!["orders".to_string()]
            && streams[0].messages == 4
            && streams[0].consumers == 1,
        "streams after SIGKILL and restart: {streams:?}"
    );
    ensure!(stream_name("orders.dlq") == "orders_dlq");
    Ok(())
}

// ---------------------------------------------------------------------------
// NATS only: a server that goes away mid-run (tansu keeps its in-memory
// topics only while it runs, so Kafka has no equivalent here).

#[test]
fn nats_server_down_mid_run_loses_and_repeats_nothing() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let mut nats = NatsBroker::start()?;
    nats.create_topic("events", 1)?;
    let deployment = nats.deployment()?;
    deployment.add_handler(
        "probe",
        "probe",
        "topics = [\"events\"]\nmax_in_flight = 4\n",
    )?;
    let batch = |range: std::ops::Range<usize>, sleep: &str| -> Vec<Record> {
        range
            .map(|i| {
                record(
                    &format!("key-{}", i % 5),
                    &format!("m-{i}"),
                    &[("probe.sleep-ms", sleep)],
                )
            })
            .collect()
    };
    // Four calls of 200 ms at a time: about 3 s of work.
    let mut produced = nats.produce("events", &batch(0..60, "200"))?;
    let mut weir = deployment.start("run")?;
    wait_oks(&weir, 8)?;
    nats.server.stop()?;
    // Calls in flight finish while the server is away; their
    // acknowledgements cannot reach it.
    let at_stop = oks(&weir).len();
    poll_until(
        Duration::from_secs(30),
        "a call to finish while the server is down",
        || Ok((oks(&weir).len() > at_stop).then_some(())),
        || format!("log: {}", weir.log.display()),
    )?;
    let during = oks(&weir).len();
    ensure!(
        during < 60,
        "everything was handled before the server stopped; make the work longer"
    );
    nats.server.restart()?;
    ensure!(
        weir.wait_exit(Duration::ZERO)?.is_none(),
        "weir exited while the server was down; log: {}",
        weir.log.display()
    );
    produced.extend(nats.produce("events", &batch(60..90, "0"))?);
    let expected: BTreeSet<String> = (0..90).map(|i| format!("m-{i}")).collect();
    poll_until(
        WAIT,
        "every message to be handled after the server came back",
        || {
            let seen: BTreeSet<String> = handled_counts([&weir]).into_keys().collect();
            Ok((seen == expected).then_some(()))
        },
        || {
            let seen: BTreeSet<String> = handled_counts([&weir]).into_keys().collect();
            format!(
                "missing {:?}; log: {}",
                expected.difference(&seen).take(10).collect::<Vec<_>>(),
                weir.log.display()
            )
        },
    )?;
    wait_caught_up(&nats, GROUP, "events", &produced, &weir)?;
    stop(&mut weir)?;
    eprintln!("{at_stop} of 60 handled when the server stopped, {during} when it came back");
    ensure_each_once(&handled_counts([&weir]), &expected)
}

// ---------------------------------------------------------------------------
// The SQS harness itself, without weir.

/// How many messages the SQS read test queues: enough that reading them
/// all takes longer than the 10 s visibility timeout the read once used
/// (which then never ended: the first messages came back before the last
/// were seen).
const SQS_READ_MESSAGES: usize = 8_000;

#[test]
fn sqs_harness_reads_a_queue_longer_than_a_visibility_timeout_once_each() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let sqs = SqsBroker::start()?;
    let broker: &dyn TestBroker = &sqs;
    broker.create_topic("big", 1)?;
    let records: Vec<Record> = (0..SQS_READ_MESSAGES)
        .map(|i| record(&format!("k{}", i % 7), &format!("m-{i}"), &[]))
        .collect();
    let produced = broker.produce("big", &records)?;
    ensure!(
        produced.len() == SQS_READ_MESSAGES,
        "{} acknowledged",
        produced.len()
    );

    let started = std::time::Instant::now();
    let stored = broker.read("big")?;
    eprintln!(
        "read {} messages in {:.1} s",
        stored.len(),
        started.elapsed().as_secs_f64()
    );
    let payloads: Vec<String> = stored
        .iter()
        .map(|s| String::from_utf8_lossy(&s.value).into_owned())
        .collect();
    let distinct: BTreeSet<&String> = payloads.iter().collect();
    ensure!(
        payloads.len() == SQS_READ_MESSAGES && distinct.len() == SQS_READ_MESSAGES,
        "read {} messages, {} distinct, of {SQS_READ_MESSAGES}",
        payloads.len(),
        distinct.len()
    );
    let positions: BTreeSet<&Position> = stored.iter().map(|s| &s.position).collect();
    ensure!(
        positions == produced.iter().collect(),
        "the messages read are not the messages sent"
    );
    // Read, not consumed: every message is visible again, none in flight.
    let counts = sqs.counts("big")?.context("the queue is gone")?;
    ensure!(
        (counts.visible, counts.not_visible) == (SQS_READ_MESSAGES as u64, 0),
        "after the read: {counts:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Hostile input

/// What tells the hostile messages apart: the payload (the big one's
/// first bytes; the probe logs 64).
fn label(payload: &str) -> String {
    if payload.starts_with("big-value") {
        "big-value".to_string()
    } else {
        payload.to_string()
    }
}

/// Every `sdk-probe` call as (label, outcome).
fn labelled(weir: &WeirProcess) -> Vec<(String, String)> {
    sdk_calls(weir)
        .into_iter()
        .map(|(payload, outcome)| (label(&payload), outcome))
        .collect()
}

/// One `sdk-probe` call, from its log record: (payload, outcome).
fn sdk_calls(weir: &WeirProcess) -> Vec<(String, String)> {
    weir.guest_records("hostile", "sdk-probe")
        .iter()
        .map(|r| {
            (
                r["payload"].as_str().unwrap_or_default().to_string(),
                r["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until the probe was called with every label in `expected`.
fn wait_called(weir: &WeirProcess, expected: &BTreeSet<String>, what: &str) -> Result<()> {
    poll_progress(
        WAIT,
        what,
        || {
            let seen: BTreeSet<String> = labelled(weir).into_iter().map(|(l, _)| l).collect();
            Ok(expected.is_subset(&seen).then_some(()))
        },
        || sdk_calls(weir).len(),
        || {
            format!(
                "{} calls; log: {}",
                sdk_calls(weir).len(),
                weir.log.display()
            )
        },
    )
}

/// Checks that each label in `expected` had exactly one call: a
/// `permanent` one for those in `dead`, an `ok` one for the others.
fn called_once(weir: &WeirProcess, expected: &BTreeSet<String>, dead: &[&str]) -> Result<()> {
    let calls = labelled(weir);
    for payload in expected {
        let outcomes: Vec<&str> = calls
            .iter()
            .filter(|(l, _)| l == payload)
            .map(|(_, o)| o.as_str())
            .collect();
        let want = if dead.contains(&payload.as_str()) {
            "permanent"
        } else {
            "ok"
        };
        ensure!(
            outcomes == [want],
            "{payload:?}: outcomes {outcomes:?}, expected one {want}; log: {}",
            weir.log.display()
        );
    }
    Ok(())
}

/// The value of header `name` of `stored`: its own, else from a
/// `weir.headers` Weir packed it into (a JSON array of `[name, value]`,
/// a value a string or `{"base64": ...}`).
fn carried_header(stored: &weir_tests::Stored, name: &str) -> Option<Vec<u8>> {
    if let Some((_, value)) = stored.headers.iter().find(|(n, _)| n == name) {
        return Some(value.clone());
    }
    let packed = stored.headers.iter().find(|(n, _)| n == "weir.headers")?;
    let pairs: Vec<(String, Value)> = serde_json::from_slice(&packed.1).ok()?;
    pairs
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| match v {
            Value::String(text) => text.into_bytes(),
            other => other["base64"]
                .as_str()
                .and_then(base64_decode)
                .unwrap_or_default(),
        })
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut bits = 0u32;
    let mut count = 0;
    for b in text.bytes().filter(|b| *b != b'=') {
        bits = (bits << 6) | ALPHABET.iter().position(|a| *a == b)? as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Some(out)
}

/// Input no well-behaved producer sends, each of which once stopped or
/// could stop a handler somewhere: header values that are not UTF-8 or
/// hold NUL bytes and line breaks (on NATS a raw header block the client
/// library cannot parse, with a carriage return inside a value and a name
/// it refuses too), header names that are not UTF-8 (Kafka, Redis), NUL bytes in
/// event ids and keys, a line break in a JSON correlation id (copied onto
/// the emitted event's headers), an empty and a 1,000-character key, 1,000
/// headers (SQS: the nine beside the key it takes), a payload near the broker's limit, a
/// producer's own `weir.origin.topic`, a 100 KiB multi-line failure
/// reason, and an emitted event whose key and headers few brokers carry as
/// they are. Each is handled or dead-lettered once with a readable reason,
/// every later message is handled, everything is acknowledged, the process
/// keeps running and nothing panics; the emitted event arrives with every
/// header, and the dead letters name Weir's origin, not the producer's.
fn hostile_input_never_stops_a_handler(broker: &dyn TestBroker) -> Result<()> {
    let kind = broker.kind();
    let nats = kind == BrokerKind::Nats;
    let sqs = kind == BrokerKind::Sqs;
    broker.create_topic("events", 1)?;
    broker.create_output_topic("events.dlq")?;
    broker.create_output_topic("emitted")?;
    let deployment = broker.deployment()?;
    // NATS: acknowledgements in flight when the client drops its
    // connection on an unreadable message come back after the ack wait.
    let nats_section = if nats {
        "[nats]\nack_wait = \"3s\"\n"
    } else {
        ""
    };
    deployment.add_handler(
        "sdk-probe",
        "hostile",
        &format!("topics = [\"events\"]\n[retry]\nmax_attempts = 1\n{nats_section}"),
    )?;
    let raw = |key: &[u8], payload: &str, headers: Vec<(String, Vec<u8>)>| Record {
        partition: None,
        key: Some(key.to_vec()),
        value: payload.as_bytes().to_vec(),
        headers,
    };
    let h = |name: &str, value: &[u8]| (name.to_string(), value.to_vec());
    let mut sent: Vec<Record> = vec![
        raw(b"k-nul-value", "nul-value", vec![h("nul", b"a\0b")]),
        raw(b"k-id-nul", "id-nul", vec![h("ce_id", b"id\0with-nul")]),
        raw(b"k\0nul", "key-nul", vec![]),
        raw("k".repeat(1000).as_bytes(), "key-long", vec![]),
        raw(
            b"k-corr",
            r#"{"metadata":{"correlation_id":"line1\nline2"},"n":1}"#,
            vec![h("probe.emit", b"emitted")],
        ),
        raw(b"k-emit", "emit-hostile", vec![h("probe.emit", b"emitted")]),
        raw(
            b"k-fail-long",
            "fail-long",
            vec![h("probe.fail", b"permanent-long")],
        ),
        raw(
            b"k-origin",
            "forged-origin",
            vec![
                h("weir.origin.topic", b"payments"),
                h("weir.replay-id", b"chosen-by-producer"),
                h("probe.fail", b"permanent"),
            ],
        ),
    ];
    // SQS takes ten attributes, the key one of them.
    if !sqs {
        // SQS refuses an empty attribute value, the key's among them.
        sent.push(raw(b"", "key-empty", vec![]));
    }
    let many = if sqs { 9 } else { 1000 };
    sent.push(raw(
        b"k-many",
        "many-headers",
        (0..many)
            .map(|i| h(&format!("h{i}"), format!("v{i}").as_bytes()))
            .collect(),
    ));
    // NATS: sent as a raw header block (the harness writes it byte for
    // byte), which the client library cannot parse: read another way.
    sent.push(raw(
        b"k-bin",
        "binary-value",
        vec![h("bin", &[0xff, 0xfe, 0])],
    ));
    sent.push(raw(
        b"k-lines",
        "newline-value",
        vec![h("multi", b"line1\nline2\r\nline3")],
    ));
    if nats {
        // A carriage return inside a value (the client library's connection
        // task asserts on it) and a name it refuses, in raw header blocks.
        sent.push(raw(b"k-cr", "cr-value", vec![h("cr", b"a\rb")]));
        sent.push(raw(
            b"k-bad-name",
            "bad-name",
            vec![h("hex:626164206e616d65", b"v")],
        ));
    }
    if matches!(kind, BrokerKind::Kafka | BrokerKind::Redis) {
        // A header name that is not UTF-8 ("hex:" makes the client send
        // the raw bytes).
        sent.push(raw(
            b"k-name",
            "binary-name",
            vec![h("hex:ff6e616d65", b"v")],
        ));
    }
    // SQS: 256 KiB per batch of ten, as the test client sends them.
    let big = if sqs { 150_000 } else { 900_000 };
    let mut large = raw(b"k-big", "", vec![]);
    large.value = vec![b'x'; big];
    large.value[..9].copy_from_slice(b"big-value");
    sent.push(large);
    let after: Vec<Record> = (0..5)
        .map(|i| record(&format!("after-{i}"), &format!("after-{i}"), &[]))
        .collect();
    let mut produced = broker.produce("events", &sent)?;
    produced.extend(broker.produce("events", &after)?);

    let mut weir = deployment.start("run")?;
    let log = weir.log.clone();
    let dead_payloads = ["fail-long", "forged-origin"];
    let expected: BTreeSet<String> = sent
        .iter()
        .chain(&after)
        .map(|r| label(&String::from_utf8_lossy(&r.value)))
        .collect();
    wait_called(
        &weir,
        &expected,
        "every hostile message handled or dead-lettered",
    )?;
    wait_caught_up(broker, "weir.hostile", "events", &produced, &weir)?;
    let dead = wait_read(broker, "events.dlq", dead_payloads.len(), &weir)?;
    let emitted = wait_read(broker, "emitted", 2, &weir)?;
    ensure!(
        weir.wait_exit(Duration::ZERO)?.is_none(),
        "weir died; log: {}",
        log.display()
    );
    stop(&mut weir)?;
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        !text.contains("panicked"),
        "a panic in the log: {}",
        log.display()
    );

    // Each handled (or refused) once.
    called_once(&weir, &expected, &dead_payloads)?;

    // The dead letters: a bounded reason, Weir's own origin.
    let letter = |payload: &str| {
        dead.iter()
            .find(|d| d.value == payload.as_bytes())
            .ok_or_else(|| anyhow!("no dead letter of {payload}: {dead:?}"))
    };
    let long = letter("fail-long")?;
    let error = long.header("weir.error").or_else(|| {
        carried_header(long, "weir.error").map(|v| String::from_utf8_lossy(&v).into_owned())
    });
    ensure!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("sdk-probe failure line 1\n")
                && e.contains("more bytes left out")
                && e.len() < 16 << 10),
        "weir.error of the long failure: {:?}",
        error.map(|e| e.len())
    );
    let forged = letter("forged-origin")?;
    ensure!(
        carried_header(forged, "weir.origin.topic").as_deref() == Some(&b"events"[..])
            && carried_header(forged, "x-weir.origin.topic").as_deref() == Some(&b"payments"[..]),
        "the producer's weir.origin.topic passed for Weir's: {:?}",
        forged.headers
    );

    // The emitted events: every header there, packed where the broker
    // needs it.
    let from_emit = emitted
        .iter()
        .find(|e| e.value == b"emitted:emit-hostile")
        .ok_or_else(|| anyhow!("no emitted event of emit-hostile: {emitted:?}"))?;
    for (name, value) in [
        ("with space", &b"x"[..]),
        ("multi", b"line1\r\nline2"),
        ("binary", &[0xff, 0]),
        ("colon:name", b"y"),
    ] {
        ensure!(
            carried_header(from_emit, name).as_deref() == Some(value),
            "emitted header {name:?}: {:?}; headers {:?}",
            carried_header(from_emit, name),
            from_emit.headers
        );
    }
    let from_corr = emitted
        .iter()
        .find(|e| e.value.starts_with(b"emitted:{"))
        .ok_or_else(|| anyhow!("no emitted event of the correlated message: {emitted:?}"))?;
    ensure!(
        carried_header(from_corr, "correlation_id").as_deref() == Some(&b"line1\nline2"[..]),
        "the correlation id did not travel: {:?}",
        from_corr.headers
    );
    Ok(())
}

/// NATS only: a message on a subject that is not UTF-8 (the server takes
/// any bytes but spaces; the client library drops its connection on such a
/// message, at every redelivery) is read from the stream instead and
/// handled once, and so is every message after it.
#[test]
fn nats_a_subject_that_is_not_utf8_stops_nothing() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = NatsBroker::start()?;
    broker.create_topic("events.>", 1)?;
    let deployment = broker.deployment()?;
    deployment.add_handler(
        "sdk-probe",
        "hostile",
        "topics = [\"events.>\"]\n[nats]\nack_wait = \"3s\"\n[dlq]\ntopic = \"dead.events\"\n",
    )?;
    publish_raw_subject(broker.server.port, b"events.\xff\xfe", b"bad-subject")?;
    let sent: Vec<Record> = (0..3)
        .map(|i| record(&format!("after-{i}"), &format!("after-{i}"), &[]))
        .collect();
    broker.produce("events.after", &sent)?;
    let mut weir = deployment.start("run")?;
    let mut expected: BTreeSet<String> = sent
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    expected.insert("bad-subject".to_string());
    wait_called(&weir, &expected, "every message handled")?;
    stop(&mut weir)?;
    called_once(&weir, &expected, &[])
}

/// Publishes `payload` to the raw bytes `subject` over the NATS protocol
/// (no client library publishes to a subject that is not UTF-8) and waits
/// for JetStream's acknowledgement.
fn publish_raw_subject(port: u16, subject: &[u8], payload: &[u8]) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut out = std::net::TcpStream::connect(("127.0.0.1", port))?;
    out.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(out.try_clone()?);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    let mut request =
        b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nSUB _INBOX.raw 1\r\nPUB ".to_vec();
    request.extend_from_slice(subject);
    request.extend_from_slice(format!(" _INBOX.raw {}\r\n", payload.len()).as_bytes());
    request.extend_from_slice(payload);
    request.extend_from_slice(b"\r\n");
    out.write_all(&request)?;
    loop {
        line.clear();
        reader.read_until(b'\n', &mut line)?;
        let text = String::from_utf8_lossy(&line).into_owned();
        if text.is_empty() || text.starts_with("-ERR") {
            anyhow::bail!("the server refused the publish: {text:?}");
        }
        if text.starts_with("PING") {
            out.write_all(b"PONG\r\n")?;
        }
        if text.starts_with("MSG _INBOX.raw") {
            line.clear();
            reader.read_until(b'\n', &mut line)?;
            let ack = String::from_utf8_lossy(&line);
            ensure!(!ack.contains("error"), "JetStream refused it: {ack}");
            return Ok(());
        }
    }
}

/// NATS only: a producer's instruction to the server on its own message
/// (`Nats-Expected-Stream`, satisfied when it published) is not repeated on
/// the dead letter, which the server would refuse (another stream captures
/// it) for as long as Weir tried: the dead letter arrives, carrying the
/// header packed, and the message after it is handled.
#[test]
fn nats_a_producers_server_instruction_does_not_reach_its_dead_letter() -> Result<()> {
    run(BrokerKind::Nats, |broker| {
        broker.create_topic("events", 1)?;
        let deployment = broker.deployment()?;
        deployment.add_handler("sdk-probe", "hostile", "topics = [\"events\"]\n")?;
        let stream = weir_tests::stream_name("events");
        let sent = [
            record(
                "k",
                "refused",
                &[
                    ("probe.fail", "permanent"),
                    ("Nats-Expected-Stream", &stream),
                ],
            ),
            record("k", "after", &[]),
        ];
        broker.produce("events", &sent)?;
        let mut weir = deployment.start("run")?;
        let log = weir.log.clone();
        let dead = poll_until(
            WAIT,
            "the dead letter",
            || {
                let dead = broker.read("events.dlq")?;
                Ok((!dead.is_empty()).then_some(dead))
            },
            || format!("log: {}", log.display()),
        )?;
        ensure!(
            dead.len() == 1
                && carried_header(&dead[0], "Nats-Expected-Stream") == Some(stream.into_bytes()),
            "dead letters: {dead:?}"
        );
        let expected: BTreeSet<String> = ["refused", "after"].map(String::from).into();
        wait_called(&weir, &expected, "both messages handled")?;
        stop(&mut weir)?;
        called_once(&weir, &expected, &["refused"])
    })
}

/// NATS only: a header value with a carriage return, the first message of
/// the stream. The client library's connection task asserts on it and
/// stops for good (every later call of that client fails); Weir connects
/// again with a new client and reads the message from the stream before
/// pulling, so it is handled once, and so is every message after it.
#[test]
fn nats_a_header_the_client_library_panics_on_stops_nothing() -> Result<()> {
    run(BrokerKind::Nats, |broker| {
        broker.create_topic("events", 1)?;
        let deployment = broker.deployment()?;
        deployment.add_handler(
            "sdk-probe",
            "hostile",
            "topics = [\"events\"]\n[nats]\nack_wait = \"3s\"\n",
        )?;
        let mut sent = vec![Record {
            partition: None,
            key: Some(b"k-cr".to_vec()),
            value: b"cr-value".to_vec(),
            headers: vec![("cr".to_string(), b"a\rb".to_vec())],
        }];
        sent.extend((0..5).map(|i| record(&format!("after-{i}"), &format!("after-{i}"), &[])));
        let produced = broker.produce("events", &sent)?;
        let mut weir = deployment.start("run")?;
        let log = weir.log.clone();
        let expected: BTreeSet<String> = sent
            .iter()
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect();
        wait_called(&weir, &expected, "every message handled")?;
        wait_caught_up(broker, "weir.hostile", "events", &produced, &weir)?;
        ensure!(
            weir.wait_exit(Duration::ZERO)?.is_none(),
            "weir died; log: {}",
            log.display()
        );
        stop(&mut weir)?;
        called_once(&weir, &expected, &[])
    })
}
