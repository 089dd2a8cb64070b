"""What one upstream may send, on both transports, so that a hostile or broken provider
costs bounded memory and CPU and cannot stall the other streams of the process.

The openai SDK (under LiteLLM) reads SSE by appending each received line to the event
being built (``data += line``): an event of many lines costs quadratic time, all of it on
the event loop. 200,000 ``data:`` lines without a blank line blocked every other stream
for 26 s. :class:`GuardedTransport` sits under LiteLLM's HTTP clients and hands the SDK only
complete events, each within :data:`MAX_EVENT_LINES` and :data:`MAX_EVENT_BYTES`; the
direct reader (:mod:`~exo_remote_engine.sidecar.transports.openai_transport`) applies the same limits
in its own parser. A stream over a limit fails like any broken stream: PROVIDER_UNAVAILABLE.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

# One SSE event: real servers send 1-4 lines ("event:", "id:", "data:"), and one data line
# can hold a large tool call or a whole answer.
MAX_EVENT_LINES = 16
MAX_EVENT_BYTES = 1024 * 1024
# An error response body (read whole by the SDK): more is not an error message.
MAX_ERROR_BODY_BYTES = 1024 * 1024

_LINE_END = re.compile(rb"\r\n|\r|\n")
_EVENT_ENDS = (b"\r\r", b"\n\n", b"\r\n\r\n")


class UpstreamLimitError(httpx.RemoteProtocolError):
    """The upstream sent more than one event or error body may hold. An httpx transport
    error, so LiteLLM reports it as the connection failure it amounts to."""


def event_too_large(lines: int, size: int) -> str | None:
    """Why an event of ``lines`` lines and ``size`` bytes is refused, or None."""
    if lines > MAX_EVENT_LINES:
        return f"the provider sent a stream event of more than {MAX_EVENT_LINES} lines"
    if size > MAX_EVENT_BYTES:
        return f"the provider sent a stream event of more than {MAX_EVENT_BYTES // 1024} KiB"
    return None


async def complete_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Re-chunk an SSE byte stream into whole events (several per chunk when they arrive
    together), enforcing the limits; linear in the bytes received. The events before a
    refused one are still handed on."""
    pending = bytearray()
    scanned = 0  # pending[:scanned] has been searched for line ends already
    lines = 0
    async for chunk in chunks:
        pending += chunk
        complete = 0  # pending[:complete] is whole events
        position = 0  # the end of the last whole line
        refused: str | None = None
        search_from = scanned
        while refused is None:
            match = _LINE_END.search(pending, search_from)
            if match is None:
                # Nothing before the end ends a line: never search these bytes again (a
                # trailing "\r" may be the first half of "\r\n": look at it once more).
                search_from = len(pending) - pending.endswith(b"\r")
                break
            if match.group() == b"\r" and match.end() == len(pending):
                search_from = match.start()
                break
            position = search_from = match.end()
            # The SDK's own rule for the end of an event, on the same bytes.
            if bytes(pending[max(complete, position - 4) : position]).endswith(_EVENT_ENDS):
                complete, lines = position, 0
            else:
                lines += 1
                refused = event_too_large(lines, position - complete)
        scanned = search_from
        refused = refused or event_too_large(lines, len(pending) - complete)
        if complete:
            yield bytes(pending[:complete])
            del pending[:complete]
            scanned -= complete
        if refused:
            raise UpstreamLimitError(refused)
    if pending:
        yield bytes(pending)


async def capped_body(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An error body up to :data:`MAX_ERROR_BODY_BYTES`."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > MAX_ERROR_BODY_BYTES:
            raise UpstreamLimitError(f"the provider sent an error body over {MAX_ERROR_BODY_BYTES // 1024} KiB")
        yield chunk


class _GuardedStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, success: bool) -> None:
        self._inner = inner
        self._success = success

    async def __aiter__(self) -> AsyncIterator[bytes]:
        guard = complete_events if self._success else capped_body
        async for chunk in guard(self._inner.__aiter__()):
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport applying the limits to every response of ``inner``."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        response.stream = _GuardedStream(response.stream, 200 <= response.status_code < 300)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __getattr__(self, name: str) -> Any:  # LiteLLM may reach into its own transport
        return getattr(self._inner, name)


_installed = False


def guard_litellm_transports() -> None:
    """Put :class:`GuardedTransport` under every HTTP client LiteLLM creates from now on
    (the openai SDK's and its own handlers'). LiteLLM has no hook for this; its one
    factory of async transports is wrapped."""
    global _installed
    if _installed:
        return
    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

    create = AsyncHTTPHandler._create_async_transport
    mounts = AsyncHTTPHandler._create_httpx_proxy_mounts

    def create_guarded(*args: Any, **kwargs: Any) -> Any:
        transport = create(*args, **kwargs)
        return None if transport is None else GuardedTransport(transport)

    def mounts_guarded(transport: Any, *args: Any, **kwargs: Any) -> Any:
        inner = transport._inner if isinstance(transport, GuardedTransport) else transport
        found = mounts(inner, *args, **kwargs)  # type: ignore[arg-type]
        if found is None:
            return None
        return {pattern: None if t is None else GuardedTransport(t) for pattern, t in found.items()}

    AsyncHTTPHandler._create_async_transport = staticmethod(create_guarded)  # type: ignore[method-assign]
    AsyncHTTPHandler._create_httpx_proxy_mounts = staticmethod(mounts_guarded)  # type: ignore[method-assign]
    _installed = True
