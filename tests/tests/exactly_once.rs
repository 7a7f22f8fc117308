//! Exactly-once effects, proven by crashing the process.
//!
//! The `counter` test handler increments a per-key counter in `state` and
//! emits one event per input carrying the new count. The input stream has
//! duplicate event ids. Weir aborts itself at the worst moments (fault
//! points: before and after the commit, after a publish) and is restarted;
//! at the end:
//!
//! - every per-key count in `state` equals the number of distinct input
//!   events with that key: nothing lost, nothing applied twice;
//! - the output topic holds an event for every distinct input (at least
//!   once), every copy of one emitted event id is identical, and per key the
//!   counts carried by the distinct emitted events are exactly 1..=n: after
//!   deduplication by event id, each effect appears exactly once.
//!
//! The SIGKILL-at-random-moments loop runs on every broker in
//! `conformance.rs` (`WEIR_CRASH_CYCLES` cycles, 4 by default).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weir_tests::{
    Broker, Deployment, KafkaTool, Record, Rng, broker_test, header, poll_until, stop, unhex,
};

const INPUT: &str = "events";
const OUTPUT: &str = "counts";
const PARTITIONS: i32 = 3;
const KEYS: u64 = 8;
const WAIT: Duration = Duration::from_secs(120);

/// The input so far: every record produced, and the distinct events.
struct Input {
    /// Event id → key.
    events: BTreeMap<String, String>,
    /// Records produced, duplicates included.
    produced: usize,
    /// End offset of every partition (from the producer's acknowledgements).
    ends: BTreeMap<i32, Option<i64>>,
}

impl Input {
    fn new() -> Self {
        Self {
            events: BTreeMap::new(),
            produced: 0,
            // Partitions without records have no committed offset.
            ends: (0..PARTITIONS).map(|p| (p, None)).collect(),
        }
    }

    /// Produces `new` new events and `duplicates` copies of earlier ones
    /// (same id, same key, as a retrying producer would send them).
    fn produce(
        &mut self,
        kafka: &KafkaTool,
        rng: &mut Rng,
        new: usize,
        duplicates: usize,
    ) -> Result<()> {
        let mut records = Vec::new();
        for _ in 0..new {
            let id = format!("ev-{}", self.events.len());
            let key = format!("k{}", rng.below(KEYS));
            records.push(record(&id, &key));
            self.events.insert(id, key);
        }
        let known: Vec<(&String, &String)> = self.events.iter().collect();
        for _ in 0..duplicates {
            let (id, key) = known[rng.below(known.len() as u64) as usize];
            records.push(record(id, key));
        }
        // Shuffle so that duplicates sometimes arrive before the original
        // was handled.
        for i in (1..records.len()).rev() {
            records.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for (partition, offset) in kafka.produce(INPUT, &records)? {
            let end = self.ends.entry(partition).or_insert(Some(0));
            *end = Some(end.unwrap_or(0).max(offset + 1));
        }
        self.produced += records.len();
        Ok(())
    }

    fn per_key(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for key in self.events.values() {
            *counts.entry(key.clone()).or_insert(0) += 1;
        }
        counts
    }
}

/// A record keyed by `key`; its partition follows the key, so per-key order
/// is the order within one partition.
fn record(id: &str, key: &str) -> Record {
    let partition = key
        .trim_start_matches('k')
        .parse::<i32>()
        .unwrap_or(0)
        .rem_euclid(PARTITIONS);
    Record {
        partition: Some(partition),
        key: Some(key.as_bytes().to_vec()),
        value: format!("{{\"id\":\"{id}\"}}").into_bytes(),
        headers: vec![("event_id".to_string(), id.as_bytes().to_vec())],
    }
}

fn setup() -> Result<(Broker, KafkaTool, Deployment)> {
    let broker = Broker::start()?;
    let kafka = KafkaTool::new(&broker)?;
    kafka.create_topic(INPUT, PARTITIONS)?;
    kafka.create_topic(OUTPUT, PARTITIONS)?;
    let deployment = Deployment::new(&broker)?;
    // A killed member never says goodbye: let the broker notice quickly so
    // the restarted process gets the partitions without a long wait.
    deployment.append_config(
        "\n[source.kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
    )?;
    deployment.add_handler(
        "counter",
        "counter",
        &format!(
            "topics = [\"{INPUT}\"]\nmax_in_flight = 32\n\n[config]\noutput_topic = \"{OUTPUT}\"\nwork_ms = \"3\"\n"
        ),
    )?;
    Ok((broker, kafka, deployment))
}

/// Runs weir to completion and checks every promise.
fn finish_and_verify(kafka: &KafkaTool, deployment: &Deployment, input: &Input) -> Result<()> {
    let mut last = deployment.start("final")?;
    poll_until(
        WAIT,
        "the group's committed offsets to reach the end of the input",
        || Ok((kafka.committed("weir.counter", INPUT)? == input.ends).then_some(())),
        || {
            format!(
                "{:?} vs {:?}; log: {}",
                kafka.committed("weir.counter", INPUT).ok(),
                input.ends,
                last.log.display()
            )
        },
    )?;
    // The outbox drains after the commits: wait for every emitted event.
    let distinct = input.events.len();
    let output = poll_until(
        WAIT,
        "an emitted event for every distinct input event",
        || {
            let records = kafka.consume(OUTPUT, usize::MAX >> 1, Duration::from_secs(3))?;
            let sources: BTreeSet<String> = records
                .iter()
                .filter_map(|r| header(r, "weir.source-event-id"))
                .collect();
            Ok((sources.len() >= distinct).then_some(records))
        },
        || format!("log: {}", last.log.display()),
    )?;
    stop(&mut last)?;

    // 1. State: every count equals the number of distinct events of its key.
    let listing = deployment.weir(&["state", "list", "counter", "--prefix", "count/", "--json"])?;
    let mut state: BTreeMap<String, u64> = BTreeMap::new();
    for line in listing.lines() {
        let entry: Value = serde_json::from_str(line).context("state list line")?;
        let key = entry["key"].as_str().unwrap_or_default();
        let value = entry["value"].as_str().unwrap_or_default();
        state.insert(
            key.trim_start_matches("count/").to_string(),
            value.parse().with_context(|| format!("count {value:?}"))?,
        );
    }
    let expected = input.per_key();
    ensure!(
        state == expected,
        "per-key counts in state {state:?} differ from the distinct input events {expected:?}"
    );

    // 2. Output: all ids present; copies of one id identical; per key the
    //    distinct events carry the counts 1..=n.
    let mut by_id: BTreeMap<String, (String, u64, String)> = BTreeMap::new();
    for r in &output {
        let id = header(r, "event_id").context("emitted event without event_id")?;
        let source = header(r, "weir.source-event-id").context("no source id")?;
        let payload: Value =
            serde_json::from_slice(&unhex(r["value_hex"].as_str().unwrap_or_default())?)?;
        let key = payload["key"].as_str().unwrap_or_default().to_string();
        let count = payload["count"].as_u64().context("count")?;
        ensure!(
            payload["source_id"].as_str() == Some(source.as_str()),
            "payload and header disagree on the source: {payload}"
        );
        match by_id.get(&id) {
            Some(first) => ensure!(
                first == &(key.clone(), count, source.clone()),
                "emitted event {id} published with different contents: {first:?} and {:?}",
                (key, count, source)
            ),
            None => {
                by_id.insert(id, (key, count, source));
            }
        }
    }
    let sources: BTreeSet<&String> = by_id.values().map(|(_, _, s)| s).collect();
    let inputs: BTreeSet<&String> = input.events.keys().collect();
    ensure!(
        sources == inputs,
        "emitted events' sources differ from the input: missing {:?}, unexpected {:?}",
        inputs.difference(&sources).take(10).collect::<Vec<_>>(),
        sources.difference(&inputs).take(10).collect::<Vec<_>>()
    );
    ensure!(
        by_id.len() == distinct,
        "{} distinct emitted ids for {distinct} distinct inputs",
        by_id.len()
    );
    let mut counts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, count, _) in by_id.values() {
        counts.entry(key.clone()).or_default().push(*count);
    }
    for (key, n) in &expected {
        let mut seen = counts.remove(key).unwrap_or_default();
        seen.sort_unstable();
        let want: Vec<u64> = (1..=*n).collect();
        ensure!(
            seen == want,
            "key {key}: emitted counts {seen:?}, expected 1..={n}"
        );
    }
    eprintln!(
        "verified: {} records produced, {distinct} distinct events, {} emitted records read ({} distinct)",
        input.produced,
        output.len(),
        by_id.len()
    );
    Ok(())
}

#[test]
fn aborting_at_the_worst_moments_loses_nothing_and_applies_nothing_twice() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup()?;
    let mut rng = Rng::from_env();
    let mut input = Input::new();
    // Each point several times, at a random hit.
    let points = ["after-commit", "after-publish", "before-commit"];
    let mut aborted = BTreeMap::new();
    for cycle in 0..points.len() * 3 {
        let point = points[cycle % points.len()];
        input.produce(&kafka, &mut rng, 30, 8)?;
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
    finish_and_verify(&kafka, &deployment, &input)
}

#[test]
fn effects_of_failed_attempts_are_discarded() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let (_broker, kafka, deployment) = setup()?;
    let mut records = Vec::new();
    let mut input = Input::new();
    for i in 0..6 {
        let id = format!("ev-{i}");
        let key = "k1".to_string();
        let mut r = record(&id, &key);
        // Every other event writes, emits, then fails its first two attempts.
        if i % 2 == 0 {
            r.headers
                .push(("counter.fail-attempts".to_string(), b"2".to_vec()));
        }
        records.push(r);
        input.events.insert(id, key);
    }
    for (partition, offset) in kafka.produce(INPUT, &records)? {
        let end = input.ends.entry(partition).or_insert(Some(0));
        *end = Some(end.unwrap_or(0).max(offset + 1));
    }
    input.produced = records.len();
    deployment.add_handler(
        "counter",
        "counter",
        &format!(
            "topics = [\"{INPUT}\"]\n[retry]\nmax_attempts = 5\ninitial_delay = \"50ms\"\njitter = 0.0\n\n[config]\noutput_topic = \"{OUTPUT}\"\n"
        ),
    )?;
    finish_and_verify(&kafka, &deployment, &input)
}
