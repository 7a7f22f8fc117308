//! Every released `weir:handler` contract is served side by side.
//!
//! One host loads a component built for the frozen 0.1.0
//! (`tests/handlers/probe`, wit-bindgen against `wit/0.1.0`) and components
//! built for 0.2.0 (`tests/handlers/sdk-probe` in Rust, `unruly-py` and
//! `unruly-js` in Python and JavaScript), calls each with the same Kafka
//! record and NATS JetStream message, and checks what each one saw (from
//! its log record), how the host tagged that record, and that a 0.2.0
//! error category arrives in `Failure::category`.
//!
//! The components come from `bash .ci/build-handlers` (in
//! `target/test-handlers`). Compiled Python and JavaScript components are
//! cached in the test's temporary directory, so only the first run pays
//! their compile time.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use weir::config::LimitsSection;
use weir::host::{
    CompiledHandler, Contract, Event, Failure, FailureKind, Host, HostSettings, Outcome,
};
use weir::message::Position;
use weir::registry::{ManifestLimits, content_version};

/// One `weir::guest` log record: every field as text (`message` included;
/// a guest's own fields are the JSON object in `fields`).
type Record = BTreeMap<String, String>;

/// Collects `weir::guest` records.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Record>>>);

impl Capture {
    fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: LayerContext<'_, S>) {
        if event.metadata().target() != "weir::guest" {
            return;
        }
        let mut record = Record::new();
        event.record(&mut Fields(&mut record));
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }
}

struct Fields<'a>(&'a mut Record);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
}

/// A component built by `.ci/build-handlers`.
fn component(name: &str) -> Result<Vec<u8>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-handlers")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}: build the test handlers with `bash .ci/build-handlers`",
            path.display()
        )
    })
}

fn host() -> Result<Host> {
    Host::new(&HostSettings {
        cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("contracts-compiled")),
        ..HostSettings::default()
    })
}

fn compile(host: &Host, name: &str) -> Result<CompiledHandler> {
    let bytes = component(name)?;
    let mut limits = ManifestLimits::default().resolve(&LimitsSection::default());
    limits.timeout = Duration::from_secs(30);
    host.compile(name, &content_version(&bytes), &bytes, limits)
        .map_err(|err| anyhow!("{name}: {err}"))
}

/// A Kafka record: partition 2, offset 40.
fn kafka(headers: &[(&str, &str)]) -> Event {
    event(
        "orders",
        Position::Kafka {
            partition: 2,
            offset: 40,
        },
        headers,
    )
}

/// A JetStream message: stream `ORDERS`, sequence 7, delivered twice.
fn jetstream(headers: &[(&str, &str)]) -> Event {
    event(
        "orders.placed",
        Position::JetStream {
            stream: "ORDERS".into(),
            sequence: 7,
            delivered: 2,
        },
        headers,
    )
}

fn event(topic: &str, position: Position, headers: &[(&str, &str)]) -> Event {
    Event {
        id: position.fallback_id(topic),
        topic: topic.into(),
        key: Some(b"c-1".to_vec()),
        payload: br#"{"n":1}"#.to_vec(),
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_string(), v.as_bytes().to_vec()))
            .collect(),
        timestamp_ms: Some(1_700_000_000_000),
        position,
        attempt: 1,
        correlation_id: None,
    }
}

/// Calls `handle` once on a fresh instance; returns the outcome and the
/// guest's log records.
fn call(compiled: &CompiledHandler, event: &Event) -> Result<(Outcome, Vec<Record>)> {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    // Calls are futures (as in `weir run`): driven on this thread, so the
    // thread's subscriber sees the guest's records.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let mut instance = compiled
                .instantiate()
                .await
                .map_err(|f| anyhow!("instantiating {}: {}", compiled.name(), f.message))?;
            Ok::<_, anyhow::Error>(instance.handle(event).await)
        })
    })?;
    Ok((outcome, capture.take()))
}

/// The one record with `message`: the host's tags, and the guest's fields.
fn logged(records: &[Record], message: &str) -> Result<(Record, serde_json::Value)> {
    let mut found = records
        .iter()
        .filter(|r| r.get("message").map(String::as_str) == Some(message));
    let record = found
        .next()
        .ok_or_else(|| anyhow!("no {message:?} record in {records:?}"))?;
    ensure!(found.next().is_none(), "more than one {message:?} record");
    let fields = serde_json::from_str(record.get("fields").map_or("{}", String::as_str))?;
    Ok((record.clone(), fields))
}

fn text<'a>(fields: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    fields[name].as_str()
}

fn tag<'a>(record: &'a Record, name: &str) -> Option<&'a str> {
    record.get(name).map(String::as_str)
}

/// The host tags a guest's record with where the event sits: topic,
/// partition and offset for Kafka; topic, stream and sequence for
/// JetStream.
fn check_tags(record: &Record, event: &Event) -> Result<()> {
    ensure!(
        tag(record, "topic") == Some(event.topic.as_str()),
        "{record:?}"
    );
    match &event.position {
        Position::Kafka { .. } => {
            ensure!(tag(record, "partition") == Some("2"), "{record:?}");
            ensure!(tag(record, "offset") == Some("40"), "{record:?}");
            ensure!(tag(record, "stream").is_none(), "{record:?}");
        }
        Position::JetStream { .. } => {
            ensure!(tag(record, "stream") == Some("ORDERS"), "{record:?}");
            ensure!(tag(record, "sequence") == Some("7"), "{record:?}");
            ensure!(tag(record, "partition").is_none(), "{record:?}");
        }
        other => {
            ensure!(
                tag(record, "position") == Some(other.to_string().as_str()),
                "{record:?}"
            );
            ensure!(tag(record, "partition").is_none(), "{record:?}");
        }
    }
    Ok(())
}

fn failure(outcome: Outcome) -> Result<Failure> {
    match outcome {
        Outcome::Failed(failure) => Ok(failure),
        Outcome::Handled(_) => bail!("the call succeeded; a failure was asked for"),
    }
}

#[test]
fn a_0_1_component_sees_partition_and_offset_and_a_jetstream_message_as_partition_0() -> Result<()>
{
    let host = host()?;
    let probe = compile(&host, "probe")?;
    ensure!(probe.contract() == Contract::V0_1, "{:?}", probe.contract());

    for (event, partition, offset) in [(kafka(&[]), "2", "40"), (jetstream(&[]), "0", "7")] {
        let (outcome, records) = call(&probe, &event)?;
        ensure!(matches!(outcome, Outcome::Handled(_)), "{outcome:?}");
        let (record, fields) = logged(&records, "probe")?;
        ensure!(text(&fields, "id") == Some(event.id.as_str()), "{fields}");
        ensure!(
            text(&fields, "topic") == Some(event.topic.as_str()),
            "{fields}"
        );
        ensure!(text(&fields, "partition") == Some(partition), "{fields}");
        ensure!(text(&fields, "offset") == Some(offset), "{fields}");
        ensure!(text(&fields, "attempt") == Some("1"), "{fields}");
        check_tags(&record, &event)?;
    }

    // 0.1.0 has no categories.
    let (outcome, _) = call(&probe, &kafka(&[("probe.fail", "permanent")]))?;
    let failed = failure(outcome)?;
    ensure!(failed.kind == FailureKind::Permanent, "{failed:?}");
    ensure!(failed.category.is_none(), "{failed:?}");
    // Nor have traps.
    let (outcome, _) = call(&probe, &jetstream(&[("probe.fail", "trap")]))?;
    let trapped = failure(outcome)?;
    ensure!(
        trapped.poisoned && trapped.category.is_none(),
        "{trapped:?}"
    );
    Ok(())
}

#[test]
fn a_0_2_component_sees_each_broker_s_position_and_names_categories() -> Result<()> {
    let host = host()?;
    let probe = compile(&host, "sdk-probe")?;
    ensure!(probe.contract() == Contract::V0_2, "{:?}", probe.contract());

    let (outcome, records) = call(&probe, &kafka(&[]))?;
    ensure!(matches!(outcome, Outcome::Handled(_)), "{outcome:?}");
    let (record, fields) = logged(&records, "sdk-probe")?;
    ensure!(text(&fields, "broker") == Some("kafka"), "{fields}");
    ensure!(text(&fields, "partition") == Some("2"), "{fields}");
    ensure!(text(&fields, "offset") == Some("40"), "{fields}");
    ensure!(text(&fields, "id") == Some("orders/2/40"), "{fields}");
    check_tags(&record, &kafka(&[]))?;

    let (outcome, records) = call(&probe, &jetstream(&[]))?;
    ensure!(matches!(outcome, Outcome::Handled(_)), "{outcome:?}");
    let (record, fields) = logged(&records, "sdk-probe")?;
    ensure!(text(&fields, "broker") == Some("jetstream"), "{fields}");
    ensure!(text(&fields, "stream") == Some("ORDERS"), "{fields}");
    ensure!(text(&fields, "sequence") == Some("7"), "{fields}");
    ensure!(text(&fields, "delivered") == Some("2"), "{fields}");
    ensure!(text(&fields, "partition").is_none(), "{fields}");
    ensure!(text(&fields, "id") == Some("ORDERS/7"), "{fields}");
    ensure!(text(&fields, "topic") == Some("orders.placed"), "{fields}");
    check_tags(&record, &jetstream(&[]))?;

    for (request, kind, category) in [
        (
            "retryable:service-unavailable",
            FailureKind::Retryable,
            Some("service-unavailable"),
        ),
        (
            "retry-after:250:rate-limited",
            FailureKind::RetryAfter(Duration::from_millis(250)),
            Some("rate-limited"),
        ),
        (
            "permanent:validation",
            FailureKind::Permanent,
            Some("validation"),
        ),
        (
            "permanent:Payment Declined",
            FailureKind::Permanent,
            Some("payment-declined"),
        ),
        ("permanent", FailureKind::Permanent, None),
    ] {
        let (outcome, _) = call(&probe, &jetstream(&[("probe.fail", request)]))?;
        let failed = failure(outcome).with_context(|| request.to_string())?;
        ensure!(failed.kind == kind, "{request}: {failed:?}");
        ensure!(
            failed.category.as_deref() == category,
            "{request}: {failed:?}"
        );
        ensure!(!failed.poisoned, "{request}: {failed:?}");
    }
    Ok(())
}

#[test]
fn python_and_javascript_components_speak_0_2_too() -> Result<()> {
    let host = host()?;
    for name in ["unruly-py", "unruly-js"] {
        let handler = compile(&host, name)?;
        ensure!(
            handler.contract() == Contract::V0_2,
            "{name}: {:?}",
            handler.contract()
        );

        let describe = [("unruly.do", "describe")];
        let (outcome, records) = call(&handler, &kafka(&describe))?;
        ensure!(
            matches!(outcome, Outcome::Handled(_)),
            "{name}: {outcome:?}"
        );
        let (record, fields) = logged(&records, "describe")?;
        ensure!(text(&fields, "broker") == Some("kafka"), "{name}: {fields}");
        ensure!(text(&fields, "partition") == Some("2"), "{name}: {fields}");
        ensure!(text(&fields, "offset") == Some("40"), "{name}: {fields}");
        check_tags(&record, &kafka(&describe))?;

        let (outcome, records) = call(&handler, &jetstream(&describe))?;
        ensure!(
            matches!(outcome, Outcome::Handled(_)),
            "{name}: {outcome:?}"
        );
        let (record, fields) = logged(&records, "describe")?;
        ensure!(
            text(&fields, "broker") == Some("jetstream"),
            "{name}: {fields}"
        );
        ensure!(
            text(&fields, "stream") == Some("ORDERS"),
            "{name}: {fields}"
        );
        ensure!(text(&fields, "sequence") == Some("7"), "{name}: {fields}");
        ensure!(text(&fields, "delivered") == Some("2"), "{name}: {fields}");
        check_tags(&record, &jetstream(&describe))?;

        for (request, kind, category) in [
            (
                "permanent:validation",
                FailureKind::Permanent,
                Some("validation"),
            ),
            (
                "retryable:payment-declined",
                FailureKind::Retryable,
                Some("payment-declined"),
            ),
            (
                "retry-after:250:rate-limited",
                FailureKind::RetryAfter(Duration::from_millis(250)),
                Some("rate-limited"),
            ),
            ("permanent", FailureKind::Permanent, None),
            // An uncaught exception: retryable, the handler's own bug.
            ("raise", FailureKind::Retryable, Some("internal")),
        ] {
            let (outcome, _) = call(&handler, &jetstream(&[("unruly.do", request)]))?;
            let failed = failure(outcome).with_context(|| format!("{name}: {request}"))?;
            ensure!(failed.kind == kind, "{name}: {request}: {failed:?}");
            ensure!(
                failed.category.as_deref() == category,
                "{name}: {request}: {failed:?}"
            );
        }
    }
    Ok(())
}
