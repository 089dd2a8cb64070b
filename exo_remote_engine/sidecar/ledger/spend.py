"""What each request cost, and the SQLite ledger that keeps it.

Prices are LiteLLM's bundled cost map (``litellm.model_cost``, read offline), looked up by
the deployment's ``model_info.base_model`` or its ``litellm_params.model``; a deployment's
own ``input_cost_per_token``/``output_cost_per_token`` override it. A model the map does
not know and the config does not price has an unknown cost: recorded as NULL, never 0, so
a sum never pretends a request was free. Tokens are the provider's usage; when a stream
ends without it (cancelled, cut at its reservation, or a server that never reports usage)
they are estimated (:mod:`~exo_remote_engine.sidecar.ledger.token_estimates`: never fewer
than a token per non-ASCII character) and the row is marked ``estimated``.

The ledger is one SQLite file in WAL mode with ``synchronous=NORMAL``: each finished
request is one committed transaction, which survives SIGKILL of the sidecar (the WAL is
written before the commit returns; only a power loss can drop the last commits). A row is
committed on the event loop when the file is free at once (an insert into the WAL costs
tens of microseconds; the hop to a thread and back cost several times that per request),
through a connection that never waits for a lock and never checkpoints; when another
connection or process holds the write lock, the row goes to one dedicated writer thread,
which also does the checkpoints, so the loop never waits on a lock or a checkpoint.
Rows commit in the order they were recorded: while the thread holds one, later rows queue
behind it (a lost hedge's row is durable before the reply it lost to is reported finished).

With ``--database`` (several sidecar hosts sharing spend in PostgreSQL) this file stays the
first, durable home of every row: :mod:`~exo_remote_engine.sidecar.ledger.spend_database` copies
rows to the database from here, and the ``shipped`` table remembers how far it got, so a
database outage, or a sidecar restarted during one, loses nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import os
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.config.variables import Environment
from exo_remote_engine.sidecar.ledger.state_files import secure_state
from exo_remote_engine.sidecar.ledger.token_cost import NO_DETAILS, TokenDetails, detailed_cost

DB_NAME = "spend.sqlite3"
CHECKPOINT_EVERY = 500  # rows committed on the event loop between checkpoints (thread)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    ended_at REAL NOT NULL,            -- unix seconds
    day TEXT NOT NULL,                 -- UTC date of ended_at
    node TEXT NOT NULL,
    alias TEXT NOT NULL,
    deployment TEXT NOT NULL,
    model TEXT NOT NULL,               -- litellm_params.model of the deployment
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL,                     -- NULL: no known price
    estimated INTEGER NOT NULL,        -- 1: tokens estimated, the provider reported none
    outcome TEXT NOT NULL,             -- completed, cut (at its reservation), cancelled, failed, abandoned
    pid INTEGER,                       -- the sidecar process that wrote it
    reservation TEXT                   -- the budget reservation this charge replaces (shared budgets)
);
CREATE INDEX IF NOT EXISTS requests_node_ended ON requests (node, ended_at);
CREATE INDEX IF NOT EXISTS requests_ended ON requests (ended_at);
CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shipped (target TEXT PRIMARY KEY, last_id INTEGER NOT NULL);
"""
DETAIL_COLUMNS = ("cached_prompt_tokens", "cache_creation_prompt_tokens", "reasoning_tokens")
_COLUMNS = (  # what the copy to a shared database reads (spend_database._INSERT), the reservation last
    "id, request_id, ended_at, day, node, alias, deployment, model, prompt_tokens, completion_tokens, cost_usd,"
    f" estimated, outcome, pid, {', '.join(DETAIL_COLUMNS)}, reservation"
)


def default_state_dir() -> Path:
    """``$EXO_REMOTE_STATE_DIR``, else ``$XDG_DATA_HOME/exo-remote-engine``
    (``~/.local/share/exo-remote-engine``)."""
    state_dir = Environment().get("EXO_REMOTE_STATE_DIR")
    if state_dir:
        return Path(state_dir)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "exo-remote-engine"


@functools.lru_cache(maxsize=1024)
def _map_prices(model: str, provider: str) -> tuple[float | None, float | None]:
    import litellm

    candidates = [model]
    prefix, sep, rest = model.partition("/")
    if sep and prefix == provider:
        candidates.append(rest)
    for key in candidates:
        info = litellm.model_cost.get(key)
        if not isinstance(info, dict):
            continue
        if key is not model and info.get("litellm_provider") not in (provider, None):
            continue
        price_in, price_out = info.get("input_cost_per_token"), info.get("output_cost_per_token")
        if isinstance(price_in, int | float) and isinstance(price_out, int | float):
            return float(price_in), float(price_out)
    return None, None


@functools.lru_cache(maxsize=1024)
def _map_max_output(model: str) -> int | None:
    import litellm

    info = litellm.model_cost.get(model)
    value = info.get("max_output_tokens", info.get("max_tokens")) if isinstance(info, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def max_output_tokens(entry: ModelEntry) -> int | None:
    """The most ``entry`` can write in one reply (its ``model_info``, else LiteLLM's map)."""
    if entry.max_output_tokens is not None:
        return entry.max_output_tokens
    model = entry.base_model or entry.litellm_model
    found = _map_max_output(model)
    prefix, sep, rest = model.partition("/")
    return found if found is not None or not sep or prefix != entry.provider else _map_max_output(rest)


def prices(entry: ModelEntry) -> tuple[float | None, float | None]:
    """USD per prompt token and per completion token for ``entry`` (None: unknown)."""
    found_in, found_out = _map_prices(entry.base_model or entry.litellm_model, entry.provider)
    price_in = entry.input_cost_per_token if entry.input_cost_per_token is not None else found_in
    price_out = entry.output_cost_per_token if entry.output_cost_per_token is not None else found_out
    return price_in, price_out


def cost_usd(
    entry: ModelEntry, prompt_tokens: int, completion_tokens: int, details: TokenDetails = NO_DETAILS
) -> float | None:
    """USD for the tokens; cache and reasoning details priced by LiteLLM's rule (token_cost.py)."""
    price_in, price_out = prices(entry)
    if price_in is None or price_out is None:
        return None
    if details:
        return detailed_cost(entry, price_in, price_out, prompt_tokens, completion_tokens, details)
    return prompt_tokens * price_in + completion_tokens * price_out


@dataclass(frozen=True)
class Charge:
    """One request's line in the ledger."""

    request_id: str
    ended_at: float
    node: str
    alias: str
    deployment: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    estimated: bool
    outcome: str
    details: TokenDetails = NO_DETAILS
    reservation: str | None = None  # a shared reservation, deleted when this row is copied

    @classmethod
    def of(
        cls,
        *,
        request_id: str,
        ended_at: float,
        node: str,
        entry: ModelEntry,
        prompt_tokens: int,
        completion_tokens: int,
        estimated: bool,
        outcome: str,
        details: TokenDetails = NO_DETAILS,
        reservation: str | None = None,
    ) -> Charge:
        return cls(
            request_id,
            ended_at,
            node,
            entry.alias,
            entry.deployment_name,
            entry.litellm_model,
            prompt_tokens,
            completion_tokens,
            cost_usd(entry, prompt_tokens, completion_tokens, details),
            estimated,
            outcome,
            details,
            reservation,
        )


@dataclass(frozen=True)
class UsageRow:
    node: str
    alias: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    unpriced_requests: int  # requests whose price is unknown (not in cost_usd)


class Ledger:
    """The spend database. Open it with :meth:`open`; every method but the ``async`` ones
    blocks (use them at startup or from the CLI)."""

    def __init__(self, path: Path, connection: sqlite3.Connection, readonly: bool = False) -> None:
        self.path = path
        self._db = connection  # the writer thread's
        self._reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._reader.execute("PRAGMA busy_timeout=5000")
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spend-ledger")
        # The event loop's own connection: SQLITE_BUSY at once rather than a wait, and no
        # automatic checkpoint (the writer thread runs them: CHECKPOINT_EVERY rows).
        self._inline: sqlite3.Connection | None = None
        if not readonly:
            self._inline = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._inline.execute("PRAGMA busy_timeout=0")
            self._inline.execute("PRAGMA synchronous=NORMAL")
            self._inline.execute("PRAGMA wal_autocheckpoint=0")
        self._inline_rows = 0
        self._queued = 0  # rows handed to the writer thread and not yet committed
        self._queued_lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path, readonly: bool = False) -> Ledger:
        path = state_dir / DB_NAME
        if readonly:
            if not path.exists():
                raise FileNotFoundError(f"no spend database at {path}")
            connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            secure_state(state_dir, DB_NAME)  # 0700 / 0600, never another user's
            connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
            columns = {row[1] for row in connection.execute("PRAGMA table_info(requests)")}
            for column, kind in (("pid", "INTEGER"), ("reservation", "TEXT")):
                if column not in columns:  # a ledger written before the column existed
                    connection.execute(f"ALTER TABLE requests ADD COLUMN {column} {kind}")
            for column in DETAIL_COLUMNS:  # the provider's token details (token_cost.py)
                if column not in columns:
                    connection.execute(f"ALTER TABLE requests ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
            # Who this ledger is, once and for good: rows copied to a shared database are
            # keyed by it and their id here, so copying one twice never counts it twice.
            connection.execute("INSERT OR IGNORE INTO ledger_meta VALUES ('origin', ?)", (str(uuid.uuid4()),))
        connection.execute("PRAGMA busy_timeout=5000")  # several worker processes share it
        return cls(path, connection, readonly)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._inline is not None:
            self._inline.close()
        self._db.close()
        self._reader.close()

    def _insert(self, charge: Charge, connection: sqlite3.Connection | None = None) -> None:
        day = dt.datetime.fromtimestamp(charge.ended_at, dt.UTC).date().isoformat()
        (connection or self._db).execute(
            "INSERT INTO requests (request_id, ended_at, day, node, alias, deployment, model, prompt_tokens,"
            " completion_tokens, cost_usd, estimated, outcome, pid, reservation, cached_prompt_tokens,"
            " cache_creation_prompt_tokens, reasoning_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                charge.request_id,
                charge.ended_at,
                day,
                charge.node,
                charge.alias,
                charge.deployment,
                charge.model,
                charge.prompt_tokens,
                charge.completion_tokens,
                charge.cost_usd,
                int(charge.estimated),
                charge.outcome,
                os.getpid(),
                charge.reservation,
                charge.details.cached_prompt_tokens,
                charge.details.cache_creation_prompt_tokens,
                charge.details.reasoning_tokens,
            ),
        )  # autocommit: one transaction per request

    async def record(self, charge: Charge) -> None:
        """Commit ``charge``; returns once it is durable, and every row recorded before it
        too (module doc: inline when the file is free, else on the writer thread)."""
        if not self._commit_inline(charge):
            await asyncio.wrap_future(self._queue(charge))

    def record_soon(self, charge: Charge) -> None:
        """Commit ``charge`` without waiting (for a call that is being cancelled); a row
        recorded after it is never durable before it."""
        if not self._commit_inline(charge):
            self._queue(charge)

    def _commit_inline(self, charge: Charge) -> bool:
        """Commit on the event loop if the writer thread has no row waiting (rows commit in
        the order they were recorded: an abandoned attempt's before the reply's) and the
        file is free at once; False: the writer thread must take it."""
        if self._inline is None or self._queued:
            return False
        try:
            self._insert(charge, self._inline)
        except sqlite3.OperationalError:  # locked by another writer: the thread waits for it
            return False
        self._inline_rows += 1
        if self._inline_rows % CHECKPOINT_EVERY == 0:
            self._writer.submit(self._checkpoint)
        return True

    def _queue(self, charge: Charge) -> concurrent.futures.Future[None]:
        with self._queued_lock:
            self._queued += 1
        return self._writer.submit(self._insert_queued, charge)

    def _insert_queued(self, charge: Charge) -> None:
        try:
            self._insert(charge)
        finally:
            with self._queued_lock:
                self._queued -= 1

    def _checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass  # the next one, or another connection's automatic checkpoint, does it

    def spent(self, node: str, since: float, after_id: int = 0) -> float:
        """``node``'s spend since ``since`` (in rows after ``after_id``: not yet shipped)."""
        row = self._reader.execute(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM requests WHERE node = ? AND ended_at >= ? AND id > ?",
            (node, since, after_id),
        ).fetchone()
        return float(row[0])

    # For the copy to a shared database (spend_database.py).

    def origin(self) -> str:
        """This ledger's identity (a UUID made when it was created)."""
        row = self._reader.execute("SELECT value FROM ledger_meta WHERE key = 'origin'").fetchone()
        return str(row[0])

    def shipped_upto(self, target: str) -> int:
        """The last row id copied to ``target`` (0: none)."""
        return _shipped_upto(self._reader, target)

    def _unshipped(self, target: str, limit: int) -> list[tuple[object, ...]]:
        last = _shipped_upto(self._db, target)  # the writer's own connection, on its thread
        query = f"SELECT {_COLUMNS} FROM requests WHERE id > ? ORDER BY id LIMIT ?"  # noqa: S608 (constant columns)
        return [tuple(row) for row in self._db.execute(query, (last, limit))]

    async def unshipped(self, target: str, limit: int = 500) -> list[tuple[object, ...]]:
        """Rows not yet copied to ``target``, oldest first (columns: ``_COLUMNS``)."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._unshipped, target, limit)

    def _mark_shipped(self, target: str, last_id: int) -> None:
        self._db.execute(
            "INSERT INTO shipped VALUES (?, ?)"
            " ON CONFLICT (target) DO UPDATE SET last_id = MAX(last_id, excluded.last_id)",
            (target, last_id),
        )

    async def mark_shipped(self, target: str, last_id: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self._mark_shipped, target, last_id)

    def usage(self, since: float, node: str | None = None) -> list[UsageRow]:
        query = (
            "SELECT node, alias, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),"
            " COALESCE(SUM(cost_usd), 0), SUM(cost_usd IS NULL) FROM requests WHERE ended_at >= ?"
        )
        args: tuple[object, ...] = (since,)
        if node is not None:
            query += " AND node = ?"
            args = (since, node)
        query += " GROUP BY node, alias ORDER BY node, alias"
        return [UsageRow(*row) for row in self._reader.execute(query, args)]

    def request_ids(self) -> set[str]:
        return {row[0] for row in self._reader.execute("SELECT request_id FROM requests")}


def _shipped_upto(connection: sqlite3.Connection, target: str) -> int:
    row = connection.execute("SELECT last_id FROM shipped WHERE target = ?", (target,)).fetchone()
    return int(row[0]) if row else 0
