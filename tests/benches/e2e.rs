//! End to end: the raw client and `weir run`, side by side, in one run,
//! against the same broker processes and the same data.
//!
//! For each broker (tansu for Kafka, nats-server for NATS JetStream; the
//! other brokers in `e2e/`, throughput only) it
//! starts the broker, produces the same messages (~100 B, 200 keys; Kafka: 4
//! partitions, one record per batch, which tansu needs) and then measures:
//!
//! - **raw**: the client alone (rdkafka: consume every message, store its
//!   offset, auto-commit every second as Weir does; async-nats: a pull
//!   consumer acking each message), from creating the consumer until the
//!   broker shows every message committed (acknowledged);
//! - **weir**: `weir run` with the no-op Rust handler (`tests/handlers/noop`)
//!   and the default manifest (dedup on, key ordering), from starting the
//!   process until the broker shows every message committed; then the same
//!   with dedup off, with `ordering = "partition"` (Kafka: on a topic of one
//!   partition, with the raw client measured on it too), and with the no-op
//!   handler written in Python and in JavaScript;
//! - **latency** at a fixed 1,000 msg/s: raw, produce → consumed; weir,
//!   produce → the handler's echo of it consumed from its output topic
//!   (handled, committed with its dedup mark, published by the outbox
//!   relay, consumed), p50 and p99.
//!
//! Reported per run: msg/s, the ratio weir/raw, and weir's CPU time per
//! message (the process's user + system time over messages, start-up
//! included; its compiled-component cache is warmed first).
//!
//! Run: `bash .ci/build-handlers && cargo bench -p weir-tests --bench e2e`
//! Environment: `E2E_MESSAGES` (default 100000), `E2E_LATENCY_SECS`
//! (default 5), `E2E_BROKERS` (default `kafka,nats,redis`), `E2E_LANGUAGES`
//! (default `rust,python,js`; the languages run without dedup-off and
//! partition variants). RabbitMQ and SQS (against moto) are not in the
//! default list, which CI runs smoke-sized; they run on request:
//! `E2E_BROKERS=rabbitmq,sqs` (see `e2e/rabbitmq.rs` and `e2e/sqs.rs`).
//! So does `E2E_BROKERS=store`: the stateful `counter` handler on Kafka with
//! the default store (redb) and with the store in PostgreSQL shared by one
//! to three processes (see `e2e/store.rs`; `E2E_STORE_MESSAGES`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use weir_tests::{Broker, Deployment, NatsServer, WeirProcess, workspace};

#[path = "e2e/rabbitmq.rs"]
mod rabbitmq_bench;
#[path = "e2e/redis.rs"]
mod redis_bench;
#[path = "e2e/sqs.rs"]
mod sqs_bench;
#[path = "e2e/store.rs"]
mod store_bench;

const KEYS: usize = 200;
const PAYLOAD_BYTES: usize = 100;
const LATENCY_RATE: u64 = 1000;
/// `fetch.wait.max.ms` of every Kafka consumer in the latency runs (see
/// there).
const FETCH_WAIT_MS: &str = "5";
/// Longest any one run may take before the bench gives up on it.
const RUN_DEADLINE: Duration = Duration::from_secs(900);

struct Settings {
    messages: usize,
    latency_secs: u64,
    brokers: Vec<String>,
    languages: Vec<String>,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let list = |name: &str, default: &str| -> Vec<String> {
            std::env::var(name)
                .unwrap_or_else(|_| default.to_string())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let number = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .with_context(|| format!("{name}={v:?} is not a number")),
                Err(_) => Ok(default),
            }
        };
        Ok(Self {
            messages: usize::try_from(number("E2E_MESSAGES", 100_000)?)?,
            latency_secs: number("E2E_LATENCY_SECS", 5)?,
            brokers: list("E2E_BROKERS", "kafka,nats,redis"),
            languages: list("E2E_LANGUAGES", "rust,python,js"),
        })
    }
}

/// One line of the report.
struct Row {
    broker: &'static str,
    what: String,
    rate: f64,
    /// The raw rate this row is compared with.
    raw_rate: f64,
    cpu_us: Option<f64>,
}

/// (sequence number, latency in ms) of each message read back.
type Samples = std_mpsc::Receiver<(usize, f64)>;

struct Latency {
    broker: &'static str,
    what: &'static str,
    p50_ms: f64,
    p99_ms: f64,
    samples: usize,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `{"seq":…,"t":…,"pad":"…"}`, padded to about [`PAYLOAD_BYTES`].
fn payload(seq: usize, t: u64) -> Vec<u8> {
    let head = format!("{{\"seq\":{seq},\"t\":{t},\"pad\":\"");
    let pad = PAYLOAD_BYTES.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad)).into_bytes()
}

/// The produce time carried in a payload, in ns since the epoch.
fn sent_at(payload: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("t")?
        .as_u64()
}

fn key(i: usize) -> String {
    format!("k{}", i % KEYS)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn latency(broker: &'static str, what: &'static str, mut samples: Vec<f64>) -> Latency {
    samples.sort_by(f64::total_cmp);
    Latency {
        broker,
        what,
        p50_ms: percentile(&samples, 50.0),
        p99_ms: percentile(&samples, 99.0),
        samples: samples.len(),
    }
}

/// Polls `check` every 20 ms until it says done; the time it took.
async fn until(what: &str, mut check: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + RUN_DEADLINE;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A handler deployment for one weir run: `component` from
/// `target/test-handlers` as handler `name` with `manifest`, its
/// compiled-component cache warmed (`weir handlers` compiles it).
fn deploy(source: &str, component: &str, name: &str, manifest: &str) -> Result<Deployment> {
    let deployment = Deployment::with_source(source)?;
    // The run ends by SIGTERM after everything is committed: no need to
    // drain anything for long.
    deployment.add_handler(component, name, manifest)?;
    deployment.weir(&["handlers"])?;
    Ok(deployment)
}

/// Starts weir, waits for `done`, and returns (elapsed, CPU time).
async fn time_weir(
    deployment: &Deployment,
    label: &str,
    done: impl AsyncFnMut() -> Result<bool>,
) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut weir = deployment.start(label)?;
    until(&format!("weir ({label}) to commit everything"), done)
        .await
        .with_context(|| format!("see {}", weir.log.display()))?;
    let elapsed = started.elapsed();
    let cpu = weir.cpu_time()?;
    stop(&mut weir)?;
    Ok((elapsed, cpu))
}

fn stop(weir: &mut WeirProcess) -> Result<()> {
    weir.terminate(Duration::from_secs(30))?;
    Ok(())
}

// ---------------------------------------------------------------- Kafka --

fn kafka_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

async fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka_config(bootstrap).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match admin.create_topics(&new, &AdminOptions::new()).await {
            Ok(results) => {
                for result in results {
                    if let Err((topic, err)) = result {
                        bail!("cannot create topic {topic}: {err}");
                    }
                }
                return Ok(());
            }
            Err(err) if Instant::now() < deadline => {
                eprintln!("creating topics: {err}; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => bail!("cannot create topics: {err}"),
        }
    }
}

fn kafka_producer(bootstrap: &str) -> Result<FutureProducer> {
    Ok(kafka_config(bootstrap)
        // tansu skips or stalls on fetches from inside a multi-record
        // batch: one record per batch.
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .create()?)
}

/// Produces `count` messages and returns each partition's end offset.
async fn kafka_produce(bootstrap: &str, topic: &str, count: usize) -> Result<BTreeMap<i32, i64>> {
    kafka_produce_keyed(bootstrap, topic, count, key).await
}

/// Produces `count` messages, message `i` with key `key(i)`, and returns
/// each partition's end offset.
async fn kafka_produce_keyed(
    bootstrap: &str,
    topic: &str,
    count: usize,
    key: fn(usize) -> String,
) -> Result<BTreeMap<i32, i64>> {
    let producer = kafka_producer(bootstrap)?;
    let mut ends = BTreeMap::new();
    let started = Instant::now();
    for chunk in (0..count).collect::<Vec<_>>().chunks(2000) {
        let mut pending = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let key = key(i);
            let value = payload(i, 0);
            let record = FutureRecord::to(topic).key(&key).payload(&value);
            pending.push(
                producer
                    .send_result(record)
                    .map_err(|(err, _)| anyhow!("produce: {err}"))?,
            );
        }
        for delivery in pending {
            let delivered = delivery
                .await
                .map_err(|_| anyhow!("producer dropped a delivery"))?
                .map_err(|(err, _)| anyhow!("produce: {err}"))?;
            let end = ends.entry(delivered.partition).or_insert(0);
            *end = (*end).max(delivered.offset + 1);
        }
    }
    eprintln!(
        "produced {count} messages to {topic} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(ends)
}

/// Whether `group` has committed `ends` on `topic`.
fn kafka_committed(reader: &BaseConsumer, topic: &str, ends: &BTreeMap<i32, i64>) -> Result<bool> {
    let mut partitions = TopicPartitionList::new();
    for partition in ends.keys() {
        partitions.add_partition(topic, *partition);
    }
    let committed = reader.committed_offsets(partitions, Duration::from_secs(5))?;
    Ok(ends.iter().all(|(partition, end)| {
        matches!(
            committed.find_partition(topic, *partition).map(|p| p.offset()),
            Some(Offset::Offset(at)) if at >= *end
        )
    }))
}

fn offsets_reader(bootstrap: &str, group: &str) -> Result<BaseConsumer> {
    Ok(kafka_config(bootstrap).set("group.id", group).create()?)
}

/// The raw client: consume every message, store its offset, auto-commit
/// every second (as Weir does); timed until the broker shows all committed.
async fn kafka_raw(bootstrap: &str, topic: &str, ends: &BTreeMap<i32, i64>) -> Result<Duration> {
    let group = format!("raw-{topic}");
    let total: i64 = ends.values().sum();
    let started = Instant::now();
    let consumer: BaseConsumer = kafka_config(bootstrap)
        .set("group.id", &group)
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let reader = offsets_reader(bootstrap, &group)?;
    let topic_name = topic.to_string();
    let ends_owned = ends.clone();
    // The consumer polls on its own thread, as a raw consumer loop would.
    let (finished, wait) = std_mpsc::channel();
    let worker = std::thread::spawn(move || -> Result<()> {
        let mut seen = 0i64;
        let deadline = Instant::now() + RUN_DEADLINE;
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    consumer.store_offset_from_message(&message)?;
                    seen += 1;
                }
                Some(Err(err)) => eprintln!("raw consumer: {err}"),
                None => {}
            }
            if seen >= total && wait_done(&finished) {
                return Ok(());
            }
        }
        bail!("raw consumer: deadline passed after {seen} of {total} messages");
    });
    until("the raw consumer to commit everything", async || {
        kafka_committed(&reader, &topic_name, &ends_owned)
    })
    .await?;
    let elapsed = started.elapsed();
    drop(wait);
    worker
        .join()
        .map_err(|_| anyhow!("raw consumer thread panicked"))??;
    Ok(elapsed)
}

/// The consumer thread keeps polling (so that commits go out) until the
/// measuring side hangs up.
fn wait_done(finished: &std_mpsc::Sender<()>) -> bool {
    finished.send(()).is_err()
}

async fn kafka_weir(
    bootstrap: &str,
    component: &str,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
    label: &str,
    extra_manifest: &str,
) -> Result<(Duration, Duration)> {
    let group = format!("bench-{label}");
    let manifest = format!("topics = [\"{topic}\"]\ngroup = \"{group}\"\n{extra_manifest}");
    let source = format!("[source.kafka]\nbootstrap_servers = \"{bootstrap}\"\n");
    let deployment = deploy(&source, component, "bench", &manifest)?;
    let reader = offsets_reader(bootstrap, &group)?;
    time_weir(&deployment, label, async || {
        kafka_committed(&reader, topic, ends)
    })
    .await
}

/// Produces at [`LATENCY_RATE`] for `secs`, each payload stamped with its
/// send time; the messages are numbered from `first`.
async fn kafka_paced(bootstrap: &str, topic: &str, first: usize, secs: u64) -> Result<usize> {
    let producer = kafka_producer(bootstrap)?;
    let count = usize::try_from(LATENCY_RATE * secs)?;
    let started = tokio::time::Instant::now();
    let mut pending = Vec::with_capacity(count);
    for n in 0..count {
        let at = started + Duration::from_micros(1_000_000 / LATENCY_RATE * n as u64);
        tokio::time::sleep_until(at).await;
        let i = first + n;
        let key = key(i);
        let value = payload(i, now_ns());
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&value))
                .map_err(|(err, _)| anyhow!("produce: {err}"))?,
        );
    }
    for delivery in pending {
        delivery
            .await
            .map_err(|_| anyhow!("producer dropped a delivery"))?
            .map_err(|(err, _)| anyhow!("produce: {err}"))?;
    }
    Ok(count)
}

/// Reads `topic` from its start on a thread, sending each payload's
/// latency (ms) with its sequence number.
fn kafka_latency_reader(bootstrap: &str, topic: &str) -> Result<(Samples, std_mpsc::Sender<()>)> {
    let consumer: BaseConsumer = kafka_config(bootstrap)
        .set("group.id", format!("latency-{topic}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", FETCH_WAIT_MS)
        .create()?;
    consumer.subscribe(&[topic])?;
    let (samples, received) = std_mpsc::channel();
    let (stop, stopped) = std_mpsc::channel::<()>();
    std::thread::spawn(move || {
        while matches!(stopped.try_recv(), Err(std_mpsc::TryRecvError::Empty)) {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
                let now = now_ns();
                let Some(body) = message.payload() else {
                    continue;
                };
                let seq = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v.get("seq")?.as_u64());
                if let (Some(seq), Some(t)) = (seq, sent_at(body))
                    && samples
                        .send((seq as usize, now.saturating_sub(t) as f64 / 1e6))
                        .is_err()
                {
                    return;
                }
            }
        }
    });
    Ok((received, stop))
}

/// Produces single messages until one comes back on the reader (everything
/// is connected and assigned), then a paced run; the latencies of the
/// paced messages.
async fn measure_latency(
    produce_one: impl AsyncFn(usize) -> Result<()>,
    paced: impl AsyncFnOnce(usize) -> Result<usize>,
    received: &Samples,
) -> Result<Vec<f64>> {
    const WARMUP_BASE: usize = 1_000_000_000;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut warm = WARMUP_BASE;
    'warm: loop {
        produce_one(warm).await?;
        warm += 1;
        let wait_until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < wait_until {
            if received.recv_timeout(Duration::from_millis(50)).is_ok() {
                break 'warm;
            }
        }
        if Instant::now() > deadline {
            bail!("no message came through within two minutes");
        }
    }
    let count = paced(0).await?;
    let mut samples = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while samples.len() < count && Instant::now() < deadline {
        if let Ok((seq, ms)) = received.recv_timeout(Duration::from_millis(100))
            && seq < count
        {
            samples.insert(seq, ms);
        }
    }
    if samples.len() < count {
        bail!(
            "only {} of {count} paced messages came through",
            samples.len()
        );
    }
    Ok(samples.into_values().collect())
}

async fn kafka_bench(
    settings: &Settings,
    rows: &mut Vec<Row>,
    lat: &mut Vec<Latency>,
) -> Result<()> {
    let broker = Broker::start()?;
    let bootstrap = broker.bootstrap.clone();
    let n = settings.messages;
    create_topics(
        &bootstrap,
        &[
            ("bench", 4),
            ("bench-1p", 1),
            ("lat-raw", 4),
            ("lat-weir", 4),
            ("lat-weir.out", 1),
        ],
    )
    .await?;
    let ends = kafka_produce(&bootstrap, "bench", n).await?;
    let ends_1p = kafka_produce(&bootstrap, "bench-1p", n).await?;
    let count: i64 = ends.values().sum();
    if count != n as i64 {
        bail!("the broker holds {count} messages, {n} were produced");
    }

    let raw = kafka_raw(&bootstrap, "bench", &ends).await?;
    let raw_rate = n as f64 / raw.as_secs_f64();
    eprintln!("kafka raw: {raw_rate:.0} msg/s");
    rows.push(Row {
        broker: "Kafka (tansu)",
        what: "raw rdkafka consumer, 4 partitions".into(),
        rate: raw_rate,
        raw_rate,
        cpu_us: None,
    });
    let run = async |label: &str, component: &str, topic: &str, ends, extra: &str| {
        let (elapsed, cpu) = kafka_weir(&bootstrap, component, topic, ends, label, extra).await?;
        let rate = n as f64 / elapsed.as_secs_f64();
        let cpu_us = cpu.as_secs_f64() * 1e6 / n as f64;
        eprintln!("kafka weir {label}: {rate:.0} msg/s, {cpu_us:.1} µs CPU/msg");
        anyhow::Ok((rate, cpu_us))
    };
    for language in &settings.languages {
        let (component, what) = match language.as_str() {
            "rust" => ("noop", "weir, default manifest (dedup on, key ordering)"),
            "python" => ("noop-py", "weir, default manifest, Python handler"),
            "js" => ("noop-js", "weir, default manifest, JavaScript handler"),
            other => bail!("E2E_LANGUAGES: unknown language {other:?}"),
        };
        let (rate, cpu) = run(
            &format!("default-{language}"),
            component,
            "bench",
            &ends,
            "",
        )
        .await?;
        rows.push(Row {
            broker: "Kafka (tansu)",
            what: what.into(),
            rate,
            raw_rate,
            cpu_us: Some(cpu),
        });
        if language != "rust" {
            continue;
        }
        let (rate, cpu) = run(
            "no-dedup",
            component,
            "bench",
            &ends,
            "[dedup]\nenabled = false\n",
        )
        .await?;
        rows.push(Row {
            broker: "Kafka (tansu)",
            what: "weir, dedup off".into(),
            rate,
            raw_rate,
            cpu_us: Some(cpu),
        });
        let raw_1p = kafka_raw(&bootstrap, "bench-1p", &ends_1p).await?;
        let raw_1p_rate = n as f64 / raw_1p.as_secs_f64();
        rows.push(Row {
            broker: "Kafka (tansu)",
            what: "raw rdkafka consumer, 1 partition".into(),
            rate: raw_1p_rate,
            raw_rate: raw_1p_rate,
            cpu_us: None,
        });
        let (rate, cpu) = run(
            "partition",
            component,
            "bench-1p",
            &ends_1p,
            "ordering = \"partition\"\n",
        )
        .await?;
        rows.push(Row {
            broker: "Kafka (tansu)",
            what: "weir, ordering = \"partition\", 1 partition".into(),
            rate,
            raw_rate: raw_1p_rate,
            cpu_us: Some(cpu),
        });
    }

    if settings.latency_secs > 0 {
        let secs = settings.latency_secs;
        let producer = kafka_producer(&bootstrap)?;
        let one = |topic: &'static str| {
            let producer = producer.clone();
            async move |i: usize| {
                producer
                    .send(
                        FutureRecord::to(topic)
                            .key(&key(i))
                            .payload(&payload(i, now_ns())),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(err, _)| anyhow!("produce: {err}"))?;
                anyhow::Ok(())
            }
        };
        let (received, stop_reader) = kafka_latency_reader(&bootstrap, "lat-raw")?;
        let samples = measure_latency(
            one("lat-raw"),
            async |first| kafka_paced(&bootstrap, "lat-raw", first, secs).await,
            &received,
        )
        .await?;
        drop(stop_reader);
        lat.push(latency("Kafka (tansu)", "raw: produce → consumed", samples));

        let manifest = "topics = [\"lat-weir\"]\ngroup = \"bench-latency\"\n\n[config]\necho_topic = \"lat-weir.out\"\n";
        // tansu answers a fetch only when its wait is over, even with
        // records there: every consumer here waits at most 5 ms, or the
        // broker's wait would be all that is measured.
        let source = format!(
            "[source.kafka]\nbootstrap_servers = \"{bootstrap}\"\n\n[source.kafka.properties]\n\"fetch.wait.max.ms\" = \"{FETCH_WAIT_MS}\"\n"
        );
        let deployment = deploy(&source, "noop", "bench", manifest)?;
        let (received, stop_reader) = kafka_latency_reader(&bootstrap, "lat-weir.out")?;
        let mut weir = deployment.start("latency")?;
        let samples = measure_latency(
            one("lat-weir"),
            async |first| kafka_paced(&bootstrap, "lat-weir", first, secs).await,
            &received,
        )
        .await
        .with_context(|| format!("see {}", weir.log.display()))?;
        drop(stop_reader);
        stop(&mut weir)?;
        lat.push(latency(
            "Kafka (tansu)",
            "weir: produce → echo consumed",
            samples,
        ));
    }
    Ok(())
}

// ----------------------------------------------------------------- NATS --

const NATS_KEY_HEADER: &str = "ce-partitionkey";

async fn nats_stream(js: &jetstream::Context, subject: &str) -> Result<stream::Stream> {
    js.get_or_create_stream(stream::Config {
        name: weir_tests::stream_name(subject),
        subjects: vec![subject.to_string()],
        ..Default::default()
    })
    .await
    .map_err(|err| anyhow!("cannot create the stream for {subject}: {err}"))
}

/// Publishes `count` messages, acknowledged; the last stream sequence.
async fn nats_publish(js: &jetstream::Context, subject: &str, count: usize) -> Result<u64> {
    let started = Instant::now();
    let mut last = 0;
    for chunk in (0..count).collect::<Vec<_>>().chunks(2000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(NATS_KEY_HEADER, key(i).as_str());
            acks.push(
                js.publish_with_headers(subject.to_string(), headers, payload(i, 0).into())
                    .await?,
            );
        }
        for ack in acks {
            last = last.max(ack.await?.sequence);
        }
    }
    eprintln!(
        "published {count} messages to {subject} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(last)
}

/// Whether the durable `name` on `stream` has acknowledged up to `last`.
async fn nats_acked(stream: &stream::Stream, name: &str, last: u64) -> Result<bool> {
    let Ok(mut consumer) = stream.get_consumer::<pull::Config>(name).await else {
        return Ok(false);
    };
    let info = consumer.info().await?;
    Ok(info.ack_floor.stream_sequence >= last && info.num_ack_pending == 0)
}

/// The raw client: a pull consumer acking each message; timed until the
/// server shows every message acknowledged.
async fn nats_raw(
    js: &jetstream::Context,
    subject: &str,
    last: u64,
    count: usize,
) -> Result<Duration> {
    let stream = nats_stream(js, subject).await?;
    let started = Instant::now();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut seen = 0;
    while seen < count {
        let message = messages
            .next()
            .await
            .ok_or_else(|| anyhow!("the raw consumer's message stream ended"))?
            .map_err(|err| anyhow!("raw consumer: {err}"))?;
        message
            .ack()
            .await
            .map_err(|err| anyhow!("raw ack: {err}"))?;
        seen += 1;
    }
    until("the raw consumer's acks", async || {
        nats_acked(&stream, "raw", last).await
    })
    .await?;
    Ok(started.elapsed())
}

async fn nats_bench(
    settings: &Settings,
    rows: &mut Vec<Row>,
    lat: &mut Vec<Latency>,
) -> Result<()> {
    let server = NatsServer::start()?;
    let client = async_nats::connect(&server.url).await?;
    let js = jetstream::new(client.clone());
    let n = settings.messages;
    let stream = nats_stream(&js, "bench").await?;
    let last = nats_publish(&js, "bench", n).await?;

    let raw = nats_raw(&js, "bench", last, n).await?;
    let raw_rate = n as f64 / raw.as_secs_f64();
    eprintln!("nats raw: {raw_rate:.0} msg/s");
    rows.push(Row {
        broker: "NATS JetStream",
        what: "raw async-nats pull consumer, ack each".into(),
        rate: raw_rate,
        raw_rate,
        cpu_us: None,
    });
    let source = format!("[source.nats]\nurl = \"{}\"\n", server.url);
    let run = async |label: &str, component: &str, extra: &str| {
        let durable = format!("bench-{label}");
        let manifest = format!("topics = [\"bench\"]\ngroup = \"{durable}\"\n{extra}");
        let deployment = deploy(&source, component, "bench", &manifest)?;
        let (elapsed, cpu) = time_weir(&deployment, label, async || {
            nats_acked(&stream, &durable, last).await
        })
        .await?;
        let rate = n as f64 / elapsed.as_secs_f64();
        let cpu_us = cpu.as_secs_f64() * 1e6 / n as f64;
        eprintln!("nats weir {label}: {rate:.0} msg/s, {cpu_us:.1} µs CPU/msg");
        anyhow::Ok((rate, cpu_us))
    };
    for language in &settings.languages {
        let (component, what) = match language.as_str() {
            "rust" => ("noop", "weir, default manifest (dedup on, key ordering)"),
            "python" => ("noop-py", "weir, default manifest, Python handler"),
            "js" => ("noop-js", "weir, default manifest, JavaScript handler"),
            other => bail!("E2E_LANGUAGES: unknown language {other:?}"),
        };
        let (rate, cpu) = run(&format!("default-{language}"), component, "").await?;
        rows.push(Row {
            broker: "NATS JetStream",
            what: what.into(),
            rate,
            raw_rate,
            cpu_us: Some(cpu),
        });
        if language != "rust" {
            continue;
        }
        let (rate, cpu) = run("no-dedup", component, "[dedup]\nenabled = false\n").await?;
        rows.push(Row {
            broker: "NATS JetStream",
            what: "weir, dedup off".into(),
            rate,
            raw_rate,
            cpu_us: Some(cpu),
        });
        let (rate, cpu) = run("partition", component, "ordering = \"partition\"\n").await?;
        rows.push(Row {
            broker: "NATS JetStream",
            what: "weir, ordering = \"partition\" (one lane)".into(),
            rate,
            raw_rate,
            cpu_us: Some(cpu),
        });
    }

    if settings.latency_secs > 0 {
        let secs = settings.latency_secs;
        let publish_one = |subject: &'static str| {
            let js = js.clone();
            async move |i: usize| {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(NATS_KEY_HEADER, key(i).as_str());
                js.publish_with_headers(subject, headers, payload(i, now_ns()).into())
                    .await?
                    .await?;
                anyhow::Ok(())
            }
        };
        let paced = |subject: &'static str| {
            let js = js.clone();
            async move |first: usize| {
                let count = usize::try_from(LATENCY_RATE * secs)?;
                let started = tokio::time::Instant::now();
                let mut acks = Vec::with_capacity(count);
                for n in 0..count {
                    let at = started + Duration::from_micros(1_000_000 / LATENCY_RATE * n as u64);
                    tokio::time::sleep_until(at).await;
                    let i = first + n;
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(NATS_KEY_HEADER, key(i).as_str());
                    acks.push(
                        js.publish_with_headers(subject, headers, payload(i, now_ns()).into())
                            .await?,
                    );
                }
                for ack in acks {
                    ack.await?;
                }
                anyhow::Ok(count)
            }
        };

        // Raw: a pull consumer on its own subject.
        let raw_stream = nats_stream(&js, "lat-raw").await?;
        let consumer = raw_stream
            .create_consumer(pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
        let received = forward_latencies(consumer.messages().await?.filter_map(|m| async move {
            let m = m.ok()?;
            let _ = m.ack().await;
            Some(m.payload.to_vec())
        }));
        let samples = measure_latency(publish_one("lat-raw"), paced("lat-raw"), &received).await?;
        lat.push(latency(
            "NATS JetStream",
            "raw: produce → consumed",
            samples,
        ));

        // Weir: echoes to lat-weir.out, read by a core subscription.
        nats_stream(&js, "lat-weir").await?;
        let manifest = "topics = [\"lat-weir\"]\ngroup = \"bench-latency\"\n\n[config]\necho_topic = \"lat-weir.out\"\n";
        let deployment = deploy(&source, "noop", "bench", manifest)?;
        let echoes = client.subscribe("lat-weir.out").await?;
        let received = forward_latencies(echoes.map(|m| m.payload.to_vec()));
        let mut weir = deployment.start("latency")?;
        let samples = measure_latency(publish_one("lat-weir"), paced("lat-weir"), &received)
            .await
            .with_context(|| format!("see {}", weir.log.display()))?;
        stop(&mut weir)?;
        lat.push(latency(
            "NATS JetStream",
            "weir: produce → echo consumed",
            samples,
        ));
    }
    drop(server);
    Ok(())
}

/// Spawns a task that turns received payloads into (seq, latency ms).
fn forward_latencies(
    payloads: impl futures_util::Stream<Item = Vec<u8>> + Send + 'static,
) -> Samples {
    let (samples, received) = std_mpsc::channel();
    tokio::spawn(async move {
        let mut payloads = std::pin::pin!(payloads);
        while let Some(body) = payloads.next().await {
            let now = now_ns();
            let seq = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("seq")?.as_u64());
            if let (Some(seq), Some(t)) = (seq, sent_at(&body))
                && samples
                    .send((seq as usize, now.saturating_sub(t) as f64 / 1e6))
                    .is_err()
            {
                return;
            }
        }
    });
    received
}

// --------------------------------------------------------------- report --

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{cores} cores, {cpu}")
}

/// Checks that the no-op handlers the selected parts run are built (the
/// store part checks its own).
fn check_built(settings: &Settings) -> Result<()> {
    let mut components = Vec::new();
    for broker in &settings.brokers {
        match broker.as_str() {
            "store" => {}
            "kafka" | "nats" => {
                for language in &settings.languages {
                    components.push(match language.as_str() {
                        "python" => "noop-py",
                        "js" => "noop-js",
                        _ => "noop",
                    });
                }
            }
            _ => components.push("noop"),
        }
    }
    components.sort_unstable();
    components.dedup();
    for component in components {
        let path = workspace().join(format!("target/test-handlers/{component}.wasm"));
        if !Path::new(&path).is_file() {
            bail!(
                "{} is missing: build the handlers first with `bash .ci/build-handlers`",
                path.display()
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    check_built(&settings)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    let mut latencies = Vec::new();
    let mut store_rows = Vec::new();
    for broker in &settings.brokers {
        match broker.as_str() {
            "kafka" => runtime.block_on(kafka_bench(&settings, &mut rows, &mut latencies))?,
            "nats" => runtime.block_on(nats_bench(&settings, &mut rows, &mut latencies))?,
            "redis" => runtime.block_on(redis_bench::bench(&settings, &mut rows))?,
            "rabbitmq" => runtime.block_on(rabbitmq_bench::bench(&settings, &mut rows))?,
            "sqs" => runtime.block_on(sqs_bench::bench(&settings, &mut rows))?,
            "store" => runtime.block_on(store_bench::bench(&settings, &mut store_rows))?,
            other => {
                bail!(
                    "E2E_BROKERS: unknown broker {other:?} (kafka, nats, redis, rabbitmq, sqs, store)"
                )
            }
        }
    }

    if !rows.is_empty() {
        println!(
            "\nend to end: {} messages of ~{PAYLOAD_BYTES} B, {KEYS} keys; {}",
            settings.messages,
            machine()
        );
        println!("| broker | consumer | msg/s | × raw | weir CPU µs/msg |\n|---|---|---|---|---|");
        for row in &rows {
            println!(
                "| {} | {} | {:.0} | {:.2} | {} |",
                row.broker,
                row.what,
                row.rate,
                row.rate / row.raw_rate,
                row.cpu_us.map_or("–".into(), |c| format!("{c:.1}"))
            );
        }
    }
    store_bench::report(&store_rows);
    if !latencies.is_empty() {
        println!(
            "\nlatency at {LATENCY_RATE} msg/s for {} s\n| broker | measured | p50 ms | p99 ms | samples |\n|---|---|---|---|---|",
            settings.latency_secs
        );
        for l in &latencies {
            println!(
                "| {} | {} | {:.2} | {:.2} | {} |",
                l.broker, l.what, l.p50_ms, l.p99_ms, l.samples
            );
        }
    }
    Ok(())
}
