"""The end-to-end benchmark's handler in Python: does nothing and succeeds,
so a run measures what a Python handler costs per message."""

import weir


@weir.handler
def handle(event: weir.Event) -> None:
    pass

# The component's export: componentize-py looks for `WitWorld`.
WitWorld = weir.WitWorld
