"""Request bytes that do not decode get INVALID_ARGUMENT, not grpc's own UNKNOWN.

grpc runs the generated deserializer before any of our code, and a DecodeError there
reaches the client as UNKNOWN with a Python class repr. This interceptor wraps each
method's deserializer so such a call is answered through the error table like any other.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from exo_remote_engine.contract.errors import Reason, RemoteError, abort

_UNDECODABLE = object()


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # method -> (grpc's handler, our wrapper of it): built once per method, not per
        # call (a wrapper is three closures and a new handler tuple).
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming and not handler.response_streaming:
            return handler  # no such method here (anonymous health is the access interceptor's)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = _guard(handler, method)
        if len(self._guarded) < 256:  # registered methods only, in practice; never unbounded
            self._guarded[method] = (handler, guarded)
        return guarded


def _guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that cannot raise, and a refusal for what it could
    not decode."""
    deserialize = handler.request_deserializer

    def safe_deserialize(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return _UNDECODABLE

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await abort(context, RemoteError(Reason.INVALID_REQUEST, f"request bytes do not decode as {method}'s request"))

    kwargs = {"request_deserializer": safe_deserialize, "response_serializer": handler.response_serializer}
    if handler.stream_stream is not None:  # Session: a frame that does not decode ends it
        inner_session = handler.stream_stream

        async def checked(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async for request in requests:
                if request is _UNDECODABLE:
                    await refuse(context)
                yield request

        async def session(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await inner_session(checked(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(session, **kwargs)
    if handler.unary_unary is not None:
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if request is _UNDECODABLE:
                await refuse(context)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    inner_stream = handler.unary_stream
    if inspect.isasyncgenfunction(inner_stream):

        async def stream_gen(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if request is _UNDECODABLE:
                await refuse(context)
            async for response in inner_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(stream_gen, **kwargs)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if request is _UNDECODABLE:
            await refuse(context)
        await inner_stream(request, context)

    return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
