//! From a broker message to the `event` a handler sees: its id and its key.

use sha2::{Digest, Sha256};

use crate::host::Event;
use crate::message::Message;
use crate::registry::{DlqSettings, IdSource, KeySource};

/// Longest event id kept as it is; a longer one (from a header or the
/// payload) is replaced by `sha256:<hex>` of it, so a hostile or careless
/// producer cannot bloat the dedup table, and equal ids stay equal.
pub const MAX_ID_LEN: usize = 256;

/// The event's identity: a replayed dead letter's `weir.replay-id` (see
/// [`super::dlq::REPLAY_ID`]), else the first of `sources` that yields a
/// non-empty id, else the broker position (`<topic>/<partition>/<offset>`,
/// `<stream>/<sequence>`). Malformed payloads or non-UTF-8 headers simply
/// yield nothing. Ids longer than [`MAX_ID_LEN`] bytes, or with a NUL,
/// are digested (see [`cap`]).
///
/// A `weir.replay-id` counts only in the shape a replay of this topic's
/// dead letters gives it: `<id>#replay:<dlq>/<position>`, `dlq` being where
/// the topic's dead letters go. Any other value (a producer's own header)
/// is ignored, so a producer cannot override the manifest's id sources with
/// an id of its choosing (only a replay's namespace, which no other id
/// source can reach unless it yields such ids itself).
pub fn event_id(message: &Message, sources: &[IdSource], dlq: &DlqSettings) -> String {
    let replayed = message
        .header(super::dlq::REPLAY_ID)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|id| id.trim().to_string())
        .filter(|id| id.contains(&format!("#replay:{}/", dlq.destination(&message.topic))));
    if let Some(id) = replayed {
        return cap(id);
    }
    cap(sources
        .iter()
        .find_map(|source| {
            match source {
                IdSource::Header(name) => message
                    .header(name)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(|id| id.trim().to_string()),
                IdSource::JsonPointer(pointer) => json_at(&message.payload, pointer),
            }
            .filter(|id| !id.is_empty())
        })
        .unwrap_or_else(|| message.position.fallback_id(&message.topic)))
}

/// `id` as it is kept: as it is, unless it is longer than [`MAX_ID_LEN`]
/// or holds a NUL (which PostgreSQL's `text` cannot store, and which would
/// fail every lookup and commit batched with it): then `sha256:<hex>` of it.
fn cap(id: String) -> String {
    if id.len() <= MAX_ID_LEN && !id.contains('\0') {
        return id;
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn json_at(payload: &[u8], pointer: &str) -> Option<String> {
    let json = serde_json::from_slice::<serde_json::Value>(payload).ok()?;
    match json.pointer(pointer)? {
        serde_json::Value::String(s) => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The message's key as the manifest's `key` sources choose it: the first
/// source that yields one, else the key the broker gave (the Kafka record
/// key; for NATS the `ce-partitionkey` header, else the subject).
pub fn key(message: &Message, sources: &[KeySource]) -> Option<Vec<u8>> {
    sources
        .iter()
        .find_map(|source| match source {
            KeySource::Header(name) => message
                .header(name)
                .filter(|v| !v.is_empty())
                .map(<[u8]>::to_vec),
            KeySource::JsonPointer(pointer) => {
                json_at(&message.payload, pointer).map(String::into_bytes)
            }
            KeySource::Topic => Some(message.topic.as_bytes().to_vec()),
            KeySource::TopicToken(index) => message
                .topic
                .split('.')
                .nth(index.saturating_sub(1))
                .map(|token| token.as_bytes().to_vec()),
        })
        .or_else(|| message.key.clone())
}

/// Builds the event for delivery attempt `attempt`, moving the message's
/// bytes (no copy).
pub fn to_event(message: Message, id: String, attempt: u32) -> Event {
    let correlation_id = super::correlation::correlation_id(&message.headers, &message.payload);
    Event {
        id,
        topic: message.topic,
        key: message.key,
        payload: message.payload,
        headers: message.headers,
        position: message.position,
        timestamp_ms: message.timestamp_ms,
        attempt,
        correlation_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dead letters of `orders` go to `orders.dlq`.
    fn dlq() -> DlqSettings {
        DlqSettings::default()
    }
    use crate::message::Position;

    fn message(headers: Vec<(&str, &[u8])>) -> Message {
        Message {
            topic: "orders".into(),
            key: Some(vec![0xff, 0x00]),
            payload: vec![1, 2, 3],
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            timestamp_ms: Some(7),
            position: Position::Kafka {
                partition: 2,
                offset: 41,
            },
            scope: 1,
        }
    }

    fn defaults() -> Vec<IdSource> {
        crate::registry::DedupSettings::default().id
    }

    #[test]
    fn id_prefers_ce_id_then_event_id_then_position() {
        let d = defaults();
        assert_eq!(
            event_id(
                &message(vec![("event_id", b"e"), ("ce_id", b"c")]),
                &d,
                &dlq()
            ),
            "c"
        );
        assert_eq!(
            event_id(&message(vec![("event_id", b"e")]), &d, &dlq()),
            "e"
        );
        assert_eq!(event_id(&message(vec![]), &d, &dlq()), "orders/2/41");
        let mut nats = message(vec![]);
        nats.position = Position::JetStream {
            stream: "ORDERS".into(),
            sequence: 9,
            delivered: 1,
        };
        assert_eq!(event_id(&nats, &d, &dlq()), "ORDERS/9");
        // A replayed dead letter's id comes first.
        assert_eq!(
            event_id(
                &message(vec![
                    ("event_id", b"e"),
                    ("weir.replay-id", b"e#replay:orders.dlq/0@1")
                ]),
                &d,
                &dlq()
            ),
            "e#replay:orders.dlq/0@1"
        );
        // A producer's own replay id, in any other shape, is ignored.
        for forged in [&b"chosen-by-producer"[..], b"e#replay:other.dlq/0@1", b""] {
            assert_eq!(
                event_id(
                    &message(vec![("event_id", b"e"), ("weir.replay-id", forged)]),
                    &d,
                    &dlq()
                ),
                "e",
                "{forged:?}"
            );
        }
    }

    #[test]
    fn unusable_id_headers_fall_through() {
        let d = defaults();
        assert_eq!(
            event_id(
                &message(vec![("ce_id", b"\xff\xfe"), ("event_id", b"e")]),
                &d,
                &dlq()
            ),
            "e"
        );
        assert_eq!(
            event_id(&message(vec![("ce_id", b"  ")]), &d, &dlq()),
            "orders/2/41"
        );
    }

    #[test]
    fn overlong_ids_are_digested_consistently() {
        let d = defaults();
        let long = "x".repeat(10_000);
        let id = event_id(&message(vec![("ce_id", long.as_bytes())]), &d, &dlq());
        assert!(id.starts_with("sha256:") && id.len() == 7 + 64, "{id}");
        assert_eq!(
            id,
            event_id(&message(vec![("ce_id", long.as_bytes())]), &d, &dlq())
        );
        // A NUL (which PostgreSQL cannot store) is digested too, from a
        // header as from a broker position.
        let nul = event_id(&message(vec![("ce_id", b"a\0b")]), &d, &dlq());
        assert!(nul.starts_with("sha256:") && !nul.contains('\0'), "{nul}");
        let mut rabbit = message(vec![]);
        rabbit.position = Position::Rabbit {
            exchange: String::new(),
            routing_key: "q".into(),
            delivery_tag: 1,
            redelivered: false,
            message_id: Some("m\0".into()),
        };
        assert!(event_id(&rabbit, &d, &dlq()).starts_with("sha256:"));
        let edge = "y".repeat(MAX_ID_LEN);
        assert_eq!(
            event_id(&message(vec![("ce_id", edge.as_bytes())]), &d, &dlq()),
            edge
        );
    }

    #[test]
    fn json_pointer_ids() {
        let sources = vec![IdSource::JsonPointer("/meta/id".into())];
        let mut m = message(vec![]);
        m.payload = br#"{"meta": {"id": "abc"}}"#.to_vec();
        assert_eq!(event_id(&m, &sources, &dlq()), "abc");
        m.payload = br#"{"meta": {"id": 42}}"#.to_vec();
        assert_eq!(event_id(&m, &sources, &dlq()), "42");
        m.payload = b"not json".to_vec();
        assert_eq!(event_id(&m, &sources, &dlq()), "orders/2/41");
    }

    #[test]
    fn key_sources_fall_back_to_the_broker_key() {
        let mut m = message(vec![("k", b"from-header")]);
        m.topic = "orders.eu.42".into();
        m.payload = br#"{"customer": "c7"}"#.to_vec();
        assert_eq!(key(&m, &[]), Some(vec![0xff, 0x00]));
        assert_eq!(
            key(&m, &[KeySource::Header("k".into())]),
            Some(b"from-header".to_vec())
        );
        assert_eq!(
            key(&m, &[KeySource::JsonPointer("/customer".into())]),
            Some(b"c7".to_vec())
        );
        assert_eq!(key(&m, &[KeySource::TopicToken(3)]), Some(b"42".to_vec()));
        assert_eq!(key(&m, &[KeySource::Topic]), Some(b"orders.eu.42".to_vec()));
        assert_eq!(
            key(
                &m,
                &[
                    KeySource::Header("missing".into()),
                    KeySource::TopicToken(9)
                ]
            ),
            Some(vec![0xff, 0x00])
        );
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
