"""A Python handler that misbehaves on request, for the integration tests.

The `unruly.do` header says what to do:

- `raise`: an uncaught ValueError (the SDK logs it, Weir retries it)
- `loop`: never returns (the timeout ends the call)
- `print:<text>`: prints `<text>` to stdout and succeeds
- `big-state`: stores a 2 MiB value (over the limit: HostError)
- anything else: succeeds
"""

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


WitWorld = weir.WitWorld
