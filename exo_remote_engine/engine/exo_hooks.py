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
|                                         | (local nodes: psutil fallback when tinygrad is missing)      |
| new_shard_downloader                    | a remote node downloads nothing (/modelpool contacted HF);   |
|                                         | it reports ready remote models as present for tinychat       |
| Node.get_supported_inference_engines    | would announce "tinygrad" for a remote node                  |
| Node.select_best_inference_engine       | would replace the remote engine by tinygrad once a peer joins|
| Node.__init__                           | to learn when exo finishes a request (EOS / max tokens)      |
| ChatGPTAPI.handle_post_chat_completions | OpenAI fidelity for remote models; clear 404 for unknown ids |
| ChatGPTAPI.handle_get_models            | ready flag, reason and metadata of remote models; refresh    |
| ChatGPTAPI.__init__                     | a remote model is the default when exo's cannot be served    |
| ChatGPTAPI.handle_get_topology          | adds who runs the add-on and which node serves which model   |
| RingMemoryWeighted...partition          | model-aware rings (remote model: its server; local: no remote)|
| Node.process_prompt and shard methods   | tell the ring its model; relay prompts to the serving node   |
| Node.start / __init__ / update_peers    | announce this node; learn peers; forget peers that left      |
| AsyncCallbackSystem.trigger_all         | exo bug: callbacks share one token list, duplicating tokens  |
| Node.broadcast_result                   | exo bug: one task per token, so peers (relays) may get them  |
|                                         | out of order; now in order, batched while one is in flight   |
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from exo_remote_engine.engine.catalog import REPO_PREFIX, pretty_name, repo_for
from exo_remote_engine.engine.client import list_models_blocking
from exo_remote_engine.engine.cluster import CANCEL_TYPE, ClusterView
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
    """Install the hooks; the cluster ones on every node, the engine ones on remote nodes.
    Returns whether this process runs the remote engine."""
    global _installed
    argv = sys.argv if argv is None else argv
    env = os.environ if environ is None else environ
    strip_addon_flags(argv, env)
    remote_node = engine_requested(argv) == ENGINE_NAME
    if _installed:
        return remote_node
    _installed = True
    if env.get("EXO_REMOTE_LOG_LEVEL"):
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
        logging.getLogger("exo_remote_engine").setLevel(env["EXO_REMOTE_LOG_LEVEL"].upper())
    # Every node with the add-on: model-aware rings, announcements, relaying, light hooks.
    _install_tokenizer()
    _install_cluster_patches()
    _install_api_patches()
    _install_callback_fix()
    _install_ordered_broadcast()
    if not remote_node:
        _install_local_device_fallback()
        return False
    _install_engine_registry()
    _install_device_capabilities()
    _install_downloader()
    _install_node_patches()
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
            log.warning("remote model %s would shadow a local model card; skipped", exo_id)
            continue
        models.model_cards[exo_id] = _remote_card(model.alias)
        models.pretty_name[exo_id] = pretty_name(model)
    _remote_ids.clear()
    _remote_ids.update(current)


def _remote_card(alias: str) -> dict[str, Any]:
    """A remote model's card, with a repo for every engine class so that the API of any
    add-on node (remote or local engine) accepts the model and relays it."""
    from exo.inference.inference_engine import inference_engine_classes

    classes = {*inference_engine_classes.values(), ENGINE_CLASS_NAME}
    return {"layers": 1, "repo": dict.fromkeys(sorted(classes), repo_for(alias))}


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


# --- cluster: rings, announcements, relaying ----------------------------------------
_current_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("exo_remote_model", default=None)
_view: ClusterView | None = None
ANNOUNCE_EVERY_S = 2.0
RELAY_CONNECT_S = 3.0


def cluster_view() -> ClusterView | None:
    return _view


def _install_cluster_patches() -> None:
    """Model-aware partitioning and the announcements it needs, on every add-on node."""
    from exo.orchestration.node import Node
    from exo.topology.partitioning_strategy import Partition
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    original_partition = RingMemoryWeightedPartitioningStrategy.partition

    def partition(self: Any, topology: Any) -> list[Any]:
        view = _view
        if view is None:
            return list(original_partition(self, topology))
        partitions, start = [], 0.0
        for node_id, fraction in view.ring(_current_model.get(), topology.nodes):
            end = round(start + fraction, 5)
            partitions.append(Partition(node_id, start, end))
            start = end
        return partitions

    RingMemoryWeightedPartitioningStrategy.partition = partition  # type: ignore[method-assign]

    def with_model(method: Callable[..., Any]) -> Callable[..., Any]:
        """Run ``method`` with its shard's model as the ring's model (exo's partitioner
        is never told the model; every caller below has the shard)."""
        if asyncio.iscoroutinefunction(method):

            @functools.wraps(method)
            async def async_wrapper(self: Any, shard: Any, *args: Any, **kwargs: Any) -> Any:
                token = _current_model.set(shard.model_id)
                try:
                    return await method(self, shard, *args, **kwargs)
                finally:
                    _current_model.reset(token)

            return async_wrapper

        @functools.wraps(method)
        def wrapper(self: Any, shard: Any, *args: Any, **kwargs: Any) -> Any:
            token = _current_model.set(shard.model_id)
            try:
                return method(self, shard, *args, **kwargs)
            finally:
                _current_model.reset(token)

        return wrapper

    for name in (
        "_process_prompt",
        "process_tensor",
        "_process_tensor",
        "process_inference_result",
        "forward_prompt",
        "forward_tensor",
        "get_current_shard",
    ):
        setattr(Node, name, with_model(getattr(Node, name)))

    original_process_prompt = Node.process_prompt

    @with_model
    async def process_prompt(
        self: Any, base_shard: Any, prompt: str, request_id: str | None = None, inference_state: Any = None
    ) -> Any:
        # exo assumes the asking node is in every ring; with model-aware rings it may not
        # be, so the prompt goes to the ring's first node and tokens come back by broadcast.
        view = _view
        model = base_shard.model_id
        if view is not None and model in view.remote_model_ids() and not view.servers_of(model, self.topology.nodes):
            served_by = ", ".join(sorted(n for n, p in view.peers.items() if model in p.aliases)) or "no node"
            raise RuntimeError(f"model {model!r} is served by {served_by}, which is not reachable now")
        ring = [p.node_id for p in self.partitioning_strategy.partition(self.topology)]
        log.debug("request_id=%s model=%s ring=%s", request_id, model, ring)
        if ring and self.id not in ring:
            peer = next((p for p in self.peers if p.id() == ring[0]), None)
            if peer is None:
                raise RuntimeError(f"model {base_shard.model_id!r} is served by node {ring[0]!r}, not reachable")
            shard = self.get_current_shard(base_shard, 0)
            try:
                if not await peer.is_connected():
                    await asyncio.wait_for(peer.connect(), timeout=RELAY_CONNECT_S)
                # Tell the serving node who waits for the results (exo's inference_state
                # cannot carry it: its serializer fails on plain values off macOS).
                note = json.dumps({"type": REPLY_TO_TYPE, "request_id": request_id, "node_id": self.id})
                await peer.send_opaque_status(request_id, note)
                await peer.send_prompt(shard, prompt, request_id=request_id, inference_state=inference_state)
            except Exception as exc:
                raise RuntimeError(
                    f"model {model!r} is served by node {ring[0]!r}, which is not reachable now ({type(exc).__name__})"
                ) from exc
            return None
        reply_to = _reply_to.pop(request_id or "", None)
        if reply_to and reply_to != self.id:
            await _until_peer(self, reply_to)
        return await original_process_prompt(self, base_shard, prompt, request_id, inference_state or {})

    Node.process_prompt = process_prompt

    original_init = Node.__init__
    original_start = Node.start

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        global _view
        original_init(self, *args, **kwargs)
        _view = ClusterView(self.id)
        self.on_opaque_status.register("exo-remote-cluster").on_next(
            lambda request_id, status: _on_status(self, status)
        )

    async def start(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = await original_start(self, *args, **kwargs)
        _background.add(asyncio.create_task(_announce_forever(self), name="exo-remote-announce"))
        return result

    original_update_peers = Node.update_peers

    async def update_peers(self: Any, *args: Any, **kwargs: Any) -> Any:
        # A peer that left (or restarted) may come back as a new process that has not
        # connected back to us yet: forget what it announced until it announces again.
        before = {p.id(): p for p in self.peers}
        changed = await original_update_peers(self, *args, **kwargs)
        after = {p.id(): p for p in self.peers}
        view = _view
        if view is not None:
            for node_id, handle in before.items():
                if after.get(node_id) is not handle:
                    view.forget(node_id)
        return changed

    Node.__init__ = __init__
    Node.start = start
    Node.update_peers = update_peers


_background: set[asyncio.Task[None]] = set()
REPLY_TO_TYPE = "exo_remote_reply_to"
REPLY_WAIT_S = 8.0
_reply_to: dict[str, str] = {}  # request id -> the node that relayed it here


async def _until_peer(node: Any, node_id: str) -> None:
    """A relayed prompt's results go back by exo's broadcast to peers: a node that just
    (re)started may not have connected back to the relaying node yet, so wait for it."""
    deadline = asyncio.get_running_loop().time() + REPLY_WAIT_S
    while node_id not in {p.id() for p in node.peers}:
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"results could not be sent back to node {node_id!r}: not connected to it")
        await node.update_peers()
        await asyncio.sleep(0.25)


def _announcement(node: Any) -> str:
    engine = node.inference_engine
    models: dict[str, str] = {}
    sidecar = None
    if isinstance(engine, RemoteLLMInferenceEngine):
        models = {k: m.alias for k, m in engine.catalog.models.items() if m.ready}
        sidecar = engine.target.address
    return ClusterView.announcement(node.id, engine.__class__.__name__, models, sidecar, (p.id() for p in node.peers))


async def _announce_forever(node: Any) -> None:
    while True:
        try:
            await node.broadcast_opaque_status("", _announcement(node))
            view = _view
            if view is not None:
                for node_id in view.nodes_without_addon(node.topology.nodes):
                    if node_id not in view.warned:
                        view.warned.add(node_id)
                        print(
                            f"exo-remote: WARNING: node {node_id} runs without the exo-remote-engine add-on; "
                            "install it there or mixed local/remote requests can be misrouted",
                            file=sys.stderr,
                            flush=True,
                        )
        except Exception as exc:
            log.warning("announcement failed: %s", exc)
        await asyncio.sleep(ANNOUNCE_EVERY_S)


def _on_status(node: Any, status: str) -> None:
    if REPLY_TO_TYPE in status:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            note = json.loads(status)
            if note.get("type") == REPLY_TO_TYPE:
                _reply_to[str(note["request_id"])] = str(note["node_id"])
                if len(_reply_to) > 10_000:  # notes for prompts that never came
                    _reply_to.pop(next(iter(_reply_to)))
                return
    view = _view
    data = view.absorb(status) if view is not None else None
    if data is None:
        return
    if data["type"] == CANCEL_TYPE:
        engine = node.inference_engine
        if isinstance(engine, RemoteLLMInferenceEngine) and isinstance(data.get("request_id"), str):
            engine.cancel(data["request_id"])
        return
    _sync_cluster_cards(node)


def _sync_cluster_cards(node: Any) -> None:
    """Cards for what peers serve: remote models on every node; on a remote node, a repo
    of its own class for the local models its peers' engines serve."""
    import exo.models as models

    view = _view
    if view is None:
        return
    for exo_id, alias in view.remote_model_ids().items():
        if exo_id in _remote_ids:
            continue  # this node's own remote model: sync_model_cards keeps it
        if exo_id in models.model_cards and exo_id not in _relayed_ids:
            continue  # never shadow a local model card
        models.model_cards[exo_id] = _remote_card(alias)
        models.pretty_name.setdefault(exo_id, exo_id)
        _relayed_ids.add(exo_id)
    own_class = node.inference_engine.__class__.__name__
    if own_class != ENGINE_CLASS_NAME:
        return
    peer_classes = {p.engine_class for p in view.peers.values()} - {ENGINE_CLASS_NAME, ""}
    for card in models.model_cards.values():
        repos = card.get("repo", {})
        if ENGINE_CLASS_NAME not in repos:
            source = next((repos[c] for c in sorted(peer_classes) if c in repos), None)
            if source is not None:
                repos[ENGINE_CLASS_NAME] = source


_relayed_ids: set[str] = set()


def _install_local_device_fallback() -> None:
    """On Linux exo's device_capabilities imports tinygrad; a node without it (a dummy
    node, say) still describes itself instead of crashing at start."""
    import exo.topology.device_capabilities as dc

    original = dc.device_capabilities

    async def device_capabilities() -> Any:
        try:
            return await original()
        except ImportError:
            import platform

            import psutil

            return dc.DeviceCapabilities(
                model=f"{platform.system()} box (no tinygrad)",
                chip=platform.machine() or "CPU",
                memory=int(psutil.virtual_memory().total // 2**20),
                flops=dc.DeviceFlops(fp32=0, fp16=0, int8=0),
            )

    _patch("exo.topology.device_capabilities", "device_capabilities", device_capabilities)


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
        if engine is None:  # a local-engine node: relay remote models, leave the rest to exo
            view = _view
            try:
                body = await request.json()
            except ValueError:
                body = None
            model = body.get("model") if isinstance(body, Mapping) else None
            if view is not None and isinstance(model, str) and model in view.remote_model_ids():
                return await RemoteChatHandler(self, None, model).handle(request, body)
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
        view = _view
        if engine.catalog.get(model) is not None or (view is not None and model in view.remote_model_ids()):
            return await RemoteChatHandler(self, engine, model).handle(request, body)
        from exo.models import model_cards

        if model in model_cards:
            card_repos = model_cards[model].get("repo", {})
            waiting = view.nodes_not_yet_announced(self.node.topology.nodes) if view is not None else []
            if ENGINE_CLASS_NAME not in card_repos and waiting:
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

    original_topology: Callable[..., Any] = ChatGPTAPI.handle_get_topology

    async def handle_get_topology(self: Any, request: web.Request) -> web.Response:
        """exo's topology plus what the add-on knows: who runs it, who serves what."""
        response: web.Response = await original_topology(self, request)
        view = _view
        if view is None or response.status != 200:
            return response
        body = json.loads(response.body)  # type: ignore[arg-type]
        present = list((body.get("nodes") or {}).keys())
        body["exo_remote"] = {
            "nodes": {
                node_id: {"engine": p.engine_class, "models": list(p.models), "sidecar": p.sidecar}
                for node_id, p in view.peers.items()
                if node_id in present
            },
            "nodes_without_addon": view.nodes_without_addon(present),
        }
        return web.json_response(body)

    ChatGPTAPI.__init__ = __init__
    ChatGPTAPI.handle_post_chat_completions = handle_post_chat_completions
    ChatGPTAPI.handle_get_models = handle_get_models
    ChatGPTAPI.handle_get_topology = handle_get_topology


# --- exo bug fixes --------------------------------------------------------------------
def _install_ordered_broadcast() -> None:
    """exo broadcasts each token of a request from its own task (``create_task`` per
    token), so two unary SendResult calls can reach a peer in either order; a node relaying
    a remote model would then rebuild a garbled stream. One sender per request keeps them
    in order, and tokens produced while a send is in flight go out together next."""
    from exo.orchestration.node import Node

    original: Callable[..., Any] = Node.broadcast_result
    outbox: dict[str, tuple[list[int], bool]] = {}
    sending: set[str] = set()

    async def broadcast_result(self: Any, request_id: str, result: Any, is_finished: bool) -> None:
        if not isinstance(result, list):  # not tokens (exo's image models): as exo does it
            await original(self, request_id, result, is_finished)
            return
        tokens, finished = outbox.get(request_id, ([], False))
        outbox[request_id] = (tokens + result, finished or is_finished)
        if request_id in sending:
            return  # the running sender takes these next, after what it is sending now
        sending.add(request_id)
        try:
            while request_id in outbox:
                batch, done = outbox.pop(request_id)
                await original(self, request_id, batch, done)
        finally:
            sending.discard(request_id)

    Node.broadcast_result = broadcast_result


def _install_callback_fix() -> None:
    from exo.helpers import AsyncCallbackSystem

    def trigger_all(self: Any, *args: Any) -> None:
        # exo passes one list object to every callback and the TUI's buffer extends it,
        # so the API's queue would see tokens twice. Each callback gets its own copy.
        for callback in list(self.callbacks.values()):
            callback.set(*(list(a) if isinstance(a, list) else a for a in args))

    AsyncCallbackSystem.trigger_all = trigger_all
