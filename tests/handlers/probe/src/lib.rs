//! A handler for integration tests.
//!
//! Every call logs one record, message `probe`, with fields `id`, `topic`,
//! `partition`, `offset`, `attempt`, `key_hex` (or `none`), `payload_len`,
//! `payload_fnv` (FNV-1a 64), `payload_hex` (the first 2 KiB),
//! `headers` (a JSON array of `[name, hex]`) and `outcome`.
//!
//! The `probe.fail` header asks for a failure:
//! `retryable:N` fails while `attempt <= N`; `permanent`; `retry-after:MS`
//! on the first attempt; `trap` panics.

use std::time::Duration;

use weir_sdk::{Event, Handler, HandlerError, export_handler, log};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        let request = event.header_str("probe.fail").unwrap_or("");
        let (kind, arg) = request.split_once(':').unwrap_or((request, ""));
        let number: u64 = arg.parse().unwrap_or(0);
        let attempt = u64::from(event.attempt());
        let result = match kind {
            "retryable" if attempt <= number => Err(HandlerError::retryable(format!(
                "probe asked to fail attempt {attempt} of the first {number}"
            ))),
            "permanent" => Err(HandlerError::permanent(
                "probe asked for a permanent failure",
            )),
            "retry-after" if attempt == 1 => Err(HandlerError::retry_after(
                Duration::from_millis(number),
                "probe asked to retry later",
            )),
            "trap" => Err(HandlerError::retryable("trap")),
            _ => Ok(()),
        };
        let outcome = match (&result, kind) {
            (Ok(()), _) => "ok",
            (Err(_), "trap") => "trap",
            (Err(HandlerError::Retryable(_)), _) => "retryable",
            (Err(HandlerError::RetryAfter(..)), _) => "retry-after",
            (Err(HandlerError::Permanent(_)), _) => "permanent",
        };
        let headers = serde_json::Value::Array(
            event
                .headers()
                .iter()
                .map(|(n, v)| serde_json::json!([n, hex(v)]))
                .collect(),
        )
        .to_string();
        log::info(
            "probe",
            &[
                ("id", event.id()),
                ("topic", event.topic()),
                ("partition", &event.partition().to_string()),
                ("offset", &event.offset().to_string()),
                ("attempt", &attempt.to_string()),
                (
                    "key_hex",
                    &event.key().map(hex).unwrap_or_else(|| "none".into()),
                ),
                ("payload_len", &event.payload().len().to_string()),
                ("payload_fnv", &fnv1a(event.payload())),
                (
                    "payload_hex",
                    &hex(&event.payload()[..event.payload().len().min(2048)]),
                ),
                ("headers", &headers),
                ("outcome", outcome),
            ],
        );
        if outcome == "trap" {
            panic!("probe trap");
        }
        result
    }
}

export_handler!(Probe);
