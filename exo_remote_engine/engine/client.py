"""The exo side's one connection layer to a sidecar.

:class:`SidecarTarget` says where the sidecar is and how to prove who we are (token,
TLS), read from environment variables so exo's own argv stays untouched.
:class:`SidecarClient` owns lazily created grpc.aio channels per event loop (the sidecar's
port, plus one per worker process that ``ListWorkers`` names, over which Generate calls
are spread round-robin), retries a Generate call only until its first event arrives (never
after: that would duplicate text), and turns every failure into the one error type,
:class:`RemoteError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)

from exo_remote_engine.addresses import DEFAULT_PORT, grpc_address
from exo_remote_engine.engine.settings import EngineSettings
from exo_remote_engine.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.health_proto import health_pb2, health_pb2_grpc

DEFAULT_SIDECAR = f"127.0.0.1:{DEFAULT_PORT}"
SERVICE_NAME = "exo.remote.v1.RemoteInferenceService"
WORKERS_REFRESH_S = 30.0


@dataclass(frozen=True)
class ClientTLS:
    """Trust anchor for the sidecar's certificate, plus our own for mutual TLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded, jittered retries before the first event of a stream."""

    attempts: int = 4
    max_total_s: float = 20.0
    base_delay_s: float = 0.25
    max_delay_s: float = 5.0


@dataclass(frozen=True)
class SidecarTarget:
    address: str = DEFAULT_SIDECAR
    token: str | None = field(default=None, repr=False)
    tls: ClientTLS | None = None
    deadline_s: float = 900.0
    retry: RetryPolicy = RetryPolicy()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SidecarTarget:
        """The target the ``EXO_REMOTE_*`` variables describe (:class:`EngineSettings`)."""
        return cls.from_settings(EngineSettings.from_env(environ))

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> SidecarTarget:
        """A sidecar address without a port means port 50505; raises AddressError (a
        ValueError) for a URL, OSError for an unreadable token file."""
        token = settings.token
        if settings.token_file is not None:
            token = settings.token_file.read_text().strip() or None
        tls = None
        if settings.tls_ca is not None or settings.tls_cert is not None:
            tls = ClientTLS(
                ca_file=settings.tls_ca,
                cert_file=settings.tls_cert,
                key_file=settings.tls_key,
                server_name=settings.tls_server_name,
            )
        return cls(
            address=grpc_address(settings.sidecar or DEFAULT_SIDECAR, flag="EXO_REMOTE_SIDECAR"),
            token=token,
            tls=tls,
            deadline_s=settings.deadline_s,
        )

    def channel_options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if self.tls and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options

    def metadata(self, request_id: str = "") -> tuple[tuple[str, str], ...]:
        md: list[tuple[str, str]] = []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if request_id:
            md.append(("x-request-id", request_id))
        return tuple(md)

    def sync_channel(self) -> grpc.Channel:
        """A blocking channel, for callers that have no event loop yet (exo's import time)."""
        if self.tls:
            return grpc.secure_channel(self.address, self.tls.credentials(), self.channel_options())
        return grpc.insecure_channel(self.address, self.channel_options())

    def aio_channel(self, port: int | None = None) -> grpc.aio.Channel:
        """A channel to the sidecar, or to one of its workers' ``port`` on the same host."""
        address = self.address if port is None else f"{self.address.rsplit(':', 1)[0]}:{port}"
        if self.tls:
            return grpc.aio.secure_channel(address, self.tls.credentials(), self.channel_options())
        return grpc.aio.insecure_channel(address, self.channel_options())


def _error_from(exc: grpc.RpcError) -> RemoteError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return RemoteError.from_status(code, details, trailers)


def list_models_blocking(target: SidecarTarget, timeout_s: float = 3.0) -> pb.ListModelsResponse:
    """ListModels without an event loop; raises RemoteError when the sidecar is away."""
    with target.sync_channel() as channel:
        stub = pb_grpc.RemoteInferenceServiceStub(channel)
        try:
            response: pb.ListModelsResponse = stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout_s, metadata=target.metadata()
            )
            return response
        except grpc.RpcError as exc:
            raise _error_from(exc) from None


class SidecarClient:
    """Async calls to one sidecar over a channel created lazily in the running loop."""

    def __init__(self, target: SidecarTarget) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: dict[int, grpc.aio.Channel] = {}  # worker port -> channel
        self._workers_due = 0.0  # when to ask ListWorkers again
        self._refreshing: asyncio.Future[None] | None = None
        self._turn = 0

    def _stub(self) -> pb_grpc.RemoteInferenceServiceStub:
        return pb_grpc.RemoteInferenceServiceStub(self._ensure_channel())

    def _ensure_channel(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            self._channel = self.target.aio_channel()
            self._loop = loop
            self._workers = {}  # channels belong to the loop that made them
            self._workers_due = 0.0
            self._refreshing = None
        return self._channel

    async def close(self) -> None:
        channels = [self._channel, *self._workers.values()]
        self._channel, self._workers = None, {}
        if self._loop is asyncio.get_running_loop():
            for channel in channels:
                if channel is not None:
                    await channel.close(grace=None)

    async def _generate_channel(self) -> tuple[grpc.aio.Channel, int | None]:
        """The next channel in the rotation over the sidecar and its workers."""
        main = self._ensure_channel()
        if self._refreshing is None and time.monotonic() >= self._workers_due:
            self._workers_due = time.monotonic() + WORKERS_REFRESH_S
            self._refreshing = asyncio.ensure_future(self._refresh_workers(main))
            self._refreshing.add_done_callback(self._refreshed)
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)  # calls starting together all see the workers
        rotation: list[tuple[grpc.aio.Channel, int | None]] = [(main, None)]
        rotation.extend((channel, port) for port, channel in self._workers.items())
        self._turn += 1
        return rotation[self._turn % len(rotation)]

    def _refreshed(self, task: asyncio.Future[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:
            self._workers_due = 0.0

    async def _refresh_workers(self, main: grpc.aio.Channel) -> None:
        try:
            response: pb.ListWorkersResponse = await pb_grpc.RemoteInferenceServiceStub(main).ListWorkers(
                pb.ListWorkersRequest(), timeout=2.0, metadata=self.target.metadata()
            )
            ports = set(response.worker_ports)
        except grpc.RpcError:
            ports = set()  # an older sidecar, or one busy right now: use the main port alone
        for port in set(self._workers) - ports:
            await self._workers.pop(port).close(grace=None)
        for port in ports - set(self._workers):
            self._workers[port] = self.target.aio_channel(port)

    async def _drop_worker_if_gone(self, error: RemoteError, port: int | None) -> None:
        """A worker went away: stop using it and ask for the current list next time."""
        if port is None or error.reason is not Reason.SIDECAR_UNAVAILABLE:
            return
        channel = self._workers.pop(port, None)
        self._workers_due = 0.0
        if channel is not None:
            await channel.close(grace=None)

    async def health(self, timeout_s: float = 2.0) -> bool:
        """True when the sidecar reports its inference service SERVING."""
        stub = health_pb2_grpc.HealthStub(self._ensure_channel())
        try:
            # With our token: an authenticated probe is not counted in the sidecar's small
            # budget for anonymous health calls, so an anonymous flood cannot fail it.
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s, metadata=self.target.metadata()
            )
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def list_models(self, refresh: bool = False, timeout_s: float = 10.0) -> pb.ListModelsResponse:
        try:
            response: pb.ListModelsResponse = await self._stub().ListModels(
                pb.ListModelsRequest(refresh=refresh),
                timeout=timeout_s,
                metadata=self.target.metadata(),
            )
            return response
        except grpc.RpcError as exc:
            raise _error_from(exc) from None

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Stream events; retried only while nothing has been received."""
        policy = self.target.retry
        call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse] | None = None
        first: pb.GenerateResponse | None = None
        worker_port: int | None = None
        retrying = AsyncRetrying(
            # Provider errors were already retried by the sidecar (sidecar/streaming.py, with
            # model fallbacks); here only the sidecar itself being away or full is worth
            # another try. Two loops for two failure classes, neither retries the other's.
            retry=retry_if_exception(
                lambda e: isinstance(e, RemoteError) and e.reason in (Reason.SIDECAR_UNAVAILABLE, Reason.OVERLOADED)
            ),
            stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.max_total_s),
            wait=_wait_honouring_retry_after(policy),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    channel, worker_port = await self._generate_channel()
                    call = pb_grpc.RemoteInferenceServiceStub(channel).Generate(
                        request,
                        timeout=self.target.deadline_s,
                        metadata=self.target.metadata(request.request_id),
                    )
                    try:
                        first = await self._first_event(call)
                    except RemoteError as exc:
                        await self._drop_worker_if_gone(exc, worker_port)
                        raise
            if first is None:
                return
            yield first
            assert call is not None
            while True:
                try:
                    event = await call.read()
                except grpc.RpcError as exc:
                    error = _error_from(exc)
                    await self._drop_worker_if_gone(error, worker_port)
                    raise error from None
                if event is grpc.aio.EOF:
                    break
                yield event  # type: ignore[misc]
        finally:
            if call is not None and not call.done():
                call.cancel()

    @staticmethod
    async def _first_event(
        call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse],
    ) -> pb.GenerateResponse | None:
        try:
            event = await call.read()
        except grpc.RpcError as exc:
            raise _error_from(exc) from None
        if event is grpc.aio.EOF:
            code = await call.code()
            if code == grpc.StatusCode.OK:
                raise RemoteError(Reason.INTERNAL, "sidecar ended the stream without a result")
            raise RemoteError.from_status(code, await call.details(), await call.trailing_metadata())
        return event  # type: ignore[return-value]


def _wait_honouring_retry_after(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = exc.retry_after_s if isinstance(exc, RemoteError) else None
        backoff = min(policy.max_delay_s, policy.base_delay_s * 2 ** (state.attempt_number - 1))
        jittered = random.uniform(0, backoff)
        return max(jittered, min(hinted, policy.max_total_s)) if hinted is not None else jittered

    return wait


@contextlib.asynccontextmanager
async def connected(target: SidecarTarget) -> AsyncIterator[SidecarClient]:
    client = SidecarClient(target)
    try:
        yield client
    finally:
        await client.close()
