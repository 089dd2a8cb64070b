"""Add-on nodes talking to each other over exo's opaque-status broadcast: who runs the
add-on and serves what (announcements every 2 s), who waits for a relayed request's
results, and upstream cancellations. The decisions live in
:class:`~exo_remote_engine.engine.cluster.ClusterView`; this module moves the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from typing import Any

from exo_remote_engine.engine.cluster import CANCEL_TYPE, ClusterView
from exo_remote_engine.engine.connection.client import host_status
from exo_remote_engine.engine.exo_hooks.cards import sync_cluster_cards
from exo_remote_engine.engine.exo_hooks.state import STATE
from exo_remote_engine.engine_adapter import RemoteLLMInferenceEngine

log = logging.getLogger("exo_remote_engine.hooks")
ANNOUNCE_EVERY_S = 2.0
HOST_CHECK_S = 1.0  # each sidecar host's health, asked before an announcement, at most this long
REPLY_TO_TYPE = "exo_remote_reply_to"
REPLY_WAIT_S = 8.0
MAX_REPLY_NOTES = 10_000


def announcement(node: Any) -> str:
    engine = node.inference_engine
    models: dict[str, str] = {}
    sidecar = None
    hosts: dict[str, str] = {}
    if isinstance(engine, RemoteLLMInferenceEngine):
        models = {k: m.alias for k, m in engine.catalog.models.items() if m.ready}
        sidecar = engine.target.address
        hosts = {a: host_status(r) for a, r in engine.client.hosts_seen.items()}
    peers = (p.id() for p in node.peers)
    return ClusterView.announcement(node.id, engine.__class__.__name__, models, sidecar, peers, hosts)


async def check_sidecar_hosts(node: Any) -> None:
    """Each host of a several-host sidecar target, asked for its health (what
    ``/v1/topology`` shows); bounded, so a dead host delays an announcement by at most
    :data:`HOST_CHECK_S`."""
    engine = node.inference_engine
    if isinstance(engine, RemoteLLMInferenceEngine) and engine.target.parsed.several:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(engine.client.host_health(HOST_CHECK_S), HOST_CHECK_S + 0.5)


def reply_note(request_id: str | None, node_id: str) -> str:
    """Tells the serving node who waits for a relayed request's results."""
    return json.dumps({"type": REPLY_TO_TYPE, "request_id": request_id, "node_id": node_id})


async def announce_once(node: Any) -> None:
    await check_sidecar_hosts(node)
    await node.broadcast_opaque_status(request_id="", status=announcement(node))
    view = STATE.view
    if view is None:
        return
    for node_id in view.nodes_without_addon(node.topology.nodes):
        if node_id not in view.warned:
            view.warned.add(node_id)
            print(
                f"exo-remote: WARNING: node {node_id} runs without the exo-remote-engine add-on; "
                "install it there or mixed local/remote requests can be misrouted",
                file=sys.stderr,
                flush=True,
            )


async def announce_forever(node: Any) -> None:
    while True:
        try:
            await announce_once(node)
        except Exception as exc:
            log.warning("announcement failed: %s", exc)
        await asyncio.sleep(ANNOUNCE_EVERY_S)


def on_status(node: Any, status: str) -> None:
    """exo's on_opaque_status callback: absorb the add-on's messages, ignore exo's own."""
    if REPLY_TO_TYPE in status:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            note = json.loads(status)
            if note.get("type") == REPLY_TO_TYPE:
                STATE.reply_to[str(note["request_id"])] = str(note["node_id"])
                if len(STATE.reply_to) > MAX_REPLY_NOTES:  # notes for prompts that never came
                    STATE.reply_to.pop(next(iter(STATE.reply_to)))
                return
    view = STATE.view
    data = view.absorb(status) if view is not None else None
    if data is None:
        return
    if data["type"] == CANCEL_TYPE:
        engine = node.inference_engine
        if isinstance(engine, RemoteLLMInferenceEngine) and isinstance(data.get("request_id"), str):
            engine.cancel(data["request_id"])
        return
    sync_cluster_cards(node)


async def until_peer(node: Any, node_id: str, wait_s: float = REPLY_WAIT_S) -> None:
    """A relayed prompt's results go back by exo's broadcast to peers: a node that just
    (re)started may not have connected back to the relaying node yet, so wait for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while node_id not in {p.id() for p in node.peers}:
        if loop.time() > deadline:
            raise RuntimeError(f"results could not be sent back to node {node_id!r}: not connected to it")
        await node.update_peers()
        await asyncio.sleep(0.25)
