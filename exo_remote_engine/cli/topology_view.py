"""``exo-remote topology``: an exo cluster's nodes as boxes, remote nodes with their sidecar's state.

exo's ``GET /v1/topology`` is fetched with urllib (the engine side stays light); every remote
node (``model`` = ``remote LLM``, ``chip`` = ``sidecar host:port: ...``) has its sidecar asked directly for health and
models. :func:`render_topology` is pure, so it can be tested without a network.

This module is the command; fetching and probing are
:mod:`~exo_remote_engine.cli.topology_probe`, drawing :mod:`~exo_remote_engine.cli.topology_render`
(both re-exported here).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from typing import TextIO

from exo_remote_engine.cli.topology_probe import (
    DEFAULT_API,
    NOT_PROBED,
    NOT_SERVING,
    SERVING,
    UNREACHABLE,
    SidecarInfo,
    TopologyError,
    collect_sidecars,
    fetch_topology,
    positive_seconds,
)
from exo_remote_engine.cli.topology_render import render_topology
from exo_remote_engine.engine.connection.target import SidecarTarget

__all__ = [
    "DEFAULT_API",
    "NOT_PROBED",
    "NOT_SERVING",
    "SERVING",
    "UNREACHABLE",
    "SidecarInfo",
    "TopologyError",
    "collect_sidecars",
    "fetch_topology",
    "positive_seconds",
    "render_topology",
    "run",
    "stream_can_draw",
]


def stream_can_draw(stream: TextIO) -> bool:
    """Whether ``stream``'s encoding has the box-drawing characters."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "┌─┐│└┘●○·—…▶".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def run(
    api: str,
    timeout_s: float,
    base: SidecarTarget,
    *,
    ascii_only: bool = False,
    width: int | None = None,
    out: TextIO | None = None,
) -> int:
    """Fetch, probe, draw. 0 when exo answered (whatever the sidecars said), 1 when it did not."""
    out = out or sys.stdout
    try:
        topology = fetch_topology(api, timeout_s)
    except TopologyError as exc:
        print(f"exo-remote: {exc}", file=sys.stderr)
        return 1
    sidecars = asyncio.run(collect_sidecars(topology, api, base, timeout_s))
    width = width or shutil.get_terminal_size((100, 24)).columns
    ascii_only = ascii_only or not stream_can_draw(out)
    print(render_topology(topology, sidecars, api, width=width, ascii_only=ascii_only), file=out)
    return 0
