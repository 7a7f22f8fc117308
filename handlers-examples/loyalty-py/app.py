"""Loyalty points, in Python: order events in, points per customer kept in
Weir's state, a points event out for every change.

For every order event (`event_type`, `aggregate_id`, `data.amount_cents`;
the message key is the customer):

- `OrderPlaced` earns `points_per_euro` points per whole euro. The order's
  points are kept under `order/<id>`, the customer's balance under
  `customer/<key>`, and a points event goes to `output_topic`.
- `OrderCancelled` takes the order's points back (and emits the change).
- `OrderPaid` / `OrderShipped` only check that the order is known.
- An event about an order not placed yet is *retryable* (category
  `not-found`): its `OrderPlaced` may still be on its way under another key.
  After the manifest's last attempt it is dead-lettered.
- Malformed JSON or a missing field (category `validation`), an unknown
  `event_type` (`schema-mismatch`) or a bad `points_per_euro` setting
  (`configuration`) is permanent: dead-lettered at once.

The state writes, the dedup mark and the emitted event commit in one
transaction, so a redelivered event never earns points twice. The same
handler is written in Rust (handlers-examples/loyalty) and JavaScript
(handlers-examples/loyalty-js); all three behave identically.
"""

import weir

VALIDATION = weir.Category.VALIDATION


def not_placed(order_id: str) -> weir.Retryable:
    return weir.Retryable(f"order {order_id} is not placed yet", category=weir.Category.NOT_FOUND)


def balance_of(customer: str) -> int:
    return weir.state.get_json(f"customer/{customer}", {"points": 0})["points"]


@weir.handler
def handle(event: weir.Event) -> None:
    order = event.json()
    if not isinstance(order, dict):
        raise weir.Permanent("an order event must be a JSON object", category=VALIDATION)
    kind = order.get("event_type")
    order_id = order.get("aggregate_id")
    if not isinstance(kind, str) or not isinstance(order_id, str) or not order_id:
        raise weir.Permanent("event_type and aggregate_id must be non-empty strings", category=VALIDATION)
    customer = event.key_str() or "anonymous"
    order_key = f"order/{order_id}"

    if kind == "OrderPlaced":
        amount = (order.get("data") or {}).get("amount_cents")
        if not isinstance(amount, int) or amount < 0:
            raise weir.Permanent("data.amount_cents must be a non-negative integer", category=VALIDATION)
        points = amount // 100 * weir.config.get_int("points_per_euro", 1)
        weir.state.set_json(order_key, {"customer": customer, "points": points})
        change = points
    elif kind == "OrderCancelled":
        placed = weir.state.get_json(order_key)
        if placed is None:
            raise not_placed(order_id)
        weir.state.delete(order_key)
        customer, change = placed["customer"], -placed["points"]
    elif kind in ("OrderPaid", "OrderShipped"):
        if weir.state.get(order_key) is None:
            raise not_placed(order_id)
        weir.log.debug("order progressed", order_id=order_id, event_type=kind)
        return
    else:
        raise weir.Permanent(f"unknown event_type {kind!r}", category=weir.Category.SCHEMA_MISMATCH)

    balance = balance_of(customer) + change
    weir.state.set_json(f"customer/{customer}", {"points": balance})
    weir.emit(
        weir.config.get("output_topic", "points"),
        {"customer": customer, "order": order_id, "change": change, "balance": balance},
        key=customer,
    )
    weir.log.info("points updated", customer=customer, order_id=order_id, change=change, balance=balance)


# The component's export: componentize-py looks for `WitWorld` in this module.
WitWorld = weir.WitWorld
