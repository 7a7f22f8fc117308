"""A Python handler that misbehaves on request, for the integration tests.

The `unruly.do` header says what to do:

- `raise`: an uncaught ValueError (the SDK logs it, Weir retries it)
- `loop`: never returns (the timeout ends the call)
- `print:<text>`: prints `<text>` to stdout and succeeds
- `big-state`: stores a 2 MiB value (over the limit: HostError)
- `describe`: logs one record `describe` with fields `broker` and the
  position's fields (`partition`, `offset`; `stream`, `sequence`,
  `delivered`; …) and succeeds
- `permanent:<category>`, `retryable:<category>`,
  `retry-after:<ms>:<category>`: fails so, with that category
- anything else: succeeds
"""

import dataclasses

import weir


@weir.handler
def handle(event: weir.Event) -> None:
    do = event.header_str("unruly.do") or ""
    if do == "raise":
        raise ValueError("boom")
    if do == "loop":
        while True:
            pass
    if do.startswith("print:"):
        print(do[len("print:"):])
        return
    if do == "big-state":
        weir.state.set("big", b"x" * (2 << 20))
    if do == "describe":
        weir.log.info("describe", broker=event.broker, **dataclasses.asdict(event.position))
    kind, _, rest = do.partition(":")
    if kind == "permanent":
        raise weir.Permanent("unruly asked for a permanent failure", category=rest or None)
    if kind == "retryable":
        raise weir.Retryable("unruly asked for a retry", category=rest or None)
    if kind == "retry-after":
        delay, _, category = rest.partition(":")
        raise weir.Retryable("unruly asked for a retry later", delay_ms=int(delay), category=category or None)


WitWorld = weir.WitWorld
