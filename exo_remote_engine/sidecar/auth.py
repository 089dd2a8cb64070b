"""Who may call the sidecar: a bearer token checked in constant time, and TLS settings.

The check is an interceptor so every RPC is covered without the servicer knowing.
Health checks stay open (load balancers and the exo side probe them before auth).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

_OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose ``authorization: Bearer <token>`` matches no configured token."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens or any(not t for t in tokens):
            raise ValueError("TokenAuthInterceptor needs non-empty tokens")
        self._tokens = tuple(t.encode() for t in tokens)

    def _allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        presented = header[7:].encode() if header.startswith("Bearer ") else b""
        # Compare against every token so timing does not reveal which one nearly matched.
        results = [hmac.compare_digest(presented, t) for t in self._tokens]
        return any(results)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in _OPEN_METHODS:  # type: ignore[attr-defined]
            return handler
        if self._allowed(handler_call_details.invocation_metadata):  # type: ignore[attr-defined]
            return handler
        return _deny_like(handler)


def _deny_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid sidecar token")

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


@dataclass(frozen=True)
class ServerTLS:
    """Server certificate, and a client CA when clients must present certificates (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        root = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=root,
            require_client_auth=root is not None,
        )
