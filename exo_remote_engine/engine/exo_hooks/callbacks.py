"""Hook on ``exo.helpers.AsyncCallbackSystem.trigger_all`` (an exo bug fix, every node).

exo hands one list object to every ``on_token`` callback, and with the TUI on, the TUI's
buffer extends that very list while the API's queue still holds it: a fast engine's tokens
then reach the client twice. Each callback now gets its own copy of list arguments. This
changes local models too (a copy per callback per token, nothing else).
"""

from __future__ import annotations

from typing import Any

from exo_remote_engine.engine.exo_hooks.plan import Needs, Patch, Target

HELPERS = "exo.helpers"


def trigger_all(original: Any, self: Any, *args: Any) -> None:
    for callback in list(self.callbacks.values()):
        callback.set(*(list(a) if isinstance(a, list) else a for a in args))


NEEDS = [
    Needs(Target(HELPERS, "AsyncCallbackSystem"), instance_attrs=("callbacks",)),
    Needs(Target(HELPERS, "set", owner="AsyncCallback")),
]
PATCHES = [Patch(Target(HELPERS, "trigger_all", owner="AsyncCallbackSystem"), trigger_all)]
