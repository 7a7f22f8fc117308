//! What a handler's language costs: component size, compile time, first
//! instantiation, and time per event, for the same handler written in Rust,
//! Python and JavaScript (`handlers-examples/loyalty*`), side by side.
//!
//! Each event is an `OrderPlaced` that reads two state keys, writes two and
//! emits one event (effects are buffered in the call's transaction, as in
//! `weir run`; committing them is the pipeline bench's subject). One
//! instance handles every event, as a pooled instance does.
//!
//! Run: `bash .ci/build-handlers && cargo bench -p weir --bench languages`
//! Arguments: `-- [EVENTS] [/absolute/FILE.wasm ...]` (default: 2000
//! events, the three loyalty examples from `target/handlers`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use weir::config::LimitsSection;
use weir::host::{Event, Host, HostSettings, Outcome};
use weir::registry::{ManifestLimits, content_version};
use weir::store::Store;

struct Figures {
    name: String,
    size: u64,
    compile: Duration,
    cached: Duration,
    first_instance: Duration,
    first_event: Duration,
    next_instance: Duration,
    per_event: Duration,
}

fn event(i: usize) -> Event {
    Event {
        id: format!("bench/0/{i}"),
        topic: "orders".into(),
        key: Some(format!("c{}", i % 100).into_bytes()),
        payload: format!(
            r#"{{"event_type":"OrderPlaced","aggregate_id":"o{i}","data":{{"amount_cents":{}}}}}"#,
            1000 + i
        )
        .into_bytes(),
        headers: vec![],
        position: weir::message::Position::Kafka {
            partition: 0,
            offset: i64::try_from(i).unwrap_or(i64::MAX),
        },
        timestamp_ms: None,
        attempt: 1,
        correlation_id: None,
    }
}

async fn measure(path: &PathBuf, events: usize, store: &Store) -> anyhow::Result<Figures> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read {} (give absolute paths: cargo runs benches in runtime/)",
            path.display()
        )
    })?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("handler")
        .to_string();
    // A fresh engine per component and an empty cache: a cold compile.
    let cache = tempfile::tempdir()?;
    let settings = HostSettings {
        cache_dir: Some(cache.path().to_path_buf()),
        ..HostSettings::default()
    };
    let host = Host::new(&settings)?;
    let mut limits = ManifestLimits::default().resolve(&LimitsSection::default());
    limits.memory = 256 << 20;
    limits.timeout = Duration::from_secs(30);

    let started = Instant::now();
    let compiled = host
        .compile(&name, &content_version(&bytes), &bytes, limits)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .with_store(store.clone());
    let compile = started.elapsed();

    // What a restart pays: another engine loading it from the cache.
    let restarted = Host::new(&settings)?;
    let started = Instant::now();
    drop(
        restarted
            .compile(&name, &content_version(&bytes), &bytes, limits)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
    );
    let cached = started.elapsed();

    let started = Instant::now();
    let mut instance = compiled
        .instantiate()
        .await
        .map_err(|f| anyhow::anyhow!("{name}: {}", f.message))?;
    let first_instance = started.elapsed();

    let started = Instant::now();
    let outcome = instance.handle(&event(0)).await;
    let first_event = started.elapsed();
    if let Outcome::Failed(failure) = outcome {
        anyhow::bail!("{name}: the first event failed: {}", failure.message);
    }

    let started = Instant::now();
    drop(
        compiled
            .instantiate()
            .await
            .map_err(|f| anyhow::anyhow!("{name}: {}", f.message))?,
    );
    let next_instance = started.elapsed();

    let started = Instant::now();
    for i in 1..=events {
        if let Outcome::Failed(failure) = instance.handle(&event(i)).await {
            anyhow::bail!("{name}: event {i} failed: {}", failure.message);
        }
    }
    let per_event = started.elapsed() / u32::try_from(events.max(1)).unwrap_or(u32::MAX);
    Ok(Figures {
        name,
        size: bytes.len() as u64,
        compile,
        cached,
        first_instance,
        first_event,
        next_instance,
        per_event,
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut events = 2000;
    let mut files = Vec::new();
    for arg in args.by_ref() {
        match arg.parse::<usize>() {
            Ok(n) => events = n,
            Err(_) => files.push(PathBuf::from(arg)),
        }
    }
    if files.is_empty() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/handlers");
        files = ["loyalty", "loyalty-py", "loyalty-js"]
            .iter()
            .map(|n| dir.join(format!("{n}.wasm")))
            .collect();
    }
    let tmp = tempfile::tempdir()?;
    let store = Store::open(&tmp.path().join("weir.redb"))?;
    // Calls are futures (as in `weir run`); one thread drives them here.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    println!("{events} events per component; times are wall-clock on this machine\n");
    println!(
        "{:<14} {:>9} {:>10} {:>9} {:>12} {:>10} {:>9} {:>10} {:>8}",
        "component",
        "size KiB",
        "compile",
        "cached",
        "1st instance",
        "1st event",
        "instance",
        "per event",
        "× first"
    );
    let mut baseline: Option<Duration> = None;
    for file in &files {
        let f = runtime.block_on(measure(file, events, &store))?;
        let base = *baseline.get_or_insert(f.per_event);
        println!(
            "{:<14} {:>9} {:>8.0}ms {:>7.1}ms {:>10.2}ms {:>8.2}ms {:>7.3}ms {:>8.1}µs {:>7.1}×",
            f.name,
            f.size / 1024,
            f.compile.as_secs_f64() * 1e3,
            f.cached.as_secs_f64() * 1e3,
            f.first_instance.as_secs_f64() * 1e3,
            f.first_event.as_secs_f64() * 1e3,
            f.next_instance.as_secs_f64() * 1e3,
            f.per_event.as_secs_f64() * 1e6,
            f.per_event.as_secs_f64() / base.as_secs_f64().max(f64::MIN_POSITIVE),
        );
    }
    println!(
        "\ncompile: cold, empty cache; cached: loading it again from the compiled-component\n\
         cache (data_dir/compiled), as a restart does;\n\
         instance: a later instantiation (pooling allocator); × first: per-event time\n\
         relative to the first component listed."
    );
    Ok(())
}
