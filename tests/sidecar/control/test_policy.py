"""Limits, deadlines, concurrency, per-node permissions, graceful drain and metrics of a
real sidecar on a real port, against a real upstream."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.openai_chat import chat_body_to_request
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from exo_remote_engine.sidecar.config.rules import Limits, NodePolicy
from exo_remote_engine.sidecar.control.policy import Policy
from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.harness import chat_request, fetch_metrics, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario

# 40 s to run its course: a bound of a few seconds tells a cut stream from a leaked one.
SLOW = Scenario(chunks=[f"s{i} " for i in range(2000)], interval_s=0.02)


async def _error_of(client: SidecarClient, request: pb.GenerateRequest) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        async for _ in client.generate(request):
            pass
    return caught.value


async def test_oversized_requests_are_refused_with_the_field(upstream: OpenAIUpstream, sidecar_for: Any) -> None:
    sidecar = await sidecar_for(upstream, "m", limits=Limits(max_messages=3, max_tools=1, max_image_bytes=10))
    client = sidecar_client(sidecar.address)
    many = {"messages": [{"role": "user", "content": str(i)} for i in range(4)]}
    error = await _error_of(client, chat_body_to_request(many, request_id="x", model="m"))
    assert error.reason is Reason.REQUEST_TOO_LARGE and error.http_status == 413
    assert error.violations[0].field == "messages"
    tools = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(2)]
    error = await _error_of(client, chat_request("m", tools=tools))
    assert error.violations[0].field == "tools"
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 40}}]
    error = await _error_of(
        client, chat_body_to_request({"messages": [{"role": "user", "content": image}]}, request_id="x", model="m")
    )
    assert error.violations[0].field == "messages[0].content[0]"
    assert not upstream.requests, "nothing oversized reached the provider"


async def test_a_call_without_deadline_is_refused(upstream: OpenAIUpstream, sidecar_for: Any) -> None:
    sidecar = await sidecar_for(upstream, "m")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        call = pb_grpc.RemoteInferenceServiceStub(channel).Generate(chat_request("m"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    error = RemoteError.from_status(caught.value.code(), caught.value.details(), caught.value.trailing_metadata())
    assert error.reason is Reason.INVALID_REQUEST and "deadline" in error.message


async def test_sidecar_caps_deadlines_and_closes_the_upstream(upstream: OpenAIUpstream, sidecar_for: Any) -> None:
    upstream.scenarios["slow"] = SLOW
    sidecar = await sidecar_for(upstream, "slow", limits=Limits(max_deadline_s=0.5))
    started = time.monotonic()
    error = await _error_of(sidecar_client(sidecar.address), chat_request("slow"))
    # The cap is 0.5 s; without it the stream would run 40 s. 10 s is a loaded box's margin.
    assert error.reason is Reason.DEADLINE_EXCEEDED and time.monotonic() - started < 10
    record = await upstream.wait_closed("slow", timeout=15)
    assert record.client_disconnected and record.ended_at - started < 10


async def test_concurrency_limit_answers_overloaded_with_a_retry_hint(
    upstream: OpenAIUpstream, sidecar_for: Any
) -> None:
    upstream.scenarios["slow"] = SLOW
    sidecar = await sidecar_for(upstream, "slow", limits=Limits(max_concurrent_streams=2))
    client = sidecar_client(sidecar.address)
    streams = [client.generate(chat_request("slow")) for _ in range(2)]
    for stream in streams:
        await stream.__anext__()  # both hold a slot
    error = await _error_of(client, chat_request("slow"))
    assert error.reason is Reason.OVERLOADED and error.grpc_code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_after_s == 1.0
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_per_node_models_and_concurrency(
    upstream: OpenAIUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    upstream.scenarios["slow"] = SLOW
    config = write_proxy_config(tmp_path / "c.yaml", upstream.url, ["open-model", "slow"])
    config.write_text(
        config.read_text()
        + (
            "exo_remote_settings:\n  nodes:\n    node-a: {allowed_models: ['open-*']}\n"
            "    node-b: {max_concurrent_streams: 1}\n"
        )
    )
    sidecar = await start_sidecar(
        SidecarSettings(listen="127.0.0.1:0", named_tokens={"node-a": "token-a", "node-b": "token-b"}),
        load_config(config),
    )
    try:
        node_a = sidecar_client(sidecar.address, token="token-a")
        node_b = sidecar_client(sidecar.address, token="token-b")
        error = await _error_of(node_a, chat_request("slow"))
        assert error.reason is Reason.PERMISSION_DENIED and "node-a" in error.message
        assert [e async for e in node_a.generate(chat_request("open-model"))][-1].HasField("finished")
        held = node_b.generate(chat_request("slow"))
        await held.__anext__()
        error = await _error_of(node_b, chat_request("slow"))
        assert error.reason is Reason.OVERLOADED and "node-b" in error.message
        await held.aclose()  # type: ignore[attr-defined]
    finally:
        await sidecar.stop(grace_s=None)


@pytest.mark.timeout(60)
async def test_graceful_drain_finishes_what_fits_the_grace_and_cancels_the_rest_when_it_ends(
    upstream: OpenAIUpstream, sidecar_for: Any
) -> None:
    """50 live streams and a 6 s grace: the 25 that need about 3 s all finish; the 25 that
    need a minute are cancelled when the grace runs out, not at once, and their upstream
    connections close. An abort (a grace of 0) fails the first half; no grace limit, the
    second; cancelling at once, the timing (a lower bound: a busy box only makes it later)."""
    grace_s, streams = 6.0, 25
    upstream.scenarios["short"] = Scenario(chunks=[f"s{i} " for i in range(150)], interval_s=0.02)
    upstream.scenarios["long"] = Scenario(chunks=[f"l{i} " for i in range(1200)], interval_s=0.05)
    sidecar = await sidecar_for(upstream, "short", "long")
    client = sidecar_client(sidecar.address)
    live: list[str] = []
    all_live = asyncio.Event()

    async def run(model: str, n: int) -> tuple[str, float]:
        try:
            async for event in client.generate(chat_request(model, request_id=f"{model}-{n}")):
                if len(live) < 2 * streams and f"{model}-{n}" not in live:
                    live.append(f"{model}-{n}")
                    if len(live) == 2 * streams:
                        all_live.set()
                if event.HasField("finished"):
                    return "finished", time.monotonic()
            return "ended", time.monotonic()
        except RemoteError as exc:
            return exc.reason.value, time.monotonic()

    short = [asyncio.create_task(run("short", n)) for n in range(streams)]
    long = [asyncio.create_task(run("long", n)) for n in range(streams)]
    await asyncio.wait_for(all_live.wait(), timeout=20)  # every stream has its first delta
    draining = time.monotonic()
    await sidecar.stop(grace_s=grace_s)
    short_ends = await asyncio.wait_for(asyncio.gather(*short), timeout=30)
    long_ends = await asyncio.wait_for(asyncio.gather(*long), timeout=30)

    assert [outcome for outcome, _ in short_ends] == ["finished"] * streams, short_ends
    assert any(at > draining for _, at in short_ends), "some short stream was still live when the drain began"
    assert {outcome for outcome, _ in long_ends} <= {"CANCELLED", "SIDECAR_UNAVAILABLE"}, long_ends
    waited = [at - draining for _, at in long_ends]
    assert min(waited) >= grace_s / 2, f"cancelled {min(waited):.2f}s into a {grace_s:g}s grace: not a drain"
    assert max(waited) < grace_s + 15, f"the grace ended at {grace_s:g}s; streams ran {max(waited):.1f}s"
    for _ in range(streams):
        record = await upstream.wait_closed("long", timeout=15)
        assert record.client_disconnected and record.chunks_written < 1200, record
    assert not await client.health(timeout_s=1), "health no longer SERVING"


async def test_metrics_are_on_their_own_port_without_secrets(upstream: OpenAIUpstream, sidecar_for: Any) -> None:
    upstream.scenarios["bad"] = Scenario(status=401, error_message=f"bad key {PLANTED_KEY}")
    sidecar = await sidecar_for(upstream, "good", "bad", metrics_listen="127.0.0.1:0")
    client = sidecar_client(sidecar.address)
    [_ async for _ in client.generate(chat_request("good"))]
    await _error_of(client, chat_request("bad"))
    assert sidecar.metrics_port and sidecar.metrics_port != sidecar.port
    text = await asyncio.to_thread(fetch_metrics, sidecar.metrics_port)  # served on this event loop
    assert 'exo_remote_requests_total{code="OK",model="good",node="anonymous"} 1.0' in text
    assert 'exo_remote_requests_total{code="FAILED_PRECONDITION",model="bad",node="anonymous"} 1.0' in text
    assert 'exo_remote_completion_tokens_total{model="good",node="anonymous"}' in text
    assert "exo_remote_time_to_first_token_seconds_count" in text
    assert PLANTED_KEY not in text and "PLANTEDKEY" not in text


async def test_retries_then_fallback_before_the_first_delta_only(
    upstream: OpenAIUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    upstream.scenarios["flaky"] = Scenario(status=503, error_message="overloaded")
    upstream.scenarios["backup"] = Scenario(chunks=["from ", "backup"])
    upstream.scenarios["cut"] = Scenario(chunks=["part "] * 3, drop_after_chunks=2, interval_s=0.01)
    config = write_proxy_config(tmp_path / "c.yaml", upstream.url, ["flaky", "backup", "cut"])
    config.write_text(
        config.read_text() + "litellm_settings:\n  num_retries: 2\n  fallbacks: [{flaky: [backup]}, {cut: [backup]}]\n"
    )
    sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0"), load_config(config))
    client = sidecar_client(sidecar.address)
    try:
        events = [e async for e in client.generate(chat_request("flaky"))]
        assert "".join(e.delta.text for e in events) == "from backup"
        assert events[-1].finished.model == "backup", "the resolved model is the fallback"
        assert len(upstream.requests_for("flaky")) == 3, "one call and two retries, then the fallback"
        error = await _error_of(client, chat_request("cut"))
        assert error.reason is Reason.PROVIDER_UNAVAILABLE, "after the first delta: no retry, no fallback"
        assert len(upstream.requests_for("cut")) == 1
        assert len(upstream.requests_for("backup")) == 1
    finally:
        await client.close()
        await sidecar.stop(grace_s=None)


def test_fallbacks_are_the_ones_the_node_may_use_in_the_tables_order() -> None:
    """The one walk behind both the reservation's candidates and the stream's fallbacks."""
    policy = Policy.build(
        Limits(), {"a": NodePolicy(allowed_models=("cheap", "big-*")), "b": NodePolicy()}, {"a": "t" * 20}
    )
    table = {"cheap": ("expensive", "big-2", "cheap", "big-1")}
    assert policy.fallbacks("a", table, "cheap") == ["big-2", "cheap", "big-1"], "order kept, 'expensive' skipped"
    assert policy.fallbacks("b", table, "cheap") == ["expensive", "big-2", "cheap", "big-1"], "no limit: all"
    assert policy.fallbacks("a", table, "big-1") == [], "a model without fallbacks has none"
    assert policy.fallbacks("a certificate's CN", table, "cheap") == [], "an undeclared name may use nothing"
    assert Policy().fallbacks("anyone", table, "cheap") == list(table["cheap"]), "no rules at all: every fallback"
