//! Logs every event it receives: the smallest useful handler.
//!
//! One `info` record per event, message `event`, with fields `id`, `topic`,
//! `broker`, the position in that broker's terms (Kafka: `partition` and
//! `offset`; NATS JetStream: `stream` and `sequence`; other brokers:
//! `position`), `attempt`, the key (`key` when it is UTF-8, `key_hex` when
//! it is not, neither when there is no key) and `payload_bytes`. It never
//! fails.

use weir_sdk::{Event, Handler, HandlerError, Position, export_handler, log};

/// Logs each event's identity, position, key and size.
pub struct LogEvents;

impl Handler for LogEvents {
    fn handle(event: Event) -> Result<(), HandlerError> {
        let mut fields: Vec<(&str, String)> = vec![
            ("id", event.id().to_string()),
            ("topic", event.topic().to_string()),
            ("broker", event.broker().to_string()),
        ];
        match event.position() {
            Position::Kafka { partition, offset } => {
                fields.push(("partition", partition.to_string()));
                fields.push(("offset", offset.to_string()));
            }
            Position::JetStream {
                stream, sequence, ..
            } => {
                fields.push(("stream", stream.clone()));
                fields.push(("sequence", sequence.to_string()));
            }
            other => fields.push(("position", other.to_string())),
        }
        fields.push(("attempt", event.attempt().to_string()));
        match (event.key_str(), event.key()) {
            (Some(text), _) => fields.push(("key", text.to_string())),
            (None, Some(bytes)) => fields.push(("key_hex", hex(bytes))),
            (None, None) => {}
        }
        fields.push(("payload_bytes", event.payload().len().to_string()));
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        log::info("event", &fields);
        Ok(())
    }
}

export_handler!(LogEvents);

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use weir_sdk::log::Level;

    use super::*;

    fn logged(event: Event) -> log::Record {
        let _ = log::take_records();
        assert_eq!(LogEvents::handle(event), Ok(()));
        let mut records = log::take_records();
        assert_eq!(records.len(), 1, "{records:?}");
        records.remove(0)
    }

    #[test]
    fn logs_identity_position_and_size() {
        let record = logged(
            Event::new("orders", b"hello".to_vec())
                .with_key("customer-1")
                .with_position(Position::kafka(3, 17))
                .with_attempt(2),
        );
        assert_eq!(record.level, Level::Info);
        assert_eq!(record.message, "event");
        let fields: Vec<(&str, &str)> = record
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("id", "orders/3/17"),
                ("topic", "orders"),
                ("broker", "kafka"),
                ("partition", "3"),
                ("offset", "17"),
                ("attempt", "2"),
                ("key", "customer-1"),
                ("payload_bytes", "5"),
            ]
        );
    }

    #[test]
    fn a_jetstream_message_is_logged_by_stream_and_sequence() {
        let record = logged(
            Event::new("orders.placed", Vec::new()).with_position(Position::jetstream("ORDERS", 7)),
        );
        assert_eq!(record.field("broker"), Some("jetstream"));
        assert_eq!(record.field("stream"), Some("ORDERS"));
        assert_eq!(record.field("sequence"), Some("7"));
        assert_eq!(record.field("partition"), None);
        assert_eq!(record.field("id"), Some("ORDERS/7"));
    }

    #[test]
    fn binary_keys_are_hex_and_missing_keys_are_left_out() {
        let binary = logged(Event::new("t", Vec::new()).with_key(vec![0xc3, 0x28]));
        assert_eq!(binary.field("key_hex"), Some("c328"));
        assert_eq!(binary.field("key"), None);
        let none = logged(Event::new("t", Vec::new()));
        assert_eq!((none.field("key"), none.field("key_hex")), (None, None));
        assert_eq!(none.field("payload_bytes"), Some("0"));
    }
}
