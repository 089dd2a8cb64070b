"""ClusterView's answers about peers and rings, on a controlled clock: pure routing logic,
no exo, no network."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from exo_remote_engine.engine.cluster import ADDON_GRACE_S, REMOTE_NODE_LABEL, STALE_S, ClusterView
from tests.support.clock import FakeClock

REMOTE = "RemoteLLMInferenceEngine"


@dataclass
class Caps:
    """The two DeviceCapabilities fields the ring reads."""

    model: str
    memory: int


def test_a_joining_peer_is_awaited_then_reported_without_the_addon_unless_it_announces() -> None:
    clock = FakeClock(100.0)
    view = ClusterView("r", clock=clock)
    topology = ["r", "d", "e"]
    assert view.nodes_not_yet_announced(topology) == ["d", "e"]
    assert view.nodes_without_addon(topology) == []

    view.absorb(ClusterView.announcement("d", "DummyInferenceEngine", {}, None, peers=["r"]))
    clock.now += ADDON_GRACE_S / 2
    assert view.nodes_not_yet_announced(topology) == ["e"]  # d told us what it serves

    clock.now += ADDON_GRACE_S  # e had its grace: it runs without the add-on
    assert view.nodes_not_yet_announced(topology) == []
    assert view.nodes_without_addon(topology) == ["e"]


def test_ignores_itself_and_unrelated_statuses() -> None:
    view = ClusterView("r", clock=FakeClock(100.0))
    assert view.absorb('{"type": "node_status", "node_id": "d"}') is None
    assert view.absorb("not json") is None
    assert view.nodes_not_yet_announced(["r"]) == []


def announce(view: ClusterView, node: str, models: dict[str, str], *, peers: list[str], engine: str = REMOTE) -> None:
    view.absorb(ClusterView.announcement(node, engine, models, f"{node}-sidecar:50505", peers=peers))


def test_servers_of_lists_fresh_announcers_that_reach_us_sorted() -> None:
    clock = FakeClock(100.0)
    view = ClusterView("a", clock=clock)
    announce(view, "c", {"remote-gpt": "gpt"}, peers=["a"])
    announce(view, "b", {"remote-gpt": "gpt", "remote-claude": "claude"}, peers=["a", "c"])
    announce(view, "x", {"remote-gpt": "gpt"}, peers=["c"])  # its results would not reach a
    assert view.servers_of("remote-gpt") == ["b", "c"]
    assert view.servers_of("remote-claude") == ["b"]
    assert view.servers_of("remote-other") == []
    announce(view, "a", {"remote-gpt": "gpt"}, peers=[])  # the asking node needs no route to itself
    assert view.servers_of("remote-gpt") == ["a", "b", "c"]


def test_servers_of_forgets_silent_nodes_unless_still_in_the_topology_for_a_while() -> None:
    clock = FakeClock(100.0)
    view = ClusterView("a", clock=clock)
    announce(view, "b", {"remote-gpt": "gpt"}, peers=["a"])
    clock.now += STALE_S + 0.5  # three announcements missed
    assert view.servers_of("remote-gpt") == []
    assert view.servers_of("remote-gpt", present=["a", "b"]) == ["b"]  # still connected: kept
    clock.now = 100.0 + ADDON_GRACE_S + 0.5
    assert view.servers_of("remote-gpt", present=["a", "b"]) == []
    announce(view, "b", {"remote-gpt": "gpt"}, peers=["a"])
    assert view.servers_of("remote-gpt") == ["b"]
    view.forget("b")  # it left: what it served is no longer served by it
    assert view.servers_of("remote-gpt", present=["a", "b"]) == []
    assert view.remote_model_ids() == {"remote-gpt": "gpt"}  # but stays known as remote


@pytest.mark.parametrize(("self_id", "expected"), [("r2", "r2"), ("l1", "r1")])
def test_a_remote_models_ring_is_one_serving_node_the_same_on_every_node(self_id: str, expected: str) -> None:
    view = ClusterView(self_id, clock=FakeClock(100.0))
    nodes = {"l1": Caps("laptop", 16), "r1": Caps("Remote LLM via s:1", 0), "r2": Caps("Remote LLM via s:2", 0)}
    for remote in ("r2", "r1"):
        announce(view, remote, {"remote-gpt": "gpt"}, peers=["l1", "r1", "r2"])
    # the asking node when it serves the model, else the serving node with the smallest id
    assert view.ring("remote-gpt", nodes) == [(expected, 1.0)]


def test_a_local_models_ring_is_every_local_node_weighted_by_memory() -> None:
    view = ClusterView("big", clock=FakeClock(100.0))
    announce(view, "r1", {"remote-gpt": "gpt"}, peers=["big"])
    nodes = {
        "big": Caps("workstation", 48),
        "mid": Caps("laptop", 16),
        "tie": Caps("laptop", 16),
        "zero": Caps("phone", 0),  # counted as 1, never a division by zero
        "r1": Caps("server", 8),  # announced the add-on's remote engine
        "r2": Caps(REMOTE_NODE_LABEL, 64),  # described as remote, not yet announced
    }
    ring = view.ring("llama-3.2-1b", nodes)
    assert [n for n, _ in ring] == ["big", "tie", "mid", "zero"]  # memory, then id, descending
    assert [f for _, f in ring] == pytest.approx([48 / 81, 16 / 81, 16 / 81, 1 / 81])
    assert sum(f for _, f in ring) == pytest.approx(1.0)
    assert view.ring("remote-unserved", nodes) == ring  # a remote model nobody serves: exo's way


def test_without_a_model_remote_nodes_join_the_picture_with_no_layers() -> None:
    view = ClusterView("l1", clock=FakeClock(100.0))
    announce(view, "r1", {"remote-gpt": "gpt"}, peers=["l1"])
    nodes = {"l1": Caps("laptop", 8), "r1": Caps("server", 8), "r0": Caps(REMOTE_NODE_LABEL, 8)}
    assert view.ring(None, nodes) == [("l1", 1.0), ("r0", 0.0), ("r1", 0.0)]


def test_a_remote_only_cluster_keeps_exos_ring() -> None:
    view = ClusterView("r1", clock=FakeClock(100.0))
    nodes = {"r1": Caps(REMOTE_NODE_LABEL, 8), "r2": Caps(REMOTE_NODE_LABEL, 24)}
    assert view.ring("llama-3.2-1b", nodes) == [("r2", 0.75), ("r1", 0.25)]
