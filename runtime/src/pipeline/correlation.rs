//! Correlation across handlers: the consumed event's correlation id and
//! W3C trace context travel to every event its handling emits and to its
//! dead letter, so a business flow can be followed from handler to
//! handler.
//!
//! What travels (each only when the consumed event has it, and never over
//! a header of the same name the handler set itself):
//!
//! - `correlation_id` and `ce_correlationid` (the CloudEvents extension)
//!   headers; when neither is there but the payload is a JSON envelope
//!   with a string `metadata.correlation_id`, that, as `correlation_id`;
//! - `traceparent` and `tracestate` (W3C trace context), unchanged;
//! - on emitted events, `causation_id`: the id of the consumed event.

use crate::host::Event;
use crate::store::OutboxRecord;

/// Headers carried from a consumed event to what its handling produces.
pub const CARRIED: [&str; 4] = [
    "correlation_id",
    "ce_correlationid",
    "traceparent",
    "tracestate",
];

/// The header naming the event whose handling emitted an event.
pub const CAUSATION_HEADER: &str = "causation_id";

/// The correlation id of a message with these `headers` and `payload`: a
/// `correlation_id` header, else a `ce_correlationid` header, else a JSON
/// envelope's string `metadata.correlation_id` (the payload is parsed only
/// when it holds that name). Headers that are not UTF-8 are skipped.
pub fn correlation_id(headers: &[(String, Vec<u8>)], payload: &[u8]) -> Option<String> {
    let header = |wanted: &str| {
        headers
            .iter()
            .find(|(name, _)| name == wanted)
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
            .filter(|id| !id.is_empty())
            .map(str::to_string)
    };
    header("correlation_id")
        .or_else(|| header("ce_correlationid"))
        .or_else(|| {
            const NAME: &[u8] = b"\"correlation_id\"";
            // Every message without a correlation header comes here: a
            // vectorised search, not a byte-by-byte scan, before any parse.
            if payload.first() != Some(&b'{') || memchr::memmem::find(payload, NAME).is_none() {
                return None;
            }
            let envelope = serde_json::from_slice::<serde_json::Value>(payload).ok()?;
            Some(
                envelope
                    .pointer("/metadata/correlation_id")?
                    .as_str()?
                    .to_string(),
            )
        })
}

/// The context of `event` to carry on (see the module documentation).
pub fn context(event: &Event) -> Vec<(String, Vec<u8>)> {
    let mut context: Vec<(String, Vec<u8>)> = event
        .headers
        .iter()
        .filter(|(name, _)| CARRIED.contains(&name.as_str()))
        .cloned()
        .collect();
    let has_correlation = context
        .iter()
        .any(|(name, _)| name == "correlation_id" || name == "ce_correlationid");
    if let (false, Some(id)) = (has_correlation, &event.correlation_id) {
        context.push(("correlation_id".to_string(), id.as_bytes().to_vec()));
    }
    context
}

/// Adds `context` to `headers`, except names already there.
pub fn add(context: &[(String, Vec<u8>)], headers: &mut Vec<(String, Vec<u8>)>) {
    for (name, value) in context {
        if !headers.iter().any(|(n, _)| n == name) {
            headers.push((name.clone(), value.clone()));
        }
    }
}

/// Carries `event`'s context, and its id as the causation, to `emits`.
pub fn carry(event: &Event, emits: &mut [OutboxRecord]) {
    if emits.is_empty() {
        return;
    }
    let mut context = context(event);
    context.push((CAUSATION_HEADER.to_string(), event.id.as_bytes().to_vec()));
    for record in emits {
        add(&context, &mut record.headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Position;

    fn event(headers: &[(&str, &str)], payload: &str) -> Event {
        let headers: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        Event {
            correlation_id: correlation_id(&headers, payload.as_bytes()),
            id: "ev-1".into(),
            topic: "orders".into(),
            key: None,
            payload: payload.as_bytes().to_vec(),
            headers,
            position: Position::Kafka {
                partition: 0,
                offset: 1,
            },
            timestamp_ms: None,
            attempt: 1,
        }
    }

    fn record(headers: &[(&str, &str)]) -> OutboxRecord {
        OutboxRecord {
            topic: "out".into(),
            key: None,
            payload: vec![],
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn header<'a>(record: &'a OutboxRecord, name: &str) -> Option<&'a [u8]> {
        record
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn headers_travel_and_the_handler_s_own_win() {
        let source = event(
            &[
                ("correlation_id", "c-1"),
                ("traceparent", "00-abc-def-01"),
                ("other", "x"),
            ],
            "{}",
        );
        let mut emits = vec![record(&[]), record(&[("correlation_id", "mine")])];
        carry(&source, &mut emits);
        assert_eq!(header(&emits[0], "correlation_id"), Some(&b"c-1"[..]));
        assert_eq!(
            header(&emits[0], "traceparent"),
            Some(&b"00-abc-def-01"[..])
        );
        assert_eq!(header(&emits[0], "causation_id"), Some(&b"ev-1"[..]));
        assert_eq!(header(&emits[0], "other"), None);
        assert_eq!(header(&emits[1], "correlation_id"), Some(&b"mine"[..]));
    }

    #[test]
    fn a_json_envelope_s_correlation_id_travels_as_a_header() {
        let source = event(&[], r#"{"metadata":{"correlation_id":"c-9"},"data":{}}"#);
        assert_eq!(
            context(&source),
            vec![("correlation_id".to_string(), b"c-9".to_vec())]
        );
        assert!(context(&event(&[], "not json")).is_empty());
        assert!(context(&event(&[], r#"{"metadata":{"correlation_id":7}}"#)).is_empty());
    }

    #[test]
    fn the_correlation_id_comes_from_a_header_before_the_envelope() {
        let both = event(
            &[("ce_correlationid", "ce-1")],
            r#"{"metadata":{"correlation_id":"env"}}"#,
        );
        assert_eq!(both.correlation_id.as_deref(), Some("ce-1"));
        let preferred = event(
            &[("ce_correlationid", "ce-1"), ("correlation_id", "c-1")],
            "",
        );
        assert_eq!(preferred.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(event(&[("correlation_id", "")], "{}").correlation_id, None);
    }
}
