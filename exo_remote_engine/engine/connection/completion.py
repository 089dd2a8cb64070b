"""One completion being read, the same way whether it travels as its own Generate call or
on a multiplexed Session: events in order, ``None`` at the end, a RemoteError on failure,
and ``cancel`` when the reader stops early."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeAlias

import grpc

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb

if TYPE_CHECKING:  # grpcio 1.70 (classic exo's pin) cannot subscript these at run time
    GenerateCall: TypeAlias = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]


class Completion(Protocol):
    done: bool

    async def read(self) -> pb.GenerateResponse | None: ...

    def cancel(self) -> None: ...


def error_from(exc: grpc.RpcError) -> RemoteError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return RemoteError.from_status(code, details, trailers)


class CallCompletion:
    """A completion read from its own Generate call."""

    __slots__ = ("_call", "done")

    def __init__(self, call: GenerateCall) -> None:
        self._call = call
        self.done = False

    async def read(self) -> pb.GenerateResponse | None:
        try:
            event = await self._call.read()
        except grpc.RpcError as exc:
            self.done = True
            raise error_from(exc) from None
        if event is grpc.aio.EOF:
            self.done = True
            code = await self._call.code()
            if code == grpc.StatusCode.OK:
                return None
            raise RemoteError.from_status(code, await self._call.details(), await self._call.trailing_metadata())
        return event  # type: ignore[return-value]

    def cancel(self) -> None:
        if not self._call.done():
            self._call.cancel()


async def first_event(completion: Completion) -> pb.GenerateResponse:
    """The first event that carries something (a delta with content, or Finished): until
    then the completion may still be retried on another host without duplicating text. The
    sidecar never sends a contentless delta; one from elsewhere is skipped, not counted."""
    while True:
        event = await completion.read()
        if event is None:
            raise RemoteError(Reason.INTERNAL, "sidecar ended the stream without a result")
        if not contentless(event):
            return event


def contentless(event: pb.GenerateResponse) -> bool:
    if event.WhichOneof("event") != "delta":
        return False
    delta = event.delta
    return not (delta.text or delta.reasoning_text or len(delta.tool_calls))
