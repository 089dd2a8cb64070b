"""``exo.remote.v1.RemoteInferenceService``: what each RPC does, delegated.

Auth and the decode guard are interceptors (:mod:`~exo_remote_engine.sidecar.control.auth`,
:mod:`~exo_remote_engine.sidecar.serving.decoding`); every method's errors become statuses in
:func:`~exo_remote_engine.sidecar.serving.rpc_errors.rpc_errors`; node limits and charging are
:mod:`~exo_remote_engine.sidecar.control.accounting`; reading the provider, retries and fallbacks
are :mod:`~exo_remote_engine.sidecar.relay.streaming`. Generate itself says the order: find the
model, check the request, admit the node, stream, account.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.openai_chat import validate_request
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from exo_remote_engine.sidecar.config.loader import MASTER_KEY_NODE, ModelEntry
from exo_remote_engine.sidecar.control.accounting import Accounting, ReplyCut, RequestAccount
from exo_remote_engine.sidecar.control.budgets import Reservation
from exo_remote_engine.sidecar.control.limits import Clock
from exo_remote_engine.sidecar.control.policy import REFRESH_INTERVAL_S, Policy
from exo_remote_engine.sidecar.control.queueing import Lines, Ticket
from exo_remote_engine.sidecar.control.routing import Router
from exo_remote_engine.sidecar.discovery.registry import ModelRegistry
from exo_remote_engine.sidecar.embedded.model import LISTED_PROVIDER
from exo_remote_engine.sidecar.ledger.spend import Ledger
from exo_remote_engine.sidecar.ledger.spend_database import SpendDatabase
from exo_remote_engine.sidecar.relay.stall_watch import StallWatch
from exo_remote_engine.sidecar.serving.rpc_errors import rpc_errors
from exo_remote_engine.sidecar.serving.session import Sessions
from exo_remote_engine.sidecar.serving.settings import DEFAULT_STALL_LIMIT_S
from exo_remote_engine.sidecar.telemetry.metrics import Metrics, StreamRecorder
from exo_remote_engine.sidecar.telemetry.safe_logging import printable, safe_logger

log = safe_logger("exo_remote_engine.sidecar")

_SOURCES = {
    "config": pb.MODEL_SOURCE_CONFIG,
    "embedded": pb.MODEL_SOURCE_EMBEDDED,
    "discovered": pb.MODEL_SOURCE_DISCOVERED,
}


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
        redis_url: str | None = None,
        database: SpendDatabase | None = None,
    ) -> None:
        # Imported here for its cost only: streaming brings LiteLLM (seconds to import), which
        # ``exo-remote-sidecar --help`` and a config error should not wait for.
        from exo_remote_engine.sidecar.relay.streaming import StreamingBackend

        self.registry = registry
        self.config = registry.config
        self.policy = policy
        self.metrics = metrics
        self.stall_limit_s = stall_limit_s
        self.accounting = Accounting(self.config, metrics, clock, ledger, redis_url, database)
        self.router = Router(self.config.router, self.accounting.windows, shared=self.accounting.shared_windows)
        self.backend = StreamingBackend(
            num_retries=self.config.num_retries,
            openai_fast_path=openai_fast_path,
            router=self.router,
            groups=self.config.deployments,
        )
        # Requests over a limit wait here (queue_timeout); a test clock brings its own sleep.
        self.lines = Lines(policy, self.config.queue_timeout_s, clock, metrics, getattr(clock, "sleep", None))
        self.worker_ports: Callable[[], Sequence[int]] = tuple  # set when a WorkerPool runs
        self.warnings: tuple[str, ...] = ()  # what every caller should know, e.g. anonymous access
        self.sessions = Sessions(self.Generate)  # each multiplexed completion runs Generate itself

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await self.sessions.serve(request_iterator, context)

    @rpc_errors
    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListWorkersResponse:
        return pb.ListWorkersResponse(worker_ports=self.worker_ports())

    @rpc_errors
    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUsageResponse:
        """The ledger's spend per node and model, for the sidecar's admins only: the master
        key's bearer token (a client certificate's name never counts as the master key) or a
        node whose rules say ``role: admin`` (the same admins as the status page's)."""
        auth = context.auth_context()
        node = self.policy.identify(context.invocation_metadata(), auth)
        rules = self.policy.nodes.get(node)
        master = node == MASTER_KEY_NODE and not auth.get("x509_common_name")
        if not (master or (rules is not None and rules.admin)):
            raise RemoteError(
                Reason.PERMISSION_DENIED,
                "usage is for the sidecar's admins: send its master_key, or the token of a node with role: admin",
            )
        ledger = self.accounting.ledger
        if ledger is None:
            raise RemoteError(Reason.INVALID_REQUEST, "this sidecar keeps no ledger (it runs with --no-accounting)")
        since = time.time() - request.since_seconds if request.since_seconds > 0 else 0.0
        found = await asyncio.to_thread(ledger.usage, since, request.node or None)
        rows = [pb.UsageRow(node=r.node, model=r.alias, requests=r.requests, prompt_tokens=r.prompt_tokens,
                            completion_tokens=r.completion_tokens, cost_usd=r.cost_usd,
                            unpriced_requests=r.unpriced_requests) for r in found]  # fmt: skip
        return pb.GetUsageResponse(rows=rows, source=str(ledger.path))

    @rpc_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        node = self.policy.identify(context.invocation_metadata(), context.auth_context())
        refresh = request.refresh and self.policy.may_refresh(node, time.monotonic())
        # A node sees only what it may use: names of other models are not its business.
        models = [m for m in await self.registry.models(refresh=refresh) if self.policy.may_use(node, m.alias)]
        response = pb.ListModelsResponse(default_model=self.registry.default(models) if models else "")
        response.warnings.extend(self.warnings)
        if request.refresh and not refresh:
            response.warnings.append(f"refresh skipped: this node refreshed less than {REFRESH_INTERVAL_S:g}s ago")
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
        budgets = self.accounting.budgets
        status = None
        if budgets is not None:
            try:
                status = await budgets.status(node)
            except RemoteError:  # the shared spend database is down: list without the budget
                status = None
        if status is not None:
            response.budget.node = node
            response.budget.max_usd = status.max_usd
            response.budget.spent_usd = status.spent_usd
            response.budget.remaining_usd = status.remaining_usd
            if status.resets_in_s is not None:
                response.budget.resets_in_seconds = status.resets_in_s
        return response

    @rpc_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        node = self.policy.identify(context.invocation_metadata(), context.auth_context())
        entry = await self._ready_entry(request.model, node)
        if not request.messages:
            raise RemoteError(Reason.INVALID_REQUEST, "request has no messages")
        validate_request(request)
        deadline_s = self.policy.check_request(request, node, context.time_remaining())
        ticket = self.lines.ticket(node)
        reserved: list[Reservation | None] = [None]

        async def admit() -> None:  # retried by the node's line while over rpm/tpm
            reserved[0] = await self.accounting.admit(node, request, self._chargeable(entry, node), deadline_s)

        await ticket.limits(admit)
        account = self.accounting.open(request, node, entry, reserved[0])
        recorder = self.metrics.stream(entry.alias, node, lambda: account.served.deployment_name)
        code, failure = "OK", ""
        # One INFO line per request, at its end (it names model, node and outcome); the start
        # line is DEBUG: two records per short request were a tenth of the sidecar's CPU.
        log.debug("request_id=%s model=%s node=%s start", request.request_id, entry.alias, node)
        try:
            await self._stream(entry, request, context, account, recorder, deadline_s, ticket)
        except RemoteError as exc:
            code, failure = exc.grpc_code.name, f" {exc.reason.value}: {exc.message}"  # redacted already
            recorder.reason = exc.reason.value
            if "limit" in exc.metadata:
                self.metrics.limit_hit(node, exc.metadata["limit"])
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"  # what rpc_errors answers for anything unexpected
            raise
        finally:
            account.settle(code)
            recorder.finished(code, account.usage.prompt_tokens, account.usage.completion_tokens)
            log.info(
                "request_id=%s model=%s node=%s end code=%s%s", request.request_id, entry.alias, node, code, failure
            )

    def _chargeable(self, entry: ModelEntry, node: str) -> list[ModelEntry]:
        """The deployments that may serve (and be charged for) a request for ``entry``: its
        group and the groups of its fallbacks and context-window fallbacks the node may use,
        ready or not (one may be ready when the stream starts; over-reserving is safe). A
        budget reserves at their highest price."""
        tables = (self.config.fallbacks, self.config.context_window_fallbacks)
        allowed = dict.fromkeys(a for table in tables for a in self.policy.fallbacks(node, table, entry.alias))
        heads = [entry, *(f for a in allowed if (f := self.config.get(a)) is not None)]
        return [member for head in heads for member in self.config.deployments(head)]

    async def _ready_entry(self, alias: str, node: str) -> ModelEntry:
        """The model ``alias`` names, ready; else an error listing what the node may use."""
        found = await self.registry.lookup(alias)
        if found is None:
            usable = [m.alias for m in await self.registry.models() if m.ready and self.policy.may_use(node, m.alias)]
            known = ", ".join(usable)
            raise RemoteError(
                Reason.MODEL_NOT_FOUND,
                f"unknown model {printable(alias)!r}; this sidecar serves: {known or 'nothing ready'}",
            )
        if not found.ready:
            raise RemoteError(Reason.MODEL_NOT_READY, f"model {alias!r} is not ready: {found.not_ready_reason}")
        return found.entry

    async def _stream(
        self,
        entry: ModelEntry,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        account: RequestAccount,
        recorder: StreamRecorder,
        deadline_s: float,
        ticket: Ticket,
    ) -> None:
        """The stream inside its node's slot, its deadline and the stall watch; a deadline
        or a stalled client become their RemoteErrors here."""
        stall = StallWatch(self.stall_limit_s)
        send = stall.timed(context.write)

        async def write(response: pb.GenerateResponse) -> None:
            if response.HasField("delta"):
                delta, cut = account.clip(response.delta)
                if cut:  # the reply reached its reserved tokens: what fits, then the end
                    if delta.ByteSize():
                        await send(pb.GenerateResponse(delta=delta))
                        recorder.delta_written()
                        account.wrote(delta)
                    raise ReplyCut
                await send(response)
                recorder.delta_written()
                account.wrote(response.delta)
                return
            await account.finished(response.finished)
            await send(response)

        try:
            wait_for_room = ticket.group(entry.alias)
            async with ticket.slot():
                with self._active(), stall:
                    async with asyncio.timeout(deadline_s):
                        fallbacks = await self._fallbacks(self.config.fallbacks, entry, account.node)
                        larger = await self._fallbacks(self.config.context_window_fallbacks, entry, account.node)
                        try:
                            await self.backend.generate(
                                entry,
                                request,
                                write,
                                fallbacks,
                                account.attempt,
                                account.abandoned,
                                wait_for_room,
                                larger,
                            )
                        except ReplyCut:
                            await send(pb.GenerateResponse(finished=await account.cut()))
        except TimeoutError:
            raise RemoteError(Reason.DEADLINE_EXCEEDED, f"deadline of {deadline_s:.1f}s exceeded") from None
        except asyncio.CancelledError:
            if not stall.fired:  # cancelled by the client or the server, not by the watch
                raise
            stall.uncancel()
            raise RemoteError(
                Reason.CLIENT_STALLED,
                f"the client read nothing for {self.stall_limit_s:g}s; the stream was ended",
            ) from None

    async def _fallbacks(self, table: Mapping[str, Sequence[str]], entry: ModelEntry, node: str) -> list[ModelEntry]:
        """``entry``'s fallbacks in ``table`` that are ready and that ``node`` may use: a
        fallback is the node's request on another model, under the node's rules and budget."""
        found = [await self.registry.lookup(alias) for alias in self.policy.fallbacks(node, table, entry.alias)]
        return [f.entry for f in found if f is not None and f.ready]

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        if self.metrics.registry is not None:
            self.metrics.active.inc()
        try:
            yield
        finally:
            if self.metrics.registry is not None:
                self.metrics.active.dec()
