"""The exo side's one connection layer to a sidecar.

:class:`~exo_remote_engine.engine.connection.target.SidecarTarget` says where the sidecar is and how
to prove who we are. :class:`SidecarClient` owns lazily created grpc.aio channels per event loop, retries a
Generate call only until its first delta arrives (never after: that would duplicate text),
and turns every failure into the one error type, :class:`RemoteError`.

A completion to one sidecar process travels on that channel's multiplexed Session
(:mod:`~exo_remote_engine.engine.connection.session`): gRPC's per-call set-up was most of
what a short request cost on both sides. It is its own Generate call when multiplexing is
off (``EXO_REMOTE_MULTIPLEX=0``), for a request over 256 KiB, for a sidecar without
Session, and for targets of several hosts (below), where calls must stay free to spread.

Several sidecar hosts are gRPC's business, not ours: a channel to several hosts carries a
service config choosing gRPC's ``round_robin`` policy, which spreads calls over the READY
addresses and skips a host whose connection failed or was closed (a killed host, or a
draining one: the sidecar stops listening and sends GOAWAY when it drains), and short
reconnect backoffs so a host that returns is used again within seconds. A call that fails
before its first delta is retried, and round_robin gives the retry the next host. A
channel to one host keeps gRPC's default ``pick_first``: when its host restarts, pick_first
reconnects as soon as a call comes, while round_robin would fail calls fast until its next
reconnect attempt (up to the backoff's 2 s, longer than a call's retries wait).

Client-side health checking (``healthCheckConfig``) is switched on only where the
subchannel's health ``Watch`` is authenticated: a client certificate without a token
(mTLS). gRPC's health Watch carries no call metadata, so with a bearer token (or no
authentication) it is an anonymous call, held to the sidecar's small budget for
anonymous health calls (issue #11's flood protection). Measured with grpcio 1.70 and 1.85:
a host whose Watch is refused for lack of budget gets no calls at all from that channel
for as long as the budget stays full, i.e. an anonymous flood would take a healthy host
away from every node; and 8 Watch slots would cap a host at 8 client channels. A Watch
ended with OK after the budget's 300 s is re-opened at once without losing the host.

Worker ports (``ListWorkers``) are per host, and gRPC's resolver results are not visible
to the application. One host: the channels rotate over its port and its workers' ports as
before. A literal address list: each host's ``ListWorkers`` is asked over a channel of its
own and the round_robin list is rebuilt from every host's main and worker ports. A
``dns:`` name: its hosts are whatever the resolver returns at the moment, so their worker
ports cannot be asked per host; only the name's main port is used (run one sidecar
process per host there, or a port per worker behind the name).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
from tenacity import RetryCallState, wait_random_exponential

from exo_remote_engine.contract.addresses import TargetKind, sidecar_target
from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.health_stubs import health_pb2, health_pb2_grpc
from exo_remote_engine.engine.connection.completion import CallCompletion, Completion, error_from, first_event
from exo_remote_engine.engine.connection.session import (
    MAX_MULTIPLEXED_REQUEST_BYTES,
    SessionLost,
    SessionPool,
    SessionUnsupported,
)
from exo_remote_engine.engine.connection.target import (
    SERVICE_NAME,
    WORKERS_REFRESH_S,
    RetryPolicy,
    SidecarTarget,
)
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc

_GenerateMethod: TypeAlias = grpc.aio.UnaryStreamMultiCallable[pb.GenerateRequest, pb.GenerateResponse]


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
            raise error_from(exc) from None


class SidecarClient:
    """Async calls to a sidecar target (one host or several) over channels created lazily
    in the running loop."""

    def __init__(self, target: SidecarTarget) -> None:
        self.target = target
        self._parsed = target.parsed
        self._channel: grpc.aio.Channel | None = None
        self._channel_target = target.address  # a host list's: every host's main and worker ports
        # Replaced round_robin channels, each closing once its live streams have ended.
        self._retired: dict[grpc.aio.Channel, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: dict[int, grpc.aio.Channel] = {}  # one host: worker port -> channel
        self._hosts: dict[str, grpc.aio.Channel] = {}  # host:port -> a channel to that host alone
        self._workers_due = 0.0  # when to ask ListWorkers again
        self._refreshing: asyncio.Future[None] | None = None
        self._turn = 0
        self._generate_methods: dict[grpc.aio.Channel, _GenerateMethod] = {}  # per channel, made once
        self._sessions = SessionPool(target.metadata())
        self._multiplexed = target.multiplex and not self._parsed.several and self._parsed.kind is not TargetKind.DNS
        self.hosts_seen: dict[str, bool | None] = {}  # the last host_health answer

    def _stub(self) -> pb_grpc.RemoteInferenceServiceStub:
        return pb_grpc.RemoteInferenceServiceStub(self._ensure_channel())

    def _ensure_channel(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            self._channel_target = self.target.address
            self._channel = self.target.aio_channel()
            self._loop = loop
            self._workers, self._hosts = {}, {}  # channels belong to the loop that made them
            self._generate_methods = {}
            self._sessions = SessionPool(self.target.metadata())
            self._workers_due = 0.0
            self._refreshing = None
        return self._channel

    def _host_channel(self, address: str) -> grpc.aio.Channel:
        """A channel to one host of the target (its ListWorkers, its health)."""
        self._ensure_channel()
        if address not in self._hosts:
            self._hosts[address] = self.target.aio_channel(address=address)
        return self._hosts[address]

    async def close(self) -> None:
        channels = [self._channel, *self._workers.values(), *self._hosts.values(), *self._retired]
        self._channel, self._workers, self._hosts, self._retired = None, {}, {}, {}
        self._generate_methods = {}
        if self._loop is asyncio.get_running_loop():
            await self._sessions.close()
            for channel in channels:
                if channel is not None:
                    await channel.close(grace=None)

    async def _generate_channel(self) -> tuple[grpc.aio.Channel, int | None]:
        """The channel for the next Generate call: one host rotates over its port and its
        workers' ports; several hosts are one round_robin channel (see the module doc)."""
        main = self._ensure_channel()
        if self._parsed.kind in (TargetKind.DNS, TargetKind.SOCKET):
            return main, None
        if self._refreshing is None and time.monotonic() >= self._workers_due:
            self._workers_due = time.monotonic() + WORKERS_REFRESH_S
            refresh = self._refresh_host_list() if self._parsed.several else self._refresh_workers(main)
            self._refreshing = asyncio.ensure_future(refresh)
            self._refreshing.add_done_callback(self._refreshed)
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)  # calls starting together all see the workers
            main = self._ensure_channel()
        rotation: list[tuple[grpc.aio.Channel, int | None]] = [(main, None)]
        rotation.extend((channel, port) for port, channel in self._workers.items())
        self._turn += 1
        return rotation[self._turn % len(rotation)]

    def _refreshed(self, task: asyncio.Future[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:
            self._workers_due = 0.0

    async def _worker_ports(self, channel: grpc.aio.Channel) -> set[int]:
        try:
            response: pb.ListWorkersResponse = await pb_grpc.RemoteInferenceServiceStub(channel).ListWorkers(
                pb.ListWorkersRequest(), timeout=2.0, metadata=self.target.metadata()
            )
        except grpc.RpcError:
            return set()  # an older sidecar, or one busy or away right now: its main port alone
        return set(response.worker_ports)

    async def _refresh_host_list(self) -> None:
        """Every listed host's ListWorkers, over a channel to that host alone; when the set
        of ports changed, calls move to a round_robin channel over the new set (the old
        one takes no new call and is closed once its live streams end, at the latest at
        their deadline)."""
        hosts = self._parsed.hosts
        found = await asyncio.gather(*(self._worker_ports(self._host_channel(h)) for h in hosts))
        addresses = [*hosts]
        for host, ports in zip(hosts, found, strict=True):
            addresses += [f"{host.rsplit(':', 1)[0]}:{port}" for port in sorted(ports)]
        target = sidecar_target(",".join(addresses)).target
        if target != self._channel_target and self._channel is not None:
            old = self._channel
            closing = asyncio.ensure_future(old.close(grace=self.target.deadline_s))
            self._retired[old] = closing
            closing.add_done_callback(lambda _: self._retired.pop(old, None))
            self._channel_target = target
            self._channel = self.target.aio_channel(address=target)

    async def _refresh_workers(self, main: grpc.aio.Channel) -> None:
        ports = await self._worker_ports(main)
        for port in set(self._workers) - ports:
            gone = self._workers.pop(port)
            await self._sessions.close(gone)
            await gone.close(grace=None)
        for port in ports - set(self._workers):
            self._workers[port] = self.target.aio_channel(port)

    async def _drop_worker_if_gone(self, error: RemoteError, port: int | None) -> None:
        """A worker went away: stop using it and ask for the current list next time."""
        if port is None or error.reason is not Reason.SIDECAR_UNAVAILABLE:
            return
        channel = self._workers.pop(port, None)
        self._workers_due = 0.0
        if channel is not None:
            await self._sessions.close(channel)
            await channel.close(grace=None)

    async def health(self, timeout_s: float = 2.0) -> bool:
        """True when the sidecar reports its inference service SERVING."""
        return await self._check(self._ensure_channel(), timeout_s) is True

    def host_addresses(self) -> list[str]:
        """Every host behind the target as ``host:port``: the listed ones, or for a ``dns:``
        name the addresses it resolves to now (getaddrinfo, for display only: gRPC's own
        resolver decides where calls go)."""
        parsed = self._parsed
        if parsed.dns_name is None:
            return list(parsed.hosts) or [parsed.target]
        name, _, port = parsed.dns_name.rpartition(":")
        try:
            infos = socket.getaddrinfo(name.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return []
        found = dict.fromkeys(f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos)
        return list(found)

    async def host_health(self, timeout_s: float = 2.0) -> dict[str, bool | None]:
        """Each host's readiness, asked over a channel to that host alone: True SERVING,
        False answered otherwise, None unreachable."""
        addresses = await asyncio.to_thread(self.host_addresses) if self._parsed.dns_name else self.host_addresses()
        if len(addresses) == 1 and addresses[0] == self.target.address:
            return {addresses[0]: await self._check(self._ensure_channel(), timeout_s)}
        for gone in set(self._hosts) - set(addresses) - set(self._parsed.hosts):
            await self._hosts.pop(gone).close(grace=None)
        checks = [self._check(self._host_channel(a), timeout_s) for a in addresses]
        self.hosts_seen = dict(zip(addresses, await asyncio.gather(*checks), strict=True))
        return self.hosts_seen

    async def _check(self, channel: grpc.aio.Channel, timeout_s: float) -> bool | None:
        """The inference service's health over ``channel``: True SERVING, False answered
        otherwise, None unreachable. With our token: an authenticated probe is not counted in
        the sidecar's small budget for anonymous health calls, so an anonymous flood cannot
        fail it."""
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s, metadata=self.target.metadata()
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return None if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else False
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
            raise error_from(exc) from None

    async def get_usage(self, node: str = "", since_s: float = 0.0, timeout_s: float = 10.0) -> pb.GetUsageResponse:
        """The sidecar's spend per node and model (admin only: the master key's token)."""
        try:
            response: pb.GetUsageResponse = await self._stub().GetUsage(
                pb.GetUsageRequest(node=node, since_seconds=since_s), timeout=timeout_s, metadata=self.target.metadata()
            )
            return response
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Stream events; retried only while nothing has been received.

        Provider errors were already retried by the sidecar (sidecar/relay/streaming.py,
        with model fallbacks); here only the sidecar itself being away or full is worth
        another try. Two loops for two failure classes, neither retries the other's. The
        loop is written out rather than an ``AsyncRetrying`` per call (about a tenth of this
        client's CPU on a short request); tenacity computes the backoff of a failed attempt
        only, so the first attempt, which nearly every call stops at, costs nothing more."""
        policy = self.target.retry
        completion: Completion | None = None
        worker_port: int | None = None
        started = time.monotonic()
        attempt = 0
        alone = False  # this completion as its own call, whatever the target
        try:
            while True:
                attempt += 1
                channel: grpc.aio.Channel | None = None
                worker_port = None
                try:
                    channel, worker_port = await self._generate_channel()
                    completion = self._open(channel, request, alone)
                    first = await first_event(completion)
                    break
                except SessionUnsupported:  # an older sidecar: one call per completion from now on
                    assert channel is not None
                    self._sessions.unsupported(channel)
                    attempt -= 1
                except SessionLost:  # the sidecar's answer was lost with the session: ask as a call
                    alone = True
                    attempt -= 1
                except RemoteError as exc:
                    await self._drop_worker_if_gone(exc, worker_port)
                    if exc.reason not in _RETRIED or attempt >= policy.attempts:
                        raise
                    if time.monotonic() - started >= policy.max_total_s:
                        raise
                    await asyncio.sleep(_retry_wait(policy, attempt, exc))
            yield first
            while True:
                try:
                    event = await completion.read()
                except RemoteError as error:
                    await self._drop_worker_if_gone(error, worker_port)
                    raise
                if event is None:
                    break
                yield event
        finally:
            if completion is not None and not completion.done:
                completion.cancel()

    def _open(self, channel: grpc.aio.Channel, request: pb.GenerateRequest, alone: bool = False) -> Completion:
        """The completion on the session of ``channel`` (multiplexed), or as its own call:
        ``alone`` (its session was lost), multiplexing off, a request too large for a session,
        a sidecar without Session, or a target of several hosts or a ``dns:`` name. There
        gRPC's round_robin spreads and moves *calls* over the hosts (see the module doc); a
        session is one call, and would pin every completion of this node to the host it
        happened to reach."""
        if self._multiplexed and not alone and (size := request.ByteSize()) <= MAX_MULTIPLEXED_REQUEST_BYTES:
            session = self._sessions.session(channel)
            if session is not None:
                return session.start(request, self.target.deadline_s, size)
        metadata = self.target.metadata(request.request_id)
        call = self._generate_method(channel)(request, timeout=self.target.deadline_s, metadata=metadata)
        return CallCompletion(call)

    def _generate_method(self, channel: grpc.aio.Channel) -> _GenerateMethod:
        """The Generate callable of ``channel``, made once per channel: a generated stub
        builds a callable for every method of the service each time it is created."""
        method = self._generate_methods.get(channel)
        if method is None:
            if len(self._generate_methods) > 64:  # channels come and go (workers, host lists)
                self._generate_methods.clear()
            method = self._generate_methods[channel] = pb_grpc.RemoteInferenceServiceStub(channel).Generate
        return method


HOST_SERVING, HOST_NOT_SERVING, HOST_UNREACHABLE = "SERVING", "NOT SERVING", "unreachable"


def host_status(ready: bool | None) -> str:
    """A :meth:`SidecarClient.host_health` answer for one host, as views show it."""
    return HOST_SERVING if ready is True else HOST_UNREACHABLE if ready is None else HOST_NOT_SERVING


# The failures of the sidecar itself (away, or full): the only ones this client retries.
_RETRIED = frozenset({Reason.SIDECAR_UNAVAILABLE, Reason.OVERLOADED})


def _retry_wait(policy: RetryPolicy, attempt: int, error: RemoteError) -> float:
    """Seconds before attempt ``attempt + 1``: tenacity's full jitter over an exponential
    backoff, but at least the sidecar's Retry-After hint (capped by the whole budget).
    Only a failed attempt gets here, so the common first attempt builds nothing."""
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]  # only attempt_number is read
    state.attempt_number = attempt
    jittered = float(wait_random_exponential(multiplier=policy.base_delay_s, max=policy.max_delay_s)(state))
    hinted = error.retry_after_s
    return max(jittered, min(hinted, policy.max_total_s)) if hinted is not None else jittered


@contextlib.asynccontextmanager
async def connected(target: SidecarTarget) -> AsyncIterator[SidecarClient]:
    client = SidecarClient(target)
    try:
        yield client
    finally:
        await client.close()
