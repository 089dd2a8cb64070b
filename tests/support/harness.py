"""Shared pieces of the fault, fuzz, TLS and load tests: requests, clients, raw calls,
configs, and the checks that the planted provider key never leaks.

The planted key (``tests.conftest.PLANTED_KEY``) reaches the sidecar only through the
environment variable its configs reference (``os.environ/TEST_UPSTREAM_KEY``).
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.openai_chat import chat_body_to_request
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import RetryPolicy, SidecarTarget
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from tests.conftest import PLANTED_KEY

NO_RETRY = RetryPolicy(attempts=1)
# The whole key, its distinctive tail, and its head: none may appear anywhere a client,
# a log reader or a metrics scraper can see.
KEY_MARKERS = (PLANTED_KEY, "PLANTEDKEY", PLANTED_KEY[:16])
# Python's own words for a crash: a traceback, a frame line, a class or exception repr.
EXCEPTION_REPR = re.compile(
    r"Traceback \(most recent call last\)"
    r"|File \"[^\"]+\", line \d+"
    r"|<class '[\w.]+'>"
    r"|<[A-Z]\w*(?:Error|Exception)\b"
    r"|\b[A-Z]\w*(?:Error|Exception)\(['\"<\w]"
)
SERVICE = "exo.remote.v1.RemoteInferenceService"
# The README's error table, plus OK.
DOCUMENTED_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INTERNAL,
    }
)


# Each provider HTTP status (with its Retry-After) and what a client sees: one table for
# the end-to-end and the fault tests. Columns: status, Retry-After, reason, gRPC code.
PROVIDER_STATUSES: tuple[tuple[int, str | None, Reason, grpc.StatusCode], ...] = (
    (401, None, Reason.PROVIDER_AUTH_FAILED, grpc.StatusCode.FAILED_PRECONDITION),
    (403, None, Reason.PROVIDER_AUTH_FAILED, grpc.StatusCode.FAILED_PRECONDITION),
    (404, None, Reason.PROVIDER_NOT_FOUND, grpc.StatusCode.NOT_FOUND),
    (400, None, Reason.INVALID_REQUEST, grpc.StatusCode.INVALID_ARGUMENT),
    (429, "7", Reason.RATE_LIMITED, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (429, None, Reason.RATE_LIMITED, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (500, None, Reason.PROVIDER_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
    (503, None, Reason.PROVIDER_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
)


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    return str(value)


def leaked_key(*values: Any) -> str | None:
    """The first key marker found in any of ``values`` (str, bytes, or anything str()-able)."""
    for value in values:
        text = _text(value)
        for marker in KEY_MARKERS:
            if marker in text:
                return marker
    return None


def assert_no_key(*values: Any, where: str = "") -> None:
    marker = leaked_key(*values)
    assert marker is None, f"the planted provider key ({marker!r}) leaked into {where or 'output'}"


def error_surface(error: RemoteError) -> list[Any]:
    """Everything a client can read from an error."""
    return [
        error.message,
        str(error),
        repr(error),
        *error.metadata.keys(),
        *error.metadata.values(),
        *(v.field for v in error.violations),
        *(v.description for v in error.violations),
    ]


def chat_request(model: str, text: str = "Hello", request_id: str | None = None, **params: Any) -> pb.GenerateRequest:
    body = {"messages": [{"role": "user", "content": text}], **params}
    return chat_body_to_request(body, request_id=request_id or f"t-{model}", model=model)


class Drained(NamedTuple):
    """A Generate stream read to its end through the engine's client."""

    text: str  # the deltas' text, in order
    error: RemoteError | None  # what ended it, if not a finish
    ended_at: float  # time.monotonic() when it ended
    events: list[pb.GenerateResponse]


async def drain(client: SidecarClient, request: pb.GenerateRequest, *, catch: bool = True) -> Drained:
    """Read ``request``'s stream to its end; the error that ends it is returned (raised
    with ``catch=False``)."""
    events: list[pb.GenerateResponse] = []
    error: RemoteError | None = None
    try:
        async for event in client.generate(request):
            events.append(event)
    except RemoteError as exc:
        if not catch:
            raise
        error = exc
    text = "".join(e.delta.text for e in events if e.HasField("delta"))
    return Drained(text, error, time.monotonic(), events)


def sidecar_client(address: str, retry: RetryPolicy = NO_RETRY, **target: Any) -> SidecarClient:
    return SidecarClient(SidecarTarget(address=address, retry=retry, **target))


def metrics_text_of(sidecar: Any) -> str:
    """The Prometheus exposition text of an in-process sidecar (what /metrics serves)."""
    import prometheus_client

    registry = sidecar.servicer.metrics.registry
    return "" if registry is None else prometheus_client.generate_latest(registry).decode()


def fetch_metrics(port: int, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
        return str(response.read().decode())


@dataclass
class RawOutcome:
    """One call as seen on the wire: status, details, trailers and the events received."""

    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str | bytes], ...] = ()
    events: list[Any] = field(default_factory=list)

    def surface(self) -> list[Any]:
        return [self.details, *(k for k, _ in self.trailers), *(v for _, v in self.trailers), *self.events]

    def error(self) -> RemoteError:
        return RemoteError.from_status(self.code, self.details, self.trailers)


async def raw_generate(
    address: str,
    request: pb.GenerateRequest,
    timeout_s: float = 10.0,
    metadata: Sequence[tuple[str, str]] = (),
) -> RawOutcome:
    """A Generate call without the engine client: the status and trailers as sent."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.RemoteInferenceServiceStub(channel).Generate(request, timeout=timeout_s, metadata=metadata)
        events: list[Any] = []
        try:
            async for event in call:
                events.append(event)
        except grpc.aio.AioRpcError as exc:
            return RawOutcome(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()), events)
        return RawOutcome(
            await call.code(), await call.details() or "", tuple(await call.trailing_metadata() or ()), events
        )
