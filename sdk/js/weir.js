// Write Weir event handlers in JavaScript.
//
// A handler is a function wrapped with `handler()` and exported as `handle`.
// Build it into a WebAssembly component with componentize-js, put the
// `.wasm` beside a manifest naming its topics, and Weir calls it once per
// message, from whichever broker it consumes (components built with this
// SDK use the contract `weir:handler@0.2.0`):
//
//     import { handler, Permanent, Category, log } from "./weir.js";
//
//     export const handle = handler((event) => {
//       const order = event.json();        // malformed JSON: Permanent, category "validation"
//       if (!(order.amount_cents > 0)) {
//         throw new Permanent("an order must have a positive amount", { category: Category.VALIDATION });
//       }
//       log.info("order accepted", { order_id: order.order_id, broker: event.broker });
//     });
//
// Returning normally marks the event done. Throw `Retryable` for a
// transient failure (retried with the manifest's backoff, dead-lettered
// after the last attempt; pass `{ delayMs }` to choose the delay), and
// `Permanent` for an event that can never succeed (dead-lettered at once);
// either takes a `{ category }` (a `Category` value, or a kebab-case name
// of your own) so that operators can count failures by cause. Any other
// exception is logged with its stack and treated as retryable (category
// `internal`), like a panic in a Rust handler.
//
// `event.position` says where the message sits in its broker, in that
// broker's terms (`{ broker: "kafka", partition, offset }`,
// `{ broker: "jetstream", stream, sequence, delivered }`, …), and
// `event.broker` which broker it is.
//
// `state` is a key-value store private to the handler, `emit` sends events
// through an outbox and `config` reads the manifest's `[config]` table.
// State writes and emitted events of one call are committed with the
// event's outcome in one transaction, or discarded if the call fails.

import { log as hostLog } from "weir:handler/log@0.2.0";
import * as hostState from "weir:handler/state@0.2.0";
import { send as hostSend } from "weir:handler/emit@0.2.0";
import * as hostConfig from "weir:handler/config@0.2.0";

/** The version of the `weir:handler` contract this SDK builds components for. */
export const CONTRACT = "weir:handler@0.2.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/**
 * What kind of failure a handler met, so that operators can count and alert
 * on failures by cause (Weir records it with the failure, e.g. in the dead
 * letter). It does not change whether the event is retried. Any other
 * kebab-case string is a category of the handler's own
 * (`"payment-declined"`).
 */
export const Category = Object.freeze({
  /** A dependency did not answer in time. */
  TIMEOUT: "timeout",
  /** A dependency (a database, a service, the state store) is down,
   *  unreachable or refused the connection. */
  SERVICE_UNAVAILABLE: "service-unavailable",
  /** A dependency or quota throttled the handler. */
  RATE_LIMITED: "rate-limited",
  /** The event is malformed or breaks a rule (bad JSON, a missing field). */
  VALIDATION: "validation",
  /** The event is well-formed but of a type, shape or schema version the
   *  handler does not understand. */
  SCHEMA_MISMATCH: "schema-mismatch",
  /** Something the event refers to does not exist (or not yet). */
  NOT_FOUND: "not-found",
  /** The event conflicts with the current state (a duplicate, a concurrent
   *  change, a failed precondition). */
  CONFLICT: "conflict",
  /** Credentials were missing or refused, or lack the permission. */
  UNAUTHORIZED: "unauthorized",
  /** The handler's settings (the manifest's `[config]`) are missing or
   *  invalid. */
  CONFIGURATION: "configuration",
  /** A bug or an unexpected condition in the handler itself. */
  INTERNAL: "internal",
});

const NAMED_CATEGORIES = new Set(Object.values(Category));

/** A transient failure: the event is tried again after a backoff. */
export class Retryable extends Error {
  /**
   * @param {string} reason
   * @param {{ delayMs?: number, category?: string }} [options] `delayMs`
   *   chooses the delay before the next attempt instead of the manifest's
   *   backoff; `category` says what kind of failure it was (see `Category`)
   */
  constructor(reason, options = {}) {
    super(reason);
    this.name = "Retryable";
    this.delayMs = options.delayMs;
    this.category = options.category;
  }
}

/** The event can never succeed: it is dead-lettered without retries. */
export class Permanent extends Error {
  /**
   * @param {string} reason
   * @param {{ category?: string }} [options] what kind of failure it was
   *   (see `Category`)
   */
  constructor(reason, options = {}) {
    super(reason);
    this.name = "Permanent";
    this.category = options.category;
  }
}

/**
 * A state or emit call the host refused. `kind` names the case
 * (`key-too-long`, `value-too-large`, `too-many-writes`,
 * `transaction-too-large`, `unavailable`, `invalid-topic`, `too-large`,
 * `too-many`), `detail` is its value (the limit, or a message).
 */
export class HostError extends Error {
  constructor(kind, detail, message) {
    super(message);
    this.name = "HostError";
    this.kind = kind;
    this.detail = detail;
  }
}

const MESSAGES = {
  "key-too-long": (d) => `state key longer than ${d} bytes`,
  "value-too-large": (d) => `state value larger than ${d} bytes`,
  "too-many-writes": (d) => `more than ${d} state writes in one call`,
  "transaction-too-large": (d) => `writes and emitted events over ${d} bytes in one call`,
  unavailable: (d) => `state unavailable: ${d}`,
  "invalid-topic": (d) => `invalid topic name: ${JSON.stringify(d)}`,
  "too-large": (d) => `emitted event larger than ${d} bytes`,
  "too-many": (d) => `more than ${d} emitted events in one call`,
};

// Host calls that return `result` throw an error whose `payload` is the
// WIT error variant ({ tag, val }); turn it into a HostError.
function host(call) {
  try {
    return call();
  } catch (e) {
    const p = e && e.payload;
    if (p && typeof p.tag === "string") {
      const message = MESSAGES[p.tag] ? MESSAGES[p.tag](p.val) : `host error: ${p.tag}`;
      throw new HostError(p.tag, p.val, message);
    }
    throw e;
  }
}

function bytes(value) {
  if (value === undefined || value === null) return undefined;
  if (value instanceof Uint8Array) return value;
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  return encoder.encode(String(value));
}

function text(value) {
  try {
    return decoder.decode(value);
  } catch {
    return undefined;
  }
}

// The WIT's 64-bit values arrive as BigInt; offsets, sequences, tags and
// millisecond timestamps stay far below 2^53, so plain numbers are exact.
const num = (v) => (v === undefined ? undefined : Number(v));

/**
 * A position from the WIT variant ({ tag, val }) as one plain object whose
 * `broker` names the case, with camelCase fields and numbers:
 * `{ broker: "kafka", partition, offset }`,
 * `{ broker: "jetstream", stream, sequence, delivered }`,
 * `{ broker: "rabbitmq", exchange, routingKey, deliveryTag, redelivered }`,
 * `{ broker: "redis", stream, entryId }`,
 * `{ broker: "sqs", queue, messageId, receiveCount, sequenceNumber }`,
 * `{ broker: "pulsar", ledgerId, entryId, partition, batchIndex, redeliveryCount }`.
 * `wit/handler.wit` documents every field.
 */
function position({ tag, val }) {
  switch (tag) {
    case "kafka":
      return { broker: tag, partition: val.partition, offset: num(val.offset) };
    case "jetstream":
      return { broker: tag, stream: val.stream, sequence: num(val.sequence), delivered: num(val.delivered) };
    case "rabbitmq":
      return {
        broker: tag,
        exchange: val.exchange,
        routingKey: val.routingKey,
        deliveryTag: num(val.deliveryTag),
        redelivered: val.redelivered,
      };
    case "redis":
      return { broker: tag, stream: val.stream, entryId: val.entryId };
    case "sqs":
      return {
        broker: tag,
        queue: val.queue,
        messageId: val.messageId,
        receiveCount: val.receiveCount,
        sequenceNumber: val.sequenceNumber,
      };
    case "pulsar":
      return {
        broker: tag,
        ledgerId: num(val.ledgerId),
        entryId: num(val.entryId),
        partition: val.partition,
        batchIndex: val.batchIndex,
        redeliveryCount: val.redeliveryCount,
      };
    default:
      return { broker: String(tag), ...val };
  }
}

/** One message from the broker. Bytes stay bytes; helpers decode them. */
export class Event {
  constructor(raw) {
    /** Stable identity, used for deduplication. */
    this.id = raw.id;
    /** Where the message was consumed from: a Kafka topic, a NATS subject,
     *  a queue or a stream, in the broker's terms. */
    this.topic = raw.topic;
    /** Message key (Uint8Array, not necessarily UTF-8), or undefined. */
    this.key = raw.key;
    /** Message value (Uint8Array); empty for tombstones. */
    this.payload = raw.payload;
    /** Headers in broker order, as [name, Uint8Array] pairs. */
    this.headers = raw.headers;
    /** Where the message sits in its broker, in its terms; `position.broker`
     *  says which broker (see `position()` above for the shapes). */
    this.position = position(raw.position);
    /** Producer or broker timestamp, ms since the Unix epoch, or undefined. */
    this.timestampMs = num(raw.timestampMs);
    /** 1 on the first call, 2 on the first retry, and so on. */
    this.attempt = raw.attempt;
  }

  /** Which broker delivered the message: `kafka`, `jetstream`, `rabbitmq`,
   *  `redis`, `sqs` or `pulsar`. */
  get broker() {
    return this.position.broker;
  }

  /** The key as text, or undefined when absent or not UTF-8. */
  keyString() {
    return this.key === undefined ? undefined : text(this.key);
  }

  /** The payload as text; throws Permanent (category `validation`) when
   *  it is not UTF-8. */
  text() {
    const t = text(this.payload);
    if (t === undefined) throw new Permanent("payload is not UTF-8", { category: Category.VALIDATION });
    return t;
  }

  /** The payload parsed as JSON; throws Permanent (category `validation`)
   *  when it is not. */
  json() {
    try {
      return JSON.parse(this.text());
    } catch (e) {
      if (e instanceof Permanent) throw e;
      throw new Permanent(`payload is not valid JSON: ${e.message}`, { category: Category.VALIDATION });
    }
  }

  /** The first header called `name` (Uint8Array), or undefined. */
  header(name) {
    const h = this.headers.find(([n]) => n === name);
    return h ? h[1] : undefined;
  }

  /** The first header called `name` as text, or undefined. */
  headerString(name) {
    const v = this.header(name);
    return v === undefined ? undefined : text(v);
  }
}

/** Structured logging into Weir's log; `fields` become key=value pairs.
 *  `console.log` works too: stdout and stderr are captured into the log. */
export const log = Object.fromEntries(
  ["trace", "debug", "info", "warn", "error"].map((level) => [
    level,
    (message, fields = {}) =>
      hostLog(level, String(message), Object.entries(fields).map(([k, v]) => [k, String(v)])),
  ]),
);

/** Durable key-value state, private to the handler. Keys are strings up to
 *  1024 bytes, values up to 1 MiB; limits throw HostError. */
export const state = {
  /** The value under `key` (Uint8Array), or undefined. */
  get: (key) => host(() => hostState.get(key)),
  /** Stores `value` (Uint8Array, or a string stored as UTF-8). */
  set: (key, value) => host(() => hostState.set(key, bytes(value))),
  /** Removes `key`; removing a missing key is not an error. */
  delete: (key) => host(() => hostState.delete(key)),
  /** Entries [key, Uint8Array] whose key starts with `prefix`, in key order,
   *  after `startAfter` when given, at most `limit` (never more than 1000). */
  list: (prefix = "", { startAfter, limit = 1000 } = {}) =>
    host(() => hostState.listPrefix(prefix, startAfter, limit)),
  /** The JSON value under `key`, or `fallback`. */
  getJson(key, fallback = undefined) {
    const raw = this.get(key);
    return raw === undefined ? fallback : JSON.parse(decoder.decode(raw));
  },
  /** Stores `value` as JSON under `key`. */
  setJson(key, value) {
    this.set(key, JSON.stringify(value));
  },
};

/**
 * Sends an event to `topic` if this call succeeds (through the outbox).
 * `payload` may be a Uint8Array, a string, or any other value (sent as
 * JSON). Weir adds an `event_id` header that is the same on every
 * publication of the event.
 *
 * @param {string} topic
 * @param {*} payload
 * @param {{ key?: string | Uint8Array, headers?: Array<[string, string | Uint8Array]> }} [options]
 */
export function emit(topic, payload, options = {}) {
  const body =
    payload instanceof Uint8Array || typeof payload === "string"
      ? bytes(payload)
      : encoder.encode(JSON.stringify(payload));
  const headers = (options.headers || []).map(([n, v]) => [n, bytes(v) || new Uint8Array()]);
  host(() => hostSend(topic, bytes(options.key), body, headers));
}

/** Read-only settings from the manifest's `[config]` table. */
export const config = {
  /** The setting `key`, or `fallback` when unset. */
  get: (key, fallback = undefined) => hostConfig.get(key) ?? fallback,
  /** The setting `key` as an integer, or `fallback` when unset; throws
   *  Permanent (category `configuration`) when set but not an integer. */
  getInt(key, fallback) {
    const v = hostConfig.get(key);
    if (v === undefined) return fallback;
    if (!/^-?\d+$/.test(v.trim())) {
      throw new Permanent(`config ${key} = ${JSON.stringify(v)} is not an integer`, {
        category: Category.CONFIGURATION,
      });
    }
    return Number.parseInt(v, 10);
  },
  /** Every setting, as an object. */
  all: () => Object.fromEntries(hostConfig.getAll()),
};

// A category name as the WIT's `error-category` variant, or undefined.
function witCategory(category) {
  if (category === undefined || category === null) return undefined;
  const name = String(category);
  return NAMED_CATEGORIES.has(name) ? { tag: name } : { tag: "other", val: name };
}

function failure(reason, category) {
  return { reason, category: witCategory(category) };
}

function toWitError(e) {
  if (e instanceof Permanent) return { tag: "permanent", val: failure(e.message, e.category) };
  if (e instanceof Retryable) {
    return e.delayMs === undefined
      ? { tag: "retryable", val: failure(e.message, e.category) }
      : {
          tag: "retry-after",
          val: { delayMs: BigInt(e.delayMs), reason: e.message, category: witCategory(e.category) },
        };
  }
  if (e instanceof HostError) {
    // An unavailable store is transient; a limit is the handler's own doing.
    return e.kind === "unavailable"
      ? { tag: "retryable", val: failure(e.message, Category.SERVICE_UNAVAILABLE) }
      : { tag: "permanent", val: failure(e.message, Category.INTERNAL) };
  }
  const name = (e && e.name) || "Error";
  const reason = `${name}: ${e && e.message !== undefined ? e.message : String(e)}`;
  return { tag: "retryable", val: failure(reason, Category.INTERNAL) };
}

/**
 * Wraps `fn(event)` as the component's `handle` export: it receives an
 * {@link Event}, and its exceptions become the WIT `handler-error`.
 */
export function handler(fn) {
  return function handle(raw) {
    try {
      fn(new Event(raw));
    } catch (e) {
      if (!(e instanceof Retryable || e instanceof Permanent || e instanceof HostError)) {
        hostLog("error", "handler threw", [
          ["exception", String(e)],
          ["stack", String((e && e.stack) || "")],
        ]);
      }
      // A thrown value without a `payload` is itself the error variant.
      throw toWitError(e);
    }
  };
}
