"""Who may start a request, and what each one is charged: per-node budgets (a reservation
of the request's maximum cost) and rpm/tpm windows before the provider is called, tokens
and cost counted (and written to the spend ledger) when it ends.

:class:`Accounting` is the sidecar's; :class:`RequestAccount` follows one Generate call,
so the servicer only says what happened (a delta written, the stream finished, the stream
ended with a code) and the rules for charging live here: a reply is held to its reserved
output tokens (:class:`ReplyCut` past them), a request cancelled or timed out after the
provider was called is charged for its prompt (estimated) even before its first delta, and
a provider's impossible usage is the provider's error, charged by estimate.

Several sidecar hosts (or ``--workers``) share the node counts through Redis
(:mod:`~exo_remote_engine.sidecar.control.shared_windows`) and spend and reservations through
PostgreSQL (:mod:`~exo_remote_engine.sidecar.ledger.spend_database`) when they are given;
otherwise both live in this process and its SQLite ledger.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import ModelEntry, SidecarConfig
from exo_remote_engine.sidecar.control.budgets import Budgets, Reservation
from exo_remote_engine.sidecar.control.limits import Clock, UsageWindows
from exo_remote_engine.sidecar.control.reply_limit import clip_delta
from exo_remote_engine.sidecar.control.shared_windows import RedisWindows
from exo_remote_engine.sidecar.ledger.spend import Charge, Ledger, max_output_tokens, prices
from exo_remote_engine.sidecar.ledger.spend_database import SpendDatabase
from exo_remote_engine.sidecar.ledger.token_cost import NO_DETAILS, TokenDetails
from exo_remote_engine.sidecar.ledger.token_estimates import (
    delta_tokens,
    implausible_usage,
    prompt_bound,
    prompt_estimate,
)
from exo_remote_engine.sidecar.telemetry.metrics import Metrics
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger

log = safe_logger("exo_remote_engine.sidecar")

DEFAULT_OUTPUT_TOKENS = 8192  # reserved without max_tokens when the model's maximum is unknown
RESERVATION_GRACE_S = 60.0  # a shared reservation outlives its request's deadline by this much


class ReplyCut(Exception):
    """The reply reached its reserved output tokens: the stream ends here, finish 'length'."""


class Accounting:
    """Admission and charging for every node; ``ledger`` None means accounting is off."""

    def __init__(
        self,
        config: SidecarConfig,
        metrics: Metrics,
        clock: Clock,
        ledger: Ledger | None,
        redis_url: str | None = None,
        database: SpendDatabase | None = None,
    ) -> None:
        self.clock = clock
        self.metrics = metrics
        self.quotas = config.node_quotas
        self.windows = UsageWindows(clock)  # shared with the router's deployment limits
        # Node counts in Redis (this process's windows while it is unreachable).
        self.shared_windows = RedisWindows(redis_url, self.windows) if redis_url else None
        self.ledger = ledger
        self.database = database
        self.budgets = Budgets(config.node_quotas, ledger, clock, database) if ledger is not None else None

    async def close(self) -> None:
        if self.shared_windows is not None:
            await self.shared_windows.close()
        if self.database is not None:
            await self.database.close()

    async def admit(
        self,
        node: str,
        request: pb.GenerateRequest | None = None,
        candidates: Sequence[ModelEntry] = (),
        deadline_s: float = 0.0,
    ) -> Reservation | None:
        """Budget (a reservation of the request's maximum cost over ``candidates``, the
        deployments that may serve and be charged for it) and per-node rpm/tpm, before any
        provider is called."""
        reservation = None
        try:
            if self.budgets is not None and request is not None and self.budgets.has_budget(node):
                reservation = await self._reserve(node, request, candidates, deadline_s)
            elif self.budgets is not None:
                await self.budgets.check(node)
            quota = self.quotas.get(node)
            if quota is not None and (quota.rpm is not None or quota.tpm is not None):
                key, what = f"node:{node}", f"node {node!r}"
                try:
                    if self.shared_windows is not None:
                        await self.shared_windows.admit(key, quota.rpm, quota.tpm, what)
                    else:
                        self.windows.admit(key, quota.rpm, quota.tpm, what)
                except RemoteError:
                    self.release(reservation)
                    raise
        except RemoteError as exc:
            self.metrics.limit_hit(node, exc.metadata.get("limit", "budget"))
            self.metrics.refused(node, exc.reason.value)
            raise
        return reservation

    async def _reserve(
        self, node: str, request: pb.GenerateRequest, candidates: Sequence[ModelEntry], deadline_s: float
    ) -> Reservation | None:
        assert self.budgets is not None
        quota = self.quotas[node]
        known: list[tuple[float, float]] = []
        for entry in candidates:
            price_in, price_out = prices(entry)
            if price_in is not None and price_out is not None:
                known.append((price_in, price_out))
            elif not quota.allow_unpriced:
                raise RemoteError(
                    Reason.PERMISSION_DENIED,
                    f"node {node!r} has a budget and model {entry.alias!r} (deployment {entry.deployment_name!r}) "
                    "has no known price, so its spend could not be counted against it; give the model a price "
                    "(input_cost_per_token, output_cost_per_token) or set allow_unpriced: true in the node's rule",
                    metadata={"limit": "unpriced"},
                )
        if not known:
            await self.budgets.check(node)  # only unpriced models, allowed: nothing to reserve
            return None
        sampling = request.sampling
        if sampling.HasField("max_tokens"):
            cap = sampling.max_tokens
        else:
            maxima = [m for e in candidates if (m := max_output_tokens(e)) is not None]
            cap = max(maxima) if maxima else DEFAULT_OUTPUT_TOKENS
        reservation = await self.budgets.reserve(
            node,
            max(p[0] for p in known),
            max(p[1] for p in known),
            prompt_bound(request),
            cap,
            deadline_s + RESERVATION_GRACE_S,
        )
        if reservation is not None and (reservation.output_tokens < cap or sampling.HasField("max_tokens")):
            sampling.max_tokens = reservation.output_tokens  # a provider that honours it stops there
        return reservation

    def release(self, reservation: Reservation | None) -> None:
        """Give back a reservation whose request is charged nothing."""
        if reservation is None or self.budgets is None:
            return
        if reservation.shared and self.database is not None:
            self.database.release(reservation.id)
        else:
            self.budgets.release(reservation)

    def unpriced_warnings(self, config: SidecarConfig, may_use: Callable[[str, str], bool]) -> list[str]:
        """One line per budgeted node and unpriced model it may use: what the operator should know at startup."""
        lines = []
        for node, quota in sorted(self.quotas.items()):
            if quota.max_budget is None:
                continue
            for head in config.models:
                if not may_use(node, head.alias):
                    continue
                for entry in config.deployments(head):
                    if None not in prices(entry):
                        continue
                    what = (
                        "its requests are served and not counted against the budget (allow_unpriced: true)"
                        if quota.allow_unpriced
                        else "its requests are refused (PERMISSION_DENIED) unless the model is priced "
                        "(input_cost_per_token, output_cost_per_token) or the node's rule sets allow_unpriced: true"
                    )
                    lines.append(
                        f"node {node!r} has a budget and model {entry.alias!r} (deployment "
                        f"{entry.deployment_name!r}, {entry.litellm_model}) has no known price: {what}"
                    )
        return lines

    def open(
        self, request: pb.GenerateRequest, node: str, entry: ModelEntry, reservation: Reservation | None = None
    ) -> RequestAccount:
        return RequestAccount(self, request, node, entry, reservation)

    def charge(
        self,
        request: pb.GenerateRequest,
        node: str,
        entry: ModelEntry,
        usage: pb.Usage | None,
        produced_tokens: int,
        outcome: str,
        reservation: Reservation | None = None,
    ) -> Charge:
        """Count a request's tokens and cost against the node (its reservation, if any, turns
        into this charge); the ledger row to write. Without provider usage, tokens are
        estimated: the prompt from the request, the completion from what was written."""
        estimated = usage is None or (usage.prompt_tokens == 0 and usage.completion_tokens == 0)
        prompt = prompt_estimate(request) if estimated or usage is None else usage.prompt_tokens
        completion = produced_tokens if estimated or usage is None else usage.completion_tokens
        shared = reservation is not None and reservation.shared
        charge = Charge.of(
            request_id=request.request_id,
            ended_at=self.clock(),
            node=node,
            entry=entry,
            prompt_tokens=prompt,
            completion_tokens=completion,
            estimated=estimated,
            outcome=outcome,
            details=_details(usage) if usage is not None and not estimated else NO_DETAILS,
            reservation=reservation.id if shared and reservation is not None else None,
        )
        (self.shared_windows or self.windows).add_tokens(f"node:{node}", prompt + completion)
        self.metrics.charged(entry.alias, node, charge.cost_usd)
        if self.budgets is not None:
            self.budgets.add(node, charge.cost_usd)
            if reservation is not None and not shared:
                self.budgets.release(reservation)  # in the same step as the charge
        held = reservation.cost_usd if reservation is not None else None
        if held is not None and charge.cost_usd is not None and charge.cost_usd > held * 1.000001:
            log.warning(
                "request_id=%s node=%s the provider reported more than the reservation ($%.6f > $%.6f): "
                "its tokenizer counts more than the bound",
                request.request_id,
                node,
                charge.cost_usd,
                held,
            )
        return charge


class RequestAccount:
    """One Generate call: the deployment that served it, what it produced, one charge."""

    __slots__ = (
        "_accounting",
        "attempted",
        "charged",
        "node",
        "produced",
        "request",
        "reservation",
        "served",
        "usage",
        "wrote_any",
    )

    def __init__(
        self,
        accounting: Accounting,
        request: pb.GenerateRequest,
        node: str,
        entry: ModelEntry,
        reservation: Reservation | None = None,
    ) -> None:
        self._accounting = accounting
        self.request = request
        self.node = node
        self.served = entry  # the deployment of the last attempt
        self.reservation = reservation
        self.usage = pb.Usage()  # the provider's, once finished
        self.produced = 0  # estimated tokens written to the client
        self.wrote_any = False
        self.attempted = False  # a provider was called: the prompt was (maybe) processed
        self.charged = False

    def attempt(self, entry: ModelEntry) -> None:
        """The backend tries ``entry`` (a retry or a fallback): it is what gets charged."""
        self.served = entry
        self.attempted = True

    def clip(self, delta: pb.Delta) -> tuple[pb.Delta, bool]:
        """``delta`` as far as the reservation allows, and whether the reply ends there."""
        if self.reservation is None:
            return delta, False
        room = self.reservation.output_tokens - self.produced
        if delta_tokens(delta) <= room:
            return delta, False
        return clip_delta(delta, room), True

    def abandoned(self, entry: ModelEntry) -> None:
        """An attempt cancelled after its prompt was sent (no first token in time, or a
        hedge that lost), beside the attempt that served: charged for its prompt
        (:meth:`_charge_soon`), marked ``abandoned``."""
        self._charge_soon(entry, "abandoned")

    def wrote(self, delta: pb.Delta) -> None:
        self.produced += delta_tokens(delta)
        self.wrote_any = True

    async def _record(self, charge: Charge) -> None:
        self.charged = True
        ledger = self._accounting.ledger
        if ledger is None:
            return
        try:
            await ledger.record(charge)
        except sqlite3.Error as exc:
            log.error("request_id=%s spend not recorded in %s: %s", self.request.request_id, ledger.path, exc)
        database = self._accounting.database
        if database is not None:
            quota = self._accounting.quotas.get(self.node)
            if quota is not None and quota.max_budget is not None:
                await database.copied()  # its next request, on any host, counts this one
            else:
                database.kick()  # no budget reads it: copied soon, nobody waits

    async def finished(self, finished: pb.Finished) -> None:
        """Charged (and committed) before the client learns the request finished; a ledger
        that cannot write loses the row, not the reply, and the operator is told. Impossible
        usage is the provider's error: charged by estimate, then raised."""
        usage = finished.usage if finished.HasField("usage") else None
        problem = implausible_usage(usage) if usage is not None else None
        if problem is not None:
            await self._record(self._charge(None, "failed"))
            raise RemoteError(
                Reason.PROVIDER_UNAVAILABLE,
                f"the provider of model {self.served.alias!r} reported impossible usage: {problem}",
            )
        if usage is not None:
            self.usage.CopyFrom(usage)
        await self._record(self._charge(usage, "completed"))

    async def cut(self) -> pb.Finished:
        """The reply reached its reserved tokens: charged by estimate; the Finished to send."""
        charge = self._charge(None, "cut")
        await self._record(charge)
        self.usage.prompt_tokens, self.usage.completion_tokens = charge.prompt_tokens, charge.completion_tokens
        return pb.Finished(finish_reason=pb.FINISH_REASON_LENGTH, usage=self.usage, model=self.served.litellm_model)

    def _charge(self, usage: pb.Usage | None, outcome: str) -> Charge:
        return self._accounting.charge(
            self.request, self.node, self.served, usage, self.produced, outcome, self.reservation
        )

    def settle(self, code: str) -> None:
        """At the end, whatever the end: a stream cut short after output began, or
        cancelled or timed out after the provider was called (even without output), is
        charged (:meth:`_charge_soon`); otherwise the reservation is given back."""
        if self.charged:
            return
        cancelled = code in ("CANCELLED", "DEADLINE_EXCEEDED")
        if not self.wrote_any and not (cancelled and self.attempted):
            self._accounting.release(self.reservation)
            return
        self.charged = True
        self._charge_soon(self.served, "cancelled" if cancelled else "failed", self.produced, self.reservation)

    def _charge_soon(
        self, entry: ModelEntry, outcome: str, produced: int = 0, reservation: Reservation | None = None
    ) -> None:
        """The charge of an attempt that ended without the provider's usage: once its prompt
        reached the provider, the provider bills it, so the node is charged for the prompt
        (estimated) and for the ``produced`` tokens written, even before the first one. The
        row is recorded soon, off the request's path (nobody waits for it); the shared
        database is asked to copy it (its next poll does, if this comes too early)."""
        charge = self._accounting.charge(self.request, self.node, entry, None, produced, outcome, reservation)
        ledger = self._accounting.ledger
        if ledger is not None:
            ledger.record_soon(charge)
            if self._accounting.database is not None:
                self._accounting.database.kick()


def _details(usage: pb.Usage) -> TokenDetails:
    """The provider's cache and reasoning counts, each clamped to the total it is part of."""
    return TokenDetails(
        cached_prompt_tokens=min(max(0, usage.cached_prompt_tokens), usage.prompt_tokens),
        cache_creation_prompt_tokens=min(max(0, usage.cache_creation_prompt_tokens), usage.prompt_tokens),
        reasoning_tokens=min(max(0, usage.reasoning_tokens), usage.completion_tokens),
    )
