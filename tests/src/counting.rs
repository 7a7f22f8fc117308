//! Exactly-once effects, proven by counting: the `counter` test handler
//! (`tests/handlers/counter`) counts per key in its state and emits one
//! event per input carrying the new count. A stream with duplicate event
//! ids goes in; whatever happens to the processes on the way (SIGKILL,
//! aborts, a store that goes away), a final run catches up and
//! [`finish_and_verify`] checks that every count equals the distinct input
//! events of its key and that the output holds every emitted event once
//! (copies identical), per key with exactly the counts `1..=n`.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{
    Deployment, Position, Record, Rng, Stored, TestBroker, WeirProcess, poll_progress, stop,
};

/// The topic the counter consumes.
pub const INPUT: &str = "events";
/// The topic the counter emits to.
pub const OUTPUT: &str = "counts";
/// The consumer group (NATS: the durable consumer's group) of the counter.
pub const COUNTER_GROUP: &str = "weir.counter";
/// How many keys the input spreads over.
pub const KEYS: u64 = 8;
/// How long a final run may go without progress (calls handled, the
/// broker's view of the group moving, emitted events appearing) before it
/// is taken for stuck. It may take as long as it keeps moving.
pub const CRASH_WAIT: Duration = Duration::from_secs(120);

/// The number of kill/restart cycles: `WEIR_CRASH_CYCLES`, else `default`.
pub fn crash_cycles(default: usize) -> usize {
    std::env::var("WEIR_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The input so far.
#[derive(Default)]
pub struct Input {
    /// Event id → key.
    pub events: BTreeMap<String, String>,
    /// Every position acknowledged, duplicates included.
    pub produced: Vec<Position>,
}

impl Input {
    /// Produces `new` new events and `duplicates` copies of earlier ones
    /// (same id, same key), shuffled, to [`INPUT`].
    ///
    /// # Errors
    ///
    /// When the broker does not acknowledge them.
    pub fn produce(
        &mut self,
        broker: &dyn TestBroker,
        rng: &mut Rng,
        new: usize,
        duplicates: usize,
    ) -> Result<()> {
        let event = |id: &str, key: &str| {
            Record::keyed(key, &format!("{{\"id\":\"{id}\"}}"), &[("event_id", id)])
        };
        let mut records = Vec::new();
        for _ in 0..new {
            let id = format!("ev-{}", self.events.len());
            let key = format!("k{}", rng.below(KEYS));
            records.push(event(&id, &key));
            self.events.insert(id, key);
        }
        let known: Vec<(&String, &String)> = self.events.iter().collect();
        for _ in 0..duplicates {
            if let Some((id, key)) = known.get(rng.below(known.len() as u64) as usize) {
                records.push(event(id, key));
            }
        }
        for i in (1..records.len()).rev() {
            records.swap(i, rng.below(i as u64 + 1) as usize);
        }
        self.produced.extend(broker.produce(INPUT, &records)?);
        Ok(())
    }

    /// How many distinct events each key has.
    pub fn per_key(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for key in self.events.values() {
            *counts.entry(key.clone()).or_insert(0) += 1;
        }
        counts
    }
}

/// How many calls of the counter `weir` has logged (`counted`), whether or
/// not their outcome was committed.
pub fn counted(weir: &WeirProcess) -> usize {
    weir.guest_records("counter", "counted").len()
}

/// Waits until the process has handled something, up to `timeout`.
pub fn wait_for_work(weir: &WeirProcess, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if counted(weir) > 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A counter deployment on [`INPUT`] that emits to [`OUTPUT`], ready for
/// kills; `extra` goes into the manifest before its `[config]`.
///
/// # Errors
///
/// When the topics cannot be created or the files written.
pub fn counter_deployment(broker: &dyn TestBroker, extra: &str) -> Result<Deployment> {
    counter_deployment_working(broker, extra, 3)
}

/// Like [`counter_deployment`], with each call working `work_ms`
/// milliseconds (so that calls overlap and a run takes longer).
///
/// # Errors
///
/// When the topics cannot be created or the files written.
pub fn counter_deployment_working(
    broker: &dyn TestBroker,
    extra: &str,
    work_ms: u64,
) -> Result<Deployment> {
    broker.create_topic(INPUT, 3)?;
    broker.create_output_topic(OUTPUT)?;
    let deployment = broker.deployment()?;
    broker.prepare_for_kills(&deployment)?;
    deployment.add_handler(
        "counter",
        "counter",
        &format!(
            "topics = [\"{INPUT}\"]\nmax_in_flight = 32\n{extra}\n[config]\noutput_topic = \"{OUTPUT}\"\nwork_ms = \"{work_ms}\"\n{}",
            broker.manifest_for_kills()
        ),
    )?;
    Ok(deployment)
}

/// A final run catches up: every produced record of `input` acknowledged
/// by `group`, and an emitted event in [`OUTPUT`] for every distinct input
/// event; returns what [`OUTPUT`] holds.
///
/// # Errors
///
/// When the run does not catch up in time, or exits with a failure.
pub fn catch_up_and_read(
    broker: &dyn TestBroker,
    deployment: &Deployment,
    group: &str,
    input: &Input,
) -> Result<Vec<Stored>> {
    let mut last = deployment.start("final")?;
    poll_progress(
        CRASH_WAIT,
        "everything produced to be acknowledged",
        || {
            Ok(broker
                .caught_up(group, INPUT, &input.produced)?
                .then_some(()))
        },
        || (counted(&last), broker.progress_mark(group, INPUT)),
        || {
            format!(
                "{}; log: {}",
                broker.progress(group, INPUT),
                last.log.display()
            )
        },
    )?;
    // The outbox drains after the acknowledgements.
    let distinct = input.events.len();
    let emitted = Cell::new(0);
    let output = poll_progress(
        CRASH_WAIT,
        "an emitted event for every distinct input event",
        || {
            let stored = broker.read(OUTPUT)?;
            let sources: BTreeSet<String> = stored
                .iter()
                .filter_map(|r| r.header("weir.source-event-id"))
                .collect();
            emitted.set(emitted.get().max(sources.len()));
            Ok((sources.len() >= distinct).then_some(stored))
        },
        || emitted.get(),
        || {
            format!(
                "{} of {distinct} emitted; log: {}",
                emitted.get(),
                last.log.display()
            )
        },
    )?;
    stop(&mut last)?;
    Ok(output)
}

/// The per-key counts in the counter's state, from `weir state list`.
///
/// # Errors
///
/// When the command fails or prints something else than counts.
pub fn state_counts(deployment: &Deployment) -> Result<BTreeMap<String, u64>> {
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
    Ok(state)
}

/// A final run catches up ([`catch_up_and_read`]); then every per-key
/// count in state equals the distinct input events of that key, every
/// emitted event (by `event_id`) has identical copies, their sources are
/// exactly the input events, and per key the emitted counts are `1..=n`.
///
/// # Errors
///
/// When any of that does not hold, saying what differs.
pub fn finish_and_verify(
    broker: &dyn TestBroker,
    deployment: &Deployment,
    input: &Input,
) -> Result<()> {
    let distinct = input.events.len();
    let output = catch_up_and_read(broker, deployment, COUNTER_GROUP, input)?;

    // 1. State: every count equals the number of distinct events of its key.
    let state = state_counts(deployment)?;
    let expected = input.per_key();
    ensure!(
        state == expected,
        "per-key counts in state {state:?} differ from the distinct input events {expected:?}"
    );

    // 2. Output: every copy of one id identical; the sources are exactly the
    //    inputs; per key the counts are 1..=n.
    let mut by_id: BTreeMap<String, (String, u64, String)> = BTreeMap::new();
    for r in &output {
        let id = r
            .header("event_id")
            .context("emitted event without event_id")?;
        let source = r
            .header("weir.source-event-id")
            .context("emitted event without weir.source-event-id")?;
        let payload: Value = serde_json::from_slice(&r.value)?;
        let key = payload["key"].as_str().unwrap_or_default().to_string();
        let count = payload["count"].as_u64().context("count")?;
        ensure!(
            payload["source_id"].as_str() == Some(source.as_str()),
            "payload and header disagree on the source: {payload}"
        );
        let this = (key, count, source);
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
        input.produced.len(),
        output.len(),
        by_id.len()
    );
    Ok(())
}
