"""Hooks on ``exo.api.chatgpt_api.ChatGPTAPI`` (every add-on node): remote models get
OpenAI-faithful answers and tinychat tells the truth about them; local models keep exo's
handlers, except that their rings no longer include remote nodes (see :mod:`.partitioning`).

* chat completions: remote models (this node's, or relayed to the peer serving them) are
  served by :class:`RemoteChatHandler` under their own ids, ``gpt-*`` included; on a
  remote node an unknown id is a 404 naming the models served (exo would silently answer
  with its default model, and does so for every ``gpt-*`` id);
* ``/v1/models``: ready flag, reason and metadata of remote models; ``/v1/topology``: who
  runs the add-on and serves what;
* ``/initial_models`` (tinychat's first list) and, on a remote node, ``/modelpool``: ready
  remote models are ready at once (exo says "loading" for every model and tinychat can
  drop the update that follows), with neither a download nor a delete button; remote
  models that are not ready are left out (they cannot be downloaded; ``/v1/models`` says why);
* ``POST /download`` and ``DELETE /models/<id>`` of a remote model: a clear 400, since
  there is nothing to download or delete on this node.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.engine.catalog import pretty_name
from exo_remote_engine.engine.exo_hooks.cards import refresh_catalog, remote_models_here
from exo_remote_engine.engine.exo_hooks.plan import Needs, Patch, Target
from exo_remote_engine.engine.exo_hooks.state import STATE
from exo_remote_engine.engine.tinychat import page_with_addon, sidebar_fields
from exo_remote_engine.engine_adapter import ENGINE_CLASS_NAME, RemoteLLMInferenceEngine

CHATGPT_API = "exo.api.chatgpt_api"


def local_remote_engine(api: Any) -> RemoteLLMInferenceEngine | None:
    engine = getattr(api.node, "inference_engine", None)
    return engine if isinstance(engine, RemoteLLMInferenceEngine) else None


def fix_default_model(api: Any, engine: RemoteLLMInferenceEngine) -> None:
    """exo's default (llama-3.2-1b) cannot run on a remote node: use the sidecar's."""
    from exo.models import build_base_shard

    if build_base_shard(api.default_model, api.inference_engine_classname) is None and engine.catalog.default_id:
        api.default_model = engine.catalog.default_id


def api_init(original: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    original(self, *args, **kwargs)
    engine = local_remote_engine(self)
    if engine is not None:
        fix_default_model(self, engine)


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


async def chat_completions(original: Any, self: Any, request: web.Request) -> web.StreamResponse:
    from exo_remote_engine.engine.exo_api import RemoteChatHandler, error_response

    engine = local_remote_engine(self)
    view = STATE.view
    body = await _json_body(request)
    if engine is None:  # a local-engine node: relay remote models, leave the rest to exo
        model = body.get("model") if isinstance(body, Mapping) else None
        if view is not None and isinstance(model, str) and model in view.remote_model_ids():
            return await RemoteChatHandler(self, None, model).handle(request, body)
        return await original(self, request)
    if body is None:
        return error_response(RemoteError(Reason.INVALID_REQUEST, "request body is not valid JSON"))
    if not isinstance(body, Mapping):
        return error_response(RemoteError(Reason.INVALID_REQUEST, "request body must be a JSON object"))
    await refresh_catalog(engine)
    fix_default_model(self, engine)
    model = body.get("model") or self.default_model
    if engine.catalog.get(model) is None:
        await refresh_catalog(engine, force=True)
    if engine.catalog.get(model) is not None or (view is not None and model in view.remote_model_ids()):
        return await RemoteChatHandler(self, engine, model).handle(request, body)
    from exo.models import model_cards

    if isinstance(model, str) and model in model_cards:
        waiting = view.nodes_not_yet_announced(self.node.topology.nodes) if view is not None else []
        if ENGINE_CLASS_NAME not in model_cards[model].get("repo", {}) and waiting:
            # A local model, and a peer that may serve it has joined but not said so yet:
            # exo would answer "unsupported model" although a retry in a moment succeeds.
            return error_response(
                RemoteError(
                    Reason.MODEL_NOT_READY,
                    f"model {model!r} runs on local-engine peers; {', '.join(waiting)} joined the "
                    "cluster but has not announced what it serves yet, retry in a few seconds",
                    retry_after_s=2.0,
                )
            )
        return await original(self, request)
    served = ", ".join(engine.catalog.models) or "none (is the sidecar running?)"
    return error_response(RemoteError(Reason.MODEL_NOT_FOUND, f"unknown model {model!r}; this node serves: {served}"))


async def get_models(original: Any, self: Any, request: web.Request) -> web.StreamResponse:
    engine = local_remote_engine(self)
    if engine is not None:
        await refresh_catalog(engine)
    response = await original(self, request)
    if engine is None:
        return response
    listing = json.loads(response.body)
    for item in listing.get("data", []):
        model = engine.catalog.get(item.get("id"))
        if model is None:
            continue
        item.update(owned_by=f"exo-remote:{model.provider}", ready=model.ready, provider=model.provider)
        item["name"] = pretty_name(model)
        if not model.ready:
            item["not_ready_reason"] = model.not_ready_reason
        for field in ("context_window", "max_output_tokens", "supports_tools", "supports_images"):
            if model.HasField(field):
                item[field] = getattr(model, field)
    return web.json_response(listing)


async def get_topology(original: Any, self: Any, request: web.Request) -> web.StreamResponse:
    """exo's topology plus what the add-on knows: who runs it, who serves what."""
    response = await original(self, request)
    view = STATE.view
    if view is None or response.status != 200:
        return response
    body = json.loads(response.body)
    present = list((body.get("nodes") or {}).keys())
    body["exo_remote"] = {
        "nodes": {
            # "sidecar" is the target as configured (kept for older readers); "sidecar_hosts"
            # lists each host behind a several-host target with its health.
            node_id: {
                "engine": p.engine_class,
                "models": list(p.models),
                "sidecar": p.sidecar,
                "sidecar_hosts": [{"address": a, "status": s} for a, s in p.sidecar_hosts.items()],
            }
            for node_id, p in view.peers.items()
            if node_id in present
        },
        "nodes_without_addon": view.nodes_without_addon(present),
    }
    return web.json_response(body)


# tinychat offers "Download" when download_percentage is null or < 100 and a delete button
# when it is > 0; a remote model has nothing to download or delete, and a non-numeric value
# is neither (JavaScript compares it as NaN), while "downloaded" shows it as usable.
REMOTE_PERCENTAGE = "remote"


def ready_entry(api: Any, exo_id: str) -> dict[str, Any]:
    """tinychat's fields for a remote model that is usable now: no size, nothing to fetch;
    provider, family and a readable name for the sidebar (see :mod:`~..tinychat`)."""
    engine = local_remote_engine(api)
    return {
        "downloaded": True,
        "download_percentage": REMOTE_PERCENTAGE,
        "total_size": 0,
        "total_downloaded": 0,
        "loading": False,
        **sidebar_fields(exo_id, engine.catalog.get(exo_id) if engine is not None else None),
    }


async def root_page(original: Any, self: Any, request: web.Request) -> web.StreamResponse:
    """exo's tinychat page plus the add-on's script: remote models grouped by provider, and
    the node's default remote model selected instead of tinychat's ``llama-3.2-1b``."""
    try:
        html = (Path(self.static_dir) / "index.html").read_text(encoding="utf-8")
    except (AttributeError, OSError, UnicodeDecodeError):
        return await original(self, request)
    engine = local_remote_engine(self)
    default = self.default_model if engine is not None and engine.catalog.get(self.default_model) else None
    return web.Response(text=page_with_addon(html, default), content_type="text/html", charset="utf-8")


async def initial_models(original: Any, self: Any, request: web.Request) -> web.StreamResponse:
    engine = local_remote_engine(self)
    if engine is not None:
        await refresh_catalog(engine)
    response = await original(self, request)
    if response.status != 200:
        return response
    listing = json.loads(response.body)
    for exo_id, ready in remote_models_here(self.node).items():
        if not ready:
            listing.pop(exo_id, None)
        elif exo_id in listing:
            listing[exo_id] = ready_entry(self, exo_id)
    return web.json_response(listing)


async def model_pool(original: Any, self: Any, request: web.Request) -> web.StreamResponse:
    """tinychat's ``/modelpool`` on a remote node: its ready remote models, as
    ``/initial_models`` has them (exo's would turn them back into deletable downloads)."""
    if local_remote_engine(self) is None:
        return await original(self, request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for exo_id, ready in remote_models_here(self.node).items():
        if ready:
            entry = ready_entry(self, exo_id)
            await response.write(f"data: {json.dumps({exo_id: entry})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


def _remote_model_note(api: Any, model: str, ready: bool) -> str:
    engine = local_remote_engine(api)
    where = f"the sidecar at {engine.target.address}" if engine is not None else "a peer's sidecar"
    note = f"model {model!r} is a remote model served through {where}: it has no files on this node."
    entry = engine.catalog.get(model) if engine is not None else None
    if not ready and entry is not None:
        note += f" It is not ready: {entry.not_ready_reason or 'unknown reason'}."
    return note


async def post_download(original: Any, self: Any, request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    model = body.get("model") if isinstance(body, Mapping) else None
    remote = remote_models_here(self.node)
    if isinstance(model, str) and model in remote:
        note = _remote_model_note(self, model, remote[model])
        return web.json_response({"error": f"{note} Nothing to download."}, status=400)
    return await original(self, request)


async def delete_model(original: Any, self: Any, request: web.Request) -> web.StreamResponse:
    model = request.match_info.get("model_name", "")
    remote = remote_models_here(self.node)
    if model in remote:
        note = _remote_model_note(self, model, remote[model])
        return web.json_response({"detail": f"{note} Nothing to delete."}, status=400)
    return await original(self, request)


def _api(attr: str) -> Target:
    return Target(CHATGPT_API, attr, owner="ChatGPTAPI")


NEEDS = [
    Needs(_api("__init__"), params=("node", "inference_engine_classname")),
    Needs(
        Target(CHATGPT_API, "ChatGPTAPI"),
        instance_attrs=(
            "node",
            "default_model",
            "inference_engine_classname",
            "token_queues",
            "response_timeout",
            "system_prompt",
            "on_chat_completion_request",
        ),
    ),
    Needs(Target("exo.models", "model_cards")),
    Needs(Target("exo.models", "build_base_shard"), params=("model_id", "inference_engine_classname")),
    Needs(Target("exo", "VERSION")),
]
PATCHES = [
    Patch(_api("__init__"), api_init),
    Patch(_api("handle_post_chat_completions"), chat_completions, ("request",)),
    Patch(_api("handle_get_models"), get_models, ("request",)),
    Patch(_api("handle_get_topology"), get_topology, ("request",)),
    Patch(_api("handle_get_initial_models"), initial_models, ("request",)),
    Patch(_api("handle_model_support"), model_pool, ("request",)),
    Patch(_api("handle_post_download"), post_download, ("request",)),
    Patch(_api("handle_delete_model"), delete_model, ("request",)),
    Patch(_api("handle_root"), root_page, ("request",)),
]
