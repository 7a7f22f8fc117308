//! One busy handler must not starve another of Wasm instances: every call of
//! a handler holds an instance, and the engine's pool is shared by the
//! process. Weir caps the calls of each handler that run at once, and makes
//! "no free instance" a wait, never a failed attempt.

use std::time::Duration;

use anyhow::{Result, ensure};
use weir_tests::{Broker, Deployment, KafkaTool, Record, broker_test, poll_until, stop};

#[test]
fn a_busy_handler_does_not_starve_another_of_instances() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = Broker::start()?;
    let kafka = KafkaTool::new(&broker)?;
    kafka.create_topic("slow", 1)?;
    kafka.create_topic("fast", 1)?;
    kafka.create_topic("fast.dlq", 1)?;
    let deployment = Deployment::new(&broker)?;
    // The hog may hold 400 messages, each taking 2 s: without a per-handler
    // cap it would run hundreds of calls at once and take every instance
    // slot (the engine's pool has 256).
    deployment.add_handler(
        "probe",
        "hog",
        "topics = [\"slow\"]\nordering = \"none\"\nmax_in_flight = 400\n",
    )?;
    deployment.add_handler(
        "probe",
        "victim",
        "topics = [\"fast\"]\n[retry]\nmax_attempts = 2\ninitial_delay = \"100ms\"\n",
    )?;
    let slow: Vec<Record> = (0..300)
        .map(|i| Record {
            partition: Some(0),
            key: Some(format!("s{i}").into_bytes()),
            value: b"{}".to_vec(),
            headers: vec![("probe.sleep-ms".into(), b"2000".to_vec())],
        })
        .collect();
    kafka.produce("slow", &slow)?;
    let mut weir = deployment.start("run")?;
    // The hog is busy: its first calls have come back.
    poll_until(
        Duration::from_secs(60),
        "the hog's first calls",
        || Ok((!weir.guest_records("hog", "probe").is_empty()).then_some(())),
        || format!("log: {}", weir.log.display()),
    )?;
    let fast: Vec<Record> = (0..60)
        .map(|i| Record {
            partition: Some(0),
            key: Some(format!("f{i}").into_bytes()),
            value: b"{}".to_vec(),
            headers: vec![],
        })
        .collect();
    kafka.produce("fast", &fast)?;
    let handled = || {
        weir.guest_records("victim", "probe")
            .iter()
            .filter(|r| r["outcome"] == "ok")
            .count()
    };
    poll_until(
        Duration::from_secs(60),
        "the victim to handle its 60 messages while the hog is busy",
        || Ok((handled() >= 60).then_some(())),
        || format!("{} handled; log: {}", handled(), weir.log.display()),
    )?;
    let hog_calls = weir.guest_records("hog", "probe").len();
    stop(&mut weir)?;
    ensure!(
        hog_calls < 300,
        "the hog finished before the victim was checked ({hog_calls} calls): the test proves nothing"
    );
    let starved: Vec<String> = weir
        .lines()
        .into_iter()
        .filter(|l| l.contains("maximum concurrent") || l.contains("dead-lettered"))
        .collect();
    ensure!(
        starved.is_empty(),
        "instances ran out or messages were dead-lettered: {starved:?}"
    );
    let dead = kafka.consume("fast.dlq", 1, Duration::from_secs(2))?;
    ensure!(dead.is_empty(), "the victim dead-lettered: {dead:?}");
    Ok(())
}
