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
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import grpc

from exo_remote_engine.errors import Reason, RemoteError, abort
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.generated.grpc_health import health_pb2, health_pb2_grpc
from exo_remote_engine.openai_wire import validate_request
from exo_remote_engine.redaction import SECRETS, install_log_redaction
from exo_remote_engine.sidecar.auth import ServerTLS, TokenAuthInterceptor
from exo_remote_engine.sidecar.config import ConfigError, SidecarConfig, load_config
from exo_remote_engine.sidecar.decoding import DecodeGuardInterceptor
from exo_remote_engine.sidecar.discovery import ServerSpec
from exo_remote_engine.sidecar.metrics import Metrics
from exo_remote_engine.sidecar.policy import Limits, Policy
from exo_remote_engine.sidecar.registry import ModelRegistry
from exo_remote_engine.sidecar.workers import READY_LINE, WORKER_ENV, WorkerPool, wait_for_parent_exit

log = logging.getLogger("exo_remote_engine.sidecar")

SERVICE_NAME = "exo.remote.v1.RemoteInferenceService"
DEFAULT_LISTEN = "127.0.0.1:50505"
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
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
            error = RemoteError(Reason.INTERNAL, f"internal error (request id {request_id})")
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
        stall_limit_s: float = DEFAULT_STALL_LIMIT_S,
    ) -> None:
        from exo_remote_engine.sidecar.streaming import StreamingBackend

        self.registry = registry
        self.config = registry.config
        self.policy = policy
        self.metrics = metrics
        self.stall_limit_s = stall_limit_s
        self.backend = StreamingBackend(num_retries=self.config.num_retries, openai_fast_path=openai_fast_path)
        self.worker_ports: Callable[[], Sequence[int]] = tuple  # set when a WorkerPool runs

    @_rpc_errors
    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListWorkersResponse:
        return pb.ListWorkersResponse(worker_ports=self.worker_ports())

    @_rpc_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        models = await self.registry.models(refresh=request.refresh)
        response = pb.ListModelsResponse(default_model=self.registry.default(models))
        for found in models:
            entry = found.entry
            model = pb.Model(
                alias=entry.alias,
                provider=entry.provider,
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
        return response

    @_rpc_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        found = await self.registry.lookup(request.model)
        if found is None:
            known = ", ".join(m.alias for m in await self.registry.models() if m.ready)
            raise RemoteError(
                Reason.MODEL_NOT_FOUND,
                f"unknown model {request.model!r}; this sidecar serves: {known or 'nothing ready'}",
            )
        if not found.ready:
            raise RemoteError(Reason.MODEL_NOT_READY, f"model {request.model!r} is not ready: {found.not_ready_reason}")
        entry = found.entry
        if not request.messages:
            raise RemoteError(Reason.INVALID_REQUEST, "request has no messages")
        validate_request(request)
        node = self.policy.identify(context.invocation_metadata(), context.auth_context())
        deadline_s = self.policy.check_request(request, node, context.time_remaining())
        recorder = self.metrics.stream(entry.alias, node)
        usage = pb.Usage()

        stall = _StallWatch(self.stall_limit_s)

        async def write(response: pb.GenerateResponse) -> None:
            stall.writing_since = stall.loop.time()
            await context.write(response)
            stall.writing_since = None
            if response.HasField("delta"):
                recorder.delta_written()
            else:
                usage.CopyFrom(response.finished.usage)

        code = "OK"
        log.info("request_id=%s model=%s node=%s start", request.request_id, entry.alias, node)
        try:
            with self.policy.stream_slot(node), self._active(), stall:
                async with asyncio.timeout(deadline_s):
                    fallbacks = [
                        f.entry
                        for alias in self.config.fallbacks.get(entry.alias, ())
                        if (f := await self.registry.lookup(alias)) is not None and f.ready
                    ]
                    await self.backend.generate(entry, request, write, fallbacks)
        except TimeoutError:
            code = "DEADLINE_EXCEEDED"
            raise RemoteError(Reason.DEADLINE_EXCEEDED, f"deadline of {deadline_s:.1f}s exceeded") from None
        except RemoteError as exc:
            code = exc.grpc_code.name
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
            recorder.finished(code, usage.prompt_tokens, usage.completion_tokens)
            log.info("request_id=%s model=%s node=%s end code=%s", request.request_id, entry.alias, node, code)

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
    allow_insecure: bool = False
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
    stall_limit_s: float = DEFAULT_STALL_LIMIT_S


@dataclass
class RunningSidecar:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    config: SidecarConfig
    servicer: RemoteInferenceServicer
    metrics_port: int | None = None

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


def _is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def start_sidecar(settings: SidecarSettings, config: SidecarConfig | None = None) -> RunningSidecar:
    """Build, bind and start the server; returns once it accepts calls."""
    install_log_redaction()
    config = config or load_config(settings.config_path)
    tokens = [*settings.tokens, *settings.named_tokens.values()]
    SECRETS.add_all(tokens)  # never sent by us, but never to be logged either
    interceptors: list[grpc.aio.ServerInterceptor] = [TokenAuthInterceptor(tokens)] if tokens else []
    interceptors.append(DecodeGuardInterceptor())
    policy = Policy.build(settings.limits, config.node_policies, settings.named_tokens)
    metrics = Metrics()
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
    servicer = RemoteInferenceServicer(registry, policy, metrics, settings.openai_fast_path, settings.stall_limit_s)
    server = grpc.aio.server(
        interceptors=interceptors,
        # A backstop above the policy's own limit, which answers with a retry hint.
        maximum_concurrent_rpcs=settings.limits.max_concurrent_streams + 64,
        options=[
            ("grpc.so_reuseport", 0),  # a second process must not share (and skim) our port
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


def _bind(server: grpc.aio.Server, settings: SidecarSettings) -> int:
    if settings.tls is not None:
        return server.add_secure_port(settings.listen, settings.tls.credentials())
    else:
        if not _is_loopback(settings.listen) and not settings.allow_insecure:
            raise ConfigError(
                f"refusing to listen in plaintext on {settings.listen}: use TLS, a loopback address, or --insecure"
            )
        if not _is_loopback(settings.listen):
            log.warning(
                "WARNING: serving provider credentials in PLAINTEXT on %s; anyone on the "
                "network can read requests and replies",
                settings.listen,
            )
        return server.add_insecure_port(settings.listen)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="exo-remote-sidecar",
        description="Serve external LLMs to exo nodes over gRPC. Provider keys live here only.",
    )
    parser.add_argument("--listen", default=os.environ.get("EXO_REMOTE_LISTEN", DEFAULT_LISTEN))
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("EXO_REMOTE_CONFIG") or None,
        help="LiteLLM proxy config.yaml or JSON alias map; none = the embedded offline model",
    )
    parser.add_argument("--log-level", default=os.environ.get("EXO_REMOTE_LOG_LEVEL", "info"))
    parser.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("EXO_REMOTE_TOKEN_FILE") or None,
        help="file with one accepted bearer token per line (or env EXO_REMOTE_TOKEN)",
    )
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-client-ca", type=Path, help="require client certificates (mTLS)")
    parser.add_argument("--insecure", action="store_true", help="allow plaintext off loopback")
    parser.add_argument(
        "--metrics-listen",
        default=os.environ.get("EXO_REMOTE_METRICS_LISTEN") or None,
        help="host:port for Prometheus metrics (a separate port; off by default)",
    )
    parser.add_argument("--grace-s", type=float, default=30.0, help="on SIGTERM, how long live streams may finish")
    parser.add_argument(
        "--discover",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("EXO_REMOTE_DISCOVER", "1") != "0",
        help="find the models the sidecar's keys and servers make available (default: on)",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=os.environ.get("EXO_REMOTE_ENV_FILE") or None,
        help="KEY=value file re-read at every discovery refresh (add keys without a restart)",
    )
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="KIND=URL",
        help="an OpenAI-compatible server to list: ollama, llamacpp, vllm, lmstudio or openai (repeatable)",
    )
    parser.add_argument("--refresh-s", type=float, default=60.0, help="discovery refresh period")
    parser.add_argument(
        "--stall-limit-s",
        type=float,
        default=float(os.environ.get("EXO_REMOTE_STALL_LIMIT_S", DEFAULT_STALL_LIMIT_S)),
        help="end a stream whose client has read nothing for this long (CLIENT_STALLED; default 60)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("EXO_REMOTE_WORKERS", "1")),
        help="processes serving Generate, each on its own port announced by ListWorkers "
        "(default 1; use the number of cores for many concurrent streams)",
    )
    parser.add_argument(
        "--openai-fast-path",
        action=argparse.BooleanOptionalAction,
        default=_fast_path_from_env(),
        help="read OpenAI-compatible deployments (openai/ or hosted_vllm/ with an api_base and no "
        "other litellm_params) directly instead of through LiteLLM (default: on)",
    )
    return parser.parse_args(argv)


def _settings_from_args(args: argparse.Namespace) -> SidecarSettings:
    named: dict[str, str] = {}
    if args.token_file:
        try:
            lines = args.token_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{args.token_file}: cannot read token file: {exc.strerror}") from exc
        # One token per line, optionally preceded by the node name it identifies.
        for i, line in enumerate(t.split() for t in lines if t.strip() and not t.startswith("#")):
            name, token = (line[0], line[1]) if len(line) == 2 else (f"token-{i + 1}", line[0])
            named[name] = token
    elif os.environ.get("EXO_REMOTE_TOKEN"):
        named["token-1"] = os.environ["EXO_REMOTE_TOKEN"]
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
    return SidecarSettings(
        listen=args.listen,
        config_path=args.config,
        named_tokens=named,
        tls=tls,
        allow_insecure=args.insecure,
        metrics_listen=args.metrics_listen,
        discover=args.discover,
        env_file=args.env_file,
        servers=tuple(servers),
        discovery_ttl_s=args.refresh_s,
        openai_fast_path=args.openai_fast_path,
        stall_limit_s=args.stall_limit_s,
    )


async def _serve(settings: SidecarSettings, grace_s: float, argv: Sequence[str], workers: int) -> None:
    is_worker = bool(os.environ.get(WORKER_ENV))
    if is_worker:  # same config, TLS and tokens as the main process, on a port of its own
        settings.listen = settings.listen.rsplit(":", 1)[0] + ":0"
        settings.metrics_listen = None
    running = await start_sidecar(settings)
    pool = WorkerPool(argv, workers - 1) if workers > 1 and not is_worker else None
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
