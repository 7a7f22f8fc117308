// {{name}}: a Weir event handler.
//
// Weir calls `handle` once per message from the topics in `{{name}}.toml`.
// Return normally when done; throw `Retryable` for a transient failure
// (retried with backoff, then dead-lettered) and `Permanent` for an event
// that can never succeed (dead-lettered at once). Either takes
// `{ category }` (e.g. `Category.SERVICE_UNAVAILABLE`), which says what
// kind of failure it was, for operators counting failures by cause.

import { handler, state, config, log } from "./weir.js";

export const handle = handler((event) => {
  // Malformed JSON throws Permanent (category "validation"): dead-lettered,
  // not retried.
  const message = event.json();
  const key = `seen/${event.keyString() ?? "-"}`;
  // State writes commit with the event's outcome, or not at all.
  const seen = state.getJson(key, { count: 0 });
  seen.count += 1;
  state.setJson(key, seen);
  const greeting = config.get("greeting", "hello");
  log.info(`${greeting}: ${message.text ?? ""}`, { key, count: seen.count });
});
