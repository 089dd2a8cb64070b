"""The sidecar end to end: a real grpc.aio server on a real port, real LiteLLM, and a real
OpenAI-compatible HTTP upstream on 127.0.0.1, read through the engine side's client."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.relay.streaming import MAX_PENDING_CHARS
from exo_remote_engine.sidecar.transports.litellm_transport import LiteLLMTransport
from exo_remote_engine.sidecar.transports.openai_transport import OpenAICompatibleTransport
from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.harness import PROVIDER_STATUSES, chat_request, drain, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario, ToolCallSpec
from tests.support.processes import start_sidecar_process
from tests.support.transports import assert_served_by

# Every test runs on both transports, set up before the sidecar fixtures that read it.
pytestmark = pytest.mark.usefixtures("transport")


async def test_text_arrives_complete_and_in_order_with_upstream_finish_and_usage(
    upstream: OpenAIUpstream, sidecar_for: Any, transport: str
) -> None:
    chunks = [f"w{i} " for i in range(300)] + ["日本語 👨‍👩‍👧 done"]
    upstream.scenarios["steady"] = Scenario(
        chunks=chunks, finish_reason="length", usage=(42, 301), cached_tokens=7, interval_s=0.001
    )
    sidecar = await sidecar_for(upstream, "steady")
    events = (await drain(sidecar_client(sidecar.address), chat_request("steady"), catch=False)).events
    assert all(e.HasField("delta") for e in events[:-1])
    assert events[-1].HasField("finished"), "exactly one final event, and it is last"
    assert "".join(e.delta.text for e in events[:-1]) == "".join(chunks)
    finished = events[-1].finished
    assert finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (42, 301)
    assert finished.usage.cached_prompt_tokens == 7
    assert finished.model == "steady"
    # The parametrization really switched transports: the backend's choice, and the client the upstream saw.
    chosen = sidecar.servicer.backend.transport_for(sidecar.config.get("steady"))
    assert type(chosen) is {"direct": OpenAICompatibleTransport, "litellm": LiteLLMTransport}[transport]
    assert_served_by(upstream.requests_for("steady")[0].headers, transport)


async def test_tool_call_fragments_reassemble_into_valid_json(upstream: OpenAIUpstream, sidecar_for: Any) -> None:
    calls = [
        ToolCallSpec("call_1", "get_weather", '{"city": "Paris", "unit": "celsius", "days": 3}'),
        ToolCallSpec("call_2", "get_time", '{"tz": "Europe/Paris"}'),
    ]
    upstream.scenarios["tools"] = Scenario(chunks=["Checking."], tool_calls=calls, finish_reason="tool_calls")
    sidecar = await sidecar_for(upstream, "tools")
    tools = [{"type": "function", "function": {"name": c.name, "parameters": {"type": "object"}}} for c in calls]
    request = chat_request(
        "tools",
        "Weather?",
        tools=tools,
        tool_choice="auto",
        max_tokens=64,
        temperature=0.0,
        stop=["END"],
        top_p=0.5,
        seed=11,
    )
    events = (await drain(sidecar_client(sidecar.address), request, catch=False)).events
    assembled: dict[int, dict[str, str]] = {}
    for event in events:
        for frag in event.delta.tool_calls:
            call = assembled.setdefault(frag.index, {"id": "", "name": "", "args": ""})
            call["id"] = frag.id or call["id"]
            call["name"] = frag.name or call["name"]
            call["args"] += frag.arguments_fragment
    assert [(c["id"], c["name"], json.loads(c["args"])) for c in assembled.values()] == [
        (c.id, c.name, json.loads(c.arguments)) for c in calls
    ]
    assert events[-1].finished.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    sent = upstream.requests_for("tools")[0].body
    assert sent is not None
    assert (sent["max_tokens"], sent["temperature"], sent["stop"], sent["top_p"], sent["seed"]) == (
        64,
        0.0,
        ["END"],
        0.5,
        11,
    )
    assert sent["tool_choice"] == "auto" and [t["function"]["name"] for t in sent["tools"]] == [
        "get_weather",
        "get_time",
    ]


async def test_unset_sampling_is_not_sent_upstream(upstream: OpenAIUpstream, sidecar_for: Any) -> None:
    sidecar = await sidecar_for(upstream, "plain")
    await drain(sidecar_client(sidecar.address), chat_request("plain"), catch=False)
    sent = upstream.requests_for("plain")[0].body
    assert sent is not None
    assert not {"temperature", "top_p", "max_tokens", "stop", "seed"} & set(sent)


@pytest.mark.parametrize(("status", "retry_after", "reason", "code"), PROVIDER_STATUSES)
async def test_provider_errors_map_to_statuses_without_leaking_the_key(
    upstream: OpenAIUpstream,
    sidecar_for: Any,
    caplog: pytest.LogCaptureFixture,
    status: int,
    retry_after: str | None,
    reason: Reason,
    code: grpc.StatusCode,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream.scenarios["bad"] = Scenario(
        status=status,
        retry_after=retry_after,
        error_message=f"Incorrect API key provided: {PLANTED_KEY}. You can find your key at ...",
    )
    sidecar = await sidecar_for(upstream, "bad")
    with pytest.raises(RemoteError) as caught:
        await drain(sidecar_client(sidecar.address), chat_request("bad"), catch=False)
    error = caught.value
    assert error.reason is reason and error.grpc_code is code
    assert error.retry_after_s == (7.0 if retry_after else None)
    assert PLANTED_KEY not in str(error) and PLANTED_KEY[:12] not in error.message
    assert PLANTED_KEY not in caplog.text and "PLANTEDKEY" not in caplog.text
    assert "bad" in error.message, "the message names the model"


async def test_unknown_model_is_not_found_and_names_the_served_models(
    upstream: OpenAIUpstream, sidecar_for: Any
) -> None:
    sidecar = await sidecar_for(upstream, "known")
    with pytest.raises(RemoteError) as caught:
        await drain(sidecar_client(sidecar.address), chat_request("nope"), catch=False)
    assert caught.value.reason is Reason.MODEL_NOT_FOUND
    assert caught.value.grpc_code is grpc.StatusCode.NOT_FOUND
    assert "known" in caught.value.message


async def test_client_cancel_closes_the_upstream_connection_promptly(
    upstream: OpenAIUpstream, sidecar_for: Any
) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=[f"t{i} " for i in range(1000)], interval_s=0.02)
    sidecar = await sidecar_for(upstream, "slow")
    client = sidecar_client(sidecar.address)
    stream = client.generate(chat_request("slow"))
    received = 0
    async for event in stream:
        received += len(event.delta.text)
        if received >= 25:
            break
    cancelled_at = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    record = await upstream.wait_closed("slow", timeout=15)
    assert record.client_disconnected, record
    # Promptly: the stream would run 20 s; 5 s is a loaded box's margin.
    assert record.ended_at - cancelled_at < 5.0, record
    assert record.chunks_written < 1000


async def test_slow_reader_gets_merged_deltas_and_loses_nothing(
    upstream: OpenAIUpstream, sidecar_for: Any, transport: str
) -> None:
    # 16 MB, more than HTTP/2 flow control lets the sidecar write ahead of a reader that
    # stalls, so its writes block and what the provider sends meanwhile must be merged.
    chunks = [f"{i:06d}" + "x" * 19_994 for i in range(800)]
    upstream.scenarios["burst"] = Scenario(chunks=chunks)
    sidecar = await sidecar_for(upstream, "burst")
    text: list[str] = []
    deltas = 0
    async for event in sidecar_client(sidecar.address).generate(chat_request("burst")):
        if event.HasField("delta"):
            deltas += 1
            text.append(event.delta.text)
            if deltas == 1:
                await asyncio.sleep(1.5)  # the reader stalls; the provider keeps writing
    assert "".join(text) == "".join(chunks)
    largest = max(len(t) for t in text)
    print(f"merged: {deltas} deltas for {len(chunks)} chunks, largest {largest} characters")
    assert deltas < len(chunks), f"{deltas} deltas for {len(chunks)} chunks: no merging"
    if transport == "litellm":
        # Its merge buffer is bounded: past MAX_PENDING_CHARS the provider is not read. (The
        # direct reader merges one socket read, which aiohttp's flow control bounds.)
        assert largest <= MAX_PENDING_CHARS + len(chunks[0]), f"a {largest}-character delta: unbounded merging"


async def test_mid_stream_drop_ends_with_an_error_after_the_text_that_arrived(
    upstream: OpenAIUpstream, sidecar_for: Any
) -> None:
    upstream.scenarios["drop"] = Scenario(chunks=["part "] * 10, drop_after_chunks=4, interval_s=0.01)
    sidecar = await sidecar_for(upstream, "drop")
    received = ""
    with pytest.raises(RemoteError) as caught:
        async for event in sidecar_client(sidecar.address).generate(chat_request("drop")):
            received += event.delta.text
    assert caught.value.reason is Reason.PROVIDER_UNAVAILABLE
    assert received == "part " * 4


async def test_embedded_default_serves_offline_with_no_config() -> None:
    sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0"))
    try:
        client = sidecar_client(sidecar.address)
        listing = await client.list_models()
        assert listing.default_model == "embedded-echo"
        assert [m.ready for m in listing.models] == [True]
        events = (await drain(client, chat_request("embedded-echo", "Ping 🏓"), catch=False)).events
        assert "Ping 🏓" in "".join(e.delta.text for e in events)
        assert events[-1].finished.finish_reason == pb.FINISH_REASON_STOP
        assert await client.health()
    finally:
        await sidecar.stop(grace_s=None)


async def test_token_auth_refuses_missing_and_wrong_tokens(upstream: OpenAIUpstream, sidecar_for: Any) -> None:
    sidecar = await sidecar_for(upstream, "m", tokens=["right-token"])
    for token in (None, "wrong-token"):
        with pytest.raises(RemoteError) as caught:
            await sidecar_client(sidecar.address, token=token).list_models()
        assert caught.value.reason is Reason.UNAUTHENTICATED
    listing = await sidecar_client(sidecar.address, token="right-token").list_models()
    assert [m.alias for m in listing.models] == ["m"]
    assert await sidecar_client(sidecar.address).health(), "health stays open for probes"


async def test_second_process_cannot_bind_the_same_port(upstream: OpenAIUpstream, sidecar_for: Any) -> None:
    sidecar = await sidecar_for(upstream, "m")
    with pytest.raises(ValueError, match=r"cannot bind"):
        await start_sidecar(SidecarSettings(listen=f"127.0.0.1:{sidecar.port}"))


async def test_plaintext_off_loopback_is_refused_without_insecure() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        await start_sidecar(SidecarSettings(listen="0.0.0.0:0"))


async def test_debug_logging_sidecar_process_never_logs_the_key(
    upstream: OpenAIUpstream, tmp_path: Path, transport: str
) -> None:
    upstream.scenarios["leaky"] = Scenario(status=401, error_message=f"Incorrect API key provided: {PLANTED_KEY}")
    upstream.scenarios["fine"] = Scenario(chunks=["ok"])
    config = write_proxy_config(tmp_path / "c.yaml", upstream.url, ["leaky", "fine"])
    log = tmp_path / "sidecar.log"
    sidecar = await asyncio.to_thread(
        start_sidecar_process, config, log, {"TEST_UPSTREAM_KEY": PLANTED_KEY}, "127.0.0.1:0", ["--log-level", "debug"]
    )
    try:
        client = sidecar_client(sidecar.address)
        with pytest.raises(RemoteError):
            await drain(client, chat_request("leaky"), catch=False)
        await drain(client, chat_request("fine"), catch=False)
        await client.close()
    finally:
        await asyncio.to_thread(sidecar.stop)
    assert_served_by(upstream.requests_for("fine")[0].headers, transport)  # the subprocess inherited the choice
    text = log.read_text()
    assert "request_id=t-leaky failed reason=PROVIDER_AUTH_FAILED" in text, "the log is real and at debug"
    assert PLANTED_KEY not in text and "PLANTEDKEY" not in text
