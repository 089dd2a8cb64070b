"""Spend in a real PostgreSQL (tests/support/servers.py), copied from each host's SQLite
ledger: idempotent copies, nothing lost across an outage and a restart during it, budgets
that fail closed, ``exo-remote usage --database``, the provider's token details carried
along, and a table an older sidecar created migrated in place."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from exo_remote_engine.cli.main import main, render_usage
from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.sidecar.config.loader import ModelEntry, NodeQuota
from exo_remote_engine.sidecar.control.budgets import Budgets
from exo_remote_engine.sidecar.ledger.spend import DB_NAME, Charge, Ledger
from exo_remote_engine.sidecar.ledger.spend_database import TABLE, SpendDatabase
from exo_remote_engine.sidecar.ledger.token_cost import TokenDetails
from tests.support.clock import FakeClock
from tests.support.configs import deployment
from tests.support.harness import chat_request, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import free_port
from tests.support.servers import PostgresServer
from tests.support.traffic import Sidecars

ENTRY = ModelEntry(
    alias="mini",
    litellm_model="gpt-4o-mini",
    provider="openai",
    input_cost_per_token=0.001,
    output_cost_per_token=0.002,
)
COST = 100 * 0.001 + 10 * 0.002


def charge(i: int, node: str, now: float) -> Charge:
    return Charge.of(
        request_id=f"r{i}",
        ended_at=now,
        node=node,
        entry=ENTRY,
        prompt_tokens=100,
        completion_tokens=10,
        estimated=False,
        outcome="completed",
    )


async def stored(url: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(f"SELECT * FROM {TABLE} ORDER BY origin, local_id"))  # noqa: S608
    finally:
        await connection.close()


async def test_rows_written_during_an_outage_survive_a_restart_and_are_copied_once(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = await asyncio.to_thread(postgres_server.create_database, "spend_copies")
    clock = FakeClock()
    quotas = {"b": NodeQuota(max_budget=100.0, budget_duration="1d")}
    ledger = Ledger.open(tmp_path)
    down = SpendDatabase(f"postgresql://exo@127.0.0.1:{free_port()}/nothing", ledger)  # nothing listens there
    await down.start()
    budgets = Budgets(quotas, ledger, clock, down)
    for i in range(5):
        await ledger.record(charge(i, "b", clock.now))
        await down.copied()
    with pytest.raises(RemoteError) as caught:
        await budgets.check("b")
    assert caught.value.reason is Reason.SPEND_DATABASE_UNAVAILABLE and caught.value.retryable
    await budgets.check("unbudgeted")  # nodes without a budget are not refused
    await down.close(grace_s=0.5)
    ledger.close()

    ledger = Ledger.open(tmp_path)  # the sidecar restarted; the database is reachable now
    database = SpendDatabase(url, ledger)
    await database.start()
    try:
        database.kick()
        for _ in range(50):
            if len(await stored(url)) == 5:
                break
            await asyncio.sleep(0.1)
        rows = await stored(url)
        assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(5)]
        assert {(r["host"], r["origin"], r["outcome"]) for r in rows} == {(database.host, ledger.origin(), "completed")}
        assert all(isinstance(r["pid"], int) for r in rows)
        # Copy again from the start (a crash between the insert and the bookmark): no double count.
        with sqlite3.connect(tmp_path / DB_NAME) as db:
            db.execute("DELETE FROM shipped")
        assert await database.ship_pending() == 5
        assert len(await stored(url)) == 5
        status = await Budgets(quotas, ledger, clock, database).status("b")
        assert status is not None and math.isclose(status.spent_usd, 5 * COST, rel_tol=1e-9)
    finally:
        await database.close()
        ledger.close()


async def test_budgets_and_usage_count_every_host(
    postgres_server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = await asyncio.to_thread(postgres_server.create_database, "spend_hosts")
    clock = FakeClock()
    quotas = {"b": NodeQuota(max_budget=3.5 * COST)}
    hosts = []
    for name in ("a", "b"):
        ledger = Ledger.open(tmp_path / name)
        database = SpendDatabase(url, ledger)
        await database.start()
        hosts.append((ledger, database, Budgets(quotas, ledger, clock, database)))
    try:
        for i in range(4):  # alternate hosts: 4 requests of 1 budget unit, 3.5 allowed in total
            ledger, database, budgets = hosts[i % 2]
            await budgets.check("b")
            await ledger.record(charge(i, "b", clock.now))
            await database.copied()
        for _, _, budgets in hosts:
            with pytest.raises(RemoteError) as caught:
                await budgets.check("b")
            assert caught.value.reason is Reason.BUDGET_EXCEEDED
    finally:
        for ledger, database, _ in hosts:
            await database.close()
            ledger.close()
    # The CLI runs its own event loop: call it from a thread, as from a shell.
    table = await asyncio.to_thread(render_usage, tmp_path / "a", None, None, database=url)
    assert "b     mini   4         400            40" in table and "postgresql://127.0.0.1:" in table, table
    assert await asyncio.to_thread(main, ["usage", "--database", url, "--node", "b"]) == 0
    assert "(total $0.480000 since the start; postgresql://127.0.0.1:" in capsys.readouterr().out
    unreachable = f"postgresql://exo:sekret-pg-pass-01@127.0.0.1:{free_port()}/x"
    assert await asyncio.to_thread(main, ["usage", "--database", unreachable]) == 1
    assert "sekret" not in capsys.readouterr().err


def test_a_ledger_from_before_the_shared_database_is_upgraded_in_place(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as db:  # the schema as it was: no pid, no origin
        db.execute(
            "CREATE TABLE requests (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, ended_at REAL NOT NULL,"
            " day TEXT NOT NULL, node TEXT NOT NULL, alias TEXT NOT NULL, deployment TEXT NOT NULL,"
            " model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,"
            " cost_usd REAL, estimated INTEGER NOT NULL, outcome TEXT NOT NULL)"
        )
        db.execute("INSERT INTO requests VALUES (1, 'old', 1.0, 'd', 'n', 'a', 'a', 'm', 1, 1, 0.5, 0, 'completed')")
    ledger = Ledger.open(tmp_path)
    try:
        origin = ledger.origin()
        assert len(origin) == 36 and ledger.spent("n", 0.0) == 0.5
        assert ledger.shipped_upto("anywhere") == 0
    finally:
        ledger.close()
    reopened = Ledger.open(tmp_path)
    try:
        assert reopened.origin() == origin, "a ledger keeps its identity"
    finally:
        reopened.close()


async def reservations(url: str, node: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch("SELECT * FROM exo_remote_reservations WHERE node = $1", node))
    finally:
        await connection.close()


async def test_reservations_hold_across_hosts_and_turn_into_their_charges(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Two hosts reserve for one node at once: together they never hold more than its
    budget; a reservation goes away in the statement that copies its charge, at release, or
    when it expires (a host that died)."""
    url = await asyncio.to_thread(postgres_server.create_database, "spend_reservations")
    clock = FakeClock()
    quotas = {"r": NodeQuota(max_budget=10 * COST)}
    hosts = []
    for name in ("a", "b"):
        ledger = Ledger.open(tmp_path / name)
        database = SpendDatabase(url, ledger)
        await database.start()
        hosts.append((ledger, database, Budgets(quotas, ledger, clock, database)))

    async def reserve(i: int) -> object:
        try:  # each: 100 prompt tokens ($0.10) and 30 output tokens ($0.06) of a $1.20 budget
            return await hosts[i % 2][2].reserve("r", 0.001, 0.002, 100, 30, 600)
        except RemoteError as exc:
            return exc

    try:
        results = await asyncio.gather(*(reserve(i) for i in range(16)))
        held = [r for r in results if not isinstance(r, RemoteError)]
        assert len(held) == 7, "7 x $0.16 fit in $1.20; the $0.08 left is less than a prompt"
        assert all(isinstance(r, RemoteError) and r.reason is Reason.BUDGET_EXCEEDED for r in results if r not in held)
        rows = await reservations(url, "r")
        assert len(rows) == 7 and sum(r["cost_usd"] for r in rows) <= 10 * COST
        # One request finishes on host a: its charge ($0.12) replaces its reservation ($0.16).
        first = held[0]
        ledger_a, database_a, budgets_a = hosts[0]
        finished = Charge.of(
            request_id="done",
            ended_at=clock.now,
            node="r",
            entry=ENTRY,
            prompt_tokens=100,
            completion_tokens=10,
            estimated=False,
            outcome="completed",
            reservation=first.id,
        )  # type: ignore[union-attr]
        await ledger_a.record(finished)
        await database_a.copied()
        assert first.id not in {r["id"] for r in await reservations(url, "r")}  # type: ignore[union-attr]
        # Another is given back uncharged (a provider error before the first delta).
        database_a.release(held[1].id)  # type: ignore[union-attr]
        for _ in range(50):
            if len(await reservations(url, "r")) == 5:
                break
            await asyncio.sleep(0.05)
        assert len(await reservations(url, "r")) == 5
        # $0.12 spent + 5 x $0.16 held: $0.28 left, room for one more and then one clamped.
        more = await budgets_a.reserve("r", 0.001, 0.002, 100, 30, 600)
        assert more is not None and more.output_tokens == 30
        clamped = await budgets_a.reserve("r", 0.001, 0.002, 100, 30, 600)
        assert clamped is not None and clamped.output_tokens in (9, 10), "$0.12 left: the prompt and 10 tokens"
        # A host that died with its reservations: they expire (the clock moves past them).
        clock.now += 601
        again = await budgets_a.reserve("r", 0.001, 0.002, 100, 30, 600)
        assert again is not None and again.output_tokens == 30
        assert len(await reservations(url, "r")) == 1, "expired reservations are gone"
    finally:
        for ledger, database, _ in hosts:
            await database.close()
            ledger.close()


async def test_cached_and_reasoning_tokens_of_a_request_reach_the_shared_database(
    postgres_server: PostgresServer, upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    """A provider's usage details go from its reply through the sidecar's ledger to PostgreSQL."""
    url = await asyncio.to_thread(postgres_server.create_database, "spend_details")
    upstream.scenarios["gpt-4o"] = Scenario(usage=(1000, 200), cached_tokens=800, reasoning_tokens=50)
    sidecar = await sidecars.start(
        "model_list:\n" + deployment("m", "gpt-4o", upstream.url), FakeClock(), database_url=url
    )
    client = sidecar_client(sidecar.address)
    try:
        events = [e async for e in client.generate(chat_request("m"))]
    finally:
        await client.close()
    assert events[-1].finished.usage.cached_prompt_tokens == 800
    database, ledger = sidecar.servicer.accounting.database, sidecar.servicer.accounting.ledger
    assert database is not None and ledger is not None
    await database.ship_pending()  # whatever the copier has not copied yet: every row is there after it
    rows = await stored(url)
    details = [
        (r["prompt_tokens"], r["cached_prompt_tokens"], r["cache_creation_prompt_tokens"], r["reasoning_tokens"])
        for r in rows
    ]
    assert details == [(1000, 800, 0, 50)]
    with sqlite3.connect(ledger.path) as db:
        (local_cost,) = db.execute("SELECT cost_usd FROM requests").fetchone()
    assert rows[0]["cost_usd"] == local_cost and local_cost is not None, "the cost the ledger priced"


# The shared table as sidecars before the token-detail columns created it.
OLD_TABLE = f"""
CREATE TABLE {TABLE} (
    origin TEXT NOT NULL, local_id BIGINT NOT NULL, host TEXT NOT NULL, pid INTEGER, request_id TEXT NOT NULL,
    ended_at DOUBLE PRECISION NOT NULL, day TEXT NOT NULL, node TEXT NOT NULL, alias TEXT NOT NULL,
    deployment TEXT NOT NULL, model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cost_usd DOUBLE PRECISION, estimated INTEGER NOT NULL, outcome TEXT NOT NULL, PRIMARY KEY (origin, local_id)
)
"""


async def test_a_shared_table_from_an_older_sidecar_is_migrated_by_hosts_starting_together(
    postgres_server: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The token-detail columns are added once, whichever of three hosts gets there first;
    the older sidecar's rows stay (with 0 details) and every host's copy then succeeds."""
    caplog.set_level(logging.WARNING, "exo_remote_engine.sidecar")
    url = await asyncio.to_thread(postgres_server.create_database, "spend_old_schema")
    clock = FakeClock()
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(OLD_TABLE)
        await connection.execute(
            f"INSERT INTO {TABLE} VALUES ('an-older-ledger', 1, 'old-host', 7, 'old', $1, 'd', 'b', 'mini', 'mini',"  # noqa: S608
            " 'gpt-4o-mini', 100, 10, $2, 0, 'completed')",
            clock.now,
            COST,
        )
    finally:
        await connection.close()
    hosts = []
    for i in range(3):  # each host's row: its own, distinct details (a swapped column would show)
        ledger = Ledger.open(tmp_path / str(i))
        details = TokenDetails(cached_prompt_tokens=30 + i, cache_creation_prompt_tokens=20 + i, reasoning_tokens=5 + i)
        await ledger.record(dataclasses.replace(charge(i, "b", clock.now), details=details))
        hosts.append((ledger, SpendDatabase(url, ledger)))
    await asyncio.gather(*(database.start() for _, database in hosts))  # three hosts start at once
    try:
        assert [r.getMessage() for r in caplog.records if "added the columns" in r.getMessage()] == [
            f"spend database {hosts[0][1].name}: added the columns cached_prompt_tokens, cache_creation_prompt_tokens,"
            " reasoning_tokens"
        ], "one host migrates; the others, waiting on the schema lock, find the columns there"
        assert not [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()], "no start failed"
        await asyncio.gather(*(database.ship_pending() for _, database in hosts))
        rows = {r["request_id"]: r for r in await stored(url)}
        assert set(rows) == {"old", "r0", "r1", "r2"}, "the older sidecar's row is kept"
        for request_id, expected in (("old", (0, 0, 0)), *((f"r{i}", (30 + i, 20 + i, 5 + i)) for i in range(3))):
            row = rows[request_id]
            got = (row["cached_prompt_tokens"], row["cache_creation_prompt_tokens"], row["reasoning_tokens"])
            assert got == expected, request_id
        assert rows["old"]["cost_usd"] == COST and rows["old"]["host"] == "old-host"
    finally:
        for ledger, database in hosts:
            await database.close()
            ledger.close()
    table = await asyncio.to_thread(render_usage, tmp_path / "0", None, None, database=url)
    assert "b     mini   4         400            40" in table, table
