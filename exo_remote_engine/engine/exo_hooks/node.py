"""Hooks on ``exo.orchestration.node.Node``.

On every add-on node:

* ``__init__``: a :class:`ClusterView` and the status listener; on a remote node also the
  engine's ``on_token`` listener, to learn when exo ends a request (EOS, max tokens);
* ``start`` / ``update_peers``: announce this node; forget what a departed peer said;
* ``process_prompt``: with model-aware rings the asking node may not be in the ring, so the
  prompt goes to the ring's first node and the tokens come back by exo's broadcast;
* the ring methods run with their shard's model as :data:`~.state.current_model`;
* ``broadcast_result``: exo sends each token from its own task, so a peer (a relaying
  node) could receive them reordered; one sender per request now keeps them in order and
  sends what arrived meanwhile as one batch, with the remote engine's steps expanded into
  plain codec ids (a step is one loop turn carrying a whole delta, only meaningful in its
  own process). This applies to local models too (batching; they have no steps).

On a remote node only, ``get_supported_inference_engines`` / ``select_best_inference_engine``
keep exo from announcing tinygrad and swapping the remote engine out once a peer joins.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from exo_remote_engine.engine import codec
from exo_remote_engine.engine.cluster import ClusterView
from exo_remote_engine.engine.exo_argv import ENGINE_NAME
from exo_remote_engine.engine.exo_hooks import peers
from exo_remote_engine.engine.exo_hooks.plan import Needs, Patch, Target
from exo_remote_engine.engine.exo_hooks.state import STATE, current_model
from exo_remote_engine.engine_adapter import RemoteLLMInferenceEngine

log = logging.getLogger("exo_remote_engine.hooks")
NODE = "exo.orchestration.node"
RELAY_CONNECT_S = 3.0
# Node methods that compute a ring from a shard (their first argument).
RING_METHODS = (
    "_process_prompt",
    "process_tensor",
    "_process_tensor",
    "process_inference_result",
    "forward_prompt",
    "forward_tensor",
    "get_current_shard",
)


def node_init(original: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    original(self, *args, **kwargs)
    STATE.view = ClusterView(self.id)
    self.on_opaque_status.register("exo-remote-cluster").on_next(
        lambda request_id, status: peers.on_status(self, status)
    )
    engine = self.inference_engine
    if isinstance(engine, RemoteLLMInferenceEngine):
        self.on_token.register("exo-remote-engine").on_next(engine.on_token)
        STATE.remote_nodes.append(self)


async def node_start(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    result = await original(self, *args, **kwargs)
    STATE.background.add(asyncio.create_task(peers.announce_forever(self), name="exo-remote-announce"))
    return result


async def update_peers(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """A peer that left (or restarted) may come back as a new process that has not
    connected back to us yet: forget what it announced until it announces again."""
    before = {p.id(): p for p in self.peers}
    changed = await original(self, *args, **kwargs)
    after = {p.id(): p for p in self.peers}
    view = STATE.view
    if view is not None:
        for node_id, handle in before.items():
            if after.get(node_id) is not handle:
                view.forget(node_id)
    return changed


def _shard_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("base_shard", kwargs.get("shard"))


def with_shard_model(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """exo's ring method, computing the ring of its shard's model."""
    token = current_model.set(_shard_of(args, kwargs).model_id)
    try:
        return original(self, *args, **kwargs)
    finally:
        current_model.reset(token)


async def with_shard_model_async(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    token = current_model.set(_shard_of(args, kwargs).model_id)
    try:
        return await original(self, *args, **kwargs)
    finally:
        current_model.reset(token)


async def process_prompt(
    original: Any,
    self: Any,
    base_shard: Any,
    prompt: str,
    request_id: str | None = None,
    inference_state: Any = None,
) -> Any:
    model = base_shard.model_id
    token = current_model.set(model)
    try:
        view = STATE.view
        if view is not None and model in view.remote_model_ids() and not view.servers_of(model, self.topology.nodes):
            served_by = ", ".join(sorted(n for n, p in view.peers.items() if model in p.aliases)) or "no node"
            raise RuntimeError(f"model {model!r} is served by {served_by}, which is not reachable now")
        ring = [p.node_id for p in self.partitioning_strategy.partition(self.topology)]
        log.debug("request_id=%s model=%s ring=%s", request_id, model, ring)
        if ring and self.id not in ring:
            await _relay(self, ring[0], base_shard, prompt, request_id, inference_state)
            return None
        reply_to = STATE.reply_to.pop(request_id or "", None)
        if reply_to and reply_to != self.id:
            await peers.until_peer(self, reply_to)
        # exo's default inference_state is a shared mutable {}: never hand it one to mutate.
        return await original(
            self, base_shard=base_shard, prompt=prompt, request_id=request_id, inference_state=inference_state or {}
        )
    finally:
        current_model.reset(token)


async def _relay(node: Any, target: str, base_shard: Any, prompt: str, request_id: str | None, state: Any) -> None:
    model = base_shard.model_id
    peer = next((p for p in node.peers if p.id() == target), None)
    if peer is None:
        raise RuntimeError(f"model {model!r} is served by node {target!r}, not reachable")
    shard = node.get_current_shard(base_shard=base_shard, index=0)
    try:
        if not await peer.is_connected():
            await asyncio.wait_for(peer.connect(), timeout=RELAY_CONNECT_S)
        # exo's inference_state cannot carry the asking node (its serializer fails on plain
        # values off macOS): a note goes ahead of the prompt.
        await peer.send_opaque_status(request_id=request_id, status=peers.reply_note(request_id, node.id))
        await peer.send_prompt(shard=shard, prompt=prompt, request_id=request_id, inference_state=state)
    except Exception as exc:
        raise RuntimeError(
            f"model {model!r} is served by node {target!r}, which is not reachable now ({type(exc).__name__})"
        ) from exc


async def ordered_broadcast_result(original: Any, self: Any, request_id: str, result: Any, is_finished: bool) -> None:
    if not isinstance(result, list):  # not tokens (exo's image models): as exo does it
        await original(self, request_id=request_id, result=result, is_finished=is_finished)
        return
    tokens, finished = STATE.outbox.get(request_id, ([], False))
    STATE.outbox[request_id] = (tokens + codec.expand(result), finished or is_finished)
    if request_id in STATE.sending:
        return  # the running sender takes these next, after what it is sending now
    STATE.sending.add(request_id)
    try:
        while request_id in STATE.outbox:
            batch, done = STATE.outbox.pop(request_id)
            await original(self, request_id=request_id, result=batch, is_finished=done)
    finally:
        STATE.sending.discard(request_id)


def get_supported_inference_engines(original: Any, self: Any) -> list[str]:
    if isinstance(self.inference_engine, RemoteLLMInferenceEngine):
        return [ENGINE_NAME]  # exo would announce "tinygrad" for any non-MLX engine
    return list(original(self))


async def select_best_inference_engine(original: Any, self: Any) -> None:
    if isinstance(self.inference_engine, RemoteLLMInferenceEngine):
        return  # never swap the remote engine for tinygrad when a peer joins
    await original(self)


def _node(attr: str) -> Target:
    return Target(NODE, attr, owner="Node")


NEEDS = [
    Needs(
        Target(NODE, "Node"),
        instance_attrs=("id", "peers", "topology", "inference_engine", "partitioning_strategy", "on_token"),
    ),
    Needs(_node("on_opaque_status")),
    Needs(_node("broadcast_opaque_status"), params=("request_id", "status")),
    Needs(Target("exo.helpers", "on_next", owner="AsyncCallback")),
    Needs(Target("exo.helpers", "register", owner="AsyncCallbackSystem"), params=("name",)),
    Needs(
        Target("exo.networking.grpc.grpc_peer_handle", "send_prompt", owner="GRPCPeerHandle"),
        params=("shard", "prompt", "request_id", "inference_state"),
    ),
    Needs(
        Target("exo.networking.grpc.grpc_peer_handle", "send_opaque_status", owner="GRPCPeerHandle"),
        params=("request_id", "status"),
    ),
    Needs(_node("get_current_shard"), params=("base_shard", "index")),
    Needs(Target("exo.networking.grpc.grpc_peer_handle", "is_connected", owner="GRPCPeerHandle")),
    Needs(Target("exo.networking.grpc.grpc_peer_handle", "connect", owner="GRPCPeerHandle")),
]


def every_node_patches() -> list[Patch]:
    return [
        Patch(_node("__init__"), node_init),
        Patch(_node("start"), node_start),
        Patch(_node("update_peers"), update_peers),
        Patch(_node("process_prompt"), process_prompt, ("base_shard", "prompt", "request_id", "inference_state")),
        *(Patch(_node(name), with_shard_model, async_hook=with_shard_model_async) for name in RING_METHODS),
        Patch(_node("broadcast_result"), ordered_broadcast_result, ("request_id", "result", "is_finished")),
    ]


REMOTE_PATCHES = [
    Patch(_node("get_supported_inference_engines"), get_supported_inference_engines),
    Patch(_node("select_best_inference_engine"), select_best_inference_engine),
]
