//! The same handler in Rust, Python and JavaScript (`handlers-examples/
//! loyalty`, `loyalty-py`, `loyalty-js`), run side by side by the real
//! `weir` binary against a real broker, must behave identically: the same
//! state, the same emitted events (each with its deterministic id), the
//! same dead letters with the same attempt counts, and a duplicate that
//! never earns points twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weir_tests::{
    Broker, Deployment, KafkaTool, Record, WeirProcess, broker_test, consume_at_least, header,
    poll_until, stop, unhex,
};

/// Compiling a Python or JavaScript component for the first time takes a
/// while on a small machine.
const WAIT: Duration = Duration::from_secs(240);

/// (component in target/handlers, handler name and topic suffix).
const LANGUAGES: [(&str, &str); 3] = [
    ("loyalty", "rust"),
    ("loyalty-py", "python"),
    ("loyalty-js", "js"),
];

fn order(id: &str, key: &[u8], kind: &str, order: &str, amount: i64) -> Record {
    Record {
        partition: Some(0),
        key: Some(key.to_vec()),
        value: json!({
            "event_type": kind,
            "aggregate_id": order,
            "data": { "amount_cents": amount },
        })
        .to_string()
        .into_bytes(),
        headers: vec![("event_id".to_string(), id.as_bytes().to_vec())],
    }
}

/// The input: every path through the handler, with a duplicate, a
/// non-UTF-8 key, malformed JSON and an event about an unknown order.
fn input() -> Vec<Record> {
    let mut records = vec![
        order("e1", b"c1", "OrderPlaced", "o1", 1999),
        // A producer retry: the same event id again.
        order("e1", b"c1", "OrderPlaced", "o1", 1999),
        order("e2", b"c1", "OrderPaid", "o1", 0),
        order("e3", b"c2", "OrderPlaced", "o2", 500),
        order("e4", b"c2", "OrderCancelled", "o2", 0),
        order("e5", b"c3", "OrderPlaced", "o3", 12345),
        // Not UTF-8: the handler files it under "anonymous".
        order("e6", b"\xff\xfe", "OrderPlaced", "o4", 300),
        // Never placed: retryable until the last attempt, then dead-lettered.
        order("e7", b"c4", "OrderShipped", "o-missing", 0),
    ];
    records.push(Record {
        partition: Some(0),
        key: Some(b"c1".to_vec()),
        value: b"{not json".to_vec(),
        headers: vec![("event_id".to_string(), b"e8".to_vec())],
    });
    records.push(order("e9", b"c1", "OrderRefunded", "o1", 0));
    records
}

/// What every language must emit: (customer, order, change, balance).
fn expected_points() -> BTreeSet<(String, String, i64, i64)> {
    // points_per_euro = 2: 1999 cents -> 19 euros -> 38 points.
    [
        ("c1", "o1", 38, 38),
        ("c2", "o2", 10, 10),
        ("c2", "o2", -10, 0),
        ("c3", "o3", 246, 246),
        ("anonymous", "o4", 6, 6),
    ]
    .into_iter()
    .map(|(c, o, ch, b)| (c.to_string(), o.to_string(), ch, b))
    .collect()
}

fn manifest(lang: &str) -> String {
    format!(
        "topics = [\"orders-{lang}\"]\nordering = \"key\"\n\
         [retry]\nmax_attempts = 3\ninitial_delay = \"50ms\"\njitter = 0.0\n\
         [limits]\ntimeout = \"10s\"\n\
         [config]\noutput_topic = \"points-{lang}\"\npoints_per_euro = \"2\"\n"
    )
}

/// Waits until handler `name`'s group has committed `topic`'s single
/// partition up to `end`.
fn wait_committed(
    kafka: &KafkaTool,
    name: &str,
    topic: &str,
    end: i64,
    weir: &WeirProcess,
) -> Result<()> {
    let expected = BTreeMap::from([(0, Some(end))]);
    poll_until(
        WAIT,
        &format!("{name}: committed offsets of {topic} to reach {end}"),
        || Ok((kafka.committed(&format!("weir.{name}"), topic)? == expected).then_some(())),
        || format!("log: {}", weir.log.display()),
    )
}

/// Dead letters as header `by` -> (error kind, attempts, error).
fn outcomes(dead: &[Value], by: &str) -> BTreeMap<String, (String, String, String)> {
    dead.iter()
        .filter_map(|r| {
            Some((
                header(r, by)?,
                (
                    header(r, "weir.error.kind")?,
                    header(r, "weir.attempts")?,
                    header(r, "weir.error")?,
                ),
            ))
        })
        .collect()
}

/// `outcomes[id]` is a dead letter of `kind` after `attempts` whose error
/// mentions `needle`.
fn expect_dead(
    who: &str,
    outcomes: &BTreeMap<String, (String, String, String)>,
    id: &str,
    (kind, attempts, needle): (&str, &str, &str),
) -> Result<()> {
    let (k, a, error) = outcomes
        .get(id)
        .with_context(|| format!("{who}: no dead letter for {id}: {outcomes:?}"))?;
    ensure!(
        k == kind && a == attempts && error.contains(needle),
        "{who}: {id} dead-lettered as ({k}, {a}, {error:?}), expected ({kind}, {attempts}, …{needle}…)"
    );
    Ok(())
}

#[test]
fn rust_python_and_javascript_handlers_behave_the_same() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = Broker::start()?;
    let kafka = KafkaTool::new(&broker)?;
    let deployment = Deployment::new(&broker)?;
    for (component, lang) in LANGUAGES {
        for topic in [
            format!("orders-{lang}"),
            format!("orders-{lang}.dlq"),
            format!("points-{lang}"),
        ] {
            kafka.create_topic(&topic, 1)?;
        }
        deployment.add_example(component, lang, &manifest(lang))?;
    }
    let input = input();
    let end = i64::try_from(input.len())?;
    let mut weir = deployment.start("languages")?;
    for (_, lang) in LANGUAGES {
        kafka.produce(&format!("orders-{lang}"), &input)?;
    }

    for (_, lang) in LANGUAGES {
        wait_committed(&kafka, lang, &format!("orders-{lang}"), end, &weir)?;

        // Emitted events: exactly the expected changes, each with a
        // distinct deterministic id naming its source event.
        let records = consume_at_least(
            &kafka,
            &format!("points-{lang}"),
            expected_points().len(),
            WAIT,
            &weir,
        )?;
        let mut points = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for record in &records {
            let payload: Value =
                serde_json::from_slice(&unhex(record["value_hex"].as_str().unwrap_or_default())?)
                    .with_context(|| format!("{lang}: emitted payload is not JSON: {record}"))?;
            points.insert((
                payload["customer"].as_str().unwrap_or_default().to_string(),
                payload["order"].as_str().unwrap_or_default().to_string(),
                payload["change"].as_i64().unwrap_or(i64::MIN),
                payload["balance"].as_i64().unwrap_or(i64::MIN),
            ));
            ids.insert(header(record, "event_id").context("emitted without event_id")?);
            ensure!(
                header(record, "weir.handler").as_deref() == Some(lang),
                "{lang}: weir.handler header of {record}"
            );
        }
        ensure!(
            records.len() == expected_points().len() && ids.len() == records.len(),
            "{lang}: {} emitted events with {} distinct ids (the duplicate must not emit twice)",
            records.len(),
            ids.len()
        );
        ensure!(
            points == expected_points(),
            "{lang}: emitted {points:?}, expected {:?}",
            expected_points()
        );

        // Dead letters: malformed JSON and an unknown event type at once,
        // the unknown order after every attempt.
        let dead = consume_at_least(&kafka, &format!("orders-{lang}.dlq"), 3, WAIT, &weir)?;
        let outcome = outcomes(&dead, "event_id");
        expect_dead(lang, &outcome, "e8", ("permanent", "1", "JSON"))?;
        expect_dead(
            lang,
            &outcome,
            "e9",
            ("permanent", "1", "unknown event_type"),
        )?;
        expect_dead(
            lang,
            &outcome,
            "e7",
            ("retryable", "3", "o-missing is not placed yet"),
        )?;
        ensure!(
            dead.len() == 3,
            "{lang}: {} dead letters: {outcome:?}",
            dead.len()
        );

        // The log import: one "points updated" record per emitted event.
        let logged = weir.guest_records(lang, "points updated");
        ensure!(
            logged.len() == expected_points().len(),
            "{lang}: {} 'points updated' log records",
            logged.len()
        );
    }
    stop(&mut weir)?;

    // State: the same balances everywhere, and a cancelled order is gone.
    for (_, lang) in LANGUAGES {
        let listing = deployment.weir(&["state", "list", lang, "--json"])?;
        let mut state = BTreeMap::new();
        for line in listing.lines() {
            let entry: Value = serde_json::from_str(line).context("state list line")?;
            let value: Value = serde_json::from_str(entry["value"].as_str().unwrap_or("null"))
                .with_context(|| format!("{lang}: state value is not JSON: {entry}"))?;
            state.insert(entry["key"].as_str().unwrap_or_default().to_string(), value);
        }
        let balance = |customer: &str| {
            state
                .get(&format!("customer/{customer}"))
                .map(|v| v["points"].clone())
        };
        ensure!(
            balance("c1") == Some(json!(38))
                && balance("c2") == Some(json!(0))
                && balance("c3") == Some(json!(246))
                && balance("anonymous") == Some(json!(6)),
            "{lang}: balances in state: {state:?}"
        );
        ensure!(
            !state.contains_key("order/o2") && state.contains_key("order/o1"),
            "{lang}: orders in state: {state:?}"
        );
    }
    Ok(())
}

/// Python and JavaScript handlers that raise, loop, print or overstep a
/// state limit: each failure maps to retry or dead letter as the SDK guides
/// document, uncaught exceptions reach the log with their traceback, and
/// printed lines become log lines.
#[test]
fn interpreted_handlers_map_their_failures_as_documented() -> Result<()> {
    let Some(_serial) = broker_test() else {
        return Ok(());
    };
    let broker = Broker::start()?;
    let kafka = KafkaTool::new(&broker)?;
    let deployment = Deployment::new(&broker)?;
    // (component, exception in the error, the SDK's log message, its trace field)
    let handlers = [
        (
            "unruly-py",
            "ValueError: boom",
            "handler raised",
            "traceback",
        ),
        ("unruly-js", "Error: boom", "handler threw", "stack"),
    ];
    for (name, ..) in handlers {
        kafka.create_topic(name, 1)?;
        kafka.create_topic(&format!("{name}.dlq"), 1)?;
        deployment.add_handler(
            name,
            name,
            &format!(
                "topics = [\"{name}\"]\nordering = \"none\"\n\
                 [retry]\nmax_attempts = 2\ninitial_delay = \"50ms\"\njitter = 0.0\n\
                 [limits]\ntimeout = \"3s\"\n"
            ),
        )?;
    }
    let requests = [
        "raise",
        "loop",
        "big-state",
        "print:hello from the guest",
        "ok",
    ];
    let records: Vec<Record> = requests
        .iter()
        .map(|r| Record::request("unruly.do", r))
        .collect();
    let mut weir = deployment.start("unruly")?;
    for (name, ..) in handlers {
        kafka.produce(name, &records)?;
    }
    let end = i64::try_from(records.len())?;
    for (name, exception, logged, trace_field) in handlers {
        let dead = consume_at_least(&kafka, &format!("{name}.dlq"), 3, WAIT, &weir)?;
        let outcome = outcomes(&dead, "unruly.do");
        expect_dead(name, &outcome, "raise", ("retryable", "2", exception))?;
        expect_dead(name, &outcome, "loop", ("retryable", "2", "timeout"))?;
        expect_dead(
            name,
            &outcome,
            "big-state",
            ("permanent", "1", "larger than"),
        )?;
        ensure!(
            dead.len() == 3,
            "{name}: {} dead letters: {outcome:?}",
            dead.len()
        );

        wait_committed(&kafka, name, name, end, &weir)?;

        // The uncaught exception is logged with where it came from, once
        // per attempt.
        let raised = weir.guest_records(name, logged);
        let source = if name.ends_with("py") {
            "app.py"
        } else {
            "app.js"
        };
        ensure!(
            raised.len() == 2
                && raised.iter().all(|f| {
                    f["exception"].as_str().is_some_and(|e| e.contains("boom"))
                        && f[trace_field].as_str().is_some_and(|t| t.contains(source))
                }),
            "{name}: '{logged}' records (the exception, and a {trace_field} through {source}): {raised:?}"
        );
        // Printed lines are log lines of the handler.
        let printed = weir.records().into_iter().any(|r| {
            r["target"] == "weir::guest"
                && r["handler"] == name
                && r["stream"] == "stdout"
                && r["message"] == "hello from the guest"
        });
        ensure!(
            printed,
            "{name}: the printed line is not in the log {}",
            weir.log.display()
        );
    }
    stop(&mut weir)?;
    Ok(())
}
