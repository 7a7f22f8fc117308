//! A CQRS projection: order events in, a queryable read model out, kept in
//! Weir's transactional state.
//!
//! For every order event (the seed envelope: `event_type`, `aggregate_id`,
//! `data.amount_cents`) it maintains
//!
//! - `order/<aggregate_id>`: the order's current view (status, amount, how
//!   many events it has seen), and
//! - `customer/<message key>`: per customer, orders placed and their total.
//!
//! Why this is correct without any code for it:
//!
//! - **Exactly once.** The writes commit in the same transaction as the
//!   event's dedup mark, so a redelivered event (after a crash, or a
//!   producer retry) never counts twice, and a failed call leaves no trace.
//! - **No lost updates.** Events of one customer (the message key) run in
//!   order, but events of one *order* may arrive under different keys and
//!   run in parallel. If two calls read-modify-write the same `order/…` key,
//!   the later commit sees the conflict and Weir runs that call again on the
//!   new state.
//!
//! Inspect the read model with `weir state list projection --prefix order/`.

use serde::{Deserialize, Serialize};
use weir_sdk::{Category, Event, Handler, HandlerError, export_handler, state};

/// The fields of an order event this projection needs.
#[derive(Debug, Deserialize)]
pub struct OrderEvent {
    /// `OrderPlaced`, `OrderPaid`, `OrderShipped` or `OrderCancelled`.
    pub event_type: String,
    /// The order.
    pub aggregate_id: String,
    /// Event data; `amount_cents` on placed orders.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// The read model of one order.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct OrderView {
    /// Last status seen: placed, paid, shipped or cancelled.
    pub status: String,
    /// Amount of the order, once placed.
    pub amount_cents: u64,
    /// Events applied to this order.
    pub events: u64,
}

/// The read model of one customer.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CustomerView {
    /// Orders placed.
    pub orders: u64,
    /// Sum of their amounts.
    pub total_cents: u64,
}

/// Applies one event to the read model.
///
/// # Errors
///
/// Permanent for malformed events (category `validation`, or
/// `schema-mismatch` for an unknown `event_type`); retryable if the state
/// is unavailable.
pub fn apply(event: &Event) -> Result<(), HandlerError> {
    let order: OrderEvent = event.json()?;
    if order.aggregate_id.trim().is_empty() {
        return Err(HandlerError::permanent("aggregate_id is empty").category(Category::Validation));
    }
    let status = match order.event_type.as_str() {
        "OrderPlaced" => "placed",
        "OrderPaid" => "paid",
        "OrderShipped" => "shipped",
        "OrderCancelled" => "cancelled",
        other => {
            return Err(
                HandlerError::permanent(format!("unknown event_type {other:?}"))
                    .category(Category::SchemaMismatch),
            );
        }
    };
    let amount = order.data["amount_cents"].as_u64().unwrap_or(0);

    let order_key = format!("order/{}", order.aggregate_id);
    let mut view: OrderView = state::get_json(&order_key)?.unwrap_or_default();
    view.status = status.to_string();
    view.events += 1;
    if status == "placed" {
        view.amount_cents = amount;
    }
    state::set_json(&order_key, &view)?;

    if status == "placed" {
        let customer = event.key_str().unwrap_or("anonymous");
        let customer_key = format!("customer/{customer}");
        let mut totals: CustomerView = state::get_json(&customer_key)?.unwrap_or_default();
        totals.orders += 1;
        totals.total_cents += amount;
        state::set_json(&customer_key, &totals)?;
    }
    Ok(())
}

/// The projection.
pub struct Projection;

impl Handler for Projection {
    fn handle(event: Event) -> Result<(), HandlerError> {
        apply(&event)
    }
}

export_handler!(Projection);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(customer: &str, kind: &str, order: &str, amount: u64) -> Event {
        let payload = format!(
            r#"{{"event_id":"e","event_type":"{kind}","aggregate_id":"{order}","data":{{"amount_cents":{amount}}}}}"#
        );
        Event::new("orders", payload.into_bytes()).with_key(customer)
    }

    #[test]
    fn builds_order_and_customer_views() {
        state::clear();
        Projection::handle(event("c1", "OrderPlaced", "o1", 1200)).expect("placed");
        Projection::handle(event("c1", "OrderPlaced", "o2", 300)).expect("placed");
        Projection::handle(event("c1", "OrderPaid", "o1", 0)).expect("paid");
        let o1: OrderView = state::get_json("order/o1").expect("get").expect("present");
        assert_eq!(
            o1,
            OrderView {
                status: "paid".into(),
                amount_cents: 1200,
                events: 2
            }
        );
        let c1: CustomerView = state::get_json("customer/c1")
            .expect("get")
            .expect("present");
        assert_eq!(
            c1,
            CustomerView {
                orders: 2,
                total_cents: 1500
            }
        );
    }

    #[test]
    fn malformed_events_are_permanent() {
        state::clear();
        for payload in [
            "not json",
            r#"{"event_type":"OrderPlaced","aggregate_id":" "}"#,
        ] {
            let result = Projection::handle(Event::new("orders", payload.as_bytes().to_vec()));
            let err = result.expect_err(payload);
            assert!(err.is_permanent(), "{payload}: {err}");
            assert_eq!(err.category, Some(Category::Validation), "{payload}");
        }
        let unknown = r#"{"event_type":"OrderLost","aggregate_id":"o1"}"#;
        let err = Projection::handle(Event::new("orders", unknown.as_bytes().to_vec()))
            .expect_err("unknown type");
        assert!(err.is_permanent(), "{err}");
        assert_eq!(err.category, Some(Category::SchemaMismatch));
    }
}
