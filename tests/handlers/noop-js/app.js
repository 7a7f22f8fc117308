// The end-to-end benchmark's handler in JavaScript: does nothing and
// succeeds, so a run measures what a JavaScript handler costs per message.

import { handler } from "./weir.js";

export const handle = handler((_event) => {});
