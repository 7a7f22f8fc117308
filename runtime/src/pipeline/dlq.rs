//! Dead letters: the original message, plus headers saying who gave up on it,
//! why, and where it came from.

use std::time::SystemTime;

use crate::host::{Event, Failure};

/// Headers a dead letter gets on top of the original message's (see
/// [`headers`]); a replay (`weir dlq replay`) takes them off again. An
/// original header of one of these names is kept renamed (see
/// [`kept_name`]).
pub const ADDED: &[&str] = &[
    "weir.handler",
    "weir.error",
    "weir.error.kind",
    "weir.error.category",
    "weir.attempts",
    "weir.origin.topic",
    "weir.origin.partition",
    "weir.origin.offset",
    "weir.origin.stream",
    "weir.origin.sequence",
    "weir.event-id",
    "weir.failed-at",
    PAYLOAD_DROPPED,
];

/// On a dead letter the broker refused with its payload, sent again
/// without it: what the payload was (its size and SHA-256) and why it is
/// not there. Such a dead letter is never replayed.
pub const PAYLOAD_DROPPED: &str = "weir.payload-dropped";

/// `headers` of a dead letter (or emitted event) whose payload of
/// `payload` the broker refused for `why`, for sending it again without
/// the payload: `PAYLOAD_DROPPED` is added, saying so.
pub fn without_payload(
    payload: &[u8],
    headers: &[(String, Vec<u8>)],
    why: &str,
) -> Vec<(String, Vec<u8>)> {
    use sha2::{Digest, Sha256};
    let digest: String = Sha256::digest(payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut headers = headers.to_vec();
    headers.push((
        PAYLOAD_DROPPED.to_string(),
        format!("{} bytes, sha256 {digest}, left out: {why}", payload.len()).into_bytes(),
    ));
    headers
}

/// The dead letter of an emitted event the broker refused for good
/// (`why`): to `<topic>.dlq`, with the emitting handler's headers and
/// Weir's dead-letter headers (kind `permanent`, origin the event's own
/// topic).
pub fn of_refused_emit(
    record: &crate::store::OutboxRecord,
    why: &str,
) -> crate::store::OutboxRecord {
    let failed_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let mut headers: Vec<(String, Vec<u8>)> = record
        .headers
        .iter()
        .map(|(name, value)| {
            // The emitting handler is named already (`weir.handler`).
            let name = if name == "weir.handler" {
                name.clone()
            } else {
                kept_name(name)
            };
            (name, value.clone())
        })
        .collect();
    for (name, value) in [
        (
            "weir.error",
            format!("the broker refused the emitted event: {why}"),
        ),
        ("weir.error.kind", "permanent".to_string()),
        ("weir.origin.topic", record.topic.clone()),
        ("weir.failed-at", failed_at),
    ] {
        headers.push((name.to_string(), value.into_bytes()));
    }
    crate::store::OutboxRecord {
        topic: crate::registry::DlqSettings::default().destination(&record.topic),
        key: record.key.clone(),
        payload: record.payload.clone(),
        headers,
    }
}

/// On a replayed dead letter: where the dead letter sits
/// (`<dlq>/<position>`).
pub const REPLAY_OF: &str = "weir.replay-of";
/// On a replayed dead letter: its event id, which Weir takes before any
/// other (`decode::event_id`): the dead letter's event id with
/// `#replay:<dlq>/<position>` appended, new to the dedup table and the
/// same for every replay of that dead letter.
pub const REPLAY_ID: &str = "weir.replay-id";
/// On a replayed dead letter: when it was replayed.
pub const REPLAYED_AT: &str = "weir.replayed-at";

/// The headers added to a dead letter, after the original ones.
/// `weir.error.category` is there when the handler named a category
/// (contract 0.2.0).
pub fn headers(
    handler: &str,
    event: &Event,
    failure: &Failure,
    attempts: u32,
) -> Vec<(String, Vec<u8>)> {
    let failed_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let mut headers: Vec<(String, Vec<u8>)> = event
        .headers
        .iter()
        .map(|(name, value)| (kept_name(name), value.clone()))
        .collect();
    for (name, value) in [
        ("weir.handler", handler.to_string()),
        ("weir.error", failure.message.clone()),
        ("weir.error.kind", failure.kind.as_str().to_string()),
    ]
    .into_iter()
    .chain(
        failure
            .category
            .clone()
            .map(|category| ("weir.error.category", category)),
    )
    .chain([
        ("weir.attempts", attempts.to_string()),
        ("weir.origin.topic", event.topic.clone()),
    ])
    .chain(event.position.origin_headers())
    .chain([
        ("weir.event-id", event.id.clone()),
        ("weir.failed-at", failed_at),
    ]) {
        headers.push((name.to_string(), value.into_bytes()));
    }
    // A correlation id found only in a JSON envelope becomes a header too.
    super::correlation::add(&super::correlation::context(event), &mut headers);
    headers
}

/// The name an original header keeps in its dead letter: its own, unless it
/// is one Weir adds to dead letters (see [`ADDED`]; any `weir.origin.*`),
/// which becomes `x-<name>`. A dead letter's `weir.*` headers are then always
/// Weir's own: a producer that sets `weir.origin.topic` on its message
/// cannot steer where `weir dlq replay` sends it.
fn kept_name(name: &str) -> String {
    if ADDED.contains(&name) || name.starts_with("weir.origin.") {
        format!("x-{name}")
    } else {
        name.to_string()
    }
}

/// The contract's error categories (`weir:handler` 0.2.0), as
/// `Failure::category` names them.
const KNOWN_CATEGORIES: &[&str] = &[
    "timeout",
    "service-unavailable",
    "rate-limited",
    "validation",
    "schema-mismatch",
    "not-found",
    "conflict",
    "unauthorized",
    "configuration",
    "internal",
];

/// What failed, in one word, for the `error_type` label of
/// `dlq_messages_total`: the handler's error category where it named one
/// (one of the contract's, else `other`),
/// else what the runtime saw (`timeout`, `trap`, `memory_limit`,
/// `fuel_limit`, `table_limit`), else the error kind (`retryable`,
/// `retry-after`, `permanent`).
pub fn error_type(failure: &Failure) -> &str {
    if let Some(category) = failure.category.as_deref() {
        // A label value per name a handler makes up would grow the metric
        // without bound: names outside the contract's list count as `other`.
        return KNOWN_CATEGORIES
            .iter()
            .find(|known| **known == category)
            .copied()
            .unwrap_or("other");
    }
    runtime_failure(&failure.message).unwrap_or(failure.kind.as_str())
}

/// What the runtime saw, told by an error's text: `timeout`, `trap`,
/// `memory_limit`, `fuel_limit`, `table_limit`; `None` for a handler's own
/// error.
pub fn runtime_failure(error: &str) -> Option<&'static str> {
    [
        ("timeout:", "timeout"),
        ("trap while", "trap"),
        ("memory limit:", "memory_limit"),
        ("fuel limit:", "fuel_limit"),
        ("table limit:", "table_limit"),
    ]
    .into_iter()
    .find(|(prefix, _)| error.starts_with(prefix))
    .map(|(_, kind)| kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FailureKind;

    #[test]
    fn a_producers_weir_headers_never_pass_for_weirs_own() {
        let event = Event {
            id: "e1".into(),
            topic: "orders".into(),
            key: None,
            payload: vec![],
            headers: vec![
                ("weir.origin.topic".into(), b"payments".to_vec()),
                ("weir.origin.queue_url".into(), b"http://elsewhere".to_vec()),
                ("weir.handler".into(), b"other".to_vec()),
                ("weir.custom".into(), b"kept".to_vec()),
            ],
            position: crate::message::Position::Kafka {
                partition: 0,
                offset: 7,
            },
            timestamp_ms: None,
            attempt: 1,
            correlation_id: None,
        };
        let failure = Failure {
            kind: FailureKind::Permanent,
            message: "no".into(),
            poisoned: false,
            category: None,
        };
        let h = headers("probe", &event, &failure, 1);
        let all = |n: &str| -> Vec<String> {
            h.iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .collect()
        };
        assert_eq!(all("weir.origin.topic"), ["orders"]);
        assert_eq!(all("weir.handler"), ["probe"]);
        assert_eq!(all("x-weir.origin.topic"), ["payments"]);
        assert_eq!(all("x-weir.origin.queue_url"), ["http://elsewhere"]);
        assert_eq!(all("x-weir.handler"), ["other"]);
        assert_eq!(all("weir.custom"), ["kept"]);
    }

    #[test]
    fn keeps_original_headers_and_names_the_origin() {
        let event = Event {
            id: "e1".into(),
            topic: "orders".into(),
            key: None,
            payload: vec![],
            headers: vec![("trace".into(), b"abc".to_vec())],
            position: crate::message::Position::Kafka {
                partition: 1,
                offset: 99,
            },
            timestamp_ms: None,
            attempt: 3,
            correlation_id: None,
        };
        let failure = Failure {
            kind: FailureKind::Permanent,
            message: "bad json".into(),
            poisoned: false,
            category: Some("validation".into()),
        };
        let h = headers("orders", &event, &failure, 3);
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(h[0], ("trace".to_string(), b"abc".to_vec()));
        assert_eq!(get("weir.handler").as_deref(), Some("orders"));
        assert_eq!(get("weir.error").as_deref(), Some("bad json"));
        assert_eq!(get("weir.error.kind").as_deref(), Some("permanent"));
        assert_eq!(get("weir.error.category").as_deref(), Some("validation"));
        assert_eq!(get("weir.attempts").as_deref(), Some("3"));
        assert_eq!(get("weir.origin.topic").as_deref(), Some("orders"));
        assert_eq!(get("weir.origin.partition").as_deref(), Some("1"));
        assert_eq!(get("weir.origin.offset").as_deref(), Some("99"));
        assert!(get("weir.failed-at").is_some_and(|t| t.ends_with('Z')));
    }

    #[test]
    fn error_type_is_the_category_else_what_the_runtime_saw_else_the_kind() {
        let failure = |message: &str, category: Option<&str>, kind| Failure {
            kind,
            message: message.into(),
            poisoned: false,
            category: category.map(Into::into),
        };
        use crate::host::FailureKind::{Permanent, Retryable};
        assert_eq!(
            error_type(&failure("x", Some("validation"), Permanent)),
            "validation"
        );
        assert_eq!(
            error_type(&failure("timeout: handling ran longer", None, Retryable)),
            "timeout"
        );
        assert_eq!(
            error_type(&failure(
                "trap while handling: unreachable",
                None,
                Retryable
            )),
            "trap"
        );
        assert_eq!(
            error_type(&failure("memory limit: …", None, Retryable)),
            "memory_limit"
        );
        // A category the handler made up is `other` as a label.
        assert_eq!(
            error_type(&failure("x", Some("my-own-thing-42"), Permanent)),
            "other"
        );
        assert_eq!(error_type(&failure("boom", None, Retryable)), "retryable");
        assert_eq!(error_type(&failure("bad", None, Permanent)), "permanent");
    }
}
