// Loyalty points, in JavaScript: order events in, points per customer kept
// in Weir's state, a points event out for every change.
//
// For every order event (`event_type`, `aggregate_id`, `data.amount_cents`;
// the message key is the customer):
//
// - `OrderPlaced` earns `points_per_euro` points per whole euro. The order's
//   points are kept under `order/<id>`, the customer's balance under
//   `customer/<key>`, and a points event goes to `output_topic`.
// - `OrderCancelled` takes the order's points back (and emits the change).
// - `OrderPaid` / `OrderShipped` only check that the order is known.
// - An event about an order not placed yet is *retryable* (category
//   `not-found`): its `OrderPlaced` may still be on its way under another
//   key. After the manifest's last attempt it is dead-lettered.
// - Malformed JSON or a missing field (category `validation`), an unknown
//   `event_type` (`schema-mismatch`) or a bad `points_per_euro` setting
//   (`configuration`) is permanent: dead-lettered at once.
//
// The state writes, the dedup mark and the emitted event commit in one
// transaction, so a redelivered event never earns points twice. The same
// handler is written in Rust (handlers-examples/loyalty) and Python
// (handlers-examples/loyalty-py); all three behave identically.
//
// `./weir.js` is the SDK (sdk/js/weir.js): the build copies it beside this
// file, because the component is built from one directory.

import { handler, Category, Permanent, Retryable, state, emit, config, log } from "./weir.js";

const invalid = (reason) => new Permanent(reason, { category: Category.VALIDATION });
const notPlaced = (orderId) =>
  new Retryable(`order ${orderId} is not placed yet`, { category: Category.NOT_FOUND });

function balanceOf(customer) {
  return state.getJson(`customer/${customer}`, { points: 0 }).points;
}

export const handle = handler((event) => {
  const order = event.json();
  if (order === null || typeof order !== "object" || Array.isArray(order)) {
    throw invalid("an order event must be a JSON object");
  }
  const kind = order.event_type;
  const orderId = order.aggregate_id;
  if (typeof kind !== "string" || typeof orderId !== "string" || orderId === "") {
    throw invalid("event_type and aggregate_id must be non-empty strings");
  }
  let customer = event.keyString() ?? "anonymous";
  const orderKey = `order/${orderId}`;
  let change;

  if (kind === "OrderPlaced") {
    const amount = (order.data || {}).amount_cents;
    if (!Number.isInteger(amount) || amount < 0) {
      throw invalid("data.amount_cents must be a non-negative integer");
    }
    const points = Math.floor(amount / 100) * config.getInt("points_per_euro", 1);
    state.setJson(orderKey, { customer, points });
    change = points;
  } else if (kind === "OrderCancelled") {
    const placed = state.getJson(orderKey);
    if (placed === undefined) throw notPlaced(orderId);
    state.delete(orderKey);
    customer = placed.customer;
    change = -placed.points;
  } else if (kind === "OrderPaid" || kind === "OrderShipped") {
    if (state.get(orderKey) === undefined) throw notPlaced(orderId);
    log.debug("order progressed", { order_id: orderId, event_type: kind });
    return;
  } else {
    throw new Permanent(`unknown event_type ${JSON.stringify(kind)}`, { category: Category.SCHEMA_MISMATCH });
  }

  const balance = balanceOf(customer) + change;
  state.setJson(`customer/${customer}`, { points: balance });
  emit(
    config.get("output_topic", "points"),
    { customer, order: orderId, change, balance },
    { key: customer },
  );
  log.info("points updated", { customer, order_id: orderId, change, balance });
});
