"""Who may start a request, and what each one is charged: per-node budgets and rpm/tpm
windows before the provider is called, tokens and cost counted (and written to the spend
ledger) when it ends.

:class:`Accounting` is the sidecar's; :class:`RequestAccount` follows one Generate call,
so the servicer only says what happened (a delta written, the stream finished, the stream
ended with a code) and the rules for charging live here.

Several sidecar hosts (or ``--workers``) share the node counts through Redis
(:mod:`~exo_remote_engine.sidecar.control.shared_windows`) and spend through PostgreSQL
(:mod:`~exo_remote_engine.sidecar.ledger.spend_database`) when they are given; otherwise both
live in this process and its SQLite ledger.
"""

from __future__ import annotations

import sqlite3

from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import ModelEntry, SidecarConfig
from exo_remote_engine.sidecar.control.budgets import Budgets
from exo_remote_engine.sidecar.control.limits import Clock, UsageWindows
from exo_remote_engine.sidecar.control.shared_windows import RedisWindows
from exo_remote_engine.sidecar.ledger.spend import Charge, Ledger, estimate_tokens
from exo_remote_engine.sidecar.ledger.spend_database import SpendDatabase
from exo_remote_engine.sidecar.ledger.token_cost import NO_DETAILS, TokenDetails
from exo_remote_engine.sidecar.telemetry.metrics import Metrics
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger

log = safe_logger("exo_remote_engine.sidecar")


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

    async def admit(self, node: str) -> None:
        """Budget and per-node rpm/tpm, before any provider is called."""
        try:
            if self.budgets is not None:
                await self.budgets.check(node)
            quota = self.quotas.get(node)
            if quota is not None and (quota.rpm is not None or quota.tpm is not None):
                key, what = f"node:{node}", f"node {node!r}"
                if self.shared_windows is not None:
                    await self.shared_windows.admit(key, quota.rpm, quota.tpm, what)
                else:
                    self.windows.admit(key, quota.rpm, quota.tpm, what)
        except RemoteError as exc:
            self.metrics.limit_hit(node, exc.metadata.get("limit", "budget"))
            self.metrics.refused(node, exc.reason.value)
            raise

    def open(self, request: pb.GenerateRequest, node: str, entry: ModelEntry) -> RequestAccount:
        return RequestAccount(self, request, node, entry)

    def charge(
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
            details=_details(usage) if usage is not None and not estimated else NO_DETAILS,
        )
        (self.shared_windows or self.windows).add_tokens(f"node:{node}", prompt + completion)
        self.metrics.charged(entry.alias, node, charge.cost_usd)
        if self.budgets is not None:
            self.budgets.add(node, charge.cost_usd)
        return charge


class RequestAccount:
    """One Generate call: the deployment that served it, what it produced, one charge."""

    __slots__ = ("_accounting", "charged", "chars", "node", "request", "served", "usage")

    def __init__(self, accounting: Accounting, request: pb.GenerateRequest, node: str, entry: ModelEntry) -> None:
        self._accounting = accounting
        self.request = request
        self.node = node
        self.served = entry  # the deployment of the last attempt
        self.usage = pb.Usage()  # the provider's, once finished
        self.chars = 0  # characters written to the client
        self.charged = False

    def attempt(self, entry: ModelEntry) -> None:
        """The backend tries ``entry`` (a retry or a fallback): it is what gets charged."""
        self.served = entry

    def abandoned(self, entry: ModelEntry) -> None:
        """An attempt cancelled after its prompt was sent (no first token in time, or a
        hedge that lost): the provider bills the prompt, so the node is charged for it,
        estimated and marked ``abandoned``, beside the attempt that served."""
        charge = self._accounting.charge(self.request, self.node, entry, None, 0, "abandoned")
        if self._accounting.ledger is not None:
            self._accounting.ledger.record_soon(charge)
            if self._accounting.database is not None:
                self._accounting.database.kick()

    def wrote(self, delta: pb.Delta) -> None:
        self.chars += len(delta.text) + len(delta.reasoning_text)
        for call in delta.tool_calls:
            self.chars += len(call.arguments_fragment)

    async def finished(self, finished: pb.Finished) -> None:
        """Charged (and committed) before the client learns the request finished; a ledger
        that cannot write loses the row, not the reply, and the operator is told."""
        self.usage.CopyFrom(finished.usage)
        self.charged = True
        usage = self.usage if finished.HasField("usage") else None
        charge = self._accounting.charge(self.request, self.node, self.served, usage, self.chars, "completed")
        ledger = self._accounting.ledger
        if ledger is not None:
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

    def settle(self, code: str) -> None:
        """At the end, whatever the end: a stream cut short after output began is charged
        for what it produced."""
        if self.charged or not self.chars:
            return
        outcome = "cancelled" if code in ("CANCELLED", "DEADLINE_EXCEEDED") else "failed"
        charge = self._accounting.charge(self.request, self.node, self.served, None, self.chars, outcome)
        if self._accounting.ledger is not None:
            self._accounting.ledger.record_soon(charge)
            if self._accounting.database is not None:
                self._accounting.database.kick()  # (the next poll copies it if this comes too early)


def _details(usage: pb.Usage) -> TokenDetails:
    """The provider's cache and reasoning counts, each clamped to the total it is part of."""
    return TokenDetails(
        cached_prompt_tokens=min(max(0, usage.cached_prompt_tokens), usage.prompt_tokens),
        cache_creation_prompt_tokens=min(max(0, usage.cache_creation_prompt_tokens), usage.prompt_tokens),
        reasoning_tokens=min(max(0, usage.reasoning_tokens), usage.completion_tokens),
    )
