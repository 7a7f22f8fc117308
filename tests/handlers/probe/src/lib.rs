//! A handler for integration tests, built for the frozen contract
//! `weir:handler@0.1.0` (`wit/0.1.0/handler.wit`) directly with wit-bindgen,
//! not with `weir-sdk`: it is the repository's 0.1.0 component, so every
//! test that runs it shows that components built for 0.1.0 keep running.
//! It sees what 0.1.0 gives: a partition and an offset, which for a NATS
//! JetStream message are partition 0 and the stream sequence.
//!
//! Every call logs exactly one `info` record, message `probe`, with fields
//! `id`, `topic`, `partition`, `offset`, `attempt`, `key_hex` (lowercase hex,
//! or `none` without a key), `payload_len`, `payload_fnv` (FNV-1a 64 of the
//! payload, 16 hex digits), `payload_hex` (lowercase hex of the first 2 KiB of
//! the payload: all of it for payloads up to 2048 bytes), `headers` (a JSON
//! array of `[name, hex]` pairs in broker order) and `outcome` (`ok`,
//! `retryable`, `permanent`, `retry-after` or `trap`).
//!
//! The UTF-8 value of the `probe.fail` header asks for a failure:
//!
//! | `probe.fail`     | result                                            |
//! |------------------|---------------------------------------------------|
//! | absent           | `ok`                                              |
//! | `retryable:N`    | retryable error while `attempt <= N`, then `ok`   |
//! | `permanent`      | permanent error                                   |
//! | `retry-after:MS` | retry-after MS milliseconds on attempt 1, then `ok` |
//! | `trap`           | logs (outcome `trap`), then panics: `probe trap`  |
//!
//! A `probe.sleep-ms` header makes the call take that long first (to keep
//! messages in flight in tests).
//!
//! Any other value (or a header that is not UTF-8) is a permanent error
//! saying so, so that a typo in a test shows up as a dead letter rather
//! than as a silent success.

use std::fmt::Write;
use std::time::Duration;

/// The `weir:handler@0.1.0` bindings, and the component's export.
mod bindings {
    #![allow(missing_docs, unsafe_code, clippy::too_many_arguments)]

    wit_bindgen::generate!({
        path: "../../../wit/0.1.0",
        world: "weir:handler/handler",
        additional_derives: [PartialEq, Eq],
    });

    use super::Probe;

    export!(Probe with_types_in self);
}

use bindings::weir::handler::log;
use bindings::weir::handler::types::{Event, HandlerError, RetryAfter};

/// Header whose value selects the failure.
const FAIL_HEADER: &str = "probe.fail";

/// Payload bytes logged in full in `payload_hex`.
const HEX_LIMIT: usize = 2048;

/// What one call does.
#[derive(Debug, PartialEq)]
enum Plan {
    /// Return this result.
    Return(Result<(), HandlerError>),
    /// Panic after logging.
    Trap,
}

/// Decides the outcome from the `probe.fail` header and the attempt number.
fn plan(request: Option<&[u8]>, attempt: u32) -> Plan {
    let Some(request) = request else {
        return Plan::Return(Ok(()));
    };
    let Ok(request) = std::str::from_utf8(request) else {
        return Plan::Return(Err(HandlerError::Permanent(format!(
            "probe: {FAIL_HEADER} is not UTF-8"
        ))));
    };
    let (kind, arg) = match request.split_once(':') {
        Some((kind, arg)) => (kind, Some(arg)),
        None => (request, None),
    };
    let number = arg.map(str::parse::<u64>);
    Plan::Return(match (kind, number) {
        ("retryable", Some(Ok(n))) if u64::from(attempt) <= n => Err(HandlerError::Retryable(
            format!("probe asked to fail attempt {attempt} of the first {n}"),
        )),
        ("retry-after", Some(Ok(ms))) if attempt == 1 => {
            Err(HandlerError::RetryAfter(RetryAfter {
                delay_ms: ms,
                reason: "probe asked to retry later".into(),
            }))
        }
        ("retryable" | "retry-after", Some(Ok(_))) => Ok(()),
        ("permanent", None) => Err(HandlerError::Permanent(
            "probe asked for a permanent failure".into(),
        )),
        ("trap", None) => return Plan::Trap,
        _ => Err(HandlerError::Permanent(format!(
            "probe: cannot understand {FAIL_HEADER} = {request:?}; expected retryable:N, \
             permanent, retry-after:MS or trap"
        ))),
    })
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// FNV-1a 64: a fingerprint of payloads too large to log whole.
fn fnv1a(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The first header called `name`.
fn header<'a>(event: &'a Event, name: &str) -> Option<&'a [u8]> {
    event
        .headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

/// What `plan` asks for, as the `outcome` field says it.
fn outcome(plan: &Plan) -> &'static str {
    match plan {
        Plan::Trap => "trap",
        Plan::Return(Ok(())) => "ok",
        Plan::Return(Err(HandlerError::Retryable(_))) => "retryable",
        Plan::Return(Err(HandlerError::RetryAfter(_))) => "retry-after",
        Plan::Return(Err(HandlerError::Permanent(_))) => "permanent",
    }
}

/// The fields of the one `probe` record a call logs.
fn record(event: &Event, outcome: &str) -> Vec<(String, String)> {
    let headers = serde_json::Value::Array(
        event
            .headers
            .iter()
            .map(|(name, value)| serde_json::json!([name, hex(value)]))
            .collect(),
    )
    .to_string();
    let payload = &event.payload;
    [
        ("id", event.id.clone()),
        ("topic", event.topic.clone()),
        ("partition", event.partition.to_string()),
        ("offset", event.offset.to_string()),
        ("attempt", event.attempt.to_string()),
        (
            "key_hex",
            event.key.as_deref().map_or_else(|| "none".into(), hex),
        ),
        ("payload_len", payload.len().to_string()),
        ("payload_fnv", fnv1a(payload)),
        ("payload_hex", hex(&payload[..payload.len().min(HEX_LIMIT)])),
        ("headers", headers),
        ("outcome", outcome.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The test probe.
pub struct Probe;

impl bindings::Guest for Probe {
    fn handle(event: Event) -> Result<(), HandlerError> {
        if let Some(ms) = header(&event, "probe.sleep-ms")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let plan = plan(header(&event, FAIL_HEADER), event.attempt);
        log::log(log::Level::Info, "probe", &record(&event, outcome(&plan)));
        match plan {
            Plan::Return(result) => result,
            Plan::Trap => panic!("probe trap"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_for(spec: &str, attempt: u32) -> Plan {
        plan(Some(spec.as_bytes()), attempt)
    }

    fn event(payload: Vec<u8>) -> Event {
        Event {
            id: "t/0/0".into(),
            topic: "t".into(),
            key: None,
            payload,
            headers: Vec::new(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            attempt: 1,
        }
    }

    fn field<'a>(record: &'a [(String, String)], name: &str) -> Option<&'a str> {
        record
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn failures_follow_the_header() {
        assert_eq!(plan(None, 1), Plan::Return(Ok(())));
        assert!(matches!(
            plan_for("retryable:2", 1),
            Plan::Return(Err(HandlerError::Retryable(_)))
        ));
        assert!(matches!(
            plan_for("retryable:2", 2),
            Plan::Return(Err(HandlerError::Retryable(_)))
        ));
        assert_eq!(plan_for("retryable:2", 3), Plan::Return(Ok(())));
        assert_eq!(plan_for("retryable:0", 1), Plan::Return(Ok(())));
        assert!(matches!(
            plan_for("permanent", 5),
            Plan::Return(Err(HandlerError::Permanent(_)))
        ));
        assert_eq!(
            plan_for("retry-after:250", 1),
            Plan::Return(Err(HandlerError::RetryAfter(RetryAfter {
                delay_ms: 250,
                reason: "probe asked to retry later".into()
            })))
        );
        assert_eq!(plan_for("retry-after:250", 2), Plan::Return(Ok(())));
        assert_eq!(plan_for("trap", 1), Plan::Trap);
    }

    #[test]
    fn unintelligible_requests_are_permanent() {
        for spec in [
            "retryable",
            "retryable:x",
            "retry-after:",
            "trap:1",
            "nope",
            "",
        ] {
            match plan_for(spec, 1) {
                Plan::Return(Err(HandlerError::Permanent(m))) => {
                    assert!(m.contains("cannot understand"), "{m}")
                }
                other => panic!("{spec:?}: {other:?}"),
            }
        }
        assert!(matches!(
            plan(Some(&[0xff]), 1),
            Plan::Return(Err(HandlerError::Permanent(_)))
        ));
    }

    #[test]
    fn one_record_holds_everything() {
        let mut e = event(vec![0x00, 0xab]);
        e.key = Some(vec![0xc3, 0x28]);
        e.headers = vec![
            (FAIL_HEADER.into(), b"retryable:1".to_vec()),
            ("empty".into(), Vec::new()),
        ];
        e.partition = 2;
        e.offset = 40;
        let plan = plan(header(&e, FAIL_HEADER), e.attempt);
        assert_eq!(outcome(&plan), "retryable");
        let logged = record(&e, outcome(&plan));
        let fields = logged.as_slice();
        assert_eq!(field(fields, "partition"), Some("2"));
        assert_eq!(field(fields, "offset"), Some("40"));
        assert_eq!(field(fields, "key_hex"), Some("c328"));
        assert_eq!(field(fields, "payload_len"), Some("2"));
        assert_eq!(field(fields, "payload_hex"), Some("00ab"));
        assert_eq!(
            field(fields, "payload_fnv"),
            Some(fnv1a(&[0x00, 0xab]).as_str())
        );
        assert_eq!(
            field(fields, "headers"),
            Some(r#"[["probe.fail","726574727961626c653a31"],["empty",""]]"#)
        );
        assert_eq!(field(fields, "outcome"), Some("retryable"));

        let plain = record(&event(Vec::new()), "ok");
        assert_eq!(field(&plain, "key_hex"), Some("none"));
        assert_eq!(field(&plain, "headers"), Some("[]"));
        assert_eq!(field(&plain, "outcome"), Some("ok"));
    }

    #[test]
    fn fnv_matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), "cbf29ce484222325");
        assert_eq!(fnv1a(b"a"), "af63dc4c8601ec8c");
    }
}
