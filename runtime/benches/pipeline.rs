//! Pipeline throughput without a broker or Wasm: a synthetic source and a
//! native handler, with the real store on disk. Shows what deduplication (a
//! redb read before, and a group-committed durable write after, every
//! message) costs per message, how many outcomes share one commit, and what
//! transactional effects add: a per-key counter in state (read, write,
//! validated at commit) and one emitted event (an outbox row) per message;
//! and dedup with `ordering = "partition"` on one partition (one lane: its
//! outcomes are committed a run at a time).
//!
//! Reported per run: messages/s, wall time and process CPU time (all
//! threads) per message, and how many outcomes shared one commit.
//!
//! Run: `cargo bench -p weir --bench pipeline` (optionally `-- 100000` for
//! the message count; default 50000).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weir::host::Outcome;
use weir::host::transaction::Transaction;
use weir::pipeline::synthetic::{MemoryPublisher, NativeHandler, SyntheticSource, message};
use weir::pipeline::{HandlerStats, Worker};
use weir::registry::Manifest;
use weir::store::Store;

struct Run {
    elapsed: Duration,
    /// Process CPU time (user + system, all threads) over the run.
    cpu: Duration,
    commits: u64,
    writes: u64,
}

/// The result of `future`, which must not wait: reads of the embedded
/// store never do, and the synthetic handler here is synchronous.
fn at_once<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("an embedded-store read waited"),
    }
}

async fn run(count: u64, manifest_text: &str, effects: bool) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("weir.redb")).expect("store");
    let state = store.clone();
    let handler = move |event: &weir::host::Event| {
        if !effects {
            return Outcome::Handled(Default::default());
        }
        let mut txn = Transaction::new(Some(state.clone()), "bench".into());
        let key = format!(
            "count/{}",
            String::from_utf8_lossy(event.key.as_deref().unwrap_or_default())
        );
        let n = at_once(txn.get(&key))
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        let value = (n + 1).to_string().into_bytes();
        if txn.set(&key, value.clone()).is_err()
            || txn
                .emit("out".into(), event.key.clone(), value, vec![])
                .is_err()
        {
            return Outcome::Handled(Default::default());
        }
        Outcome::Handled(txn.finish())
    };
    let manifest: Manifest = toml::from_str(manifest_text).expect("manifest");
    let source = SyntheticSource::new();
    // Metrics recorded as `weir run` records them.
    let stats = Arc::new(HandlerStats::recording(
        weir::metrics::Metrics::new().handler("bench", "weir.bench"),
    ));
    let (stop, shutdown) = watch::channel(false);
    let worker = Worker::new(
        "bench".into(),
        manifest,
        NativeHandler::inline(handler),
        weir::runtime::default_concurrency(),
        source.clone(),
        store.clone(),
        MemoryPublisher::default(),
        stats.clone(),
        shutdown,
    );
    let task = tokio::spawn(worker.run());
    let messages: Vec<_> = (0..count as i64)
        .map(|o| {
            message(
                "t",
                (o % 3) as i32,
                o / 3,
                &format!("key-{}", o % 100),
                Some(&format!("id-{o}")),
            )
        })
        .collect();
    let started = Instant::now();
    let cpu_before = process_cpu();
    source.push(messages);
    while stats.finished() < count {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    let _ = stop.send(true);
    task.await.expect("worker").expect("worker ended well");
    let commit_stats = store.commit_stats();
    Run {
        elapsed,
        cpu,
        commits: commit_stats.commits.load(Ordering::Relaxed),
        writes: commit_stats.writes.load(Ordering::Relaxed),
    }
}

/// CPU time this process has used, user and system, over all threads
/// (`/proc/self/stat`, in ticks of 10 ms; zero where it cannot be read).
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    Duration::from_millis(fields.iter().sum::<u64>() * 10)
}

fn main() {
    let count: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let base = "topics = [\"t\"]\nmax_in_flight = 256\n";
    let without = runtime.block_on(run(
        count,
        &format!("{base}[dedup]\nenabled = false\n"),
        false,
    ));
    let with = runtime.block_on(run(count, base, false));
    let effects = runtime.block_on(run(count, base, true));
    let one_lane = runtime.block_on(run(
        count,
        &format!("{base}ordering = \"partition\"\n"),
        false,
    ));

    let per_msg = |r: &Run| r.elapsed.as_secs_f64() * 1e6 / count as f64;
    let rate = |r: &Run| count as f64 / r.elapsed.as_secs_f64();
    println!(
        "pipeline: {count} messages, 3 partitions, 100 keys, ordering = key, max_in_flight = 256, native handler"
    );
    println!(
        "{:<22} {:>12} {:>10} {:>12} {:>9} {:>14}",
        "", "messages/s", "µs/msg", "CPU µs/msg", "commits", "msgs/commit"
    );
    for (name, r) in [
        ("dedup off", &without),
        ("dedup on (durable)", &with),
        ("+ state and emit", &effects),
        ("dedup on, one lane", &one_lane),
    ] {
        let batch = if r.commits == 0 {
            0.0
        } else {
            r.writes as f64 / r.commits as f64
        };
        println!(
            "{name:<22} {:>12.0} {:>10.2} {:>12.2} {:>9} {:>14.1}",
            rate(r),
            per_msg(r),
            r.cpu.as_secs_f64() * 1e6 / count as f64,
            r.commits,
            batch
        );
    }
    println!(
        "dedup costs {:.2} µs per message ({:.2}x the time of the run without it)",
        per_msg(&with) - per_msg(&without),
        per_msg(&with) / per_msg(&without)
    );
    println!(
        "a state read-modify-write and an emitted event cost {:.2} µs more per message ({:.2}x dedup alone)",
        per_msg(&effects) - per_msg(&with),
        per_msg(&effects) / per_msg(&with)
    );
}
