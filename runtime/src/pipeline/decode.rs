//! From a broker message to the `event` a handler sees.

use crate::host::Event;
use crate::registry::IdSource;
use crate::source::Message;

/// The event's identity: the first of `sources` that yields a non-empty id,
/// else `<topic>/<partition>/<offset>`. Malformed payloads or non-UTF-8
/// headers simply yield nothing.
pub fn event_id(message: &Message, sources: &[IdSource]) -> String {
    sources
        .iter()
        .find_map(|source| {
            match source {
                IdSource::Header(name) => message
                    .header(name)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(|id| id.trim().to_string()),
                IdSource::JsonPointer(pointer) => {
                    serde_json::from_slice::<serde_json::Value>(&message.payload)
                        .ok()
                        .and_then(|json| match json.pointer(pointer)? {
                            serde_json::Value::String(s) => Some(s.trim().to_string()),
                            serde_json::Value::Number(n) => Some(n.to_string()),
                            _ => None,
                        })
                }
            }
            .filter(|id| !id.is_empty())
        })
        .unwrap_or_else(|| format!("{}/{}/{}", message.topic, message.partition, message.offset))
}

/// Builds the event for delivery attempt `attempt`, moving the message's
/// bytes (no copy).
pub fn to_event(message: Message, id: String, attempt: u32) -> Event {
    Event {
        id,
        topic: message.topic,
        key: message.key,
        payload: message.payload,
        headers: message.headers,
        partition: message.partition,
        offset: message.offset,
        timestamp_ms: message.timestamp_ms,
        attempt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(headers: Vec<(&str, &[u8])>) -> Message {
        Message {
            topic: "orders".into(),
            partition: 2,
            offset: 41,
            key: Some(vec![0xff, 0x00]),
            payload: vec![1, 2, 3],
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            timestamp_ms: Some(7),
        }
    }

    fn defaults() -> Vec<IdSource> {
        crate::registry::DedupSettings::default().id
    }

    #[test]
    fn id_prefers_ce_id_then_event_id_then_position() {
        let d = defaults();
        assert_eq!(
            event_id(&message(vec![("event_id", b"e"), ("ce_id", b"c")]), &d),
            "c"
        );
        assert_eq!(event_id(&message(vec![("event_id", b"e")]), &d), "e");
        assert_eq!(event_id(&message(vec![]), &d), "orders/2/41");
    }

    #[test]
    fn unusable_id_headers_fall_through() {
        let d = defaults();
        assert_eq!(
            event_id(
                &message(vec![("ce_id", b"\xff\xfe"), ("event_id", b"e")]),
                &d
            ),
            "e"
        );
        assert_eq!(
            event_id(&message(vec![("ce_id", b"  ")]), &d),
            "orders/2/41"
        );
    }

    #[test]
    fn json_pointer_ids() {
        let sources = vec![IdSource::JsonPointer("/meta/id".into())];
        let mut m = message(vec![]);
        m.payload = br#"{"meta": {"id": "abc"}}"#.to_vec();
        assert_eq!(event_id(&m, &sources), "abc");
        m.payload = br#"{"meta": {"id": 42}}"#.to_vec();
        assert_eq!(event_id(&m, &sources), "42");
        m.payload = b"not json".to_vec();
        assert_eq!(event_id(&m, &sources), "orders/2/41");
    }

    #[test]
    fn bytes_pass_through_untouched() {
        let event = to_event(message(vec![("bin", b"\x00\xff")]), "id".into(), 3);
        assert_eq!(event.id, "id");
        assert_eq!(event.key, Some(vec![0xff, 0x00]));
        assert_eq!(event.payload, vec![1, 2, 3]);
        assert_eq!(event.headers, vec![("bin".to_string(), vec![0x00, 0xff])]);
        assert_eq!(event.attempt, 3);
        assert_eq!(event.timestamp_ms, Some(7));
    }
}
