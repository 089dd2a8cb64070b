"""Queueing instead of refusal (control/queueing.py) through a real sidecar, real gRPC and
the real upstream, on a controllable clock: minute windows end when the test moves the
clock, never by sleeping. Fair turns between two nodes, FIFO within one, a cancel that
leaves the line at once, a timeout that ends in today's error, and the fair share of the
global stream cap (an attacker node holding streams cannot lock a victim out)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from exo_remote_engine.contract.errors import Reason
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.server import RunningSidecar
from exo_remote_engine.sidecar.config.rules import Limits
from exo_remote_engine.sidecar.control.queueing import FairQueue
from tests.support.harness import chat_request, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.traffic import MINUTE_START, FakeClock, Sidecars, complete, deployment, outcome

TOKENS = {"n1": "token-of-node-one-0001", "n2": "token-of-node-two-0002"}
HOLD = Scenario(chunks=[f"s{i} " for i in range(2000)], interval_s=0.05)  # a stream that lasts


async def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait (bounded) for the sidecar to reach a state; an event, not a duration."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def _texts(upstream: OpenAIUpstream) -> list[str]:
    out = []
    for request in upstream.requests:
        body = request.body or {}
        out.append(str(body["messages"][-1]["content"]))
    return out


def _clients(sidecar: RunningSidecar) -> dict[str, SidecarClient]:
    return {node: sidecar_client(sidecar.address, token=token) for node, token in TOKENS.items()}


def _nodes(rules: str = "{}") -> str:
    return "".join(f"    {node}: {rules}\n" for node in TOKENS)


@pytest.mark.timeout(120)
async def test_two_nodes_take_turns_at_a_full_group_and_each_is_served_in_order(
    upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    text = "model_list:\n" + deployment("g", "m-a", upstream.url, rpm=4)
    text += "exo_remote_settings:\n  queue_timeout: 600\n  nodes:\n" + _nodes()
    clock = FakeClock(MINUTE_START + 10)
    sidecar = await sidecars.start(text, clock, named_tokens=TOKENS)
    clients = _clients(sidecar)
    tasks: list[asyncio.Task[str]] = []

    def waiting() -> int:
        line = sidecar.servicer.lines.groups.get("g")
        return line.depth() if line is not None else 0

    try:
        # n1 sends 8, one after the other: 4 fit this minute, 4 wait; then n2 sends 4.
        for node, count in (("n1", 8), ("n2", 4)):
            for i in range(count):
                tasks.append(asyncio.create_task(complete(clients[node], "g", f"{node}-{i}")))
                n = len(tasks)
                await _until(lambda n=n: len(upstream.requests) + waiting() == n, f"request {n} arrived")
        assert len(upstream.requests) == 4 and waiting() == 8
        served: list[list[str]] = [_texts(upstream)]
        for minute in (1, 2):
            await _until(lambda: clock.sleepers >= 1, "the line sleeps until the window ends")
            clock.now += 60
            await _until(lambda m=minute: len(upstream.requests) == 4 + 4 * m, f"minute {minute} admitted 4")
            served.append(_texts(upstream)[4 * minute :])
        replies = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        for client in clients.values():
            await client.close()
    # (Admitted together, they reach the provider in any order: compared as sets.)
    assert set(served[0]) == {"n1-0", "n1-1", "n1-2", "n1-3"}
    assert set(served[1]) == {"n1-4", "n2-0", "n1-5", "n2-1"}, "round robin between nodes, FIFO within each"
    assert set(served[2]) == {"n1-6", "n2-2", "n1-7", "n2-3"}
    assert sorted(replies) == sorted(f"echo: n{n}-{i}" for n, c in ((1, 8), (2, 4)) for i in range(c))
    assert waiting() == 0


@pytest.mark.timeout(60)
async def test_a_cancel_while_queued_leaves_the_line_at_once(upstream: OpenAIUpstream, sidecars: Sidecars) -> None:
    text = "model_list:\n" + deployment("solo", "m-a", upstream.url)
    text += "exo_remote_settings:\n  nodes:\n" + _nodes("{rpm: 1, queue_timeout: 600}")
    clock = FakeClock(MINUTE_START + 10)
    sidecar = await sidecars.start(text, clock, named_tokens=TOKENS)
    client = _clients(sidecar)["n1"]
    line = sidecar.servicer.lines.limits
    registry = sidecar.servicer.metrics.registry
    try:
        assert await complete(client, "solo", "first") == "echo: first"
        queued = asyncio.create_task(complete(client, "solo", "cancelled"))
        await _until(lambda: line.depth("n1") == 1, "the second request waits")
        assert registry.get_sample_value("exo_remote_queue_depth", {"node": "n1"}) == 1
        queued.cancel()
        await _until(lambda: line.depth("n1") == 0, "the cancelled request left the line")
        assert registry.get_sample_value("exo_remote_queue_depth", {"node": "n1"}) == 0
        refused = {"node": "n1", "outcome": "refused"}
        assert registry.get_sample_value("exo_remote_queue_wait_seconds_count", refused) == 1
        third = asyncio.create_task(complete(client, "solo", "third"))
        await _until(lambda: line.depth("n1") == 1, "the third request waits")
        clock.now += 60
        assert await asyncio.wait_for(third, 20) == "echo: third"
    finally:
        await client.close()
    assert _texts(upstream) == ["first", "third"], "the cancelled request never reached the provider"
    admitted = {"node": "n1", "outcome": "admitted"}
    assert registry.get_sample_value("exo_remote_queue_wait_seconds_sum", admitted) == pytest.approx(60, abs=1)


@pytest.mark.timeout(60)
async def test_past_its_queue_timeout_a_request_gets_todays_error_with_a_true_retry_after(
    upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    text = "model_list:\n" + deployment("solo", "m-a", upstream.url)
    text += "exo_remote_settings:\n  queue_timeout: 20\n  nodes:\n" + _nodes("{rpm: 1}")
    clock = FakeClock(MINUTE_START + 10)
    sidecar = await sidecars.start(text, clock, named_tokens=TOKENS)
    client = _clients(sidecar)["n1"]
    try:
        assert await outcome(client, "solo") is None
        late = asyncio.create_task(outcome(client, "solo"))
        await _until(lambda: sidecar.servicer.lines.limits.depth("n1") == 1, "the second request waits")
        clock.now += 21
        error = await asyncio.wait_for(late, 20)
    finally:
        await client.close()
    assert error is not None and error.reason is Reason.RATE_LIMITED
    assert error.retry_after_s is not None and abs(error.retry_after_s - 29) < 0.5, error
    assert "in line" in error.message and len(upstream.requests) == 1


@pytest.mark.timeout(120)
async def test_an_attacker_holding_streams_cannot_lock_a_victim_out_of_the_global_cap(
    upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    upstream.scenarios["m-hold"] = HOLD
    text = "model_list:\n" + deployment("hold", "m-hold", upstream.url) + deployment("quick", "m-a", upstream.url)
    text += "exo_remote_settings:\n  nodes:\n" + _nodes()
    sidecar = await sidecars.start(text, FakeClock(), named_tokens=TOKENS, limits=Limits(max_concurrent_streams=16))
    clients = _clients(sidecar)
    attacker, victim = clients["n1"], clients["n2"]
    held = []
    try:
        while True:  # the attacker takes every slot it can get
            stream = attacker.generate(chat_request("hold"))
            try:
                await stream.__anext__()
            except Exception as exc:
                refused = exc
                break
            held.append(stream)
        assert len(held) == 15, "one node alone leaves the last 16th of the cap"
        assert getattr(refused, "reason", None) is Reason.OVERLOADED and "fair share" in str(refused)
        assert await complete(victim, "quick", "victim") == "echo: victim"
        victim_stream = victim.generate(chat_request("hold"))
        await victim_stream.__anext__()  # the cap is full now: 15 + 1
        await held.pop().aclose()  # type: ignore[attr-defined]
        await _until(lambda: sidecar.servicer.policy.active_streams == 15, "the attacker's stream ended")
        error = await outcome(attacker, "quick")
        assert error is not None and error.reason is Reason.OVERLOADED, "over its share: the slot is not its"
        assert await complete(victim, "quick", "again") == "echo: again"
        await victim_stream.aclose()  # type: ignore[attr-defined]
    finally:
        for stream in held:
            await stream.aclose()  # type: ignore[attr-defined]
        for client in clients.values():
            await client.close()


async def test_a_node_with_priority_is_served_first_in_each_round() -> None:
    clock = FakeClock()
    line = FairQueue(clock, sleep=clock.sleep)
    room = 0
    order: list[str] = []

    def admit(name: str) -> Callable[[], asyncio.Future[None]]:
        async def attempt() -> None:
            nonlocal room
            if room <= 0:
                from exo_remote_engine.contract.errors import RemoteError

                raise RemoteError(Reason.OVERLOADED, "full", retry_after_s=1.0)
            room -= 1
            order.append(name)

        return attempt  # type: ignore[return-value]

    tasks = [
        asyncio.create_task(line.wait(node, admit(f"{node}{i}"), 600, priority=5 if node == "vip" else 0))
        for i in range(2)
        for node in ("a", "b", "vip")
    ]
    await _until(lambda: line.depth() == 6, "all six wait")
    room = 3
    line.kick()
    await _until(lambda: len(order) == 3, "three admitted")
    assert order == ["vip0", "a0", "b0"]
    room = 3
    line.kick()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order[3:] == ["vip1", "a1", "b1"]
    await line.close()


@pytest.mark.timeout(120)
async def test_a_freed_slot_goes_to_the_waiting_victim_not_to_the_attacker_queued_before_it(
    upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    upstream.scenarios["m-hold"] = HOLD
    text = "model_list:\n" + deployment("hold", "m-hold", upstream.url) + deployment("quick", "m-a", upstream.url)
    text += "exo_remote_settings:\n  queue_timeout: 600\n  nodes:\n" + _nodes()
    limits = Limits(max_concurrent_streams=16)
    sidecar = await sidecars.start(text, FakeClock(), named_tokens=TOKENS, limits=limits)
    clients = _clients(sidecar)
    attacker, victim = clients["n1"], clients["n2"]
    slots = sidecar.servicer.lines.slots
    held = []
    queued: list[asyncio.Task[str]] = []
    try:
        for node, count in (("n1", 15), ("n2", 1)):  # the cap is full: 15 + 1
            for _ in range(count):
                stream = clients[node].generate(chat_request("hold"))
                await stream.__anext__()
                held.append(stream)
        for i in range(3):  # the attacker queues first ...
            queued.append(asyncio.create_task(complete(attacker, "quick", f"a{i}")))
            await _until(lambda i=i: slots.depth("n1") == i + 1, "the attacker's requests wait")
        turn = asyncio.create_task(complete(victim, "quick", "victim"))  # ... the victim after it
        await _until(lambda: slots.depth("n2") == 1, "the victim's request waits")
        await held.pop(0).aclose()  # type: ignore[attr-defined]  # one attacker stream ends
        assert await asyncio.wait_for(turn, 20) == "echo: victim"
        assert slots.depth("n1") == 3, "the attacker, over its share, still waits"
        for stream in held[:3]:  # more of the attacker's streams end: its line moves again
            await stream.aclose()  # type: ignore[attr-defined]
        assert sorted(await asyncio.wait_for(asyncio.gather(*queued), 20)) == [f"echo: a{i}" for i in range(3)]
        held = held[3:]
    finally:
        for task in queued:
            task.cancel()
        for stream in held:
            await stream.aclose()  # type: ignore[attr-defined]
        for client in clients.values():
            await client.close()
