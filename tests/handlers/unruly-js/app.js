// A JavaScript handler that misbehaves on request, for the integration
// tests. The `unruly.do` header says what to do:
//
// - `raise`: an uncaught Error (the SDK logs it, Weir retries it)
// - `loop`: never returns (the timeout ends the call)
// - `print:<text>`: console.log(`<text>`) and succeeds
// - `big-state`: stores a 2 MiB value (over the limit: HostError)
// - `describe`: logs one record `describe` with fields `broker` and the
//   position's fields (`partition`, `offset`; `stream`, `sequence`,
//   `delivered`; …) and succeeds
// - `permanent:<category>`, `retryable:<category>`,
//   `retry-after:<ms>:<category>`: fails so, with that category
// - anything else: succeeds

import { handler, log, state, Permanent, Retryable } from "./weir.js";

export const handle = handler((event) => {
  const todo = event.headerString("unruly.do") ?? "";
  if (todo === "raise") throw new Error("boom");
  if (todo === "loop") {
    for (;;) {
      // spin
    }
  }
  if (todo.startsWith("print:")) {
    console.log(todo.slice("print:".length));
    return;
  }
  if (todo === "big-state") state.set("big", new Uint8Array(2 << 20));
  if (todo === "describe") log.info("describe", { ...event.position, broker: event.broker });
  const [kind, ...rest] = todo.split(":");
  const category = (parts) => parts.join(":") || undefined;
  if (kind === "permanent") {
    throw new Permanent("unruly asked for a permanent failure", { category: category(rest) });
  }
  if (kind === "retryable") {
    throw new Retryable("unruly asked for a retry", { category: category(rest) });
  }
  if (kind === "retry-after") {
    const [delay, ...name] = rest;
    throw new Retryable("unruly asked for a retry later", {
      delayMs: Number(delay),
      category: category(name),
    });
  }
});
