"""Reads for the operator's view: spend per node per UTC day, the hosts that wrote spend,
and how far the copy to the shared spend database lags.

From this host's SQLite ledger (its own read-only connection, so the status page never
queues behind the writer thread) or, with ``--database``, from every host's rows in
PostgreSQL (its own short-lived connection: a slow status page never takes a connection
a budget check needs). Costs of unknown price are NULL in both and are left out of sums,
as :mod:`~exo_remote_engine.sidecar.ledger.spend` promises.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo_remote_engine.sidecar.ledger.spend_database import TABLE

CONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class DaySpend:
    day: str  # UTC date, YYYY-MM-DD
    node: str
    requests: int
    cost_usd: float
    unpriced_requests: int


@dataclass(frozen=True)
class HostSeen:
    """One sidecar that wrote spend: its host and its ledger (two sidecars on one host differ by it)."""

    host: str
    origin: str
    requests: int
    cost_usd: float
    last_ended_at: float


@dataclass(frozen=True)
class CopyLag:
    pending_rows: int
    oldest_pending_at: float | None  # ended_at of the oldest row not copied yet


def first_day(now: float, days: int) -> str:
    """The UTC date ``days - 1`` days before ``now``'s (a window of ``days`` dates)."""
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    return (today - dt.timedelta(days=days - 1)).isoformat()


def day_start(day: str) -> float:
    """00:00 UTC of ``day`` (YYYY-MM-DD), in unix seconds."""
    return dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), dt.UTC).timestamp()


class LedgerHistory:
    """This host's ledger, read-only."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")

    def close(self) -> None:
        self._db.close()

    def daily(self, since_day: str) -> list[DaySpend]:
        rows = self._db.execute(  # ended_at is indexed, day is not
            "SELECT day, node, COUNT(*), COALESCE(SUM(cost_usd), 0), SUM(cost_usd IS NULL) FROM requests"
            " WHERE ended_at >= ? GROUP BY day, node ORDER BY day, node",
            (day_start(since_day),),
        )
        return [DaySpend(str(d), str(n), int(c), float(s), int(u)) for d, n, c, s, u in rows]

    def copy_lag(self, target: str) -> CopyLag:
        """Rows not yet copied to ``target`` (the spend database's display name)."""
        shipped = self._db.execute("SELECT last_id FROM shipped WHERE target = ?", (target,)).fetchone()
        after = int(shipped[0]) if shipped else 0
        count, oldest = self._db.execute(
            "SELECT COUNT(*), MIN(ended_at) FROM requests WHERE id > ?", (after,)
        ).fetchone()
        return CopyLag(int(count), float(oldest) if oldest is not None else None)


async def database_daily(url: str, since_day: str) -> list[DaySpend]:
    """Every host's spend per node per day from the shared database."""
    query = (
        "SELECT day, node, COUNT(*), COALESCE(SUM(cost_usd), 0), COUNT(*) FILTER (WHERE cost_usd IS NULL)"  # noqa: S608
        f" FROM {TABLE} WHERE ended_at >= $1 GROUP BY day, node ORDER BY day, node"
    )
    rows = await _fetch(url, query, day_start(since_day))
    return [DaySpend(str(r[0]), str(r[1]), int(r[2]), float(r[3]), int(r[4])) for r in rows]


async def database_hosts(url: str) -> list[HostSeen]:
    """The sidecars whose spend is in the shared database, with their last request."""
    query = (
        "SELECT host, origin, COUNT(*), COALESCE(SUM(cost_usd), 0), MAX(ended_at)"  # noqa: S608
        f" FROM {TABLE} GROUP BY host, origin ORDER BY host, origin"
    )
    rows = await _fetch(url, query)
    return [HostSeen(str(r[0]), str(r[1]), int(r[2]), float(r[3]), float(r[4])) for r in rows]


async def _fetch(url: str, query: str, *args: object) -> list[tuple[Any, ...]]:
    import asyncpg

    connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S, command_timeout=CONNECT_TIMEOUT_S)
    try:
        if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE):
            return []
        return [tuple(row) for row in await connection.fetch(query, *args)]
    finally:
        await connection.close()
