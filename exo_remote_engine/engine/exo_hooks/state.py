"""What the hooks share while exo runs: one object, so tests can start from a clean one."""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field
from typing import Any

from exo_remote_engine.engine.cluster import ClusterView


@dataclass
class HookState:
    view: ClusterView | None = None  # this node's picture of the add-on cluster
    remote_nodes: list[Any] = field(default_factory=list)  # exo Nodes running the remote engine
    own_remote_ids: set[str] = field(default_factory=set)  # cards this node's sidecar put in exo
    relayed_ids: set[str] = field(default_factory=set)  # cards for remote models peers serve
    reply_to: dict[str, str] = field(default_factory=dict)  # request id -> node that relayed it
    outbox: dict[str, tuple[list[int], bool]] = field(default_factory=dict)  # ordered broadcast
    sending: set[str] = field(default_factory=set)  # request ids whose sender runs
    background: set[asyncio.Task[None]] = field(default_factory=set)


STATE = HookState()
# The model whose ring exo's partitioner computes now (exo never tells it the model).
current_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("exo_remote_model", default=None)


def reset() -> None:
    """Forget everything (tests; a process installs the hooks once)."""
    STATE.__dict__.update(HookState().__dict__)
