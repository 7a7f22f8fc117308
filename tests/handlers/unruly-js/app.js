// A JavaScript handler that misbehaves on request, for the integration
// tests. The `unruly.do` header says what to do:
//
// - `raise`: an uncaught Error (the SDK logs it, Weir retries it)
// - `loop`: never returns (the timeout ends the call)
// - `print:<text>`: console.log(`<text>`) and succeeds
// - `big-state`: stores a 2 MiB value (over the limit: HostError)
// - anything else: succeeds

import { handler, state } from "./weir.js";

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
});
