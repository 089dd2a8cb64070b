"""Every patch this add-on applies to classic exo, in one place, with the reason for each.

Classic exo (commit e4238f9ef) has no plugin mechanism and does all its work while
``exo.main`` is imported, so :func:`install` must run before that import (the ``.pth``
trigger in :mod:`exo_remote_engine._startup` or the ``exo-remote-node`` launcher call it).
Several names are imported by value (``from x import y``); :func:`_patch` replaces the
defining module's attribute and re-binds the copies already made in loaded ``exo.*``
modules. Local engines are left exactly as exo has them: each patch only acts for the
``remote`` engine or for remote models.

| hook                                    | why                                                          |
|-----------------------------------------|--------------------------------------------------------------|
| inference_engine_classes["remote"]      | exo maps engine names to class names for model cards         |
| get_inference_engine                    | if/elif over known names; returns one shared remote engine   |
| model_cards, pretty_name                | remote models must be cards for exo's API, tinychat, CLI     |
| resolve_tokenizer                       | would fetch "exo-remote/<alias>" from Hugging Face           |
| device_capabilities                     | imports tinygrad on Linux; describes the node in topology    |
| new_shard_downloader                    | a remote node downloads nothing (/modelpool contacted HF);   |
|                                         | it reports ready remote models as present for tinychat       |
| Node.get_supported_inference_engines    | would announce "tinygrad" for a remote node                  |
| Node.select_best_inference_engine       | would replace the remote engine by tinygrad once a peer joins|
| Node.__init__                           | to learn when exo finishes a request (EOS / max tokens)      |
| ChatGPTAPI.handle_post_chat_completions | OpenAI fidelity for remote models; clear 404 for unknown ids |
| ChatGPTAPI.handle_get_models            | ready flag, reason and metadata of remote models; refresh    |
| ChatGPTAPI.__init__                     | a remote model is the default when exo's cannot be served    |
| AsyncCallbackSystem.trigger_all         | exo bug: callbacks share one token list, duplicating tokens  |
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from exo_remote_engine.engine.catalog import REPO_PREFIX, pretty_name, repo_for
from exo_remote_engine.engine.client import list_models_blocking
from exo_remote_engine.engine_adapter import ENGINE_CLASS_NAME, RemoteLLMInferenceEngine, shared_engine
from exo_remote_engine.errors import Reason, RemoteError

log = logging.getLogger("exo_remote_engine.hooks")

ENGINE_NAME = "remote"
CATALOG_TTL_S = 10.0
# The add-on's own flags: removed from argv before exo's argparse sees them.
ADDON_FLAGS = {
    "--sidecar": "EXO_REMOTE_SIDECAR",
    "--sidecar-token-file": "EXO_REMOTE_TOKEN_FILE",
    "--sidecar-tls-ca": "EXO_REMOTE_TLS_CA",
    "--sidecar-tls-cert": "EXO_REMOTE_TLS_CERT",
    "--sidecar-tls-key": "EXO_REMOTE_TLS_KEY",
}
_installed = False
_remote_ids: set[str] = set()
_nodes: list[Any] = []  # exo Node objects running the remote engine (normally one)


def strip_addon_flags(argv: list[str], environ: dict[str, str] | os._Environ[str]) -> None:
    """Move ``--sidecar X`` style flags from argv into the environment, in place."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ADDON_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"exo-remote: {name} needs a value")
                value = argv[i + 1]
                del argv[i : i + 2]
            else:
                del argv[i]
            environ[ADDON_FLAGS[name]] = value
            continue
        i += 1


def engine_requested(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--inference-engine" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--inference-engine="):
            return arg.split("=", 1)[1]
    return None


def _patch(module_name: str, attr: str, replacement: Any) -> Any:
    """Replace ``module.attr`` and every by-value copy of it in loaded exo modules."""
    module = sys.modules.get(module_name) or __import__(module_name, fromlist=[attr])
    original = getattr(module, attr)
    setattr(module, attr, replacement)
    for name, loaded in list(sys.modules.items()):
        if (name == "exo" or name.startswith("exo.")) and getattr(loaded, attr, None) is original:
            setattr(loaded, attr, replacement)
    return original


def install(argv: list[str] | None = None, environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """Install every hook; returns False when this process does not run the remote engine."""
    global _installed
    argv = sys.argv if argv is None else argv
    env = os.environ if environ is None else environ
    strip_addon_flags(argv, env)
    remote_node = engine_requested(argv) == ENGINE_NAME
    if _installed or not remote_node:
        return remote_node
    _installed = True
    _install_engine_registry()
    _install_tokenizer()
    _install_device_capabilities()
    _install_downloader()
    _install_node_patches()
    _install_api_patches()
    _install_callback_fix()
    _load_model_cards_at_startup()
    return True


# --- engine registry ----------------------------------------------------------------
def _install_engine_registry() -> None:
    import exo.inference.inference_engine as ie

    ie.inference_engine_classes[ENGINE_NAME] = ENGINE_CLASS_NAME
    original = ie.get_inference_engine

    @functools.wraps(original)
    def get_inference_engine(name: str, shard_downloader: Any) -> Any:
        if name == ENGINE_NAME:
            return shared_engine(shard_downloader)
        return original(name, shard_downloader)

    _patch("exo.inference.inference_engine", "get_inference_engine", get_inference_engine)


def _install_tokenizer() -> None:
    import exo.inference.tokenizers as tok

    original = tok.resolve_tokenizer

    @functools.wraps(original)
    async def resolve_tokenizer(repo_id: Any) -> Any:
        if isinstance(repo_id, str) and repo_id.startswith(REPO_PREFIX):
            return shared_engine().tokenizer
        return await original(repo_id)

    _patch("exo.inference.tokenizers", "resolve_tokenizer", resolve_tokenizer)


def _install_device_capabilities() -> None:
    import exo.topology.device_capabilities as dc

    async def device_capabilities() -> Any:
        engine = shared_engine()
        ready_ids = [k for k, m in engine.catalog.models.items() if m.ready]
        listed = ", ".join(ready_ids[:4]) + (", ..." if len(ready_ids) > 4 else "")
        try:
            import psutil

            memory_mb = int(psutil.virtual_memory().total // 2**20)
        except Exception:
            memory_mb = 1024
        return dc.DeviceCapabilities(
            model=f"Remote LLM via {engine.target.address}",
            chip=f"remote: {len(ready_ids)}/{len(engine.catalog.models)} models ready ({listed})",
            # exo's ring partitioner divides by total memory and hangs on zero.
            memory=max(memory_mb, 1024),
            flops=dc.DeviceFlops(fp32=0, fp16=0, int8=0),
        )

    _patch("exo.topology.device_capabilities", "device_capabilities", device_capabilities)


def _install_downloader() -> None:
    from datetime import timedelta
    from pathlib import Path

    from exo.download.download_progress import RepoProgressEvent
    from exo.download.shard_download import NoopShardDownloader
    from exo.models import build_full_shard

    class RemoteShardDownloader(NoopShardDownloader):  # type: ignore[misc]
        """Downloads nothing; reports ready remote models as present so tinychat lists them."""

        async def get_shard_download_status(self, inference_engine_name: str) -> Any:
            for exo_id, model in shared_engine().catalog.models.items():
                shard = build_full_shard(exo_id, inference_engine_name)
                if shard is None:
                    continue
                size = 0 if model.ready else 1  # 0/0 is "downloaded"; 0/1 is "not yet"
                yield (
                    Path("/dev/null"),
                    RepoProgressEvent(
                        shard,
                        repo_for(model.alias),
                        "remote",
                        0,
                        0,
                        0,
                        0,
                        size,
                        0,
                        timedelta(0),
                        {},
                        "complete" if model.ready else "not_started",
                    ),
                )

    def new_shard_downloader(max_parallel_downloads: int = 8) -> Any:
        return RemoteShardDownloader()

    _patch("exo.download.new_shard_download", "new_shard_downloader", new_shard_downloader)


# --- node ---------------------------------------------------------------------------
def _install_node_patches() -> None:
    from exo.orchestration.node import Node

    original_supported = Node.get_supported_inference_engines
    original_select = Node.select_best_inference_engine
    original_init = Node.__init__

    def get_supported_inference_engines(self: Any) -> list[str]:
        if isinstance(self.inference_engine, RemoteLLMInferenceEngine):
            return [ENGINE_NAME]
        return list(original_supported(self))

    async def select_best_inference_engine(self: Any) -> None:
        if isinstance(self.inference_engine, RemoteLLMInferenceEngine):
            return  # never swap the remote engine for tinygrad
        await original_select(self)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        engine = self.inference_engine
        if isinstance(engine, RemoteLLMInferenceEngine):
            self.on_token.register("exo-remote-engine").on_next(engine.on_token)
            _nodes.append(self)

    Node.get_supported_inference_engines = get_supported_inference_engines
    Node.select_best_inference_engine = select_best_inference_engine
    Node.__init__ = __init__


# --- model cards --------------------------------------------------------------------
def sync_model_cards(engine: RemoteLLMInferenceEngine) -> None:
    """Make exo's model_cards match the engine's catalog (exo reads the dict live)."""
    import exo.models as models

    current = set(engine.catalog.models)
    for exo_id in _remote_ids - current:
        models.model_cards.pop(exo_id, None)
        models.pretty_name.pop(exo_id, None)
    for exo_id, model in engine.catalog.models.items():
        if exo_id in models.model_cards and exo_id not in _remote_ids:
            log.warning("remote model %s shadows no local model card; skipped", exo_id)
            continue
        models.model_cards[exo_id] = {"layers": 1, "repo": {ENGINE_CLASS_NAME: repo_for(model.alias)}}
        models.pretty_name[exo_id] = pretty_name(model)
    _remote_ids.clear()
    _remote_ids.update(current)


def _load_model_cards_at_startup() -> None:
    engine = shared_engine()
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
    names = ", ".join(engine.catalog.models) or "none"
    print(f"exo-remote: sidecar {engine.target.address} serves: {names}", file=sys.stderr)


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
    import exo.topology.device_capabilities as dc

    for node in _nodes:
        node.device_capabilities = await dc.device_capabilities()


# --- API ----------------------------------------------------------------------------
def _local_remote_engine(api: Any) -> RemoteLLMInferenceEngine | None:
    engine = getattr(api.node, "inference_engine", None)
    return engine if isinstance(engine, RemoteLLMInferenceEngine) else None


def _install_api_patches() -> None:
    from aiohttp import web
    from exo.api.chatgpt_api import ChatGPTAPI

    from exo_remote_engine.engine.exo_api import RemoteChatHandler, error_response

    original_post: Callable[..., Any] = ChatGPTAPI.handle_post_chat_completions
    original_models: Callable[..., Any] = ChatGPTAPI.handle_get_models
    original_init: Callable[..., Any] = ChatGPTAPI.__init__

    def _fix_default(api: Any, engine: RemoteLLMInferenceEngine) -> None:
        from exo.models import build_base_shard

        if build_base_shard(api.default_model, api.inference_engine_classname) is None:
            if engine.catalog.default_id:
                api.default_model = engine.catalog.default_id

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        engine = _local_remote_engine(self)
        if engine is not None:
            _fix_default(self, engine)

    async def handle_post_chat_completions(self: Any, request: web.Request) -> web.StreamResponse:
        engine = _local_remote_engine(self)
        if engine is None:
            return await original_post(self, request)  # type: ignore[no-any-return]
        try:
            body = await request.json()
        except ValueError:
            return error_response(RemoteError(Reason.INVALID_REQUEST, "request body is not valid JSON"))
        if not isinstance(body, Mapping):
            return error_response(RemoteError(Reason.INVALID_REQUEST, "request body must be a JSON object"))
        await refresh_catalog(engine)
        _fix_default(self, engine)
        model = body.get("model") or self.default_model
        if isinstance(model, str) and model.startswith("gpt-"):
            model = self.default_model  # exo's rule, kept: OpenAI tools send gpt-* ids
        if engine.catalog.get(model) is None:
            await refresh_catalog(engine, force=True)
        if engine.catalog.get(model) is not None:
            return await RemoteChatHandler(self, engine, model).handle(request, body)
        from exo.models import model_cards

        if model in model_cards:
            return await original_post(self, request)  # type: ignore[no-any-return]
        served = ", ".join(engine.catalog.models) or "none (is the sidecar running?)"
        return error_response(
            RemoteError(Reason.MODEL_NOT_FOUND, f"unknown model {model!r}; this node serves: {served}")
        )

    async def handle_get_models(self: Any, request: web.Request) -> web.Response:
        engine = _local_remote_engine(self)
        if engine is not None:
            await refresh_catalog(engine)
        response: web.Response = await original_models(self, request)
        if engine is None:
            return response
        import json

        listing = json.loads(response.body)  # type: ignore[arg-type]
        for item in listing.get("data", []):
            model = engine.catalog.get(item.get("id"))
            if model is None:
                continue
            item["owned_by"] = f"exo-remote:{model.provider}"
            item["ready"] = model.ready
            if not model.ready:
                item["not_ready_reason"] = model.not_ready_reason
            item["name"] = pretty_name(model)
            item["provider"] = model.provider
            for field in ("context_window", "max_output_tokens", "supports_tools", "supports_images"):
                if model.HasField(field):
                    item[field] = getattr(model, field)
        return web.json_response(listing)

    ChatGPTAPI.__init__ = __init__
    ChatGPTAPI.handle_post_chat_completions = handle_post_chat_completions
    ChatGPTAPI.handle_get_models = handle_get_models


# --- exo bug fix ----------------------------------------------------------------------
def _install_callback_fix() -> None:
    from exo.helpers import AsyncCallbackSystem

    def trigger_all(self: Any, *args: Any) -> None:
        # exo passes one list object to every callback and the TUI's buffer extends it,
        # so the API's queue would see tokens twice. Each callback gets its own copy.
        for callback in list(self.callbacks.values()):
            callback.set(*(list(a) if isinstance(a, list) else a for a in args))

    AsyncCallbackSystem.trigger_all = trigger_all
