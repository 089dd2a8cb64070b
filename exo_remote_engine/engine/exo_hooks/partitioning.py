"""Hook on exo's ring partitioner: model-aware rings, on every add-on node.

exo's ``RingMemoryWeightedPartitioningStrategy.partition(topology)`` is never told the
model and puts every node in every ring, so with a remote node in the cluster local models
route layers through it (and remote models through local nodes). With the add-on, the
ring of the model being processed (:data:`~.state.current_model`, set by the Node hooks)
comes from :meth:`ClusterView.ring`: a remote model's ring is one node that serves it; a
local model's ring is the nodes that are not remote, weighted by memory as exo does. This
changes local models too: their rings no longer include remote nodes. Without a view
(before the node exists) exo's own partitioning runs.
"""

from __future__ import annotations

from typing import Any

from exo_remote_engine.engine.exo_hooks.plan import Needs, Patch, Target
from exo_remote_engine.engine.exo_hooks.state import STATE, current_model

RING = "exo.topology.ring_memory_weighted_partitioning_strategy"


def partition(original: Any, self: Any, topology: Any) -> list[Any]:
    view = STATE.view
    if view is None:
        return list(original(self, topology=topology))
    from exo.topology.partitioning_strategy import Partition

    partitions, start = [], 0.0
    for node_id, fraction in view.ring(current_model.get(), topology.nodes):
        end = round(start + fraction, 5)
        partitions.append(Partition(node_id=node_id, start=start, end=end))
        start = end
    return partitions


NEEDS = [Needs(Target("exo.topology.partitioning_strategy", "Partition"), params=("node_id", "start", "end"))]
PATCHES = [Patch(Target(RING, "partition", owner="RingMemoryWeightedPartitioningStrategy"), partition, ("topology",))]
