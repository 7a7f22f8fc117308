//! A handler for integration tests.
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

use weir_sdk::{Event, Handler, HandlerError, export_handler, log};

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
        return Plan::Return(Err(HandlerError::permanent(format!(
            "probe: {FAIL_HEADER} is not UTF-8"
        ))));
    };
    let (kind, arg) = match request.split_once(':') {
        Some((kind, arg)) => (kind, Some(arg)),
        None => (request, None),
    };
    let number = arg.map(str::parse::<u64>);
    Plan::Return(match (kind, number) {
        ("retryable", Some(Ok(n))) if u64::from(attempt) <= n => Err(HandlerError::retryable(
            format!("probe asked to fail attempt {attempt} of the first {n}"),
        )),
        ("retry-after", Some(Ok(ms))) if attempt == 1 => Err(HandlerError::retry_after(
            Duration::from_millis(ms),
            "probe asked to retry later",
        )),
        ("retryable" | "retry-after", Some(Ok(_))) => Ok(()),
        ("permanent", None) => Err(HandlerError::permanent(
            "probe asked for a permanent failure",
        )),
        ("trap", None) => return Plan::Trap,
        _ => Err(HandlerError::permanent(format!(
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

/// The test probe.
pub struct Probe;

impl Handler for Probe {
    fn handle(event: Event) -> Result<(), HandlerError> {
        if let Some(ms) = event
            .header_str("probe.sleep-ms")
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let plan = plan(event.header(FAIL_HEADER), event.attempt());
        let outcome = match &plan {
            Plan::Trap => "trap",
            Plan::Return(Ok(())) => "ok",
            Plan::Return(Err(HandlerError::Retryable(_))) => "retryable",
            Plan::Return(Err(HandlerError::RetryAfter(..))) => "retry-after",
            Plan::Return(Err(HandlerError::Permanent(_))) => "permanent",
        };
        let headers = serde_json::Value::Array(
            event
                .headers()
                .iter()
                .map(|(name, value)| serde_json::json!([name, hex(value)]))
                .collect(),
        )
        .to_string();
        let payload = event.payload();
        log::info(
            "probe",
            &[
                ("id", event.id()),
                ("topic", event.topic()),
                ("partition", &event.partition().to_string()),
                ("offset", &event.offset().to_string()),
                ("attempt", &event.attempt().to_string()),
                ("key_hex", &event.key().map_or_else(|| "none".into(), hex)),
                ("payload_len", &payload.len().to_string()),
                ("payload_fnv", &fnv1a(payload)),
                (
                    "payload_hex",
                    &hex(&payload[..payload.len().min(HEX_LIMIT)]),
                ),
                ("headers", &headers),
                ("outcome", outcome),
            ],
        );
        match plan {
            Plan::Return(result) => result,
            Plan::Trap => panic!("probe trap"),
        }
    }
}

export_handler!(Probe);

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_for(spec: &str, attempt: u32) -> Plan {
        plan(Some(spec.as_bytes()), attempt)
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
            Plan::Return(Err(HandlerError::retry_after(
                Duration::from_millis(250),
                "probe asked to retry later"
            )))
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
    fn logs_one_record_with_everything() {
        let _ = log::take_records();
        let event = Event::new("t", vec![0x00, 0xab])
            .with_key(vec![0xc3, 0x28])
            .with_header(FAIL_HEADER, "retryable:1")
            .with_header("empty", Vec::new());
        assert!(matches!(
            Probe::handle(event),
            Err(HandlerError::Retryable(_))
        ));
        let records = log::take_records();
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(record.message, "probe");
        assert_eq!(record.level, log::Level::Info);
        assert_eq!(record.field("key_hex"), Some("c328"));
        assert_eq!(record.field("payload_len"), Some("2"));
        assert_eq!(record.field("payload_hex"), Some("00ab"));
        assert_eq!(
            record.field("payload_fnv"),
            Some(fnv1a(&[0x00, 0xab]).as_str())
        );
        assert_eq!(
            record.field("headers"),
            Some(r#"[["probe.fail","726574727961626c653a31"],["empty",""]]"#)
        );
        assert_eq!(record.field("outcome"), Some("retryable"));

        let _ = Probe::handle(Event::new("t", Vec::new()));
        let records = log::take_records();
        assert_eq!(records[0].field("key_hex"), Some("none"));
        assert_eq!(records[0].field("headers"), Some("[]"));
        assert_eq!(records[0].field("outcome"), Some("ok"));
    }

    #[test]
    fn trap_logs_first_then_panics() {
        let _ = log::take_records();
        let trapped = std::panic::catch_unwind(|| {
            Probe::handle(Event::new("t", Vec::new()).with_header(FAIL_HEADER, "trap"))
        });
        assert!(trapped.is_err());
        let records = log::take_records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].field("outcome"), Some("trap"));
    }

    #[test]
    fn fnv_matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), "cbf29ce484222325");
        assert_eq!(fnv1a(b"a"), "af63dc4c8601ec8c");
    }
}
