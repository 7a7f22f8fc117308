//! The walking skeleton, end to end: the real `weir` binary consuming from a
//! real Kafka-protocol broker (tansu), handing messages to a real Wasm
//! component (`tests/handlers/probe`), with an independent client
//! (kafka-python) producing and reading committed offsets.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use weir_tests::{
    Broker, Deployment, KafkaTool, Record, WeirProcess, broker_test, field, hex, poll_until, stop,
};

const TOPIC: &str = "events";
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
