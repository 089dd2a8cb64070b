"""Spend: each request's cost from LiteLLM's cost map in the SQLite ledger, node budgets,
streams cut short, a SIGKILLed sidecar that keeps every finished request's spend, and the
ledger's commit order: rows durable in the order they were recorded, on the event loop or
on the writer thread (a hedge that lost is recorded before the reply it lost to, and the
client learns the reply finished only once both are durable)."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import time
from pathlib import Path

import litellm
import pytest

from exo_remote_engine.cli.main import main, render_models, render_usage
from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.sidecar.config.loader import ConfigError
from exo_remote_engine.sidecar.ledger.spend import DB_NAME, Charge, Ledger
from tests.support.clock import FakeClock
from tests.support.configs import KEY_ENV, deployment
from tests.support.harness import chat_request, metrics_text_of, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import start_sidecar_process
from tests.support.traffic import Sidecars, complete, outcome
from tests.support.waits import eventually

NODE_TOKEN = "token-of-node-one-0001"


def rows(state_dir: Path, query: str = "SELECT * FROM requests ORDER BY id") -> list[sqlite3.Row]:
    with sqlite3.connect(state_dir / DB_NAME) as db:
        db.row_factory = sqlite3.Row
        return list(db.execute(query))


def map_cost(model: str, prompt: int, completion: int) -> float:
    """The cost computed here, independently, from LiteLLM's bundled map."""
    info = litellm.model_cost[model]
    return prompt * info["input_cost_per_token"] + completion * info["output_cost_per_token"]


async def test_a_budget_stops_the_node_at_the_next_request_after_crossing(
    upstream: OpenAIUpstream, sidecars: Sidecars, tmp_path: Path
) -> None:
    upstream.scenarios["gpt-4o-mini"] = Scenario(chunks=["ok"], usage=(1000, 10))
    per_request = map_cost("gpt-4o-mini", 1000, 10)
    budget = 3.5 * per_request  # the 4th request crosses it; the 5th is refused
    text = "model_list:\n" + deployment("mini", "gpt-4o-mini", upstream.url)
    text += f"exo_remote_settings:\n  nodes:\n    n1: {{max_budget: {budget!r}, budget_duration: 1d}}\n"
    clock = FakeClock()
    sidecar = await sidecars.start(text, clock, named_tokens={"n1": NODE_TOKEN})
    client = sidecar_client(sidecar.address, token=NODE_TOKEN)
    try:
        assert [await outcome(client, "mini") for _ in range(4)] == [None] * 4
        error = await outcome(client, "mini")
        assert error is not None and error.reason is Reason.BUDGET_EXCEEDED, error
        assert error.http_status == 429 and error.grpc_code.name == "RESOURCE_EXHAUSTED"
        day_left = 86400 - clock.now % 86400
        assert error.retry_after_s is not None and abs(error.retry_after_s - day_left) < 0.01
        assert len(upstream.requests) == 4, "refused before any provider call"
        ledger = rows(tmp_path / "state")
        assert [
            (r["node"], r["alias"], r["deployment"], r["prompt_tokens"], r["completion_tokens"]) for r in ledger
        ] == [("n1", "mini", "mini", 1000, 10)] * 4
        assert math.isclose(sum(r["cost_usd"] for r in ledger), 4 * per_request, rel_tol=1e-9)
        listed = await client.list_models()
        assert listed.budget.node == "n1" and listed.budget.remaining_usd == 0
        assert math.isclose(listed.budget.spent_usd, 4 * per_request, rel_tol=1e-9)
        assert "budget of node n1: $0.000000 left" in render_models(listed)
        metrics = metrics_text_of(sidecar)
        assert 'exo_remote_limit_hits_total{limit="budget",node="n1"} 1.0' in metrics
        spend_line = next(line for line in metrics.splitlines() if line.startswith("exo_remote_spend_usd_total{"))
        assert math.isclose(float(spend_line.split()[-1]), 4 * per_request, rel_tol=1e-9)
        table = render_usage(tmp_path / "state", "n1", "1d", now=clock.now)
        assert "n1    mini   4         4,000          40" in table, table
        assert render_usage(tmp_path / "state", "n2", None).count("\n") == 1, "header and total only"
        clock.now += day_left  # a new day: a new budget
        assert await outcome(client, "mini") is None
        listed = await client.list_models()
        assert math.isclose(listed.budget.remaining_usd, budget - per_request, rel_tol=1e-9)
    finally:
        await client.close()


async def test_prices_override_and_unknown_prices_stay_unknown(
    upstream: OpenAIUpstream, sidecars: Sidecars, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.default = Scenario(chunks=["ok"], usage=(100, 20))
    text = "model_list:\n" + deployment("mapped", "gpt-4o-mini", upstream.url)
    text += deployment("priced", "house-model", upstream.url, input_cost_per_token=0.001)
    text += "    model_info:\n      output_cost_per_token: 0.002\n"
    text += deployment("unknown", "house-model", upstream.url)
    sidecar = await sidecars.start(text, FakeClock())
    client = sidecar_client(sidecar.address)
    try:
        for alias in ("mapped", "priced", "unknown"):
            assert await outcome(client, alias) is None
    finally:
        await client.close()
    costs = {r["alias"]: r["cost_usd"] for r in rows(tmp_path / "state")}
    assert main(["usage", "--state-dir", str(tmp_path / "state")]) == 0
    printed = capsys.readouterr().out
    unknown_row = next(line for line in printed.splitlines() if "  unknown  " in line)
    assert unknown_row.endswith("unknown") and "0.000000" not in unknown_row, printed
    assert "1 requests used models without a known price" in printed
    assert math.isclose(costs["mapped"], map_cost("gpt-4o-mini", 100, 20), rel_tol=1e-9)
    assert math.isclose(costs["priced"], 100 * 0.001 + 20 * 0.002, rel_tol=1e-9)
    assert costs["unknown"] is None, "an unknown price is NULL, never 0"


async def test_a_stream_cancelled_midway_is_charged_for_what_was_produced(
    upstream: OpenAIUpstream, sidecars: Sidecars, tmp_path: Path
) -> None:
    upstream.scenarios["gpt-4o-mini"] = Scenario(chunks=["word "] * 400, interval_s=0.005)
    sidecar = await sidecars.start("model_list:\n" + deployment("mini", "gpt-4o-mini", upstream.url), FakeClock())
    client = sidecar_client(sidecar.address)
    received = ""
    try:
        stream = client.generate(chat_request("mini", request_id="cut-short"))
        async for event in stream:
            received += event.delta.text
            if len(received) >= 100:
                break
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await client.close()
    await eventually(lambda: rows(tmp_path / "state"), "the cancelled request is booked", poll_s=0.05)
    (row,) = rows(tmp_path / "state")
    assert (row["request_id"], row["outcome"], row["estimated"]) == ("cut-short", "cancelled", 1)
    # Estimated at 4 characters a token from what was written (at least what arrived).
    assert len(received) // 4 <= row["completion_tokens"] < 2000 // 4
    assert row["cost_usd"] > 0


@pytest.mark.timeout(120)
async def test_sigkill_mid_load_then_restart_keeps_every_finished_request(
    upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    upstream.default = Scenario(chunks=["t "] * 20, interval_s=0.01, usage=(11, 20))
    upstream.scenarios["gpt-4o-mini"] = upstream.default
    config = tmp_path / "kill.yaml"
    config.write_text("model_list:\n" + deployment("mini", "gpt-4o-mini", upstream.url))
    state = tmp_path / "state"
    env = {KEY_ENV: "sk-upstream-test-key-000000", "EXO_REMOTE_DISCOVER": "0"}
    args = ["--state-dir", str(state)]
    first = await asyncio.to_thread(start_sidecar_process, config, tmp_path / "s1.log", env, "127.0.0.1:0", args)
    finished: set[str] = set()
    client = sidecar_client(first.address)

    async def worker(w: int) -> None:
        for i in range(1000):
            request_id = f"w{w}-{i}"
            try:
                events = [e async for e in client.generate(chat_request("mini", request_id, request_id=request_id))]
            except RemoteError:
                return
            if events and events[-1].HasField("finished"):
                finished.add(request_id)

    workers = [asyncio.create_task(worker(w)) for w in range(8)]
    try:
        await eventually(lambda: len(finished) >= 40, "40 requests finished", timeout_s=60)
        first.process.kill()
        await asyncio.gather(*workers)
    finally:
        await client.close()
        if first.process.poll() is None:
            first.process.kill()
        await asyncio.to_thread(first.process.wait, 10)
    received = {r.body["messages"][-1]["content"] for r in upstream.requests if r.body}
    completed_upstream = sum(r.outcome == "completed" for r in upstream.connections_closed)
    recorded = {r["request_id"] for r in rows(state)}
    assert finished <= recorded, f"finished but not recorded: {sorted(finished - recorded)}"
    assert recorded <= received, "nothing is recorded that the upstream never saw"
    assert len(recorded) <= completed_upstream, "only what the upstream finished"
    in_flight_lost = completed_upstream - len(recorded)
    assert in_flight_lost <= 8, "at most the requests in flight are lost"

    second = await asyncio.to_thread(start_sidecar_process, config, tmp_path / "s2.log", env, "127.0.0.1:0", args)
    client = sidecar_client(second.address)
    try:
        assert await complete(client, "mini") == "t " * 20
    finally:
        await client.close()
        await asyncio.to_thread(second.stop)
    after = rows(state)
    assert {r["request_id"] for r in after} >= recorded and len(after) == len(recorded) + 1
    assert math.isclose(sum(r["cost_usd"] for r in after), len(after) * map_cost("gpt-4o-mini", 11, 20), rel_tol=1e-9)


async def test_a_state_dir_that_cannot_hold_the_ledger_stops_startup(
    upstream: OpenAIUpstream, sidecars: Sidecars, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot open the spend ledger"):
        await sidecars.start("model_list:\n" + deployment("a", "m-a", upstream.url), FakeClock(), state_dir=blocker)


def test_budget_exceeded_crosses_the_wire_as_itself() -> None:
    error = RemoteError(Reason.BUDGET_EXCEEDED, "node 'n1' has spent its budget", retry_after_s=3600)
    back = RemoteError.from_status(error.grpc_code, error.message, error.trailing_metadata())
    assert (back.reason, back.retry_after_s, back.http_status) == (Reason.BUDGET_EXCEEDED, 3600, 429)
    assert back.to_openai_error()["error"] == {
        "message": "node 'n1' has spent its budget",
        "type": "insufficient_quota",
        "code": "budget_exceeded",
        "param": None,
    }
    assert not back.retryable, "waiting seconds does not refill a budget"


def _charge(request_id: str, outcome: str = "completed") -> Charge:
    return Charge(request_id, time.time(), "node", "m", "m", "openai/m", 10, 5, 0.01, False, outcome)


def _committed(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT request_id FROM requests ORDER BY id")]


async def test_a_row_recorded_soon_is_durable_before_a_later_row_returns(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path)
    busy = threading.Event()
    # The writer thread held busy (as a checkpoint or a copy to a shared database holds it).
    ledger._writer.submit(busy.wait, 30)
    try:
        ledger.record_soon(_charge("lost-hedge", "abandoned"))
        await asyncio.wait_for(ledger.record(_charge("reply")), timeout=10)
        assert _committed(ledger.path) == ["lost-hedge", "reply"]
    finally:
        busy.set()
        ledger.close()


async def test_rows_queued_behind_a_locked_file_keep_their_order(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path)
    other = sqlite3.connect(ledger.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another worker process holds the write lock
    try:
        ledger.record_soon(_charge("first", "cancelled"))
        second = asyncio.create_task(ledger.record(_charge("second")))
        ticks = 0
        while ticks < 20:  # the loop is not blocked while the rows wait for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not second.done() and _committed(ledger.path) == []
        other.execute("COMMIT")
        await asyncio.wait_for(second, timeout=10)
        ledger.record_soon(_charge("third"))  # the queue is empty again: committed at once
        assert _committed(ledger.path) == ["first", "second", "third"]
    finally:
        other.close()
        ledger.close()
