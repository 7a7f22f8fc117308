"""{{name}}: a Weir event handler.

Weir calls `handle` once per message from the topics in `{{name}}.toml`.
Return normally when done; raise `weir.Retryable` for a transient failure
(retried with backoff, then dead-lettered) and `weir.Permanent` for an event
that can never succeed (dead-lettered at once). Either takes `category=`
(e.g. `weir.Category.SERVICE_UNAVAILABLE`), which says what kind of failure
it was, for operators counting failures by cause.
"""

import weir


@weir.handler
def handle(event: weir.Event) -> None:
    # Malformed JSON raises weir.Permanent (category "validation"):
    # dead-lettered, not retried.
    message = event.json()
    key = f"seen/{event.key_str() or '-'}"
    # State writes commit with the event's outcome, or not at all.
    seen = weir.state.get_json(key, {"count": 0})
    seen["count"] += 1
    weir.state.set_json(key, seen)
    greeting = weir.config.get("greeting", "hello")
    weir.log.info(f"{greeting}: {message.get('text', '')}", key=key, count=seen["count"])


# The component's export: componentize-py looks for `WitWorld` here.
WitWorld = weir.WitWorld
