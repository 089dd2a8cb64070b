"""Spend shared by several sidecar hosts, in PostgreSQL (``--database postgresql://...``).

Each host keeps writing every finished request to its own SQLite ledger first
(:mod:`~exo_remote_engine.sidecar.ledger.spend`: committed before the client sees Finished,
survives SIGKILL); a background task here copies the rows it has not copied yet to the
shared table ``exo_remote_requests`` (the SQLite columns, token details included, plus the
host, the ledger's identity and the row's id there). The copy is keyed by (ledger, id) with
``ON CONFLICT DO NOTHING``, so a retried or repeated copy (two worker processes, a crash
between the insert and the bookmark) never counts a request twice. While the database is
down the rows wait in SQLite and are copied once it is back, also after a restart of the
sidecar: nothing finished is lost. A table created by an older sidecar, without the
token-detail columns, gets them at start (under the lock that makes hosts starting together
create the schema once); an older sidecar still writing to it leaves them 0.

Budgets read a node's spend from the database (plus this host's rows not copied yet), so
they hold across hosts. A request's reservation of its maximum cost is a row of
``exo_remote_reservations``, taken under the node's advisory lock with the spend and the
other reservations read in the same transaction (so two hosts never both take the last of a
budget); it is deleted by the very statement that copies its request's charge (so the
node's spend never drops between the two), or at once when nothing is charged. A host that
dies holding one frees it when it expires (the request's deadline plus a minute).

When the database cannot be reached a budget cannot be checked: a budgeted node's requests
are refused with SPEND_DATABASE_UNAVAILABLE (fail closed; retryable), nodes without a
budget are served as usual. One warning says so per outage, and its end is logged too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Callable, Sequence
from typing import Any

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.sidecar.ledger.shared_services import Outage, check_service_url, display_url
from exo_remote_engine.sidecar.ledger.spend import DETAIL_COLUMNS, Ledger, UsageRow
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger

log = safe_logger("exo_remote_engine.sidecar")

TABLE = "exo_remote_requests"
CONNECT_TIMEOUT_S = 0.5
QUERY_TIMEOUT_S = 2.0
RETRY_AFTER_OUTAGE_S = 1.0  # during an outage, budget checks try the database again this often
SHIP_POLL_S = 1.0  # rows written by other processes of this host, and retries, at least this often
SHIP_BATCH = 500
POOL_SIZE = 8
COPY_WAIT_S = 1.0  # how long a finishing request waits for its row's copy (then it is copied later)
UNAVAILABLE_RETRY_AFTER_S = 5.0

HOURS = "exo_remote_spend_hours"
RESERVATIONS = "exo_remote_reservations"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    origin TEXT NOT NULL,              -- the SQLite ledger the row was copied from (its UUID)
    local_id BIGINT NOT NULL,          -- the row's id in that ledger
    host TEXT NOT NULL,                -- the sidecar host that wrote it
    pid INTEGER,                       -- and its process
    request_id TEXT NOT NULL,
    ended_at DOUBLE PRECISION NOT NULL,
    day TEXT NOT NULL,
    node TEXT NOT NULL,
    alias TEXT NOT NULL,
    deployment TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd DOUBLE PRECISION,         -- NULL: no known price
    estimated INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    cached_prompt_tokens INTEGER NOT NULL DEFAULT 0,          -- the provider's token details
    cache_creation_prompt_tokens INTEGER NOT NULL DEFAULT 0,  -- (token_cost.py; 0: none reported)
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (origin, local_id)
);
CREATE INDEX IF NOT EXISTS {TABLE}_node_ended ON {TABLE} (node, ended_at);
CREATE INDEX IF NOT EXISTS {TABLE}_ended ON {TABLE} (ended_at);
-- Each node's spend per UTC hour, kept with the rows: a budget check sums at most an hour
-- of rows plus one line per hour, not every request of a 30-day window.
CREATE TABLE IF NOT EXISTS {HOURS} (
    node TEXT NOT NULL,
    hour BIGINT NOT NULL,              -- floor(ended_at / 3600)
    cost_usd DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node, hour)
);
CREATE TABLE IF NOT EXISTS {RESERVATIONS} (
    id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    host TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS {RESERVATIONS}_node ON {RESERVATIONS} (node);
"""
_SCHEMA_LOCK = 0x65786F72  # pg_advisory_xact_lock key: hosts starting together create it once
# The table's columns as INSERTs see them (the search path's table, not a same-named one elsewhere).
_PRESENT = "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped"
# One batch: rows that were not there yet are inserted, and only those add to their hour
# (a row copied twice, even by two processes at once, is neither stored nor counted twice).
_INSERT = f"""
WITH gone AS (DELETE FROM {RESERVATIONS} WHERE id = ANY($20::text[])),
new AS (
    INSERT INTO {TABLE} (local_id, request_id, ended_at, day, node, alias, deployment, model, prompt_tokens,
                         completion_tokens, cost_usd, estimated, outcome, pid, {", ".join(DETAIL_COLUMNS)},
                         origin, host)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::int[], $10::int[], $11::float8[], $12::int[], $13::text[], $14::int[],
                         $15::int[], $16::int[], $17::int[], $18::text[], $19::text[])
    ON CONFLICT (origin, local_id) DO NOTHING
    RETURNING node, ended_at, cost_usd
)
INSERT INTO {HOURS} (node, hour, cost_usd)
SELECT node, floor(ended_at / 3600)::bigint, SUM(cost_usd) FROM new WHERE cost_usd IS NOT NULL GROUP BY 1, 2
ON CONFLICT (node, hour) DO UPDATE SET cost_usd = {HOURS}.cost_usd + excluded.cost_usd
"""  # noqa: S608
# $1 node, $2 the window's start, $3 its first whole hour, $4 this ledger, $5 its last row
# bookmarked as copied. This host's rows after the bookmark are counted from SQLite, so any
# of them already copied are taken out here.
_SPENT = f"""
SELECT COALESCE((SELECT SUM(cost_usd) FROM {HOURS} WHERE node = $1 AND hour >= $3), 0)
     + COALESCE((SELECT SUM(cost_usd) FROM {TABLE} WHERE node = $1 AND ended_at >= $2 AND ended_at < $3 * 3600.0), 0)
     - COALESCE((SELECT SUM(cost_usd) FROM {TABLE}
                 WHERE origin = $4 AND local_id > $5 AND node = $1 AND ended_at >= $2), 0)
"""  # noqa: S608
# Spend and live reservations in one statement, so in one snapshot: a charge copied (and its
# reservation deleted) meanwhile is counted exactly once. $6: now; expired reservations (of a
# host that died) are deleted on the way.
_SPENT_AND_HELD = f"""
WITH expired AS (DELETE FROM {RESERVATIONS} WHERE node = $1 AND expires_at < $6)
SELECT ({_SPENT}) + COALESCE((SELECT SUM(cost_usd) FROM {RESERVATIONS} WHERE node = $1 AND expires_at >= $6), 0)
"""  # noqa: S608


def check_database_url(url: str) -> str:
    """The ``--database`` URL, checked (see :func:`check_service_url`)."""
    return check_service_url(
        url,
        flag="--database",
        package="asyncpg",
        schemes=("postgresql", "postgres"),
        expected="postgresql://user@host:port/dbname",
    )


def _driver_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    # InternalClientError: a connection cut mid-operation (the server shutting down) can leave
    # the protocol in a state asyncpg reports this way.
    return (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


class SpendDatabase:
    """The shared spend table, fed from ``ledger``; budgets ask it for a node's spend."""

    def __init__(self, url: str, ledger: Ledger) -> None:
        self._url = url
        self.name = display_url(url)  # what logs say: never the password
        self.ledger = ledger
        self.origin = ledger.origin()
        self.host = socket.gethostname()
        self._pool: Any = None
        self._schema_ready = False
        self._outage = Outage(RETRY_AFTER_OUTAGE_S, self._outage_started, self._outage_ended)
        self._kick = asyncio.Event()
        self._next_pass: asyncio.Future[None] | None = None  # done when a pass begun after now ends
        self._shipper: asyncio.Task[None] | None = None
        self._reading: dict[tuple[str, float], asyncio.Future[float]] = {}  # node's spend being read
        self._releasing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Open the pool (no connection yet: the database may be down at start) and the copier."""
        import asyncpg

        self._pool = await asyncpg.create_pool(
            self._url, min_size=0, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT_S, command_timeout=QUERY_TIMEOUT_S
        )
        try:  # the table now, if the database answers (else at its first answer)
            async with asyncio.timeout(CONNECT_TIMEOUT_S * 4):
                async with self._pool.acquire() as connection:
                    await self._ensure_schema(connection)
        except _driver_errors() as exc:
            self._outage.failed(exc)
        self._next_pass = asyncio.get_running_loop().create_future()
        self._shipper = asyncio.create_task(self._ship_forever())

    async def close(self, grace_s: float = 2.0) -> None:
        """A last copy of what is waiting (bounded), then the pool."""
        if self._releasing:
            await asyncio.wait(list(self._releasing), timeout=grace_s)
        if self._shipper is not None:
            self._shipper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shipper
        if not self._outage.active:  # (during an outage the rows wait in the ledger for the next start)
            with contextlib.suppress(*_driver_errors()):
                async with asyncio.timeout(grace_s):
                    await self.ship_pending()
        if self._pool is not None:
            with contextlib.suppress(*_driver_errors()):
                async with asyncio.timeout(grace_s):
                    await self._pool.close()

    def kick(self) -> None:
        """A row was written to the ledger: copy it now rather than at the next poll."""
        self._kick.set()

    async def copied(self) -> None:
        """Copy the rows written so far, and wait (a bounded time) until they are: a node's
        next request, on any host, then counts this one's spend. During an outage nothing
        waits; the rows are copied when the database is back."""
        self.kick()
        if self._outage.active or self._next_pass is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(COPY_WAIT_S):
                await asyncio.shield(self._next_pass)

    def _outage_started(self, exc: BaseException) -> None:
        self._schema_ready = False  # the database may come back empty
        log.warning(
            "spend database %s unreachable (%s): nodes with a budget are refused (SPEND_DATABASE_UNAVAILABLE) "
            "until it is back; finished requests are kept in the local ledger and copied then",
            self.name,
            type(exc).__name__,
        )

    def _outage_ended(self) -> None:
        log.warning("spend database %s is back: budgets are checked again", self.name)

    async def _ensure_schema(self, connection: Any) -> None:
        if self._schema_ready:
            return
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await connection.execute(_SCHEMA)
            present = {row[0] for row in await connection.fetch(_PRESENT, TABLE)}
            missing = [column for column in DETAIL_COLUMNS if column not in present]
            if missing:  # a table an older sidecar created; ALTER only then (it locks the table)
                adds = ", ".join(f"ADD COLUMN IF NOT EXISTS {c} INTEGER NOT NULL DEFAULT 0" for c in missing)
                await connection.execute(f"ALTER TABLE {TABLE} {adds}")
                log.warning("spend database %s: added the columns %s", self.name, ", ".join(missing))
        self._schema_ready = True

    async def spent(self, node: str, since: float) -> float:
        """``node``'s spend since ``since`` on every host; RemoteError when it cannot be known.
        Checks of one node that arrive while its spend is being read share that read."""
        if not self._outage.usable():
            raise self._unavailable(node)
        shipped = self.ledger.shipped_upto(self.name)
        key = (node, since)
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._read_spent(node, since, shipped))
            reading.add_done_callback(lambda _: self._reading.pop(key, None))
        total = await asyncio.shield(reading)
        return total + self.ledger.spent(node, since, after_id=shipped)

    async def _read_spent(self, node: str, since: float, shipped: int) -> float:
        first_hour = math.ceil(since / 3600)
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_S):
                async with self._pool.acquire() as connection:
                    await self._ensure_schema(connection)
                    total = await connection.fetchval(_SPENT, node, since, first_hour, self.origin, shipped)
        except _driver_errors() as exc:
            self._outage.failed(exc)
            raise self._unavailable(node) from None
        self._outage.succeeded()
        return float(total)

    async def reserve(
        self, node: str, since: float, now: float, reservation_id: str, decide: Callable[[float], float], hold_s: float
    ) -> float:
        """Hold ``decide(spend since `since` + every live reservation)`` USD for ``node``, atomically
        across hosts (``decide`` raises to refuse); the amount held."""
        if not self._outage.usable():
            raise self._unavailable(node)
        shipped = self.ledger.shipped_upto(self.name)
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_S):
                async with self._pool.acquire() as connection:
                    await self._ensure_schema(connection)
                    async with connection.transaction():
                        await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"budget:{node}")
                        total = await connection.fetchval(
                            _SPENT_AND_HELD, node, since, math.ceil(since / 3600), self.origin, shipped, now
                        )
                        # (after the statement: a row of ours copied before it was written before it)
                        local = self.ledger.spent(node, since, after_id=shipped)
                        cost = decide(float(total) + local)
                        await connection.execute(
                            f"INSERT INTO {RESERVATIONS} VALUES ($1, $2, $3, $4, $5)",  # noqa: S608
                            reservation_id,
                            node,
                            cost,
                            now + hold_s,
                            self.host,
                        )
        except _driver_errors() as exc:
            self._outage.failed(exc)
            raise self._unavailable(node) from None
        self._outage.succeeded()
        return cost

    def release(self, reservation_id: str) -> None:
        """Give back a reservation whose request was not charged, without making anyone wait
        (if it cannot be deleted now, it expires)."""
        task = asyncio.get_running_loop().create_task(self._delete_reservation(reservation_id))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _delete_reservation(self, reservation_id: str) -> None:
        with contextlib.suppress(*_driver_errors()):
            async with asyncio.timeout(QUERY_TIMEOUT_S):
                await self._pool.execute(f"DELETE FROM {RESERVATIONS} WHERE id = $1", reservation_id)  # noqa: S608

    def _unavailable(self, node: str) -> RemoteError:
        return RemoteError(
            Reason.SPEND_DATABASE_UNAVAILABLE,
            f"node {node!r} has a budget and the spend database is unreachable, so it cannot be checked; "
            "try again shortly",
            retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
            metadata={"limit": "spend_database"},  # the limit-hit metric's label: not "budget"
        )

    async def ship_pending(self) -> int:
        """Copy every row not copied yet; the number copied. Raises the driver's error."""
        copied = 0
        while rows := await self.ledger.unshipped(self.name, SHIP_BATCH):
            *columns, reservations = [list(column) for column in zip(*rows, strict=True)]
            held = [r for r in reservations if r]  # their charges replace them, in one statement
            async with self._pool.acquire() as connection:
                await self._ensure_schema(connection)
                await connection.execute(_INSERT, *columns, [self.origin] * len(rows), [self.host] * len(rows), held)
            last = rows[-1][0]
            assert isinstance(last, int)
            await self.ledger.mark_shipped(self.name, last)
            copied += len(rows)
        return copied

    async def _ship_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHIP_POLL_S):
                    await self._kick.wait()
            self._kick.clear()
            waiting, self._next_pass = self._next_pass, asyncio.get_running_loop().create_future()
            try:
                copied = await self.ship_pending()
            except _driver_errors() as exc:
                self._outage.failed(exc)
                continue
            except Exception:  # e.g. the local ledger is busy: never let the copier die
                log.exception("copying spend rows to %s failed; retrying", self.name)
                continue
            finally:
                if waiting is not None and not waiting.done():
                    waiting.set_result(None)
            if copied and self._outage.active:
                log.warning("spend database %s: %d requests kept during the outage are written", self.name, copied)
            self._outage.succeeded()


async def fetch_usage(url: str, since: float, node: str | None) -> list[UsageRow]:
    """``exo-remote usage --database``: spend per node and model on every host."""
    import asyncpg

    query = (
        "SELECT node, alias, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),"  # noqa: S608
        f" COALESCE(SUM(cost_usd), 0), COUNT(*) FILTER (WHERE cost_usd IS NULL) FROM {TABLE} WHERE ended_at >= $1"
    )
    args: Sequence[object] = (since,)
    if node is not None:
        query += " AND node = $2"
        args = (since, node)
    query += " GROUP BY node, alias ORDER BY node, alias"
    connection = await asyncpg.connect(url, timeout=5.0)
    try:
        exists = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE)
        rows = await connection.fetch(query, *args) if exists else []
    finally:
        await connection.close()
    return [UsageRow(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), float(r[5]), int(r[6])) for r in rows]
