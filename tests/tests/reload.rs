//! Hot reload under load: a handler's file is replaced several times
//! (once with a broken file, once written slowly in two halves) while
//! events stream in. Every event is handled exactly once, by the version
//! live at the time, the broken file is reported and never served, and the
//! consumer never restarts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use weir_tests::{
    Broker, Deployment, KafkaTool, Record, WeirProcess, broker_test, field, poll_until, stop,
    workspace,
};

const WAIT: Duration = Duration::from_secs(90);

/// The probe component with a custom section appended: the same behaviour,
/// another content hash (so another version), padded by `padding` bytes.
fn variant(base: &[u8], tag: &str, padding: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"weir-test-variant";
    let mut payload = Vec::new();
    leb(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    payload.resize(payload.len() + padding, 0);
    let mut out = base.to_vec();
    out.push(0); // custom section
    leb(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

/// The version weir gives `bytes`: the first 6 bytes of SHA-256, as the
/// log shows it. Read from the log instead of recomputed, via `serving`.
fn serving_versions(weir: &WeirProcess) -> Vec<String> {
    weir.records()
        .iter()
        .filter(|r| r["message"] == "new version serving" || r["message"] == "serving")
        .filter_map(|r| r["version"].as_str().map(str::to_string))
        .collect()
}

fn replace_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("wasm.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn batch(kafka: &KafkaTool, from: usize, count: usize) -> Result<Vec<(i32, i64)>> {
    let records: Vec<Record> = (from..from + count)
        .map(|i| Record {
            partition: Some((i % 2) as i32),
            key: Some(format!("k{i}").into_bytes()),
            value: format!("event {i}").into_bytes(),
            headers: vec![("probe.sleep-ms".to_string(), b"5".to_vec())],
        })
        .collect();
    kafka.produce("events", &records)
}

/// Waits until the log shows `count` versions served; returns how long it
/// took from `since`.
fn wait_versions(weir: &WeirProcess, count: usize, since: Instant) -> Result<Duration> {
    poll_until(
        WAIT,
        &format!("{count} versions to have served"),
        || Ok((serving_versions(weir).len() >= count).then(|| since.elapsed())),
        || format!("{:?}; log: {}", serving_versions(weir), weir.log.display()),
    )
}

#[test]
fn replacing_a_handler_under_load_loses_and_repeats_nothing() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = Broker::start()?;
    let kafka = KafkaTool::new(&broker)?;
    kafka.create_topic("events", 2)?;
    let deployment = Deployment::new(&broker)?;
    // One message at a time per partition, so versions must follow offsets.
    deployment.add_handler(
        "probe",
        "probe",
        "topics = [\"events\"]\nordering = \"partition\"\n",
    )?;
    let wasm = deployment.handlers().join("probe.wasm");
    let base = std::fs::read(workspace().join("target/test-handlers/probe.wasm"))
        .context("probe component")?;

    let mut produced = batch(&kafka, 0, 40)?;
    let mut weir = deployment.start("reload")?;
    wait_versions(&weir, 1, Instant::now())?;
    let ok_count = |weir: &WeirProcess| {
        weir.guest_records("probe", "probe")
            .iter()
            .filter(|r| r["outcome"] == "ok")
            .count()
    };
    poll_until(
        WAIT,
        "handling to start",
        || Ok((ok_count(&weir) > 5).then_some(())),
        || weir.log.display().to_string(),
    )?;

    // 1. A new version, written atomically, while events stream in.
    let written = Instant::now();
    replace_atomically(&wasm, &variant(&base, "v1", 0))?;
    produced.extend(batch(&kafka, 40, 40)?);
    let small = wait_versions(&weir, 2, written)?;

    // 2. A broken file: reported, never served.
    replace_atomically(&wasm, b"\0asm\x0d\0\x01\0 this is not a component")?;
    produced.extend(batch(&kafka, 80, 40)?);
    poll_until(
        WAIT,
        "the broken file to be rejected",
        || {
            Ok(weir
                .records()
                .iter()
                .any(|r| r["message"] == "new version rejected")
                .then_some(()))
        },
        || weir.log.display().to_string(),
    )?;

    // 3. A ~2 MB version written slowly, in two halves: the half-written
    //    file is never served.
    let large = variant(&base, "v2", 2 << 20);
    let (first, rest) = large.split_at(large.len() / 2);
    std::fs::write(&wasm, first)?;
    std::thread::sleep(Duration::from_millis(600));
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&wasm)?;
        file.write_all(rest)?;
    }
    let written = Instant::now();
    produced.extend(batch(&kafka, 120, 40)?);
    let big = wait_versions(&weir, 3, written)?;

    poll_until(
        WAIT,
        "every event to be handled",
        || Ok((ok_count(&weir) >= produced.len()).then_some(())),
        || {
            format!(
                "{} of {}; log: {}",
                ok_count(&weir),
                produced.len(),
                weir.log.display()
            )
        },
    )?;

    // 4. Removing the handler drains it, commits and leaves the group.
    std::fs::remove_file(&wasm)?;
    std::fs::remove_file(wasm.with_extension("toml"))?;
    poll_until(
        WAIT,
        "the removed handler to leave its group",
        || {
            Ok(weir
                .records()
                .iter()
                .any(|r| r["message"] == "handler removed; left its group")
                .then_some(()))
        },
        || weir.log.display().to_string(),
    )?;
    let mut ends: BTreeMap<i32, Option<i64>> = BTreeMap::new();
    for &(p, o) in &produced {
        let end = ends.entry(p).or_insert(Some(0));
        *end = Some(end.unwrap_or(0).max(o + 1));
    }
    ensure!(
        kafka.committed("weir.probe", "events")? == ends,
        "after removal the committed offsets are {:?}, expected {ends:?}",
        kafka.committed("weir.probe", "events")?
    );
    stop(&mut weir)?;

    let versions = serving_versions(&weir);
    ensure!(versions.len() == 3, "versions served: {versions:?}");
    let rank: BTreeMap<&str, usize> = versions
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_str(), i))
        .collect();
    // Exactly once, and per partition the version never goes back.
    let mut seen: BTreeMap<(i64, i64), usize> = BTreeMap::new();
    let mut by_partition: BTreeMap<i64, Vec<(i64, usize)>> = BTreeMap::new();
    for record in weir
        .records()
        .iter()
        .filter(|r| r["target"] == "weir::guest" && r["message"] == "probe")
    {
        let fields: serde_json::Value =
            serde_json::from_str(record["fields"].as_str().unwrap_or("{}"))?;
        if fields["outcome"] != "ok" {
            continue;
        }
        let (p, o) = (field(&fields, "partition"), field(&fields, "offset"));
        let (Some(p), Some(o)) = (p, o) else { continue };
        *seen.entry((p, o)).or_insert(0) += 1;
        let version = record["version"].as_str().unwrap_or_default();
        let r = *rank
            .get(version)
            .with_context(|| format!("event handled by unknown version {version:?}"))?;
        by_partition.entry(p).or_default().push((o, r));
    }
    ensure!(
        seen.len() == produced.len(),
        "{} distinct events handled of {}",
        seen.len(),
        produced.len()
    );
    ensure!(
        seen.values().all(|n| *n == 1),
        "some events were handled twice"
    );
    for (p, mut handled) in by_partition {
        handled.sort();
        ensure!(
            handled.windows(2).all(|w| w[0].1 <= w[1].1),
            "partition {p}: versions went back: {handled:?}"
        );
        ensure!(
            handled.last().map(|h| h.1) == Some(2),
            "partition {p} never reached the last version"
        );
    }
    // The consumer kept its membership: it was assigned partitions once.
    let assigned = weir
        .records()
        .iter()
        .filter(|r| r["message"] == "partitions assigned")
        .count();
    ensure!(assigned == 1, "the consumer rejoined {assigned} times");
    eprintln!(
        "write → new version serving: {} ms for a {} KiB component, {} ms for a {} KiB one (debounce {} ms included; {} rejected loads)",
        small.as_millis(),
        base.len() / 1024,
        big.as_millis(),
        large.len() / 1024,
        250,
        weir.records()
            .iter()
            .filter(|r| r["message"] == "new version rejected")
            .count()
    );
    Ok(())
}
