"""exo's chat endpoint for remote models, end to end in CI: the OpenAI-faithful handler
(engine/exo_api.py, ``RemoteChatHandler.handle``) behind the installed hooks, in a real
aiohttp server on 127.0.0.1, asked by real HTTP clients (aiohttp, the openai SDK). The
engine is the real remote engine, its tokens run through exo's token loop (the fake node's
copy of it, tests/support/fake_exo.py) and come from a real sidecar reading a real
upstream. Only exo itself is a stand-in; its shape is pinned (test_exo_signatures.py)."""

from __future__ import annotations

import asyncio
import json
import types
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from exo_remote_engine import engine_adapter
from exo_remote_engine.engine import exo_hooks
from exo_remote_engine.engine.cluster import CANCEL_TYPE
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.server import RunningSidecar
from tests.support import fake_exo
from tests.support.openai_upstream import OpenAIUpstream, Scenario, ToolCallSpec
from tests.support.waits import eventually

REMOTE_ARGV = ["exo", "--inference-engine", "remote"]
pytestmark = pytest.mark.timeout(60)


@dataclass
class ExoApi:
    client: TestClient  # aiohttp's client on the server's real 127.0.0.1 port
    upstream: OpenAIUpstream
    engine: engine_adapter.RemoteLLMInferenceEngine
    node: Any

    @property
    def base_url(self) -> str:
        return str(self.client.make_url("/v1"))


@pytest.fixture
async def exo_api(
    monkeypatch: pytest.MonkeyPatch, upstream: OpenAIUpstream, sidecar_for: Callable[..., Any]
) -> AsyncIterator[ExoApi]:
    upstream.scenarios["echo-model"] = Scenario(chunks=["Hello", ", ", "wörld", " 👋"], usage=(7, 4))
    upstream.scenarios["cut-model"] = Scenario(chunks=["one ", "two ", "three"], finish_reason="length")
    lookup = ToolCallSpec(id="call_1", name="lookup", arguments='{"q": "exo"}')
    upstream.scenarios["tool-model"] = Scenario(chunks=[], tool_calls=[lookup], finish_reason="tool_calls")
    upstream.scenarios["refused-model"] = Scenario(status=429, retry_after="7", error_message="slow down")
    upstream.scenarios["long-model"] = Scenario(chunks=[f"w{i} " for i in range(3000)], interval_s=0.01)
    aliases = ("echo-model", "cut-model", "tool-model", "refused-model", "long-model")
    sidecar: RunningSidecar = await sidecar_for(upstream, *aliases)
    modules: dict[str, types.ModuleType] = fake_exo.use_fakes(monkeypatch)
    engine = engine_adapter.RemoteLLMInferenceEngine(target=SidecarTarget(address=sidecar.address))
    monkeypatch.setattr(engine_adapter, "_shared", engine)
    exo_hooks.uninstall()
    assert exo_hooks.install(list(REMOTE_ARGV), {}) is True
    try:
        node_cls = fake_exo.token_loop_node(modules["exo.orchestration.node"].Node)
        ring = modules["exo.topology.ring_memory_weighted_partitioning_strategy"].RingMemoryWeightedPartitioningStrategy
        node = node_cls("r", None, engine, None, None, partitioning_strategy=ring())
        chat_api = modules["exo.api.chatgpt_api"].ChatGPTAPI(node, "RemoteLLMInferenceEngine")
        async with TestClient(TestServer(chat_api.app, host="127.0.0.1")) as client:
            yield ExoApi(client, upstream, engine, node)
    finally:
        exo_hooks.uninstall()
        await engine.close()


def _sse(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


async def test_a_streamed_reply_is_openai_faithful(exo_api: ExoApi) -> None:
    body = {
        "model": "echo-model",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 33,
        "stop": ["END"],
        "temperature": 0.3,
    }
    reply = await exo_api.client.post("/v1/chat/completions", json=body)
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
    events = _sse(await reply.text())
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "echo-model" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello, wörld 👋"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 7
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    # What exo's own parser drops reached the provider.
    sent = exo_api.upstream.requests_for("echo-model")[-1].body
    assert sent is not None and (sent["max_tokens"], sent["stop"], sent["temperature"]) == (33, ["END"], 0.3)
    assert sent["messages"][-1]["content"] == "Hi"


async def test_the_openai_sdk_reads_replies_finish_reasons_and_tool_calls(exo_api: ExoApi) -> None:
    client = openai.AsyncOpenAI(base_url=exo_api.base_url, api_key="unused", max_retries=0, timeout=30)
    try:
        whole = await client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "x"}])
        assert whole.choices[0].message.content == "Hello, wörld 👋"
        assert whole.choices[0].finish_reason == "stop" and whole.usage is not None and whole.usage.prompt_tokens == 7
        cut = await client.chat.completions.create(model="cut-model", messages=[{"role": "user", "content": "x"}])
        assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("one two three", "length")
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        called = await client.chat.completions.create(
            model="tool-model",
            messages=[{"role": "user", "content": "x"}],
            tools=tools,  # type: ignore[arg-type]
        )
        [call] = called.choices[0].message.tool_calls or []
        assert (call.function.name, call.function.arguments, called.choices[0].finish_reason) == (
            "lookup",
            '{"q": "exo"}',
            "tool_calls",
        )
        streamed = await client.chat.completions.create(
            model="echo-model", messages=[{"role": "user", "content": "x"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in streamed if c.choices]
        assert "".join(parts) == "Hello, wörld 👋"
    finally:
        await client.close()


async def test_provider_errors_and_bad_requests_are_openai_errors(exo_api: ExoApi) -> None:
    reply = await exo_api.client.post(
        "/v1/chat/completions", json={"model": "refused-model", "messages": [{"role": "user", "content": "x"}]}
    )
    assert reply.status == 429 and reply.headers["Retry-After"] == "7"
    error = (await reply.json())["error"]
    assert (error["code"], error["type"]) == ("rate_limited", "rate_limit_error"), error
    bad = await exo_api.client.post("/v1/chat/completions", json={"model": "echo-model", "messages": "not a list"})
    assert bad.status == 400
    assert (await bad.json())["error"]["type"] == "invalid_request_error"
    assert not exo_api.upstream.requests_for("echo-model"), "a bad request never reaches the provider"


async def test_a_client_that_leaves_mid_stream_stops_the_provider(exo_api: ExoApi) -> None:
    body = {"model": "long-model", "messages": [{"role": "user", "content": "x"}], "stream": True}
    reply = await exo_api.client.post("/v1/chat/completions", json=body)
    assert reply.status == 200
    first = await reply.content.readuntil(b"\n\n")
    assert json.loads(first.removeprefix(b"data: "))["choices"][0]["delta"]["content"].startswith("w0")
    reply.close()  # the client goes away
    record = await exo_api.upstream.wait_closed("long-model", timeout=15)
    assert record.client_disconnected and record.chunks_written < 3000, record  # 30 s if it ran its course
    await eventually(lambda: not exo_api.node.loop_tasks, "exo's token loop ended")


async def test_a_cancel_status_from_the_cluster_stops_the_provider_and_ends_the_stream(exo_api: ExoApi) -> None:
    """exo's opaque status reaches every node; the one serving the request stops the real
    upstream call and its stream ends, as exo's TUI or another node's API asked."""
    body = {"model": "long-model", "messages": [{"role": "user", "content": "x"}], "stream": True}
    reply = await exo_api.client.post("/v1/chat/completions", json=body)
    assert reply.status == 200
    first = json.loads((await reply.content.readuntil(b"\n\n")).removeprefix(b"data: "))
    request_id = first["id"].removeprefix("chatcmpl-")
    status = json.dumps({"type": CANCEL_TYPE, "request_id": request_id})
    exo_api.node.on_opaque_status.trigger_all(request_id, status)
    record = await exo_api.upstream.wait_closed("long-model", timeout=15)
    assert record.client_disconnected and record.chunks_written < 3000, record  # 30 s if it ran its course
    events = _sse(await asyncio.wait_for(reply.text(), 15))
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] is not None
