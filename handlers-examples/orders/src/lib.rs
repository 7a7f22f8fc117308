//! Validates order events in the seed envelope and logs the accepted ones.
//!
//! Malformed events (bad JSON, missing fields: category `validation`; an
//! unknown `event_type`: category `schema-mismatch`) are rejected as
//! permanent errors, so Weir dead-letters them at once.

use serde::Deserialize;
use weir_sdk::{Category, Event, Handler, HandlerError, export_handler, log};

/// The envelope every order event travels in.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Envelope {
    /// Producer-assigned unique id.
    pub event_id: String,
    /// What happened.
    pub event_type: String,
    /// The order this event belongs to.
    pub aggregate_id: String,
    /// When it happened (RFC 3339).
    pub timestamp: String,
    /// Event-specific data.
    pub data: serde_json::Value,
    /// Tracing metadata.
    pub metadata: Metadata,
}

/// Envelope metadata.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Metadata {
    /// Ties together the events of one business flow.
    pub correlation_id: String,
}

/// Event types this handler understands.
pub const KNOWN_TYPES: &[&str] = &["OrderPlaced", "OrderPaid", "OrderShipped", "OrderCancelled"];

/// Parses and validates one order event.
///
/// # Errors
///
/// A permanent error saying what is wrong with the event.
pub fn parse(event: &Event) -> Result<Envelope, HandlerError> {
    let envelope: Envelope = event.json()?;
    if !KNOWN_TYPES.contains(&envelope.event_type.as_str()) {
        return Err(HandlerError::permanent(format!(
            "unknown event_type {:?}; expected one of {}",
            envelope.event_type,
            KNOWN_TYPES.join(", ")
        ))
        .category(Category::SchemaMismatch));
    }
    if envelope.aggregate_id.trim().is_empty() {
        return Err(HandlerError::permanent("aggregate_id is empty").category(Category::Validation));
    }
    Ok(envelope)
}

/// The order validator.
pub struct Orders;

impl Handler for Orders {
    fn handle(event: Event) -> Result<(), HandlerError> {
        let order = parse(&event)?;
        log::info(
            "order event accepted",
            &[
                ("event_id", &order.event_id),
                ("event_type", &order.event_type),
                ("aggregate_id", &order.aggregate_id),
                ("correlation_id", &order.metadata.correlation_id),
            ],
        );
        Ok(())
    }
}

export_handler!(Orders);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload: &str) -> Event {
        Event::new("orders", payload.as_bytes().to_vec())
    }

    const GOOD: &str = r#"{"event_id":"e1","event_type":"OrderPlaced","aggregate_id":"order-1",
        "timestamp":"2026-11-23T10:00:00Z","data":{"amount_cents":1200},
        "metadata":{"correlation_id":"c1"}}"#;

    #[test]
    fn accepts_a_well_formed_order() {
        let order = parse(&event(GOOD)).expect("valid order");
        assert_eq!(order.aggregate_id, "order-1");
        assert_eq!(order.metadata.correlation_id, "c1");
    }

    #[test]
    fn every_known_type_is_accepted() {
        for kind in KNOWN_TYPES {
            let payload = GOOD.replace("OrderPlaced", kind);
            assert_eq!(
                parse(&event(&payload)).map(|o| o.event_type),
                Ok(kind.to_string())
            );
        }
    }

    #[test]
    fn handle_logs_accepted_orders_and_rejects_bad_ones() {
        let _ = log::take_records();
        assert_eq!(Orders::handle(event(GOOD)), Ok(()));
        let records = log::take_records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].level, log::Level::Info);
        assert_eq!(records[0].field("aggregate_id"), Some("order-1"));
        assert_eq!(records[0].field("event_type"), Some("OrderPlaced"));
        assert_eq!(records[0].field("correlation_id"), Some("c1"));

        let rejected = Orders::handle(event("not json"));
        assert!(
            rejected.as_ref().is_err_and(HandlerError::is_permanent),
            "{rejected:?}"
        );
        assert!(log::take_records().is_empty());
    }

    #[test]
    fn malformed_orders_are_permanent_errors_saying_why() {
        let cases = [
            ("{", "JSON"),
            (r#"{"event_id":"e1"}"#, "event_type"),
            (
                &GOOD.replace("OrderPlaced", "OrderTeleported"),
                "unknown event_type",
            ),
            (&GOOD.replace("\"order-1\"", "\"  \""), "aggregate_id"),
            (
                &GOOD.replace(r#""metadata":{"correlation_id":"c1"}"#, r#""metadata":{}"#),
                "correlation_id",
            ),
            (
                &GOOD.replace(r#""data":{"amount_cents":1200},"#, ""),
                "missing field `data`",
            ),
            (
                &GOOD.replace(r#""timestamp":"2026-11-23T10:00:00Z","#, ""),
                "missing field `timestamp`",
            ),
            (&GOOD.replace(r#""e1""#, "17"), "expected a string"),
            ("[]", "JSON"),
            ("", "JSON"),
        ];
        for (payload, needle) in cases {
            match parse(&event(payload)) {
                Err(err) if err.is_permanent() => {
                    assert!(err.reason.contains(needle), "{payload}: {err}");
                    let expected = if needle == "unknown event_type" {
                        Category::SchemaMismatch
                    } else {
                        Category::Validation
                    };
                    assert_eq!(err.category, Some(expected), "{payload}");
                }
                other => panic!("{payload}: expected a permanent error, got {other:?}"),
            }
        }
    }
}
