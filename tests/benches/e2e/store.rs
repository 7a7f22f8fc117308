//! The shared PostgreSQL store, end to end, on Kafka (tansu): the `counter`
//! test handler (`tests/handlers/counter`: reads and writes a per-key count
//! in state, emits one event per input) run by
//!
//! 1. one `weir run` with the default store (redb, on disk);
//! 2. one, two and three `weir run` processes with `[store] url` in
//!    PostgreSQL (a private server per row, [`PgServer`]), in one consumer
//!    group, each with its own data directory.
//!
//! Each row has its own input topic (6 partitions, ~100 B messages over 64
//! keys, one record per batch as tansu needs; produced before weir starts),
//! output topic and group. A row is timed from starting its processes
//! until the group has committed the end of every partition and the output
//! topic holds one event per input (counted by a consumer reading it from
//! its start, so the outbox relay's publishing is included). Reported per row: msg/s, the ratio to the redb row, weir's
//! CPU time per message (every process's user + system time, start-up
//! included), PostgreSQL's (every server process's, ended ones included,
//! from `/proc`), and the mean outcomes per durable group commit with the
//! number of commits (`weir_store_commit_writes` of each process's
//! `/metrics`, scraped before it stops). At the end of each row the
//! per-key counts in state (`weir state list`) must match the input.
//!
//! Run: `E2E_BROKERS=store cargo bench -p weir-tests --bench e2e` (not in
//! the default list). Environment: `E2E_STORE_MESSAGES` (default
//! `E2E_MESSAGES`, at most 20000).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use weir_tests::counting::state_counts;
use weir_tests::{Broker, Deployment, PgServer, WeirProcess, admin};

use super::{
    FETCH_WAIT_MS, PAYLOAD_BYTES, Settings, create_topics, deploy, kafka_committed, kafka_config,
    machine, offsets_reader, stop, until,
};

/// Keys the input spreads over.
const KEYS: usize = 64;
/// Partitions of each row's input topic.
const PARTITIONS: i32 = 6;
/// Messages when neither `E2E_STORE_MESSAGES` nor a smaller
/// `E2E_MESSAGES` is set.
const DEFAULT_MESSAGES: usize = 20_000;
/// The counter's `max_in_flight` (the default).
const MAX_IN_FLIGHT: usize = 256;

/// One line of the report.
pub(super) struct StoreRow {
    store: &'static str,
    processes: usize,
    messages: usize,
    rate: f64,
    cpu_us: f64,
    /// PostgreSQL's CPU time per message (`None`: redb).
    pg_cpu_us: Option<f64>,
    /// Sum and count of `weir_store_commit_writes`, over every process.
    commit_writes: f64,
    commits: f64,
}

/// `E2E_STORE_MESSAGES`, else `E2E_MESSAGES` up to [`DEFAULT_MESSAGES`].
fn messages(settings: &Settings) -> Result<usize> {
    match std::env::var("E2E_STORE_MESSAGES") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("E2E_STORE_MESSAGES={v:?} is not a number")),
        Err(_) => Ok(settings.messages.min(DEFAULT_MESSAGES)),
    }
}

fn key(i: usize) -> String {
    format!("k{}", i % KEYS)
}

/// The per-key counts the counter must end with after `count` messages.
fn expected_counts(count: usize) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for i in 0..count {
        *counts.entry(key(i)).or_insert(0) += 1;
    }
    counts
}

/// Reads partition 0 of `topic` from its start on a thread, counting the
/// records in `read`, until `stop` hangs up; then the thread returns the
/// number of distinct `source_id`s read. (Read, not the high watermark:
/// tansu's `ListOffsets` falls behind after multi-record batches.)
fn output_reader(
    bootstrap: &str,
    topic: &str,
    read: Arc<AtomicUsize>,
) -> Result<(JoinHandle<usize>, std_mpsc::Sender<()>)> {
    let consumer: BaseConsumer = kafka_config(bootstrap)
        .set("group.id", format!("read-{topic}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", FETCH_WAIT_MS)
        .create()?;
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&partitions)?;
    let (stop, stopped) = std_mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut sources = BTreeSet::new();
        while matches!(stopped.try_recv(), Err(std_mpsc::TryRecvError::Empty)) {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
                read.fetch_add(1, Ordering::Relaxed);
                let source = message
                    .payload()
                    .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
                    .and_then(|v| Some(v.get("source_id")?.as_str()?.to_string()));
                if let Some(source) = source {
                    sources.insert(source);
                }
            }
        }
        sources.len()
    });
    Ok((reader, stop))
}

/// User + system time, and that of its waited-for ended children, of
/// process `pid` in clock ticks (`None` when it is gone); its parent's pid.
fn proc_ticks(pid: u32) -> Option<(u32, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, may hold spaces): state,
    // ppid, …; utime, stime, cutime and cstime are the 12th to 15th.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |i: usize| fields.get(i)?.parse::<u64>().ok();
    let ppid = fields.get(1)?.parse().ok()?;
    Some((ppid, number(11)? + number(12)?, number(13)? + number(14)?))
}

/// CPU time PostgreSQL's server has used so far: the postmaster's and that
/// of each of its running children, plus that of its ended children (which
/// the postmaster has waited for: its cutime + cstime).
fn postgres_cpu(server: &PgServer) -> Result<Duration> {
    // PgServer keeps its data directory `pg` beside its log.
    let data = server
        .log
        .parent()
        .ok_or_else(|| anyhow!("no directory above {}", server.log.display()))?
        .join("pg");
    let pid_file = data.join("postmaster.pid");
    let text = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("cannot read {}", pid_file.display()))?;
    let postmaster: u32 = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| anyhow!("no pid in {}", pid_file.display()))?;
    let (_, own, ended) = proc_ticks(postmaster)
        .ok_or_else(|| anyhow!("the postmaster (pid {postmaster}) is not running"))?;
    let mut ticks = own + ended;
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // A process gone meanwhile is skipped.
        if let Some((ppid, used, _)) = proc_ticks(pid)
            && ppid == postmaster
        {
            ticks += used;
        }
    }
    // USER_HZ is 100 on every Linux platform.
    Ok(Duration::from_millis(ticks * 10))
}

/// The admin port `weir` logged when it started listening.
fn admin_port(weir: &WeirProcess) -> Result<u16> {
    weir.lines()
        .iter()
        .filter(|line| line.contains("admin server listening"))
        .find_map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).ok()?;
            let address: std::net::SocketAddr = record["address"].as_str()?.parse().ok()?;
            Some(address.port())
        })
        .ok_or_else(|| anyhow!("no admin address logged; see {}", weir.log.display()))
}

/// Copies the compiled-component cache of `data` (warmed by [`deploy`]) to
/// `member`'s data directory, so that every process starts from it.
fn copy_compiled(deployment: &Deployment, member: &str) -> Result<()> {
    let from = deployment.dir.path().join("data/compiled");
    let to = deployment
        .dir
        .path()
        .join(format!("data-{member}/compiled"));
    std::fs::create_dir_all(&to)?;
    for entry in std::fs::read_dir(&from)
        .with_context(|| format!("cannot read the cache {}", from.display()))?
    {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// One row: its own topics and group on `bootstrap`, `processes` processes
/// of the counter, with the store in `pg` (else redb).
async fn run(
    bootstrap: &str,
    n: usize,
    label: &str,
    processes: usize,
    pg: Option<&PgServer>,
) -> Result<StoreRow> {
    let topic = format!("store-{label}");
    let output = format!("{topic}.out");
    let group = format!("bench-{topic}");
    create_topics(bootstrap, &[(&topic, PARTITIONS), (&output, 1)]).await?;
    let ends = super::kafka_produce_keyed(bootstrap, &topic, n, key).await?;
    let held: i64 = ends.values().sum();
    ensure!(
        held == n as i64,
        "the broker holds {held} messages, {n} were produced"
    );

    let manifest = format!(
        "topics = [\"{topic}\"]\ngroup = \"{group}\"\nmax_in_flight = {MAX_IN_FLIGHT}\n\n[config]\noutput_topic = \"{output}\"\nwork_ms = \"0\"\n"
    );
    let source = format!("[source.kafka]\nbootstrap_servers = \"{bootstrap}\"\n");
    let deployment = deploy(&source, "counter", "counter", &manifest)?;
    if let Some(pg) = pg {
        deployment.store_in(pg, None)?;
    }
    let members: Vec<String> = (1..processes).map(|i| format!("{label}-{i}")).collect();
    for member in &members {
        copy_compiled(&deployment, member)?;
    }
    let reader = offsets_reader(bootstrap, &group)?;
    let emitted = Arc::new(AtomicUsize::new(0));
    let (out_reader, stop_reading) = output_reader(bootstrap, &output, emitted.clone())?;
    let pg_before = pg.map(postgres_cpu).transpose()?;

    let started = Instant::now();
    let mut weirs = vec![deployment.start(label)?];
    for member in &members {
        weirs.push(deployment.start_another(member)?);
    }
    let logs = || {
        weirs
            .iter()
            .map(|w| w.log.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    until(
        &format!("weir ({label}) to commit and emit everything"),
        async || {
            anyhow::Ok(
                emitted.load(Ordering::Relaxed) >= n && kafka_committed(&reader, &topic, &ends)?,
            )
        },
    )
    .await
    .with_context(|| format!("see {}", logs()))?;
    let elapsed = started.elapsed();
    let pg_cpu = match (pg, pg_before) {
        (Some(pg), Some(before)) => Some(postgres_cpu(pg)?.saturating_sub(before)),
        _ => None,
    };
    let mut cpu = Duration::ZERO;
    let (mut commit_writes, mut commits) = (0.0, 0.0);
    for weir in &weirs {
        cpu += weir.cpu_time()?;
        let metrics = admin::scrape(admin_port(weir)?);
        let metric = |name: &str| {
            metrics
                .get(name)
                .copied()
                .ok_or_else(|| anyhow!("no {name} in the /metrics of {}", weir.log.display()))
        };
        commit_writes += metric("weir_store_commit_writes_sum")?;
        commits += metric("weir_store_commit_writes_count")?;
    }
    for weir in &mut weirs {
        stop(weir)?;
    }

    drop(stop_reading);
    let distinct = out_reader
        .join()
        .map_err(|_| anyhow!("the output reader panicked"))?;
    let emitted = emitted.load(Ordering::Relaxed);
    if emitted != n || distinct != n {
        eprintln!(
            "store {label}: the output topic holds {emitted} events ({distinct} distinct sources) for {n} inputs"
        );
    }
    let counts = state_counts(&deployment)?;
    let total: u64 = counts.values().sum();
    ensure!(
        counts == expected_counts(n),
        "store {label}: the per-key counts in state (sum {total}) differ from the input ({n} messages over {KEYS} keys)"
    );

    let per_message = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let row = StoreRow {
        store: if pg.is_some() { "PostgreSQL" } else { "redb" },
        processes,
        messages: n,
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu_us: per_message(cpu),
        pg_cpu_us: pg_cpu.map(per_message),
        commit_writes,
        commits,
    };
    eprintln!(
        "store {label}: {:.0} msg/s, {:.1} µs weir CPU/msg, {} µs PostgreSQL CPU/msg, {:.1} outcomes per commit over {commits} commits; state sums to {total}",
        row.rate,
        row.cpu_us,
        row.pg_cpu_us.map_or("–".into(), |c| format!("{c:.1}")),
        row.commit_writes / row.commits,
    );
    Ok(row)
}

/// The four rows, on one tansu: redb with one process, then PostgreSQL
/// (a fresh server each) with one, two and three.
pub(super) async fn bench(settings: &Settings, rows: &mut Vec<StoreRow>) -> Result<()> {
    let counter = weir_tests::workspace().join("target/test-handlers/counter.wasm");
    if !Path::new(&counter).is_file() {
        bail!(
            "{} is missing: build the handlers first with `bash .ci/build-handlers`",
            counter.display()
        );
    }
    let n = messages(settings)?;
    ensure!(n > 0, "E2E_STORE_MESSAGES: nothing to measure");
    let broker = Broker::start()?;
    let bootstrap = broker.bootstrap.clone();
    rows.push(run(&bootstrap, n, "redb", 1, None).await?);
    for processes in 1..=3 {
        let pg = PgServer::start()?;
        rows.push(
            run(
                &bootstrap,
                n,
                &format!("pg{processes}"),
                processes,
                Some(&pg),
            )
            .await?,
        );
    }
    Ok(())
}

/// Prints the table of `rows` (nothing when there are none).
pub(super) fn report(rows: &[StoreRow]) {
    let Some(first) = rows.first() else {
        return;
    };
    let redb_rate = rows
        .iter()
        .find(|r| r.store == "redb")
        .map_or(first.rate, |r| r.rate);
    println!(
        "\nshared store: {} messages of ~{PAYLOAD_BYTES} B, {KEYS} keys, Kafka (tansu) topic of {PARTITIONS} partitions; the counter handler (state read-modify-write, one emitted event); timed until the group has committed everything and the output topic holds one event per input; {}",
        first.messages,
        machine()
    );
    println!(
        "| store | weir processes | msg/s | × redb | weir CPU µs/msg | PostgreSQL CPU µs/msg | outcomes per commit | commits |\n|---|---|---|---|---|---|---|---|"
    );
    for row in rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.1} | {} | {:.1} | {:.0} |",
            row.store,
            row.processes,
            row.rate,
            row.rate / redb_rate,
            row.cpu_us,
            row.pg_cpu_us.map_or("–".into(), |c| format!("{c:.1}")),
            row.commit_writes / row.commits,
            row.commits
        );
    }
}
