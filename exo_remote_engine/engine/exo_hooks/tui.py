"""Hooks for exo's own screen, the TUI (every add-on node).

* ``exo.helpers.AsyncCallbackSystem.trigger_all`` (an exo bug the TUI triggers): exo hands
  one list object to every ``on_token`` callback, and with the TUI on, the TUI's buffer
  extends that very list while the API's queue still holds it, so a fast engine's tokens
  reached the client twice. Each callback now gets its own copy of list arguments (local
  models too: a copy per callback per token, nothing else).
* ``TopologyViz.update_prompt``: for a remote model exo's prompt is the add-on's envelope
  (``exo-remote/v1 {"messages": ...}``); the prompt panel shows the last user message, as
  it shows the user's text for local models.
* ``TopologyViz._generate_main_layout``: under a remote node's entry on exo's ring (its
  label, TFLOPS and layer range), one line per host of a several-host sidecar target with
  its health, as ``exo-remote topology`` draws them (moved left when the entry is near
  the right edge of exo's 100-column canvas, as exo moves its own). exo places each entry by its own
  geometry; the hook draws once more with marker characters in the node's label to learn
  where exo put it, rather than re-deriving exo's arithmetic.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from exo_remote_engine.engine.connection.client import HOST_SERVING
from exo_remote_engine.engine.exo_hooks.plan import Needs, Patch, Target
from exo_remote_engine.engine.exo_hooks.state import STATE
from exo_remote_engine.engine.tokenizer import ENVELOPE_MARKER, PromptEnvelope

HELPERS = "exo.helpers"
VIZ = "exo.viz.topology_viz"
# Private-use code points marking where exo draws a node's label: node k, character j.
_MARK_BASE = 0xF0000
_MARK_SPAN = 256
_CANVAS_W, _CANVAS_H = 100, 48  # exo's ring canvas
_INFO_LINES = 3  # exo's entry per node: "label NGB", "NTFLOPS", "[start-end]"


def trigger_all(original: Any, self: Any, *args: Any) -> None:
    for callback in list(self.callbacks.values()):
        callback.set(*(list(a) if isinstance(a, list) else a for a in args))


def prompt_text(prompt: Any) -> Any:
    """What the prompt panel shows: the last user message of an envelope, else the prompt."""
    if not isinstance(prompt, str) or not prompt.startswith(ENVELOPE_MARKER):
        return prompt
    try:
        return PromptEnvelope.loads(prompt).last_user_text()
    except ValueError:
        return "(prompt not readable)"


def update_prompt(original: Any, self: Any, request_id: str, prompt: str | None = None) -> None:
    original(self, request_id, prompt_text(prompt))


def host_lines(hosts: Mapping[str, str]) -> list[str]:
    """A node's sidecar hosts as ``exo-remote topology`` lists them."""
    up = sum(1 for status in hosts.values() if status == HOST_SERVING)
    lines = [f"{up}/{len(hosts)} sidecar hosts serving:"]
    lines += [f" {'●' if s == HOST_SERVING else '○'} {_printable(a)} {_printable(s)}" for a, s in hosts.items()]
    return lines


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def main_layout(original: Any, self: Any) -> str:
    drawn: str = original(self)
    view = STATE.view
    if view is None:
        return drawn
    hosts = {
        p.node_id: view.peers[p.node_id].sidecar_hosts
        for p in self.partitions
        if p.node_id in view.peers and view.peers[p.node_id].sidecar_hosts and p.node_id in self.topology.nodes
    }
    if not hosts:
        return drawn
    corners = _label_corners(original, self, list(hosts))
    rows = drawn.split("\n")
    for k, node_id in enumerate(hosts):
        if k not in corners:
            continue
        row, col = corners[k]
        lines = host_lines(hosts[node_id])
        # Under the entry; moved left as far as needed to fit exo's canvas, as exo moves its own.
        col = max(0, min(col, _CANVAS_W - max(len(line) for line in lines)))
        for i, line in enumerate(lines):
            y = row + _INFO_LINES + i
            if 0 <= y < len(rows):
                text = line[: _CANVAS_W - col]
                cells = rows[y].ljust(col + len(text))
                rows[y] = cells[:col] + text + cells[col + len(text) :]
    return "\n".join(rows)


def _label_corners(original: Any, viz: Any, node_ids: list[str]) -> dict[int, tuple[int, int]]:
    """(row, column) where exo draws the first character of each node's label: exo's own
    drawing, done again on a copy of the topology whose labels are marker characters of
    the same length (so exo places every entry exactly as it did)."""
    real = viz.topology
    marked = copy.copy(real)
    marked.nodes = dict(real.nodes)
    for k, node_id in enumerate(node_ids):
        caps = copy.copy(real.nodes[node_id])
        length = max(1, min(len(str(caps.model)), _MARK_SPAN))
        caps.model = "".join(chr(_MARK_BASE + k * _MARK_SPAN + j) for j in range(length))
        marked.nodes[node_id] = caps
    viz.topology = marked
    try:
        drawing: str = original(viz)
    finally:
        viz.topology = real
    corners: dict[int, tuple[int, int]] = {}
    for y, row in enumerate(drawing.split("\n")[:_CANVAS_H]):
        for x, char in enumerate(row):
            offset = ord(char) - _MARK_BASE
            if 0 <= offset < len(node_ids) * _MARK_SPAN:
                k, j = divmod(offset, _MARK_SPAN)
                corners.setdefault(k, (y, x - j))  # any surviving character locates the label
    return corners


NEEDS = [
    Needs(Target(HELPERS, "AsyncCallbackSystem"), instance_attrs=("callbacks",)),
    Needs(Target(HELPERS, "set", owner="AsyncCallback")),
    Needs(Target(VIZ, "TopologyViz"), instance_attrs=("topology", "partitions")),
]
PATCHES = [
    Patch(Target(HELPERS, "trigger_all", owner="AsyncCallbackSystem"), trigger_all),
    Patch(Target(VIZ, "update_prompt", owner="TopologyViz"), update_prompt, ("request_id", "prompt")),
    Patch(Target(VIZ, "_generate_main_layout", owner="TopologyViz"), main_layout),
]
