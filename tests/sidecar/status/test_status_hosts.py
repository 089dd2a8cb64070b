"""Several sidecars sharing one Redis and one PostgreSQL (real servers): each one's status
page lists every sidecar that wrote spend, shows a node's spend and budget over all of them
(the shared database) and its rpm use over all of them (Redis), and says nothing waits to
be copied."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from tests.support.harness import sidecar_client
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.processes import free_port
from tests.support.servers import PostgresServer, RedisServer
from tests.support.status_scene import COST, TOKENS, start_scene
from tests.support.traffic import FakeClock, Sidecars, complete

WAIT_S = 15.0


async def status_json(port: int) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/status.json") as response:
            assert response.status == 200
            return json.loads(await response.text())


async def test_every_sidecar_is_listed_and_figures_are_shared(
    sidecars: Sidecars,
    upstream: OpenAIUpstream,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    database = await asyncio.to_thread(postgres_server.create_database, "status_hosts")
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/9"  # a database of this test's own
    await asyncio.to_thread(redis.Redis.from_url(redis_url).flushdb)
    clock = FakeClock(time.time())
    shared: dict[str, Any] = {"redis_url": redis_url, "database_url": database, "metrics_listen": "127.0.0.1:0"}
    first, _ = await start_scene(sidecars, upstream, clock, state_dir=tmp_path / "one", **shared)
    second, _ = await start_scene(sidecars, upstream, clock, state_dir=tmp_path / "two", **shared)
    for sidecar, count in ((first, 2), (second, 3)):
        client = sidecar_client(sidecar.address, token=TOKENS["node-a"])
        for _ in range(count):
            await complete(client, "cheap")

    origins = {s.servicer.accounting.database.origin[:8] for s in (first, second)}  # type: ignore[union-attr]
    deadline = time.monotonic() + WAIT_S
    while True:  # budgeted rows are copied before Finished; the listing waits for nothing else
        data = await status_json(first.metrics_port)  # type: ignore[arg-type]
        if len(data["hosts"]) == 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    hosts = {h["ledger"]: h for h in data["hosts"]}
    assert set(hosts) == origins, data["hosts"]
    mine = first.servicer.accounting.database.origin[:8]  # type: ignore[union-attr]
    assert hosts[mine]["this_sidecar"] and hosts[mine]["requests"] == 2
    other = (origins - {mine}).pop()
    assert not hosts[other]["this_sidecar"] and hosts[other]["requests"] == 3
    node = {n["node"]: n for n in data["nodes"]}["node-a"]
    assert node["spend_today_usd"] == pytest.approx(5 * COST, rel=1e-9)  # both sidecars' requests
    assert node["budget_spent_usd"] == pytest.approx(5 * COST, rel=1e-9)
    assert node["rpm"] == {"used": 5, "limit": 50}  # counted in Redis by both
    assert data["spend_copy_pending_rows"] == 0 and data["spend_copy_lag_s"] == 0
    # The database as logs name it: never its user or password.
    assert data["spend_source"].endswith("/status_hosts") and "@" not in data["spend_source"]

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{first.metrics_port}/") as response:
            html = await response.text()
    assert 'id="hosts"' in html and f'data-ledger="{other}"' in html


async def test_an_unreachable_database_shows_unknown_not_zero(sidecars: Sidecars, upstream: OpenAIUpstream) -> None:
    nowhere = f"postgresql://exo@127.0.0.1:{free_port()}/gone"  # nothing listens there
    sidecar, _ = await start_scene(sidecars, upstream, database_url=nowhere, metrics_listen="127.0.0.1:0")
    await complete(sidecar_client(sidecar.address, token=TOKENS["node-b"]), "cheap")  # no budget: served
    data = await status_json(sidecar.metrics_port)  # type: ignore[arg-type]
    node_a = {n["node"]: n for n in data["nodes"]}["node-a"]
    assert node_a["spend_today_usd"] is None and node_a["budget_spent_usd"] is None
    assert "spend database is unreachable" in node_a["budget_error"]
    assert any("spend database is unreachable" in note for note in data["notes"])
    assert data["spend_copy_pending_rows"] == 1 and data["spend_copy_lag_s"] >= 0  # node-b's row waits
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{sidecar.metrics_port}/metrics") as response:
            metrics = await response.text()
    # Unknown now: the series is absent, not a stale or zero value an alert would read.
    assert 'exo_remote_node_budget_spent_usd{node="node-a"}' not in metrics
    assert 'exo_remote_node_budget_usd{node="node-a"} 1.0' in metrics
    assert "exo_remote_spend_copy_pending_rows 1.0" in metrics
