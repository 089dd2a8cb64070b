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
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        deserialize = handler.request_deserializer
        method = handler_call_details.method  # type: ignore[attr-defined]

        def safe_deserialize(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:
                return _UNDECODABLE

        async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await abort(
                context, RemoteError(Reason.INVALID_REQUEST, f"request bytes do not decode as {method}'s request")
            )

        kwargs = {"request_deserializer": safe_deserialize, "response_serializer": handler.response_serializer}
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
