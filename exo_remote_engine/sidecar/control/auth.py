"""Who may call the sidecar, decided before a single request byte is decoded.

One interceptor, first in the chain, sorts every call into one of three doors:

* **authenticated** (a bearer token that matches, checked in constant time; or, when no
  tokens are configured, a client certificate the TLS layer already verified): the
  method runs as registered;
* **health from anyone else** (``grpc.health.v1.Health``: probes ask before they have
  credentials): it runs inside a small budget shared by all such callers, with Watch
  streams bounded in number and duration, and a request of at most a few bytes. The
  budget is taken *before* the request is read (the handler is registered as
  request-streaming, so grpc runs it at once and reads a message only when asked), and
  only :data:`MAX_ANONYMOUS_READERS` such requests are read at a time: what all anonymous
  callers together make the sidecar hold is a few requests of at most the server's
  message limit (sized from ``max_request_bytes``; grpc refuses a longer message by its
  length prefix, before buffering it) plus a flow-control window per admitted call;
* **anything else from an unauthenticated caller** when authentication is configured: it
  is refused by a handler that never reads the request, so a large body costs the
  sidecar nothing but the flow-control window.

When no authentication is configured at all (loopback, or ``--allow-anonymous``), every
non-health call is let through: that is the operator's explicit choice.
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from exo_remote_engine.contract.errors import Reason, RemoteError, abort
from exo_remote_engine.sidecar.config.rules import Limits

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
# A HealthCheckRequest is a service name; anything much larger is not a probe.
MAX_ANONYMOUS_REQUEST_BYTES = 1024
# Anonymous health requests read at once; a request waits its turn holding only its
# flow-control window. With the server's message limit this bounds what anonymous callers
# hold: 4 x (16 MiB + 64 KiB) by default.
MAX_ANONYMOUS_READERS = 4
ANONYMOUS_READ_TIMEOUT_S = 5.0  # a probe sends its few bytes at once; a stalled one gives way
_OVERSIZED = object()


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Admits, budgets or refuses each call by what the caller proved (see the module doc)."""

    def __init__(self, tokens: Sequence[str], *, client_certificates: bool, limits: Limits) -> None:
        if any(not t for t in tokens):
            raise ValueError("empty bearer token")
        self._tokens = tuple(t.encode() for t in tokens)
        # mTLS without tokens: grpc refused every connection without a verified certificate.
        self._verified_by_tls = client_certificates and not tokens
        self._limits = limits
        self._health_calls = 0
        self._watches = 0
        self._readers = asyncio.Semaphore(MAX_ANONYMOUS_READERS)

    @property
    def requires_authentication(self) -> bool:
        return bool(self._tokens) or self._verified_by_tls

    def authenticated(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        if not self._tokens:
            return self._verified_by_tls
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        presented = header[7:].encode("latin-1", "replace") if header.startswith("Bearer ") else b""
        # Compare against every token so timing does not reveal which one nearly matched.
        results = [hmac.compare_digest(presented, t) for t in self._tokens]
        return any(results)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or self.authenticated(handler_call_details.invocation_metadata):  # type: ignore[attr-defined]
            return handler
        if method in (HEALTH_CHECK, HEALTH_WATCH):
            return self._anonymous_health(handler, watch=method == HEALTH_WATCH)
        if self._tokens:
            return refusal(RemoteError(Reason.UNAUTHENTICATED, "missing or invalid sidecar token"))
        return handler

    # ----------------------------------------------------------- the anonymous budget

    def _over_budget(self, watch: bool) -> RemoteError | None:
        limits = self._limits
        if self._health_calls >= limits.max_anonymous_health_calls:
            return RemoteError(
                Reason.OVERLOADED,
                f"too many unauthenticated health calls (limit {limits.max_anonymous_health_calls})",
                retry_after_s=1.0,
            )
        if watch and self._watches >= limits.max_anonymous_watches:
            return RemoteError(
                Reason.OVERLOADED,
                f"too many unauthenticated health Watch streams (limit {limits.max_anonymous_watches})",
                retry_after_s=5.0,
            )
        return None

    @contextmanager
    def _held(self, watch: bool) -> Iterator[None]:
        """Count one anonymous health call while it runs. Counted in the handler, not in
        intercept_service: a call that never reaches its handler (its client left while
        the request was in flight) must not keep a slot forever."""
        self._health_calls += 1
        self._watches += watch
        try:
            yield
        finally:
            self._health_calls -= 1
            self._watches -= watch

    def _anonymous_health(self, handler: grpc.RpcMethodHandler, watch: bool) -> grpc.RpcMethodHandler:
        full = self._over_budget(watch)
        if full is not None:  # refused before its request is read
            return refusal(full)
        deserialize = handler.request_deserializer

        def bounded(data: bytes) -> Any:
            if len(data) > MAX_ANONYMOUS_REQUEST_BYTES:
                return _OVERSIZED
            return deserialize(data) if deserialize is not None else data

        too_large = RemoteError(
            Reason.REQUEST_TOO_LARGE,
            f"request too large: an unauthenticated health request may be {MAX_ANONYMOUS_REQUEST_BYTES} bytes",
        )

        kwargs = {"request_deserializer": bounded, "response_serializer": handler.response_serializer}
        if not watch:
            check = handler.unary_unary

            async def bounded_check(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if (full := self._over_budget(watch=False)) is not None:
                    await abort(context, full)
                with self._held(watch=False):
                    request = await self._read_one(requests)
                    if request is _OVERSIZED:
                        return _answer(context, too_large)
                    return await check(request, context)

            return grpc.stream_unary_rpc_method_handler(bounded_check, **kwargs)

        stream = handler.unary_stream
        max_s = self._limits.max_anonymous_watch_s

        async def bounded_watch(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            if (full := self._over_budget(watch=True)) is not None:
                await abort(context, full)
            with self._held(watch=True):
                request = await self._read_one(requests)
                if request is _OVERSIZED:
                    _answer(context, too_large)
                    return
                # Ends with OK after max_s: a health client simply watches again.
                async for response in _for_at_most(stream(request, context), max_s):
                    yield response

        return grpc.stream_stream_rpc_method_handler(bounded_watch, **kwargs)

    async def _read_one(self, requests: AsyncIterator[Any]) -> Any:
        """The call's one request, read while at most :data:`MAX_ANONYMOUS_READERS` are;
        ``_OVERSIZED`` for a request too large, or none in time."""
        async with self._readers:
            try:
                async with asyncio.timeout(ANONYMOUS_READ_TIMEOUT_S):
                    request = await anext(aiter(requests), _OVERSIZED)
            except TimeoutError:
                return _OVERSIZED
        if request is _OVERSIZED:
            _trim_soon()
        return request


_trim_pending = False


def _trim_soon() -> None:
    """Give the heap's free pages back to the system shortly after a large anonymous request
    was dropped (grpc frees its buffer when the call ends): glibc keeps freed blocks of
    this size in its arenas otherwise, and a flood would leave the sidecar that much larger.
    Once a second at most; a no-op where there is no glibc."""
    global _trim_pending
    if _trim_pending or _MALLOC_TRIM is None:
        return
    _trim_pending = True

    def trim() -> None:
        global _trim_pending
        _trim_pending = False
        assert _MALLOC_TRIM is not None
        _MALLOC_TRIM(0)

    asyncio.get_running_loop().call_later(1.0, trim)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


async def _for_at_most(responses: AsyncIterator[Any], seconds: float) -> AsyncIterator[Any]:
    """``responses`` until they end or ``seconds`` have passed, whichever is first."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    try:
        while (remaining := end - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    response = await anext(responses)
            except (StopAsyncIteration, TimeoutError):
                return
            yield response
    finally:
        aclose = getattr(responses, "aclose", None)
        if aclose is not None:
            await aclose()


def _answer(context: grpc.aio.ServicerContext[Any, Any], error: RemoteError) -> None:
    """End the call with ``error`` by returning, not raising: an exception's traceback
    would keep grpc's frame, and with it the oversized request bytes, alive until the
    next cyclic garbage collection (seen: +30 MiB RSS per refused 30 MiB probe)."""
    context.set_trailing_metadata(error.trailing_metadata())
    context.set_code(error.grpc_code)
    context.set_details(error.message)


def refusal(error: RemoteError) -> grpc.RpcMethodHandler:
    """A handler that answers ``error`` without reading the request: registered as
    request-streaming, grpc hands it an iterator it never consumes, so no request byte
    is buffered beyond the flow-control window and nothing is deserialised."""

    async def refuse(_requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await abort(context, error)

    return grpc.stream_stream_rpc_method_handler(refuse)


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
