"""Small stand-ins for the parts of classic exo the hooks touch, shaped like exo's own
(names, parameter names, instance attributes, by-value copies between modules), so the
hooks can be installed, exercised and reverted in CI where exo is not installed.

Nothing here is exo's code: each piece does the least that lets a hook's behaviour be
observed (exo's ``gpt-*`` and unknown-id substitution, its loading-state initial list,
its "download started" answer, its token queues).
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

PACKAGES = (
    "exo",
    "exo.inference",
    "exo.topology",
    "exo.download",
    "exo.networking",
    "exo.networking.grpc",
    "exo.orchestration",
    "exo.api",
    "exo.viz",
)


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    if name in PACKAGES:
        module.__path__ = []
    module.__dict__.update(attrs)
    return module


# --- exo.helpers ---------------------------------------------------------------------
class AsyncCallback:
    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.result: tuple[Any, ...] | None = None

    def on_next(self, callback: Any) -> None:
        self.observers.append(callback)

    def set(self, *args: Any) -> None:
        self.result = args
        for observer in self.observers:
            observer(*args)


class AsyncCallbackSystem:
    def __init__(self) -> None:
        self.callbacks: dict[str, AsyncCallback] = {}

    def register(self, name: str) -> AsyncCallback:
        return self.callbacks.setdefault(name, AsyncCallback())

    def trigger_all(self, *args: Any) -> None:
        for callback in self.callbacks.values():
            callback.set(*args)  # one object for every callback, as exo does


# --- exo.inference ---------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int


def get_inference_engine(inference_engine_name: str, shard_downloader: Any) -> Any:
    if inference_engine_name == "dummy":
        return DummyInferenceEngine()
    raise ValueError(f"Unsupported inference engine: {inference_engine_name}")


class DummyInferenceEngine:
    shard_downloader = None


async def resolve_tokenizer(repo_id: Any) -> Any:
    return f"hugging-face-tokenizer:{repo_id}"  # what a download would have produced


# --- exo.models ------------------------------------------------------------------------
def _models_module() -> types.ModuleType:
    model_cards: dict[str, Any] = {"llama-3.2-1b": {"layers": 16, "repo": {"DummyInferenceEngine": "dummy"}}}
    pretty_name: dict[str, str] = {"llama-3.2-1b": "Llama 3.2 1B"}

    def get_repo(model_id: str, inference_engine_classname: str) -> str | None:
        return model_cards.get(model_id, {}).get("repo", {}).get(inference_engine_classname)

    def get_pretty_name(model_id: str) -> str | None:
        return pretty_name.get(model_id)

    def build_base_shard(model_id: str, inference_engine_classname: str) -> Shard | None:
        layers = model_cards.get(model_id, {}).get("layers", 0)
        if get_repo(model_id, inference_engine_classname) is None or layers < 1:
            return None
        return Shard(model_id, 0, 0, layers)

    def build_full_shard(model_id: str, inference_engine_classname: str) -> Shard | None:
        base = build_base_shard(model_id, inference_engine_classname)
        return None if base is None else Shard(model_id, 0, base.n_layers - 1, base.n_layers)

    def get_supported_models(supported_inference_engine_lists: Any = None) -> list[str]:
        classes = {c for group in supported_inference_engine_lists or [] for c in group}
        return [m for m, card in model_cards.items() if not classes or classes & set(card["repo"])]

    return _module("exo.models", **{k: v for k, v in locals().items() if not k.startswith("_")})


# --- exo.topology / exo.download --------------------------------------------------------
@dataclass
class DeviceFlops:
    fp32: float
    fp16: float
    int8: float


@dataclass
class DeviceCapabilities:
    model: str
    chip: str
    memory: int
    flops: DeviceFlops


async def device_capabilities() -> DeviceCapabilities:
    raise ImportError("No module named 'tinygrad'")  # what exo does on Linux without tinygrad


@dataclass
class Partition:
    node_id: str
    start: float
    end: float


class RingMemoryWeightedPartitioningStrategy:
    def partition(self, topology: Any) -> list[Partition]:
        nodes = sorted(topology.nodes.items(), key=lambda x: (x[1].memory, x[0]), reverse=True)
        total = sum(c.memory for _, c in nodes) or 1
        result, start = [], 0.0
        for node_id, caps in nodes:
            end = round(start + caps.memory / total, 5)
            result.append(Partition(node_id, start, end))
            start = end
        return result


@dataclass
class RepoProgressEvent:
    shard: Any
    repo_id: str
    repo_revision: str
    completed_files: int
    total_files: int
    downloaded_bytes: int
    downloaded_bytes_this_session: int
    total_bytes: int
    overall_speed: int
    overall_eta: Any
    file_progress: dict[str, Any]
    status: str


class HuggingFaceDownloader:
    """What exo would build: the hooks must never let a remote node have it."""


def new_shard_downloader(max_parallel_downloads: int = 8) -> Any:
    return HuggingFaceDownloader()


# --- exo.networking ---------------------------------------------------------------------
class GRPCPeerHandle:
    def __init__(self, peer_id: str) -> None:
        self._id = peer_id
        self.connected = True
        self.sent: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def id(self) -> str:
        return self._id

    async def is_connected(self) -> bool:
        return self.connected

    async def connect(self) -> None:
        self.connected = True

    async def send_prompt(
        self, shard: Any, prompt: str, inference_state: Any = None, request_id: str | None = None
    ) -> None:
        self.sent.append(("prompt", (shard, prompt), {"request_id": request_id, "inference_state": inference_state}))

    async def send_opaque_status(self, request_id: str, status: str) -> None:
        self.sent.append(("status", (request_id, status), {}))

    async def send_result(self, request_id: str, result: list[int], is_finished: bool) -> None:
        self.sent.append(("result", (request_id, list(result), is_finished), {}))


# --- exo.orchestration.node ------------------------------------------------------------
@dataclass
class Topology:
    nodes: dict[str, DeviceCapabilities]


class Node:
    def __init__(
        self,
        _id: str,
        server: Any,
        inference_engine: Any,
        discovery: Any,
        shard_downloader: Any,
        partitioning_strategy: Any = None,
        max_generate_tokens: int = 1024,
        default_sample_temperature: float = 0.0,
        topology_viz: Any = None,
    ) -> None:
        self.id = _id
        self.inference_engine = inference_engine
        self.partitioning_strategy = partitioning_strategy
        self.peers: list[Any] = []
        self.topology = Topology({})
        self.device_capabilities = None
        self._on_token = AsyncCallbackSystem()
        self._on_opaque_status = AsyncCallbackSystem()
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.next_peers: list[Any] | None = None

    @property
    def on_token(self) -> AsyncCallbackSystem:
        return self._on_token

    @property
    def on_opaque_status(self) -> AsyncCallbackSystem:
        return self._on_opaque_status

    async def start(self, wait_for_peers: int = 0) -> None:
        self.calls.append(("start", (wait_for_peers,), {}))

    async def update_peers(self, wait_for_peers: int = 0) -> bool:
        if self.next_peers is not None:
            self.peers = self.next_peers
        return True

    async def process_prompt(
        self,
        base_shard: Shard,
        prompt: str,
        request_id: str | None = None,
        inference_state: Any = {},  # noqa: B006
    ) -> None:
        self.calls.append(
            ("process_prompt", (base_shard, prompt), {"request_id": request_id, "state": inference_state})
        )

    async def _process_prompt(
        self, base_shard: Shard, prompt: str, request_id: str | None = None, inference_state: Any = None
    ) -> None:
        return None

    async def process_tensor(
        self, base_shard: Shard, tensor: Any, request_id: Any = None, inference_state: Any = None
    ) -> None:
        return None

    async def _process_tensor(
        self, base_shard: Shard, tensor: Any, request_id: Any = None, inference_state: Any = None
    ) -> None:
        return None

    async def process_inference_result(
        self, shard: Shard, result: Any, request_id: Any = None, inference_state: Any = None
    ) -> None:
        return None

    async def forward_prompt(
        self, base_shard: Shard, prompt: str, request_id: str, target_index: int, inference_state: Any = None
    ) -> None:
        return None

    async def forward_tensor(
        self, base_shard: Shard, tensor: Any, request_id: str, target_index: int, inference_state: Any = None
    ) -> None:
        return None

    def get_current_shard(self, base_shard: Shard, index: int | None = None) -> Shard:
        return base_shard

    async def broadcast_result(self, request_id: str, result: list[int], is_finished: bool) -> None:
        for peer in self.peers:
            await peer.send_result(request_id, result, is_finished)

    async def broadcast_opaque_status(self, request_id: str, status: str) -> None:
        for peer in self.peers:
            await peer.send_opaque_status(request_id, status)
        self.on_opaque_status.trigger_all(request_id, status)

    def get_supported_inference_engines(self) -> list[str]:
        return ["tinygrad"]

    async def select_best_inference_engine(self) -> None:
        self.inference_engine = "swapped-for-tinygrad"


# --- exo.api.chatgpt_api ---------------------------------------------------------------
class ChatGPTAPI:
    def __init__(
        self,
        node: Any,
        inference_engine_classname: str,
        response_timeout: int = 90,
        on_chat_completion_request: Any = None,
        default_model: str | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.node = node
        self.inference_engine_classname = inference_engine_classname
        self.response_timeout = response_timeout
        self.on_chat_completion_request = on_chat_completion_request
        self.default_model = default_model or "llama-3.2-1b"
        self.system_prompt = system_prompt
        self.token_queues: defaultdict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
        # As exo's __init__: the node's tokens land in the request's queue.
        self.token_callback = node.on_token.register("chatgpt-api-token-handler")
        self.token_callback.on_next(
            lambda _request_id, tokens, is_finished: asyncio.create_task(
                self.handle_tokens(_request_id, tokens, is_finished)
            )
        )
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.handle_get_models)
        self.app.router.add_post("/v1/chat/completions", self.handle_post_chat_completions)
        self.app.router.add_get("/v1/topology", self.handle_get_topology)
        self.app.router.add_get("/initial_models", self.handle_get_initial_models)
        self.app.router.add_get("/modelpool", self.handle_model_support)
        self.app.router.add_post("/download", self.handle_post_download)
        self.app.router.add_delete("/models/{model_name}", self.handle_delete_model)
        self.static_dir = STATIC_DIR
        self.app.router.add_get("/", self.handle_root)

    async def handle_root(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.static_dir / "index.html")

    async def handle_post_chat_completions(self, request: web.Request) -> web.Response:
        models = sys.modules["exo.models"]
        data = await request.json()
        model = data.get("model", self.default_model)
        if model.startswith("gpt-") or model not in models.model_cards:
            model = self.default_model  # exo's silent substitution
        return web.json_response({"object": "chat.completion", "model": model, "served_by": "exo"})

    async def handle_get_models(self, request: web.Request) -> web.Response:
        cards = sys.modules["exo.models"].model_cards
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "exo", "ready": True} for m in cards]}
        )

    async def handle_get_topology(self, request: web.Request) -> web.Response:
        nodes = {n: {"model": c.model, "chip": c.chip} for n, c in self.node.topology.nodes.items()}
        return web.json_response({"nodes": nodes, "peer_graph": {}, "active_node_id": None})

    async def handle_get_initial_models(self, request: web.Request) -> web.Response:
        models = sys.modules["exo.models"]
        listing = {
            m: {
                "name": models.get_pretty_name(m),
                "downloaded": None,
                "download_percentage": None,
                "total_size": None,
                "total_downloaded": None,
                "loading": True,
            }
            for m in models.get_supported_models([[self.inference_engine_classname]])
        }
        return web.json_response(listing)

    async def handle_model_support(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for model in sys.modules["exo.models"].model_cards:  # exo asks its downloader: all "0%"
            await response.write(f'data: {{"{model}": {{"downloaded": false}}}}\n\n'.encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def handle_post_download(self, request: web.Request) -> web.Response:
        data = await request.json()
        return web.json_response({"status": "success", "message": f"Download started for model: {data['model']}"})

    async def handle_delete_model(self, request: web.Request) -> web.Response:
        return web.json_response({"detail": f"Model {request.match_info['model_name']} files not found"}, status=404)

    async def handle_tokens(self, request_id: str, tokens: list[int], is_finished: bool) -> None:
        await self.token_queues[request_id].put((tokens, is_finished))


# tinychat's page as exo ships it, reduced to what the add-on's hook relies on.
STATIC_DIR = Path(__file__).parent / "fake_tinychat"


# --- exo.viz.topology_viz ----------------------------------------------------------------
class TopologyViz:
    """exo's TUI: a prompt panel fed by ``update_prompt`` and a 100 x 48 ring canvas with a
    three-line entry per partition ("label NGB", TFLOPS, layer range); here each entry sits
    at a fixed place, and a ring line is drawn over its label's first character, as exo's
    lines can be."""

    def __init__(self, chatgpt_api_endpoints: Any = (), web_chat_urls: Any = ()) -> None:
        self.topology = Topology({})
        self.partitions: list[Partition] = []
        self.requests: dict[str, list[Any]] = {}

    def update_prompt(self, request_id: str, prompt: str | None = None) -> None:
        self.requests[request_id] = [prompt, self.requests.get(request_id, ["", ""])[1]]

    def _generate_main_layout(self) -> str:
        canvas = [[" "] * 100 for _ in range(48)]
        for i, partition in enumerate(self.partitions):
            caps = self.topology.nodes[partition.node_id]
            y, x = 10 + 12 * i, 4 + 50 * i
            span = f"[{partition.start:.2f}-{partition.end:.2f}]"
            lines = [f"{caps.model} {caps.memory // 1024}GB", "0.0TFLOPS", span]
            for j, line in enumerate(lines):
                for k, char in enumerate(line):
                    if x + k < 100:
                        canvas[y + j][x + k] = char
            canvas[y][x] = "-"
        return "\n".join("".join(row) for row in canvas)


def use_fakes(monkeypatch: Any) -> dict[str, types.ModuleType]:
    """Fresh fake exo modules in sys.modules for one test (``monkeypatch`` puts back what
    was there); any real exo module is taken out meanwhile."""
    modules = build_modules()
    for name in [n for n in sys.modules if n == "exo" or n.startswith("exo.")]:
        monkeypatch.delitem(sys.modules, name)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def token_loop_node(node_cls: type, max_generate_tokens: int = 1024) -> type:
    """``node_cls`` (the fake Node, hooks installed) with exo's token loop for a one-node
    ring: process_prompt runs infer_prompt, then process_inference_result samples a token,
    triggers the on_token callbacks and, until EOS or the token limit, schedules the next
    infer_tensor as a task (exo's forward_tensor to itself), returning after the first
    token as exo's does."""

    class TokenLoopNode(node_cls):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.buffered_token_output: dict[str, tuple[list[int], bool]] = {}
            self.max_generate_tokens = max_generate_tokens
            self.loop_tasks: set[asyncio.Task[None]] = set()

        async def process_prompt(
            self, base_shard: Any, prompt: str, request_id: str | None = None, inference_state: Any = None
        ) -> None:
            assert request_id is not None
            shard = self.get_current_shard(base_shard)
            result, state = await self.inference_engine.infer_prompt(request_id, shard, prompt, inference_state or {})
            await self.process_inference_result(shard, result, request_id, state)

        async def process_inference_result(
            self, shard: Any, result: Any, request_id: Any = None, inference_state: Any = None
        ) -> None:
            tokens, _ = self.buffered_token_output.setdefault(request_id, ([], False))
            token = await self.inference_engine.sample(result, temp=0.0)
            await self.inference_engine.ensure_shard(shard)
            tokens.append(token.item())  # as exo does: the engine's own object, not int()
            eos = self.inference_engine.tokenizer.eos_token_id
            is_finished = tokens[-1] == eos or len(tokens) >= self.max_generate_tokens
            self.on_token.trigger_all(request_id, [tokens[-1]], is_finished)
            if is_finished:
                self.buffered_token_output[request_id] = (tokens, True)
                return
            task = asyncio.create_task(self._next(shard, token.reshape(1, -1), request_id, inference_state))
            self.loop_tasks.add(task)
            task.add_done_callback(self.loop_tasks.discard)

        async def _next(self, shard: Any, tensor: Any, request_id: str, state: Any) -> None:
            result, state = await self.inference_engine.infer_tensor(request_id, shard, tensor, state)
            await self.process_inference_result(shard, result, request_id, state)

    return TokenLoopNode


def build_modules() -> dict[str, types.ModuleType]:
    """Fresh fake exo modules (module name -> module), by-value copies included."""
    modules = {name: _module(name) for name in PACKAGES}
    modules["exo"].VERSION = "0.0.1-fake"
    modules["exo.helpers"] = _module(
        "exo.helpers", AsyncCallback=_copy_class(AsyncCallback), AsyncCallbackSystem=_copy_class(AsyncCallbackSystem)
    )
    modules["exo.inference.shard"] = _module("exo.inference.shard", Shard=Shard)
    modules["exo.inference.inference_engine"] = _module(
        "exo.inference.inference_engine",
        inference_engine_classes={"dummy": "DummyInferenceEngine", "tinygrad": "TinygradDynamicShardInferenceEngine"},
        get_inference_engine=get_inference_engine,
    )
    modules["exo.inference.tokenizers"] = _module("exo.inference.tokenizers", resolve_tokenizer=resolve_tokenizer)
    modules["exo.models"] = _models_module()
    modules["exo.topology.device_capabilities"] = _module(
        "exo.topology.device_capabilities",
        DeviceCapabilities=DeviceCapabilities,
        DeviceFlops=DeviceFlops,
        device_capabilities=device_capabilities,
    )
    modules["exo.topology.partitioning_strategy"] = _module("exo.topology.partitioning_strategy", Partition=Partition)
    modules["exo.topology.ring_memory_weighted_partitioning_strategy"] = _module(
        "exo.topology.ring_memory_weighted_partitioning_strategy",
        RingMemoryWeightedPartitioningStrategy=_copy_class(RingMemoryWeightedPartitioningStrategy),
    )
    modules["exo.download.download_progress"] = _module(
        "exo.download.download_progress", RepoProgressEvent=RepoProgressEvent
    )
    modules["exo.download.new_shard_download"] = _module(
        "exo.download.new_shard_download", new_shard_downloader=new_shard_downloader
    )
    modules["exo.networking.grpc.grpc_peer_handle"] = _module(
        "exo.networking.grpc.grpc_peer_handle", GRPCPeerHandle=GRPCPeerHandle
    )
    # exo.orchestration.node and exo.api.chatgpt_api copy names by value, as exo's do.
    modules["exo.orchestration.node"] = _module(
        "exo.orchestration.node", Node=_copy_class(Node), get_inference_engine=get_inference_engine
    )
    modules["exo.api.chatgpt_api"] = _module(
        "exo.api.chatgpt_api", ChatGPTAPI=_copy_class(ChatGPTAPI), resolve_tokenizer=resolve_tokenizer
    )
    modules["exo.viz.topology_viz"] = _module("exo.viz.topology_viz", TopologyViz=_copy_class(TopologyViz))
    return modules


def _copy_class(cls: type) -> type:
    """A fresh copy of a class per test, so patches (and their reverts) never leak."""
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, cls.__bases__, namespace)
