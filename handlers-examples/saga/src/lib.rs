//! One step of an order saga: take payment for a placed order, or
//! compensate.
//!
//! On `OrderPlaced` the step decides whether payment can be captured (here:
//! the amount is at most config `max_amount_cents`, standing in for a real
//! payment check). It then emits either the follow-up event
//! `PaymentCaptured` (to config `success_topic`, default `payments`) for the
//! next step, or the compensating event `OrderCancelled` with a reason (to
//! config `compensation_topic`, default `orders.cancelled`) so that earlier
//! steps undo their work. Other event types are not this step's business.
//!
//! The decision is recorded in state (`step/<order id>`), and the emitted
//! event goes through Weir's outbox in the same transaction: the event is
//! published if and only if the decision is committed, exactly one decision
//! per order, and each emitted event carries a stable `event_id` so the next
//! step deduplicates republished copies. An order placed again later (same
//! id) gets the recorded decision, not a second payment.

use serde::{Deserialize, Serialize};
use weir_sdk::{Category, Event, Handler, HandlerError, config, emit, export_handler, log, state};

/// The fields of an order event this step needs.
#[derive(Debug, Deserialize)]
pub struct OrderEvent {
    /// What happened.
    pub event_type: String,
    /// The order.
    pub aggregate_id: String,
    /// Event data; `amount_cents` on placed orders.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// The step's decision for one order, as recorded and emitted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    /// The order.
    pub order_id: String,
    /// `PaymentCaptured` or `OrderCancelled`.
    pub outcome: String,
    /// Amount concerned.
    pub amount_cents: u64,
    /// Why the order was cancelled, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Decides, records and emits.
///
/// # Errors
///
/// Permanent for malformed events or a bad configured topic; retryable if
/// the state is unavailable.
pub fn step(event: &Event) -> Result<(), HandlerError> {
    let order: OrderEvent = event.json()?;
    if order.event_type != "OrderPlaced" {
        return Ok(());
    }
    if order.aggregate_id.trim().is_empty() {
        return Err(HandlerError::permanent("aggregate_id is empty").category(Category::Validation));
    }
    let key = format!("step/{}", order.aggregate_id);
    if let Some(earlier) = state::get_json::<Decision>(&key)? {
        log::info(
            "order already decided",
            &[
                ("order_id", &earlier.order_id),
                ("outcome", &earlier.outcome),
            ],
        );
        return Ok(());
    }
    let amount = order.data["amount_cents"].as_u64().ok_or_else(|| {
        HandlerError::permanent("OrderPlaced without data.amount_cents")
            .category(Category::Validation)
    })?;
    let limit: u64 = config::parse("max_amount_cents").unwrap_or(1500);
    let (decision, topic) = if amount <= limit {
        let decision = Decision {
            order_id: order.aggregate_id.clone(),
            outcome: "PaymentCaptured".into(),
            amount_cents: amount,
            reason: None,
        };
        (decision, config::get_or("success_topic", "payments"))
    } else {
        let decision = Decision {
            order_id: order.aggregate_id.clone(),
            outcome: "OrderCancelled".into(),
            amount_cents: amount,
            reason: Some(format!(
                "payment declined: {amount} cents is over the limit of {limit}"
            )),
        };
        (
            decision,
            config::get_or("compensation_topic", "orders.cancelled"),
        )
    };
    state::set_json(&key, &decision)?;
    emit::to(topic)
        .key(order.aggregate_id.as_bytes())
        .header("ce_type", decision.outcome.as_bytes())
        .json(&decision)?
        .send()?;
    log::info(
        "order decided",
        &[
            ("order_id", &decision.order_id),
            ("outcome", &decision.outcome),
        ],
    );
    Ok(())
}

/// The payment step.
pub struct Saga;

impl Handler for Saga {
    fn handle(event: Event) -> Result<(), HandlerError> {
        step(&event)
    }
}

export_handler!(Saga);

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(order: &str, amount: u64) -> Event {
        let payload = format!(
            r#"{{"event_type":"OrderPlaced","aggregate_id":"{order}","data":{{"amount_cents":{amount}}}}}"#
        );
        Event::new("orders", payload.into_bytes())
    }

    fn reset() {
        state::clear();
        config::clear_for_test();
        let _ = emit::take_sent();
        config::set_for_test("max_amount_cents", "1000");
    }

    #[test]
    fn captures_or_compensates_and_decides_once() {
        reset();
        Saga::handle(placed("o1", 900)).expect("captured");
        Saga::handle(placed("o2", 5000)).expect("cancelled");
        let sent = emit::take_sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].topic, "payments");
        assert_eq!(sent[0].key.as_deref(), Some(&b"o1"[..]));
        assert_eq!(sent[1].topic, "orders.cancelled");
        let cancelled: Decision = serde_json::from_slice(&sent[1].payload).expect("json");
        assert_eq!(cancelled.outcome, "OrderCancelled");
        assert!(
            cancelled
                .reason
                .is_some_and(|r| r.contains("over the limit"))
        );

        // Placed again: the recorded decision stands, nothing is emitted.
        Saga::handle(placed("o1", 900)).expect("again");
        assert!(emit::take_sent().is_empty());
    }

    #[test]
    fn other_events_are_ignored_and_bad_ones_rejected() {
        reset();
        let paid = r#"{"event_type":"OrderPaid","aggregate_id":"o1"}"#;
        assert_eq!(
            Saga::handle(Event::new("orders", paid.as_bytes().to_vec())),
            Ok(())
        );
        let no_amount = r#"{"event_type":"OrderPlaced","aggregate_id":"o1"}"#;
        let err = Saga::handle(Event::new("orders", no_amount.as_bytes().to_vec()))
            .expect_err("no amount");
        assert!(err.is_permanent(), "{err}");
        assert_eq!(err.category, Some(Category::Validation));
        assert!(emit::take_sent().is_empty());
    }
}
