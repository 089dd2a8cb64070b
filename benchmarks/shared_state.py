"""What shared limits and spend cost a request: ``python -m benchmarks.shared_state [--n 2000]``.

Starts a real Redis and PostgreSQL on 127.0.0.1 (Debian's packages, as the tests do) and
prints, per request, the latency the sidecar adds before the provider is called:
- node rpm/tpm admission in this process's memory, and in Redis (one Lua script), alone
  and with 32 admissions at once;
- a budget check from the local SQLite ledger, and from PostgreSQL (the node's spend in the
  window, summed at every check) with ``--rows`` of the node's rows already in the window;
- a budget reservation (what a budgeted request takes instead): in this process, and in
  PostgreSQL (a transaction under the node's advisory lock), alone and 32 at once;
and, at the end of a request, the SQLite commit plus the wait for its copy to PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncpg

from exo_remote_engine.sidecar.config.loader import ModelEntry, NodeQuota
from exo_remote_engine.sidecar.control.budgets import Budgets
from exo_remote_engine.sidecar.control.limits import UsageWindows
from exo_remote_engine.sidecar.control.shared_windows import RedisWindows
from exo_remote_engine.sidecar.ledger.spend import Charge, Ledger
from exo_remote_engine.sidecar.ledger.spend_database import _INSERT, HOURS, TABLE, SpendDatabase
from tests.support.servers import PostgresServer, RedisServer

ENTRY = ModelEntry(alias="bench", litellm_model="gpt-4o-mini", provider="openai")
QUOTAS = {"node-1": NodeQuota(max_budget=1e9, budget_duration="30d")}


def _charge(i: int) -> Charge:
    return Charge.of(
        request_id=f"bench-{i}",
        ended_at=time.time(),
        node="node-1",
        entry=ENTRY,
        prompt_tokens=100,
        completion_tokens=20,
        estimated=False,
        outcome="completed",
    )


def _line(name: str, samples: list[float]) -> None:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(f"{name:<58} p50 {statistics.median(samples) * 1e6:8.0f} us   p99 {p99 * 1e6:8.0f} us")


async def _timed(n: int, call: Callable[[], Awaitable[None]]) -> list[float]:
    samples = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - began)
    return samples


async def _concurrent(n: int, width: int, call: Callable[[], Awaitable[None]]) -> list[float]:
    samples: list[float] = []

    async def one() -> None:
        began = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - began)

    for _ in range(n // width):
        await asyncio.gather(*(one() for _ in range(width)))
    return samples


async def run(n: int, rows: int, redis_url: str, database_url: str, state: Path) -> None:
    local = UsageWindows()

    async def local_admit() -> None:
        local.admit("node:a", 10**9, None, "a")

    _line("node rpm admission, this process (today's default)", await _timed(n, local_admit))
    shared = RedisWindows(redis_url, UsageWindows())

    async def redis_admit() -> None:
        await shared.admit("node:b", 10**9, 10**12, "b")

    await _concurrent(64, 32, redis_admit)  # connections open and the script loaded
    _line("node rpm/tpm admission in Redis (--redis)", await _timed(n, redis_admit))
    _line("  same, 32 admissions at once", await _concurrent(n, 32, redis_admit))
    await shared.close()

    ledger = Ledger.open(state)
    local_budgets = Budgets(QUOTAS, ledger, time.time)

    async def local_check() -> None:
        await local_budgets.check("node-1")

    _line("budget check, SQLite ledger (one host)", await _timed(n, local_check))
    connection = await asyncpg.connect(database_url)
    database = SpendDatabase(database_url, ledger)
    await database.start()
    now = time.time()
    # Another host's rows, spread over the last 29 days, stored the way the copier stores them.
    spread = 29 * 86400 / max(rows, 1)
    tail = (0, 0, 0, "other", "h")  # no token details; the origin and the host
    other = [
        (i, f"r{i}", now - i * spread, "d", "node-1", "a", "a", "m", 1, 1, 0.0001, 0, "completed", 1, *tail)
        for i in range(rows)
    ]
    await connection.execute(_INSERT, *[list(column) for column in zip(*other, strict=True)], [])  # no reservations
    await connection.execute(f"ANALYZE {TABLE}; ANALYZE {HOURS}")
    await connection.close()
    shared_budgets = Budgets(QUOTAS, ledger, time.time, database)

    async def shared_check() -> None:
        await shared_budgets.check("node-1")

    await _concurrent(64, 32, shared_check)  # the pool's connections open
    _line(f"budget check in PostgreSQL (--database), {rows} rows in window", await _timed(n, shared_check))
    _line("  same, 32 checks at once", await _concurrent(n, 32, shared_check))

    async def shared_reserve() -> None:  # what a budgeted request does instead of a check
        reservation = await shared_budgets.reserve("node-1", 1.5e-7, 6e-7, 200, 1000, 600)
        assert reservation is not None
        database.release(reservation.id)

    _line(f"budget reservation in PostgreSQL (--database), {rows} rows", await _timed(n, shared_reserve))
    _line("  same, 32 reservations of one node at once", await _concurrent(n, 32, shared_reserve))
    local_reserve_budgets = Budgets(QUOTAS, ledger, time.time)

    async def local_reserve() -> None:
        reservation = await local_reserve_budgets.reserve("node-1", 1.5e-7, 6e-7, 200, 1000, 600)
        assert reservation is not None
        local_reserve_budgets.release(reservation)

    _line("budget reservation, this process (one host)", await _timed(n, local_reserve))
    counter = iter(range(10**9))

    async def finish() -> None:
        await ledger.record(_charge(next(counter)))
        await database.copied()

    _line("end of a request: SQLite commit + its copy to PostgreSQL", await _timed(min(n, 1000), finish))
    await database.close()
    ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="requests per measurement (default 2000)")
    parser.add_argument("--rows", type=int, default=10_000, help="the node's rows in the budget window (10000)")
    args = parser.parse_args()
    redis_server, postgres = RedisServer(), PostgresServer()
    redis_server.start()
    postgres.start()
    try:
        url = postgres.create_database("bench_shared_state")
        with tempfile.TemporaryDirectory() as state:
            asyncio.run(run(args.n, args.rows, redis_server.url, url, Path(state)))
    finally:
        redis_server.close()
        postgres.close()


if __name__ == "__main__":
    main()
