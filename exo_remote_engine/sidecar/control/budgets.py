"""Per-node spend budgets (``max_budget`` USD per ``budget_duration``), checked before any
provider call.

A budget period is a fixed window aligned to the epoch (``1d`` runs from 00:00 UTC to
00:00 UTC, ``1h`` from the top of the hour, ``1mo`` is 30 days); without a duration the
budget is for the ledger's whole life. The request that crosses the budget completes (its
cost is known only at its end); the node's next request gets BUDGET_EXCEEDED, with a
Retry-After of the time left in the window. Spend in the current window is kept in memory,
seeded from the ledger when a window is first touched, so a restart keeps counting.
Requests of unknown price add nothing (they are NULL in the ledger, never 0).

With a shared spend database (``--database``, several sidecar hosts) the node's spend is
read from it at every check instead (every host's requests, plus this host's rows not
copied there yet), so a budget holds in total; when it cannot be read, the check fails
closed (see :mod:`~exo_remote_engine.sidecar.ledger.spend_database`).
"""

from __future__ import annotations

import math
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

    async def check(self, node: str) -> None:
        """Raise BUDGET_EXCEEDED when ``node`` has spent its budget for this window."""
        status = await self.status(node)
        if status is None or status.spent_usd < status.max_usd:
            return
        when = f"; it resets in {status.resets_in_s:.0f}s" if status.resets_in_s is not None else ""
        raise RemoteError(
            Reason.BUDGET_EXCEEDED,
            f"node {node!r} has spent ${status.spent_usd:.6f} of its ${status.max_usd:g} budget{when}",
            retry_after_s=status.resets_in_s,
        )

    def add(self, node: str, cost_usd: float | None) -> None:
        quota = self._quotas.get(node)
        if quota is None or not cost_usd or self._database is not None:
            return
        start, _ = self._window(quota, self._clock())
        spent = self._spent_since(node, start)
        self._spent[node] = (start, spent + cost_usd)
