"""The exo hooks against small fake exo modules (tests/support/fake_exo.py), in CI without
exo: all-or-nothing install, exact revert, a mismatch that changes nothing, each hook's
behaviour; plus argv handling, the catalog and the remote node's label."""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from exo_remote_engine import engine_adapter
from exo_remote_engine.engine import codec, exo_hooks
from exo_remote_engine.engine.catalog import RemoteCatalog, pretty_name, repo_for
from exo_remote_engine.engine.cluster import REMOTE_NODE_LABEL, ClusterView, remote_chip, remote_sidecar
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.engine.exo_argv import ADDON_FLAGS, engine_requested, strip_addon_flags
from exo_remote_engine.engine.exo_hooks import api, device, download, inference, node, partitioning, peers, tui
from exo_remote_engine.engine.exo_hooks.plan import Needs, Patch, PatchPlan, Target, bind
from exo_remote_engine.engine.exo_hooks.state import STATE, current_model
from exo_remote_engine.generated import remote_inference_pb2 as pb
from tests.support import fake_exo

REMOTE_ARGV = ["exo", "--inference-engine", "remote"]
SIDECAR = "127.0.0.1:50599"


@pytest.fixture
def exo(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, types.ModuleType]]:
    """Fake exo modules in sys.modules for one test; removed, and the hooks reverted, after."""
    modules = fake_exo.use_fakes(monkeypatch)
    monkeypatch.setattr(engine_adapter, "_shared", None)
    exo_hooks.uninstall()
    yield modules
    exo_hooks.uninstall()


@pytest.fixture
def engine(
    exo: dict[str, types.ModuleType], monkeypatch: pytest.MonkeyPatch
) -> engine_adapter.RemoteLLMInferenceEngine:
    """The shared remote engine with a catalog as a sidecar would list it (no sidecar runs:
    the catalog is fresh, so nothing asks one)."""
    eng = engine_adapter.RemoteLLMInferenceEngine(target=SidecarTarget(address=SIDECAR))
    eng.catalog.update(
        pb.ListModelsResponse(
            models=[
                pb.Model(alias="echo-model", provider="openai", ready=True),
                pb.Model(alias="gpt-4o-mini", provider="openai", ready=True),
                pb.Model(
                    alias="claude-x", provider="anthropic", not_ready_reason="set ANTHROPIC_API_KEY on the sidecar"
                ),
            ],
            default_model="echo-model",
        )
    )
    monkeypatch.setattr(engine_adapter, "_shared", eng)
    return eng


def _targets(plan: PatchPlan) -> list[Target]:
    return [p.target for p in plan.patches]


def _snapshot(modules: dict[str, types.ModuleType]) -> dict[tuple[str, str], Any]:
    """Every attribute of every fake module and class, by identity (dict contents too)."""
    seen: dict[tuple[str, str], Any] = {}
    for name, module in modules.items():
        for attr, value in vars(module).items():
            seen[(name, attr)] = dict(value) if isinstance(value, dict) else value
            if inspect.isclass(value):
                for member, raw in vars(value).items():
                    seen[(f"{name}.{attr}", member)] = raw
    return seen


# --- install / revert ------------------------------------------------------------------
def test_install_on_a_remote_node_patches_every_target_and_uninstall_restores_exo(
    exo: dict[str, types.ModuleType], engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(exo)
    assert exo_hooks.install(list(REMOTE_ARGV), {}) is True
    plan = exo_hooks.build_plan(remote_node=True)
    for target in _targets(plan):
        value = target.resolve()
        if target.attr == "inference_engine_classes":
            assert value["remote"] == "RemoteLLMInferenceEngine"
        else:
            assert hasattr(value, "__exo_remote_hook__"), target.describe()
    # the by-value copies made by ``from x import y`` follow the defining module
    assert (
        exo["exo.orchestration.node"].get_inference_engine is exo["exo.inference.inference_engine"].get_inference_engine
    )
    assert exo["exo.api.chatgpt_api"].resolve_tokenizer is exo["exo.inference.tokenizers"].resolve_tokenizer
    err = capsys.readouterr().err
    assert "hooks not installed" not in err
    assert (  # the start-up line: ready models named, the rest counted by reason
        f"exo-remote: sidecar {SIDECAR} serves 2 ready models: echo-model (default), gpt-4o-mini; 1 more not "
        "ready (set ANTHROPIC_API_KEY on the sidecar: 1; `exo-remote models` lists them)\n"
    ) in err
    exo_hooks.uninstall()
    assert _snapshot(exo) == before


def test_install_on_a_local_node_leaves_the_engine_side_alone(exo: dict[str, types.ModuleType]) -> None:
    ie = exo["exo.inference.inference_engine"]
    original_engine = ie.get_inference_engine
    original_downloader = exo["exo.download.new_shard_download"].new_shard_downloader
    node_cls = exo["exo.orchestration.node"].Node
    original_supported = vars(node_cls)["get_supported_inference_engines"]
    assert exo_hooks.install(["exo", "--inference-engine", "dummy"], {}) is True
    assert ie.get_inference_engine is original_engine and "remote" not in ie.inference_engine_classes
    assert exo["exo.download.new_shard_download"].new_shard_downloader is original_downloader
    assert vars(node_cls)["get_supported_inference_engines"] is original_supported
    strategy = exo["exo.topology.ring_memory_weighted_partitioning_strategy"].RingMemoryWeightedPartitioningStrategy
    assert hasattr(strategy.partition, "__exo_remote_hook__"), "rings are model-aware on every add-on node"


@pytest.mark.parametrize(
    ("break_exo", "named"),
    [
        (lambda m: delattr(m["exo.orchestration.node"].Node, "update_peers"), "Node.update_peers"),
        (lambda m: m.pop("exo.api.chatgpt_api"), "exo.api.chatgpt_api.ChatGPTAPI"),
        (
            lambda m: setattr(m["exo.orchestration.node"].Node, "process_prompt", _renamed_process_prompt),
            "Node.process_prompt parameters ['base_shard', 'inference_state']",
        ),
        (
            lambda m: setattr(m["exo.download.download_progress"], "RepoProgressEvent", _eleven_field_event),
            "RepoProgressEvent parameters ['file_progress']",
        ),
        (
            lambda m: setattr(m["exo.api.chatgpt_api"].ChatGPTAPI, "__init__", _init_without_queues),
            "ChatGPTAPI instance attributes ['token_queues']",
        ),
    ],
    ids=["missing-method", "missing-module", "renamed-parameter", "changed-dataclass", "missing-instance-attr"],
)
def test_a_mismatch_changes_nothing_and_says_once_what_is_missing(
    exo: dict[str, types.ModuleType],
    engine: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    break_exo: Any,
    named: str,
) -> None:
    break_exo(exo)
    if "exo.api.chatgpt_api" not in exo:
        monkeypatch.delitem(sys.modules, "exo.api.chatgpt_api")
        monkeypatch.setattr(sys, "meta_path", [])  # no importer may find another one
    before = _snapshot(exo)
    assert exo_hooks.install(list(REMOTE_ARGV), {}) is False
    assert _snapshot(exo) == before, "exo exactly as shipped"
    err = capsys.readouterr().err
    assert "hooks not installed" in err and named in err and "runs as shipped" in err
    assert exo_hooks.install(list(REMOTE_ARGV), {}) is False
    assert capsys.readouterr().err == "", "said once"


async def _renamed_process_prompt(self: Any, shard: Any, prompt: str, request_id: Any = None) -> None:
    return None


def _eleven_field_event(
    shard: Any,
    repo_id: str,
    repo_revision: str,
    completed_files: int,
    total_files: int,
    downloaded_bytes: int,
    downloaded_bytes_this_session: int,
    total_bytes: int,
    overall_speed: int,
    overall_eta: Any,
    status: str,
) -> None:
    return None


def _init_without_queues(self: Any, node: Any, inference_engine_classname: str, *args: Any, **kwargs: Any) -> None:
    self.node, self.inference_engine_classname, self.default_model = node, inference_engine_classname, "x"
    self.response_timeout, self.system_prompt, self.on_chat_completion_request = 90, None, None


def test_an_error_while_applying_rolls_everything_back(
    exo: dict[str, types.ModuleType], engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    class Refusing(type):
        def __setattr__(cls, name: str, value: Any) -> None:
            if name == "handle_delete_model":
                raise RuntimeError("read-only attribute")
            super().__setattr__(name, value)

    api_module = exo["exo.api.chatgpt_api"]
    api_module.ChatGPTAPI = Refusing("ChatGPTAPI", (api_module.ChatGPTAPI,), {})
    before = _snapshot(exo)
    assert exo_hooks.install(list(REMOTE_ARGV), {}) is False
    assert _snapshot(exo) == before
    assert "rolled back" in capsys.readouterr().err


def test_plan_reverts_inherited_attributes_and_dict_items() -> None:
    base = type("Base", (), {"greet": lambda self: "exo"})
    owner = types.ModuleType("exo.fake_owner")
    owner.Child = type("Child", (base,), {})
    owner.table = {"a": 1}
    sys.modules["exo.fake_owner"] = owner
    try:
        plan = PatchPlan(
            [
                Patch(
                    Target("exo.fake_owner", "greet", owner="Child"), lambda original, self: "hooked " + original(self)
                ),
                Patch(Target("exo.fake_owner", "table"), dict_key="b", value=2),
            ]
        )
        assert plan.missing() == []
        plan.apply()
        assert owner.Child().greet() == "hooked exo" and owner.table == {"a": 1, "b": 2}
        plan.revert()
        assert "greet" not in vars(owner.Child) and owner.Child().greet() == "exo" and owner.table == {"a": 1}
    finally:
        del sys.modules["exo.fake_owner"]


def test_bind_keeps_exo_signature_and_async_nature() -> None:
    async def exo_async(a: int, b: int = 2) -> int:
        return a + b

    def exo_sync(a: int) -> int:
        return a

    async def hook_async(original: Any, *args: Any, **kwargs: Any) -> int:
        return 10 * await original(*args, **kwargs)

    patched = bind(hook_async, exo_async)
    assert inspect.iscoroutinefunction(patched) and list(inspect.signature(patched).parameters) == ["a", "b"]
    assert asyncio.run(patched(1, b=3)) == 40
    assert bind(lambda original, a: original(a) + 1, exo_sync)(1) == 2
    assert Needs(Target("exo.not_there", "x")).problems() == ["exo.not_there.x (ModuleNotFoundError)"]


# --- engine-side hooks -------------------------------------------------------------------
async def test_engine_registry_and_tokenizer(exo: dict[str, types.ModuleType], engine: Any) -> None:
    original = exo["exo.inference.inference_engine"].get_inference_engine
    assert inference.get_inference_engine(original, inference_engine_name="remote", shard_downloader="dl") is engine
    assert isinstance(inference.get_inference_engine(original, "dummy", None), fake_exo.DummyInferenceEngine)
    with pytest.raises(ValueError, match="Unsupported"):
        inference.get_inference_engine(original, "nope", None)
    resolve = exo["exo.inference.tokenizers"].resolve_tokenizer
    assert await inference.resolve_tokenizer(resolve, repo_for("gpt-4o-mini")) is engine.tokenizer
    assert await inference.resolve_tokenizer(resolve, "meta/llama") == "hugging-face-tokenizer:meta/llama"


async def test_remote_node_label_fits_exo_tui_and_names_its_sidecar(
    exo: dict[str, types.ModuleType], engine: Any
) -> None:
    caps = await device.remote_device_capabilities(None)
    assert caps.model == REMOTE_NODE_LABEL
    tui_label = f"{caps.model} {caps.memory // 1024}GB"  # what exo's TUI draws, clipped in its narrow canvas
    assert len(tui_label) <= 20, tui_label
    assert caps.chip == f"sidecar {SIDECAR}: 2/3 models ready (echo-model, gpt-4o-mini)"
    assert remote_sidecar(caps.model, caps.chip) == (SIDECAR, "2/3 models ready (echo-model, gpt-4o-mini)")
    assert caps.memory >= device.MIN_MEMORY_MB


async def test_local_node_description_falls_back_without_tinygrad(exo: dict[str, types.ModuleType]) -> None:
    caps = await device.local_device_capabilities(exo["exo.topology.device_capabilities"].device_capabilities)
    assert "no tinygrad" in caps.model and caps.memory > 0

    async def exo_says() -> str:
        return "exo's own"

    assert await device.local_device_capabilities(exo_says) == "exo's own"


async def test_remote_downloader_reports_ready_models_complete_and_hides_unready(
    exo: dict[str, types.ModuleType], engine: Any
) -> None:
    exo_hooks.install(list(REMOTE_ARGV), {})  # model cards for the catalog
    downloader = download.new_shard_downloader(None, max_parallel_downloads=8)
    events = [e async for _, e in downloader.get_shard_download_status("RemoteLLMInferenceEngine")]
    assert [e.shard.model_id for e in events] == ["echo-model", "gpt-4o-mini"], "claude-x is not ready"
    assert all(e.downloaded_bytes == e.total_bytes == 0 and e.status == "complete" for e in events)
    assert events[1].repo_id == repo_for("gpt-4o-mini")


# --- node hooks ------------------------------------------------------------------------
def _node(exo: dict[str, types.ModuleType], node_id: str, engine: Any) -> Any:
    node_cls = exo["exo.orchestration.node"].Node
    strategy = exo["exo.topology.ring_memory_weighted_partitioning_strategy"].RingMemoryWeightedPartitioningStrategy()
    return node_cls(node_id, None, engine, None, None, partitioning_strategy=strategy)


def _caps(model: str, memory: int = 8192) -> Any:
    return fake_exo.DeviceCapabilities(model, "chip", memory, fake_exo.DeviceFlops(0, 0, 0))


async def test_node_init_listens_for_statuses_and_tokens(exo: dict[str, types.ModuleType], engine: Any) -> None:
    exo_hooks.install(list(REMOTE_ARGV), {})
    remote = _node(exo, "r", engine)
    assert STATE.view is not None and STATE.view.self_id == "r" and STATE.remote_nodes == [remote]
    assert "exo-remote-engine" in remote.on_token.callbacks
    assert remote.get_supported_inference_engines() == ["remote"]
    await remote.select_best_inference_engine()
    assert remote.inference_engine is engine, "never swapped for tinygrad"
    await remote.broadcast_opaque_status("", ClusterView.announcement("d", "DummyInferenceEngine", {}, None))
    assert STATE.view.peers["d"].engine_class == "DummyInferenceEngine"


async def test_process_prompt_relays_a_remote_model_to_its_server(exo: dict[str, types.ModuleType]) -> None:
    exo_hooks.install(["exo", "--inference-engine", "dummy"], {})
    local = _node(exo, "d", fake_exo.DummyInferenceEngine())
    peer = fake_exo.GRPCPeerHandle("r")
    local.peers = [peer]
    local.topology.nodes = {"d": _caps("Linux box"), "r": _caps(REMOTE_NODE_LABEL)}
    assert STATE.view is not None
    STATE.view.absorb(
        ClusterView.announcement("r", "RemoteLLMInferenceEngine", {"gpt-4o-mini": "gpt-4o-mini"}, SIDECAR, ["d"])
    )
    shard = fake_exo.Shard("gpt-4o-mini", 0, 0, 1)
    assert await local.process_prompt(shard, "{}", request_id="req-1") is None
    kinds = [s[0] for s in peer.sent]
    assert kinds == ["status", "prompt"], "the reply-to note goes ahead of the prompt"
    assert '"node_id": "d"' in peer.sent[0][1][1]
    assert peer.sent[1][2] == {"request_id": "req-1", "inference_state": None}
    # a local model stays with exo, with a fresh inference_state each time
    await local.process_prompt(fake_exo.Shard("llama-3.2-1b", 0, 0, 16), "hi", request_id="req-2")
    call = local.calls[-1]
    assert call[0] == "process_prompt" and call[2]["request_id"] == "req-2" and call[2]["state"] == {}
    # a server that went away: a clear error naming it
    peer.connected = False

    async def refuse() -> None:
        raise ConnectionError

    peer.connect = refuse  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="served by node 'r', which is not reachable"):
        await local.process_prompt(shard, "{}", request_id="req-3")


def test_partition_is_model_aware(exo: dict[str, types.ModuleType]) -> None:
    strategy_cls = exo["exo.topology.ring_memory_weighted_partitioning_strategy"].RingMemoryWeightedPartitioningStrategy
    original = vars(strategy_cls)["partition"]
    topology = fake_exo.Topology(
        {"d": _caps("Linux box", 4096), "e": _caps("Mac", 12288), "r": _caps(REMOTE_NODE_LABEL)}
    )
    assert [p.node_id for p in partitioning.partition(original, strategy_cls(), topology)] == ["e", "r", "d"], (
        "no view: exo's"
    )
    STATE.view = ClusterView("d")
    STATE.view.absorb(
        ClusterView.announcement("r", "RemoteLLMInferenceEngine", {"echo-model": "echo-model"}, SIDECAR, ["d"])
    )
    token = current_model.set("echo-model")
    try:
        assert [(p.node_id, p.end) for p in partitioning.partition(original, strategy_cls(), topology)] == [("r", 1.0)]
    finally:
        current_model.reset(token)
    token = current_model.set("llama-3.2-1b")
    try:
        ring = partitioning.partition(original, strategy_cls(), topology)
    finally:
        current_model.reset(token)
    assert [(p.node_id, p.start, p.end) for p in ring] == [("e", 0.0, 0.75), ("d", 0.75, 1.0)], "local rings skip r"


async def test_ring_methods_run_with_their_shards_model() -> None:
    seen: list[str | None] = []

    async def exo_method(self: Any, base_shard: Any, tensor: Any) -> None:
        seen.append(current_model.get())

    def exo_sync(self: Any, base_shard: Any, index: Any = None) -> Any:
        seen.append(current_model.get())

    shard = fake_exo.Shard("m1", 0, 0, 1)
    await node.with_shard_model_async(exo_method, None, shard, "t")
    node.with_shard_model(exo_sync, None, base_shard=shard)
    assert seen == ["m1", "m1"] and current_model.get() is None


async def test_update_peers_forgets_a_peer_that_left(exo: dict[str, types.ModuleType]) -> None:
    exo_hooks.install(["exo", "--inference-engine", "dummy"], {})
    local = _node(exo, "d", fake_exo.DummyInferenceEngine())
    local.peers = [fake_exo.GRPCPeerHandle("r")]
    assert STATE.view is not None
    STATE.view.absorb(
        ClusterView.announcement("r", "RemoteLLMInferenceEngine", {"echo-model": "echo-model"}, SIDECAR, ["d"])
    )
    local.next_peers = []
    await local.update_peers()
    assert STATE.view.peers["r"].models == () and STATE.view.remote_model_ids() == {"echo-model": "echo-model"}


async def test_broadcast_keeps_tokens_in_order() -> None:
    received: list[tuple[list[int], bool]] = []

    async def exo_broadcast(self: Any, request_id: str, result: list[int], is_finished: bool) -> None:
        await asyncio.sleep(0.01)  # a unary call in flight
        received.append((result, is_finished))

    sends = [node.ordered_broadcast_result(exo_broadcast, None, "req", [i], i == 4) for i in range(5)]
    await asyncio.gather(*sends)
    flattened = [t for batch, _ in received for t in batch]
    assert flattened == [0, 1, 2, 3, 4] and received[-1][1] is True
    assert len(received) < 5, "what arrived meanwhile went out as one batch"


async def test_broadcast_sends_the_ids_a_step_carries() -> None:
    """A step (one loop turn of the remote engine) only means something in its own process:
    peers get plain codec ids, which their own tokenizer decodes."""
    received: list[list[int]] = []

    async def exo_broadcast(self: Any, request_id: str, result: list[int], is_finished: bool) -> None:
        received.append(result)

    text_step = codec.Step(codec.encode_text("漢字 and more"))
    end_step = codec.Step([*codec.encode_control(b"{}"), codec.EOS_ID])
    await node.ordered_broadcast_result(exo_broadcast, None, "req", [text_step], False)
    await node.ordered_broadcast_result(exo_broadcast, None, "req", [end_step], True)
    wire = [t for batch in received for t in batch]
    assert all(type(t) is int for t in wire) and wire[-1] == codec.EOS_ID
    assert codec.decode_ids(wire) == "漢字 and more" and len(wire) > 2


def test_trigger_all_gives_each_callback_its_own_list(exo: dict[str, types.ModuleType]) -> None:
    system = exo["exo.helpers"].AsyncCallbackSystem()
    got: dict[str, list[int]] = {}
    system.register("tui").on_next(lambda rid, tokens, done: tokens.extend([99]))
    system.register("api").on_next(lambda rid, tokens, done: got.setdefault("api", tokens))
    tokens = [1, 2]
    tui.trigger_all(None, system, "req", tokens, False)
    assert got["api"] == [1, 2] and tokens == [1, 2]


def test_status_notes_are_remembered_and_exos_own_statuses_ignored(
    exo: dict[str, types.ModuleType], engine: Any
) -> None:
    """A cancellation status is checked end to end, with a real engine stopping a real
    upstream call: tests/engine/test_exo_api.py."""
    STATE.view = ClusterView("r")
    remote = types.SimpleNamespace(inference_engine=engine, id="r", peers=[])
    peers.on_status(remote, peers.reply_note("req-9", "d"))
    assert STATE.reply_to == {"req-9": "d"}
    peers.on_status(remote, '{"type": "node_status"}')  # exo's own: ignored
    assert STATE.reply_to == {"req-9": "d"}


# --- API hooks (a real aiohttp server on 127.0.0.1 around the fake ChatGPTAPI) -------------
@pytest.fixture
async def remote_api(exo: dict[str, types.ModuleType], engine: Any) -> AsyncIterator[TestClient]:
    assert exo_hooks.install(list(REMOTE_ARGV), {}) is True
    remote = _node(exo, "r", engine)
    chat_api = exo["exo.api.chatgpt_api"].ChatGPTAPI(remote, "RemoteLLMInferenceEngine")
    assert chat_api.default_model == "echo-model", "exo's llama default cannot run here"
    async with TestClient(TestServer(chat_api.app, host="127.0.0.1")) as client:
        yield client


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which model ids reached the remote chat handler (its own tests cover the rest)."""
    from exo_remote_engine.engine import exo_api

    reached: list[str] = []

    async def handle(self: Any, request: Any, body: Any) -> Any:
        reached.append(self.exo_id)
        return exo_api.web.json_response({"model": self.exo_id})

    monkeypatch.setattr(exo_api.RemoteChatHandler, "handle", handle)
    return reached


async def test_gpt_ids_are_served_as_they_are_and_unknown_ones_are_404(
    remote_api: TestClient, handled: list[str]
) -> None:
    reply = await remote_api.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
    assert reply.status == 200 and (await reply.json())["model"] == "gpt-4o-mini"
    for unknown in ("gpt-4o", "no-such-model"):
        reply = await remote_api.post("/v1/chat/completions", json={"model": unknown, "messages": []})
        assert reply.status == 404, unknown
        message = (await reply.json())["error"]["message"]
        assert f"unknown model {unknown!r}" in message and "echo-model" in message
    assert handled == ["gpt-4o-mini"]
    reply = await remote_api.post("/v1/chat/completions", data=b"{not json")
    assert reply.status == 400


async def test_local_node_relays_remote_ids_and_keeps_exo_for_the_rest(
    exo: dict[str, types.ModuleType], handled: list[str]
) -> None:
    exo_hooks.install(["exo", "--inference-engine", "dummy"], {})
    local = _node(exo, "d", fake_exo.DummyInferenceEngine())
    assert STATE.view is not None
    STATE.view.absorb(
        ClusterView.announcement("r", "RemoteLLMInferenceEngine", {"gpt-4o-mini": "gpt-4o-mini"}, SIDECAR, ["d"])
    )
    chat_api = exo["exo.api.chatgpt_api"].ChatGPTAPI(local, "DummyInferenceEngine")
    async with TestClient(TestServer(chat_api.app, host="127.0.0.1")) as client:
        reply = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
        assert (await reply.json())["model"] == "gpt-4o-mini" and handled == ["gpt-4o-mini"]
        reply = await client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": []})
        assert (await reply.json()) == {"object": "chat.completion", "model": "llama-3.2-1b", "served_by": "exo"}


async def test_model_list_shows_readiness(remote_api: TestClient) -> None:
    listing = {m["id"]: m for m in (await (await remote_api.get("/v1/models")).json())["data"]}
    assert listing["gpt-4o-mini"]["ready"] is True and listing["gpt-4o-mini"]["owned_by"] == "exo-remote:openai"
    assert listing["claude-x"]["ready"] is False
    assert listing["claude-x"]["not_ready_reason"] == "set ANTHROPIC_API_KEY on the sidecar"
    assert listing["llama-3.2-1b"]["owned_by"] == "exo"


async def test_tinychat_initial_list_is_truthful(remote_api: TestClient) -> None:
    initial = await (await remote_api.get("/initial_models")).json()
    assert initial["echo-model"] == {
        "name": "Echo Model",  # readable, and without the provider: the sidebar group names it
        "provider": "OpenAI",
        "family": "Echo",
        "downloaded": True,
        "download_percentage": api.REMOTE_PERCENTAGE,
        "total_size": 0,
        "total_downloaded": 0,
        "loading": False,
    }
    assert (initial["gpt-4o-mini"]["provider"], initial["gpt-4o-mini"]["family"]) == ("OpenAI", "GPT")
    assert initial["gpt-4o-mini"]["loading"] is False and initial["gpt-4o-mini"]["downloaded"] is True
    assert "claude-x" not in initial, "not ready: not downloadable, left out"
    pool_text = await (await remote_api.get("/modelpool")).text()
    events = [e.removeprefix("data: ") for e in pool_text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    pool = {k: v for e in events[:-1] for k, v in json.loads(e).items()}
    assert pool == {m: initial[m] for m in ("echo-model", "gpt-4o-mini")}, "the same truth 25 ms later"
    # tinychat: "Download" when the percentage is null or < 100, a delete button when > 0;
    # the remote marker is neither, as JavaScript compares a non-numeric string (NaN).
    assert initial["echo-model"]["download_percentage"] == api.REMOTE_PERCENTAGE
    assert not api.REMOTE_PERCENTAGE.replace(".", "", 1).isdigit()


async def test_tinychat_page_gets_the_addon_script_after_exo_own(remote_api: TestClient) -> None:
    reply = await remote_api.get("/")
    assert reply.status == 200 and reply.content_type == "text/html"
    page = await reply.text()
    exo_script = page.index('<script src="/index.js"></script>')
    ours = page.index('<script id="exo-remote-tinychat">')
    assert exo_script < ours, "after exo's component is registered"
    assert 'const config = {"default_model": "echo-model"};' in page, "the node's default remote model"
    assert "groupModelsByPrefix" in page and "provider" in page


async def test_download_and_delete_of_remote_models_are_clear_400s(remote_api: TestClient) -> None:
    reply = await remote_api.post("/download", json={"model": "echo-model"})
    assert reply.status == 400 and "Nothing to download" in (await reply.json())["error"]
    reply = await remote_api.post("/download", json={"model": "claude-x"})
    assert "set ANTHROPIC_API_KEY on the sidecar" in (await reply.json())["error"]
    reply = await remote_api.delete("/models/gpt-4o-mini")
    detail = (await reply.json())["detail"]
    assert reply.status == 400 and "remote model" in detail and SIDECAR in detail and "Nothing to delete" in detail
    reply = await remote_api.post("/download", json={"model": "llama-3.2-1b"})
    assert reply.status == 200, "local models: exo's answer"
    assert (await remote_api.delete("/models/llama-3.2-1b")).status == 404


async def test_topology_names_add_on_nodes(remote_api: TestClient) -> None:
    assert STATE.view is not None
    STATE.view.absorb(ClusterView.announcement("r", "RemoteLLMInferenceEngine", {"echo-model": "echo-model"}, SIDECAR))
    STATE.remote_nodes[0].topology.nodes = {"r": _caps(REMOTE_NODE_LABEL)}
    body = await (await remote_api.get("/v1/topology")).json()
    assert body["exo_remote"]["nodes"]["r"] == {
        "engine": "RemoteLLMInferenceEngine",
        "models": ["echo-model"],
        "sidecar": SIDECAR,
        "sidecar_hosts": [],
    }
    # A node with several sidecar hosts announces each with its health; "sidecar" stays.
    several = "ipv4:10.0.0.5:50505,10.0.0.6:50505"
    hosts = {"10.0.0.5:50505": "SERVING", "10.0.0.6:50505": "unreachable"}
    STATE.view.absorb(
        ClusterView.announcement("r", "RemoteLLMInferenceEngine", {"echo-model": "echo-model"}, several, (), hosts)
    )
    body = await (await remote_api.get("/v1/topology")).json()
    assert body["exo_remote"]["nodes"]["r"]["sidecar"] == several
    assert body["exo_remote"]["nodes"]["r"]["sidecar_hosts"] == [
        {"address": "10.0.0.5:50505", "status": "SERVING"},
        {"address": "10.0.0.6:50505", "status": "unreachable"},
    ]


# --- argv, catalog, label -------------------------------------------------------------------
def test_strip_addon_flags_moves_them_to_the_environment() -> None:
    argv = ["exo", "--sidecar", "h:1", "--node-id", "a", "--sidecar-tls-ca=/ca.pem", "--inference-engine", "remote"]
    env: dict[str, str] = {}
    strip_addon_flags(argv, env)
    assert argv == ["exo", "--node-id", "a", "--inference-engine", "remote"]
    assert env == {"EXO_REMOTE_SIDECAR": "h:1", "EXO_REMOTE_TLS_CA": "/ca.pem"}
    with pytest.raises(SystemExit, match="--sidecar-token-file needs a value"):
        strip_addon_flags(["exo", "--sidecar-token-file"], {})
    assert set(ADDON_FLAGS.values()) <= {
        f"EXO_REMOTE_{s}" for s in ("SIDECAR", "TOKEN_FILE", "TLS_CA", "TLS_CERT", "TLS_KEY")
    }


def test_engine_requested_reads_both_spellings() -> None:
    assert engine_requested(["exo", "--inference-engine", "remote"]) == "remote"
    assert engine_requested(["exo", "--inference-engine=dummy"]) == "dummy"
    assert engine_requested(["exo", "--inference-engine"]) is None
    assert engine_requested(["exo"]) is None


def test_catalog_keeps_sidecar_ids_as_they_are() -> None:
    catalog = RemoteCatalog()
    catalog.update(
        pb.ListModelsResponse(
            models=[pb.Model(alias="gpt-4o-mini", ready=True), pb.Model(alias="slow", ready=False)],
            default_model="missing",
        )
    )
    assert list(catalog.models) == ["gpt-4o-mini", "slow"]
    assert catalog.default_id == "gpt-4o-mini", "the configured default is gone: the first ready model"
    assert catalog.alias("gpt-4o-mini") == "gpt-4o-mini" and catalog.alias("other") == "other"
    assert catalog.get("remote-gpt-4o-mini") is None
    assert catalog.age_s() < 60
    assert RemoteCatalog().age_s() == float("inf")
    assert pretty_name(pb.Model(alias="gpt-4o-mini", provider="openai")) == "GPT 4o Mini (OpenAI)"
    assert repo_for("x") == "exo-remote/x"


def test_remote_label_round_trip_and_legacy_label() -> None:
    chip = remote_chip("10.0.0.5:50505", ["a", "b", "c", "d", "e"], 7)
    assert chip == "sidecar 10.0.0.5:50505: 5/7 models ready (a, b, c, d, ...)"
    assert remote_sidecar(REMOTE_NODE_LABEL, chip) == ("10.0.0.5:50505", "5/7 models ready (a, b, c, d, ...)")
    assert remote_sidecar("Remote LLM via 10.0.0.6:1", "remote: 1/1 models ready (x)") == (
        "10.0.0.6:1",
        "1/1 models ready (x)",
    )
    assert remote_sidecar("Linux box", "CPU") is None
    view = ClusterView("a")
    assert view.is_remote("n", REMOTE_NODE_LABEL) and not view.is_remote("n", "Linux box")


async def test_node_start_announces_this_node_to_its_peers(exo: dict[str, types.ModuleType], engine: Any) -> None:
    exo_hooks.install(list(REMOTE_ARGV), {})
    remote = _node(exo, "r", engine)
    peer = fake_exo.GRPCPeerHandle("d")
    remote.peers = [peer]
    await remote.start()
    assert remote.calls[0] == ("start", (0,), {}), "exo's own start ran"
    try:
        for _ in range(100):
            if peer.sent:
                break
            await asyncio.sleep(0.05)
        kind, (_request_id, status), _ = peer.sent[0]
        said = json.loads(status)
        assert (kind, said["type"], said["node_id"], said["sidecar"]) == ("status", "exo_remote_node", "r", SIDECAR)
        assert said["models"] == {"echo-model": "echo-model", "gpt-4o-mini": "gpt-4o-mini"}, "ready ones only"
    finally:
        for task in STATE.background:
            task.cancel()
        await asyncio.gather(*STATE.background, return_exceptions=True)


def test_peers_announcements_become_model_cards(exo: dict[str, types.ModuleType], engine: Any) -> None:
    models = exo["exo.models"]
    exo_hooks.install(["exo", "--inference-engine", "dummy"], {})
    local = _node(exo, "d", fake_exo.DummyInferenceEngine())
    assert STATE.view is not None
    announced = ClusterView.announcement("r", "RemoteLLMInferenceEngine", {"gpt-4o-mini": "gpt-4o-mini"}, SIDECAR)
    peers.on_status(local, announced)
    card = models.model_cards["gpt-4o-mini"]
    assert card["layers"] == 1 and card["repo"]["DummyInferenceEngine"] == repo_for("gpt-4o-mini"), "any API relays it"
    # on a remote node, a local model its peers serve gets a repo of the remote class too
    exo_hooks.uninstall()
    assert "gpt-4o-mini" not in models.model_cards, "uninstall removes the cards it added"
    exo_hooks.install(list(REMOTE_ARGV), {})
    remote = _node(exo, "r", engine)
    peers.on_status(remote, ClusterView.announcement("d", "DummyInferenceEngine", {}, None))
    assert models.model_cards["llama-3.2-1b"]["repo"]["RemoteLLMInferenceEngine"] == "dummy"
