//! From a broker message to the `event` a handler sees.

use crate::host::Event;
use crate::source::Message;

/// Headers that carry a producer-assigned event id, in order of preference.
pub const ID_HEADERS: &[&str] = &["ce_id", "event_id"];

/// The event's identity: the first [`ID_HEADERS`] header that is non-empty
/// UTF-8, else `<topic>/<partition>/<offset>`.
pub fn event_id(message: &Message) -> String {
    ID_HEADERS
        .iter()
        .filter_map(|name| message.header(name))
        .filter_map(|value| std::str::from_utf8(value).ok())
        .map(str::trim)
        .find(|id| !id.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| format!("{}/{}/{}", message.topic, message.partition, message.offset))
}

/// Builds the event for delivery attempt `attempt`, moving the message's
/// bytes (no copy).
pub fn to_event(message: Message, attempt: u32) -> Event {
    let id = event_id(&message);
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

    #[test]
    fn id_prefers_ce_id_then_event_id_then_position() {
        assert_eq!(
            event_id(&message(vec![("event_id", b"e"), ("ce_id", b"c")])),
            "c"
        );
        assert_eq!(event_id(&message(vec![("event_id", b"e")])), "e");
        assert_eq!(event_id(&message(vec![])), "orders/2/41");
    }

    #[test]
    fn unusable_id_headers_fall_through() {
        assert_eq!(
            event_id(&message(vec![("ce_id", b"\xff\xfe"), ("event_id", b"e")])),
            "e"
        );
        assert_eq!(event_id(&message(vec![("ce_id", b"  ")])), "orders/2/41");
    }

    #[test]
    fn bytes_pass_through_untouched() {
        let event = to_event(message(vec![("bin", b"\x00\xff")]), 3);
        assert_eq!(event.key, Some(vec![0xff, 0x00]));
        assert_eq!(event.payload, vec![1, 2, 3]);
        assert_eq!(event.headers, vec![("bin".to_string(), vec![0x00, 0xff])]);
        assert_eq!(event.attempt, 3);
        assert_eq!(event.timestamp_ms, Some(7));
    }
}
