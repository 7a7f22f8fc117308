//! The pipeline alone: synthetic source, native handler, real store.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::synthetic::{MemoryPublisher, NativeHandler, SyntheticSource, message};
use super::{HandlerStats, Worker};
use crate::host::transaction::Transaction;
use crate::host::{Event, Failure, FailureKind, Outcome};
use crate::registry::Manifest;
use crate::source::Settled;
use crate::store::{Effects, Store};

struct Harness {
    source: SyntheticSource,
    store: Store,
    dead: MemoryPublisher,
    stats: Arc<HandlerStats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), String>>,
    _dir: tempfile::TempDir,
}

fn manifest(extra: &str) -> Manifest {
    let text = format!("topics = [\"t\"]\n{extra}");
    crate::parse::parse_toml(std::path::Path::new("test.toml"), &text).expect("valid manifest")
}

fn start<F>(manifest: Manifest, handler: F) -> Harness
where
    F: Fn(&Event) -> Outcome + Send + Sync + 'static,
{
    start_with_state(manifest, move |event, _| handler(event))
}

/// Like [`start`], for handlers that use state: they get a fresh
/// transaction per call and return its effects.
fn start_with_state<F>(manifest: Manifest, handler: F) -> Harness
where
    F: Fn(&Event, &mut Transaction) -> Outcome + Send + Sync + 'static,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("weir.redb")).expect("store");
    let state = store.clone();
    let handler = move |event: &Event| {
        let mut txn = Transaction::new(Some(state.clone()), "h".into());
        match handler(event, &mut txn) {
            Outcome::Handled(_) => Outcome::Handled(txn.finish()),
            failed => failed,
        }
    };
    let source = SyntheticSource::new();
    let dead = MemoryPublisher::default();
    let stats = Arc::new(HandlerStats::default());
    let (stop, shutdown) = watch::channel(false);
    let worker = Worker::new(
        "h".into(),
        manifest,
        NativeHandler::new(handler),
        4,
        source.clone(),
        store.clone(),
        dead.clone(),
        stats.clone(),
        shutdown,
    );
    let task = tokio::spawn(worker.run());
    Harness {
        source,
        store,
        dead,
        stats,
        stop,
        task,
        _dir: dir,
    }
}

impl Harness {
    async fn wait_finished(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.stats.finished() < count {
            assert!(
                Instant::now() < deadline,
                "only {} of {count} finished",
                self.stats.finished()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) -> SyntheticSource {
        let _ = self.stop.send(true);
        self.task.await.expect("worker").expect("worker ended well");
        assert!(self.source.closed());
        self.source
    }
}

fn ok() -> Outcome {
    Outcome::Handled(Effects::default())
}

fn retryable(message: &str) -> Outcome {
    Outcome::Failed(Failure {
        kind: FailureKind::Retryable,
        message: message.into(),
        poisoned: false,
        category: None,
    })
}

/// A synthetic event's partition and offset.
fn at(event: &Event) -> (i32, i64) {
    match event.position {
        crate::message::Position::Kafka { partition, offset } => (partition, offset),
        _ => (-1, -1),
    }
}

fn key_of(event: &Event) -> String {
    String::from_utf8_lossy(event.key.as_deref().unwrap_or_default()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_run_in_parallel_in_order_and_the_watermark_reaches_the_end() {
    let seen: Arc<Mutex<Vec<(i32, String, i64)>>> = Arc::default();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (s, r, p) = (seen.clone(), running.clone(), peak.clone());
    let h = start(manifest("max_in_flight = 32"), move |event| {
        let now = r.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        p.fetch_max(now, AtomicOrdering::SeqCst);
        std::thread::sleep(Duration::from_micros(200 + (at(event).1 as u64 % 7) * 100));
        s.lock()
            .expect("lock")
            .push((at(event).0, key_of(event), at(event).1));
        r.fetch_sub(1, AtomicOrdering::SeqCst);
        ok()
    });
    h.source
        .push((0..3).flat_map(|p| {
            (0..200).map(move |o| message("t", p, o, &format!("k{}", o % 10), None))
        }));
    h.wait_finished(600).await;
    let source = h.stop().await;

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 600);
    let mut lanes: HashMap<(i32, String), Vec<i64>> = HashMap::new();
    for (p, k, o) in seen {
        lanes.entry((p, k)).or_default().push(o);
    }
    for (lane, offsets) in lanes {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{lane:?} out of order: {offsets:?}"
        );
    }
    assert!(
        peak.load(AtomicOrdering::SeqCst) > 1,
        "different keys never ran in parallel"
    );
    let expected: BTreeMap<(String, i32), i64> =
        (0..3).map(|p| (("t".to_string(), p), 200)).collect();
    assert_eq!(source.acked(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_waiting_for_a_retry_holds_only_its_own_messages() {
    // (key, offset, attempt, succeeded) in call order.
    type Call = (String, i64, u32, bool);
    let order: Arc<Mutex<Vec<Call>>> = Arc::default();
    let o = order.clone();
    let policy = "[retry]\nmax_attempts = 5\ninitial_delay = \"100ms\"\nmultiplier = 1.0\nmax_delay = \"100ms\"\njitter = 0.0";
    let h = start(manifest(policy), move |event| {
        let fail = key_of(event) == "slow" && at(event).1 == 0 && event.attempt <= 2;
        o.lock()
            .expect("lock")
            .push((key_of(event), at(event).1, event.attempt, !fail));
        if fail { retryable("not yet") } else { ok() }
    });
    let mut batch = vec![
        message("t", 0, 0, "slow", None),
        message("t", 0, 1, "slow", None),
    ];
    batch.extend((2..30).map(|o| message("t", 0, o, &format!("fast{}", o % 3), None)));
    h.source.push(batch);
    h.wait_finished(30).await;
    // While "slow" waits, the watermark cannot pass offset 0.
    let source = h.stop().await;
    assert_eq!(source.acked()[&("t".to_string(), 0)], 30);

    let order = order.lock().expect("lock").clone();
    let slow_success = order
        .iter()
        .position(|(k, o, _, ok)| k == "slow" && *o == 0 && *ok)
        .expect("slow succeeded");
    let last_fast = order
        .iter()
        .rposition(|(k, ..)| k.starts_with("fast"))
        .expect("fast ran");
    assert!(
        last_fast < slow_success,
        "fast keys waited for the slow one: {order:?}"
    );
    let slow_later = order
        .iter()
        .position(|(k, o, ..)| k == "slow" && *o == 1)
        .expect("slow 1 ran");
    assert!(
        slow_later > slow_success,
        "the slow key's next message overtook it"
    );
    let attempts: Vec<u32> = order
        .iter()
        .filter(|(k, o, ..)| k == "slow" && *o == 0)
        .map(|(_, _, a, _)| *a)
        .collect();
    assert_eq!(attempts, vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_skipped_and_still_acknowledged() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let h = start(manifest(""), move |_| {
        c.fetch_add(1, AtomicOrdering::SeqCst);
        ok()
    });
    h.source.push([
        message("t", 0, 0, "a", Some("e1")),
        message("t", 0, 1, "a", Some("e2")),
        message("t", 0, 2, "a", Some("e1")),
        message("t", 0, 3, "a", None),
    ]);
    h.wait_finished(4).await;
    assert_eq!(calls.load(AtomicOrdering::SeqCst), 3);
    assert_eq!(h.stats.duplicates.load(AtomicOrdering::SeqCst), 1);
    let source = h.stop().await;
    assert_eq!(source.acked()[&("t".to_string(), 0)], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_stops_receiving_instead_of_buffering() {
    let h = start(manifest("max_in_flight = 4\nordering = \"none\""), |_| {
        std::thread::sleep(Duration::from_millis(2));
        ok()
    });
    h.source
        .push((0..100).map(|o| message("t", 0, o, "k", None)));
    h.wait_finished(100).await;
    let most = h.source.most_outstanding();
    let source = h.stop().await;
    assert!(
        (1..=4).contains(&most),
        "held {most} messages at once, max_in_flight is 4"
    );
    assert_eq!(source.acked()[&("t".to_string(), 0)], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_and_permanent_failures_are_dead_lettered_then_acknowledged() {
    let policy =
        "[retry]\nmax_attempts = 3\ninitial_delay = \"10ms\"\njitter = 0.0\nmax_delay = \"10ms\"";
    let h = start(manifest(policy), |event| match key_of(event).as_str() {
        "poison" => retryable("always"),
        "bad" => Outcome::Failed(Failure {
            kind: FailureKind::Permanent,
            message: "malformed".into(),
            poisoned: false,
            category: None,
        }),
        _ => ok(),
    });
    h.source.push([
        message("t", 0, 0, "poison", None),
        message("t", 0, 1, "bad", None),
        message("t", 0, 2, "good", None),
    ]);
    h.wait_finished(3).await;
    let dead = h.dead.records();
    let source = h.stop().await;
    assert_eq!(source.acked()[&("t".to_string(), 0)], 3);
    assert_eq!(dead.len(), 2);
    let header = |headers: &[(String, Vec<u8>)], name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    for record in &dead {
        let headers = &record.headers;
        assert_eq!(record.topic, "t.dlq");
        match header(headers, "weir.origin.offset").as_deref() {
            Some("0") => assert_eq!(header(headers, "weir.attempts").as_deref(), Some("3")),
            Some("1") => assert_eq!(header(headers, "weir.attempts").as_deref(), Some("1")),
            other => panic!("unexpected dead letter for offset {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_handled_or_acknowledged_for_a_revoked_partition() {
    let calls: Arc<Mutex<Vec<(i32, i64)>>> = Arc::default();
    let c = calls.clone();
    let h = start(manifest(""), move |event| {
        if at(event).0 == 0 && at(event).1 == 1 {
            // Still running when the partition is revoked.
            std::thread::sleep(Duration::from_millis(300));
        }
        c.lock().expect("lock").push((at(event).0, at(event).1));
        ok()
    });
    // Partition 0: offset 0 finishes, 1 is slow, 2 and 3 queue behind it
    // (same key). Partition 1 keeps flowing.
    h.source
        .push((0..4).map(|o| message("t", 0, o, "same", None)));
    h.source.push([message("t", 1, 0, "x", None)]);
    // Offset 0's outcome is durable and acknowledged (not merely handled).
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.source.acked().get(&("t".to_string(), 0)) != Some(&1) {
        assert!(Instant::now() < deadline, "offset 0 never acknowledged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Revoked while offset 1 runs: the final watermark is 1.
    assert_eq!(h.source.revoke("t", 0), Some(1));
    h.source.push([message("t", 1, 1, "x", None)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !calls.lock().expect("lock").contains(&(1, 1)) {
        assert!(Instant::now() < deadline, "partition 1 stopped flowing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The slow call finishes after the revocation; stopping drains it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !calls.lock().expect("lock").contains(&(0, 1)) {
        assert!(Instant::now() < deadline, "the slow call never finished");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let source = h.stop().await;
    let calls = calls.lock().expect("lock").clone();
    assert!(
        !calls.contains(&(0, 2)) && !calls.contains(&(0, 3)),
        "queued messages of a revoked partition ran: {calls:?}"
    );
    assert_eq!(
        source.acked().get(&("t".to_string(), 0)),
        Some(&1),
        "acknowledged past the revocation"
    );
    assert_eq!(source.acked().get(&("t".to_string(), 1)), Some(&2));
}

/// The result of `future`, which must not wait: reads of the embedded
/// store never do, and the synthetic handlers here are synchronous.
fn at_once<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("an embedded-store read waited"),
    }
}

fn counter(txn: &mut Transaction, key: &str) -> u64 {
    at_once(txn.get(key))
        .expect("get")
        .map(|v| String::from_utf8_lossy(&v).parse().expect("number"))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_of_a_failed_call_are_dropped_and_of_a_successful_one_kept() {
    let h = start_with_state(
        manifest("[retry]\ninitial_delay = \"1ms\"\njitter = 0.0"),
        |event, txn| {
            let n = counter(txn, "n") + 1;
            txn.set("n", n.to_string().into_bytes()).expect("set");
            txn.emit("out".into(), None, n.to_string().into_bytes(), vec![])
                .expect("emit");
            // Every event fails its first attempt after writing.
            if event.attempt == 1 {
                retryable("first attempt fails")
            } else {
                ok()
            }
        },
    );
    h.source.push((0..5).map(|o| message("t", 0, o, "k", None)));
    h.wait_finished(5).await;
    let store = h.store.clone();
    h.stop().await;
    let view = store.state_view().expect("view");
    let (_, n) = view.get("h", "n").await.expect("get").expect("present");
    assert_eq!(n, b"5", "only the successful attempts counted");
    let rows = store.outbox_batch(None, 100).await.expect("outbox");
    let payloads: Vec<Vec<u8>> = rows
        .into_iter()
        .map(|(_, r)| r.expect("decodes").payload)
        .collect();
    let expected: Vec<Vec<u8>> = (1..=5).map(|n: i32| n.to_string().into_bytes()).collect();
    assert_eq!(payloads, expected, "one emitted event per event, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_read_modify_writes_of_one_key_lose_no_update() {
    // Every message has its own lane, so all of them race on "total".
    let h = start_with_state(
        manifest("ordering = \"none\"\nmax_in_flight = 64"),
        |_, txn| {
            let n = counter(txn, "total") + 1;
            // Widen the window between read and commit.
            std::thread::sleep(Duration::from_micros(300));
            txn.set("total", n.to_string().into_bytes()).expect("set");
            ok()
        },
    );
    h.source
        .push((0..200).map(|o| message("t", (o % 2) as i32, o / 2, &format!("k{o}"), None)));
    h.wait_finished(200).await;
    let conflicts = h.stats.conflicts.load(AtomicOrdering::Relaxed);
    let store = h.store.clone();
    h.stop().await;
    let view = store.state_view().expect("view");
    let (_, total) = view.get("h", "total").await.expect("get").expect("present");
    assert_eq!(total, b"200");
    assert!(conflicts > 0, "the test never raced; it shows nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_event_applies_its_effects_once() {
    let h = start_with_state(manifest(""), |_, txn| {
        let n = counter(txn, "n") + 1;
        txn.set("n", n.to_string().into_bytes()).expect("set");
        ok()
    });
    // The same event id on two keys: they may run at once, and the commit
    // decides.
    h.source.push([
        message("t", 0, 0, "a", Some("same")),
        message("t", 0, 1, "b", Some("same")),
        message("t", 0, 2, "c", Some("other")),
    ]);
    h.wait_finished(3).await;
    let store = h.store.clone();
    h.stop().await;
    let (_, n) = store
        .state_view()
        .expect("view")
        .get("h", "n")
        .await
        .expect("get")
        .expect("present");
    assert_eq!(n, b"2");
}

type VersionLog = Arc<Mutex<Vec<(i64, u32)>>>;

/// A native handler that records which version handled each offset. Every
/// call returns the same type, so one can replace another.
fn versioned(
    version: u32,
    log: VersionLog,
) -> NativeHandler<impl Fn(&Event) -> Outcome + Send + Sync + 'static> {
    NativeHandler::new(move |event: &Event| {
        std::thread::sleep(Duration::from_millis(2));
        log.lock().expect("lock").push((at(event).1, version));
        ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_the_version_mid_stream_skips_and_repeats_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("weir.redb")).expect("store");
    let source = SyntheticSource::new();
    let stats = Arc::new(HandlerStats::default());
    let (stop, shutdown) = watch::channel(false);
    let log: VersionLog = Arc::default();
    let worker = Worker::new(
        "h".into(),
        manifest("ordering = \"partition\""),
        versioned(1, log.clone()),
        4,
        source.clone(),
        store,
        MemoryPublisher::default(),
        stats.clone(),
        shutdown,
    );
    let swap = worker.swapper();
    let task = tokio::spawn(worker.run());
    source.push((0..100).map(|o| message("t", 0, o, "k", None)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.finished() < 30 {
        assert!(Instant::now() < deadline, "stalled before the swap");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    swap.swap(versioned(2, log.clone()));
    while stats.finished() < 100 {
        assert!(Instant::now() < deadline, "stalled after the swap");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = stop.send(true);
    task.await.expect("worker").expect("worker ended well");
    let log = log.lock().expect("lock").clone();
    let offsets: Vec<i64> = log.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (0..100).collect::<Vec<_>>(),
        "each offset once, in order"
    );
    assert!(
        log.windows(2).all(|w| w[0].1 <= w[1].1),
        "the old version ran after the new one: {log:?}"
    );
    assert!(log.iter().any(|(_, v)| *v == 1) && log.iter().any(|(_, v)| *v == 2));
    assert_eq!(source.acked()[&("t".to_string(), 0)], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_holds_the_lane_until_the_outcome_is_durable() {
    let calls: Arc<Mutex<Vec<i64>>> = Arc::default();
    let c = calls.clone();
    let h = start(manifest(""), move |event| {
        c.lock().expect("lock").push(at(event).1);
        ok()
    });
    // The first three group commits fail: the first message's outcome
    // cannot be recorded for a while.
    h.store.fail_next_commits(3);
    h.source
        .push((0..5).map(|o| message("t", 0, o, "k", Some(&format!("e{o}")))));
    h.wait_finished(5).await;
    let source = h.stop().await;
    assert_eq!(
        *calls.lock().expect("lock"),
        vec![0, 1, 2, 3, 4],
        "each message called once, in order: the key waited for the store"
    );
    assert_eq!(source.acked()[&("t".to_string(), 0)], 5);
    assert!(source.settled("t", 0).values().all(|s| *s == Settled::Done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_writer_stops_the_worker_with_the_reason() {
    let h = start(manifest(""), |_| ok());
    h.source.push([message("t", 0, 0, "k", Some("e0"))]);
    h.wait_finished(1).await;
    h.store.stop_writer();
    h.source.push([message("t", 0, 1, "k", Some("e1"))]);
    let Harness { task, source, .. } = h;
    let ended = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the worker stops on its own")
        .expect("worker task");
    let err = ended.expect_err("a dead writer is an error");
    assert!(err.contains("writer has stopped"), "{err}");
    assert!(source.closed());
    assert_eq!(
        source.settled("t", 0).get(&1),
        Some(&Settled::Released),
        "the message without a durable outcome is released, not acknowledged"
    );
    assert_eq!(source.acked()[&("t".to_string(), 0)], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_message_task_frees_its_lane_and_is_tried_again() {
    let policy = "[retry]\nmax_attempts = 3\ninitial_delay = \"10ms\"\nmax_delay = \"10ms\"";
    let h = start(manifest(policy), |event| match key_of(event).as_str() {
        "bad" => Outcome::Failed(Failure {
            kind: FailureKind::Permanent,
            message: "malformed".into(),
            poisoned: false,
            category: None,
        }),
        _ => ok(),
    });
    // Publishing the first dead letter panics inside the message's task.
    h.dead
        .panic_once
        .store(true, std::sync::atomic::Ordering::SeqCst);
    h.source.push([
        message("t", 0, 0, "bad", Some("e0")),
        message("t", 0, 1, "bad", Some("e1")),
    ]);
    h.wait_finished(2).await;
    let dead = h.dead.records();
    let source = h.stop().await;
    assert_eq!(dead.len(), 2, "both dead-lettered, each once");
    assert_eq!(source.acked()[&("t".to_string(), 0)], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_concurrency_calls_of_a_handler_run_at_once() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, m) = (running.clone(), most.clone());
    // `start` gives the worker a concurrency of 4.
    let h = start(manifest("ordering = \"none\""), move |_| {
        let now = r.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        m.fetch_max(now, AtomicOrdering::SeqCst);
        std::thread::sleep(Duration::from_millis(3));
        r.fetch_sub(1, AtomicOrdering::SeqCst);
        ok()
    });
    h.source
        .push((0..60).map(|o| message("t", 0, o, "k", None)));
    h.wait_finished(60).await;
    h.stop().await;
    let most = most.load(AtomicOrdering::SeqCst);
    assert!((1..=4).contains(&most), "{most} calls ran at once");
}
