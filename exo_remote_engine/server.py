"""The key-holding sidecar: a grpc.aio server streaming completions from LiteLLM.

``exo-remote-sidecar --listen 127.0.0.1:50505 --config config.yaml`` serves
``exo.remote.v1.RemoteInferenceService`` and the standard ``grpc.health.v1.Health``.
The servicer is thin: config lookup and request checks here, streaming in
:mod:`~exo_remote_engine.sidecar.streaming`, errors in one table
(:mod:`~exo_remote_engine.errors`), auth in an interceptor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import importlib
import ipaddress
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import grpc

from exo_remote_engine.addresses import AddressError, grpc_address
from exo_remote_engine.errors import Reason, RemoteError, abort
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.health_proto import health_pb2, health_pb2_grpc
from exo_remote_engine.openai_wire import validate_request
from exo_remote_engine.redaction import SECRETS, install_log_redaction
from exo_remote_engine.sidecar.auth import AccessInterceptor, ServerTLS
from exo_remote_engine.sidecar.budgets import Budgets
from exo_remote_engine.sidecar.config import MASTER_KEY_NODE, ConfigError, ModelEntry, SidecarConfig, load_config
from exo_remote_engine.sidecar.decoding import DecodeGuardInterceptor
from exo_remote_engine.sidecar.discovery import ServerSpec
from exo_remote_engine.sidecar.embedded_model import (
    LISTED_PROVIDER,
    LOCAL_EXTRA_HINT,
    EmbeddedModelServer,
    EmbeddedModelSettings,
    config_for,
    entry_from_env,
    local_model_available,
    runtime_available,
)
from exo_remote_engine.sidecar.limits import Clock, UsageWindows
from exo_remote_engine.sidecar.metrics import Metrics
from exo_remote_engine.sidecar.policy import Limits, Policy
from exo_remote_engine.sidecar.registry import ModelRegistry
from exo_remote_engine.sidecar.routing import Router
from exo_remote_engine.sidecar.safe_logging import printable, protect_handlers, safe_logger
from exo_remote_engine.sidecar.spend import Charge, Ledger, default_state_dir, estimate_tokens
from exo_remote_engine.sidecar.token_file import load_token_file, token_from_env
from exo_remote_engine.sidecar.workers import READY_LINE, WORKER_ENV, WorkerPool, wait_for_parent_exit

log = safe_logger("exo_remote_engine.sidecar")

SERVICE_NAME = "exo.remote.v1.RemoteInferenceService"
DEFAULT_LISTEN = "127.0.0.1:50505"
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
RECEIVE_WINDOW_BYTES = 1024 * 1024
_LITELLM_TRANSPORT = "exo_remote_engine.sidecar.litellm_transport"
# How long one write to a client may wait (the client reads nothing) before the stream
# ends with CLIENT_STALLED; meanwhile the provider is not read (bounded merge buffer).
DEFAULT_STALL_LIMIT_S = 60.0

T = TypeVar("T")
_SOURCES = {
    "config": pb.MODEL_SOURCE_CONFIG,
    "embedded": pb.MODEL_SOURCE_EMBEDDED,
    "discovered": pb.MODEL_SOURCE_DISCOVERED,
}


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: "" is liveness, the service name is readiness."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()

    def set(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        self._status[service] = status.SERVING if serving else status.NOT_SERVING
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self._status:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status[request.service])  # type: ignore[arg-type]

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        while True:
            changed = self._changed
            status = self._status.get(request.service, unknown)
            yield health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
            await changed.wait()


def _rpc_errors(
    method: Callable[..., Awaitable[T]],
) -> Callable[..., Awaitable[T]]:
    """Turn RemoteError into a rich status and anything unexpected into a generic INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: RemoteInferenceServicer, request: Any, context: Any) -> T:
        request_id = getattr(request, "request_id", "")
        try:
            return await method(self, request, context)
        except RemoteError as exc:
            error = exc
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("request_id=%s unexpected error", request_id)
            error = RemoteError(Reason.INTERNAL, f"internal error (request id {printable(request_id)})")
        log.warning(
            "request_id=%s failed reason=%s code=%s: %s",
            request_id,
            error.reason.value,
            error.grpc_code.name,
            error.message,  # every log record is redacted (install_log_redaction)
        )
        await abort(context, error)

    return wrapper


class RemoteInferenceServicer(pb_grpc.RemoteInferenceServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        policy: Policy,
        metrics: Metrics,
        openai_fast_path: bool = True,
        clock: Clock = time.time,
        ledger: Ledger | None = None,
        stall_limit_s: float = DEFAULT_STALL_LIMIT_S,
    ) -> None:
        from exo_remote_engine.sidecar.streaming import StreamingBackend

        self.registry = registry
        self.config = registry.config
        self.policy = policy
        self.metrics = metrics
        self.stall_limit_s = stall_limit_s
        self.clock = clock
        self.windows = UsageWindows(clock)
        self.ledger = ledger
        self.budgets = Budgets(self.config.node_quotas, ledger, clock) if ledger is not None else None
        self.backend = StreamingBackend(
            num_retries=self.config.num_retries,
            openai_fast_path=openai_fast_path,
            router=Router(self.config.router, self.windows),
            groups=self.config.deployments,
        )
        self.worker_ports: Callable[[], Sequence[int]] = tuple  # set when a WorkerPool runs
        self.warnings: tuple[str, ...] = ()  # what every caller should know, e.g. anonymous access

    @_rpc_errors
    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListWorkersResponse:
        return pb.ListWorkersResponse(worker_ports=self.worker_ports())

    @_rpc_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        node = self.policy.identify(context.invocation_metadata(), context.auth_context())
        # A node sees only what it may use: names of other models are not its business.
        models = [m for m in await self.registry.models(refresh=request.refresh) if self.policy.may_use(node, m.alias)]
        response = pb.ListModelsResponse(default_model=self.registry.default(models) if models else "")
        response.warnings.extend(self.warnings)
        for found in models:
            entry = found.entry
            # The embedded model is reached as an OpenAI-compatible server; say what it is.
            is_local = entry.source == "embedded" and entry.provider != "embedded"
            model = pb.Model(
                alias=entry.alias,
                provider=LISTED_PROVIDER if is_local else entry.provider,
                display_name=entry.display_name or entry.alias,
                ready=found.ready,
                not_ready_reason=found.not_ready_reason,
                source=_SOURCES.get(entry.source, pb.MODEL_SOURCE_UNSPECIFIED),
            )
            for name in ("context_window", "max_output_tokens", "supports_tools", "supports_images"):
                value = getattr(entry, name)
                if value is not None:
                    setattr(model, name, value)
            response.models.append(model)
        if self.budgets is not None:
            node = self.policy.identify(context.invocation_metadata(), context.auth_context())
            status = self.budgets.status(node)
            if status is not None:
                response.budget.node = node
                response.budget.max_usd = status.max_usd
                response.budget.spent_usd = status.spent_usd
                response.budget.remaining_usd = status.remaining_usd
                if status.resets_in_s is not None:
                    response.budget.resets_in_seconds = status.resets_in_s
        return response

    def _admit(self, node: str) -> None:
        """Budget and per-node rpm/tpm, before any provider is called."""
        try:
            if self.budgets is not None:
                self.budgets.check(node)
            quota = self.config.node_quotas.get(node)
            if quota is not None and (quota.rpm is not None or quota.tpm is not None):
                self.windows.admit(f"node:{node}", quota.rpm, quota.tpm, f"node {node!r}")
        except RemoteError as exc:
            self.metrics.limit_hit(node, exc.metadata.get("limit", "budget"))
            raise

    def _charge(
        self,
        request: pb.GenerateRequest,
        node: str,
        entry: ModelEntry,
        usage: pb.Usage | None,
        chars: int,
        outcome: str,
    ) -> Charge:
        """Count a request's tokens and cost against the node; the ledger row to write.
        Without provider usage, tokens are estimated from what was produced."""
        estimated = usage is None or (usage.prompt_tokens == 0 and usage.completion_tokens == 0)
        prompt = estimate_tokens(request.ByteSize()) if estimated or usage is None else usage.prompt_tokens
        completion = estimate_tokens(chars) if estimated or usage is None else usage.completion_tokens
        charge = Charge.of(
            request_id=request.request_id,
            ended_at=self.clock(),
            node=node,
            entry=entry,
            prompt_tokens=prompt,
            completion_tokens=completion,
            estimated=estimated,
            outcome=outcome,
        )
        self.windows.add_tokens(f"node:{node}", prompt + completion)
        self.metrics.charged(entry.alias, node, charge.cost_usd)
        if self.budgets is not None:
            self.budgets.add(node, charge.cost_usd)
        return charge

    @_rpc_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        node = self.policy.identify(context.invocation_metadata(), context.auth_context())
        found = await self.registry.lookup(request.model)
        if found is None:
            usable = [m.alias for m in await self.registry.models() if m.ready and self.policy.may_use(node, m.alias)]
            known = ", ".join(usable)
            raise RemoteError(
                Reason.MODEL_NOT_FOUND,
                f"unknown model {printable(request.model)!r}; this sidecar serves: {known or 'nothing ready'}",
            )
        if not found.ready:
            raise RemoteError(Reason.MODEL_NOT_READY, f"model {request.model!r} is not ready: {found.not_ready_reason}")
        entry = found.entry
        if not request.messages:
            raise RemoteError(Reason.INVALID_REQUEST, "request has no messages")
        validate_request(request)
        deadline_s = self.policy.check_request(request, node, context.time_remaining())
        self._admit(node)
        recorder = self.metrics.stream(entry.alias, node)
        usage = pb.Usage()
        served = [entry]  # the deployment of the last attempt
        produced = [0, 0]  # characters written, charged (0/1)
        ledger = self.ledger

        stall = _StallWatch(self.stall_limit_s)

        async def send(response: pb.GenerateResponse) -> None:
            stall.writing_since = stall.loop.time()  # a client that reads nothing is ended later
            await context.write(response)
            stall.writing_since = None

        async def write(response: pb.GenerateResponse) -> None:
            if response.HasField("delta"):
                await send(response)
                recorder.delta_written()
                delta = response.delta
                produced[0] += len(delta.text) + len(delta.reasoning_text)
                for call in delta.tool_calls:
                    produced[0] += len(call.arguments_fragment)
                return
            usage.CopyFrom(response.finished.usage)
            # Charged (and committed) before the client learns the request finished.
            produced[1] = 1
            charge = self._charge(
                request,
                node,
                served[0],
                usage if response.finished.HasField("usage") else None,
                produced[0],
                "completed",
            )
            if ledger is not None:
                try:
                    await ledger.record(charge)
                except sqlite3.Error as exc:  # the reply is not lost for it; the operator is told
                    log.error("request_id=%s spend not recorded in %s: %s", request.request_id, ledger.path, exc)
            await send(response)

        code, failure = "OK", ""
        log.info("request_id=%s model=%s node=%s start", request.request_id, entry.alias, node)
        try:
            with self.policy.stream_slot(node), self._active(), stall:
                async with asyncio.timeout(deadline_s):
                    fallbacks = [
                        f.entry
                        for alias in self.config.fallbacks.get(entry.alias, ())
                        if (f := await self.registry.lookup(alias)) is not None and f.ready
                    ]
                    await self.backend.generate(
                        entry, request, write, fallbacks, functools.partial(served.__setitem__, 0)
                    )
        except TimeoutError:
            code = "DEADLINE_EXCEEDED"
            raise RemoteError(Reason.DEADLINE_EXCEEDED, f"deadline of {deadline_s:.1f}s exceeded") from None
        except RemoteError as exc:
            code, failure = exc.grpc_code.name, f" {exc.reason.value}: {exc.message}"  # redacted already
            if "limit" in exc.metadata:
                self.metrics.limit_hit(node, exc.metadata["limit"])
            raise
        except asyncio.CancelledError:
            if stall.fired:  # cancelled by the watch, not by the client or the server
                stall.uncancel()
                code = grpc.StatusCode.RESOURCE_EXHAUSTED.name
                raise RemoteError(
                    Reason.CLIENT_STALLED,
                    f"the client read nothing for {self.stall_limit_s:g}s; the stream was ended",
                ) from None
            code = "CANCELLED"
            raise
        finally:
            if not produced[1] and produced[0]:  # cut short after output began: charge what was produced
                outcome = "cancelled" if code in ("CANCELLED", "DEADLINE_EXCEEDED") else "failed"
                charge = self._charge(request, node, served[0], None, produced[0], outcome)
                if ledger is not None:
                    ledger.record_soon(charge)
            recorder.finished(code, usage.prompt_tokens, usage.completion_tokens)
            log.info(
                "request_id=%s model=%s node=%s end code=%s%s", request.request_id, entry.alias, node, code, failure
            )

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        if self.metrics.registry is not None:
            self.metrics.active.inc()
        try:
            yield
        finally:
            if self.metrics.registry is not None:
                self.metrics.active.dec()


class _StallWatch:
    """Ends a stream whose client has read nothing for ``limit_s``: a write still waiting
    after that long cancels the stream's task. One timer per stream, re-armed, because a
    timeout around every write costs about 4 us each."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.loop = asyncio.get_running_loop()
        self.writing_since: float | None = None  # loop time the pending write began
        self.fired = False
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> _StallWatch:
        self._task = asyncio.current_task()
        self._timer = self.loop.call_later(self.limit_s, self._check)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def uncancel(self) -> None:
        if self._task is not None:
            self._task.uncancel()

    def _check(self) -> None:
        since, now = self.writing_since, self.loop.time()
        if since is not None and now - since >= self.limit_s and self._task is not None:
            self.fired = True
            self._task.cancel()
            return
        self._timer = self.loop.call_at((now if since is None else since) + self.limit_s, self._check)


def _fast_path_from_env() -> bool:
    return os.environ.get("EXO_REMOTE_OPENAI_FAST_PATH", "1") != "0"


@dataclass
class SidecarSettings:
    listen: str = DEFAULT_LISTEN
    config_path: Path | None = None
    tokens: Sequence[str] = ()
    named_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)  # node name -> token
    tls: ServerTLS | None = None
    allow_insecure: bool = False  # plaintext off loopback
    allow_anonymous: bool = False  # no client authentication off loopback
    limits: Limits = field(default_factory=Limits)
    metrics_listen: str | None = None
    # Discovery of provider model lists (off for embedded/programmatic use, on for the CLI).
    discover: bool = False
    env_file: Path | None = None
    servers: tuple[ServerSpec, ...] = ()
    discovery_ttl_s: float = 60.0
    discovery_timeout_s: float = 5.0
    extra_options: Sequence[tuple[str, Any]] = field(default_factory=tuple)
    # Read plain OpenAI-compatible deployments directly instead of through LiteLLM.
    openai_fast_path: bool = field(default_factory=_fast_path_from_env)
    # Spend accounting: the SQLite ledger's directory (None: the user's data dir), or off.
    state_dir: Path | None = None
    accounting: bool = True
    clock: Clock = time.time  # limits, budgets and ledger times; tests inject their own
    # With no config: the real embedded model (llama.cpp, the [local] extra) when set, else
    # the echo. Off for programmatic use, on for the CLI when the extra is installed.
    embedded_model: EmbeddedModelSettings | None = None
    stall_limit_s: float = DEFAULT_STALL_LIMIT_S


@dataclass
class RunningSidecar:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    config: SidecarConfig
    servicer: RemoteInferenceServicer
    metrics_port: int | None = None
    embedded: EmbeddedModelServer | None = None  # the local model's process, stopped with us

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float | None = 1.0) -> None:
        """Drain: health NOT_SERVING, new calls refused, live streams get ``grace_s`` to
        finish, then they are cancelled (which closes their upstream connections)."""
        self.health.set("", False)
        self.health.set(SERVICE_NAME, False)
        await self.server.stop(grace_s)
        await self.servicer.backend.close()
        await self.servicer.registry.stop()
        if self.servicer.ledger is not None:
            self.servicer.ledger.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


def _is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def start_sidecar(settings: SidecarSettings, config: SidecarConfig | None = None) -> RunningSidecar:
    """Build, bind and start the server; returns once it accepts calls (and, for the
    embedded model, once the model answers)."""
    install_log_redaction()
    embedded: EmbeddedModelServer | None = None
    _check_plaintext(settings)  # before loading a model for nothing
    if config is None and settings.config_path is None:
        config, embedded = await _embedded_default(settings)
    config = config or load_config(settings.config_path)
    try:
        running = await _start(settings, config)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    running.embedded = embedded
    return running


async def _embedded_default(settings: SidecarSettings) -> tuple[SidecarConfig, EmbeddedModelServer | None]:
    """The no-config default: a worker shares its main process's model; else the real
    embedded model when asked for, else the echo (saying how to get the real one)."""
    shared = entry_from_env() if os.environ.get(WORKER_ENV) else None
    if shared is not None:
        return config_for(shared), None
    if settings.embedded_model is None:
        if not local_model_available():
            log.warning(
                "no config: serving embedded-echo, which repeats your last message and is not a language "
                "model; for a real offline model (Gemma 3 270M on llama.cpp): %s",
                LOCAL_EXTRA_HINT,
            )
        return load_config(None), None
    server = EmbeddedModelServer(settings.embedded_model)
    # LiteLLM's import takes seconds; let it overlap the model's load (its own process).
    preload = asyncio.create_task(asyncio.to_thread(importlib.import_module, _LITELLM_TRANSPORT))
    try:
        await server.start()
    except BaseException:
        server.stop()
        raise
    finally:
        await preload
    return config_for(server.entry()), server


async def _start(settings: SidecarSettings, config: SidecarConfig) -> RunningSidecar:
    """The server around a loaded config: access, policy, accounting, registry, bind."""
    if config.not_acted_on:
        log.warning(
            "%s: the sidecar does nothing with these config keys: %s",
            config.path,
            ", ".join(config.not_acted_on),
        )
    named_tokens = dict(settings.named_tokens)
    if config.master_key is not None:
        # LiteLLM's master key: here an accepted bearer token, naming node "master-key".
        named_tokens.setdefault(MASTER_KEY_NODE, config.master_key)
    tokens = [*settings.tokens, *named_tokens.values()]
    SECRETS.add_all(tokens)  # never sent by us, but never to be logged either
    access = AccessInterceptor(
        tokens,
        client_certificates=settings.tls is not None and settings.tls.client_ca_file is not None,
        limits=settings.limits,
    )
    warnings = _exposure_warnings(settings, access.requires_authentication)
    # Access first: it decides before any request byte is decoded.
    interceptors: list[grpc.aio.ServerInterceptor] = [access, DecodeGuardInterceptor()]
    policy = Policy.build(settings.limits, config.node_policies, named_tokens)
    metrics = Metrics()
    budgeted = sorted(n for n, q in config.node_quotas.items() if q.max_budget is not None)
    if budgeted and not settings.accounting:
        raise ConfigError(f"max_budget is set for node {budgeted[0]!r}: budgets need accounting (drop --no-accounting)")
    ledger = None
    if settings.accounting:
        state_dir = settings.state_dir or default_state_dir()
        try:
            ledger = Ledger.open(state_dir)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"--state-dir {state_dir}: cannot open the spend ledger: {exc}") from None
    if settings.discover:
        registry = ModelRegistry.with_discovery(
            config,
            env_file=settings.env_file,
            servers=settings.servers,
            ttl_s=settings.discovery_ttl_s,
            timeout_s=settings.discovery_timeout_s,
        )
    else:
        registry = ModelRegistry(config)
    servicer = RemoteInferenceServicer(
        registry,
        policy,
        metrics,
        settings.openai_fast_path,
        clock=settings.clock,
        ledger=ledger,
        stall_limit_s=settings.stall_limit_s,
    )
    servicer.warnings = warnings
    server = grpc.aio.server(
        interceptors=interceptors,
        # No grpc-wide maximum_concurrent_rpcs: anonymous callers could fill it and lock
        # every node out. Each class of caller has its own budget instead: Generate the
        # policy's stream limits, unauthenticated health calls the access interceptor's.
        options=[
            ("grpc.so_reuseport", 0),  # a second process must not share (and skim) our port
            # A fixed receive window per stream: what a caller can push before the access
            # interceptor refuses it is this much, not a window that BDP probing grew to
            # many MiB (30 MiB refused bodies then still cost 12-100 MiB of RSS).
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
            ("grpc.max_receive_message_length", max(MAX_MESSAGE_BYTES, settings.limits.max_request_bytes + 1024)),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Reasoning models can think for minutes before the first token: let clients
            # keep the connection alive with pings while nothing flows.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
            *settings.extra_options,
        ],
    )
    pb_grpc.add_RemoteInferenceServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        port = _bind(server, settings)
    except RuntimeError as exc:  # grpc's way of saying the bind failed
        raise ConfigError(f"cannot bind {settings.listen}: address in use or not available") from exc
    if port == 0:
        raise ConfigError(f"cannot bind {settings.listen}: address in use or not available")
    from exo_remote_engine.sidecar.litellm_transport import warm_up

    await warm_up()
    metrics_port = None
    if settings.metrics_listen:
        host, _, metrics_port_text = settings.metrics_listen.rpartition(":")
        metrics_port = metrics.serve(host or "127.0.0.1", int(metrics_port_text))
    await server.start()
    registry.start()
    health.set("", True)
    health.set(SERVICE_NAME, True)
    return RunningSidecar(server, port, health, config, servicer, metrics_port)


def _check_plaintext(settings: SidecarSettings) -> None:
    if settings.tls is None and not _is_loopback(settings.listen) and not settings.allow_insecure:
        raise ConfigError(
            f"refusing to listen in plaintext on {settings.listen}: use TLS, a loopback address, or --insecure"
        )


def _exposure_warnings(settings: SidecarSettings, authenticates: bool) -> tuple[str, ...]:
    """Refuse to expose the keys off loopback without what protects them, unless the
    operator said so explicitly; then warn here and return what every client is told.

    Two separate questions: can the network read the traffic (TLS, else ``--insecure``),
    and must a caller prove who it is (a token or a client certificate, else
    ``--allow-anonymous``). Server-only TLS without tokens answers the first, not the second."""
    if _is_loopback(settings.listen):
        return ()
    _check_plaintext(settings)
    if settings.tls is None:
        log.warning(
            "WARNING: serving provider credentials in PLAINTEXT on %s; anyone on the "
            "network can read requests and replies",
            settings.listen,
        )
    if authenticates:
        return ()
    if not settings.allow_anonymous:
        raise ConfigError(
            f"refusing to serve anyone who can reach {settings.listen} without client authentication: "
            "give --token-file (or EXO_REMOTE_TOKEN) or --tls-client-ca, or say --allow-anonymous"
        )
    warning = (
        f"this sidecar serves ANYONE who can reach {settings.listen} without authentication "
        "(--allow-anonymous): every caller can use its provider keys"
    )
    log.warning("WARNING: %s", warning)
    return (warning,)


def _bind(server: grpc.aio.Server, settings: SidecarSettings) -> int:
    if settings.tls is not None:
        return server.add_secure_port(settings.listen, settings.tls.credentials())
    return server.add_insecure_port(settings.listen)


def build_parser() -> argparse.ArgumentParser:
    """exo-remote-sidecar's flags; each says its default and the variable that sets it."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="exo-remote-sidecar",
        description="Serve external LLMs to exo nodes over gRPC. Provider keys live here only.",
    )
    parser.add_argument(
        "--listen",
        default=env("EXO_REMOTE_LISTEN", DEFAULT_LISTEN),
        help=f"host[:port] to serve gRPC on; no port means 50505 (env EXO_REMOTE_LISTEN; default: {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=env("EXO_REMOTE_CONFIG") or None,
        help="LiteLLM proxy config.yaml or JSON alias map (env EXO_REMOTE_CONFIG; "
        "default: none, which serves the embedded offline model)",
    )
    embedded = parser.add_argument_group(
        "embedded model (no --config)",
        "With the [local] extra, a sidecar without a config serves Gemma 3 270M (or --embedded-model) with "
        "llama.cpp on 127.0.0.1; without it, embedded-echo, which only repeats the prompt.",
    )
    embedded.add_argument(
        "--embedded-model",
        type=Path,
        default=os.environ.get("EXO_REMOTE_EMBEDDED_MODEL") or None,
        metavar="PATH",
        help="your own GGUF file to serve instead of the packaged Gemma 3 270M; nothing is downloaded "
        "(default: the packaged model; env EXO_REMOTE_EMBEDDED_MODEL)",
    )
    embedded.add_argument(
        "--embedded-threads",
        type=int,
        default=int(os.environ.get("EXO_REMOTE_EMBEDDED_THREADS", "1")),
        metavar="N",
        help="CPU threads for llama.cpp (default: %(default)s; more than one thread on a busy small "
        "machine slows generation down; env EXO_REMOTE_EMBEDDED_THREADS)",
    )
    embedded.add_argument(
        "--embedded-ctx",
        type=int,
        default=int(os.environ.get("EXO_REMOTE_EMBEDDED_CTX", "4096")),
        metavar="N",
        help="context window of one request, in tokens (default: %(default)s; env EXO_REMOTE_EMBEDDED_CTX)",
    )
    embedded.add_argument(
        "--embedded-parallel",
        type=int,
        default=int(os.environ.get("EXO_REMOTE_EMBEDDED_PARALLEL", "2")),
        metavar="N",
        help="requests generated at the same time (llama.cpp slots, sharing the threads); more requests "
        "wait in llama.cpp's queue until a slot frees (default: %(default)s; env EXO_REMOTE_EMBEDDED_PARALLEL)",
    )
    embedded.add_argument(
        "--embedded-echo",
        action="store_true",
        default=os.environ.get("EXO_REMOTE_EMBEDDED_ECHO", "0") == "1",
        help="serve embedded-echo even when the [local] extra is installed (no model loaded; "
        "env EXO_REMOTE_EMBEDDED_ECHO=1; default: off)",
    )
    parser.add_argument(
        "--log-level",
        default=env("EXO_REMOTE_LOG_LEVEL", "info"),
        help="debug, info, warning or error (env EXO_REMOTE_LOG_LEVEL; default: info)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=env("EXO_REMOTE_TOKEN_FILE") or None,
        help="file of 'name token' lines, one per node, '#' comments allowed (env EXO_REMOTE_TOKEN_FILE, "
        "or one token in EXO_REMOTE_TOKEN; default: none, which off loopback needs --tls-client-ca or "
        "--allow-anonymous)",
    )
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for TLS (default: none, plaintext)")
    parser.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert (default: none)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA, mTLS (default: none)"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow plaintext on a non-loopback address (default: off)"
    )
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="off loopback, serve callers without a token or client certificate "
        "(warned at start and to clients; default: off)",
    )
    parser.add_argument(
        "--metrics-listen",
        default=env("EXO_REMOTE_METRICS_LISTEN") or None,
        help="host:port for Prometheus metrics, a separate port (env EXO_REMOTE_METRICS_LISTEN; default: off)",
    )
    parser.add_argument(
        "--grace-s", type=float, default=30.0, help="on SIGTERM, how long live streams may finish (default: 30)"
    )
    parser.add_argument(
        "--discover",
        action=argparse.BooleanOptionalAction,
        default=env("EXO_REMOTE_DISCOVER", "1") != "0",
        help="find the models the sidecar's keys and servers make available (env EXO_REMOTE_DISCOVER=0 "
        "turns it off; default: on)",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=env("EXO_REMOTE_ENV_FILE") or None,
        help="KEY=value file re-read at every discovery refresh, to add keys without a restart "
        "(env EXO_REMOTE_ENV_FILE; default: none)",
    )
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="KIND=URL",
        help="an OpenAI-compatible server to list: ollama, llamacpp, vllm, lmstudio or openai; repeatable "
        "(env EXO_REMOTE_SERVERS, comma-separated; default: none, plus Ollama's local address if it answers)",
    )
    parser.add_argument(
        "--refresh-s", type=float, default=60.0, help="discovery refresh period in seconds (default: 60)"
    )
    parser.add_argument(
        "--stall-limit-s",
        type=float,
        default=float(os.environ.get("EXO_REMOTE_STALL_LIMIT_S", DEFAULT_STALL_LIMIT_S)),
        help="end a stream whose client has read nothing for this long (CLIENT_STALLED; default 60)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env("EXO_REMOTE_WORKERS", "1")),
        help="processes serving Generate, each on its own port announced by ListWorkers; use the number "
        "of cores for many concurrent streams (env EXO_REMOTE_WORKERS; default: 1)",
    )
    parser.add_argument(
        "--openai-fast-path",
        action=argparse.BooleanOptionalAction,
        default=_fast_path_from_env(),
        help="read OpenAI-compatible deployments (openai/ or hosted_vllm/ with an api_base and no "
        "other litellm_params) directly instead of through LiteLLM (env EXO_REMOTE_OPENAI_FAST_PATH=0 "
        "turns it off; default: on)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=os.environ.get("EXO_REMOTE_STATE_DIR") or None,
        help="where the spend ledger (SQLite) lives (default: $XDG_DATA_HOME/exo-remote-engine)",
    )
    parser.add_argument(
        "--accounting",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("EXO_REMOTE_ACCOUNTING", "1") != "0",
        help="record every request's tokens and cost in the ledger (default: on; budgets need it)",
    )
    return parser


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _settings_from_args(args: argparse.Namespace) -> SidecarSettings:
    named: dict[str, str] = {}
    if args.token_file:
        named = load_token_file(args.token_file)
    elif os.environ.get("EXO_REMOTE_TOKEN"):
        named = token_from_env(os.environ["EXO_REMOTE_TOKEN"])
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)
    servers = []
    for spec in [*args.server, *filter(None, os.environ.get("EXO_REMOTE_SERVERS", "").split(","))]:
        kind, sep, url = spec.partition("=")
        if not sep or not url:
            raise ConfigError(f"--server {spec!r}: expected KIND=URL, e.g. ollama=http://127.0.0.1:11434")
        try:
            servers.append(ServerSpec(kind.strip(), url.strip()))
        except ValueError as exc:
            raise ConfigError(f"--server {spec!r}: {exc}") from exc
    try:
        listen = grpc_address(args.listen, flag="--listen")
    except AddressError as exc:
        raise ConfigError(str(exc)) from None
    return SidecarSettings(
        listen=listen,
        config_path=args.config,
        named_tokens=named,
        tls=tls,
        allow_insecure=args.insecure,
        allow_anonymous=args.allow_anonymous,
        metrics_listen=args.metrics_listen,
        discover=args.discover,
        env_file=args.env_file,
        servers=tuple(servers),
        discovery_ttl_s=args.refresh_s,
        openai_fast_path=args.openai_fast_path,
        state_dir=args.state_dir,
        accounting=args.accounting,
        embedded_model=_embedded_from_args(args),
        stall_limit_s=args.stall_limit_s,
    )


def _embedded_from_args(args: argparse.Namespace) -> EmbeddedModelSettings | None:
    """The real embedded model unless a config is given, the echo is asked for, or the
    [local] extra is missing (then the echo, unless a model file was asked for)."""
    if args.config is not None or args.embedded_echo:
        return None
    settings = EmbeddedModelSettings(
        threads=args.embedded_threads,
        ctx=args.embedded_ctx,
        parallel=args.embedded_parallel,
        model_path=args.embedded_model.expanduser() if args.embedded_model else None,
    )
    settings.check()
    if settings.model_path is not None and not runtime_available():
        raise ConfigError(f"--embedded-model needs llama.cpp (xllamacpp): {LOCAL_EXTRA_HINT}")
    if settings.model_path is None and not local_model_available():
        return None
    return settings


def _check_single_process(config: SidecarConfig, workers: int) -> None:
    """Limits and budgets are counted in one process's memory: refuse to split them."""
    limited = [e.deployment_name for group in config.groups.values() for e in group if e.rpm or e.tpm]
    limited += [e.alias for e in config.models if e.rpm or e.tpm]
    limited += [f"node {n}" for n in config.node_quotas]
    if workers > 1 and limited:
        raise ConfigError(
            f"--workers {workers}: rpm, tpm and budgets are counted per process, and {limited[0]} has one; "
            "run with --workers 1"
        )


async def _serve(settings: SidecarSettings, grace_s: float, argv: Sequence[str], workers: int) -> None:
    is_worker = bool(os.environ.get(WORKER_ENV))
    if is_worker:  # same config, TLS and tokens as the main process, on a port of its own
        settings.listen = settings.listen.rsplit(":", 1)[0] + ":0"
        settings.metrics_listen = None
    if workers > 1 and not is_worker:
        _check_single_process(load_config(settings.config_path), workers)
    running = await start_sidecar(settings)
    protect_handlers()  # again: LiteLLM, imported by now, brings handlers of its own
    extra_env = running.embedded.endpoint_env() if running.embedded is not None else {}
    pool = WorkerPool(argv, workers - 1, extra_env) if workers > 1 and not is_worker else None
    if pool is not None:
        try:
            await pool.start()
        except RuntimeError as exc:
            await asyncio.gather(pool.stop(0), running.stop(0))
            raise ConfigError(str(exc)) from None
        running.servicer.worker_ports = pool.ports
    # LiteLLM leaves ~360k tracked objects after import and warm-up; every full collection
    # walks them and pauses all streams for 200-400 ms. Frozen, they are never walked again.
    # (Only here, in the sidecar's own process: frozen objects are never freed, which an
    # embedding process, e.g. a test runner, may not want.)
    gc.collect()
    gc.freeze()
    models = ", ".join(m.alias for m in running.config.models)
    log.info("listening on %s (models: %s)", settings.listen.rsplit(":", 1)[0] + f":{running.port}", models)
    print(READY_LINE.format(port=running.port), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if is_worker:
        orphaned = asyncio.create_task(wait_for_parent_exit())
        orphaned.add_done_callback(lambda _: stop.set())
    await stop.wait()
    log.info("shutting down: draining %d live streams for up to %.0fs", running.servicer.policy.active_streams, grace_s)
    if pool is not None:
        await asyncio.gather(pool.stop(grace_s), running.stop(grace_s=grace_s))
    else:
        await running.stop(grace_s=grace_s)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the sidecar extra brings it; exo itself runs on it): every
    streamed token costs several loop hops, and uvloop's are cheaper than asyncio's.
    ``EXO_REMOTE_UVLOOP=0`` keeps asyncio's loop."""
    if os.environ.get("EXO_REMOTE_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    worker = os.environ.get(WORKER_ENV)
    install_log_redaction()
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{f'[worker {worker}]' if worker else ''} %(message)s",
        stream=sys.stderr,
    )
    protect_handlers()  # every record in this process is one bounded line
    # LiteLLM logs request params at debug level; keep its loggers quiet whatever we run at.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm", "httpx", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if args.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if not args.stall_limit_s > 0:
            raise ConfigError("--stall-limit-s must be a positive number of seconds")
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(_settings_from_args(args), args.grace_s, argv, args.workers))
    except ConfigError as exc:
        print(f"exo-remote-sidecar: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
