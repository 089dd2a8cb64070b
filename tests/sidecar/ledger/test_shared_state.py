"""Limits and budgets that hold across several sidecar hosts: node rpm/tpm counted in a
real Redis, spend in a real PostgreSQL, both started by the suite (tests/support/servers.py).

Three sidecar processes on 127.0.0.2, .3 and .4 share one --redis and one --database and
the same config; each test calls every host directly, in turn. Outages are real: the test
stops PostgreSQL (``pg_ctl stop -m fast``) or Redis mid-load and starts it again.
Minute windows are the hosts' own clock (this machine's): a burst may cross a window's end
on a loaded box, so rpm checks hold in whichever windows the calls landed in, read from
Redis (tests/support/minutes.py); counts Redis cannot show (a host's own windows during an
outage) come from a burst run again in a fresh window when one crossed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import litellm
import pytest
import redis

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.sidecar.control.shared_windows import minute_key
from tests.support.configs import KEY_ENV, deployment
from tests.support.harness import chat_request, sidecar_client
from tests.support.minutes import (
    assert_shared_limit,
    forget_shared_counts,
    in_one_window,
    shared_counts,
    windows_of,
)
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import SidecarProcess, start_sidecar_process
from tests.support.servers import PostgresServer, RedisServer
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(150)

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
# (A token must not contain its node's name: the name would then be redacted as a fragment.)
TOKENS = {
    node: f"tok-{i:02d}-0123456789abcdef"
    for i, node in enumerate(("capped", "budgeted", "metered", "free", "fallback", "workers", "routed", "steady"))
}
RPM = 20
FALLBACK_RPM = 5
DEPLOYMENT_RPM = 9
PROMPT, COMPLETION = 1000, 10
_ids = itertools.count()


def per_request_usd() -> float:
    info = litellm.model_cost["gpt-4o-mini"]
    return PROMPT * info["input_cost_per_token"] + COMPLETION * info["output_cost_per_token"]


BUDGET = 10.5 * per_request_usd()  # the 11th request crosses it


def write_config(path: Path, upstream_url: str) -> Path:
    text = "model_list:\n" + deployment("mini", "gpt-4o-mini", upstream_url)
    text += deployment("limited", "gpt-4o-mini", upstream_url, rpm=DEPLOYMENT_RPM)
    text += "exo_remote_settings:\n  nodes:\n"
    text += f"    capped: {{rpm: {RPM}}}\n"
    text += f"    budgeted: {{max_budget: {BUDGET!r}, budget_duration: 1d}}\n"
    text += "    metered: {max_budget: 1000, budget_duration: 1d}\n"
    text += f"    fallback: {{rpm: {FALLBACK_RPM}}}\n"
    text += "    steady: {rpm: 100000, tpm: 100000000}\n"
    text += "    workers: {rpm: 6, max_budget: 1000}\n"
    path.write_text(text)
    return path


def write_tokens(path: Path) -> Path:
    path.write_text("".join(f"{node} {token}\n" for node, token in TOKENS.items()))
    path.chmod(0o600)
    return path


@dataclass
class Cluster:
    hosts: list[SidecarProcess]
    addresses: list[str]
    database_url: str
    postgres: PostgresServer
    redis: RedisServer
    upstream: OpenAIUpstream
    clients: list[SidecarClient] = field(default_factory=list)

    def client(self, host: int, node: str) -> SidecarClient:
        client = sidecar_client(self.addresses[host], token=TOKENS[node])
        self.clients.append(client)
        return client

    def clients_of(self, node: str) -> list[SidecarClient]:
        return [self.client(i, node) for i in range(len(self.hosts))]

    async def close_clients(self) -> None:
        for client in self.clients:
            await client.close()
        self.clients.clear()

    def logs(self) -> list[str]:
        return [host.log.read_text(errors="replace") for host in self.hosts]


def _start_hosts(
    tmp: Path, config: Path, tokens: Path, redis_url: str, database_url: str, addresses: tuple[str, ...]
) -> list[SidecarProcess]:
    """The hosts, started side by side (each start imports LiteLLM: seconds)."""
    env = {KEY_ENV: "sk-upstream-test-key-000000", "EXO_REMOTE_DISCOVER": "0"}

    def start(i: int) -> SidecarProcess:
        args = [
            "--token-file",
            str(tokens),
            "--state-dir",
            str(tmp / f"state-{i}"),
            "--redis",
            redis_url,
            "--database",
            database_url,
        ]
        return start_sidecar_process(config, tmp / f"host-{i}.log", env, f"{addresses[i]}:0", args)

    with concurrent.futures.ThreadPoolExecutor(len(addresses)) as pool:
        futures = [pool.submit(start, i) for i in range(len(addresses))]
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < len(addresses):
        for host in started:
            host.stop()
        raise next(f.exception() for f in futures if f.exception() is not None)  # type: ignore[misc]
    return started


@pytest.fixture(scope="module")
def cluster(
    postgres_server: PostgresServer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("shared-hosts")
    database_url = postgres_server.create_database("shared_hosts")
    redis_server.flush()
    scenario = Scenario(chunks=["ok ", "fine"], usage=(PROMPT, COMPLETION))
    with OpenAIUpstream.in_thread({"gpt-4o-mini": scenario}, default=scenario) as upstream:
        config = write_config(tmp / "config.yaml", upstream.url)
        tokens = write_tokens(tmp / "tokens")
        hosts = _start_hosts(tmp, config, tokens, redis_server.url, database_url, HOSTS)
        try:
            yield Cluster(
                hosts,
                [f"{h}:{p.port}" for h, p in zip(HOSTS, hosts, strict=True)],
                database_url,
                postgres_server,
                redis_server,
                upstream,
            )
        finally:
            for host in hosts:
                host.stop()


@dataclass
class Call:
    node: str
    host: int
    request_id: str
    started: float
    ended: float = 0.0
    error: RemoteError | None = None
    finished: bool = False


async def call(client: SidecarClient, node: str, host: int, model: str = "mini") -> Call:
    record = Call(node, host, f"{node}-{host}-{next(_ids)}-{os.getpid()}", time.time())
    try:
        events = [e async for e in client.generate(chat_request(model, "hi", request_id=record.request_id))]
        record.finished = bool(events) and events[-1].HasField("finished")
    except RemoteError as exc:
        record.error = exc
    record.ended = time.time()
    return record


async def database_rows(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


def test_the_three_hosts_listen_on_their_own_addresses(cluster: Cluster) -> None:
    assert [a.rsplit(":", 1)[0] for a in cluster.addresses] == list(HOSTS)
    assert all(h.process.poll() is None for h in cluster.hosts)


async def test_a_node_rpm_holds_across_three_hosts(cluster: Cluster) -> None:
    clients = cluster.clients_of("capped")
    # Half the limit through the first host, then the rest of a 3x burst through the other
    # two: whichever window each wave lands in, the others can only take what is left of
    # it, and more than one host admits. (One burst over all three let the host whose
    # session message arrived first take the whole minute: fair, but not what is shown.)
    first = RPM // 2
    try:
        calls = list(await asyncio.gather(*(call(clients[0], "capped", 0) for _ in range(first))))
        rest = [1 + i % 2 for i in range(3 * RPM - first)]
        calls += await asyncio.gather(*(call(clients[h], "capped", h) for h in rest))
    finally:
        await cluster.close_clients()
    admitted = [c for c in calls if c.error is None]
    refused = [c for c in calls if c.error is not None]
    counts = shared_counts(cluster.redis.url, "node:capped", windows_of(calls))
    # In one window (the usual case) exactly RPM are admitted over the three hosts.
    assert_shared_limit(calls, counts, RPM)
    assert all(c.finished for c in admitted)
    assert {c.error.reason for c in refused if c.error} <= {Reason.RATE_LIMITED}
    assert all(c.error is not None and 0 < (c.error.retry_after_s or 0) <= 60 for c in refused)
    assert len({c.host for c in admitted}) >= 2, "more than one host admitted requests"
    shared = redis.Redis.from_url(cluster.redis.url)
    try:
        ttls = [shared.ttl(minute_key("node:capped", w, "requests")) for w, n in counts.items() if n]
        assert ttls and all(0 < t <= 120 for t in ttls), ttls
    finally:
        shared.close()


async def test_a_deployment_rpm_holds_across_three_hosts(cluster: Cluster) -> None:
    clients = cluster.clients_of("routed")
    try:
        calls = await asyncio.gather(
            *(call(clients[i % 3], "routed", i % 3, "limited") for i in range(3 * DEPLOYMENT_RPM))
        )
    finally:
        await cluster.close_clients()
    counts = shared_counts(cluster.redis.url, "deployment:limited", windows_of(calls))
    assert_shared_limit(calls, counts, DEPLOYMENT_RPM)  # in one window: exactly DEPLOYMENT_RPM admitted
    errors = [c.error for c in calls if c.error is not None]
    assert {e.reason for e in errors} <= {Reason.RATE_LIMITED}
    assert all("at its rpm/tpm limit this minute" in e.message for e in errors), errors[0]


async def test_a_node_budget_holds_across_three_hosts(cluster: Cluster) -> None:
    clients = cluster.clients_of("budgeted")
    done: list[Call] = []

    async def spend_on(host: int) -> None:
        for _ in range(30):  # sequential per host; three hosts at once
            result = await call(clients[host], "budgeted", host)
            done.append(result)
            if result.error is not None:
                return

    try:
        await asyncio.gather(*(spend_on(h) for h in range(3)))
        # Once over, every host refuses (the budget is read from the shared database).
        after = [await call(clients[h], "budgeted", h) for h in range(3)]
    finally:
        await cluster.close_clients()
    completed = [c for c in done if c.finished]
    errors = [c.error for c in done if c.error is not None]
    # 11 requests reach the budget; each host may have one more in flight when it is crossed.
    assert 11 <= len(completed) <= 11 + 3 + 1, f"{len(completed)} completed for a budget of 10.5 requests"
    assert {e.reason for e in errors} == {Reason.BUDGET_EXCEEDED}, errors
    assert all(c.error is not None and c.error.reason is Reason.BUDGET_EXCEEDED for c in after), after
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = await database_rows(
            cluster.database_url,
            "SELECT request_id, cost_usd, host FROM exo_remote_requests WHERE node = $1",
            "budgeted",
        )
        if len(rows) >= len(completed):
            break
        await asyncio.sleep(0.2)
    assert {r["request_id"] for r in rows} == {c.request_id for c in completed}
    spent = sum(r["cost_usd"] for r in rows)
    assert math.isclose(spent, len(completed) * per_request_usd(), rel_tol=1e-9)
    assert spent >= BUDGET


@pytest.mark.timeout(180)
async def test_postgres_stopped_mid_load_fails_budgets_closed_and_loses_nothing(cluster: Cluster) -> None:
    metered, free = cluster.clients_of("metered"), cluster.clients_of("free")
    calls: list[Call] = []
    stop = asyncio.Event()

    async def load(client: SidecarClient, node: str, host: int) -> None:
        while not stop.is_set():
            calls.append(await call(client, node, host))
            await asyncio.sleep(0.05)

    loaders = [
        asyncio.create_task(load(c, n, h)) for n, cs in (("metered", metered), ("free", free)) for h, c in enumerate(cs)
    ]
    try:
        await asyncio.sleep(2)
        await asyncio.to_thread(cluster.postgres.stop)
        down_at = time.time()
        await asyncio.sleep(10)
        up_called = time.time()
        await asyncio.to_thread(cluster.postgres.start)
        # Budgets work again: every host serves the budgeted node again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            recent = [c for c in calls if c.node == "metered" and c.started > up_called + 0.5]
            if {c.host for c in recent if c.finished} == {0, 1, 2}:
                break
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*loaders)
        await cluster.close_clients()
    during = [c for c in calls if c.started >= down_at and c.ended <= up_called]
    metered_during = [c for c in during if c.node == "metered"]
    assert len(metered_during) >= 6 and all(c.error is not None for c in metered_during), metered_during
    reasons = {c.error.reason for c in metered_during if c.error}
    assert reasons == {Reason.SPEND_DATABASE_UNAVAILABLE}, reasons
    error = metered_during[0].error
    assert error is not None and "spend database is unreachable" in error.message and error.retryable
    assert error.grpc_code.name == "UNAVAILABLE" and error.http_status == 503
    free_during = [c for c in during if c.node == "free"]
    assert len(free_during) >= 10 and all(c.finished for c in free_during), "unbudgeted nodes keep being served"
    assert all(c.finished for c in calls if c.node == "free"), [c.error for c in calls if c.error and c.node == "free"]
    recovered = [c for c in calls if c.node == "metered" and c.started > up_called + 0.5 and c.finished]
    assert {c.host for c in recovered} == {0, 1, 2}, "every host serves the budgeted node again"

    finished = {c.request_id for c in calls if c.finished}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stored = {
            r["request_id"]
            for r in await database_rows(
                cluster.database_url,
                "SELECT request_id FROM exo_remote_requests WHERE node = ANY($1)",
                ["metered", "free"],
            )
        }
        if finished <= stored:
            break
        await asyncio.sleep(0.3)
    assert finished <= stored, f"{len(finished - stored)} finished requests missing from PostgreSQL"
    assert stored <= finished | {c.request_id for c in calls if c.error is None}, "nothing stored that did not finish"
    counted = await database_rows(
        cluster.database_url, "SELECT COUNT(*) AS n, COUNT(DISTINCT request_id) AS d FROM exo_remote_requests"
    )
    assert counted[0]["n"] == counted[0]["d"], "no request is stored twice"
    for log in cluster.logs():
        assert "spend database postgresql://127.0.0.1" in log and "unreachable" in log, "no outage warning"
        assert "is back: budgets are checked again" in log, "no recovery line"
        assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]


@pytest.mark.timeout(300)  # (180 s but for a slow box's second or third burst, a minute later each)
async def test_redis_stopped_mid_load_falls_back_per_host_and_recovers(cluster: Cluster) -> None:
    clients = cluster.clients_of("fallback")
    steady = cluster.clients_of("steady")
    steady_calls: list[Call] = []
    stop = asyncio.Event()

    async def load(host: int) -> None:  # a limited node under load all along: never refused
        while not stop.is_set():
            steady_calls.append(await call(steady[host], "steady", host))
            await asyncio.sleep(0.02)

    loaders = [asyncio.create_task(load(h)) for h in range(3)]
    back = "limits are shared across hosts again"

    async def burst() -> list[Call]:
        return await asyncio.gather(*(call(clients[i % 3], "fallback", i % 3) for i in range(3 * (FALLBACK_RPM + 3))))

    backs_before = [log.count(back) for log in cluster.logs()]
    try:
        await eventually(lambda: len(steady_calls) >= 3, "the steady load runs")
        await asyncio.to_thread(cluster.redis.stop)
        # Each host's own windows, which Redis cannot show: a burst within one window.
        during = await in_one_window(burst, room_s=20)
        assert all(h.process.poll() is None for h in cluster.hosts), "no host crashed"
        await asyncio.to_thread(cluster.redis.start)
        # Each host's steady load finds Redis again once its back-off (2 s) ends, and says so.
        await eventually(
            lambda: all(log.count(back) > n for log, n in zip(cluster.logs(), backs_before, strict=True)),
            "every host uses Redis again",
            poll_s=0.1,
        )
        after = await burst()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*loaders)
        await cluster.close_clients()
    assert len(steady_calls) >= 20 and all(c.finished for c in steady_calls), [c.error for c in steady_calls if c.error]
    per_host = [sum(c.error is None for c in during if c.host == h) for h in range(3)]
    assert per_host == [FALLBACK_RPM] * 3, f"during the outage each host holds the limit itself: {per_host}"
    assert {c.error.reason for c in during if c.error} == {Reason.RATE_LIMITED}
    # Back in Redis (restarted empty): the limit holds in total again (in one window:
    # FALLBACK_RPM admitted over the three hosts).
    assert_shared_limit(after, shared_counts(cluster.redis.url, "node:fallback", windows_of(after)), FALLBACK_RPM)
    for log in cluster.logs():
        assert "rpm/tpm limits now hold per sidecar process" in log, log[-3000:]
        assert "limits are shared across hosts again" in log, log[-3000:]
        assert "redis://127.0.0.1" in log
        assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]


def test_two_workers_with_redis_and_database_start_and_share_limits(
    postgres_server: PostgresServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    database_url = postgres_server.create_database("shared_workers")
    scenario = Scenario(chunks=["ok"], usage=(PROMPT, COMPLETION))
    with OpenAIUpstream.in_thread({"gpt-4o-mini": scenario}, default=scenario) as upstream:
        config = write_config(tmp_path / "config.yaml", upstream.url)
        tokens = write_tokens(tmp_path / "tokens")
        env = {KEY_ENV: "sk-upstream-test-key-000000", "EXO_REMOTE_DISCOVER": "0"}
        args = [
            "--token-file",
            str(tokens),
            "--state-dir",
            str(tmp_path / "state"),
            "--workers",
            "2",
            "--redis",
            redis_server.url,
            "--database",
            database_url,
        ]
        forget_shared_counts(redis_server.url, "node:workers")  # the session's Redis
        sidecar = start_sidecar_process(config, tmp_path / "workers.log", env, "127.0.0.1:0", args)
        try:
            calls = asyncio.run(_burst_over_workers(sidecar.address, 16))
        finally:
            sidecar.stop()
    log = (tmp_path / "workers.log").read_text()
    # In one window (the usual case): exactly 6 admitted over the two worker processes.
    assert_shared_limit(calls, shared_counts(redis_server.url, "node:workers", windows_of(calls)), 6)
    assert {c.error.reason for c in calls if c.error is not None} <= {Reason.RATE_LIMITED}
    served = "node=workers end code=OK"  # the one INFO line of each request
    assert "[worker 1]" in log and served in log, log[-3000:]
    served_by_worker = [line for line in log.splitlines() if "[worker 1]" in line and served in line]
    served_by_main = [line for line in log.splitlines() if "[worker" not in line and served in line]
    assert served_by_worker and served_by_main, "both processes took requests"


async def _burst_over_workers(address: str, count: int) -> list[Call]:
    client = sidecar_client(address, token=TOKENS["workers"])
    try:
        await client.list_models()  # learns the worker's port (ListWorkers)
        return [await call(client, "workers", 0) for _ in range(count)]
    finally:
        await client.close()
