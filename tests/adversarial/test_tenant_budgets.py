"""Two tenants, one key holder: an attacker node tries to spend past its budget, or for free,
and a victim node with its own budget is served as if the attacker were absent.

The attacks of issue #21 (items 3 and 4), each against one in-process sidecar and, for the
ones about sharing, against three sidecar hosts (processes on 127.0.0.2-4) sharing a real
Redis and a real PostgreSQL (tests/support/servers.py):

* concurrent streams (8, 32) never spend above the budget (a reservation per request,
  clamped to what is left, taken atomically across hosts);
* one large reply from a provider that ignores ``max_tokens`` is cut at the reservation;
* requests cancelled or timed out before their first delta are charged for their prompt
  (estimated, marked) and count toward ``tpm``;
* an unpriced model is refused to a budgeted node unless its rule says ``allow_unpriced``;
* CJK text is estimated at a token per character or more;
* negative or absurd provider usage is a provider error, and its ledger row is kept.

Each fails on 5b4b1cc (budget checked only at admission, no cut, no charge without output,
unpriced models free, 4 characters a token, INTERNAL and no row for negative usage).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import litellm
import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.server import RunningSidecar
from exo_remote_engine.sidecar.ledger.spend import DB_NAME
from exo_remote_engine.sidecar.ledger.token_estimates import estimate_text_tokens, prompt_bound
from tests.support.configs import KEY_ENV, deployment
from tests.support.harness import chat_request, sidecar_client
from tests.support.minutes import in_one_window
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import SidecarProcess, start_sidecar_process
from tests.support.servers import PostgresServer, RedisServer
from tests.support.traffic import FakeClock, Sidecars

pytestmark = pytest.mark.timeout(180)

MINI_PRICE = (
    litellm.model_cost["gpt-4o-mini"]["input_cost_per_token"],
    litellm.model_cost["gpt-4o-mini"]["output_cost_per_token"],
)
REPLY_TOKENS = 20  # "tok " x 20: 20 tokens by any count, reported as such
STEADY = Scenario(chunks=["tok "] * REPLY_TOKENS, usage=(20, REPLY_TOKENS), interval_s=0.01)
PER_REQUEST_USD = 20 * MINI_PRICE[0] + REPLY_TOKENS * MINI_PRICE[1]
SWARM_BUDGET = round(3.5 * PER_REQUEST_USD, 12)  # three and a half replies' worth
RUNAWAY_PRICE = (1e-6, 1e-5)
HOG_BUDGET = 0.001  # about 97 output tokens of "runaway"
CJK = "你好世界"
SCENARIOS = {
    "gpt-4o-mini": STEADY,
    # A provider that ignores max_tokens: 20,000 tokens whatever it is asked.
    "runaway-model": Scenario(chunks=["word "] * 20_000, usage=(20, 20_000)),
    "slow-model": Scenario(chunks=["late"], stall_before_first_byte_s=60),
    "local-llama": Scenario(chunks=["free ", "text"], usage=(20, 2)),
    "cjk-model": Scenario(chunks=[CJK] * 50, omit_usage=True),
    "negative-model": Scenario(chunks=["a", "b"], usage=(-5, 10)),
    "absurd-model": Scenario(chunks=["a", "b"], usage=(10**15, 10)),
}
TOKENS = {
    node: f"tok-{i:02d}-a1b2c3d4e5f6a7b8"
    for i, node in enumerate(
        ("victim", "swarm8", "swarm32", "hog", "quitter", "freeloader", "frugal", "writer", "liar")
    )
}
QUITTER_TPM = 100
QUITTER_PROMPT = "x" * 100  # estimated at 25 + 7 tokens: four cancels pass tpm 100
_ids = itertools.count()


def config_text(url: str) -> str:
    text = "model_list:\n" + deployment("mini", "gpt-4o-mini", url)
    text += deployment("runaway", "runaway-model", url, price=RUNAWAY_PRICE)
    text += deployment("slow", "slow-model", url, price=(1e-6, 1e-6))
    text += deployment("local", "local-llama", url)  # no price anywhere
    text += deployment("cjk", "cjk-model", url, price=(1e-6, 1e-6))
    text += deployment("negative", "negative-model", url, price=(1e-6, 1e-6))
    text += deployment("absurd", "absurd-model", url, price=(1e-6, 1e-6))
    text += "exo_remote_settings:\n  nodes:\n"
    text += "    victim: {max_budget: 5.0, budget_duration: 1d, allowed_models: [mini]}\n"
    text += f"    swarm8: {{max_budget: {SWARM_BUDGET:.12f}, budget_duration: 1d}}\n"
    text += f"    swarm32: {{max_budget: {SWARM_BUDGET:.12f}, budget_duration: 1d}}\n"
    text += f"    hog: {{max_budget: {HOG_BUDGET!r}, budget_duration: 1d}}\n"
    text += f"    quitter: {{max_budget: 1.0, budget_duration: 1d, tpm: {QUITTER_TPM}}}\n"
    text += "    freeloader: {max_budget: 1.0, budget_duration: 1d}\n"
    text += "    frugal: {max_budget: 1.0, budget_duration: 1d, allow_unpriced: true}\n"
    text += "    writer: {max_budget: 1.0, budget_duration: 1d}\n"
    text += "    liar: {max_budget: 1.0, budget_duration: 1d}\n"
    return text


@dataclass
class Outcome:
    text: str = ""
    finish: int | None = None
    error: RemoteError | None = None


async def run(client: SidecarClient, model: str, text: str = "hi", **params: object) -> Outcome:
    result = Outcome()
    request = chat_request(model, text, request_id=f"r-{next(_ids)}", **params)
    try:
        async for event in client.generate(request):
            if event.HasField("delta"):
                result.text += event.delta.text
            else:
                result.finish = event.finished.finish_reason
    except RemoteError as exc:
        result.error = exc
    return result


# ------------------------------------------------------------------ one sidecar


@dataclass
class Single:
    sidecar: RunningSidecar
    upstream: OpenAIUpstream
    state: Path
    clients: dict[str, SidecarClient]

    def rows(self, node: str) -> list[sqlite3.Row]:
        with sqlite3.connect(self.state / DB_NAME) as db:
            db.row_factory = sqlite3.Row
            return list(db.execute("SELECT * FROM requests WHERE node = ? ORDER BY id", (node,)))

    async def rows_eventually(self, node: str, count: int) -> list[sqlite3.Row]:
        """The node's rows once there are ``count`` (a cancelled call's row is written by
        the ledger's thread, after the call ended)."""
        deadline = time.monotonic() + 10
        while len(found := self.rows(node)) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return found


@pytest.fixture
async def single(
    request: pytest.FixtureRequest,
    upstream: OpenAIUpstream,
    sidecars: Sidecars,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> AsyncIterator[Single]:
    """One sidecar reading the upstream with its direct reader, or (``indirect`` param
    "litellm") through LiteLLM, whose stream is merged by a separate writer task."""
    caplog.set_level(logging.WARNING, logger="exo_remote_engine.sidecar")
    upstream.scenarios.update(SCENARIOS)
    fast_path = getattr(request, "param", "direct") == "direct"
    sidecar = await sidecars.start(
        config_text(upstream.url), FakeClock(), named_tokens=TOKENS, openai_fast_path=fast_path
    )
    clients = {node: sidecar_client(sidecar.address, token=token) for node, token in TOKENS.items()}
    yield Single(sidecar, upstream, tmp_path / "state", clients)
    for client in clients.values():
        await client.close()


async def victim_is_served(client: SidecarClient, while_attacked: Awaitable[object]) -> list[Outcome]:
    """Three victim requests, one after another, while the attack runs."""
    attack = asyncio.ensure_future(while_attacked)
    served = [await run(client, "mini", max_tokens=REPLY_TOKENS) for _ in range(3)]
    await attack
    return served


@pytest.mark.parametrize("streams", [8, 32])
async def test_concurrent_streams_never_spend_above_the_budget(single: Single, streams: int) -> None:
    node = f"swarm{streams}"
    attacker = single.clients[node]
    swarm = asyncio.gather(*(run(attacker, "mini", max_tokens=REPLY_TOKENS) for _ in range(streams)))
    victim = await victim_is_served(single.clients["victim"], swarm)
    results = swarm.result()
    assert all(v.error is None and v.text == "tok " * REPLY_TOKENS for v in victim), victim
    served = [r for r in results if r.error is None]
    refused = [r for r in results if r.error is not None]
    assert len(served) >= 3, "the budget holds three replies: they are served"
    assert refused and {r.error.reason for r in refused if r.error} == {Reason.BUDGET_EXCEEDED}
    spent = sum(r["cost_usd"] for r in single.rows(node))
    assert len(single.rows(node)) == len(served), "every served request is charged"
    assert spent <= SWARM_BUDGET * (1 + 1e-9), f"spent ${spent:.8f} of ${SWARM_BUDGET:.8f}"
    assert len(single.upstream.requests_for("gpt-4o-mini")) == len(served) + 3, "refused before any provider call"


@pytest.mark.parametrize("single", ["direct", "litellm"], indirect=True)
async def test_one_large_reply_on_a_tiny_budget_is_cut_at_the_reservation(single: Single) -> None:
    request = chat_request("runaway", "hi")
    room = (HOG_BUDGET - prompt_bound(request) * RUNAWAY_PRICE[0]) / RUNAWAY_PRICE[1]
    cut = await run(single.clients["hog"], "runaway")
    assert cut.error is None and cut.finish == pb.FINISH_REASON_LENGTH, cut
    assert 0 < estimate_text_tokens(cut.text) <= room and len(cut.text) < 4 * room + 8
    sent = single.upstream.requests_for("runaway-model")[0].body
    assert sent is not None and sent["max_tokens"] == int(room), "the provider was asked for what fits"
    (row,) = single.rows("hog")
    assert (row["outcome"], row["estimated"]) == ("cut", 1)
    assert row["cost_usd"] <= HOG_BUDGET, f"spent ${row['cost_usd']} of ${HOG_BUDGET}"
    again = await run(single.clients["hog"], "runaway")
    assert again.error is not None and again.error.reason is Reason.BUDGET_EXCEEDED, again
    assert len(single.upstream.requests_for("runaway-model")) == 1
    victim = await run(single.clients["victim"], "mini", max_tokens=REPLY_TOKENS)
    assert victim.error is None and victim.finish == pb.FINISH_REASON_STOP


async def _cancel_before_first_delta(
    client: SidecarClient, upstream_seen: Callable[[], int], text: str = QUITTER_PROMPT
) -> None:
    """Start a call on the stalled model and cancel it once the provider has the request."""
    before = upstream_seen()
    call = asyncio.ensure_future(run(client, "slow", text))
    deadline = time.monotonic() + 10
    while upstream_seen() == before and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert upstream_seen() == before + 1, "the provider got the request"
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_cancels_before_the_first_delta_are_charged_and_count_toward_tpm(single: Single) -> None:
    seen = lambda: len(single.upstream.requests_for("slow-model"))  # noqa: E731
    for _ in range(3):
        await _cancel_before_first_delta(single.clients["quitter"], seen)
    timed_out = await run(
        sidecar_client(single.sidecar.address, token=TOKENS["quitter"], deadline_s=1.0), "slow", QUITTER_PROMPT
    )
    assert timed_out.error is not None and timed_out.error.reason is Reason.DEADLINE_EXCEEDED
    rows = await single.rows_eventually("quitter", 4)
    assert len(rows) == 4, "each cancel and timeout is charged"
    for row in rows:
        assert row["outcome"] == "cancelled" and row["estimated"] == 1 and row["completion_tokens"] == 0
        assert row["prompt_tokens"] >= len(QUITTER_PROMPT) // 4 and row["cost_usd"] > 0
    refused = await run(single.clients["quitter"], "mini", max_tokens=REPLY_TOKENS)
    assert refused.error is not None and refused.error.reason is Reason.RATE_LIMITED, refused
    assert refused.error.metadata.get("limit") == "tpm"
    victim = await run(single.clients["victim"], "mini", max_tokens=REPLY_TOKENS)
    assert victim.error is None


async def test_an_unpriced_model_is_refused_to_a_budgeted_node_unless_allowed(
    single: Single, caplog: pytest.LogCaptureFixture
) -> None:
    started = caplog.get_records("setup")  # the sidecar started in the fixture
    warnings = [r.getMessage() for r in started if r.levelno == logging.WARNING]
    gap = [w for w in warnings if "has no known price" in w]
    assert any("node 'freeloader'" in w and "'local'" in w and "refused" in w for w in gap), gap
    assert any("node 'frugal'" in w and "'local'" in w and "allow_unpriced: true" in w for w in gap), gap
    assert not any("node 'victim'" in w for w in gap), "the victim may not use the unpriced model"
    refused = await run(single.clients["freeloader"], "local")
    assert refused.error is not None and refused.error.reason is Reason.PERMISSION_DENIED, refused
    assert "allow_unpriced" in refused.error.message and "no known price" in refused.error.message
    assert single.upstream.requests_for("local-llama") == [], "refused before any provider call"
    allowed = await run(single.clients["frugal"], "local")
    assert allowed.error is None and allowed.text == "free text"
    (row,) = single.rows("frugal")
    assert row["cost_usd"] is None, "an unknown price stays unknown, never 0"


async def test_cjk_is_estimated_at_a_token_per_character_or_more(single: Single) -> None:
    reply = await run(single.clients["writer"], "cjk", CJK * 75)
    assert reply.error is None and reply.text == CJK * 50
    (row,) = single.rows("writer")
    assert row["estimated"] == 1, "the provider reported no usage"
    assert row["completion_tokens"] >= len(CJK * 50), row["completion_tokens"]
    assert row["prompt_tokens"] >= len(CJK * 75), row["prompt_tokens"]
    quitter_seen = lambda: len(single.upstream.requests_for("slow-model"))  # noqa: E731
    await _cancel_before_first_delta(single.clients["writer"], quitter_seen, "東京" * 200)
    rows = await single.rows_eventually("writer", 2)
    assert rows[-1]["prompt_tokens"] >= 400 and rows[-1]["outcome"] == "cancelled"
    assert estimate_text_tokens("Привет, мир") >= 10 and estimate_text_tokens("👋" * 10) >= 10


@pytest.mark.parametrize(
    ("single", "model"), [("direct", "negative"), ("direct", "absurd"), ("litellm", "absurd")], indirect=["single"]
)
async def test_impossible_provider_usage_is_a_provider_error_and_the_row_is_kept(single: Single, model: str) -> None:
    result = await run(single.clients["liar"], model)
    assert result.error is not None and result.error.reason is Reason.PROVIDER_UNAVAILABLE, result
    assert "impossible usage" in result.error.message and result.text == "ab"
    (row,) = single.rows("liar")
    assert (row["outcome"], row["estimated"]) == ("failed", 1)
    assert 0 < row["prompt_tokens"] < 1000 and row["cost_usd"] > 0
    after = await run(single.clients["liar"], "mini", max_tokens=REPLY_TOKENS)
    assert after.error is None, "the node's budget is intact"


@pytest.mark.parametrize("single", ["litellm"], indirect=True)
async def test_litellm_recounts_a_negative_prompt_and_nothing_negative_is_charged(single: Single) -> None:
    result = await run(single.clients["liar"], "negative")
    assert result.error is None and result.text == "ab", "LiteLLM replaces the provider's count with its own"
    (row,) = single.rows("liar")
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] == 10 and row["cost_usd"] > 0


# ------------------------------------------------------------------ three hosts

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@dataclass
class Cluster:
    hosts: list[SidecarProcess]
    addresses: list[str]
    database_url: str
    upstream: OpenAIUpstream

    def clients_of(self, node: str, **target: object) -> list[SidecarClient]:
        return [sidecar_client(a, token=TOKENS[node], **target) for a in self.addresses]

    async def rows(self, node: str, count: int = 0) -> list[asyncpg.Record]:
        """The node's rows in the shared database, once there are ``count`` (bounded wait)."""
        connection = await asyncpg.connect(self.database_url)
        try:
            deadline = time.monotonic() + 15
            while True:
                rows = list(
                    await connection.fetch("SELECT * FROM exo_remote_requests WHERE node = $1 ORDER BY ended_at", node)
                )
                if len(rows) >= count or time.monotonic() > deadline:
                    return rows
                await asyncio.sleep(0.05)
        finally:
            await connection.close()

    async def reservations(self, node: str) -> int:
        connection = await asyncpg.connect(self.database_url)
        try:
            return int(await connection.fetchval("SELECT COUNT(*) FROM exo_remote_reservations WHERE node = $1", node))
        finally:
            await connection.close()


@pytest.fixture(scope="module")
def cluster(
    postgres_server: PostgresServer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("tenant-hosts")
    database_url = postgres_server.create_database("tenant_budgets")
    redis_server.flush()
    with OpenAIUpstream.in_thread(dict(SCENARIOS)) as upstream:
        config = tmp / "config.yaml"
        config.write_text(config_text(upstream.url))
        tokens = tmp / "tokens"
        tokens.write_text("".join(f"{node} {token}\n" for node, token in TOKENS.items()))
        tokens.chmod(0o600)
        env = {KEY_ENV: "sk-upstream-test-key-000000", "EXO_REMOTE_DISCOVER": "0"}

        def start(i: int) -> SidecarProcess:
            args = ["--token-file", str(tokens), "--state-dir", str(tmp / f"state-{i}"),
                    "--redis", redis_server.url, "--database", database_url]  # fmt: skip
            return start_sidecar_process(config, tmp / f"host-{i}.log", env, f"{HOSTS[i]}:0", args)

        with concurrent.futures.ThreadPoolExecutor(len(HOSTS)) as pool:
            futures = [pool.submit(start, i) for i in range(len(HOSTS))]
        hosts = [f.result() for f in futures if f.exception() is None]
        try:
            if len(hosts) < len(HOSTS):
                raise next(f.exception() for f in futures if f.exception() is not None)  # type: ignore[misc]
            yield Cluster(hosts, [f"{h}:{p.port}" for h, p in zip(HOSTS, hosts, strict=True)], database_url, upstream)
        finally:
            for host in hosts:
                host.stop()


async def _closing(clients: list[SidecarClient]) -> None:
    for client in clients:
        await client.close()


@pytest.mark.parametrize("streams", [8, 32])
async def test_concurrent_streams_on_three_hosts_never_spend_above_the_budget(cluster: Cluster, streams: int) -> None:
    node = f"swarm{streams}"
    attackers, victims = cluster.clients_of(node), cluster.clients_of("victim")
    try:
        swarm = asyncio.gather(*(run(attackers[i % 3], "mini", max_tokens=REPLY_TOKENS) for i in range(streams)))
        victim = await victim_is_served(victims[streams % 3], swarm)
    finally:
        await _closing(attackers + victims)
    results = swarm.result()
    assert all(v.error is None for v in victim), victim
    served = [r for r in results if r.error is None]
    refused = [r for r in results if r.error is not None]
    assert len(served) >= 1 and refused, (len(served), len(refused))
    assert {r.error.reason for r in refused if r.error} == {Reason.BUDGET_EXCEEDED}
    rows = await cluster.rows(node, len(served))
    spent = sum(r["cost_usd"] for r in rows)
    assert len(rows) == len(served) and spent <= SWARM_BUDGET * (1 + 1e-9), (len(rows), spent, SWARM_BUDGET)
    assert await cluster.reservations(node) == 0, "every reservation was turned into its charge"


async def test_one_large_reply_on_a_tiny_budget_is_cut_on_every_host(cluster: Cluster) -> None:
    clients = cluster.clients_of("hog")
    try:
        first = await run(clients[0], "runaway")
        others = [await run(c, "runaway") for c in clients[1:]]
    finally:
        await _closing(clients)
    assert first.error is None and first.finish == pb.FINISH_REASON_LENGTH, first
    assert all(o.error is not None and o.error.reason is Reason.BUDGET_EXCEEDED for o in others), others
    (row,) = await cluster.rows("hog", 1)
    assert row["outcome"] == "cut" and row["cost_usd"] <= HOG_BUDGET


async def test_cancels_on_three_hosts_are_charged_and_count_toward_one_tpm(cluster: Cluster) -> None:
    seen = lambda: len([r for r in cluster.upstream.requests if r.model == "slow-model"])  # noqa: E731
    clients = cluster.clients_of("quitter")

    async def cancels_then_one_more() -> tuple[list[asyncpg.Record], Outcome]:
        before = len(await cluster.rows("quitter"))
        for i in range(4):
            await _cancel_before_first_delta(clients[i % 3], seen)
        rows = (await cluster.rows("quitter", before + 4))[before:]
        return rows, await run(clients[1], "mini", max_tokens=REPLY_TOKENS)

    try:
        # The four cancels' tokens and the refused request must share one tpm window.
        rows, refused = await in_one_window(cancels_then_one_more, room_s=30)
    finally:
        await _closing(clients)
    assert len(rows) == 4 and all(r["outcome"] == "cancelled" for r in rows)
    assert len({r["origin"] for r in rows}) == 3, "each of the three hosts charged its cancels"
    assert all(r["estimated"] == 1 and r["cost_usd"] > 0 for r in rows)
    assert refused.error is not None and refused.error.reason is Reason.RATE_LIMITED, refused
