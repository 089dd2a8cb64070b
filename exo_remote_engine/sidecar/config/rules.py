"""What the operator's config says a caller may do: request limits and per-node rules.

Plain values read from the config and the flags; :mod:`~exo_remote_engine.sidecar.control.policy`
enforces them. They live with the configuration so that reading a config never needs the
control plane.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Limits:
    """What one call, one node and all anonymous callers together may ask of the sidecar."""

    max_request_bytes: int = 16 * 1024 * 1024
    max_messages: int = 2048
    max_tools: int = 128
    max_image_bytes: int = 20 * 1024 * 1024
    require_deadline: bool = True
    max_deadline_s: float = 3600.0
    max_concurrent_streams: int = 256
    # Health answers callers without credentials (probes ask before they have any); these
    # bound what all such callers together can hold, so they never starve a node.
    max_anonymous_health_calls: int = 32
    max_anonymous_watches: int = 8
    max_anonymous_watch_s: float = 300.0


@dataclass(frozen=True)
class NodePolicy:
    """Per-node rules; ``allowed_models`` are glob patterns over aliases (empty = all).
    ``admin`` (``role: admin``): the node may also read the status page off loopback."""

    allowed_models: tuple[str, ...] = ()
    max_concurrent_streams: int | None = None
    admin: bool = False
    # Queueing (control/queueing.py): this node's wait for capacity (None: the config's
    # queue_timeout) and its rank among waiting nodes (higher is served first).
    queue_timeout_s: float | None = None
    priority: int = 0

    def allows(self, alias: str) -> bool:
        return not self.allowed_models or any(fnmatch.fnmatchcase(alias, p) for p in self.allowed_models)
