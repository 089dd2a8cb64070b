"""A node's multiplexed ``Session``: many completions on one long-lived stream.

One Generate call per completion pays gRPC's call set-up on both sides, which costs more
than the relay of a short reply; a Session pays it once per connection. Completions are
numbered by this side; their frames come back tagged and are handed to each completion's
:class:`SessionStream`. Start frames queued in the same loop tick leave as one message.

What the per-call path gave for free is done here: each completion's own deadline (a timer
that fails it and tells the sidecar), cancellation (a cancel frame), and the end of the
session failing every completion still open on it (SIDECAR_UNAVAILABLE, which the client
retries while nothing was received). A sidecar without ``Session`` (UNIMPLEMENTED) is
remembered, and the client goes back to one Generate call per completion.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import grpc

from exo_remote_engine.contract.errors import STATUS_DETAILS_KEY, Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # grpcio 1.70 (classic exo's pin) cannot subscript these at run time
    SessionMethod: TypeAlias = grpc.aio.StreamStreamMultiCallable[pb.SessionRequest, pb.SessionResponse]

# Requests larger than this go as their own Generate call: a session message over the
# sidecar's receive limit would end the session and every completion on it.
MAX_MULTIPLEXED_REQUEST_BYTES = 256 * 1024
# Start frames batched into one message stay under this (well under any receive limit).
MAX_BATCH_BYTES = 64 * 1024
# The sidecar's per-completion window is 1 MiB of event bytes (serving/session.py); what
# the reader took is acknowledged every quarter of it, so a short reply sends no ack and
# a slow reader holds at most a window here.
ACK_EVERY_BYTES = 256 * 1024


class SessionUnsupported(Exception):
    """The sidecar has no Session method: use one Generate call per completion."""


class SessionLost(Exception):
    """The session broke on this side before the sidecar's status arrived, so what the
    sidecar said is lost: grpc.aio replaces the status of a call with a local INTERNAL
    ("Internal error from Core", no status details) when a write races the call's end, as
    when the sidecar refuses a wrong token at once. A completion that received nothing yet
    goes again as its own call, which reports the sidecar's own answer."""


class SessionStream:
    """One completion's events, in order; :meth:`read` raises its RemoteError."""

    __slots__ = ("_events", "_failure", "_session", "_taken", "_timer", "_waiter", "done", "received", "stream_id")

    def __init__(self, session: Session, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._events: collections.deque[pb.GenerateResponse] = collections.deque()
        self._failure: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._taken = 0  # event bytes read and not yet acknowledged
        self.done = False
        self.received = False  # an event came: the completion can no longer go again

    async def read(self) -> pb.GenerateResponse | None:
        """The next event; None after the finished event."""
        while not self._events:
            if self._failure is not None:
                raise self._failure
            if self.done:
                return None
            self._waiter = self._session.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = self._events.popleft()
        if not self.done:
            self._taken += event.ByteSize()
            if self._taken >= ACK_EVERY_BYTES:
                self._session.ack(self.stream_id, self._taken)
                self._taken = 0
        return event

    def cancel(self) -> None:
        """The consumer stopped early: the sidecar ends the completion (and charges it as
        a cancelled call)."""
        if not self.done:
            self._end()
            self._session.cancel(self.stream_id)

    def _put(self, event: pb.GenerateResponse) -> None:
        self.received = True
        self._events.append(event)
        if event.HasField("finished"):
            self._end()
        self._wake()

    def _fail(self, failure: BaseException) -> None:
        if self.done:
            return
        self._failure = failure
        self._end()
        self._wake()

    def _end(self) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
        self._session.forget(self.stream_id)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _deadline_passed(self, deadline_s: float) -> None:
        if not self.done:
            self._fail(RemoteError(Reason.DEADLINE_EXCEEDED, f"deadline of {deadline_s:.1f}s exceeded"))
            self._session.cancel(self.stream_id)


class Session:
    """One Session call on one channel, shared by every completion sent over it."""

    def __init__(self, method: SessionMethod, metadata: Sequence[tuple[str, str]]) -> None:
        self.loop = asyncio.get_running_loop()
        self._call = method(metadata=metadata)
        self._streams: dict[int, SessionStream] = {}
        self._next_id = 0
        self._outgoing: list[pb.SessionRequest] = []
        self._outgoing_bytes = 0
        self._wake = asyncio.Event()
        self.closed = False  # takes no new completion
        self._reader = asyncio.ensure_future(self._read_all())
        self._writer = asyncio.ensure_future(self._write_all())

    def start(self, request: pb.GenerateRequest, deadline_s: float, size: int) -> SessionStream:
        """Open a completion of ``request`` (``size``: its serialized bytes, which the caller
        already measured)."""
        self._next_id += 1
        stream = SessionStream(self, self._next_id)
        self._streams[stream.stream_id] = stream
        if deadline_s > 0:
            stream._timer = self.loop.call_later(deadline_s, stream._deadline_passed, deadline_s)
        start = self._frame(stream.stream_id, size).start
        start.request.CopyFrom(request)
        start.timeout_seconds = deadline_s
        return stream

    def cancel(self, stream_id: int) -> None:
        if not self._reader.done():
            self._frame(stream_id).cancel.SetInParent()

    def ack(self, stream_id: int, consumed_bytes: int) -> None:
        if not self._reader.done():
            self._frame(stream_id).ack.consumed_bytes = consumed_bytes

    def forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    async def close(self) -> None:
        """End the session: its open completions fail as a closed channel's calls would."""
        self._closed(RemoteError(Reason.SIDECAR_UNAVAILABLE, "sidecar unavailable: session closed"))
        self._call.cancel()
        for task in (self._reader, self._writer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _frame(self, stream_id: int, size: int = 16) -> pb.SessionRequestFrame:
        """A new frame in the next outgoing message (built in place: the request is copied
        once), or in a new one past :data:`MAX_BATCH_BYTES`."""
        if not self._outgoing or self._outgoing_bytes + size > MAX_BATCH_BYTES:
            self._outgoing.append(pb.SessionRequest())
            self._outgoing_bytes = 0
        self._outgoing_bytes += size
        self._wake.set()
        return self._outgoing[-1].frames.add(stream_id=stream_id)

    async def _write_all(self) -> None:
        """Frames queued while the previous write was in flight leave together, up to
        :data:`MAX_BATCH_BYTES` a message."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                pending, self._outgoing = self._outgoing, []
                for message in pending:
                    await self._call.write(message)
        except asyncio.CancelledError:
            raise
        except Exception:  # the call ended: the reader reports why
            self._call.cancel()

    async def _read_all(self) -> None:
        failure: BaseException
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                streams = self._streams
                for frame in message.frames:  # type: ignore[union-attr]
                    stream = streams.get(frame.stream_id)
                    if stream is None:
                        continue  # cancelled or timed out here already
                    if frame.HasField("event"):
                        stream._put(frame.event)
                    else:
                        stream._fail(RemoteError.from_status(None, None, ((STATUS_DETAILS_KEY, frame.status),)))
            failure = RemoteError(Reason.SIDECAR_UNAVAILABLE, "sidecar unavailable: the session ended")
        except asyncio.CancelledError:
            failure = RemoteError(Reason.SIDECAR_UNAVAILABLE, "sidecar unavailable: session closed")
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                failure = SessionUnsupported()
            elif code == grpc.StatusCode.INTERNAL and not any(k == STATUS_DETAILS_KEY for k, _ in trailers or ()):
                failure = SessionLost()  # every status the sidecar sends carries its details
            else:
                details = exc.details() if hasattr(exc, "details") else str(exc)
                failure = RemoteError.from_status(code, details, trailers)
        self._closed(failure)

    def _closed(self, failure: BaseException) -> None:
        self.closed = True
        mid_reply = RemoteError(Reason.SIDECAR_UNAVAILABLE, "sidecar unavailable: the session broke mid-reply")
        for stream in list(self._streams.values()):
            stream._fail(mid_reply if isinstance(failure, SessionLost) and stream.received else failure)
        self._streams.clear()


class SessionPool:
    """One session per channel (a channel reaches one sidecar process), and the channels
    whose sidecar has none (an older sidecar)."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = metadata
        self._sessions: dict[grpc.aio.Channel, Session] = {}
        self._unsupported: set[grpc.aio.Channel] = set()

    def session(self, channel: grpc.aio.Channel) -> Session | None:
        """The open session of ``channel``, opened when it has none (or its last ended)."""
        if channel in self._unsupported:
            return None
        session = self._sessions.get(channel)
        if session is None or session.closed:
            method: SessionMethod = pb_grpc.RemoteInferenceServiceStub(channel).Session
            session = self._sessions[channel] = Session(method, self._metadata)
        return session

    def unsupported(self, channel: grpc.aio.Channel) -> None:
        self._unsupported.add(channel)

    async def close(self, channel: grpc.aio.Channel | None = None) -> None:
        """Close ``channel``'s sessions now (every channel's when None)."""
        channels = list(self._sessions) if channel is None else [channel]
        for each in channels:
            session = self._sessions.pop(each, None)
            if session is not None:
                await session.close()
            self._unsupported.discard(each)
