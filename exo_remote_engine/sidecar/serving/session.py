"""``Session``: many completions of one node multiplexed on one stream.

A Generate call costs the sidecar more to set up (HTTP/2 stream, metadata, interceptors,
context, status trailers) than the whole relay of a short reply. A Session pays that once:
each start frame runs the servicer's own Generate, unchanged, against a
:class:`CompletionContext` that looks like a call's context to it (the session's caller,
the completion's deadline, a ``write`` that tags frames, an ``abort`` that sends the error
in-band). So a multiplexed completion is held to exactly Generate's rules: request id
check, model, node rules, limits and queue lines, budget reservation, stall watch,
accounting, the one log line.

The writer batches: frames queued while its previous write was in flight leave together in
one message (gRPC's cost is per message), and a message of continuation deltas only leaves
:data:`COALESCE_S` after the previous one at the earliest, so deltas of a node's
concurrent streams share messages; a completion's first event, its end and errors never
wait. What a session holds is bounded: at most :data:`MAX_OPEN_COMPLETIONS` open
completions, and at most :data:`MAX_QUEUED_BYTES` of frames not yet written; past that a
completion's write waits, so a node that stops reading its session is ended by each
completion's stall watch, as a stalled Generate call is. Only that node's completions
share the session (its flow-control window, its head-of-line blocking); another node's
never do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from exo_remote_engine.contract.errors import STATUS_DETAILS_KEY, Reason, RemoteError, abort
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger

log = safe_logger("exo_remote_engine.sidecar")

MAX_OPEN_COMPLETIONS = 1024
# Per completion: event bytes sent and not yet acknowledged (SessionAck). The client acks
# every quarter window, so a short reply never sends one.
COMPLETION_WINDOW_BYTES = 1024 * 1024
MAX_QUEUED_BYTES = 4 * 1024 * 1024
WRITE_FLUSH_S = 5.0  # a session's last frames get this long to leave once it ends
# A message carrying only continuation deltas leaves at most this long after the previous
# one, so frames that arrive meanwhile share it: gRPC's cost is per message (~200 us of the
# sidecar's CPU here), not per frame (docs/benchmarks.md). A completion's first event, its
# end, an error, and a queue past URGENT_BYTES never wait.
COALESCE_S = 0.002
URGENT_BYTES = 256 * 1024

Generate = Callable[[pb.GenerateRequest, Any], Awaitable[None]]


class CompletionContext:
    """What Generate reads and calls on its context, for one completion of a session."""

    __slots__ = ("_acked", "_deadline", "_loop", "_sent_any", "_session", "_stream_id", "_trailers", "_unacked")

    def __init__(self, session: _Session, stream_id: int, timeout_s: float) -> None:
        self._session = session
        self._stream_id = stream_id
        self._loop = session.loop
        self._deadline = self._loop.time() + timeout_s if timeout_s > 0 else None
        self._trailers: Sequence[tuple[str, Any]] = ()
        self._unacked = 0  # event bytes sent that the client's reader has not taken yet
        self._acked: asyncio.Future[None] | None = None
        self._sent_any = False

    def invocation_metadata(self) -> Sequence[tuple[str, Any]] | None:
        return self._session.metadata

    def auth_context(self) -> dict[str, Any]:
        return self._session.auth

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    async def write(self, response: pb.GenerateResponse) -> None:
        """Waits while the window is full: the relay merges meanwhile and, past its bound,
        stops reading the provider; the stall watch ends a reader that never takes more."""
        while self._unacked >= COMPLETION_WINDOW_BYTES:
            self._acked = self._loop.create_future()
            try:
                await self._acked
            finally:
                self._acked = None
        size = response.ByteSize()
        self._unacked += size
        urgent = not self._sent_any or response.HasField("finished")
        self._sent_any = True
        await self._session.send_event(self._stream_id, response, size, urgent)

    def ack(self, consumed_bytes: int) -> None:
        self._unacked = max(0, self._unacked - consumed_bytes)
        if self._acked is not None and not self._acked.done():
            self._acked.set_result(None)

    def set_trailing_metadata(self, trailers: Sequence[tuple[str, Any]]) -> None:
        self._trailers = trailers

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        """Send the completion's error frame (the status Generate would have ended with)
        and end the completion; the session goes on."""
        status = next((v for k, v in self._trailers if k == STATUS_DETAILS_KEY and isinstance(v, bytes)), None)
        if status is None:  # every abort goes through contract.errors.abort, which sets it
            status = RemoteError(Reason.INTERNAL, details or code.name).to_status_proto().SerializeToString()
        self._session.send_status(self._stream_id, status)
        raise grpc.aio.AbortError()


class _Session:
    """One Session call: its open completions and the writer that batches their frames."""

    def __init__(self, generate: Generate, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.metadata = context.invocation_metadata()
        self.auth = context.auth_context()
        self._generate = generate
        self._context = context
        self._open: dict[int, asyncio.Task[None]] = {}
        self._contexts: dict[int, CompletionContext] = {}
        # The next message, built in place: each frame is copied once, into it.
        self._queued = pb.SessionResponse()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._now = asyncio.Event()  # something queued must not wait for company
        self._last_write = 0.0
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._task: asyncio.Task[Any] | None = None
        self._ended_idle = False
        self.draining = False

    async def send_event(self, stream_id: int, event: pb.GenerateResponse, size: int, urgent: bool) -> None:
        """Queue ``event`` (``urgent``: a first event or an end, which never waits for
        company); waits while the session holds too much unwritten (backpressure to this
        completion's relay, and its stall watch)."""
        while not self._room.is_set():
            await self._room.wait()
        frame = self._queued.frames.add(stream_id=stream_id)
        frame.event.CopyFrom(event)
        self._queued_more(size, urgent)

    def send_status(self, stream_id: int, status: bytes) -> None:
        self._queued.frames.add(stream_id=stream_id, status=status)
        self._queued_more(len(status), True)

    def _queued_more(self, size: int, urgent: bool) -> None:
        self._queued_bytes += size
        if self._queued_bytes > MAX_QUEUED_BYTES:
            self._room.clear()
        if urgent or self._queued_bytes >= URGENT_BYTES:
            self._now.set()
        self._wake.set()

    async def run(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        self._task = task = asyncio.current_task()
        assert task is not None
        writer = asyncio.ensure_future(self._write_all())
        writer.add_done_callback(self._writer_ended)
        try:
            async for message in requests:
                for frame in message.frames:
                    self._on_frame(frame)
            # The client half-closed: what is open finishes, then the session ends OK.
            while self._open:
                await asyncio.wait(list(self._open.values()))
        except asyncio.CancelledError:
            if not self._ended_idle:
                raise
            task.uncancel()  # drained while idle: end OK, the client opens another
        finally:
            self._closing = True  # from here on the session ends by itself (end_if_idle waits)
            for completion in self._open.values():
                completion.cancel()
            if self._open:
                await asyncio.wait(list(self._open.values()))
            self._wake.set()
            self._now.set()  # the last frames wait for no company
            if not writer.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(writer, WRITE_FLUSH_S)

    def _writer_ended(self, writer: asyncio.Future[None]) -> None:
        """A write failed (the client is gone): the session ends with it."""
        if not writer.cancelled() and writer.exception() is not None and self._task is not None:
            self._task.cancel()

    def end_if_idle(self) -> None:
        """Draining: a session with nothing open ends now instead of holding the grace."""
        if self.draining and not self._open and self._task is not None and not (self._ended_idle or self._closing):
            self._ended_idle = True
            self._task.cancel()

    def _on_frame(self, frame: pb.SessionRequestFrame) -> None:
        kind = frame.WhichOneof("frame")
        stream_id = frame.stream_id
        if kind == "ack":
            context = self._contexts.get(stream_id)
            if context is not None:
                context.ack(frame.ack.consumed_bytes)
            return
        if kind == "cancel":
            task = self._open.get(stream_id)
            if task is not None:
                task.cancel()
            return
        if kind != "start":
            raise RemoteError(
                Reason.INVALID_REQUEST, f"session frame for stream {stream_id} is not start, cancel or ack"
            )
        if stream_id in self._open:
            raise RemoteError(Reason.INVALID_REQUEST, f"stream id {stream_id} is already open on this session")
        refusal = self._refusal()
        if refusal is not None:
            self.send_status(stream_id, refusal)
            return
        completion = CompletionContext(self, stream_id, frame.start.timeout_seconds)
        task = asyncio.ensure_future(self._complete(frame.start.request, completion))
        self._open[stream_id] = task
        self._contexts[stream_id] = completion
        task.add_done_callback(lambda _: self._closed(stream_id))

    def _closed(self, stream_id: int) -> None:
        self._open.pop(stream_id, None)
        self._contexts.pop(stream_id, None)
        self.end_if_idle()

    def _refusal(self) -> bytes | None:
        if self.draining:
            error = RemoteError(Reason.SIDECAR_UNAVAILABLE, "sidecar draining: open a new session", retry_after_s=0.0)
        elif len(self._open) >= MAX_OPEN_COMPLETIONS:
            error = RemoteError(
                Reason.OVERLOADED, f"a session holds at most {MAX_OPEN_COMPLETIONS} open completions", retry_after_s=1.0
            )
        else:
            return None
        return error.to_status_proto().SerializeToString()

    async def _complete(self, request: pb.GenerateRequest, completion: CompletionContext) -> None:
        try:
            await self._generate(request, completion)
        except grpc.aio.AbortError:
            pass  # its error frame is queued
        except asyncio.CancelledError:
            pass  # the client cancelled it (or left): nobody is waiting for a frame

    async def _write_all(self) -> None:
        """Whatever queued while the previous write was in flight, or while a message of
        continuation deltas waited for company (COALESCE_S), leaves as one message."""
        loop = self.loop
        while not (self._closing and not self._queued.frames):
            await self._wake.wait()
            self._wake.clear()
            if not self._queued.frames:
                continue
            hold = self._last_write + COALESCE_S - loop.time()
            if hold > 0 and not (self._now.is_set() or self._closing):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(hold):
                        await self._now.wait()
            message, self._queued, self._queued_bytes = self._queued, pb.SessionResponse(), 0
            self._now.clear()
            self._room.set()
            self._last_write = loop.time()
            await self._context.write(message)


class Sessions:
    """The servicer's Session method and the set of open sessions (drained on stop)."""

    def __init__(self, generate: Generate) -> None:
        self._generate = generate
        self._open: set[_Session] = set()
        self.draining = False

    async def serve(
        self, requests: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        session = _Session(self._generate, context)
        session.draining = self.draining
        self._open.add(session)
        try:
            await session.run(requests)
        except RemoteError as exc:  # the client broke the protocol: the session ends
            log.warning("session ended: %s", exc.message)
            await abort(context, exc)
        finally:
            self._open.discard(session)

    @property
    def open_sessions(self) -> int:
        return len(self._open)

    def drain(self) -> None:
        """New starts on any session get SIDECAR_UNAVAILABLE (clients retry elsewhere);
        open completions finish within the server's grace."""
        self.draining = True
        for session in list(self._open):
            session.draining = True
            session.end_if_idle()
