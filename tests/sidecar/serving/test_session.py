"""The multiplexed Session on the wire: a real sidecar on a real port, the scriptable upstream
behind it, and a raw generated stub in front, so what is checked is the contract itself
(frames, ids, in-band errors, cancels, windows), not the engine's client."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import STATUS_DETAILS_KEY, Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.sidecar.serving import session as session_module
from tests.support.harness import chat_request
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.tenants import ATTACKER, TOKENS, VICTIM, Tenants, ledger_rows, tenant_config, wait_for


class RawSession:
    """One Session call: frames in by stream id, everything that came back kept by id."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.call = pb_grpc.RemoteInferenceServiceStub(self.channel).Session(metadata=metadata)
        self.frames: dict[int, list[pb.SessionResponseFrame]] = defaultdict(list)
        self.messages: list[int] = []  # frames per message received
        # When each message came that carried only continuation deltas (no completion's
        # first event, no end): the ones the sidecar may hold back for company.
        self.continuations_at: list[float] = []
        self.ended: dict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        async for message in self.call:
            self.messages.append(len(message.frames))
            if not any(
                not self.frames[f.stream_id] or f.HasField("status") or f.event.HasField("finished")
                for f in message.frames
            ):
                self.continuations_at.append(loop.time())
            for frame in message.frames:
                self.frames[frame.stream_id].append(frame)
                if frame.HasField("status") or frame.event.HasField("finished"):
                    self.ended[frame.stream_id].set()

    async def start(self, stream_id: int, request: pb.GenerateRequest, timeout_s: float = 30.0) -> None:
        frame = pb.SessionRequestFrame(stream_id=stream_id)
        frame.start.request.CopyFrom(request)
        frame.start.timeout_seconds = timeout_s
        await self.send(frame)

    async def send(self, *frames: pb.SessionRequestFrame) -> None:
        await self.call.write(pb.SessionRequest(frames=frames))

    async def ended_ok(self, stream_id: int, timeout_s: float = 30.0) -> str:
        """The completion's text once it finished; fails with its error otherwise."""
        await asyncio.wait_for(self.ended[stream_id].wait(), timeout_s)
        error = self.error(stream_id)
        assert error is None, f"stream {stream_id} failed: {error}"
        return self.text(stream_id)

    async def ended_with(self, stream_id: int, timeout_s: float = 30.0) -> RemoteError:
        await asyncio.wait_for(self.ended[stream_id].wait(), timeout_s)
        error = self.error(stream_id)
        assert error is not None, f"stream {stream_id} finished: {self.text(stream_id)!r}"
        return error

    def text(self, stream_id: int) -> str:
        return "".join(f.event.delta.text for f in self.frames[stream_id] if f.HasField("event"))

    def error(self, stream_id: int) -> RemoteError | None:
        for frame in self.frames[stream_id]:
            if frame.HasField("status"):
                return RemoteError.from_status(None, None, ((STATUS_DETAILS_KEY, frame.status),))
        return None

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
            await self.reader
        await self.channel.close()


@pytest.fixture
async def sessions() -> AsyncIterator[list[RawSession]]:
    opened: list[RawSession] = []
    yield opened
    for each in opened:
        await each.close()


def _config(upstream: OpenAIUpstream, models: Sequence[str] = ("steady", "slow", "burst")) -> str:
    return tenant_config(
        upstream.url,
        {m: [m] for m in models},
        nodes={ATTACKER: ["steady", "slow", "burst"], VICTIM: ["steady", "slow", "burst", "secret"]},
    )


async def test_many_completions_share_one_session_each_in_order_and_batched(
    upstream: OpenAIUpstream, tenants: Tenants, sessions: list[RawSession]
) -> None:
    chunks = [f"w{i} " for i in range(40)]
    upstream.scenarios["steady"] = Scenario(chunks=chunks, interval_s=0.002)
    sidecar = await tenants.start(_config(upstream))
    session = RawSession(sidecar.address, TOKENS[VICTIM])
    sessions.append(session)
    ids = range(1, 25)
    for i in ids:  # each completion its own id; several per message
        await session.start(i, chat_request("steady", f"hello {i}", request_id=f"mux-{i}"))
    texts = await asyncio.gather(*(session.ended_ok(i) for i in ids))
    assert texts == ["".join(chunks)] * len(ids), "every completion got all its text, in order"
    for i in ids:
        frames = session.frames[i]
        assert sum(f.event.HasField("finished") for f in frames) == 1 and frames[-1].event.HasField("finished")
    # Frames of completions streaming at once left together: fewer messages than frames.
    assert max(session.messages) > 1, session.messages
    rows = ledger_rows(tenants.state_dir(), len(ids))
    assert sorted(r["request_id"] for r in rows) == sorted(f"mux-{i}" for i in ids)
    assert {r["node"] for r in rows} == {VICTIM}, "each completion is charged to the session's node"


async def test_continuation_deltas_leave_at_most_once_per_coalescing_interval(
    upstream: OpenAIUpstream, tenants: Tenants, sessions: list[RawSession]
) -> None:
    """gRPC's cost is per message: a delta that is not a completion's first waits up to
    COALESCE_S after the previous message for company. Holds on any box (a slow one sends
    fewer messages, never more); one message per upstream chunk, as without the wait,
    breaks it."""
    chunks = [f"t{i} " for i in range(200)]
    upstream.scenarios["steady"] = Scenario(chunks=chunks, interval_s=0.0005)
    sidecar = await tenants.start(_config(upstream))
    session = RawSession(sidecar.address, TOKENS[VICTIM])
    sessions.append(session)
    started = asyncio.get_running_loop().time()
    await session.start(1, chat_request("steady", "hello", request_id="coalesced"))
    assert await session.ended_ok(1) == "".join(chunks), "nothing lost or reordered by the wait"
    span = session.continuations_at[-1] - started
    allowed = span / session_module.COALESCE_S + 1
    assert 0 < len(session.continuations_at) <= allowed, (len(session.continuations_at), span)
    assert sum(session.messages) == len(session.frames[1]) and len(session.messages) < len(chunks) / 2


async def test_a_failed_completion_is_an_error_frame_and_the_session_goes_on(
    upstream: OpenAIUpstream, tenants: Tenants, sessions: list[RawSession]
) -> None:
    upstream.scenarios["steady"] = Scenario(chunks=["fine"])
    sidecar = await tenants.start(_config(upstream))
    session = RawSession(sidecar.address, TOKENS[ATTACKER])
    sessions.append(session)
    await session.start(1, chat_request("no-such-model"))
    await session.start(2, chat_request("secret"))  # another node's model
    await session.start(3, chat_request("steady", request_id="x" * 200))  # an id over 128 characters
    assert (await session.ended_with(1)).reason is Reason.MODEL_NOT_FOUND
    denied = await session.ended_with(2)
    assert denied.reason in (Reason.PERMISSION_DENIED, Reason.MODEL_NOT_FOUND), denied
    assert (await session.ended_with(3)).reason is Reason.INVALID_REQUEST
    await session.start(4, chat_request("steady"))
    assert await session.ended_ok(4) == "fine", "the session serves on after its completions failed"


async def test_a_cancel_frame_ends_the_completion_and_its_upstream_request(
    upstream: OpenAIUpstream, tenants: Tenants, sessions: list[RawSession]
) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=["tick "] * 400, interval_s=0.05)
    upstream.scenarios["steady"] = Scenario(chunks=["still here"])
    sidecar = await tenants.start(_config(upstream))
    session = RawSession(sidecar.address, TOKENS[VICTIM])
    sessions.append(session)
    await session.start(1, chat_request("slow", request_id="to-cancel"))
    await wait_for(lambda: session.text(1).count("tick") >= 2)
    await session.send(pb.SessionRequestFrame(stream_id=1, cancel=pb.SessionCancel()))
    record = await upstream.wait_closed("slow", timeout=20)
    assert record.client_disconnected, "cancelling the completion closed its upstream request"
    await session.start(2, chat_request("steady"))
    assert await session.ended_ok(2) == "still here"
    assert session.error(1) is None and not session.ended[1].is_set(), "a cancelled completion gets no frame"
    rows = ledger_rows(tenants.state_dir(), 2)
    assert {r["request_id"]: r["outcome"] for r in rows}["to-cancel"] == "cancelled"


async def test_each_completion_keeps_its_own_deadline(
    upstream: OpenAIUpstream, tenants: Tenants, sessions: list[RawSession]
) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=["a", "b"], stall_before_first_byte_s=30)
    upstream.scenarios["steady"] = Scenario(chunks=["on time"])
    sidecar = await tenants.start(_config(upstream))
    session = RawSession(sidecar.address, TOKENS[VICTIM])
    sessions.append(session)
    await session.start(1, chat_request("slow"), timeout_s=0.5)
    await session.start(2, chat_request("steady"), timeout_s=30)
    assert await session.ended_ok(2) == "on time"
    assert (await session.ended_with(1, timeout_s=20)).reason is Reason.DEADLINE_EXCEEDED


async def test_one_slow_reader_holds_up_neither_the_others_nor_memory(
    upstream: OpenAIUpstream, tenants: Tenants, sessions: list[RawSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-completion windows: a completion whose reader acknowledges nothing stops at its
    window (the relay merges and holds back the provider) while another completion on the
    same session streams to its end."""
    big = [f"{i:05d}" + "x" * 4_995 for i in range(400)]  # 2 MB, twice the window
    upstream.scenarios["burst"] = Scenario(chunks=big)
    upstream.scenarios["steady"] = Scenario(chunks=[f"s{i} " for i in range(200)], interval_s=0.001)
    sidecar = await tenants.start(_config(upstream))
    session = RawSession(sidecar.address, TOKENS[VICTIM])
    sessions.append(session)
    await session.start(1, chat_request("burst"))  # never acknowledged
    await wait_for(lambda: len(session.text(1)) > 0)
    await session.start(2, chat_request("steady"))
    assert await session.ended_ok(2) == "".join(f"s{i} " for i in range(200))
    window = session_module.COMPLETION_WINDOW_BYTES
    sizes = [f.event.ByteSize() for f in session.frames[1]]
    assert not session.ended[1].is_set(), "the unacknowledged completion waits at its window"
    # Sent only while under the window: everything but the last event fits in it.
    assert sum(sizes[:-1]) < window <= sum(sizes), f"{sum(sizes)} bytes in {len(sizes)} events, window {window}"
    # Acknowledging lets it finish, with nothing lost.
    while not session.ended[1].is_set():
        sent = sum(f.event.ByteSize() for f in session.frames[1])
        ack = pb.SessionRequestFrame(stream_id=1, ack=pb.SessionAck(consumed_bytes=sent))
        await session.send(ack)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.ended[1].wait(), 0.2)
    assert session.text(1) == "".join(big)


async def test_protocol_violations_end_the_session_with_invalid_argument(
    upstream: OpenAIUpstream, tenants: Tenants, sessions: list[RawSession]
) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=["tick "] * 200, interval_s=0.05)
    sidecar = await tenants.start(_config(upstream))
    session = RawSession(sidecar.address, TOKENS[VICTIM])
    sessions.append(session)
    await session.start(7, chat_request("slow"))
    await wait_for(lambda: "tick" in session.text(7))
    await session.start(7, chat_request("slow"))  # the same id while it is open
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(session.reader, 20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already open" in (caught.value.details() or "")
    assert (await upstream.wait_closed("slow", timeout=20)).client_disconnected, "its open completion ended too"

    # Bytes that are no SessionRequest: INVALID_ARGUMENT, not grpc's UNKNOWN.
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        raw = channel.stream_stream("/exo.remote.v1.RemoteInferenceService/Session")
        call: Any = raw(metadata=(("authorization", f"Bearer {TOKENS[VICTIM]}"),))
        await call.write(b"\xff\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as undecodable:
            await asyncio.wait_for(call.read(), 20)
    assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_session_without_a_valid_token_is_refused(upstream: OpenAIUpstream, tenants: Tenants) -> None:
    sidecar = await tenants.start(_config(upstream))
    for token in (None, "tok-not-a-node-000000000"):
        session = RawSession(sidecar.address, token)
        try:
            with contextlib.suppress(asyncio.InvalidStateError):  # refused before it was read
                await session.start(1, chat_request("steady"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(session.reader, 20)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await session.close()
    assert upstream.requests_for("steady") == []


async def test_open_completions_per_session_are_bounded(
    upstream: OpenAIUpstream, tenants: Tenants, sessions: list[RawSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "MAX_OPEN_COMPLETIONS", 3)
    upstream.scenarios["slow"] = Scenario(chunks=["tick "] * 200, interval_s=0.05)
    sidecar = await tenants.start(_config(upstream))
    session = RawSession(sidecar.address, TOKENS[ATTACKER])
    sessions.append(session)
    for i in range(1, 5):
        await session.start(i, chat_request("slow"))
    refused = await session.ended_with(4)
    assert refused.reason is Reason.OVERLOADED and refused.retry_after_s
    assert not any(session.ended[i].is_set() for i in (1, 2, 3)), "the first three stream on"


async def test_draining_refuses_new_starts_and_ends_idle_sessions(
    upstream: OpenAIUpstream, tenants: Tenants, sessions: list[RawSession]
) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=["tick "] * 60, interval_s=0.05)
    upstream.scenarios["steady"] = Scenario(chunks=["warm"])
    sidecar = await tenants.start(_config(upstream))
    busy = RawSession(sidecar.address, TOKENS[VICTIM])
    idle = RawSession(sidecar.address, TOKENS[ATTACKER])
    sessions += [busy, idle]
    await busy.start(1, chat_request("slow"))
    await wait_for(lambda: "tick" in busy.text(1))
    await idle.start(1, chat_request("steady", request_id="idle-warm"))
    await idle.ended_ok(1)
    stopping = asyncio.ensure_future(sidecar.stop(grace_s=20))
    await asyncio.wait_for(idle.reader, 10)  # the idle session ends OK at once, not after the grace
    assert await idle.call.code() == grpc.StatusCode.OK
    await busy.start(2, chat_request("slow"))
    assert (await busy.ended_with(2)).reason is Reason.SIDECAR_UNAVAILABLE
    assert await busy.ended_ok(1) == "tick " * 60, "the open completion finished within the grace"
    await asyncio.wait_for(stopping, 20)
