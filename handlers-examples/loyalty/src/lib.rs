//! Loyalty points, in Rust: order events in, points per customer kept in
//! Weir's state, a points event out for every change.
//!
//! For every order event (`event_type`, `aggregate_id`, `data.amount_cents`;
//! the message key is the customer):
//!
//! - `OrderPlaced` earns `points_per_euro` points per whole euro. The
//!   order's points are kept under `order/<id>`, the customer's balance
//!   under `customer/<key>`, and a points event goes to `output_topic`.
//! - `OrderCancelled` takes the order's points back (and emits the change).
//! - `OrderPaid` / `OrderShipped` only check that the order is known.
//! - An event about an order not placed yet is *retryable* (category
//!   `not-found`): its `OrderPlaced` may still be on its way under another
//!   key. After the manifest's last attempt it is dead-lettered.
//! - Malformed JSON or a missing field (category `validation`), an unknown
//!   `event_type` (`schema-mismatch`) or a bad `points_per_euro` setting
//!   (`configuration`) is permanent: dead-lettered at once.
//!
//! The same handler is written in Python (`handlers-examples/loyalty-py`)
//! and JavaScript (`handlers-examples/loyalty-js`); all three behave
//! identically, and the integration tests hold them to that.

use serde::{Deserialize, Serialize};
use serde_json::json;
use weir_sdk::{Category, Event, Handler, HandlerError, config, emit, export_handler, state};

/// An order's points, kept under `order/<id>`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Placed {
    /// Who earned them.
    pub customer: String,
    /// How many.
    pub points: i64,
}

/// A customer's balance, kept under `customer/<key>`.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Balance {
    /// Points in total.
    pub points: i64,
}

fn not_placed(order_id: &str) -> HandlerError {
    HandlerError::retryable(format!("order {order_id} is not placed yet"))
        .category(Category::NotFound)
}

fn invalid(reason: &str) -> HandlerError {
    HandlerError::permanent(reason).category(Category::Validation)
}

/// Applies one order event.
///
/// # Errors
///
/// Permanent for malformed events and bad settings; retryable for events
/// about orders not placed yet, or when the state is unavailable.
pub fn apply(event: &Event) -> Result<(), HandlerError> {
    let order: serde_json::Value = event.json()?;
    if !order.is_object() {
        return Err(invalid("an order event must be a JSON object"));
    }
    let (Some(kind), Some(order_id)) = (
        order["event_type"].as_str(),
        order["aggregate_id"].as_str().filter(|id| !id.is_empty()),
    ) else {
        return Err(invalid(
            "event_type and aggregate_id must be non-empty strings",
        ));
    };
    let mut customer = event.key_str().unwrap_or("anonymous").to_string();
    let order_key = format!("order/{order_id}");

    let change = match kind {
        "OrderPlaced" => {
            let amount = order["data"]["amount_cents"].as_i64().filter(|a| *a >= 0);
            let Some(amount) = amount else {
                return Err(invalid("data.amount_cents must be a non-negative integer"));
            };
            let per_euro = match config::get("points_per_euro") {
                None => 1,
                Some(v) => v.trim().parse::<i64>().map_err(|_| {
                    HandlerError::permanent(format!(
                        "config points_per_euro = {v:?} is not an integer"
                    ))
                    .category(Category::Configuration)
                })?,
            };
            let points = amount / 100 * per_euro;
            state::set_json(
                &order_key,
                &Placed {
                    customer: customer.clone(),
                    points,
                },
            )?;
            points
        }
        "OrderCancelled" => {
            let placed: Placed =
                state::get_json(&order_key)?.ok_or_else(|| not_placed(order_id))?;
            state::delete(&order_key)?;
            customer = placed.customer;
            -placed.points
        }
        "OrderPaid" | "OrderShipped" => {
            if state::get(&order_key)?.is_none() {
                return Err(not_placed(order_id));
            }
            weir_sdk::debug!("order progressed"; "order_id" => order_id, "event_type" => kind);
            return Ok(());
        }
        other => {
            return Err(
                HandlerError::permanent(format!("unknown event_type {other:?}"))
                    .category(Category::SchemaMismatch),
            );
        }
    };

    let balance_key = format!("customer/{customer}");
    let mut balance: Balance = state::get_json(&balance_key)?.unwrap_or_default();
    balance.points += change;
    state::set_json(&balance_key, &balance)?;
    emit::to(config::get_or("output_topic", "points"))
        .key(customer.as_bytes())
        .json(&json!({
            "customer": customer,
            "order": order_id,
            "change": change,
            "balance": balance.points,
        }))?
        .send()?;
    weir_sdk::info!(
        "points updated";
        "customer" => customer,
        "order_id" => order_id,
        "change" => change,
        "balance" => balance.points,
    );
    Ok(())
}

/// The handler.
pub struct Loyalty;

impl Handler for Loyalty {
    fn handle(event: Event) -> Result<(), HandlerError> {
        apply(&event)
    }
}

export_handler!(Loyalty);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(customer: &str, kind: &str, order: &str, amount: i64) -> Event {
        let payload = format!(
            r#"{{"event_type":"{kind}","aggregate_id":"{order}","data":{{"amount_cents":{amount}}}}}"#
        );
        Event::new("orders", payload).with_key(customer)
    }

    #[test]
    fn placing_earns_and_cancelling_returns_points() {
        state::clear();
        config::clear_for_test();
        emit::take_sent();
        config::set_for_test("points_per_euro", "2");
        apply(&event("c-1", "OrderPlaced", "o-1", 1999)).expect("placed");
        apply(&event("c-1", "OrderPaid", "o-1", 0)).expect("paid");
        // Cancelled under another key: the points go back to the placer.
        apply(&event("c-2", "OrderCancelled", "o-1", 0)).expect("cancelled");
        let balance: Option<Balance> = state::get_json("customer/c-1").expect("state");
        assert_eq!(balance, Some(Balance { points: 0 }));
        assert_eq!(state::get("order/o-1").expect("state"), None);
        let sent = emit::take_sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].topic, "points");
        let first: serde_json::Value = serde_json::from_slice(&sent[0].payload).expect("json");
        assert_eq!(first["change"], 38);
        let second: serde_json::Value = serde_json::from_slice(&sent[1].payload).expect("json");
        assert_eq!(second["change"], -38);
        assert_eq!(second["balance"], 0);
    }

    #[test]
    fn unknown_orders_are_retryable_and_malformed_events_permanent() {
        state::clear();
        let category = |result: Result<(), HandlerError>| {
            result.map_err(|err| (err.is_permanent(), err.category))
        };
        let paid = apply(&event("c-1", "OrderPaid", "nope", 0));
        assert_eq!(category(paid), Err((false, Some(Category::NotFound))));
        let bad = apply(&Event::new("orders", "{not json"));
        assert_eq!(category(bad), Err((true, Some(Category::Validation))));
        let unknown = apply(&event("c-1", "OrderLost", "o-1", 0));
        assert_eq!(
            category(unknown),
            Err((true, Some(Category::SchemaMismatch)))
        );
        config::set_for_test("points_per_euro", "lots");
        let misconfigured = apply(&event("c-1", "OrderPlaced", "o-2", 100));
        config::clear_for_test();
        assert_eq!(
            category(misconfigured),
            Err((true, Some(Category::Configuration)))
        );
    }
}
