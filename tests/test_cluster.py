"""ClusterView's answers about peers that joined the topology, on a controlled clock."""

from __future__ import annotations

from exo_remote_engine.engine.cluster import ADDON_GRACE_S, ClusterView


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_joining_peer_is_awaited_then_reported_without_the_addon_unless_it_announces() -> None:
    clock = Clock()
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
    view = ClusterView("r", clock=Clock())
    assert view.absorb('{"type": "node_status", "node_id": "d"}') is None
    assert view.absorb("not json") is None
    assert view.nodes_not_yet_announced(["r"]) == []
