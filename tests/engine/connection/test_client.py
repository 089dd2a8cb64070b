"""The node-side client's retry before the first delta (issue #23 wrote it out instead of
a tenacity object per call): which failures are retried, how often, how long it waits.

A real grpc.aio server on a real port answers Generate from a script of outcomes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError, abort
from exo_remote_engine.engine.connection.client import SidecarClient, _retry_wait
from exo_remote_engine.engine.connection.target import RetryPolicy, SidecarTarget
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)


class Scripted(pb_grpc.RemoteInferenceServiceServicer):
    """Fails each call with the next error of ``script`` (a bare code: a status without the
    sidecar's details, as grpc itself ends a call); once it is used up, answers."""

    def __init__(self, script: list[RemoteError | grpc.StatusCode]) -> None:
        self.script = script
        self.calls: list[float] = []

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.calls.append(time.monotonic())
        if self.script:
            failure = self.script.pop(0)
            if isinstance(failure, grpc.StatusCode):
                await context.abort(failure, failure.name.capitalize())
            await abort(context, failure)
        await context.write(pb.GenerateResponse(delta=pb.Delta(text="hello")))
        await context.write(pb.GenerateResponse(finished=pb.Finished(finish_reason=pb.FINISH_REASON_STOP)))


async def _serve(servicer: Scripted) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_RemoteInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _run(
    script: list[RemoteError | grpc.StatusCode], policy: RetryPolicy
) -> tuple[str, RemoteError | None, Scripted]:
    servicer = Scripted(script)
    server, address = await _serve(servicer)
    client = SidecarClient(SidecarTarget(address=address, retry=policy))
    text, failure = "", None
    try:
        request = pb.GenerateRequest(request_id="t", model="m")
        events: AsyncIterator[pb.GenerateResponse] = client.generate(request)
        text = "".join([e.delta.text async for e in events])
    except RemoteError as exc:
        failure = exc
    finally:
        await client.close()
        await server.stop(None)
    return text, failure, servicer


FAST = RetryPolicy(attempts=4, max_total_s=20.0, base_delay_s=0.01, max_delay_s=0.02)


async def test_overloaded_and_unavailable_are_retried_until_an_answer() -> None:
    script = [RemoteError(Reason.OVERLOADED, "full"), RemoteError(Reason.SIDECAR_UNAVAILABLE, "draining")]
    text, failure, servicer = await _run(script, FAST)
    assert (text, failure, len(servicer.calls)) == ("hello", None, 3)


async def test_a_bare_cancelled_before_the_first_delta_is_the_sidecar_going_away() -> None:
    """A sidecar stopping as a call arrives cancels it in grpc, without the sidecar's
    details (test_sidecar_hosts' drain saw one under load): retried like UNAVAILABLE."""
    text, failure, servicer = await _run([grpc.StatusCode.CANCELLED], FAST)
    assert (text, failure, len(servicer.calls)) == ("hello", None, 2)
    _, failure, _ = await _run([grpc.StatusCode.CANCELLED] * 10, FAST)
    assert failure is not None and failure.reason is Reason.SIDECAR_UNAVAILABLE, failure


async def test_other_failures_are_not_retried() -> None:
    text, failure, servicer = await _run([RemoteError(Reason.RATE_LIMITED, "provider 429")], FAST)
    assert failure is not None and failure.reason is Reason.RATE_LIMITED and text == ""
    assert len(servicer.calls) == 1


async def test_attempts_are_bounded_and_the_last_error_is_raised() -> None:
    script = [RemoteError(Reason.OVERLOADED, f"full {i}") for i in range(10)]
    _, failure, servicer = await _run(script, FAST)
    assert failure is not None and failure.reason is Reason.OVERLOADED and failure.message == "full 3"
    assert len(servicer.calls) == 4


async def test_the_total_budget_stops_retries_before_the_attempts_run_out() -> None:
    script = [RemoteError(Reason.OVERLOADED, "full", retry_after_s=0.3) for _ in range(10)]
    policy = RetryPolicy(attempts=10, max_total_s=0.5, base_delay_s=0.01, max_delay_s=0.02)
    _, failure, servicer = await _run(script, policy)
    assert failure is not None and failure.reason is Reason.OVERLOADED
    assert 2 <= len(servicer.calls) <= 3, servicer.calls  # 0.3 s apart, stopped past 0.5 s


async def test_retry_after_is_honoured_between_attempts() -> None:
    script = [RemoteError(Reason.OVERLOADED, "full", retry_after_s=0.4)]
    text, _, servicer = await _run(script, FAST)
    assert text == "hello" and len(servicer.calls) == 2
    assert servicer.calls[1] - servicer.calls[0] >= 0.4


def test_the_wait_is_jittered_backoff_but_at_least_the_hint_capped_by_the_budget() -> None:
    policy = RetryPolicy(attempts=4, max_total_s=2.0, base_delay_s=0.25, max_delay_s=5.0)
    plain = RemoteError(Reason.OVERLOADED, "full")
    for attempt, cap in [(1, 0.25), (2, 0.5), (3, 1.0), (9, 5.0)]:
        waits = [_retry_wait(policy, attempt, plain) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits) and max(waits) > cap / 2, (attempt, max(waits))
    hinted = RemoteError(Reason.OVERLOADED, "full", retry_after_s=1.5)
    assert all(_retry_wait(policy, 1, hinted) >= 1.5 for _ in range(50))
    too_long = RemoteError(Reason.OVERLOADED, "full", retry_after_s=60.0)
    assert all(_retry_wait(policy, 1, too_long) == 2.0 for _ in range(50))
