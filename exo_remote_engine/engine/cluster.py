"""What an add-on node knows about the cluster: who runs the add-on, which node serves
which remote model, and so which nodes form the ring of a given model.

Classic exo puts every node in every model's ring and never tells its partitioner the
model, so one remote node breaks local models and the other way round. With the add-on
on every node, each node announces itself (an opaque-status broadcast exo already
relays), and the ring of a model is computed the same way everywhere:

* a remote model's ring is one node that serves it: the asking node when it does, else
  the serving node with the smallest id (every node computes the same choice);
* a local model's ring is every node that is not remote, weighted by memory as exo does.

Pure logic, no exo imports: the patches live in :mod:`exo_hooks`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ANNOUNCE_TYPE = "exo_remote_node"
CANCEL_TYPE = "exo_remote_cancel"
# How a remote node describes itself in exo's topology (DeviceCapabilities): a label short
# enough for exo's TUI (it clips at its 100-column canvas), the sidecar in ``chip``, where
# exo shows a device's detail. Nodes of earlier versions said "Remote LLM via host:port".
REMOTE_NODE_LABEL = "remote LLM"
_LEGACY_LABEL_PREFIX = "Remote LLM via "
_CHIP_PREFIX = "sidecar "
ADDON_GRACE_S = 10.0
STALE_S = 6.0  # three missed announcements: the node is gone


@dataclass
class PeerInfo:
    engine_class: str
    models: tuple[str, ...]  # exo ids of the ready remote models the node serves
    aliases: dict[str, str]  # exo id -> sidecar alias
    sidecar: str | None
    seen: float
    peers: frozenset[str] = frozenset()  # whom its results reach (exo broadcasts to peers)
    # Each host behind a several-host sidecar target -> SERVING / NOT SERVING / unreachable.
    sidecar_hosts: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterView:
    self_id: str
    clock: Callable[[], float] = time.monotonic
    peers: dict[str, PeerInfo] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    # --- announcements ------------------------------------------------------------------
    @staticmethod
    def announcement(
        node_id: str,
        engine_class: str,
        models: Mapping[str, str],
        sidecar: str | None,
        peers: Iterable[str] = (),
        sidecar_hosts: Mapping[str, str] | None = None,
    ) -> str:
        """The opaque status a node broadcasts about itself (``models``: exo id -> alias;
        ``sidecar_hosts``: each host of a several-host sidecar target -> its status)."""
        return json.dumps(
            {
                "type": ANNOUNCE_TYPE,
                "node_id": node_id,
                "engine_class": engine_class,
                "models": dict(models),
                "sidecar": sidecar,
                "peers": sorted(peers),
                "sidecar_hosts": dict(sidecar_hosts or {}),
            }
        )

    def absorb(self, status: str) -> dict[str, Any] | None:
        """Take an opaque status; returns it parsed when it was one of ours."""
        try:
            data = json.loads(status)
        except (TypeError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("type") not in (ANNOUNCE_TYPE, CANCEL_TYPE):
            return None
        if data["type"] == ANNOUNCE_TYPE and isinstance(data.get("node_id"), str):
            models = data.get("models") or {}
            self.peers[data["node_id"]] = PeerInfo(
                engine_class=str(data.get("engine_class") or ""),
                models=tuple(sorted(models)),
                aliases={str(k): str(v) for k, v in models.items()},
                sidecar=data.get("sidecar"),
                seen=self.clock(),
                peers=frozenset(str(p) for p in data.get("peers") or ()),
                sidecar_hosts=_string_map(data.get("sidecar_hosts")),
            )
        return data

    def forget(self, node_id: str) -> None:
        """Drop a node's announced state (it left); what it served stays known as remote."""
        peer = self.peers.get(node_id)
        if peer is not None:
            self.peers[node_id] = PeerInfo(peer.engine_class, (), peer.aliases, peer.sidecar, peer.seen)

    # --- questions ----------------------------------------------------------------------
    def servers_of(self, model_id: str, present: Iterable[str] = ()) -> list[str]:
        """Nodes serving ``model_id`` that announced it recently, or are in ``present``
        (the current topology) and announced it at all."""
        here = set(present)
        now = self.clock()
        return sorted(
            n
            for n, p in self.peers.items()
            if model_id in p.models
            and (now - p.seen <= STALE_S or (n in here and now - p.seen <= ADDON_GRACE_S))
            # a server whose results would not reach us (it has not connected back yet) is no use
            and (n == self.self_id or self.self_id in p.peers)
        )

    def remote_model_ids(self) -> dict[str, str]:
        """Every remote model some add-on node serves: exo id -> alias."""
        found: dict[str, str] = {}
        for peer in self.peers.values():
            found.update(peer.aliases)
        return found

    def is_remote(self, node_id: str, description: str | None) -> bool:
        peer = self.peers.get(node_id)
        if peer is not None and peer.engine_class == "RemoteLLMInferenceEngine":
            return True
        return bool(description) and (
            description == REMOTE_NODE_LABEL or str(description).startswith(_LEGACY_LABEL_PREFIX)
        )

    def ring(self, model_id: str | None, nodes: Mapping[str, Any]) -> list[tuple[str, float]]:
        """(node id, fraction) pairs in ring order for ``model_id`` over ``nodes``
        (node id -> DeviceCapabilities-like with ``model`` and ``memory``)."""
        if model_id is not None:
            servers = self.servers_of(model_id, nodes)
            if servers:
                return [(self.self_id if self.self_id in servers else servers[0], 1.0)]
        local = {n: c for n, c in nodes.items() if not self.is_remote(n, getattr(c, "model", None))}
        candidates = local or dict(nodes)  # a remote-only cluster keeps exo's behaviour
        ordered = sorted(candidates.items(), key=lambda x: (max(int(x[1].memory), 1), x[0]), reverse=True)
        total = sum(max(int(c.memory), 1) for _, c in ordered)
        ring: list[tuple[str, float]] = []
        for node_id, caps in ordered:
            ring.append((node_id, max(int(caps.memory), 1) / total))
        if model_id is None:
            # No model: exo is drawing its TUI. Remote nodes join the picture with no layers.
            ring.extend((n, 0.0) for n in sorted(set(nodes) - set(candidates)))
        return ring

    def _silent_for(self, present: Iterable[str]) -> dict[str, float]:
        """Nodes in the topology that never announced: how long each has been seen."""
        now = self.clock()
        return {
            node_id: now - self.first_seen.setdefault(node_id, now)
            for node_id in present
            if node_id not in self.peers and node_id != self.self_id
        }

    def nodes_not_yet_announced(self, present: Iterable[str]) -> list[str]:
        """Nodes in the topology that have not announced yet but are still within the
        grace a starting node gets: what they serve is not known *yet*."""
        return sorted(n for n, age in self._silent_for(present).items() if age <= ADDON_GRACE_S)

    def nodes_without_addon(self, present: Iterable[str]) -> list[str]:
        """Nodes seen for a while that never announced the add-on."""
        return sorted(n for n, age in self._silent_for(present).items() if age > ADDON_GRACE_S)


def _string_map(value: object) -> dict[str, str]:
    """An announced ``{str: str}`` (an older node announces none)."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def remote_chip(sidecar: str, ready: list[str], total: int) -> str:
    """The ``chip`` text of a remote node: its sidecar and the models it has ready."""
    listed = ", ".join(ready[:4]) + (", ..." if len(ready) > 4 else "")
    return f"{_CHIP_PREFIX}{sidecar}: {len(ready)}/{total} models ready ({listed})"


def remote_sidecar(model: object, chip: object) -> tuple[str, str] | None:
    """(sidecar address, what the chip says of its models) of a node's topology entry,
    or None when the node is not a remote one."""
    if not isinstance(model, str) or not isinstance(chip, str):
        return None
    if model.startswith(_LEGACY_LABEL_PREFIX):
        return model[len(_LEGACY_LABEL_PREFIX) :].strip(), chip.removeprefix("remote: ")
    if model == REMOTE_NODE_LABEL and chip.startswith(_CHIP_PREFIX):
        address, _, models = chip[len(_CHIP_PREFIX) :].partition(": ")
        return address.strip(), models
    return None
