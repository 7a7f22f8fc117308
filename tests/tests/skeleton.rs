//! The walking skeleton, end to end: the real `weir` binary consuming from a
//! real Kafka-protocol broker (tansu), handing messages to a real Wasm
//! component (`tests/handlers/probe`), with an independent client
//! (kafka-python) producing and reading committed offsets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use weir_tests::{
    Broker, Deployment, KafkaTool, Record, WeirProcess, broker_test, field, hex, poll_until, stop,
};

const TOPIC: &str = "events";
const GROUP: &str = "weir.probe";
const PROBE: &str = "topics = [\"events\"]\nmax_in_flight = 16\n";
const WAIT: Duration = Duration::from_secs(60);

fn setup() -> Result<(Broker, KafkaTool, Deployment)> {
    let broker = Broker::start()?;
    let kafka = KafkaTool::new(&broker)?;
    kafka.create_topic(TOPIC, 3)?;
    let deployment = Deployment::new(&broker)?;
    Ok((broker, kafka, deployment))
}

fn records(range: std::ops::Range<usize>) -> Vec<Record> {
    range
        .map(|i| Record {
            partition: Some((i % 3) as i32),
            key: Some(format!("key-{}", i % 7).into_bytes()),
            value: format!("value-{i}").into_bytes(),
            headers: vec![],
        })
        .collect()
}

/// (partition, offset) of every probe call that succeeded.
fn handled(weir: &WeirProcess) -> Vec<(i64, i64)> {
    weir.guest_records("probe", "probe")
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .filter_map(|r| Some((field(r, "partition")?, field(r, "offset")?)))
        .collect()
}

fn wait_handled(weir: &WeirProcess, count: usize) -> Result<()> {
    poll_until(
        WAIT,
        &format!("{count} messages to be handled"),
        || Ok((handled(weir).len() >= count).then_some(())),
        || {
            format!(
                "{} handled; log: {}",
                handled(weir).len(),
                weir.log.display()
            )
        },
    )
}

/// The end offset of each partition, from the broker's acknowledgements of
/// everything produced. (tansu 0.6's in-memory ListOffsets reports batch
/// counts rather than offsets, so the acknowledgements are the reliable
/// source.)
fn end_offsets(produced: &[(i32, i64)]) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for &(partition, offset) in produced {
        let end = ends.entry(partition).or_insert(0);
        *end = (*end).max(offset + 1);
    }
    ends
}

fn assert_committed_at_end(kafka: &KafkaTool, produced: &[(i32, i64)]) -> Result<()> {
    let ends = end_offsets(produced);
    let committed = kafka.committed(GROUP, TOPIC)?;
    let expected: BTreeMap<i32, Option<i64>> = ends.iter().map(|(p, o)| (*p, Some(*o))).collect();
    ensure!(
        committed == expected,
        "committed {committed:?} != end offsets {ends:?}"
    );
    Ok(())
}

#[test]
fn every_message_is_handled_exactly_once_and_committed() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup()?;
    let produced = kafka.produce(TOPIC, &records(0..300))?;
    deployment.add_handler("probe", "probe", PROBE)?;

    let mut weir = deployment.start("run")?;
    wait_handled(&weir, 300)?;
    stop(&mut weir)?;

    let seen = handled(&weir);
    let distinct: BTreeSet<_> = seen.iter().copied().collect();
    ensure!(
        seen.len() == 300,
        "handled {} times, expected 300",
        seen.len()
    );
    ensure!(
        distinct.len() == 300,
        "only {} distinct messages",
        distinct.len()
    );
    // Same key, same partition: handled in offset order.
    let mut lanes: BTreeMap<(i64, String), Vec<i64>> = BTreeMap::new();
    for call in weir.guest_records("probe", "probe") {
        if let (Some(p), Some(o), Some(k)) = (
            field(&call, "partition"),
            field(&call, "offset"),
            call["key_hex"].as_str(),
        ) {
            lanes.entry((p, k.to_string())).or_default().push(o);
        }
    }
    ensure!(
        lanes.len() == 21,
        "expected 7 keys on each of 3 partitions: {:?}",
        lanes.keys()
    );
    for (lane, offsets) in &lanes {
        ensure!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "key {lane:?} handled out of order: {offsets:?}"
        );
    }
    assert_committed_at_end(&kafka, &produced)
}

#[test]
fn after_a_restart_nothing_committed_is_handled_again() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup()?;
    deployment.add_handler("probe", "probe", PROBE)?;
    let mut produced = kafka.produce(TOPIC, &records(0..90))?;
    let mut first = deployment.start("first")?;
    wait_handled(&first, 90)?;
    stop(&mut first)?;
    assert_committed_at_end(&kafka, &produced)?;

    let more = kafka.produce(TOPIC, &records(90..150))?;
    let fresh: BTreeSet<(i64, i64)> = more.iter().map(|&(p, o)| (i64::from(p), o)).collect();
    produced.extend(more);
    let mut second = deployment.start("second")?;
    wait_handled(&second, 60)?;
    stop(&mut second)?;

    let seen: Vec<_> = handled(&second);
    let distinct: BTreeSet<_> = seen.iter().copied().collect();
    ensure!(
        seen.len() == 60 && distinct == fresh,
        "second run handled {seen:?}, expected exactly the 60 new messages {fresh:?}"
    );
    assert_committed_at_end(&kafka, &produced)
}

/// FNV-1a 64, as the probe computes it over payloads.
fn fnv1a(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

#[test]
fn binary_payloads_and_non_utf8_keys_pass_through_untouched() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup()?;
    let mut big = Vec::with_capacity(100 * 1024);
    let mut x: u32 = 0x1234_5678;
    while big.len() < 100 * 1024 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        big.push((x & 0xff) as u8);
    }
    let sent = vec![
        Record {
            partition: Some(0),
            key: Some(vec![0xff, 0xfe, 0x00, 0x80]),
            value: (0..=255u8).collect(),
            headers: vec![
                ("bin".into(), vec![0x00, 0xff, 0x80]),
                ("text".into(), b"hello".to_vec()),
            ],
        },
        Record {
            partition: Some(1),
            key: None,
            value: Vec::new(),
            headers: vec![],
        },
        Record {
            partition: Some(2),
            key: Some(vec![0xc3, 0x28]),
            value: big,
            headers: vec![("empty".into(), Vec::new())],
        },
    ];
    let positions = kafka.produce(TOPIC, &sent)?;
    deployment.add_handler("probe", "probe", PROBE)?;
    let mut weir = deployment.start("run")?;
    wait_handled(&weir, sent.len())?;
    stop(&mut weir)?;

    let calls = weir.guest_records("probe", "probe");
    for (record, (partition, offset)) in sent.iter().zip(positions) {
        let call = calls
            .iter()
            .find(|c| {
                field(c, "partition") == Some(i64::from(partition))
                    && field(c, "offset") == Some(offset)
            })
            .ok_or_else(|| anyhow::anyhow!("no call for {partition}/{offset}"))?;
        let key = record
            .key
            .as_deref()
            .map(hex)
            .unwrap_or_else(|| "none".into());
        ensure!(
            call["key_hex"] == key.as_str(),
            "key: {} != {key}",
            call["key_hex"]
        );
        ensure!(
            call["payload_len"] == record.value.len().to_string().as_str(),
            "length differs at {partition}/{offset}"
        );
        ensure!(
            call["payload_fnv"] == fnv1a(&record.value).as_str(),
            "payload differs at {partition}/{offset}"
        );
        if record.value.len() <= 2048 {
            ensure!(
                call["payload_hex"] == hex(&record.value).as_str(),
                "payload differs at {partition}/{offset}"
            );
        }
        let headers: Value = serde_json::from_str(call["headers"].as_str().unwrap_or("null"))?;
        let expected: Vec<[String; 2]> = record
            .headers
            .iter()
            .map(|(n, v)| [n.clone(), hex(v)])
            .collect();
        ensure!(
            headers == serde_json::json!(expected),
            "headers {headers} != {expected:?}"
        );
    }
    Ok(())
}

#[test]
fn a_bad_component_is_reported_and_the_others_keep_running() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup()?;
    deployment.add_handler("probe", "probe", PROBE)?;
    std::fs::write(
        deployment.handlers().join("broken.wasm"),
        b"\x7fELF not wasm at all",
    )?;
    std::fs::write(deployment.handlers().join("broken.toml"), PROBE)?;
    std::fs::write(deployment.handlers().join("core.wasm"), b"\0asm\x01\0\0\0")?;
    std::fs::write(deployment.handlers().join("core.toml"), PROBE)?;
    kafka.produce(TOPIC, &records(0..30))?;

    let mut weir = deployment.start("run")?;
    wait_handled(&weir, 30)?;
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
    ensure!(
        handled(&weir).len() == 30,
        "probe handled {} of 30",
        handled(&weir).len()
    );
    Ok(())
}

#[test]
fn failures_are_retried_then_dead_lettered_with_their_origin() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup()?;
    kafka.create_topic("events.dlq", 1)?;
    let manifest = "topics = [\"events\"]\n[retry]\nmax_attempts = 3\ninitial_delay = \"50ms\"\nmultiplier = 2.0\nmax_delay = \"200ms\"\njitter = 0.0\n";
    deployment.add_handler("probe", "probe", manifest)?;
    let fail = |how: &str, i: usize| Record {
        partition: Some(0),
        key: Some(format!("k{i}").into_bytes()),
        value: format!("v{i}").into_bytes(),
        headers: if how.is_empty() {
            vec![]
        } else {
            vec![("probe.fail".into(), how.as_bytes().to_vec())]
        },
    };
    let sent = vec![
        fail("retryable:2", 0),
        fail("permanent", 1),
        fail("retryable:99", 2),
        fail("", 3),
    ];
    kafka.produce(TOPIC, &sent)?;

    let mut weir = deployment.start("run")?;
    wait_handled(&weir, 2)?;
    let dead = poll_until(
        WAIT,
        "two dead letters",
        || {
            let got = kafka.consume("events.dlq", 2, Duration::from_millis(500))?;
            Ok((got.len() >= 2).then_some(got))
        },
        || weir.log.display().to_string(),
    )?;
    poll_until(
        WAIT,
        "offsets committed past the dead letters",
        || {
            Ok(kafka
                .committed(GROUP, TOPIC)?
                .get(&0)
                .copied()
                .flatten()
                .filter(|o| *o == 4))
        },
        || format!("{:?}", kafka.committed(GROUP, TOPIC).ok()),
    )?;
    stop(&mut weir)?;

    let calls = weir.guest_records("probe", "probe");
    let attempts = |offset: i64| {
        calls
            .iter()
            .filter(|c| field(c, "offset") == Some(offset))
            .count()
    };
    ensure!(
        attempts(0) == 3,
        "retryable:2 took {} calls, expected 3",
        attempts(0)
    );
    ensure!(
        attempts(1) == 1,
        "permanent took {} calls, expected 1",
        attempts(1)
    );
    ensure!(
        attempts(2) == 3,
        "exhausted message took {} calls, expected 3",
        attempts(2)
    );
    ensure!(
        attempts(3) == 1,
        "healthy message took {} calls",
        attempts(3)
    );

    let header = |record: &Value, name: &str| -> Option<String> {
        record["headers"]
            .as_array()?
            .iter()
            .find(|h| h[0] == name)
            .and_then(|h| {
                let bytes: Vec<u8> = (0..h[1].as_str()?.len())
                    .step_by(2)
                    .filter_map(|i| u8::from_str_radix(h[1].as_str()?.get(i..i + 2)?, 16).ok())
                    .collect();
                String::from_utf8(bytes).ok()
            })
    };
    let by_offset = |offset: &str| {
        dead.iter()
            .find(|r| header(r, "weir.origin.offset").as_deref() == Some(offset))
    };
    let permanent =
        by_offset("1").ok_or_else(|| anyhow::anyhow!("no dead letter for offset 1: {dead:?}"))?;
    ensure!(
        permanent["key_hex"] == hex(b"k1").as_str()
            && permanent["value_hex"] == hex(b"v1").as_str()
    );
    ensure!(
        header(permanent, "probe.fail").as_deref() == Some("permanent"),
        "original headers kept"
    );
    ensure!(header(permanent, "weir.handler").as_deref() == Some("probe"));
    ensure!(header(permanent, "weir.error.kind").as_deref() == Some("permanent"));
    ensure!(header(permanent, "weir.attempts").as_deref() == Some("1"));
    ensure!(header(permanent, "weir.origin.topic").as_deref() == Some("events"));
    ensure!(header(permanent, "weir.origin.partition").as_deref() == Some("0"));
    ensure!(header(permanent, "weir.failed-at").is_some_and(|t| t.ends_with('Z')));
    let exhausted =
        by_offset("2").ok_or_else(|| anyhow::anyhow!("no dead letter for offset 2: {dead:?}"))?;
    ensure!(header(exhausted, "weir.attempts").as_deref() == Some("3"));
    ensure!(header(exhausted, "weir.error.kind").as_deref() == Some("retryable"));
    ensure!(header(exhausted, "weir.error").is_some_and(|e| e.contains("probe asked to fail")));
    Ok(())
}

#[test]
fn the_embedded_broker_prints_an_address_any_client_can_produce_to() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let deployment = Deployment::embedded()?;
    deployment.add_handler("probe", "probe", PROBE)?;
    let mut weir = deployment.start("embedded")?;
    let bootstrap = poll_until(
        WAIT,
        "the embedded broker's address on stdout",
        || {
            Ok(weir
                .lines()
                .iter()
                .find_map(|l| l.strip_prefix("embedded broker: ").map(str::to_string)))
        },
        || weir.log.display().to_string(),
    )?;
    ensure!(
        bootstrap.starts_with("127.0.0.1:"),
        "not on loopback: {bootstrap}"
    );
    let kafka = KafkaTool::for_bootstrap(&bootstrap)?;
    kafka.produce(TOPIC, &records(0..20))?;
    wait_handled(&weir, 20)?;
    stop(&mut weir)?;
    ensure!(handled(&weir).len() == 20, "handled {:?}", handled(&weir));
    Ok(())
}
