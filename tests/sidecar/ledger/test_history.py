"""The operator's reads of the ledger: spend per node per UTC day over a window (older
rows left out, unknown prices counted apart, never as $0) and the copy's backlog."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from exo_remote_engine.sidecar.ledger.history import LedgerHistory, day_start, first_day
from exo_remote_engine.sidecar.ledger.spend import Charge, Ledger

NOW = dt.datetime(2026, 3, 31, 12, 0, tzinfo=dt.UTC).timestamp()


def charge(ended_at: float, node: str, cost: float | None) -> Charge:
    return Charge("r", ended_at, node, "m", "m", "openai/m", 10, 5, cost, False, "completed")


async def test_spend_per_node_per_day_and_copy_backlog(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path)
    day = 86400.0
    for row in (
        charge(NOW, "a", 0.5),
        charge(NOW - 60, "a", 0.25),
        charge(NOW, "b", None),  # unknown price
        charge(NOW - 2 * day, "a", 1.0),
        charge(NOW - 30 * day, "a", 100.0),  # a 31st day back: outside a 30-day window
    ):
        await ledger.record(row)
    history = LedgerHistory(ledger.path)
    try:
        since = first_day(NOW, 30)
        assert since == "2026-03-02" and day_start(since) == dt.datetime(2026, 3, 2, tzinfo=dt.UTC).timestamp()
        rows = {(r.day, r.node): r for r in history.daily(since)}
        assert set(rows) == {("2026-03-31", "a"), ("2026-03-31", "b"), ("2026-03-29", "a")}
        assert rows[("2026-03-31", "a")].cost_usd == pytest.approx(0.75) and rows[("2026-03-31", "a")].requests == 2
        b = rows[("2026-03-31", "b")]
        assert (b.cost_usd, b.unpriced_requests, b.requests) == (0.0, 1, 1)
        assert history.copy_lag("db").pending_rows == 5  # nothing copied to "db" yet
        assert history.copy_lag("db").oldest_pending_at == pytest.approx(NOW - 30 * day)
        await ledger.mark_shipped("db", 4)
        lag = history.copy_lag("db")
        assert (lag.pending_rows, lag.oldest_pending_at) == (1, pytest.approx(NOW - 30 * day))
        await ledger.mark_shipped("db", 5)
        assert history.copy_lag("db").pending_rows == 0 and history.copy_lag("db").oldest_pending_at is None
    finally:
        history.close()
        ledger.close()
