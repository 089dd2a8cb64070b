"""exo's model cards for remote models: the catalog of this node's sidecar, and the remote
models peers announce. exo reads ``exo.models.model_cards`` live (the API, tinychat's
lists, shard building), so entries are added and removed in place; a remote model never
shadows a local card of the same id.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.engine.catalog import pretty_name, repo_for
from exo_remote_engine.engine.connection.client import list_models_blocking
from exo_remote_engine.engine.exo_hooks.state import STATE
from exo_remote_engine.engine_adapter import ENGINE_CLASS_NAME, RemoteLLMInferenceEngine, shared_engine

log = logging.getLogger("exo_remote_engine.hooks")
CATALOG_TTL_S = 10.0


def remote_card(alias: str) -> dict[str, Any]:
    """A remote model's card, with a repo for every engine class so that the API of any
    add-on node (remote or local engine) accepts the model and relays it."""
    from exo.inference.inference_engine import inference_engine_classes

    classes = {*inference_engine_classes.values(), ENGINE_CLASS_NAME}
    return {"layers": 1, "repo": dict.fromkeys(sorted(classes), repo_for(alias))}


def sync_model_cards(engine: RemoteLLMInferenceEngine) -> None:
    """Make exo's model cards match this node's catalog."""
    import exo.models as models

    current = set(engine.catalog.models)
    for exo_id in STATE.own_remote_ids - current:
        models.model_cards.pop(exo_id, None)
        models.pretty_name.pop(exo_id, None)
    for exo_id, model in engine.catalog.models.items():
        if exo_id in models.model_cards and exo_id not in STATE.own_remote_ids:
            log.warning("remote model %s would shadow a local model card; skipped", exo_id)
            continue
        models.model_cards[exo_id] = remote_card(model.alias)
        models.pretty_name[exo_id] = pretty_name(model)
    STATE.own_remote_ids.clear()
    STATE.own_remote_ids.update(current)


def sync_cluster_cards(node: Any) -> None:
    """Cards for what peers serve: remote models on every node; on a remote node, a repo
    of its own class for the local models its peers' engines serve."""
    import exo.models as models

    view = STATE.view
    if view is None:
        return
    for exo_id, alias in view.remote_model_ids().items():
        if exo_id in STATE.own_remote_ids:
            continue  # this node's own remote model: sync_model_cards keeps it
        if exo_id in models.model_cards and exo_id not in STATE.relayed_ids:
            continue  # never shadow a local model card
        models.model_cards[exo_id] = remote_card(alias)
        models.pretty_name.setdefault(exo_id, exo_id)
        STATE.relayed_ids.add(exo_id)
    if node.inference_engine.__class__.__name__ != ENGINE_CLASS_NAME:
        return
    peer_classes = {p.engine_class for p in view.peers.values()} - {ENGINE_CLASS_NAME, ""}
    for card in models.model_cards.values():
        repos = card.get("repo", {})
        if ENGINE_CLASS_NAME not in repos:
            source = next((repos[c] for c in sorted(peer_classes) if c in repos), None)
            if source is not None:
                repos[ENGINE_CLASS_NAME] = source


def forget_cards() -> None:
    """Remove every card the add-on added (with the hooks reverted)."""
    import exo.models as models

    for exo_id in STATE.own_remote_ids | STATE.relayed_ids:
        models.model_cards.pop(exo_id, None)
        models.pretty_name.pop(exo_id, None)


def load_model_cards_at_startup() -> None:
    """Ask the sidecar once before exo builds its API (bounded: 3 s); a sidecar that is
    not up yet only delays the models, never exo's start."""
    engine = shared_engine()
    if engine.catalog.age_s() >= CATALOG_TTL_S:
        try:
            engine.catalog.update(list_models_blocking(engine.target, timeout_s=3.0))
        except RemoteError as exc:
            print(
                f"exo-remote: sidecar at {engine.target.address} not reachable yet ({exc}); "
                "remote models appear once it answers",
                file=sys.stderr,
            )
            return
    sync_model_cards(engine)
    print(f"exo-remote: {engine.catalog.summary(engine.target.address)}", file=sys.stderr)


async def refresh_catalog(engine: RemoteLLMInferenceEngine, force: bool = False) -> None:
    """Re-read the sidecar's models (at most every CATALOG_TTL_S unless forced) and keep
    exo's model cards and this node's topology description in step."""
    if not force and engine.catalog.age_s() < CATALOG_TTL_S:
        return
    try:
        await engine.refresh_catalog(refresh=force)
    except RemoteError as exc:
        log.warning("cannot refresh remote models: %s", exc)
        return
    sync_model_cards(engine)
    from exo.topology import device_capabilities as dc

    for node in STATE.remote_nodes:
        node.device_capabilities = await dc.device_capabilities()


def remote_models_here(api_node: Any) -> dict[str, bool]:
    """Remote model ids this node's API offers -> ready: its own sidecar's (ready or not)
    and those peers announce (announcements carry ready models only)."""
    found: dict[str, bool] = {}
    view = STATE.view
    if view is not None:
        found.update(dict.fromkeys(view.remote_model_ids(), True))
    engine = getattr(api_node, "inference_engine", None)
    if isinstance(engine, RemoteLLMInferenceEngine):
        found.update({k: m.ready for k, m in engine.catalog.models.items()})
    return found
