"""The first-token guard (relay/first_token.py) through a real sidecar and the real
upstream: a member that never speaks is left after ``ttft_timeout`` and a hedge wins
after ``hedge_after``; the client gets one reply, never text twice; the abandoned attempt
is a failure of its deployment and its prompt is charged. No timing is asserted: the slow
member stalls far longer than any test waits, so the outcome does not depend on the box."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from exo_remote_engine.contract.errors import Reason
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.server import RunningSidecar
from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.relay.first_token import hedged
from exo_remote_engine.sidecar.transports.stream_types import StreamState
from tests.support.harness import sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.traffic import FakeClock, Sidecars, complete, deployment, outcome

NEVER = Scenario(stall_before_first_byte_s=60.0)  # accepts, then says nothing


def _rows(sidecar: RunningSidecar) -> list[tuple[str, str, int]]:
    ledger = sidecar.servicer.accounting.ledger
    assert ledger is not None
    with sqlite3.connect(ledger.path) as db:
        return list(db.execute("SELECT model, outcome, prompt_tokens FROM requests ORDER BY id"))


@pytest.mark.timeout(60)
async def test_a_member_without_a_first_token_is_left_for_the_next_and_cools_down(
    upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    upstream.scenarios["m-slow"] = NEVER
    url = upstream.url
    text = "model_list:\n" + deployment("g", "m-slow", url, weight=1000, ttft_timeout=0.5)
    text += deployment("g", "m-fast", url, weight=1)
    text += "router_settings:\n  allowed_fails: 0\n  cooldown_time: 600\n"
    sidecar = await sidecars.start(text, FakeClock())
    client = sidecar_client(sidecar.address)
    try:
        replies = [await complete(client, "g", f"r{i}") for i in range(4)]
    finally:
        await client.close()
    assert replies == [f"echo: r{i}" for i in range(4)], "one reply each, from the member that spoke"
    slow = upstream.requests_for("m-slow")
    assert len(slow) == 1, "after its timeout m-slow cools down: the next requests go straight to m-fast"
    record = await upstream.wait_closed("m-slow", timeout=10)
    assert record.client_disconnected and record.chunks_written == 0
    rows = _rows(sidecar)
    assert ("openai/m-slow", "abandoned") in [(m, o) for m, o, _ in rows], rows
    assert all(p > 0 for m, o, p in rows if o == "abandoned"), "its prompt is charged"
    assert [o for m, o, _ in rows if m == "openai/m-fast"] == ["completed"] * 4


@pytest.mark.timeout(60)
async def test_a_single_silent_deployment_ends_in_provider_timeout(
    upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    upstream.scenarios["m-slow"] = NEVER
    text = "model_list:\n" + deployment("solo", "m-slow", upstream.url)
    text += "router_settings:\n  ttft_timeout: 0.3\n  num_retries: 0\n"
    sidecar = await sidecars.start(text, FakeClock())
    client = sidecar_client(sidecar.address)
    try:
        error = await outcome(client, "solo")
    finally:
        await client.close()
    assert error is not None and error.reason is Reason.PROVIDER_TIMEOUT
    assert "no first token within 0.3s" in error.message


@pytest.mark.timeout(60)
async def test_a_hedge_wins_over_a_silent_member_and_both_are_charged(
    upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    upstream.scenarios["m-slow"] = NEVER
    upstream.scenarios["m-fast"] = Scenario(chunks=["one ", "reply ", "only"])
    url = upstream.url
    text = "model_list:\n" + deployment("g", "m-slow", url, weight=1000) + deployment("g", "m-fast", url, weight=1)
    # The first-token deadline cannot end the wait within the test: only the hedge can.
    text += "router_settings:\n  hedge_after: 0.2\n  ttft_timeout: 600\n"
    sidecar = await sidecars.start(text, FakeClock())
    client = sidecar_client(sidecar.address)
    try:
        for i in range(3):  # (1 in 1001, m-fast is picked first and answers alone: ask again)
            async with asyncio.timeout(30):  # the hedge starts after 0.2 s; without it, 600 s
                events = [e async for e in client.generate(_request("g", f"h{i}"))]
            if upstream.requests_for("m-slow"):
                break
    finally:
        await client.close()
    text_out = "".join(e.delta.text for e in events if e.HasField("delta"))
    assert text_out == "one reply only"
    assert events[-1].HasField("finished") and sum(e.HasField("finished") for e in events) == 1
    assert len(upstream.requests_for("m-slow")) == 1, "m-slow, picked first, stayed silent"
    slow = await upstream.wait_closed("m-slow", timeout=10)
    fast = await upstream.wait_closed("m-fast", timeout=10)
    while fast.started_at < slow.started_at:  # an earlier request that m-fast answered alone
        fast = await upstream.wait_closed("m-fast", timeout=10)
    assert slow.client_disconnected and fast.outcome == "completed"
    assert fast.started_at < slow.ended_at, "the hedge began while m-slow was still silent"
    rows = [(m, o) for m, o, _ in _rows(sidecar)]
    assert ("openai/m-slow", "abandoned") in rows and ("openai/m-fast", "completed") in rows, rows


def _request(model: str, text: str) -> pb.GenerateRequest:
    from tests.support.harness import chat_request

    return chat_request(model, text)


async def test_two_hedged_attempts_that_both_speak_never_mix_their_text() -> None:
    """The race itself, with two attempts released at the same instant, 50 times: the
    client's text is all of one attempt, the other is cancelled before its first write."""
    winners = {await _race_once() for _ in range(50)}
    assert winners <= {"a", "b"}


async def _race_once() -> str:
    go = asyncio.Event()
    abandoned: list[str] = []
    written: list[str] = []

    async def attempt(entry: ModelEntry, state: StreamState) -> None:
        await go.wait()
        for i in range(5):
            state.buffer.add_text(f"{entry.deployment_name}{i} ")
            await state.flush()
            await asyncio.sleep(0)
        state.finish_reason = "stop"

    async def write(response: pb.GenerateResponse) -> None:
        written.append(response.delta.text)
        await asyncio.sleep(0)

    parent = StreamState(write)
    a, b = (ModelEntry(alias="g", litellm_model="openai/x", provider="openai", deployment=n) for n in "ab")

    async def second() -> ModelEntry:
        go.set()  # both attempts become ready in the same loop iteration
        return b

    winner = await hedged(a, attempt, parent, 0.0, second, lambda e: abandoned.append(e.deployment_name))
    text = "".join(written)
    name = winner.deployment_name
    assert text == "".join(f"{name}{i} " for i in range(5)), text
    assert abandoned == ["b" if name == "a" else "a"]
    assert parent.finish_reason == "stop" and parent.entry is winner
    return name
