"""Per-node spend budgets (``max_budget`` USD per ``budget_duration``): a reservation of
each request's maximum cost before any provider call, given back when its charge is known.

A budget period is a fixed window aligned to the epoch (``1d`` runs from 00:00 UTC to
00:00 UTC, ``1h`` from the top of the hour, ``1mo`` is 30 days); without a duration the
budget is for the ledger's whole life. Before the provider is called, a request reserves
its maximum cost (:func:`plan`: its prompt's token bound plus its output tokens, clamped to
what the budget has left after the node's spend and every reservation in flight); a
request for which not even one output token is left gets BUDGET_EXCEEDED, with a
Retry-After of the time left in the window. Its output is then held to the reserved
tokens (the provider is asked for no more, and the stream is cut there), so the requests
in flight together can never spend more than the budget. Spend in the current window is
kept in memory, seeded from the ledger when a window is first touched, so a restart keeps
counting; a reservation turns into the request's charge in the same step. Requests of
unknown price add nothing (they are NULL in the ledger, never 0), and a budgeted node may
use such a model only when its rule says ``allow_unpriced: true``.

With a shared spend database (``--database``, several sidecar hosts) the node's spend is
read from it at every check instead (every host's requests, plus this host's rows not
copied there yet), and reservations are rows of the same database, taken under a per-node
lock and deleted in the statement that copies their request's charge, so a budget holds in
total; when it cannot be read, the request is refused (fail closed, see
:mod:`~exo_remote_engine.sidecar.ledger.spend_database`).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.sidecar.config.loader import NodeQuota
from exo_remote_engine.sidecar.control.limits import Clock
from exo_remote_engine.sidecar.ledger.spend import Ledger

if TYPE_CHECKING:
    from exo_remote_engine.sidecar.ledger.spend_database import SpendDatabase


@dataclass(frozen=True)
class Reservation:
    """A request's maximum cost, held against its node's budget until its charge is known."""

    id: str
    node: str
    cost_usd: float
    output_tokens: int  # the most output the request may produce
    shared: bool  # held in the shared spend database (else in this process)


def plan(
    remaining_usd: float, price_in: float, price_out: float, prompt_tokens: int, output_cap: int
) -> tuple[int, float] | None:
    """Output tokens and cost to reserve for a request with ``remaining_usd`` left, or None
    when not even one output token fits after its prompt."""
    prompt_usd = prompt_tokens * price_in
    left = remaining_usd - prompt_usd
    if left < 0 or (price_out > 0 and left < price_out):
        return None
    tokens = output_cap if price_out <= 0 else min(output_cap, math.floor(left / price_out))
    while tokens > 1 and prompt_usd + tokens * price_out > remaining_usd:  # float rounding
        tokens -= 1
    return tokens, prompt_usd + tokens * price_out


@dataclass(frozen=True)
class BudgetStatus:
    max_usd: float
    spent_usd: float
    resets_in_s: float | None  # None: the budget never resets

    @property
    def remaining_usd(self) -> float:
        return max(0.0, self.max_usd - self.spent_usd)


class Budgets:
    def __init__(
        self, quotas: Mapping[str, NodeQuota], ledger: Ledger, clock: Clock, database: SpendDatabase | None = None
    ) -> None:
        self._quotas = {node: q for node, q in quotas.items() if q.max_budget is not None}
        self._ledger = ledger
        self._clock = clock
        self._database = database
        self._spent: dict[str, tuple[float, float]] = {}  # node -> (window start, spent)
        self._held: dict[str, dict[str, float]] = {}  # node -> reservation id -> USD (no database)

    def _window(self, quota: NodeQuota, now: float) -> tuple[float, float]:
        duration = quota.budget_duration_s
        if duration is None:
            return 0.0, math.inf
        start = (now // duration) * duration
        return start, start + duration

    def _spent_since(self, node: str, start: float) -> float:
        known = self._spent.get(node)
        if known is None or known[0] != start:
            known = self._spent[node] = (start, self._ledger.spent(node, start))
        return known[1]

    async def status(self, node: str) -> BudgetStatus | None:
        """``node``'s budget now (None: it has none); with a shared database, RemoteError
        SPEND_DATABASE_UNAVAILABLE when the database cannot be read."""
        quota = self._quotas.get(node)
        if quota is None or quota.max_budget is None:
            return None
        now = self._clock()
        start, end = self._window(quota, now)
        resets = None if end == math.inf else end - now
        if self._database is not None:
            spent = await self._database.spent(node, start)
        else:
            spent = self._spent_since(node, start)
        return BudgetStatus(quota.max_budget, spent, resets)

    def has_budget(self, node: str) -> bool:
        return node in self._quotas

    async def check(self, node: str) -> None:
        """Raise BUDGET_EXCEEDED when ``node`` has spent its budget for this window."""
        status = await self.status(node)
        if status is None or status.spent_usd < status.max_usd:
            return
        raise self._exceeded(node, status.max_usd, status.spent_usd, status.resets_in_s)

    def _exceeded(self, node: str, max_usd: float, spent_usd: float, resets_in_s: float | None) -> RemoteError:
        when = f"; it resets in {resets_in_s:.0f}s" if resets_in_s is not None else ""
        return RemoteError(
            Reason.BUDGET_EXCEEDED,
            f"node {node!r} has spent or reserved ${spent_usd:.6f} of its ${max_usd:g} budget and not even "
            f"a minimal request fits in what is left{when}",
            retry_after_s=resets_in_s,
        )

    async def reserve(
        self, node: str, price_in: float, price_out: float, prompt_tokens: int, output_cap: int, hold_s: float
    ) -> Reservation | None:
        """Hold the most this request may cost against ``node``'s budget (None: the node has
        no budget); BUDGET_EXCEEDED when not even one output token fits. ``hold_s``: how
        long a shared reservation outlives a host that dies with it."""
        quota = self._quotas.get(node)
        if quota is None or quota.max_budget is None:
            return None
        max_usd = quota.max_budget
        now = self._clock()
        start, end = self._window(quota, now)
        resets = None if end == math.inf else end - now
        chosen: list[int] = []

        def decide(spent_and_held: float) -> float:
            planned = plan(max_usd - spent_and_held, price_in, price_out, prompt_tokens, output_cap)
            if planned is None:
                raise self._exceeded(node, max_usd, spent_and_held, resets)
            chosen.append(planned[0])
            return planned[1]

        reservation_id = uuid.uuid4().hex
        if self._database is not None:
            cost = await self._database.reserve(node, start, now, reservation_id, decide, hold_s)
            return Reservation(reservation_id, node, cost, chosen[0], shared=True)
        held = self._held.setdefault(node, {})
        cost = decide(self._spent_since(node, start) + sum(held.values()))
        held[reservation_id] = cost
        return Reservation(reservation_id, node, cost, chosen[0], shared=False)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation of this process (its charge, if any, was added with :meth:`add`)."""
        self._held.get(reservation.node, {}).pop(reservation.id, None)

    def add(self, node: str, cost_usd: float | None) -> None:
        quota = self._quotas.get(node)
        if quota is None or not cost_usd or self._database is not None:
            return
        start, _ = self._window(quota, self._clock())
        spent = self._spent_since(node, start)
        self._spent[node] = (start, spent + cost_usd)
