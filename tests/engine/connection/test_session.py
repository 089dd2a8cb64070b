"""The client's side of the multiplexed Session: one session per sidecar process, the
per-call path where it must stay, an older sidecar, the client's own deadline and cancels.
Real sidecars and real grpc.aio servers on real ports."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.session import MAX_MULTIPLEXED_REQUEST_BYTES
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.engine.settings import EngineSettings
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from tests.support.harness import NO_RETRY, chat_request, drain, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import start_sidecar_process
from tests.support.tenants import TOKENS, VICTIM, Tenants, ledger_rows, tenant_config, wait_for

pytestmark = pytest.mark.timeout(120)


def _config(upstream: OpenAIUpstream) -> str:
    return tenant_config(upstream.url, {"steady": ["steady"], "slow": ["slow"]})


async def test_concurrent_completions_share_one_session(upstream: OpenAIUpstream, tenants: Tenants) -> None:
    upstream.scenarios["steady"] = Scenario(chunks=[f"w{i} " for i in range(30)], interval_s=0.003)
    sidecar = await tenants.start(_config(upstream))
    client = tenants.client(sidecar, VICTIM)
    seen: list[int] = []

    async def one(i: int) -> str:
        text = ""
        async for event in client.generate(chat_request("steady", f"q{i}", request_id=f"c-{i}")):
            seen.append(sidecar.servicer.sessions.open_sessions)
            text += event.delta.text
        return text

    texts = await asyncio.gather(*(one(i) for i in range(16)))
    assert texts == ["".join(f"w{i} " for i in range(30))] * 16
    assert set(seen) == {1}, "every completion of this node travelled on one session"
    assert len(ledger_rows(tenants.state_dir(), 16)) == 16


async def test_multiplexing_off_and_large_requests_use_one_call_each(
    upstream: OpenAIUpstream, tenants: Tenants
) -> None:
    upstream.scenarios["steady"] = Scenario(chunks=["ok"], interval_s=0.05)
    sidecar = await tenants.start(_config(upstream))
    off = SidecarTarget.from_settings(EngineSettings(sidecar=sidecar.address, token=TOKENS[VICTIM], multiplex=False))
    assert off.multiplex is False
    assert EngineSettings.from_env({"EXO_REMOTE_MULTIPLEX": "0"}).multiplex is False
    assert EngineSettings.from_env({}).multiplex is True
    for client, request in (
        (SidecarClient(off), chat_request("steady")),
        (tenants.client(sidecar, VICTIM), chat_request("steady", "x" * (MAX_MULTIPLEXED_REQUEST_BYTES + 1))),
    ):
        try:
            sessions_seen = []
            async for _ in client.generate(request):
                sessions_seen.append(sidecar.servicer.sessions.open_sessions)
            assert sessions_seen and set(sessions_seen) == {0}, "no session was opened"
        finally:
            await client.close()


class GenerateOnly(pb_grpc.RemoteInferenceServiceServicer):
    """An older sidecar: Generate, no Session (the generated base answers UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.generate_calls = 0

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.generate_calls += 1
        await context.write(pb.GenerateResponse(delta=pb.Delta(text=f"old {request.request_id}")))
        await context.write(pb.GenerateResponse(finished=pb.Finished(finish_reason=pb.FINISH_REASON_STOP)))


class Silent(pb_grpc.RemoteInferenceServiceServicer):
    """Takes sessions and records their frames, and never answers."""

    def __init__(self) -> None:
        self.frames: list[pb.SessionRequestFrame] = []

    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        async for message in request_iterator:
            self.frames.extend(message.frames)


async def _serve(servicer: pb_grpc.RemoteInferenceServiceServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_RemoteInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_an_older_sidecar_without_session_is_called_once_per_completion() -> None:
    old = GenerateOnly()
    server, address = await _serve(old)
    client = SidecarClient(SidecarTarget(address=address, retry=NO_RETRY))
    try:
        for i in range(3):  # NO_RETRY: the fallback is not a retry, and nothing fails
            drained = await drain(client, chat_request("m", request_id=f"r{i}"), catch=False)
            assert drained.text == f"old r{i}"
        assert old.generate_calls == 3
    finally:
        await client.close()
        await server.stop(None)


async def test_the_clients_deadline_ends_a_completion_the_sidecar_never_answers() -> None:
    silent = Silent()
    server, address = await _serve(silent)
    client = SidecarClient(SidecarTarget(address=address, retry=NO_RETRY, deadline_s=0.5))
    try:
        started = time.monotonic()
        with pytest.raises(RemoteError) as caught:
            await drain(client, chat_request("m", request_id="never"), catch=False)
        assert caught.value.reason is Reason.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 30, "the deadline fired, the test did not wait forever"
        await wait_for(lambda: any(f.HasField("cancel") for f in silent.frames))
        start, cancel = silent.frames[0], next(f for f in silent.frames if f.HasField("cancel"))
        assert start.start.request.request_id == "never" and start.start.timeout_seconds == pytest.approx(0.5)
        assert cancel.stream_id == start.stream_id, "the sidecar was told to stop that completion"
    finally:
        await client.close()
        await server.stop(None)


async def test_a_reader_that_stops_early_cancels_the_upstream_request(
    upstream: OpenAIUpstream, tenants: Tenants
) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=["tick "] * 400, interval_s=0.05)
    upstream.scenarios["steady"] = Scenario(chunks=["after"])
    sidecar = await tenants.start(_config(upstream))
    client = tenants.client(sidecar, VICTIM)
    stream = client.generate(chat_request("slow", request_id="early-stop"))
    async for event in stream:
        assert event.delta.text == "tick "
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert (await upstream.wait_closed("slow", timeout=20)).client_disconnected
    assert (await drain(client, chat_request("steady"), catch=False)).text == "after", "the session serves on"
    assert sidecar.servicer.sessions.open_sessions == 1


async def test_a_sidecar_restart_fails_open_completions_and_the_next_one_gets_a_new_session(
    upstream: OpenAIUpstream, tenants: Tenants
) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=["tick "] * 400, interval_s=0.05)
    upstream.scenarios["steady"] = Scenario(chunks=["back"])
    first = await tenants.start(_config(upstream))
    client = tenants.client(first, VICTIM)
    received = ""
    stopping: list[asyncio.Future[None]] = []
    with pytest.raises(RemoteError) as caught:
        async for event in client.generate(chat_request("slow")):
            received += event.delta.text
            if received.count("tick") == 3:
                stopping.append(asyncio.ensure_future(first.stop(grace_s=None)))
    await asyncio.wait_for(stopping[0], 20)
    assert caught.value.reason in (Reason.SIDECAR_UNAVAILABLE, Reason.CANCELLED), caught.value
    assert received.startswith("tick tick tick ") and set(received.split()) == {"tick"}
    tenants.running.remove(first)
    second = await tenants.start(_config(upstream), listen=first.address)
    assert (await drain(client, chat_request("steady"), catch=False)).text == "back"
    assert second.servicer.sessions.open_sessions == 1


async def test_a_wrong_token_is_unauthenticated_every_time_never_a_lost_session(tmp_path: Path) -> None:
    """The sidecar refuses a wrong token at once. A session whose first write races that
    refusal loses the status inside grpc.aio (a local INTERNAL, "Internal error from Core");
    the completion then goes again as its own call, which reports the refusal itself.
    Before, 8 of 200 fresh clients against a sidecar process saw INTERNAL (a sidecar in the
    test's own process never showed the race: hence a process)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("node-a token-of-node-a-0123456789\n")
    sidecar = start_sidecar_process(None, tmp_path / "sidecar.log", extra_args=["--token-file", str(tokens)])
    reasons: Counter[Reason] = Counter()
    try:
        for i in range(150):
            client = sidecar_client(sidecar.address, token="not-the-token-of-any-node")
            try:
                await drain(client, chat_request("embedded-echo", request_id=f"w-{i}"), catch=False)
            except RemoteError as exc:
                reasons[exc.reason] += 1
            finally:
                await client.close()
    finally:
        sidecar.stop()
    assert reasons == {Reason.UNAUTHENTICATED: 150}
